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
    python bench/generation.py --device cuda --ctranslate2 float16 --teacher /tmp/t   # on a GPU (bf16 by default)

``--device`` (default: as without it, the teacher on the CPU and ``build_seqkd_dataset`` on its own default device)
trains and runs the teacher there: the naive way in the teacher's float32, ``build_seqkd_dataset`` in its default
dtype for that device (bf16 on CUDA), CTranslate2 on that device in the converted type. ``--json FILE`` writes the
table's numbers for programs.

The data is read from /work/shared/data/multi30k (``--data_dir``); nothing is copied into the repository.

``--memory`` measures instead the peak memory (RSS) of teacher decoding at real vocabulary sizes (opus-mt's 58,101,
NLLB's 256,206): one batch of 64 sentences, beam 5, outputs running to 128 tokens (a random-weight teacher never
stops), each way in its own process: plain ``generate``; ``generate(output_scores=True)`` (how ``teacher_score``
used to be computed: every step's rows x vocabulary scores are kept); ``build_seqkd_dataset`` (its scores come from
a logits processor and a stopping criterion that keep one score per hypothesis and step).

    python bench/generation.py --memory --repeats 3     # ~40 min on one thread
    python bench/generation.py --memory --memory_vocabs 256206 --memory_sentences 16 --max_new_tokens 48 \
        --throughput_rounds 8                           # throughput only: the ways alternated in one process
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
from hf_seqkd.report import describe_machine  # noqa: E402
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
                               attention_heads=4, seed=0).to(args.device or "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / args.warmup_steps))
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.train_steps):
        idx = torch.randint(0, len(de), (args.train_batch_size,), generator=g).tolist()
        enc = tokenizer([de[i] for i in idx], text_target=[en[i] for i in idx], return_tensors="pt", padding=True,
                        truncation=True, max_length=64).to(model.device)
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
        enc = tokenizer(batch["source"], return_tensors="pt", padding=True).to(teacher.device)
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
    out = build_seqkd_dataset(dataset, teacher, tokenizer, _generation(args), show_progress=False, dtype=dtype,
                              device=args.device)
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


# ------------------------------------------------------------------------------------------------ --memory
MEMORY_WAYS = ("generate", "generate(output_scores=True)", "build_seqkd_dataset")


def _memory_teacher(vocab_size: int, d_model: int):
    """A random Marian teacher with ``vocab_size`` entries (</s>=0, <unk>=1, <pad> last, as opus-mt) and a word-level
    tokenizer of the same size whose words are ``w2`` ... (so that every generated id decodes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    vocab = {"</s>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab_size - 1)}, "<pad>": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    pad = vocab_size - 1
    config = MarianConfig(vocab_size=vocab_size, decoder_vocab_size=vocab_size, d_model=d_model, encoder_layers=2,
                          decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                          encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, max_position_embeddings=256,
                          scale_embedding=True, pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0,
                          forced_eos_token_id=None)
    torch.manual_seed(0)
    return tokenizer, MarianMTModel(config).eval()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _decode_once(way: str, teacher, tokenizer, texts: list[str], beams: int, max_new_tokens: int) -> list[int]:
    """One batch decoded one of the --memory ways; the output lengths (tokens, without </s>)."""
    from hf_seqkd import GenerationSettings

    if way == "build_seqkd_dataset":
        out = build_seqkd_dataset(Dataset.from_dict({"source": texts}), teacher, tokenizer, GenerationSettings(
            num_beams=beams, max_new_tokens=max_new_tokens, generation_batch_size=len(texts)), show_progress=False)
        return [len(tokenizer(t)["input_ids"]) - 1 for t in out["teacher_target"]]  # without the </s> added
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        if way == "generate":
            sequences = teacher.generate(**enc, num_beams=beams, max_new_tokens=max_new_tokens, do_sample=False)
        else:  # the former way: all scores kept, sequences_scores read from them
            out = teacher.generate(**enc, num_beams=beams, max_new_tokens=max_new_tokens, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True)
            sequences, _ = out.sequences, out.sequences_scores
    return [int((row[1:] != tokenizer.pad_token_id).sum()) for row in sequences]


def _memory_sources(args, vocab: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    return [" ".join(f"w{int(i)}" for i in torch.randint(2, vocab - 1, (20,), generator=g))
            for _ in range(args.memory_sentences)]


def memory_worker(args):
    """One measurement: prints a JSON line with the baseline and peak RSS (KiB), seconds and output lengths."""
    import json

    torch.set_num_threads(args.threads or 1)
    tokenizer, teacher = _memory_teacher(args.memory_vocab, args.memory_d_model)
    sources = _memory_sources(args, args.memory_vocab)
    _decode_once(args.memory_way, teacher, tokenizer, sources[:2], args.num_beams, 4)  # warm-up
    baseline = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    lengths = _decode_once(args.memory_way, teacher, tokenizer, sources, args.num_beams, args.max_new_tokens)
    seconds = time.perf_counter() - t0
    print(json.dumps({"way": args.memory_way, "vocab": args.memory_vocab, "baseline_kib": baseline,
                      "peak_kib": _rss_kib("VmHWM"), "seconds": seconds, "mean_length": statistics.mean(lengths),
                      "sentences": len(sources)}), flush=True)


def throughput_main(args):
    """``--throughput_rounds N``: throughput only, in one process (no memory measurement): plain ``generate`` and
    ``build_seqkd_dataset`` on the same batch, alternated N times (order swapped every round), so that each pair
    of calls sees the same machine load; prints each way's median time and the median of the per-round ratios."""
    torch.set_num_threads(args.threads or 1)
    ways = ("generate", "build_seqkd_dataset")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {describe_machine(threads=args.threads or 1)}, transformers {transformers.__version__}")
    print(f"teacher: random Marian, d_model {args.memory_d_model}, 2+2 layers; {args.memory_sentences} sentences of "
          f"20 tokens in one batch, beam {args.num_beams}, max_new_tokens {args.max_new_tokens}; "
          f"{args.throughput_rounds} rounds in one process, the ways alternated")
    print()
    print("| vocabulary | way | median time (s) | fastest (s) | sentences/s vs generate, median of round ratios "
          "(range) |")
    print("| ---: | --- | ---: | ---: | --- |")
    for vocab in [int(v) for v in args.memory_vocabs.split(",")]:
        tokenizer, teacher = _memory_teacher(vocab, args.memory_d_model)
        sources = _memory_sources(args, vocab)
        for way in ways:
            _decode_once(way, teacher, tokenizer, sources[:2], args.num_beams, 4)  # warm-up
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        for r in range(args.throughput_rounds):
            for way in ways if r % 2 == 0 else ways[::-1]:
                t0 = time.perf_counter()
                _decode_once(way, teacher, tokenizer, sources, args.num_beams, args.max_new_tokens)
                seconds[way].append(time.perf_counter() - t0)
                print(f"  vocab {vocab} round {r}: {way}: {seconds[way][-1]:.1f}s", file=sys.stderr, flush=True)
        for way in ways:
            ratios = [g / t for g, t in zip(seconds["generate"], seconds[way])]
            print(f"| {vocab:,} | `{way}` | {statistics.median(seconds[way]):.1f} | {min(seconds[way]):.1f} | "
                  f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) |", flush=True)


def memory_main(args):
    """Every way at every vocabulary size, ``--repeats`` interleaved rounds (order rotated), one process each."""
    import json
    import subprocess

    vocabs = [int(v) for v in args.memory_vocabs.split(",")]
    results: dict = {}
    for vocab in vocabs:
        ways = list(MEMORY_WAYS)
        scores_gib = args.memory_sentences * args.num_beams * args.max_new_tokens * vocab * 4 / 2 ** 30
        if scores_gib > args.memory_limit_gib:
            ways.remove("generate(output_scores=True)")
            print(f"vocab {vocab}: output_scores left out (it would keep {scores_gib:.0f} GiB of scores)", flush=True)
        for r in range(args.repeats):
            for way in ways[r % len(ways):] + ways[:r % len(ways)]:
                cmd = [sys.executable, os.path.abspath(__file__), "--memory_worker", "--memory_way", way,
                       "--memory_vocab", str(vocab), "--memory_d_model", str(args.memory_d_model),
                       "--memory_sentences", str(args.memory_sentences), "--num_beams", str(args.num_beams),
                       "--max_new_tokens", str(args.max_new_tokens), "--threads", str(args.threads or 1)]
                # a fixed mmap threshold: every large tensor is its own mapping, returned when freed, so the peak RSS
                # is the peak of live memory (glibc's adaptive threshold otherwise keeps freed blocks, by chance)
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
                line = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                      env=env).stdout.strip().splitlines()[-1]
                row = json.loads(line)
                results.setdefault((vocab, way), []).append(row)
                print(f"  vocab {vocab} round {r}: {way}: peak {row['peak_kib'] / 2**20:.2f} GiB "
                      f"(+{(row['peak_kib'] - row['baseline_kib']) / 2**20:.2f}), {row['seconds']:.1f}s", flush=True)
    print()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {describe_machine(threads=args.threads or 1)}, transformers {transformers.__version__}")
    print(f"teacher: random Marian, d_model {args.memory_d_model}, 2+2 layers; {args.memory_sentences} sentences of "
          f"20 tokens in one batch, beam {args.num_beams}, max_new_tokens {args.max_new_tokens}; "
          f"{args.repeats} rounds, each way in a fresh process (MALLOC_MMAP_THRESHOLD_=131072); peak: the highest "
          f"of the rounds, time: the fastest; paired: the median over rounds of generate's time / the way's time "
          f"in the same round (robust to load that changes between rounds)")
    print()
    print("| vocabulary | way | peak RSS (GiB) | of which decoding (GiB) | peak / generate's | time (s) | "
          "sentences/s vs generate | paired, median | mean output tokens |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for vocab in vocabs:
        plain = results[(vocab, "generate")]
        plain_peak, plain_time = max(r["peak_kib"] for r in plain), min(r["seconds"] for r in plain)
        for way in MEMORY_WAYS:
            rows = results.get((vocab, way))
            if not rows:
                print(f"| {vocab:,} | `{way}` | not run (> {args.memory_limit_gib:g} GiB) | | | | | | |")
                continue
            peak = max(r["peak_kib"] for r in rows)
            used = max(r["peak_kib"] - r["baseline_kib"] for r in rows)
            seconds = min(r["seconds"] for r in rows)
            paired = statistics.median(p["seconds"] / r["seconds"] for p, r in zip(plain, rows))
            print(f"| {vocab:,} | `{way}` | {peak / 2**20:.2f} | {used / 2**20:.2f} | {peak / plain_peak:.2f}x | "
                  f"{seconds:.1f} | {plain_time / seconds:.2f}x | {paired:.2f}x | {rows[0]['mean_length']:.0f} |")


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
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ...: train and run the teacher there (the naive way in float32, "
                        "build_seqkd_dataset in its default dtype there: bf16 on CUDA), CTranslate2 there too; "
                        "default: the teacher on the CPU and build_seqkd_dataset on its own default device")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--ctranslate2", default=None,
                   help="also time build_seqkd_dataset with the teacher converted to CTranslate2, e.g. float32,int8 "
                        "(needs --teacher or --save_teacher; same number of threads); a type that fails to convert or "
                        "load is reported, the others are timed, and the exit status is 1")
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
    p.add_argument("--memory", action="store_true", help="peak memory of teacher decoding (module docstring)")
    p.add_argument("--memory_vocabs", default="58101,256206", help="--memory: vocabulary sizes")
    p.add_argument("--memory_sentences", type=int, default=64, help="--memory: sentences in the batch")
    p.add_argument("--memory_d_model", type=int, default=256, help="--memory: the teacher's width")
    p.add_argument("--memory_limit_gib", type=float, default=16.0,
                   help="--memory: leave out output_scores where its scores alone would exceed this")
    p.add_argument("--throughput_rounds", type=int, default=0,
                   help="--memory: instead of memory, time generate and build_seqkd_dataset alternately this many "
                        "times in one process (paired round ratios)")
    p.add_argument("--memory_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory_way", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory_vocab", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        return memory_worker(args)
    if args.memory:
        if "--max_new_tokens" not in sys.argv:
            args.max_new_tokens = 128
        return throughput_main(args) if args.throughput_rounds else memory_main(args)
    if args.worker:
        return worker(args)
    if args.processes > 1 and not args.teacher:
        raise SystemExit("--processes needs --teacher (a saved teacher to load in every process)")
    if args.ctranslate2 and not (args.teacher or args.save_teacher):
        raise SystemExit("--ctranslate2 needs --teacher or --save_teacher (a saved teacher to convert)")
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    if args.teacher:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        teacher = AutoModelForSeq2SeqLM.from_pretrained(args.teacher).eval()
        if args.device:
            teacher.to(args.device)
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
    converted, failed = {}, {}
    if args.ctranslate2:
        import tempfile

        from hf_seqkd.export import CTranslate2Translator, to_ctranslate2

        ct2_root = tempfile.mkdtemp(prefix="seqkd_ct2_")
        for quantization in args.ctranslate2.split(","):
            try:
                folder = to_ctranslate2(args.teacher or args.save_teacher, os.path.join(ct2_root, quantization),
                                        quantization=quantization)
                ct2_device = torch.device(args.device).type if args.device else "cpu"
                converted[quantization] = CTranslate2Translator(folder, tokenizer, device=ct2_device,
                                                                intra_threads=torch.get_num_threads())
                ours(warm, converted[quantization], tokenizer, args)
            except Exception as e:  # e.g. a compute type the device lacks, or CTranslate2 without CUDA support
                converted.pop(quantization, None)
                failed[f"build_seqkd_dataset, CTranslate2 {quantization}"] = f"{type(e).__name__}: {e}"
                print(f"CTranslate2 {quantization}: not timed: {type(e).__name__}: {e}", flush=True)
    # what is timed beside the naive way: (name in the progress lines, "method | batching" cells, run)
    from hf_seqkd.seqkd import _resolve_dtype  # the dtype build_seqkd_dataset picks by default, for the table

    ours_device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ours_dtype = str(_resolve_dtype(None, ours_device, teacher)).replace("torch.", "")
    variants = [("build_seqkd_dataset", f"`build_seqkd_dataset` ({ours_dtype}) | length-sorted, <= {args.batch_size} "
                                        f"sentences, <= {args.max_tokens_per_batch} tokens",
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
    print(f"machine: {describe_machine()}, {platform.platform()}, transformers {transformers.__version__}, "
          f"datasets {datasets.__version__}; teacher on {teacher.device}, build_seqkd_dataset on {ours_device}")
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
    for name, error in failed.items():
        print(f"{name}: FAILED: {error}")
    if args.json:
        import json

        rows = [{"method": "naive", "seconds": t_naive, "sentences_per_s": n / t_naive, "speedup": 1.0,
                 "identical_to_naive": 1.0}]
        rows += [{"method": name, "seconds": min(times[name]), "sentences_per_s": n / min(times[name]),
                  "speedup": t_naive / min(times[name]), "identical_to_naive": same[name]} for name in times]
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "device": str(ours_device),
                       "teacher_device": str(teacher.device), "build_seqkd_dataset_dtype": ours_dtype,
                       "torch": torch.__version__,
                       "transformers": transformers.__version__, "teacher": teacher_note, "sentences": n,
                       "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
                       "outputs_hitting_max_new_tokens": capped, "rows": rows, "failed": failed}, f, indent=2)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
