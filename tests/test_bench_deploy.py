"""bench/multi30k_deploy.py: the shape rule, the targets' verdicts, and every stage end to end on tiny models."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def deploy():
    name = "bench_multi30k_deploy"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", "multi30k_deploy.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _row(name, params, transformers, ctranslate2, within_budget=True):
    return {"name": name, "params": params, "within_budget": within_budget,
            "speedup": {"transformers": transformers, "ctranslate2": ctranslate2}}


TARGETS = {"transformers": 3.0, "ctranslate2": 5.0}


def test_the_largest_shapes_that_meet_every_speed_target_go_to_the_quality_trial(deploy):
    rows = [_row("small_fast", 1, 4.0, 9.0), _row("big_fast", 3, 3.1, 5.2), _row("mid_fast", 2, 3.5, 6.0),
            _row("fast_in_one_engine", 4, 5.0, 4.9), _row("too_big", 9, 9.0, 9.0, within_budget=False)]
    chosen, why = deploy.choose_shapes(rows, TARGETS, trials=2)
    assert [r["name"] for r in chosen] == ["big_fast", "mid_fast"]
    assert "meet every speed target" in why


def test_without_a_fast_enough_shape_the_closest_ones_are_tried_and_the_record_says_so(deploy):
    rows = [_row("a", 1, 2.0, 4.5), _row("b", 2, 2.9, 3.0), _row("c", 3, 2.7, 4.4),
            _row("over_budget", 1, 9.0, 9.0, within_budget=False)]
    chosen, why = deploy.choose_shapes(rows, TARGETS, trials=2)
    # worst ratio to target: a min(0.67, 0.9) = 0.67, b min(0.97, 0.6) = 0.6, c min(0.9, 0.88) = 0.88
    assert [r["name"] for r in chosen] == ["c", "a"]
    assert "no shape within the budget meets every speed target" in why
    with pytest.raises(ValueError, match="parameter budget"):
        deploy.choose_shapes([rows[-1]], TARGETS, trials=2)


def test_targets_are_judged_with_their_thresholds(deploy):
    p = {"num_beams": 5, "speed_target_ctranslate2": 5.0, "speed_target_transformers": 3.0, "sparsity": 0.8}
    rows = {"teacher": {"bleu_beam": 38.7}, "s": {"bleu_greedy": 37.8},
            "s_prune_oneshot_80": {"bleu_greedy": 37.2}, "s_prune_gradual_retrain_80": {"bleu_greedy": 37.4}}
    speed = {"transformers": {"rows": {"s": {"speedup_over_reference_beam_batch1": 3.2}}},
             "ctranslate2_int8": {"rows": {"s_ct2_int8": {"speedup_over_reference_beam_batch1": 4.1}}}}
    lines = deploy.deploy_findings(rows, speed, p, "s")
    text = "\n".join(lines)
    assert "37.80 vs 38.70 (-0.90; target: within 1.0): met" in text
    assert "ctranslate2_int8, batch 1: the student's greedy decoding at 4.10x" in text and "not met" in lines[1]
    assert "transformers, batch 1" in lines[2] and lines[2].endswith(": met.")
    assert "(-0.60; target: within 0.5): not met" in lines[3] and "(-0.40; target: within 0.5): met" in lines[4]
    rows["s"]["bleu_greedy"] = 37.6
    assert "not met, by 0.10" in deploy.deploy_findings(rows, None, p, "s")[0]


def test_the_deployed_student_is_the_better_training_stage_on_validation(deploy, tmp_path):
    study = deploy.DeployStudy("deploy_smoke", str(tmp_path / "work"), str(tmp_path / "data"),
                               {"teacher_study": str(tmp_path / "teacher_study")})

    def finish(stage, best):
        with open(study.marker(stage), "w") as f:
            json.dump({"stage": stage, "result": {"best_validation_bleu": best}}, f)

    assert study.deployed_student() == study.STUDENT  # nothing trained yet
    finish("seq_kd", 36.66)
    assert study.deployed_student() == study.STUDENT  # the fine-tune not finished: no choice made
    finish(study.STUDENT, 35.10)
    assert study.deployed_student() == "seq_kd"  # the fine-tune ended below where it started
    finish(study.STUDENT, 36.70)
    assert study.deployed_student() == study.STUDENT
    finish(study.STUDENT, None)  # no validation score recorded: the staged student, as the study's design says
    assert study.deployed_student() == study.STUDENT
    assert any("Deployed (pruned, exported, judged): `seq_inter_word_kd_ckd`" in line for line in study.report_lines())


def test_the_fine_tune_objective_is_the_presets_and_checked_against_the_chosen_shape(deploy, tmp_path):
    from transformers import MarianConfig

    teacher_study = tmp_path / "teacher_study"
    MarianConfig(encoder_layers=2, decoder_layers=2, d_model=16, vocab_size=32).save_pretrained(
        str(teacher_study / "teacher"))

    def study_with(shape, **overrides):
        study = deploy.DeployStudy("deploy_smoke", str(tmp_path / f"work_{shape[1]}_{len(overrides)}"),
                                   str(tmp_path / "data"), {"teacher_study": str(teacher_study), **overrides})
        with open(study.marker("shape_trials"), "w") as f:
            json.dump({"stage": "shape_trials", "result": {"shape": list(shape)}}, f)
        return study

    assert study_with((32, 2, 1, 64, 4)).finetune_objective() == {
        "alpha": 0.35, "extra_args": ("--intermediate_loss_weight", "0.3", "--layer_mapping", "skip")}
    # deploy_probe's ckd_skip_even, documented as the preset's objective, is the preset's
    spec = importlib.util.spec_from_file_location("bench_deploy_probe", os.path.join(ROOT, "bench", "deploy_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.FINETUNE_VARIANTS["ckd_skip_even"] == study_with((32, 2, 1, 64, 4)).finetune_objective()
    deeper = study_with((32, 3, 1, 64, 4))
    with pytest.raises(ValueError, match="encoder has 3 layers, the teacher's 2.*finetune_ckd_weight=0"):
        deeper.finetune_objective()
    with pytest.raises(ValueError, match="encoder has 3 layers"):  # before the Seq-KD stage's hours of training
        deeper.train_seq_kd()
    # Word-KD alone, as the error suggests: no CKD arguments, whatever the depth
    assert study_with((32, 3, 1, 64, 4), finetune_ckd_weight=0, finetune_alpha=0.5).finetune_objective() == {
        "alpha": 0.5, "extra_args": ()}
    with pytest.raises(FileNotFoundError, match="no trained student; run the stage seq_inter_word_kd_ckd first"):
        deeper.trained_student_dir(deeper.STUDENT)
    # the probes that read the study's student stop with the same message, as a clear exit (no traceback)
    os.makedirs(os.path.join(deeper.work_dir, "probes", "finetune_hybrid"))
    open(os.path.join(deeper.work_dir, "probes", "finetune_hybrid", "config.json"), "w").close()
    with pytest.raises(SystemExit, match="validate: .*no trained student; run the stage seq_inter_word_kd_ckd"):
        probe.main(["validate", "--variant", "hybrid", "--work_dir", deeper.work_dir, "--data_dir", "data"])
    with pytest.raises(SystemExit, match="prune: .*no trained student; run the stage seq_inter_word_kd_ckd"):
        probe.main(["prune", "--sparsity", "0.8", "--work_dir", deeper.work_dir, "--data_dir", "data"])


def test_deploy_converged_is_the_deploy_preset_on_the_converged_teachers_corpus(deploy, tmp_path):
    multi30k = deploy.multi30k
    study = deploy.DeployStudy("deploy_converged", str(tmp_path / "work"), "data")
    assert study.teacher_study_dir == os.path.join(ROOT, "runs", "multi30k_cpu_converged_teacher")
    # that study's tokenizer, teacher and corpus: the same corpus settings, so its students' cached corpus is read
    teacher_study = multi30k.Study("cpu_converged_teacher", str(tmp_path / "teacher_study"), "data")
    study = deploy.DeployStudy("deploy_converged", str(tmp_path / "work2"), "data",
                               {"teacher_study": teacher_study.work_dir})
    assert (study.teacher_dir, study.tokenizer_dir) == (teacher_study.teacher_dir, teacher_study.tokenizer_dir)
    assert study.seqkd_args() == teacher_study.seqkd_args()
    # the patience of its stages is checked before anything runs
    with pytest.raises(ValueError, match="patience=0: give a number of epochs >= 1"):
        deploy.DeployStudy("deploy_converged", str(tmp_path / "bad"), "data", {"patience": 0})
    # the one candidate is the deploy study's winner, and the student is trained as the deploy preset trains it
    deploy_preset, converged = deploy.PRESETS["deploy"], deploy.PRESETS["deploy_converged"]
    assert converged["shapes"] == (deploy_preset["reference_shape"],) and converged["shape_trials"] == 1
    assert {k: v for k, v in converged.items() if k not in ("teacher_study", "shapes", "shape_trials")} == {
        k: v for k, v in deploy_preset.items() if k not in ("teacher_study", "shapes", "shape_trials")}


def test_every_stage_runs_end_to_end_on_tiny_models(deploy, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForSeq2SeqLM

    from hf_seqkd.pruning import pruned_sparsity, sparsity_report

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data, teacher_study, work = tmp_path / "data", tmp_path / "teacher_study", tmp_path / "deploy"
    deploy.multi30k.write_stand_in_corpus(str(data), num_train=300, num_test=30)
    common = ["--data_dir", str(data), "--threads", "1", "--set", "train_samples=None"]
    deploy.multi30k.main(["--preset", "smoke", "--work_dir", str(teacher_study), "--stages", "tokenizer", "teacher",
                          "teacher_ctranslate2", "seqkd_corpus", *common])
    argv = ["--preset", "deploy_smoke", "--work_dir", str(work), *common, f"teacher_study={teacher_study}"]
    deploy.multi30k.main(argv, study_class=deploy.DeployStudy)
    study = deploy.DeployStudy("deploy_smoke", str(work), str(data),
                               {"train_samples": None, "teacher_study": str(teacher_study)})
    assert all(study.done(name) for name, _ in study.stages())

    shapes = study.stage_result("shapes")
    assert [r["name"] for r in shapes["rows"]] == ["d32_e1_d1_f64_h4", "d32_e2_d1_f64_h4"]
    assert all(r["speedup"]["transformers"] > 0 and r["speedup"]["ctranslate2"] > 0 for r in shapes["rows"])
    trials = study.stage_result("shape_trials")
    assert trials["shape"] in [t["shape"] for t in trials["trials"]] and len(trials["trials"]) == 2
    best = max(trials["trials"], key=lambda t: t["validation_bleu"])
    assert trials["shape"] == best["shape"]
    # the preset's student_jobs=2: the trials ran as subprocesses, side by side, each with its log and its results
    for t in trials["trials"]:
        name = deploy.shape_name(t["shape"])
        assert (work / "logs" / f"{name}.log").is_file() and (work / "trials" / name / "results.json").is_file()
    student = AutoModelForSeq2SeqLM.from_pretrained(study.student_dir("seq_kd"))
    d_model, encoder, decoder, _, _ = trials["shape"]
    assert (student.config.d_model, student.config.encoder_layers, student.config.decoder_layers) == \
        (d_model, encoder, decoder)
    assert study.stage_result(study.STUDENT)["extra_args"] == list(study.finetune_objective()["extra_args"])
    history = study.stage_result("seq_kd")  # the winning trial's epoch, then more: it continued the trial
    assert history["continued_from"] == study.trial_dir(trials["shape"])
    assert [epoch for epoch, _ in history["validation_bleu_per_epoch"]][:2] == [1.0, 2.0]
    assert history["best_validation_bleu"] is not None

    # the fine-tune's objective is the preset's: 0.35 CE + 0.35 Word-KD + 0.3 L_ckd (skip map) on Seq-Inter targets
    import torch

    args = torch.load(os.path.join(deploy.last_checkpoint(study.student_dir(study.STUDENT)), "training_args.bin"),
                      weights_only=False)
    assert (args.kd_target, args.alpha, args.intermediate_loss_weight, args.layer_mapping) == (
        "seq_inter_target", 0.35, 0.3, "skip")

    for stage in ("prune_oneshot", "prune_gradual", "prune_gradual_retrain"):
        report = sparsity_report(AutoModelForSeq2SeqLM.from_pretrained(study.pruned_dir(stage)))
        assert pruned_sparsity(report) == pytest.approx(0.8, abs=0.01), stage

    # the deployed models' cards carry their test results (the other stages skip the recipes' evaluation)
    from huggingface_hub import ModelCard

    for folder in (study.student_dir(study.STUDENT), study.pruned_dir("prune_oneshot"),
                   study.pruned_dir("prune_gradual_retrain")):
        assert ModelCard.load(os.path.join(folder, "README.md")).data.to_dict().get("model-index"), folder
    assert not ModelCard.load(os.path.join(study.student_dir("seq_kd"), "README.md")).data.to_dict().get(
        "model-index")

    speed = study.stage_result("decode_speed")
    assert speed["transformers"]["reference_beam"] == "teacher, beam 3"
    assert speed["transformers"]["rows"][study.STUDENT]["speedup_over_reference_beam_batch1"] > 0
    assert speed["ctranslate2_int8"]["rows"][f"{study.STUDENT}_ct2_int8"]["speedup_over_reference_beam_batch1"] > 0

    text = deploy.multi30k.write_study_report(study, str(tmp_path / "report.md"), results_dir=str(tmp_path))
    assert "target: within 1.0" in text and "target: within 0.5" in text
    results = json.loads((tmp_path / "multi30k_deploy_smoke.json").read_text())
    models = {m["model"] for m in results["models"]}
    assert {"teacher", study.STUDENT, f"{study.STUDENT}_ct2_int8", "teacher_ct2_int8"} <= models
    assert {"shapes", "shape_trials", "decode_speed"} <= set(results["deploy"])

    # bench/deploy_probe.py shapes: the study's shape timing for shapes of one's choice, in the probe's own folder
    spec = importlib.util.spec_from_file_location("bench_deploy_probe", os.path.join(ROOT, "bench", "deploy_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    probe_dir = tmp_path / "probe_study"
    common = ["--work_dir", str(probe_dir), "--teacher_study", str(teacher_study), "--data_dir", str(data)]
    capsys.readouterr()
    with pytest.raises(SystemExit, match="5 positive integers"):
        probe.main(["shapes", "--shapes", "32,1,1,64", *common])
    # a new work folder records no preset: the probe says it took the default one
    assert (f"[probe] preset deploy (the default: the work folder records none; --preset to choose), teacher study "
            f"{teacher_study}") in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"no shape is within the parameter budget .*d512_e6_d6_f2048_h8: .*--shapes"):
        probe.main(["shapes", "--shapes", "512,6,6,2048,8", *common])  # larger than the tiny teacher
    probe.main(["shapes", "--shapes", "32,2,1,64,4", "32,1,1,64,4", *common])
    assert "[probe] preset deploy (the work folder's record)" in capsys.readouterr().out
    timed = json.loads((probe_dir / "probes" / "shapes.json").read_text())
    assert [r["name"] for r in timed["rows"]] == ["d32_e2_d1_f64_h4", "d32_e1_d1_f64_h4"]
    assert all(r["speedup"]["transformers"] > 0 and r["speedup"]["ctranslate2"] > 0 for r in timed["rows"])
    assert not (probe_dir / "shapes").exists()  # the study's own shape folder is not touched
    # ... and against a teacher of the preset's teacher shape at random weights: only the tokenizer is read
    import shutil

    from hf_seqkd.export import to_ctranslate2
    from hf_seqkd.report import ctranslate2_parameter_counts, describe_machine

    tokenizer_only = tmp_path / "tokenizer_only"
    shutil.copytree(teacher_study / "tokenizer", tokenizer_only / "tokenizer")
    random_dir = tmp_path / "probe_random_teacher"
    on_random = ["--work_dir", str(random_dir), "--data_dir", str(data), "--preset", "deploy_smoke",
                 "--set", "teacher=(48,2,96,4)"]
    with pytest.raises(SystemExit, match=r"no tokenizer in .*no_study.*--teacher_study"):
        probe.main(["shapes", "--random_teacher", "--shapes", "32,1,1,64,4", *on_random,
                    "--teacher_study", str(tmp_path / "no_study")])
    with pytest.raises(SystemExit, match="an option of the shapes probe, not of trial"):
        probe.main(["trial", "--random_teacher", "--shapes", "32,1,1,64,4", *on_random])
    # the same folder: the run stopped by the missing tokenizer left nothing but its settings
    probe.main(["shapes", "--random_teacher", "--shapes", "32,1,1,64,4", *on_random,
                "--teacher_study", str(tokenizer_only)])
    timed = json.loads((random_dir / "probes" / "shapes_random_teacher.json").read_text())
    random_teacher = random_dir / "probes" / "shapes_random_teacher" / "teacher"
    assert timed["teacher"] == str(random_teacher)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(random_teacher)
    c = teacher.config
    assert timed["teacher_shape"] == [c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_ffn_dim,
                                      c.encoder_attention_heads] == [48, 2, 2, 96, 4]
    params = sum(p.numel() for p in teacher.parameters())
    trained = AutoModelForSeq2SeqLM.from_pretrained(study.teacher_dir)
    assert timed["teacher_params"] == params != sum(p.numel() for p in trained.parameters())
    assert timed["budget"] == params and [r["name"] for r in timed["rows"]] == ["d32_e1_d1_f64_h4"]
    assert timed["rows"][0]["speedup"]["ctranslate2"] > 0 and timed["machine"] == describe_machine()
    # the CTranslate2 timing's teacher is the random one too (its export, not the trained teacher's)
    to_ctranslate2(str(random_teacher), str(tmp_path / "random_teacher_ct2"), quantization="int8")
    timed_ct2 = ctranslate2_parameter_counts(random_dir / "probes" / "shapes_random_teacher" / "teacher_ct2_int8")
    assert timed_ct2[0] == ctranslate2_parameter_counts(tmp_path / "random_teacher_ct2")[0]
    assert timed_ct2[0] != ctranslate2_parameter_counts(work / "shapes" / "teacher_ct2_int8")[0]

    # another shape through the study's recipe (trial, continued, fine-tuned), then compared with the teacher and the
    # deployed student in both engines, on the smoke study itself (its preset and settings)
    on_study = ["--work_dir", str(work), "--data_dir", str(data)]  # the preset and settings: the folder's record
    with pytest.raises(ValueError, match="holds a study with"):  # other settings than the study's are refused
        probe.main(["compare", "--shapes", "32,2,1,64,4", *on_study, "--preset", "deploy"])
    with pytest.raises(SystemExit, match="no trained student"):
        probe.main(["compare", "--shapes", "32,2,1,64,4", *on_study])
    with pytest.raises(SystemExit, match="no finished continued trial"):
        probe.main(["finetune", "--shapes", "32,2,1,64,4", *on_study])
    for step in (["trial"], ["continue", "--epochs", "2"], ["finetune"], ["compare"]):
        probe.main([*step, "--shapes", "32,2,1,64,4", *on_study])
    compared = json.loads((work / "probes" / "compare.json").read_text())
    name = "finetune_ckd_skip_even_d32_e2_d1_f64_h4"
    assert list(compared["models"]) == ["teacher", study.deployed_student(), name]
    assert compared["decode_speed"]["transformers"]["rows"][name]["speedup_over_reference_beam_batch1"] > 0
    assert compared["decode_speed"]["ctranslate2_int8"]["rows"][f"{name}_ct2_int8"][
        "speedup_over_reference_beam_batch1"] > 0
    assert {r["model"] for r in compared["evaluation"]} >= {name, f"{name}_ct2_int8", "teacher"}
    full = json.loads((work / "probes" / "compare" / "report" / "results.json").read_text())
    assert [r["bleu_greedy"] for r in compared["evaluation"]] == [r["bleu_greedy"] for r in full]
    assert "hypotheses_greedy" in full[0] and not any("hypotheses_greedy" in r for r in compared["evaluation"])
    finetuned = json.loads((work / "probes" / name / "probe.json").read_text())
    # a work folder of probes alone (no stages of its own): the shapes against the teacher, the deployed student left
    # out and said so
    probes_only = tmp_path / "probes_only"
    shutil.copytree(work / "probes" / name, probes_only / "probes" / name)
    probe.main(["compare", "--shapes", "32,2,1,64,4", "--work_dir", str(probes_only), "--data_dir", str(data),
                "--preset", "deploy_smoke", "--set", "train_samples=None", f"teacher_study={teacher_study}"])
    assert f"has not trained its own student ({study.STUDENT}" in capsys.readouterr().out
    alone = json.loads((probes_only / "probes" / "compare.json").read_text())
    assert list(alone["models"]) == ["teacher", name]
    assert {r["model"] for r in alone["evaluation"]} == {"teacher", name, "teacher_ct2_int8", f"{name}_ct2_int8"}
    assert alone["decode_speed"]["transformers"]["rows"][name]["speedup_over_reference_beam_batch1"] > 0

    # a fine-tune variant against the study's own fine-tune on the validation split, with the paired test's p-value
    with pytest.raises(SystemExit, match="no finished fine-tune in .*finetune_hybrid"):
        probe.main(["validate", "--variant", "hybrid", *on_study])
    probe.main(["finetune", "--variant", "hybrid", *on_study])
    probe.main(["validate", "--variant", "hybrid", *on_study])
    validated = json.loads((work / "probes" / "validate_hybrid.json").read_text())
    own, hybrid = validated["systems"]
    assert (own["name"], hybrid["name"]) == (study.STUDENT, "finetune_hybrid")
    assert own["bleu_p_value"] is None and 0 < hybrid["bleu_p_value"] <= 1
    assert own["bleu"] == pytest.approx(study.validation_bleu(study.student_dir(study.STUDENT)))
    assert hybrid["bleu"] == pytest.approx(study.validation_bleu(str(work / "probes" / "finetune_hybrid")))
    assert finetuned["init"] == str(work / "probes" / "continued_d32_e2_d1_f64_h4")

    # pruning retrained with Word-KD on Seq-Inter targets (0.5 CE + 0.5 Word-KD) instead of CE on the Seq-KD corpus
    probe.main(["prune", "--sparsity", "0.8", "--retrain", "word_kd", *on_study])
    retrained = study.pruned_in(str(work / "probes" / "prune_oneshot_word_kd"))
    report = sparsity_report(AutoModelForSeq2SeqLM.from_pretrained(retrained))
    assert pruned_sparsity(report) == pytest.approx(0.8, abs=0.01)
    args = torch.load(os.path.join(deploy.last_checkpoint(retrained), "training_args.bin"), weights_only=False)
    assert (args.kd_target, args.alpha) == ("seq_inter_target", 0.5)
