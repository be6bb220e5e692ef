"""Benchmark: how closely a CTranslate2 teacher's Seq-KD scores agree with the Transformers teacher's.

Both back-ends of ``build_seqkd_dataset`` build the K-best lists of the same sentences (beam ``--num_beams``,
K = ``--num_return_sequences``). For every candidate found by both (same text), the two ``teacher_score`` values
(length-normalised log-probability, the same definition) are compared; the script also counts identical 1-best
translations. The teacher is a saved Transformers model and its CTranslate2 conversion (float32 by default), e.g. the
Multi30k study's:

    python bench/ctranslate2_scores.py --teacher runs/multi30k_cpu/teacher \
        --ctranslate2 runs/multi30k_cpu/ctranslate2/teacher_float32 --num_sentences 500
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

from hf_seqkd import GenerationSettings, build_seqkd_dataset  # noqa: E402
from hf_seqkd.export import CTranslate2Translator  # noqa: E402
from hf_seqkd.report import describe_machine  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="saved Transformers teacher (with its tokenizer)")
    p.add_argument("--ctranslate2", required=True, help="its CTranslate2 conversion")
    p.add_argument("--data", default="/work/shared/data/multi30k/val.de.gz", help="sources, one per line (gzip)")
    p.add_argument("--num_sentences", type=int, default=500)
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--num_return_sequences", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with gzip.open(args.data, "rt", encoding="utf-8") as f:
        sources = [line.rstrip("\n") for line in f][:args.num_sentences]
    data = Dataset.from_dict({"source": sources})
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(args.teacher).eval()
    translator = CTranslate2Translator(args.ctranslate2, tokenizer, intra_threads=args.threads)
    generation = GenerationSettings(num_beams=args.num_beams, num_return_sequences=args.num_return_sequences,
                                    max_new_tokens=args.max_new_tokens)
    built = {name: build_seqkd_dataset(data, model, tokenizer, generation, show_progress=True)
             for name, model in (("transformers", teacher), ("ctranslate2", translator))}
    hf, ct2 = built["transformers"], built["ctranslate2"]
    nbest = args.num_return_sequences > 1
    diffs, top_same = [], 0
    for i in range(len(sources)):
        top_same += hf[i]["teacher_target"] == ct2[i]["teacher_target"]
        if nbest:
            pairs_hf = dict(zip(hf[i]["teacher_nbest"], hf[i]["teacher_nbest_scores"]))
            pairs_ct2 = dict(zip(ct2[i]["teacher_nbest"], ct2[i]["teacher_nbest_scores"]))
        else:
            pairs_hf = {hf[i]["teacher_target"]: hf[i]["teacher_score"]}
            pairs_ct2 = {ct2[i]["teacher_target"]: ct2[i]["teacher_score"]}
        diffs += [abs(pairs_hf[text] - pairs_ct2[text]) for text in pairs_hf.keys() & pairs_ct2.keys()]
    diffs.sort()

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {describe_machine(threads=args.threads)}, transformers {transformers.__version__}")
    print(f"{len(sources)} sentences of {args.data}, beam {args.num_beams}, K = {args.num_return_sequences}; "
          f"{args.ctranslate2}")
    print()
    print("| candidates in both lists | identical 1-best | |score difference|: median | 99th percentile | max |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    print(f"| {len(diffs)} | {top_same / len(sources):.1%} | {statistics.median(diffs):.5f} | "
          f"{diffs[min(len(diffs) - 1, int(0.99 * len(diffs)))]:.5f} | {diffs[-1]:.5f} |")


if __name__ == "__main__":
    main()
