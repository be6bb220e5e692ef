"""Step time and peak memory of CE-only training versus word-level KD training, in one run.

    python bench/kd_step.py                       # vocabulary 32k, batch 32 x 32 target tokens, CPU
    python bench/kd_step.py --vocab_size 32000 --batch_size 64 --target_length 48 --steps 5
    python bench/kd_step.py --device cuda --bf16 --json kd_step.json   # mixed precision, as a --bf16 training run

``--bf16``: the student's forward pass under ``torch.autocast(dtype=torch.bfloat16)`` (what the Trainer's ``--bf16``
does; the weights and optimizer stay float32) and the frozen teacher's weights in bfloat16 (``--teacher_dtype
bfloat16``), so its logits are bfloat16; the losses compute in float32 inside, as in training.

Rows:
  ce_only            student forward + cross-entropy + backward + optimizer step (the Seq2SeqTrainer step)
  kd_loss            the same + hf_seqkd's chunked word-level KD loss on teacher logits computed beforehand
                     (the KD loss alone, without the teacher forward), overwrite_teacher_logits=True as the
                     DistillationTrainer calls it
  kd_loss_keep_teacher  the same with overwrite_teacher_logits=False (the pure-function default)
  kd_loss_naive      the same with an unchunked textbook KL (log_softmax of both, full tensors) for comparison
  kd_loss_fused      CE and KD in one chunked pass (fused_ce_and_distillation_loss), as the DistillationTrainer
                     computes word-level KD: the CE's log-probabilities are not kept for backward either
  kd_full            teacher forward (no_grad) + KD loss + CE (separate terms)
  kd_full_fused      teacher forward (no_grad) + the fused loss: what one DistillationTrainer step costs

Peak memory is the largest amount of memory allocated during the step above what was allocated before it
(CUDA: torch.cuda.max_memory_allocated; CPU: the allocation trace of torch.profiler). Teacher logits computed
beforehand count as allocated before the step. Ratios are against ce_only, measured in the same process.
"""

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import MarianConfig, MarianMTModel

from hf_seqkd.losses import distillation_loss, fused_ce_and_distillation_loss, sequence_cross_entropy
from hf_seqkd.report import describe_machine


def build(vocab, d_model, layers, ffn, heads, seed):
    torch.manual_seed(seed)
    config = MarianConfig(vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                          encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, encoder_attention_heads=heads,
                          decoder_attention_heads=heads, pad_token_id=vocab - 1, decoder_start_token_id=vocab - 1,
                          eos_token_id=0, scale_embedding=True, dropout=0.0, max_position_embeddings=512)
    return MarianMTModel(config)


def peak_cpu_bytes(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals) if totals else 0


def peak_bytes(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return peak_cpu_bytes(fn)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--source_length", type=int, default=32)
    p.add_argument("--target_length", type=int, default=32)
    p.add_argument("--teacher", default="256,3,1024,4", help="d_model,layers,ffn,heads")
    p.add_argument("--student", default="128,2,512,4", help="d_model,layers,ffn,heads")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true",
                   help="student forward under bf16 autocast, teacher weights in bf16 (the module docstring)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON to FILE")
    args = p.parse_args()
    device = torch.device(args.device)
    teacher = build(args.vocab_size, *map(int, args.teacher.split(",")), seed=1).to(device)
    if args.bf16:
        teacher = teacher.to(torch.bfloat16)
    teacher = teacher.eval().requires_grad_(False)
    student = build(args.vocab_size, *map(int, args.student.split(",")), seed=2).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    B, S, T, V = args.batch_size, args.source_length, args.target_length, args.vocab_size
    input_ids = torch.randint(1, V - 1, (B, S), generator=g).to(device)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(1, V - 1, (B, T), generator=g)
    for row in range(B):  # realistic padding: targets of different lengths
        labels[row, T - (row % (T // 2)):] = -100
    labels = labels.to(device)
    decoder_input_ids = student.prepare_decoder_input_ids_from_labels(labels=labels)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    with torch.no_grad():
        teacher_logits_fixed = teacher(**inputs).logits

    def student_logits():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            return student(**inputs).logits

    def step(mode, given):
        """One training step; `given` holds teacher logits computed before the step (a fresh copy each time)."""
        if mode == "ce_only":
            def run():
                logits = student_logits()
                sequence_cross_entropy(logits, labels, reduction="mean").backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return run

        def run():
            logits = student_logits()
            loss = 0.5 * sequence_cross_entropy(logits, labels, reduction="mean") if "fused" not in mode else None
            if mode == "kd_loss":
                loss = loss + 0.5 * distillation_loss(logits, given[0], labels, overwrite_teacher_logits=True)
            elif mode == "kd_loss_keep_teacher":
                loss = loss + 0.5 * distillation_loss(logits, given[0], labels, overwrite_teacher_logits=False)
            elif mode == "kd_loss_naive":
                mask = labels.ne(-100)
                kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(given[0].float(), -1),
                              log_target=True, reduction="none").sum(-1)
                loss = loss + 0.5 * (kl * mask).sum() / mask.sum()
            elif mode == "kd_full":
                with torch.no_grad():
                    teacher_logits = teacher(**inputs).logits
                loss = loss + 0.5 * distillation_loss(logits, teacher_logits, labels, overwrite_teacher_logits=True)
            elif mode == "kd_loss_fused":
                loss, _, _ = fused_ce_and_distillation_loss(logits, given[0], labels, ce_weight=0.5, kd_weight=0.5,
                                                            overwrite_teacher_logits=True)
            elif mode == "kd_full_fused":
                with torch.no_grad():
                    teacher_logits = teacher(**inputs).logits
                loss, _, _ = fused_ce_and_distillation_loss(logits, teacher_logits, labels, ce_weight=0.5,
                                                            kd_weight=0.5, overwrite_teacher_logits=True)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    rows = []
    for mode in ("ce_only", "kd_loss", "kd_loss_keep_teacher", "kd_loss_naive", "kd_loss_fused", "kd_full",
                 "kd_full_fused"):
        given = [None]
        run = step(mode, given)

        def fresh(given=given, mode=mode):
            given[0] = teacher_logits_fixed.clone() if mode.startswith("kd_loss") else None

        fresh()
        run()  # warm-up (also allocates the optimizer state)
        times = []
        for _ in range(args.steps):
            fresh()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        fresh()
        rows.append({"mode": mode, "seconds": statistics.median(times), "peak_mb": peak_bytes(run, device) / 2**20})
    base = rows[0]
    precision = "bf16 (student autocast, teacher weights)" if args.bf16 else "float32"
    print(f"machine: {describe_machine()}, device {device}, {precision}")
    print(f"vocab {V}, batch {B} x source {S} / target {T} tokens ({int(labels.ne(-100).sum())} non-padding), "
          f"teacher {args.teacher}, student {args.student} (d_model,layers,ffn,heads), median of {args.steps} steps\n")
    print("| step | time (s) | time vs ce_only | peak memory (MiB) | peak vs ce_only |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f}x | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / base['peak_mb']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                       else None, "bf16": args.bf16, "torch": torch.__version__, "vocab_size": V, "batch_size": B,
                       "source_length": S, "target_length": T, "teacher": args.teacher, "student": args.student,
                       "steps": args.steps, "rows": [dict(r, seconds_vs_ce_only=r["seconds"] / base["seconds"],
                                                          peak_vs_ce_only=r["peak_mb"] / base["peak_mb"])
                                                     for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
