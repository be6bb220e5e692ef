"""bench/multi30k.py's bookkeeping: finished stages are skipped, an interrupted stage's time is not lost."""

import gzip
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
    # a folder that holds nothing but its settings (a first run stopped by bad input) takes other settings ...
    assert multi30k.Study("smoke", str(tmp_path / "b"), "data").p["split_punctuation"] is True
    assert multi30k.recorded_settings(str(tmp_path / "b")) == {"preset": "smoke", "overrides": {}}
    # ... and once a stage (or anything else) is in it, it keeps them
    (tmp_path / "b" / "stages" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="use another --work_dir"):
        multi30k.Study("smoke", str(tmp_path / "b"), "data", {"split_punctuation": False})
    (tmp_path / "c" / "probes").mkdir(parents=True)  # a probe's output, no stage
    multi30k.Study("smoke", str(tmp_path / "c"), "data")
    with pytest.raises(ValueError, match="use another --work_dir"):
        multi30k.Study("smoke", str(tmp_path / "c"), "data", {"split_punctuation": False})


def _fake_stage(tmp_path, name, seconds, rc=0):
    """A subprocess standing in for a stage: records when it ran, then finishes (writes its marker) or fails."""
    import subprocess
    import sys

    code = ("import json, sys, time; t0 = time.time(); time.sleep(%r); "
            "json.dump([t0, time.time()], open(sys.argv[1] + '.ran', 'w')); "
            "rc = %d; rc or open(sys.argv[1] + '.done', 'w').close(); sys.exit(rc)" % (seconds, rc))
    return subprocess.Popen([sys.executable, "-c", code, str(tmp_path / name)])


def test_side_by_side_respects_jobs_and_dependencies(multi30k, tmp_path):
    seconds = {"a": 0.6, "b": 0.3, "c": 0.3, "d": 0.3, "e": 0.3}
    needs = {"c": ["b"], "d": ["c"]}  # a chain b -> c -> d, beside a and e

    def done(name):
        return (tmp_path / f"{name}.done").exists()

    failed = multi30k.run_side_by_side(list(seconds), needs, done,
                                       lambda n: _fake_stage(tmp_path, n, seconds[n]), jobs=2, poll_seconds=0.02)
    assert failed == []
    ran = {n: json.loads((tmp_path / f"{n}.ran").read_text()) for n in seconds}
    assert ran["c"][0] >= ran["b"][1] and ran["d"][0] >= ran["c"][1]  # a stage starts after what it needs
    assert ran["b"][0] < ran["a"][1]  # b ran beside a
    for t, _ in ran.values():  # never more than 2 at once (a stage starts after its predecessor's process ended)
        assert sum(start <= t < end for start, end in ran.values()) <= 2

    # a stage done earlier is skipped; a failure stops further launches and is reported
    (tmp_path / "a.done").unlink()
    for n in "bcde":
        (tmp_path / f"{n}.done").unlink()
    (tmp_path / "d.done").touch()
    launched = []

    def launch(n):
        launched.append(n)
        return _fake_stage(tmp_path, n, 0.05, rc=1 if n == "b" else 0)

    failed = multi30k.run_side_by_side(["b", "c", "d"], needs, done, launch, jobs=1, poll_seconds=0.02)
    assert failed == ["b"] and launched == ["b"]  # c needs b, which failed; d was done


def test_study_wall_time_counts_side_by_side_stages_once(multi30k):
    records = [
        {"started_at": 100.0, "seconds": 10.0, "seconds_last_attempt": 10.0},  # [100, 110]
        {"started_at": 105.0, "seconds": 10.0, "seconds_last_attempt": 7.0},  # [105, 112], 3 s in an earlier attempt
        {"started_at": 120.0, "seconds": 5.0, "seconds_last_attempt": 5.0},  # [120, 125]
    ]
    # the slow way: mark every 0.5 s tick covered by some interval
    ticks = {t / 2 for r in records for t in range(int(2 * r["started_at"]),
                                                    int(2 * (r["started_at"] + r["seconds_last_attempt"])))}
    assert multi30k.study_wall_seconds(records) == pytest.approx(len(ticks) / 2 + 3.0)  # 12 + 5 + 3
    assert multi30k.study_wall_seconds(records[:1] + [{"seconds": 4.0, "seconds_last_attempt": 4.0}]) is None


def test_a_stage_running_in_another_live_process_is_refused(multi30k, tmp_path):
    import subprocess
    import sys

    study = multi30k.Study("smoke", str(tmp_path / "study"), str(tmp_path / "data"))
    partial = os.path.join(study.stage_dir, "baseline.partial.json")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        multi30k._write_json(partial, {"seconds": 5.0, "attempts": 1, "pid": other.pid,
                                       "host": multi30k.platform.node()})
        with pytest.raises(RuntimeError, match=f"running in process {other.pid}"):
            study.run_stage("baseline", lambda: {})
    finally:
        other.kill()
        other.wait()
    study.run_stage("baseline", lambda: {})  # that process is gone: the stage resumes, its time kept
    with open(study.marker("baseline")) as f:
        record = json.load(f)
    assert record["attempts"] == 2 and record["seconds"] >= 5.0


def test_side_by_side_order_and_dependencies(multi30k, tmp_path):
    study = multi30k.Study("cpu", str(tmp_path / "study"), str(tmp_path / "data"))
    needs = study.side_by_side_needs()
    assert list(needs)[:4] == ["seq_kd", "hybrid", study.BEST, "prune"]
    assert needs[study.BEST] == ["seq_kd"] and needs["prune"] == [study.BEST]
    assert needs["baseline_seq_inter"] == ["baseline"] and needs["ckd_skip"] == []
    assert set(needs) == {n for n, _ in study.student_specs()} | {"prune"}


def test_gpu_preset_on_a_machine_without_gpu_stops_with_a_clear_error(multi30k, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "data").mkdir()
    with gzip.open(tmp_path / "data" / "train.de.gz", "wt") as f:  # the corpus check passes; nothing reads it
        f.write("ein Satz\n")
    with pytest.raises(SystemExit, match="trains in bfloat16 on a GPU, and this machine has none"):
        multi30k.main(["--preset", "gpu", "--work_dir", str(tmp_path / "study"), "--data_dir", str(tmp_path / "data")])
    assert not os.path.exists(tmp_path / "study" / "tokenizer")  # no stage started


def test_a_preset_can_reuse_another_studys_teacher_and_run_some_methods(multi30k, tmp_path):
    """cpu5_* presets: the cpu study's tokenizer, teacher and corpus, their own students (5 epochs), checked first."""
    teacher_study = tmp_path / "cpu_study"
    study = multi30k.Study("cpu5_word", str(tmp_path / "word"), "data", {"teacher_study": str(teacher_study)})
    assert [n for n, _ in study.stages()] == ["word_kd", "ckd_skip", "ckd_regular_comb", "hybrid", "evaluate"]
    assert study.teacher_dir == str(teacher_study / "teacher") and study.cache_dir == str(teacher_study /
                                                                                         "seqkd_cache")
    assert study.teacher_ct2_dir.startswith(str(teacher_study))
    assert "--num_train_epochs" in (args := study.training_args("out", study.p["student_epochs"], 1e-3))
    assert args[args.index("--num_train_epochs") + 1] == "5"
    with pytest.raises(SystemExit, match="tokenizer, teacher, seqkd_corpus of the study in"):
        study.check_teacher_study()
    (teacher_study / "stages").mkdir(parents=True)
    for stage in ("tokenizer", "teacher", "seqkd_corpus"):
        (teacher_study / "stages" / f"{stage}.json").write_text("{}")
    study.check_teacher_study()  # now there

    sequence = multi30k.Study("cpu5_sequence", str(tmp_path / "sequence"), "data")
    assert [n for n, _ in sequence.stages()] == ["baseline", "seq_kd", "seq_kd_word_kd", "baseline_seq_inter",
                                                 "seq_kd_seq_inter_word_kd", "prune", "ctranslate2", "evaluate"]
    assert sequence.side_by_side_needs()["prune"] == ["seq_kd_seq_inter_word_kd"]
    own = multi30k.Study("cpu", str(tmp_path / "own"), "data")  # the cpu study trains its own teacher
    assert [n for n, _ in own.stages()][:4] == ["tokenizer", "teacher", "teacher_ctranslate2", "seqkd_corpus"]
    own.check_teacher_study()


def test_with_student_patience_each_student_trains_until_validation_bleu_stops_improving(multi30k, tmp_path,
                                                                                        monkeypatch):
    """cpu_converged: the recipe validates greedily every epoch, stops after `student_patience` epochs without a
    better validation BLEU and keeps the best checkpoint, `student_epochs` a cap; without it (cpu5_*), fixed epochs."""
    from hf_seqkd.cli import parse_args

    arguments = multi30k.load_recipe("seq_kd").ARGUMENTS
    calls = []
    monkeypatch.setattr(multi30k, "load_recipe", lambda name: type("Recipe", (), {"main": staticmethod(calls.append)}))
    parsed = {}
    teacher_study = {"teacher_study": str(tmp_path / "cpu_study")}  # its CTranslate2 teacher, as the recipe checks
    os.makedirs(tmp_path / "cpu_study" / "ctranslate2" / "teacher_float32")
    (tmp_path / "cpu_study" / "ctranslate2" / "teacher_float32" / "model.bin").write_bytes(b"")
    for preset in ("cpu_converged", "cpu5_sequence"):
        study = multi30k.Study(preset, str(tmp_path / preset), str(tmp_path / "data"), teacher_study)
        # the trainer's state as a run with validation leaves it: the stage's result carries its history
        state = tmp_path / preset / "students" / "baseline" / "checkpoint-9"
        state.mkdir(parents=True)
        (state / "trainer_state.json").write_text(json.dumps({
            "epoch": 2.0, "best_metric": 25.5, "best_model_checkpoint": "checkpoint-6",
            "log_history": [{"epoch": 1.0, "eval_bleu": 20.0}, {"loss": 3.0}, {"epoch": 2.0, "eval_bleu": 25.5}]}))
        result = dict(study.stages())["baseline"]()
        _, data_args, _, args = parse_args(arguments, calls[-1])  # as the recipe reads them
        parsed[preset] = (data_args, args, result)
    data_args, args, result = parsed["cpu_converged"]
    assert (data_args.eval_split, args.eval_strategy, args.save_strategy) == ("validation", "epoch", "epoch")
    assert args.predict_with_generate and args.generation_num_beams == 1
    assert args.load_best_model_at_end and args.metric_for_best_model == "bleu" and args.greater_is_better
    assert (args.early_stopping_patience, args.num_train_epochs) == (3, 30)
    assert result["patience"] == 3 and result["epochs"] == 30
    assert (result["validation_bleu_per_epoch"], result["best_validation_bleu"], result["epochs_trained"]) == (
        [(1.0, 20.0), (2.0, 25.5)], 25.5, 2.0)
    # the report lists each such student's validation BLEU per epoch (from its stage record)
    study = multi30k.Study("cpu_converged", str(tmp_path / "cpu_converged"), str(tmp_path / "data"), teacher_study)
    with open(study.marker("baseline"), "w") as f:
        json.dump({"result": dict(result, validation_bleu_per_epoch=[[1.0, 20.0], [2.0, 25.5], [3.0, 25.25]],
                                  best_validation_bleu=25.5, epochs_trained=3.0)}, f)
    assert [line for line in study.report_lines() if line] == [
        "`baseline`: validation BLEU (greedy) per epoch 20.00, 25.50, 25.25; best 25.50, 3 epochs trained."]
    data_args, args, result = parsed["cpu5_sequence"]
    assert data_args.eval_split in ("", None) and args.eval_strategy == "no" and not args.load_best_model_at_end
    assert args.early_stopping_patience is None and args.num_train_epochs == 5 and "patience" not in result
    assert "validation_bleu_per_epoch" not in result

    # patience is a number of epochs >= 1, and a study that reuses another's teacher trains none
    for bad in (0, -1, True, "3", 2.5):
        with pytest.raises(ValueError, match=f"student_patience={bad!r}: give a number of epochs >= 1"):
            multi30k.Study("cpu_converged", str(tmp_path / "bad"), "data", {"student_patience": bad})
    with pytest.raises(ValueError, match="teacher_patience=3 with teacher_study=.*set teacher_study=None"):
        multi30k.Study("cpu_converged", str(tmp_path / "bad"), "data", {"teacher_patience": 3})

    # cpu_converged_teacher: its own teacher, trained the same way (at most 40 epochs); the cpu preset's: 5 epochs
    own = multi30k.Study("cpu_converged_teacher", str(tmp_path / "own"), str(tmp_path / "data"))
    assert [n for n, _ in own.stages()][:4] == ["tokenizer", "teacher", "teacher_ctranslate2", "seqkd_corpus"]
    _, data_args, _, args = parse_args(arguments, own.teacher_args(str(tmp_path / "init")))
    assert (data_args.eval_split, args.eval_strategy, args.load_best_model_at_end) == ("validation", "epoch", True)
    assert (args.early_stopping_patience, args.num_train_epochs, args.alpha) == (3, 40, 0.0)
    _, _, _, args = parse_args(arguments, multi30k.Study("cpu", str(tmp_path / "cpu"), "data").teacher_args("init"))
    assert (args.early_stopping_patience, args.num_train_epochs, args.eval_strategy) == (None, 5, "no")
