"""bench/gpu_check.sh: its dry mode runs every part end to end on the CPU, and each part must report success with
its result files (so a part that breaks fails this test); a part that cannot run is recorded, not passed."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
PARTS = ["0_machine", "1_gpu_tests", "2_generation", "3_kd_step", "4a_multi30k_train", "4b_multi30k_evaluate",
         "4c_multi30k_report"]


def _run(tmp_path, *args, **env):
    environment = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"),
                       PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    environment.pop("GPU_CHECK_DRY", None)
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=900)


def _log_tail(out, part):
    path = out / f"{part}.log"
    return path.read_text()[-3000:] if path.exists() else "(no log)"


@pytest.mark.slow
def test_dry_run_runs_every_part_and_each_reports_success(tmp_path):
    proc = _run(tmp_path, "--dry")
    out = tmp_path / "out"
    assert (out / "summary.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [p["part"] for p in summary["parts"]] == PARTS
    for part in summary["parts"]:
        assert part["status"] == "ok", (part, _log_tail(out, part["part"]))
        for name in part["results"]:
            assert (out / name).stat().st_size > 0, name
    assert proc.returncode == 0 and summary["all_ok"], proc.stdout[-3000:]
    assert f"results in {out}" in proc.stdout and "every part succeeded" in proc.stdout

    machine = (out / "0_machine.log").read_text()
    assert "torch " in machine and "transformers " in machine and "ctranslate2" in machine

    tests = json.loads((out / "1_gpu_tests.json").read_text())  # ran on the CPU in dry mode, none skipped
    assert tests["passed"] == len(tests["tests"]) >= 3 and tests["skipped"] == 0

    generation = json.loads((out / "2_generation.json").read_text())
    assert [r["method"] for r in generation["rows"]] == ["naive", "build_seqkd_dataset",
                                                         "build_seqkd_dataset, CTranslate2 float16"]
    assert generation["failed"] == {} and all(r["seconds"] > 0 for r in generation["rows"])
    assert "| naive `Dataset.map` + `generate` |" in (out / "2_generation.md").read_text()

    kd_step = json.loads((out / "3_kd_step.json").read_text())
    assert kd_step["bf16"] is True and [r["mode"] for r in kd_step["rows"]][:2] == ["ce_only", "kd_loss"]
    assert len(kd_step["rows"]) == 7 and all(r["seconds"] > 0 for r in kd_step["rows"])

    study = json.loads((out / "multi30k_gpu_check.json").read_text())
    assert study["preset"] == "gpu_check"
    assert {s["stage"] for s in study["stages"]} == {"tokenizer", "teacher", "seqkd_corpus", "baseline", "word_kd",
                                                      "seq_kd", "evaluate"}
    models = {m["model"]: m for m in study["models"]}
    assert set(models) == {"teacher", "baseline", "word_kd", "seq_kd"}
    assert all(m["bleu_greedy"] is not None and m["sent_per_s_greedy_batched"] for m in models.values())

    report = (out / "summary.md").read_text()
    for heading in ("## Machine", "## GPU tests", "## Seq-KD corpus building", "## Word-KD step, bf16",
                    "## Multi30k study, preset `gpu_check`"):
        assert heading in report, heading


def test_parts_left_without_time_are_recorded_as_not_run(tmp_path):
    """A budget too small for any part: every part is recorded as not run, and the script fails."""
    proc = _run(tmp_path, "--dry", GPU_CHECK_BUDGET="5")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [p["part"] for p in summary["parts"]] == PARTS
    assert all(p["status"] == "not run" for p in summary["parts"]) and not summary["all_ok"]
    assert "SOME PARTS DID NOT SUCCEED" in proc.stdout
