"""Benchmark: decoding speed of saved models, measured in interleaved rounds so that the machine's noise cancels.

``recipes/evaluate.py`` (and the Multi30k study's ``evaluate`` stage) times each model once, one model after
the other; on a shared machine a slow minute then lands on whichever model ran in it. Here every round times
every model (greedy, and beam search for the ``--beam_models``; batch 1 on the first ``--batch1_sentences``
test sentences and batched on the first ``--batched_sentences``), the order rotating from round to round, and
each model's speed-up over the first model is computed within the round (a paired ratio) before taking the
median over the rounds. Kim & Rush's "10x faster" compares the student's greedy decoding with the teacher's
beam search: ``--beam_models teacher`` (the first model) adds that column.

    python bench/decode_speed.py --threads 2 --rounds 5 --beam_models teacher \\
        --models teacher=runs/multi30k_cpu3/teacher student=runs/multi30k_cpu3/students/seq_kd_seq_inter_word_kd

``NAME=PATH`` as for ``recipes/evaluate.py``: a Transformers folder or a CTranslate2 folder (``model.bin``; its
tokenizer is taken from ``--ct2_tokenizer``, default: the first model's folder). The first model is the reference.

``--step_cost`` splits a sentence's cost at batch 1: every row is also timed stopped after its first decoding step
(``max_new_tokens`` 1), and the rest, over the output tokens, is the cost of each further output token (for beam
search an upper bound on a step's cost: the search may run past the length of the hypothesis it returns).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hf_seqkd.data import load_parallel_data  # noqa: E402
from hf_seqkd.report import describe_machine, is_ctranslate2_dir, load_for_evaluation, parse_model_specs, timed_decode  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "multi30k")


def rotate(items: list, k: int) -> list:
    """``items`` started at position ``k`` (round ``k`` of the interleaving)."""
    k %= max(len(items), 1)
    return items[k:] + items[:k]


def paired_speedups(times: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Per round, each model's speed-up over ``reference``: its sentences/s over the reference's in the same
    round, i.e. ``t_reference[r] / t_model[r]`` (``times`` holds seconds per round for the same sentences)."""
    return {name: [ref / t for ref, t in zip(times[reference], ts)] for name, ts in times.items()}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv=None) -> dict:
    """Time the models, print the table; returns its medians (``rows``: per row label, sentences/s and the paired
    speed-ups at batch 1 and batched; with ``--step_cost`` also :func:`step_cost_table`'s ``ms_*`` values) for
    programs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="NAME=PATH ...; the first is the reference")
    parser.add_argument("--beam_models", nargs="*", default=[],
                        help="NAMEs of --models also timed with beam search (--num_beams): extra rows 'NAME, beam N'; "
                             "with the first model among them, a column of speed-ups over its beam search too")
    parser.add_argument("--num_beams", type=int, default=5)
    parser.add_argument("--data_dir", default=DEFAULT_DATA)
    parser.add_argument("--split", default="test_2016_flickr")
    parser.add_argument("--source_lang", default="de")
    parser.add_argument("--target_lang", default="en")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch1_sentences", type=int, default=100)
    parser.add_argument("--batched_sentences", type=int, default=320)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch (and CTranslate2) threads; 0: torch's default")
    parser.add_argument("--ct2_tokenizer", default=None, help="tokenizer for CTranslate2 folders")
    parser.add_argument("--step_cost", action="store_true",
                        help="also time every row at batch 1 stopped after one decoding step (max_new_tokens 1): a "
                             "sentence's cost up to its first step (tokenization, the encoder, the first step, the "
                             "call's own work) and the cost of each further output token, (t - t_first) / tokens")
    args = parser.parse_args(argv)
    if min(args.rounds, args.batch1_sentences, args.batched_sentences, args.num_beams) < 1:
        parser.error("--rounds, --batch1_sentences, --batched_sentences and --num_beams must be at least 1")
    specs = parse_model_specs(args.models)
    unknown = sorted(set(args.beam_models) - {name for name, _ in specs})
    if unknown:
        parser.error(f"--beam_models: {', '.join(unknown)} not among the --models names")
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_parallel_data(args.data_dir, source_lang=args.source_lang, target_lang=args.target_lang,
                              splits=[args.split])[args.split]
    n = max(args.batch1_sentences, args.batched_sentences)
    if len(data) < n:
        sys.exit(f"{args.split} has {len(data)} sentences; asked for {n}")
    sources, references = data["source"][:n], data["target"][:n]
    ct2_tokenizer = args.ct2_tokenizer or next(p for _, p in specs if not is_ctranslate2_dir(p))
    models = {}
    for name, path in specs:
        tokenizer = ct2_tokenizer if is_ctranslate2_dir(path) else None
        model, tok, _ = load_for_evaluation(path, tokenizer, threads=args.threads or None, name=name)
        models[name] = (model, tok)
        timed_decode(model, tok, sources[:2], references[:2], batch_size=2)  # warm-up, untimed

    # the rows: (label, model name, beams); each is timed at batch 1 and batched in every round (and, with
    # --step_cost, at batch 1 stopped after one decoding step)
    rows = [(name, name, 1) for name in models]
    rows += [(f"{name}, beam {args.num_beams}", name, args.num_beams) for name in models if name in args.beam_models]
    runs = {"batch1": (1, args.batch1_sentences), "batched": (args.batch_size, args.batched_sentences)}
    timed = dict(runs, **({"first_step": (1, args.batch1_sentences)} if args.step_cost else {}))
    seconds = {run: {label: [] for label, _, _ in rows} for run in timed}
    tokens = {run: {label: 0 for label, _, _ in rows} for run in timed}
    at_limit = {label: 0 for label, _, _ in rows}
    for r in range(args.rounds):
        for label, name, beams in rotate(rows, r):
            model, tok = models[name]
            for run, (batch_size, count) in timed.items():
                out = timed_decode(model, tok, sources[:count], references[:count], num_beams=beams,
                                   batch_size=batch_size,
                                   max_new_tokens=1 if run == "first_step" else args.max_new_tokens)
                seconds[run][label].append(out["seconds"])
                tokens[run][label] = out["target_tokens"]  # deterministic decoding: the same output every round
                if run == "batched":
                    at_limit[label] = sum(k >= args.max_new_tokens - 1 for k in out["target_lengths"])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    reference = specs[0][0]
    reference_beam = f"{reference}, beam {args.num_beams}" if reference in args.beam_models else None
    print(f"Machine: {describe_machine()}; {args.rounds} rounds, order rotated each round; greedy unless the "
          f"row says beam; batch 1 on the first {args.batch1_sentences} sentences of {args.split}, batched "
          f"({args.batch_size} per call) on the first {args.batched_sentences}. Median over the rounds (min-max); "
          f"speed-ups over {reference} (greedy{' and beam search' if reference_beam else ''}) computed within each "
          f"round; at the limit: batched translations that ran to --max_new_tokens ({args.max_new_tokens}, less 1 "
          f"for the end token), which hold their whole batch to the limit.\n")
    header = ["model", "sent/s, batch 1", "tok/s, batch 1", "speed-up, batch 1", "sent/s, batched", "tok/s, batched",
              "speed-up, batched", "at the limit"]
    if reference_beam:
        header += [f"speed-up over {reference_beam}, batch 1", f"speed-up over {reference_beam}, batched"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    speedups = {run: paired_speedups(seconds[run], reference) for run in runs}
    over_beam = {run: paired_speedups(seconds[run], reference_beam) for run in runs} if reference_beam else None
    results = {}
    for label, _, _ in rows:
        cells, result = [], {"at_limit": at_limit[label]}
        for run, (_, count) in runs.items():
            cells += [summary([count / s for s in seconds[run][label]]),
                      f"{tokens[run][label] / statistics.median(seconds[run][label]):.0f}",
                      summary(speedups[run][label])]
            result[f"sent_per_s_{run}"] = statistics.median(count / s for s in seconds[run][label])
            result[f"speedup_{run}"] = statistics.median(speedups[run][label])
            if over_beam:
                result[f"speedup_over_reference_beam_{run}"] = statistics.median(over_beam[run][label])
        cells.append(str(at_limit[label]))
        if over_beam:
            cells += [summary(over_beam[run][label]) for run in runs]
        print(f"| {label} | " + " | ".join(cells) + " |")
        results[label] = result
    if args.step_cost:
        step_cost_table(results, seconds, tokens, args.batch1_sentences)
    return {"reference": reference, "reference_beam": reference_beam, "rounds": args.rounds,
            "batch1_sentences": args.batch1_sentences, "batched_sentences": args.batched_sentences,
            "batch_size": args.batch_size, "threads": torch.get_num_threads(), "rows": results}


def step_cost_table(results: dict, seconds: dict, tokens: dict, sentences: int) -> None:
    """``--step_cost``: per row, milliseconds per sentence at batch 1 (medians over the rounds) for the whole
    translation, up to its first decoding step, and per further output token: the median over the rounds of
    (t - t_first) / output tokens, t and t_first from the same round (a sentence of n output tokens takes n + 1
    greedy steps, the last choosing the end token). Printed, and added to ``results``' rows
    (``ms_per_sentence_batch1``, ``ms_first_step_batch1``, ``ms_per_further_token_batch1``; NaN without output)."""
    print("\nBatch 1, milliseconds per sentence (medians over the rounds): the whole translation, up to its first "
          "decoding step (tokenization, the encoder, one step, the call's own work) and per further output token "
          "(the difference over the output tokens, paired within each round).\n")
    print("| model | ms per sentence | ms up to the first step | output tokens per sentence | "
          "ms per further output token |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, row in results.items():
        whole = [t * 1000 / sentences for t in seconds["batch1"][label]]
        first = [t * 1000 / sentences for t in seconds["first_step"][label]]
        per_sentence = tokens["batch1"][label] / sentences
        further = [(w - f) / per_sentence for w, f in zip(whole, first)] if per_sentence else [float("nan")]
        row.update(ms_per_sentence_batch1=statistics.median(whole), ms_first_step_batch1=statistics.median(first),
                   ms_per_further_token_batch1=statistics.median(further))
        print(f"| {label} | {row['ms_per_sentence_batch1']:.2f} | {row['ms_first_step_batch1']:.2f} | "
              f"{per_sentence:.1f} | {row['ms_per_further_token_batch1']:.3f} |")


if __name__ == "__main__":
    main()
