"""Does a learned hybrid gate (Wei et al. 2024) drift to one term? Gate trajectories on the toy corpus.

    python bench/hybrid_gate.py                                   # defaults below, about 10 minutes on 1 CPU core
    python bench/hybrid_gate.py --student_steps 300 --variants scalar,input --output /tmp/gate.json

What it does:
1. trains a small Marian teacher (3+3 layers, width 64) from scratch on ``make_toy_corpus`` for
   ``--teacher_steps`` steps (plain cross-entropy) and reports its greedy BLEU on the test split;
2. trains one 2+2-layer width-32 student per variant with the hybrid objective only (``alpha=1``:
   ``g * L_token + (1 - g) * L_sentence``, the teacher's sequences from its greedy decoding, decoded once and
   shared by all runs), same seed, data order and learning-rate schedule;
3. prints, every ``--log_every`` steps, the gate on a fixed probe of 64 validation sentences (mean, and for the
   input gate its spread: std, min, max) with the two loss terms (training-batch averages since the last log), and
   each student's greedy BLEU at the end.

Variants (``--variants``, comma-separated; default all): ``fixed`` (g = 0.5), ``scalar`` / ``input`` with bounds
``0,1`` and the student's learning rate, ``*_bounded`` (bounds ``0.1,0.9``), ``*_slow`` (bounds ``0,1``, gate
learning rate ``lr / 10``), ``*_fast`` (gate learning rate ``lr * 10``: where the others are heading in a longer
run), ``*_default`` (the argument defaults: bounds ``0.1,0.9``, gate learning rate ``lr / 10``).

Expectation from the objective: ``dL/dg = L_token - L_sentence`` (per sentence for the input gate), so gradient
descent moves ``g`` towards whichever term is smaller, whatever helps the student most. With Adam the logit moves
by about the learning rate per step while that sign holds.
"""

import argparse
import json
import math
import os
import tempfile
import time

import torch
from transformers import TrainerCallback

from hf_seqkd import (
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    evaluate_translation,
    make_toy_corpus,
    prepare_distillation_dataset,
    tiny_seq2seq_model,
    train_tokenizer,
)
from hf_seqkd.hybrid import TeacherSequenceCache

VARIANTS = {
    "fixed": dict(hybrid_gate="0.5"),
    "scalar": dict(hybrid_gate="scalar", hybrid_gate_bounds="0.0,1.0", gate_lr_factor=1.0),
    "scalar_bounded": dict(hybrid_gate="scalar", hybrid_gate_bounds="0.1,0.9", gate_lr_factor=1.0),
    "scalar_slow": dict(hybrid_gate="scalar", hybrid_gate_bounds="0.0,1.0", gate_lr_factor=0.1),
    "scalar_fast": dict(hybrid_gate="scalar", hybrid_gate_bounds="0.0,1.0", gate_lr_factor=10.0),
    "scalar_default": dict(hybrid_gate="scalar"),  # the argument defaults: bounds 0.1,0.9, lr / 10
    "input": dict(hybrid_gate="input", hybrid_gate_bounds="0.0,1.0", gate_lr_factor=1.0),
    "input_bounded": dict(hybrid_gate="input", hybrid_gate_bounds="0.1,0.9", gate_lr_factor=1.0),
    "input_slow": dict(hybrid_gate="input", hybrid_gate_bounds="0.0,1.0", gate_lr_factor=0.1),
    "input_fast": dict(hybrid_gate="input", hybrid_gate_bounds="0.0,1.0", gate_lr_factor=10.0),
    "input_default": dict(hybrid_gate="input"),
}


class GateProbe(TrainerCallback):
    """At every log: the gate's values on a fixed probe batch, next to the logged loss terms."""

    def __init__(self, probe_batch):
        self.probe, self.trainer, self.rows = probe_batch, None, []

    @torch.no_grad()
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss_token" not in logs:
            return
        trainer = self.trainer
        model = trainer.model
        was_training = model.training
        model.eval()
        encoded = model.get_encoder()(input_ids=self.probe["input_ids"],
                                      attention_mask=self.probe["attention_mask"]).last_hidden_state
        g = trainer.distillation_modules["hybrid_gate"](encoded, self.probe["attention_mask"]).float()
        model.train(was_training)
        self.rows.append(dict(step=state.global_step, gate_mean=g.mean().item(), gate_std=g.std().item(),
                              gate_min=g.min().item(), gate_max=g.max().item(), loss_token=logs["loss_token"],
                              loss_sentence=logs["loss_sentence"], logged_gate=logs["hybrid_gate"]))


def train_teacher(tokenizer, train_set, steps, batch_size, output_dir, seed):
    teacher = tiny_seq2seq_model(tokenizer, "marian", d_model=64, encoder_layers=3, decoder_layers=3, ffn_dim=256,
                                 attention_heads=4, seed=seed)
    args = DistillationTrainingArguments(
        output_dir=output_dir, alpha=0.0, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=3e-3, warmup_steps=max(1, steps // 10), lr_scheduler_type="linear", weight_decay=0.0,
        label_smoothing_factor=0.1, logging_steps=max(1, steps // 5), save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=True, seed=seed, dataloader_num_workers=0)
    DistillationTrainer(model=teacher, args=args, train_dataset=train_set,
                        data_collator=DistillationDataCollator(tokenizer, teacher)).train()
    return teacher.eval()


def train_student(name, spec, tokenizer, teacher, train_set, probe, cache, opts, output_dir):
    spec = dict(spec)
    factor = spec.pop("gate_lr_factor", None)
    student = tiny_seq2seq_model(tokenizer, "marian", d_model=32, encoder_layers=2, decoder_layers=2,
                                 seed=opts.seed + 1)
    args = DistillationTrainingArguments(
        output_dir=output_dir, alpha=1.0, max_steps=opts.student_steps,
        per_device_train_batch_size=opts.batch_size, learning_rate=opts.lr,
        warmup_steps=max(1, opts.student_steps // 10), lr_scheduler_type="linear", weight_decay=0.0,
        hybrid_gate_learning_rate=opts.lr * factor if factor is not None else None, hybrid_gate_init=0.5,
        logging_steps=opts.log_every, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        seed=opts.seed, dataloader_num_workers=0, **spec)
    callback = GateProbe(probe)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_set,
                                  data_collator=DistillationDataCollator(tokenizer, student), callbacks=[callback])
    callback.trainer = trainer
    trainer.teacher_sequences = cache  # every run trains on the same teacher sequences, decoded once
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    return student, callback.rows, seconds


LABELS = {"fixed": "fixed 0.5", "scalar": "scalar, bounds 0-1, student lr",
          "scalar_bounded": "scalar, bounds 0.1-0.9, student lr", "scalar_slow": "scalar, lr / 10",
          "scalar_fast": "scalar, lr x 10", "scalar_default": "scalar, defaults (0.1-0.9, lr / 10)",
          "input": "input, bounds 0-1, student lr", "input_bounded": "input, bounds 0.1-0.9, student lr",
          "input_slow": "input, lr / 10", "input_fast": "input, lr x 10",
          "input_default": "input, defaults (0.1-0.9, lr / 10)"}
TABLE_STEPS = (50, 100, 200, 300, 500, 700, 1000)


def markdown_table(path: str) -> str:
    """The gate means at ``TABLE_STEPS`` and the student's BLEU of every variant in a JSON from ``--output``."""
    with open(path) as f:
        runs = json.load(f)["runs"]
    lines = ["| variant | " + " | ".join(f"step {s}" if i == 0 else str(s) for i, s in enumerate(TABLE_STEPS))
             + " | student BLEU |", "| --- " * (len(TABLE_STEPS) + 2) + "|"]
    for name, run in runs.items():
        gate = {r["step"]: r["gate_mean"] for r in run["trajectory"]}
        cells = [f"{gate[s]:.2f}" if s in gate else "" for s in TABLE_STEPS]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + f" | {run['bleu']:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_steps", type=int, default=800)
    parser.add_argument("--student_steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="student learning rate (AdamW, linear decay)")
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_test", type=int, default=200)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write all numbers as JSON here")
    parser.add_argument("--markdown", default=None, metavar="GATE.json",
                        help="print the table of docs/hybrid_gate.md from a JSON written by --output, then stop")
    opts = parser.parse_args()
    if opts.markdown:
        print(markdown_table(opts.markdown))
        return
    torch.set_num_threads(opts.threads)
    names = [v.strip() for v in opts.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    corpus = make_toy_corpus(num_train=opts.num_train, num_test=opts.num_test, seed=opts.seed)
    tokenizer = train_tokenizer(list(corpus["train"]["source"]) + list(corpus["train"]["target"]), vocab_size=400)
    train_set = prepare_distillation_dataset(corpus["train"], tokenizer)
    probe_set = prepare_distillation_dataset(corpus["validation"].select(range(min(64, opts.num_test))), tokenizer)
    probe = DistillationDataCollator(tokenizer)([probe_set[i] for i in range(len(probe_set))])
    test_src, test_ref = list(corpus["test"]["source"]), list(corpus["test"]["target"])
    results = {"options": vars(opts), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        teacher = train_teacher(tokenizer, train_set, opts.teacher_steps, opts.batch_size, os.path.join(tmp, "t"),
                                opts.seed)
        teacher_bleu = evaluate_translation(teacher, tokenizer, test_src, test_ref)["bleu"]
        results["teacher"] = {"bleu": teacher_bleu, "seconds": time.time() - start}
        print(f"teacher: {opts.teacher_steps} steps, greedy BLEU {teacher_bleu:.1f} "
              f"({time.time() - start:.0f} s)", flush=True)
        cache = TeacherSequenceCache()
        for name in names:
            student, rows, seconds = train_student(name, VARIANTS[name], tokenizer, teacher, train_set, probe, cache,
                                                   opts, os.path.join(tmp, name))
            bleu = evaluate_translation(student, tokenizer, test_src, test_ref)["bleu"]
            results["runs"][name] = {"spec": VARIANTS[name], "trajectory": rows, "bleu": bleu, "seconds": seconds}
            print(f"\n== {name} {VARIANTS[name]}: student greedy BLEU {bleu:.1f} ({seconds:.0f} s, "
                  f"{len(cache)} teacher sequences cached)")
            print(f"{'step':>5} {'gate':>6} {'std':>6} {'min':>6} {'max':>6} {'L_token':>8} {'L_sent':>8}")
            for r in rows:
                print(f"{r['step']:>5} {r['gate_mean']:>6.3f} {r['gate_std']:>6.3f} {r['gate_min']:>6.3f} "
                      f"{r['gate_max']:>6.3f} {r['loss_token']:>8.3f} {r['loss_sentence']:>8.3f}", flush=True)
    print("\nsummary: variant, gate at the first and last log, student BLEU")
    for name, run in results["runs"].items():
        first, last = run["trajectory"][0], run["trajectory"][-1]
        print(f"  {name:15s} {first['gate_mean']:.3f} -> {last['gate_mean']:.3f}  BLEU {run['bleu']:.1f}")
    if opts.output:
        os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
        with open(opts.output, "w") as f:
            json.dump(results, f, indent=1, default=lambda x: x if not isinstance(x, float) or math.isfinite(x)
                      else None)
        print(f"wrote {opts.output}")


if __name__ == "__main__":
    main()
