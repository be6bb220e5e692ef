"""The offline demo of ``recipes/seq_kd.py``: sequence-level KD on a corpus the package makes itself.

``accelerate launch recipes/seq_kd.py`` with no arguments runs it: it writes the synthetic corpus of
:mod:`hf_seqkd.toy` (several valid translations per source pattern, as in real data), trains a small Marian
teacher (cached between runs), then trains the same small student twice through the library, exactly as
``recipes/seq_kd.py`` would (:func:`student_arguments` gives that command), on the gold references (baseline) and on
the teacher's beam-search output (Seq-KD), and prints the comparison.
"""

from __future__ import annotations

import dataclasses
import json
import os

__all__ = ["run_demo", "student_arguments", "DEMO_SIZES"]

# corpus size, teacher (d_model, layers, ffn, steps), student (d_model, layers, ffn), student steps
# The corpus has sentence-level multimodality (hf_seqkd.toy, `alternative_order`): with this probability a reference
# uses a second valid word order, which is what sequence-level KD removes from the student's targets.
ALTERNATIVE_ORDER = 0.4
DEMO_SIZES = {
    "full": dict(num_train=6000, num_test=300, teacher=(128, 3, 512, 1500), student=(64, 1, 128), student_steps=800),
    "tiny": dict(num_train=1500, num_test=100, teacher=(64, 2, 128, 300), student=(32, 1, 64), student_steps=150),
}

BANNER = """\
=====================================================================================================
 hf_seqkd offline demo: sequence-level knowledge distillation (Kim & Rush 2016) on a synthetic corpus.
 Nothing is downloaded. To distil a real teacher, run for example
     accelerate launch recipes/seq_kd.py --config recipes/configs/opus_mt_de_en.yaml
 or pass --teacher_model_name_or_path and --dataset (see --help and README.md).
====================================================================================================="""


def _train_teacher(folder: str, data_folder: str, size: dict, seed: int) -> str:
    from . import (
        DistillationDataCollator,
        DistillationTrainer,
        DistillationTrainingArguments,
        load_parallel_data,
        prepare_distillation_dataset,
        tiny_seq2seq_model,
        train_tokenizer,
    )

    done = os.path.join(folder, "DONE")
    if os.path.exists(done):
        print(f"[demo] reusing the teacher trained earlier in {folder}")
        return folder
    data = load_parallel_data(data_folder, source_lang="src", target_lang="tgt")
    tokenizer = train_tokenizer(list(data["train"]["source"]) + list(data["train"]["target"]), vocab_size=600)
    d_model, layers, ffn, steps = size["teacher"]
    teacher = tiny_seq2seq_model(tokenizer, "marian", d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                                 ffn_dim=ffn, attention_heads=4, dropout=0.1, seed=seed)
    print(f"\n[demo] training the teacher ({d_model}-wide, {layers}+{layers} layers) for {steps} steps")
    args = DistillationTrainingArguments(output_dir=os.path.join(folder, "run"), alpha=0.0, max_steps=steps,
                                         per_device_train_batch_size=64, learning_rate=2e-3, warmup_steps=steps // 10,
                                         label_smoothing_factor=0.1, report_to=[], save_strategy="no",
                                         logging_steps=max(1, steps // 5), seed=seed)
    DistillationTrainer(model=teacher, args=args, train_dataset=prepare_distillation_dataset(data["train"], tokenizer),
                        data_collator=DistillationDataCollator(tokenizer, teacher)).train()
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    open(done, "w").close()
    return folder


def student_arguments(work_dir: str, size: str = "full", kd_target: str = "target", seed: int = 0) -> list[str]:
    """The ``recipes/seq_kd.py`` command line that trains the demo's student on ``kd_target`` (the demo runs the
    same steps through the library; it prints this so that a user can rerun one student)."""
    spec = DEMO_SIZES[size]
    d_model, layers, ffn = spec["student"]
    name = "baseline" if kd_target == "target" else "seq_kd"
    steps = spec["student_steps"]
    return ["--teacher_model_name_or_path", os.path.join(work_dir, "teacher"), "--dataset",
            os.path.join(work_dir, "data"), "--source_lang", "src", "--target_lang", "tgt", "--student_init", "config",
            "--student_d_model", str(d_model), "--student_encoder_layers", str(layers), "--student_decoder_layers",
            str(layers), "--student_ffn_dim", str(ffn), "--student_attention_heads", "4", "--alpha", "0",
            "--max_steps", str(steps), "--per_device_train_batch_size", "64", "--learning_rate", "3e-3",
            "--warmup_steps", str(steps // 10), "--save_strategy", "no", "--eval_strategy", "no",
            "--report_to", "none",
            "--logging_steps", str(max(1, steps // 4)), "--seed", str(seed), "--max_new_tokens", "48",
            "--num_beams", "5", "--seqkd_cache_dir", os.path.join(work_dir, "seqkd_cache"), "--kd_target", kd_target,
            "--output_dir", os.path.join(work_dir, f"student_{name}")]


def _train_student(work_dir: str, size: str, kd_target: str, seed: int, teacher, tokenizer, data,
                   teacher_result=None) -> list:
    """One demo student, through the library: the same steps and settings as ``recipes/seq_kd.py`` with
    :func:`student_arguments` (so the same numbers); returns its :class:`~hf_seqkd.evaluation.EvaluationResult`
    with the teacher's first: evaluated in this run, or ``teacher_result`` (the baseline run's) put first, the
    student's speed-ups then over it, so that the model card compares the student with its teacher."""
    from transformers import set_seed

    from . import DistillationTrainer
    from .cli import DataArguments, EvalArguments, ModelArguments, load_or_make_student, parse_args
    from .config import DistillationTrainingArguments
    from .evaluation import add_speedup, evaluate_models
    from .hub import make_model_card, save_student

    argv = student_arguments(work_dir, size, kd_target, seed)
    print(f"\n[demo] training the {'baseline' if kd_target == 'target' else 'Seq-KD'} student on '{kd_target}' "
          f"(the same as: python recipes/seq_kd.py {' '.join(argv)})")
    model_args, _, eval_args, args = parse_args((ModelArguments, DataArguments, EvalArguments,
                                                  DistillationTrainingArguments), argv)
    set_seed(args.seed)
    student = load_or_make_student(model_args, teacher)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data["train"],
                                  processing_class=tokenizer)
    trainer.train()
    models = ([("teacher", "teacher", teacher)] if teacher_result is None else []) + \
        [("student", "student", trainer.model)]
    results = evaluate_models(models, tokenizer, data["test"]["source"], data["test"]["target"],
                              num_beams=max(eval_args.eval_num_beams), batch_size=eval_args.eval_batch_size,
                              batch1_samples=0, max_new_tokens=args.max_new_tokens)
    if teacher_result is not None:
        results = list(add_speedup([dataclasses.replace(teacher_result), *results]))
    card = make_model_card(teacher_name=args.teacher_model_name_or_path, method=args.method,
                           hyperparameters=args.card_hyperparameters(), results=results, source_lang="src",
                           target_lang="tgt", datasets=os.path.join(work_dir, "data"), eval_split="test")
    save_student(trainer.model, tokenizer, args.output_dir, card)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump([r.to_dict() for r in results], f, indent=2)
    return results


def run_demo(size: str = "full", work_dir: str | None = None, seed: int = 0) -> list[dict]:
    """Run the demo: the synthetic corpus, a small teacher (cached between runs), a baseline and a Seq-KD student.

    Args:
        size: ``"full"`` (the default demo, a few minutes on a 2-core CPU) or ``"tiny"`` (the CI test).
        work_dir: where data, teacher, students and the Seq-KD cache go (default ``./runs/seq_kd_demo[_tiny]``).
        seed: seed of the corpus and of training.

    Returns the rows of the comparison table (also in ``<work_dir>/demo_results.json``).
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from . import load_parallel_data
    from .evaluation import add_speedup
    from .report import markdown_table, signature_line
    from .significance import add_significance
    from .toy import make_toy_corpus

    if size not in DEMO_SIZES:
        raise ValueError(f"unknown demo size {size!r}; use one of {sorted(DEMO_SIZES)}")
    spec = DEMO_SIZES[size]
    default = os.path.join("runs", "seq_kd_demo" + ("" if size == "full" else f"_{size}"))
    work_dir = os.path.abspath(work_dir or default)
    print(BANNER)
    data_folder = os.path.join(work_dir, "data")
    if not os.path.exists(os.path.join(data_folder, "test.tgt")):
        corpus = make_toy_corpus(num_train=spec["num_train"], num_test=spec["num_test"], seed=seed,
                                 alternative_order=ALTERNATIVE_ORDER)
        os.makedirs(data_folder, exist_ok=True)
        for split in ("train", "validation", "test"):
            for column, lang in (("source", "src"), ("target", "tgt")):
                with open(os.path.join(data_folder, f"{split}.{lang}"), "w") as f:
                    f.write("\n".join(corpus[split][column]) + "\n")
    teacher_dir = _train_teacher(os.path.join(work_dir, "teacher"), data_folder, spec, seed)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    data = load_parallel_data(data_folder, source_lang="src", target_lang="tgt")

    baseline = _train_student(work_dir, size, "target", seed, teacher, tokenizer, data)
    seq_kd = _train_student(work_dir, size, "teacher_target", seed, teacher, tokenizer, data,
                            teacher_result=baseline[0])
    results = [dataclasses.replace(baseline[0], model="teacher"),
               dataclasses.replace(baseline[-1], model="student, no KD (baseline)"),
               dataclasses.replace(seq_kd[-1], model="student, Seq-KD")]
    add_speedup(results)
    add_significance(results, data["test"]["target"], baseline=1)  # sacrebleu's paired bootstrap vs the baseline
    columns = ["model", "params", "bleu_greedy", "bleu_greedy_p_value", "bleu_beam", "chrf",
               "sent_per_s_greedy_batched", "speedup_over_beam"]
    print("\n" + markdown_table(results, columns) + "\n" + signature_line(results))
    print("Speed-up over beam: the model's greedy decoding against the teacher's beam search (batched sentences per "
          "second; Kim & Rush's comparison).")
    teacher_row, base, kd = results
    gain = kd.bleu_greedy - base.bleu_greedy
    verdict = ("beats" if gain > 0 else "does NOT beat") + (
        "" if kd.bleu_greedy_p_value < 0.05 else " (not significantly: the difference is within chance)")
    print(f"\nThe Seq-KD student {verdict} the baseline on greedy BLEU by {gain:+.2f} "
          f"({kd.bleu_greedy:.2f} ± {kd.bleu_greedy_ci:.2f} vs {base.bleu_greedy:.2f} ± {base.bleu_greedy_ci:.2f}, "
          f"paired bootstrap p = {kd.bleu_greedy_p_value:.3f}); "
          f"greedy-beam gap: baseline {base.bleu_beam - base.bleu_greedy:+.2f}, "
          f"Seq-KD {kd.bleu_beam - kd.bleu_greedy:+.2f}.")
    print(f"Why: {ALTERNATIVE_ORDER:.0%} of this corpus's references use a second valid word order (verb first, "
          "phrases reversed). The baseline student has to learn both orders from the references; the teacher's beam "
          "search always returns the majority order, so the Seq-KD student learns one (Kim & Rush 2016, Sec. 3.2).")
    table = [r.to_dict() for r in results]
    with open(os.path.join(work_dir, "demo_results.json"), "w") as f:
        json.dump(table, f, indent=2)
    print(f"\nEverything is in {work_dir}: data/, teacher/ (cached for the next run), student_baseline/, "
          f"student_seq_kd/, seqkd_cache/, demo_results.json")
    return table
