"""Probes of why the deep-encoder, shallow-decoder students of ``bench/multi30k_deploy.py`` do not learn.

The deploy study's quality trial (3 epochs of Seq-KD) found the 6 + 1 and 8 + 1 layer students (width 128) putting
out one fixed sentence for every source while the symmetric 2 + 2 student learned. These probes run the study's own
training on the same data to tell the candidate causes apart (results in ``bench/RESULTS.md``):

    # more shapes through the study's 3-epoch trial (its arguments: Seq-KD, lr 1e-3, warmup 300, ...)
    python bench/deploy_probe.py trial --shapes 128,6,2,512,4 128,2,1,512,4
    python bench/deploy_probe.py trial --shapes 128,4,1,512,4 --learning_rate 3e-4   # a smaller learning rate
    # a trial continued with the study's early stopping (its patience) up to --epochs: does it learn later?
    python bench/deploy_probe.py continue --shapes 128,6,1,512,4 --epochs 10
    # the same for a trial at another learning rate (continues that trial's run)
    python bench/deploy_probe.py trial --shapes 128,6,1,512,4 --learning_rate 3e-4
    python bench/deploy_probe.py continue --shapes 128,6,1,512,4 --epochs 30 --learning_rate 3e-4
    # gold targets, 2 epochs, other warm-ups, fairseq's token-embedding initialisation (std d_model ** -0.5)
    python bench/deploy_probe.py gold --shapes 128,6,1,512,4 --warmup_steps 2000
    python bench/deploy_probe.py gold --shapes 128,6,1,512,4 --embedding_std fairseq
    # the deployed student pruned once to another sparsity, retrained as the study's prune_oneshot stage (80%); each
    # sparsity's model, card and training state in probes/prune_oneshot/sparsity-<percent> (results.json: the last)
    python bench/deploy_probe.py prune --sparsity 0.5
    # the same at 80%, retrained with the Word-KD-only fine-tune's objective (Seq-Inter targets, 0.5 CE + 0.5
    # Word-KD) instead of the study's cross-entropy on the Seq-KD corpus (probes/prune_oneshot_word_kd)
    python bench/deploy_probe.py prune --sparsity 0.8 --retrain word_kd
    # the fine-tune (Seq-Inter targets from the seq_kd student, until validation BLEU stops improving) with another
    # objective (FINETUNE_VARIANTS): Word-KD alone (plain: the study's until 2026-12-07), CKD's hidden-state loss at
    # two weightings (ckd_skip_even, the default, is the study's own since), the hybrid objective
    python bench/deploy_probe.py finetune --variant ckd_skip
    # a finished variant's greedy validation BLEU against the study's own fine-tune (its stage's student), with
    # sacrebleu's paired bootstrap p-value (probes/validate_<variant>.json): more than the split's noise?
    python bench/deploy_probe.py validate --variant ckd_skip
    # another shape through the study's recipe: its trial continued to convergence (Seq-KD), the study's fine-tune
    # from it, then its test BLEU and decoding speed beside the teacher and the deployed student, in both engines
    python bench/deploy_probe.py trial --shapes 128,2,1,512,4
    python bench/deploy_probe.py continue --shapes 128,2,1,512,4 --epochs 30
    python bench/deploy_probe.py finetune --shapes 128,2,1,512,4
    python bench/deploy_probe.py compare --shapes 128,2,1,512,4     # on a quiet machine
    # shapes timed as the study's shapes stage times them (random weights, batch 1, against the teacher's beam);
    # the table in probes/shapes.json (run it on a quiet machine)
    python bench/deploy_probe.py shapes --shapes 128,2,2,512,4 128,2,1,512,4 128,6,1,512,4
    # the same against a teacher of the preset's teacher shape at random weights (a fixed number of tokens decodes as
    # fast at any weights): the gpu twin's 6 x 512 teacher and shapes, timed on this machine before it is trained
    python bench/deploy_probe.py shapes --random_teacher --preset deploy_gpu --teacher_study runs/multi30k_cpu \
        --work_dir runs/multi30k_deploy_gpu_shapes --shapes 256,2,2,1024,4 256,6,1,1024,4

Every probe reads the deploy study's work folder (``--work_dir``, ``--teacher_study``: the study's settings) and
writes under ``<work_dir>/probes/``. One thread per probe (``--threads``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_deploy():
    spec = importlib.util.spec_from_file_location("multi30k_deploy", os.path.join(REPO, "bench", "multi30k_deploy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fairseq_embedding_init(builder):
    """``builder`` (``make_student_from_config``) with the shared token embedding drawn from N(0, d_model ** -0.5)
    (fairseq's ``Embedding``; times Marian's sqrt(d_model) scale: unit variance, as large as the sinusoidal positions)
    instead of Transformers' N(0, init_std = 0.02)."""
    import torch

    def build(*args, **kwargs):
        model = builder(*args, **kwargs)
        embedding = model.get_input_embeddings()
        with torch.no_grad():
            embedding.weight.normal_(0.0, model.config.d_model ** -0.5)
            if embedding.padding_idx is not None:
                embedding.weight[embedding.padding_idx].zero_()
        return model

    return build


def gold_args(study, deploy, shape, output: str, warmup_steps: int) -> list[str]:
    """The baseline on gold targets, 2 epochs, validation BLEU on 300 sentences after each epoch."""
    d_model, encoder, decoder, ffn, heads = shape
    return ["--teacher_model_name_or_path", os.path.join(study.p["teacher_study"], "teacher_init"),
            "--kd_target", "target", "--alpha", "0.0",
            *deploy.multi30k.student_shape_args(d_model, encoder, decoder, ffn, heads),
            "--dataset", study.data_dir, "--source_lang", deploy.multi30k.SOURCE_LANG,
            "--target_lang", deploy.multi30k.TARGET_LANG, "--max_source_length", "128", "--max_target_length", "128",
            "--max_new_tokens", str(deploy.multi30k.MAX_NEW_TOKENS), "--eval_split", deploy.VALIDATION_SPLIT,
            "--max_eval_samples", "300", "--test_split", "none",
            "--evaluate_teacher", "false", "--output_dir", output, "--num_train_epochs", "2",
            "--learning_rate", "1e-3", "--per_device_train_batch_size", "64", "--lr_scheduler_type", "inverse_sqrt",
            "--warmup_steps", str(warmup_steps), "--label_smoothing_factor", "0.1", "--weight_decay", "0.0",
            "--adam_beta2", "0.98", "--max_grad_norm", "1.0", "--train_sampling_strategy", "group_by_length",
            "--save_strategy", "no", "--eval_strategy", "epoch", "--predict_with_generate", "true",
            "--generation_num_beams", "1", "--per_device_eval_batch_size", "64", "--logging_steps", "50",
            "--report_to", "none", "--seed", "0", "--disable_tqdm", "true"]


# the retraining objectives after pruning: the study's (cross-entropy on the Seq-KD corpus) and the one the deployed
# student of runs/multi30k_deploy_v2 was fine-tuned with (FINETUNE_VARIANTS["plain"]: Seq-Inter targets, 0.5 CE +
# 0.5 Word-KD)
RETRAIN_OBJECTIVES = {"study": dict(kd_target="teacher_target", alpha=0.0),
                      "word_kd": dict(kd_target="seq_inter_target", alpha=0.5)}

# the fine-tune's objectives: Word-KD alone, with CKD's hidden-state loss, or the hybrid (bench/multi30k.py's settings)
FINETUNE_VARIANTS = {
    # the study's fine-tune before L_ckd joined it (2026-12-07): 0.5 CE + 0.5 Word-KD on Seq-Inter targets
    "plain": dict(alpha=0.5, extra_args=()),
    # Wu et al. 2020 (the authors' example weights, as the cpu study): (1 - 0.2 - 0.7) CE + 0.2 Word-KD + 0.7 L_ckd
    "ckd_skip": dict(alpha=0.2, extra_args=("--intermediate_loss_weight", "0.7", "--layer_mapping", "skip")),
    # the same hidden-state loss at a smaller weight, with CE and Word-KD weighted equally as in the Word-KD-only
    # fine-tune: 0.35 CE + 0.35 Word-KD + 0.3 L_ckd (Adam is nearly blind to the loss's overall scale, so this is the
    # plain fine-tune plus 0.43 x L_ckd): whether the hidden-state loss or ckd_skip's small CE weight costs BLEU;
    # the deploy preset's fine-tune since it won on validation (multi30k_deploy.DEPLOY's finetune_* settings, which
    # tests/test_bench_deploy.py checks against this entry)
    "ckd_skip_even": dict(alpha=0.35, extra_args=("--intermediate_loss_weight", "0.3", "--layer_mapping", "skip")),
    # Wei et al. 2024: the Word-KD term becomes alpha * [g L_token + (1 - g) L_sentence], one learned gate (the
    # Word-KD-only fine-tune's alpha 0.5; the cpu study's hybrid, on gold targets, has alpha 1.0)
    "hybrid": dict(alpha=0.5, extra_args=("--hybrid_gate", "scalar")),
}


def validate_variant(study, deploy, variant_dir: str, out: str) -> dict:
    """Greedy validation BLEU of a fine-tune variant (``variant_dir``) and of the study's own fine-tune, with the
    paired bootstrap p-value of the difference (:func:`hf_seqkd.significance.paired_test`, sacrebleu's 1,000
    resamples); written to ``out`` (JSON)."""
    from hf_seqkd.significance import paired_test

    if not os.path.isfile(os.path.join(variant_dir, "config.json")):
        raise SystemExit(f"validate: no finished fine-tune in {variant_dir}; run (or finish) `finetune --variant "
                         f"{os.path.basename(variant_dir).removeprefix('finetune_')}` first")
    study_dir = study.trained_student_dir(study.STUDENT)
    scores = {name: study.validation_scores(folder) for name, folder in
              ((study.STUDENT, study_dir), (os.path.basename(variant_dir), variant_dir))}
    references = scores[study.STUDENT]["references"]
    tested, signatures = paired_test([(name, s["hypotheses"]) for name, s in scores.items()], references)
    result = {"split": deploy.VALIDATION_SPLIT, "decoding": "greedy", "signatures": signatures,
              "systems": [{"name": t.name, "bleu": t.bleu, "bleu_ci": t.bleu_ci, "bleu_p_value": t.bleu_p_value,
                           "chrf": t.chrf} for t in tested]}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    for t in tested:
        p = "" if t.bleu_p_value is None else f", p = {t.bleu_p_value:.3f} against {study.STUDENT}"
        print(f"[probe] validation {t.name}: BLEU {t.bleu:.2f} ± {t.bleu_ci:.2f}{p}", flush=True)
    return result


def compare_shapes(study, deploy, students: list[str], out: str) -> dict:
    """Test BLEU (the study's evaluation) and decoding speed (its ``decode_speed``, both engines, the teacher's beam
    search as the reference) of ``students`` (folders) beside the teacher and the deployed student (left out, and
    said so, while the study has not trained its own student: a work folder of probes alone); written to
    ``<out>.json``."""
    from hf_seqkd.report import describe_machine

    missing = [s for s in students if not os.path.isfile(os.path.join(s, "config.json"))]
    if missing:
        raise SystemExit(f"compare: no trained student in {', '.join(missing)}; run `finetune --shapes ...` (with "
                         "the same --variant and --learning_rate) first")
    models = [("teacher", study.teacher_dir)]
    deployed = study.deployed_student()
    try:
        models.append((deployed, study.trained_student_dir(deployed)))
    except deploy.StageNotTrained:
        print(f"[probe] compare: the study has not trained its own student ({deployed}; bench/multi30k_deploy.py "
              f"--work_dir {study.work_dir}): the shapes against the teacher alone", flush=True)
    models += [(os.path.basename(s), s) for s in students]

    def ct2_dir(name):
        return os.path.join(out, "ctranslate2", name)

    study.export_ctranslate2(models, ct2_dir=ct2_dir)
    speed = study.decode_speed(models, ct2_dir=ct2_dir)
    rows = study.evaluate(models + [(f"{n}_ct2_int8", ct2_dir(n)) for n, _ in models],
                          output_dir=os.path.join(out, "report"))
    # the rows as the study's results JSON has them (its hypotheses stay in <out>/report/results.json), so that the
    # file is small enough to commit under bench/results/
    result = {"machine": describe_machine(), "models": dict(models), "decode_speed": speed,
              "evaluation": [deploy.multi30k.result_fields(r) for r in rows]}
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"[probe] compare: {out}.json", flush=True)
    return result


def parse_shape(text: str) -> tuple:
    """``"128,2,1,512,4"`` -> ``(128, 2, 1, 512, 4)``: d_model, encoder layers, decoder layers, ffn, heads."""
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise SystemExit(f"--shapes {text!r}: expected d_model,encoder,decoder,ffn,heads (5 positive integers)")
    return shape


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe", choices=("trial", "continue", "gold", "prune", "shapes", "finetune", "validate",
                                          "compare"))
    parser.add_argument("--shapes", nargs="+", default=(),
                        help="trial, continue, gold, shapes, compare (and finetune: from the continued trial instead "
                             "of the study's seq_kd student): d_model,encoder,decoder,ffn,heads")
    parser.add_argument("--random_teacher", action="store_true",
                        help="shapes: time against a teacher of the preset's teacher shape at random weights (e.g. "
                             "--preset deploy_gpu: its 6 x 512 teacher) instead of the teacher study's trained one; "
                             "only the study's tokenizer is read; the table in probes/shapes_random_teacher.json")
    parser.add_argument("--sparsity", type=float, default=0.5, help="prune: the fraction of weights set to zero")
    parser.add_argument("--retrain", choices=sorted(RETRAIN_OBJECTIVES), default="study",
                        help="prune: the retraining objective (study: the prune_oneshot stage's; word_kd: Seq-Inter "
                             "targets, 0.5 CE + 0.5 Word-KD)")
    parser.add_argument("--variant", choices=sorted(FINETUNE_VARIANTS), default="ckd_skip_even",
                        help="finetune, validate, compare: the fine-tune's objective (plain: Word-KD alone; "
                             "ckd_skip_even: the study's own)")
    parser.add_argument("--epochs", type=int, default=10, help="continue: the most epochs in all")
    parser.add_argument("--warmup_steps", type=int, default=300, help="gold: the learning rate's warm-up")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="trial, continue: instead of the study's student_lr (1e-3); finetune --shapes, compare: "
                             "the trials at that rate are the ones read")
    parser.add_argument("--embedding_std", choices=("transformers", "fairseq"), default="transformers")
    parser.add_argument("--preset", default=None, choices=sorted(load_deploy().PRESETS),
                        help="the study's preset (default: the one its work folder records, else deploy)")
    parser.add_argument("--set", nargs="*", default=(), metavar="KEY=VALUE", dest="overrides",
                        help="preset settings (default: those the study's work folder records)")
    parser.add_argument("--work_dir", default="runs/multi30k_deploy")
    parser.add_argument("--teacher_study", default=None,
                        help="the study whose teacher is used (default: the one the work folder records)")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    deploy = load_deploy()
    try:
        run_probe(args, deploy)
    except deploy.StageNotTrained as e:  # a stage's student the probe reads is not there yet
        raise SystemExit(f"{args.probe}: {e}") from None


def run_probe(args, deploy) -> None:
    """The probe ``args.probe`` (``main``'s parsed arguments; ``deploy``: bench/multi30k_deploy.py)."""
    import torch

    if args.random_teacher and args.probe != "shapes":
        raise SystemExit(f"--random_teacher is an option of the shapes probe, not of {args.probe}: drop it, or run "
                         "`shapes --random_teacher --shapes ...`")
    torch.set_num_threads(args.threads)
    work_dir = os.path.abspath(args.work_dir)
    earlier = deploy.multi30k.recorded_settings(work_dir)
    recorded = earlier or {"preset": "deploy", "overrides": {}}
    overrides = {**recorded["overrides"], **deploy.multi30k.parse_overrides(args.overrides)}
    if args.teacher_study:
        overrides["teacher_study"] = os.path.abspath(args.teacher_study)
    # settings other than the recorded ones are refused by the study ("holds a study with ...")
    study = deploy.DeployStudy(args.preset or recorded["preset"], work_dir,
                               args.data_dir or deploy.multi30k.DEFAULT_DATA, overrides)
    # a new work folder records no preset: say which one the probe took (deploy, unless --preset)
    source = "--preset" if args.preset else ("the work folder's record" if earlier else
                                             "the default: the work folder records none; --preset to choose")
    print(f"[probe] preset {study.preset_name} ({source}), teacher study {study.teacher_study_dir}", flush=True)
    if args.probe == "gold" and args.embedding_std == "fairseq":
        import hf_seqkd.cli

        hf_seqkd.cli.make_student_from_config = fairseq_embedding_init(hf_seqkd.cli.make_student_from_config)
    probes = os.path.join(study.work_dir, "probes")
    if args.probe == "prune":  # the study's prune_oneshot stage at another sparsity, in probes/
        study.p["sparsity"] = args.sparsity
        folder = "prune_oneshot" + ("" if args.retrain == "study" else f"_{args.retrain}")
        history = study.prune_deployed(os.path.join(probes, folder), study.p["prune_max_epochs"], study.p["patience"],
                                       **RETRAIN_OBJECTIVES[args.retrain])
        print(f"[probe] pruned to {args.sparsity:g}: {history}", flush=True)
        return
    shapes = {text: parse_shape(text) for text in args.shapes}
    lr = "" if args.learning_rate is None else f"_lr{args.learning_rate:g}"
    if args.probe == "finetune":  # the study's fine-tune stage (CKD or the hybrid added), in probes/
        starts = {f"finetune_{args.variant}": "seq_kd"}  # the study's Seq-KD student
        if shapes:  # or the probe's continued trials of other shapes
            starts = {f"finetune_{args.variant}_{deploy.shape_name(s)}{lr}":
                      os.path.join(probes, f"continued_{deploy.shape_name(s)}{lr}") for s in shapes.values()}
        for name, init in starts.items():
            if os.path.isabs(init) and not os.path.isfile(os.path.join(init, "config.json")):
                raise SystemExit(f"finetune: no finished continued trial in {init}; run (or finish) `continue "
                                 "--shapes ...` first")
            output = os.path.join(probes, name)
            result = study.train_converged(study.STUDENT, kd_target="seq_inter_target", init=init, output=output,
                                           **FINETUNE_VARIANTS[args.variant])
            with open(os.path.join(output, "probe.json"), "w") as f:
                json.dump({"variant": args.variant, **FINETUNE_VARIANTS[args.variant], **result}, f, indent=2)
            print(f"[probe] {name}: best validation BLEU {result['best_validation_bleu']}", flush=True)
        return
    if args.probe == "validate":
        validate_variant(study, deploy, os.path.join(probes, f"finetune_{args.variant}"),
                         os.path.join(probes, f"validate_{args.variant}.json"))
        return
    if not shapes:
        raise SystemExit(f"{args.probe}: --shapes is required (d_model,encoder,decoder,ffn,heads, one or more)")
    if args.probe == "compare":  # the fine-tuned shapes beside the teacher and the deployed student
        compare_shapes(study, deploy, [os.path.join(probes, f"finetune_{args.variant}_{deploy.shape_name(s)}{lr}")
                                       for s in shapes.values()], os.path.join(probes, "compare"))
        return
    if args.probe == "shapes":
        study.p["shapes"] = tuple(shapes.values())
        name, teacher = "shapes", None
        if args.random_teacher:  # the preset's teacher shape at random weights: only its tokenizer is needed
            if not os.path.isfile(os.path.join(study.tokenizer_dir, "tokenizer_config.json")):
                raise SystemExit(f"shapes --random_teacher: no tokenizer in {study.tokenizer_dir}; run bench/"
                                 f"multi30k.py --preset P --work_dir {study.teacher_study_dir} --stages tokenizer "
                                 "(P: that study's preset, e.g. cpu; minutes), or point --teacher_study at a study "
                                 "that has one")
            name = "shapes_random_teacher"
            teacher = os.path.join(probes, name, "teacher")
            study.save_teacher_init(teacher)
        result = study.measure_shapes(os.path.join(probes, name), teacher_dir=teacher)
        with open(os.path.join(probes, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=2)
        print("\n".join(deploy.shapes_table(result, study.p["num_beams"])), flush=True)
        return
    if args.learning_rate is not None:
        study.p["student_lr"] = args.learning_rate
    for text, shape in shapes.items():
        name = deploy.shape_name(shape)
        trial = os.path.join(probes, f"trial_{name}{lr}")
        if args.probe == "trial":
            study.run_recipe("seq_kd", study.seq_kd_args(trial, study.p["trial_epochs"], shape), trial)
            print(f"[probe] {name}: validation BLEU {study.validation_bleu(deploy.last_checkpoint(trial)):.2f} "
                  f"after {study.p['trial_epochs']} epochs", flush=True)
        elif args.probe == "continue":
            output = os.path.join(probes, f"continued_{name}{lr}")
            if not os.path.isdir(output):
                # the probe's own trial of this shape and learning rate, else the study's trial of the shape (at the
                # study's rate: a checkpoint's optimizer and schedule keep the rate it was trained with)
                if lr and not os.path.isdir(trial):
                    raise SystemExit(f"continue --learning_rate {args.learning_rate:g}: no trial of {name} at that "
                                     f"rate in {trial}; run `trial --shapes {text} --learning_rate "
                                     f"{args.learning_rate:g}` first")
                last = deploy.last_checkpoint(trial if os.path.isdir(trial) else study.trial_dir(shape))
                shutil.copytree(last, os.path.join(output, os.path.basename(last)))
            study.run_recipe("seq_kd", study.seq_kd_args(output, args.epochs, shape), output)
        else:
            output = os.path.join(probes, f"gold_{name}_w{args.warmup_steps}_{args.embedding_std}")
            deploy.multi30k.load_recipe("seq_kd").main(gold_args(study, deploy, shape, output, args.warmup_steps))


if __name__ == "__main__":
    main()
