"""bench/multi30k.py's bookkeeping: finished stages are skipped, an interrupted stage's time is not lost."""

import importlib.util
import json
import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def multi30k(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_multi30k", os.path.join(ROOT, "bench", "multi30k.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HEARTBEAT_SECONDS", 0.05)
    return module


def test_interrupted_stage_time_counts_and_finished_stage_is_skipped(multi30k, tmp_path):
    study = multi30k.Study("smoke", str(tmp_path / "study"), str(tmp_path / "data"))

    def interrupted():
        time.sleep(0.5)
        raise KeyboardInterrupt  # the session ends mid-stage

    with pytest.raises(KeyboardInterrupt):
        study.run_stage("teacher", interrupted)
    assert not study.done("teacher")
    with open(os.path.join(study.stage_dir, "teacher.partial.json")) as f:
        partial = json.load(f)
    assert partial["attempts"] == 1 and 0.4 <= partial["seconds"] <= 0.6

    calls = []
    study.run_stage("teacher", lambda: calls.append(1) or {"params": 3})
    with open(study.marker("teacher")) as f:
        record = json.load(f)
    assert record["attempts"] == 2 and record["result"] == {"params": 3}
    assert record["seconds"] == pytest.approx(partial["seconds"] + record["seconds_last_attempt"])
    assert not os.path.exists(os.path.join(study.stage_dir, "teacher.partial.json"))

    study.run_stage("teacher", lambda: calls.append(1))  # done: skipped
    assert calls == [1]


def test_preset_overrides_are_checked_and_a_work_folder_keeps_its_settings(multi30k, tmp_path):
    assert multi30k.parse_overrides(["split_punctuation=True", "student_epochs=5", "batch1_beam=all"]) == {
        "split_punctuation": True, "student_epochs": 5, "batch1_beam": "all"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        multi30k.parse_overrides(["split_punctuation"])
    with pytest.raises(ValueError, match="unknown preset setting.*'studnet_epochs'"):
        multi30k.Study("smoke", str(tmp_path / "a"), "data", {"studnet_epochs": 2})
    study = multi30k.Study("smoke", str(tmp_path / "b"), "data", {"split_punctuation": False})
    assert study.p["split_punctuation"] is False and study.p["vocab_size"] == multi30k.PRESETS["smoke"]["vocab_size"]
    multi30k.Study("smoke", str(tmp_path / "b"), "data", {"split_punctuation": False})  # the same settings: fine
    with pytest.raises(ValueError, match="use another --work_dir"):
        multi30k.Study("smoke", str(tmp_path / "b"), "data")
