"""Kim & Rush 2016's other observation (Table 1, p(t = y_hat)): how much probability a model puts on its own
beam-search output, averaged over the test sentences. Seq-KD students' distributions are peaked (16.9% on WMT14
En-De against the baseline's 0.9%), which is why their greedy decoding is almost as good as their beam search.

    python bench/beam_probability.py --threads 1 --models teacher=runs/multi30k_cpu/teacher \\
        baseline=runs/multi30k_cpu/students/baseline seq_kd=runs/multi30k_cpu/students/seq_kd

Models named ``<name>_seed<k>`` are grouped with ``<name>`` (mean and spread over the seeds). Prints a Markdown
table: per model the mean p(y_hat | x) in percent, its median, and the test sentences used.
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
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

from hf_seqkd.data import load_parallel_data  # noqa: E402
from hf_seqkd.evaluation import beam_output_probability  # noqa: E402
from hf_seqkd.report import describe_machine, parse_model_specs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="NAME=PATH (Transformers folders)")
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(REPO), "shared", "data", "multi30k"))
    parser.add_argument("--split", default="test_2016_flickr")
    parser.add_argument("--source_lang", default="de")
    parser.add_argument("--target_lang", default="en")
    parser.add_argument("--num_beams", type=int, default=5)
    parser.add_argument("--max_sentences", type=int, default=0, help="the first N sentences (0: all)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = load_parallel_data(args.data_dir, source_lang=args.source_lang, target_lang=args.target_lang,
                                 splits=[args.split])[args.split]["source"]
    sources = list(sources[:args.max_sentences] if args.max_sentences else sources)
    probabilities = {}
    for name, path in parse_model_specs(args.models):
        model = AutoModelForSeq2SeqLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        probabilities[name] = beam_output_probability(model, tokenizer, sources, num_beams=args.num_beams,
                                                      batch_size=args.batch_size, max_new_tokens=128)
        print(f"{name}: mean p(beam output) {100 * statistics.fmean(probabilities[name]):.2f}%", file=sys.stderr)
    groups: dict[str, list[str]] = {}
    for name in probabilities:
        stem, sep, seed = name.rpartition("_seed")
        groups.setdefault(stem if sep and seed.isdigit() else name, []).append(name)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {describe_machine()}; {len(sources)} sentences of {args.split}, beam {args.num_beams}\n")
    print("| model | seeds | mean p(beam output), % (per seed) | median, % |")
    print("| --- | ---: | --- | ---: |")
    out = {}
    for group, names in groups.items():
        means = [100 * statistics.fmean(probabilities[n]) for n in names]
        median = 100 * statistics.median(p for n in names for p in probabilities[n])
        per_seed = ", ".join(f"{m:.2f}" for m in means)
        print(f"| {group} | {len(names)} | {statistics.fmean(means):.2f} ({per_seed}) | {median:.2f} |")
        out[group] = {"mean_percent": statistics.fmean(means), "per_seed_percent": means, "median_percent": median}
    return out


if __name__ == "__main__":
    main()
