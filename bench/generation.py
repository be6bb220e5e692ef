"""Benchmark: sequence-level KD data generation, the naive way versus ``build_seqkd_dataset``.

Both translate the same German Multi30k sentences with the same teacher, beam size and ``max_new_tokens``:

* naive: ``Dataset.map(batched=True, batch_size=32)`` calling ``teacher.generate`` on each batch in file order;
* ``build_seqkd_dataset``: length-sorted batches under a token budget (see hf_seqkd/seqkd.py), no cache.

Nothing can be downloaded, so unless ``--teacher DIR`` names a saved teacher (tokenizer + model), the script
trains a tokenizer (vocab 8000) and a small Marian teacher (d_model 256, 3+3 layers) on Multi30k de->en for
``--train_steps`` steps first; a random-weight teacher would produce max-length garbage for every sentence.

    python bench/generation.py                          # train a teacher (~2 min), then benchmark
    python bench/generation.py --save_teacher /tmp/t    # ... and keep the teacher
    python bench/generation.py --teacher /tmp/t         # reuse it

The data is read from /work/shared/data/multi30k (``--data_dir``); nothing is copied into the repository.
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402

from hf_seqkd import tiny_seq2seq_model, train_tokenizer  # noqa: E402
from hf_seqkd.seqkd import build_seqkd_dataset  # noqa: E402


def read_lines(path: str, limit: int | None = None) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


def train_teacher(args):
    """A small Marian de->en teacher trained with a plain torch loop (AdamW, linear warm-up, then constant)."""
    de = read_lines(os.path.join(args.data_dir, "train.de.gz"))
    en = read_lines(os.path.join(args.data_dir, "train.en.gz"))
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(de + en, vocab_size=8000)
    model = tiny_seq2seq_model(tokenizer, "marian", d_model=256, encoder_layers=3, decoder_layers=3, ffn_dim=1024,
                               attention_heads=4, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / args.warmup_steps))
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.train_steps):
        idx = torch.randint(0, len(de), (args.train_batch_size,), generator=g).tolist()
        enc = tokenizer([de[i] for i in idx], text_target=[en[i] for i in idx], return_tensors="pt", padding=True,
                        truncation=True, max_length=64)
        labels = enc["labels"].masked_fill(enc["labels"] == tokenizer.pad_token_id, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.train_steps - 1:
            print(f"  teacher step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    if args.save_teacher:
        tokenizer.save_pretrained(args.save_teacher)
        model.save_pretrained(args.save_teacher)
    return tokenizer, model, time.perf_counter() - t0


def naive(dataset, teacher, tokenizer, args) -> tuple[list[str], float]:
    """The straightforward way: fixed batches in file order, one ``generate`` each, inside ``Dataset.map``."""

    def translate(batch):
        enc = tokenizer(batch["source"], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = teacher.generate(**enc, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        return {"teacher_target": tokenizer.batch_decode(out, skip_special_tokens=True)}

    t0 = time.perf_counter()
    out = dataset.map(translate, batched=True, batch_size=args.naive_batch_size, keep_in_memory=True,
                      load_from_cache_file=False, new_fingerprint=f"naive-{time.time()}")
    return list(out["teacher_target"]), time.perf_counter() - t0


def _generation(args):
    from hf_seqkd import GenerationSettings

    return GenerationSettings(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                              generation_batch_size=args.batch_size, max_tokens_per_batch=args.max_tokens_per_batch)


def ours(dataset, teacher, tokenizer, args, dtype=None) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    out = build_seqkd_dataset(dataset, teacher, tokenizer, _generation(args), show_progress=False, dtype=dtype)
    return list(out["teacher_target"]), time.perf_counter() - t0


def ours_multiprocess(args, processes: int) -> tuple[list[str], float]:
    """``build_seqkd_dataset`` under ``torchrun --nproc_per_node N`` (one thread per process): every process
    translates its own shards (the way the function spreads work over processes). The time is measured inside
    the processes, from after the teacher is loaded to the gathered result, as for the other rows."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               os.path.abspath(__file__), "--worker", "--teacher", args.teacher, "--data_dir", args.data_dir,
               "--num_sentences", str(args.num_sentences), "--num_beams", str(args.num_beams),
               "--max_new_tokens", str(args.max_new_tokens), "--batch_size", str(args.batch_size),
               "--max_tokens_per_batch", str(args.max_tokens_per_batch), "--worker_dir", tmp]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(tmp, "result.json")) as f:
            result = json.load(f)
    return result["outputs"], result["seconds"]


def worker(args):
    """One process of ``ours_multiprocess``."""
    import json

    from accelerate import PartialState
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(args.teacher).eval()
    dataset = Dataset.from_dict({"source": read_lines(os.path.join(args.data_dir, "train.de.gz"), args.num_sentences)})
    warm = dataset.select(range(16))
    build_seqkd_dataset(warm, teacher, tokenizer, _generation(args), cache_dir=os.path.join(args.worker_dir, "warm"),
                        show_progress=False)
    state.wait_for_everyone()
    t0 = time.perf_counter()
    out = build_seqkd_dataset(dataset, teacher, tokenizer, _generation(args), show_progress=False,
                              cache_dir=os.path.join(args.worker_dir, "cache"),
                              shard_size=max(1, args.num_sentences // (8 * state.num_processes)))
    seconds = time.perf_counter() - t0
    if state.is_main_process:
        with open(os.path.join(args.worker_dir, "result.json"), "w") as f:
            json.dump({"seconds": seconds, "outputs": list(out["teacher_target"])}, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="/work/shared/data/multi30k")
    p.add_argument("--num_sentences", type=int, default=2000)
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--naive_batch_size", type=int, default=32, help="batch size of the naive way")
    p.add_argument("--batch_size", type=int, default=64, help="build_seqkd_dataset: most sentences per batch")
    p.add_argument("--max_tokens_per_batch", type=int, default=4000,
                   help="build_seqkd_dataset: sentences x longest source x num_beams per batch")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two methods this many times, keep the best")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--ctranslate2", default=None,
                   help="also time build_seqkd_dataset with the teacher converted to CTranslate2, e.g. float32,int8 "
                        "(needs --teacher; same number of threads)")
    p.add_argument("--processes", type=int, default=0,
                   help="also time build_seqkd_dataset under torchrun with this many single-thread processes "
                        "(needs --teacher); compare with the naive way on torch's default threads")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--also_dtype", default=None,
                   help="also time build_seqkd_dataset(dtype=...), e.g. bfloat16 (CPUs with native bf16: "
                        "AVX512-BF16/AMX)")
    p.add_argument("--teacher", default=None, help="directory with a saved tokenizer + teacher (skips training)")
    p.add_argument("--save_teacher", default=None, help="save the trained tokenizer + teacher here")
    p.add_argument("--train_steps", type=int, default=400)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if (args.processes > 1 or args.ctranslate2) and not args.teacher:
        raise SystemExit("--processes and --ctranslate2 need --teacher (a saved teacher to load in every process / "
                         "to convert)")
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    if args.teacher:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        teacher = AutoModelForSeq2SeqLM.from_pretrained(args.teacher).eval()
        teacher_note = f"loaded from {args.teacher}"
    else:
        print(f"training a teacher for {args.train_steps} steps ...", flush=True)
        tokenizer, teacher, seconds = train_teacher(args)
        teacher_note = f"trained here for {args.train_steps} steps x {args.train_batch_size} pairs ({seconds:.0f}s)"

    sources = read_lines(os.path.join(args.data_dir, "train.de.gz"), args.num_sentences)
    dataset = Dataset.from_dict({"source": sources})
    warm = dataset.select(range(min(16, len(dataset))))
    naive(warm, teacher, tokenizer, args)  # warm-up: first-call allocations, lazy imports
    ours(warm, teacher, tokenizer, args)

    if args.also_dtype:
        ours(warm, teacher, tokenizer, args, dtype=args.also_dtype)
    converted = {}
    if args.ctranslate2:
        import tempfile

        from hf_seqkd.export import CTranslate2Translator, to_ctranslate2

        ct2_root = tempfile.mkdtemp(prefix="seqkd_ct2_")
        for quantization in args.ctranslate2.split(","):
            folder = to_ctranslate2(args.teacher, os.path.join(ct2_root, quantization), quantization=quantization)
            converted[quantization] = CTranslate2Translator(folder, tokenizer, intra_threads=torch.get_num_threads())
            ours(warm, converted[quantization], tokenizer, args)
    # what is timed beside the naive way: (name in the progress lines, "method | batching" cells, run)
    variants = [("build_seqkd_dataset", f"`build_seqkd_dataset` | length-sorted, <= {args.batch_size} sentences, "
                                        f"<= {args.max_tokens_per_batch} tokens",
                 lambda: ours(dataset, teacher, tokenizer, args))]
    variants += [(f"build_seqkd_dataset, CTranslate2 {quantization}",
                  f"`build_seqkd_dataset`, teacher converted to CTranslate2 ({quantization}) | the same",
                  lambda translator=translator: ours(dataset, translator, tokenizer, args))
                 for quantization, translator in converted.items()]
    if args.processes > 1:
        variants.append((f"build_seqkd_dataset, {args.processes} processes",
                         f"`build_seqkd_dataset`, `torchrun --nproc_per_node {args.processes}`, 1 thread each | "
                         "the same, shards split over the processes",
                         lambda: ours_multiprocess(args, args.processes)))
    if args.also_dtype:
        variants.append((f"build_seqkd_dataset dtype={args.also_dtype}",
                         f"`build_seqkd_dataset(dtype={args.also_dtype!r})` | the same",
                         lambda: ours(dataset, teacher, tokenizer, args, dtype=args.also_dtype)))
    naive_times, times, outputs = [], {name: [] for name, _, _ in variants}, {}
    for r in range(args.repeats):
        naive_out, t = naive(dataset, teacher, tokenizer, args)
        naive_times.append(t)
        print(f"  repeat {r}: naive {t:.1f}s", flush=True)
        for name, _, run in variants:
            outputs[name], t = run()
            times[name].append(t)
            print(f"  repeat {r}: {name} {t:.1f}s", flush=True)

    n = len(dataset)
    t_naive = min(naive_times)
    our_out = outputs["build_seqkd_dataset"]
    same = {name: sum(a == b for a, b in zip(naive_out, out)) / n for name, out in outputs.items()}
    src_len = statistics.mean(len(x) for x in tokenizer(sources)["input_ids"])
    out_len = statistics.mean(len(x) for x in tokenizer(our_out)["input_ids"])
    capped = sum(len(x) >= args.max_new_tokens for x in tokenizer(our_out)["input_ids"])

    print()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"datasets {datasets.__version__}")
    print(f"teacher: Marian d_model=256, 3+3 layers, ffn 1024, 4 heads, vocab {len(tokenizer)}, {teacher_note}")
    print(f"data: first {n} German sentences of Multi30k train; mean source {src_len:.1f} tokens, "
          f"mean output {out_len:.1f} tokens ({capped} outputs hit max_new_tokens={args.max_new_tokens}); "
          f"beam {args.num_beams}; identical outputs of the two: {same['build_seqkd_dataset']:.1%}")
    print()
    print("| method | batching | time (s) | sentences/s | speed-up |")
    print("| --- | --- | ---: | ---: | ---: |")
    print(f"| naive `Dataset.map` + `generate` | {args.naive_batch_size} sentences in file order | {t_naive:.1f} | "
          f"{n / t_naive:.1f} | 1.00x |")
    for name, cells, _ in variants:
        t = min(times[name])
        print(f"| {cells} | {t:.1f} | {n / t:.1f} | {t_naive / t:.2f}x |")
    print()
    for name in outputs:
        if name != "build_seqkd_dataset":
            print(f"{name}: {same[name]:.1%} of the outputs identical to the naive way's (float32)")
    if args.repeats > 1:
        print(f"\nall times (s): naive {[round(t, 1) for t in naive_times]}, "
              + ", ".join(f"{name} {[round(t, 1) for t in times[name]]}" for name in times)
              + "; the table shows the best of each")


if __name__ == "__main__":
    main()
