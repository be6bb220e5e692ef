"""Benchmark: Seq-KD + Word-KD with the teacher online against the same with its stored top-k distributions.

Every variant trains the Multi30k study's student (``bench/multi30k.py --preset cpu``: 2 x 128, the study's teacher,
its Seq-KD corpus, its training settings) with ``kd_target=teacher_target, alpha=0.5`` (Kim & Rush's Seq-KD +
Word-KD) through ``recipes/seq_kd.py``, each in its own process, one after the other:

* ``online``: the teacher runs forward at every step (in the preset's ``teacher_dtype``);
* ``stored-k<K>``: ``--teacher_distributions stored --teacher_top_k K`` (the distributions built first, in a cache
  folder of this benchmark's own, so that the one-off cost is measured); ``stored-k<K>-uniform`` with
  ``--teacher_tail uniform`` (``--variants``).

Per variant: the one-off cost of building the distributions, training time per epoch, the peak resident memory
while training (``VmHWM`` reset when training starts) and over the whole process, the bytes per target token of the
stored distributions on disk, validation and test BLEU (greedy; test also beam 5). It needs a finished study's
``tokenizer``, ``teacher`` and ``seqkd_corpus`` stages (``--study_dir``):

    python bench/stored_distributions.py --study_dir runs/multi30k_cpu --top_k 8 32 128 --threads 1
    python bench/stored_distributions.py --study_dir runs/multi30k_cpu --epochs 1   # shorter runs
    python bench/stored_distributions.py ... --variants stored-k32 --reuse_log LOG...   # add to earlier runs
    python bench/stored_distributions.py ... --variants online stored-k32 --seeds 1 2   # the same with other seeds

A seed changes the student's initialisation, dropout and data order (the teacher, its corpus and the stored
distributions stay the same); with several seeds the table's second part gives each variant's mean, the seed spread
(max - min) and the mean difference from online.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vm(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmHWM``: peak resident set; ``VmRSS``: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _load(path: str, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(args) -> dict:
    """One variant in this process: the recipe's ``main`` with timers around the distributions and training."""
    import torch

    import hf_seqkd.trainer as trainer_module
    from hf_seqkd import DistillationTrainer, load_parallel_data
    from hf_seqkd.evaluation import evaluate_translation

    torch.set_num_threads(args.threads)
    multi30k = _load(os.path.join(REPO, "bench", "multi30k.py"), "bench_multi30k")
    study = multi30k.Study("cpu", args.study_dir, args.data_dir)
    p = study.p
    out_dir = os.path.join(args.out_dir, run_name(args.variant, args.seed))
    d_model, layers, ffn, heads = p["student"]
    argv = ["--teacher_model_name_or_path", study.teacher_dir, "--kd_target", "teacher_target", "--alpha", "0.5",
            "--teacher_dtype", p["teacher_dtype"], "--student_init", "config", "--student_d_model", str(d_model),
            "--student_encoder_layers", str(layers), "--student_decoder_layers", str(layers),
            "--student_ffn_dim", str(ffn), "--student_attention_heads", str(heads),
            "--test_split", multi30k.TEST_SPLIT, "--evaluate_teacher", "false"]
    argv += study.common_data_args() + study.seqkd_args()
    argv += study.training_args(out_dir, args.epochs, p["student_lr"], args.seed)
    argv += ["--save_strategy", "no"]
    if args.train_samples:  # a quick check of the script (the Seq-KD corpus of those rows is built again)
        argv += ["--max_train_samples", str(args.train_samples), "--max_test_samples", "50"]
    if args.variant != "online":  # stored-k<K>, or stored-k<K>-uniform (teacher_tail uniform)
        k, _, tail = args.variant.split("-k")[1].partition("-")
        argv += ["--teacher_distributions", "stored", "--teacher_top_k", k, "--teacher_tail", tail or "bucket"]
    record: dict = {"variant": args.variant, "epochs": args.epochs, "seed": args.seed}

    build = trainer_module.build_teacher_distributions

    def timed_build(*a, **kw):
        kw["cache_dir"] = os.path.join(args.out_dir, f"distributions-{args.variant}")
        cached = os.path.isdir(kw["cache_dir"]) and bool(os.listdir(kw["cache_dir"]))  # built by an earlier seed
        start = time.perf_counter()
        out = build(*a, **kw)
        record["build_seconds" if not cached else "cache_load_seconds"] = time.perf_counter() - start
        folder = next(os.scandir(kw["cache_dir"])).path
        tokens = sum(len(x) for x in out["labels"])
        record["stored_bytes_per_token"] = os.path.getsize(os.path.join(folder, "result.parquet")) / tokens
        record["target_tokens"] = tokens
        return out

    trainer_module.build_teacher_distributions = timed_build
    train = DistillationTrainer.train
    trained = {}

    def timed_train(self, *a, **kw):
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set: training's own peak
            f.write("5")
        start = time.perf_counter()
        result = train(self, *a, **kw)
        record["train_seconds"] = time.perf_counter() - start
        record["train_seconds_per_epoch"] = record["train_seconds"] / args.epochs
        record["peak_rss_training_gib"] = _vm("VmHWM") / 2**30
        record["teacher_in_trainer"] = self.teacher_model is not None
        trained["model"], trained["tokenizer"] = self.model, self.processing_class
        return result

    DistillationTrainer.train = timed_train
    recipe = _load(os.path.join(REPO, "recipes", "seq_kd.py"), "recipe_seq_kd")
    rows = recipe.main(argv)
    student = next(r for r in rows if r["model"] == "student")
    record.update(test_bleu_greedy=student["bleu_greedy"], test_bleu_beam=student["bleu_beam"])
    raw = load_parallel_data(args.data_dir, source_lang="de", target_lang="en")
    validation = raw["validation"] if "validation" in raw else raw["val"]
    scores = evaluate_translation(trained["model"], trained["tokenizer"], list(validation["source"]),
                                  list(validation["target"]), max_new_tokens=96)
    record["validation_bleu_greedy"] = scores["bleu"]
    record["peak_rss_process_gib"] = _vm("VmHWM") / 2**30  # after the final evaluation (reset at training)
    return record


def run_name(variant: str, seed: int) -> str:
    """The folder and log name of a variant's run: ``online`` (seed 0, the first runs' names), ``online_seed1``."""
    return variant if seed == 0 else f"{variant}_seed{seed}"


def seed_summary(records: list[dict]) -> list[str]:
    """Markdown rows: per variant, the seeds run, mean validation / test greedy BLEU, the seed spread (max - min of
    test BLEU) and each mean's difference from online's mean over the same seeds (a variant run with seed 0 only is
    compared with online's seed 0)."""
    groups: dict[str, dict[int, dict]] = {}
    for r in records:
        groups.setdefault(r["variant"], {})[r.get("seed", 0)] = r
    online = groups.get("online", {})
    lines = ["| variant | seeds | validation BLEU: mean | vs online | test BLEU greedy: mean | spread | vs online |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for variant, by_seed in groups.items():
        rs = list(by_seed.values())
        val = statistics.fmean(r["validation_bleu_greedy"] for r in rs)
        test = statistics.fmean(r["test_bleu_greedy"] for r in rs)
        spread = max(r["test_bleu_greedy"] for r in rs) - min(r["test_bleu_greedy"] for r in rs)
        diff_val = diff_test = ""
        common = [seed for seed in by_seed if seed in online]
        if variant != "online" and common:  # the mean over the common seeds of (variant - online)
            diff_val, diff_test = (f"{statistics.fmean(by_seed[s][k] - online[s][k] for s in common):+.2f}"
                                   for k in ("validation_bleu_greedy", "test_bleu_greedy"))
        seeds = ", ".join(str(seed) for seed in by_seed)
        lines.append(f"| {variant} | {seeds} | {val:.2f} | {diff_val} | {test:.2f} | {spread:.2f} | {diff_test} |")
    return lines


def tail_stats(out_dir: str) -> None:
    """Per cached build: k, and the teacher's probability outside its top-k per target token (mean, median, 90th
    percentile), with the mean probability of its top-1 token."""
    import glob

    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    print("| build | k | tokens | tail probability: mean | median | 90th percentile | top-1 probability: mean |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in sorted(glob.glob(os.path.join(out_dir, "distributions-*", "*", "result.parquet"))):
        table = pq.read_table(path, columns=["teacher_tail_logprob", "teacher_topk_logprobs"])
        tail = np.exp(pc.list_flatten(table.column("teacher_tail_logprob")).to_numpy(zero_copy_only=False)
                      .astype(np.float64))
        top = pc.list_flatten(table.column("teacher_topk_logprobs"))
        k = pc.list_value_length(top)[0].as_py()
        top1 = np.exp(pc.list_flatten(top).to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, k)[:, 0])
        name = os.path.basename(os.path.dirname(os.path.dirname(path)))
        print(f"| {name} | {k} | {tail.size:,} | {tail.mean():.3f} | {np.median(tail):.3f} | "
              f"{np.quantile(tail, 0.9):.3f} | {top1.mean():.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study_dir", default=os.path.join(REPO, "runs", "multi30k_cpu"))
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(REPO), "shared", "data", "multi30k"))
    parser.add_argument("--out_dir", default=os.path.join(REPO, "runs", "bench_stored_distributions"))
    parser.add_argument("--top_k", type=int, nargs="*", default=[8, 32, 128])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (the cpu preset's students: 3)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train_samples", type=int, default=0, help="train on the first N pairs only (a check)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="run only these (online, stored-k<K>); default: online and every --top_k")
    parser.add_argument("--reuse_log", nargs="*", default=(),
                        help="logs of earlier runs of this script: their finished variants' records (the JSON lines "
                             "they printed) join the table instead of being run again")
    parser.add_argument("--tail_stats", action="store_true",
                        help="print how much probability the teacher leaves outside its stored top-k (from the cached "
                             "distributions in --out_dir), then stop")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="train each variant once per seed (the student's initialisation, dropout, data order)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tail_stats:
        tail_stats(args.out_dir)
        return
    if args.variant:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    os.makedirs(args.out_dir, exist_ok=True)
    records = []

    def key(record):  # the first runs' records have no seed: seed 0
        return record["variant"], record.get("seed", 0)

    for log in args.reuse_log:
        with open(log) as f:
            found = [json.loads(line) for line in f if line.startswith('{"variant"')]
        records += [r for r in found if key(r) not in {key(x) for x in records}]
        print(f"reused from {log}: {[r['variant'] for r in found]}")
    if args.reuse_log:
        if any(r["epochs"] != args.epochs for r in records):
            raise SystemExit(f"--reuse_log {args.reuse_log} hold runs of other lengths than --epochs {args.epochs}")
    variants = args.variants or ["online"] + [f"stored-k{k}" for k in args.top_k]
    runs = [(v, seed) for seed in args.seeds for v in variants if (v, seed) not in {key(r) for r in records}]
    for variant, seed in runs:
        command = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--seed", str(seed),
                   "--study_dir", args.study_dir,
                   "--data_dir", args.data_dir, "--out_dir", args.out_dir, "--epochs", str(args.epochs),
                   "--threads", str(args.threads), "--train_samples", str(args.train_samples)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        with open(os.path.join(args.out_dir, f"{run_name(variant, seed)}.log"), "w") as log:
            proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, check=True)
        records.append(json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:]))
        print(json.dumps(records[-1]), flush=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(records, f, indent=2)
    import transformers

    from hf_seqkd.report import describe_machine

    records.sort(key=lambda r: (r["variant"] != "online", r["variant"].endswith("-uniform"),
                                int(r["variant"].split("-k")[-1].split("-")[0]) if "-k" in r["variant"] else 0,
                                r.get("seed", 0)))
    online = records[0]
    print(f"\ncommand: python {' '.join(sys.argv)}")
    print(f"machine: {describe_machine(threads=args.threads)}, transformers {transformers.__version__}; "
          f"{args.epochs} epoch(s) each, variants one after the other in their own processes")
    print()
    print("| variant | seed | build (s, once) | bytes / target token | training s / epoch | vs online | "
          "peak RSS training (GiB) | validation BLEU | test BLEU greedy | test BLEU beam 5 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in records:
        build = f"{r['build_seconds']:.0f}" if "build_seconds" in r else ""
        size = f"{r['stored_bytes_per_token']:.0f}" if "stored_bytes_per_token" in r else ""
        print(f"| {r['variant']} | {r.get('seed', 0)} | {build} | {size} | {r['train_seconds_per_epoch']:.0f} | "
              f"{r['train_seconds_per_epoch'] / online['train_seconds_per_epoch']:.2f}x | "
              f"{r['peak_rss_training_gib']:.2f} | {r['validation_bleu_greedy']:.2f} | {r['test_bleu_greedy']:.2f} | "
              f"{r['test_bleu_beam']:.2f} |")

    if len({r.get("seed", 0) for r in records}) > 1:
        print()
        print("\n".join(seed_summary(records)))


if __name__ == "__main__":
    main()
