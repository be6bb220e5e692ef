"""Does hf_seqkd's training recipe match plain Transformers? Train the Multi30k teacher with a bare
``Seq2SeqTrainer`` (no hf_seqkd code in the training path) and score it beside a model the study trained.

    python bench/plain_hf_reference.py --compare runs/multi30k_cpu/teacher --threads 2

The plain run uses the study's tokenizer and the `cpu` preset's teacher recipe (Marian 3 x 256, ffn 1024, 4 heads,
``scale_embedding=True``, dropout 0.1, label smoothing 0.1, inverse-sqrt 1e-3 with 300 warm-up steps, batch 64,
Adam beta2 0.98, clip 1.0, 5 epochs, group-by-length batches), so a BLEU gap between the two models points at
hf_seqkd's trainer, collator or data preparation. Both are scored here the same way: greedy decoding of
test_2016_flickr, sacrebleu BLEU. ``--sampling random`` trains with random batches instead, to see what
group-by-length batching does (it trained ~2.5x slower per step in its first minute here: more padding).
"""

from __future__ import annotations

import argparse
import gzip
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "multi30k")


# Reading and scoring are written out here rather than taken from hf_seqkd (load_parallel_data, evaluate_model) on
# purpose: the reference must not share code with what it checks.
def read_lines(path: str) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def greedy_bleu(model, tokenizer, sources: list[str], references: list[str], batch_size: int = 64) -> float:
    import sacrebleu
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(sources), batch_size):
            enc = tokenizer(sources[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=128)
            out += tokenizer.batch_decode(model.generate(**enc, num_beams=1, max_new_tokens=128),
                                          skip_special_tokens=True)
    return sacrebleu.corpus_bleu(out, [references]).score


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", required=True, help="a model folder trained by the study (its tokenizer is used)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA)
    parser.add_argument("--output_dir", default=None, help="default: runs/plain_hf_teacher[_random]")
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--sampling", choices=("group_by_length", "random"), default="group_by_length",
                        help="batch formation (the study uses group_by_length); random checks its effect")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        suffix = "" if args.sampling == "group_by_length" else f"_{args.sampling}"
        args.output_dir = os.path.join(REPO, "runs", f"plain_hf_teacher{suffix}")

    import torch
    from datasets import Dataset
    from transformers import (
        AutoConfig,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        set_seed,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.compare)
    train = Dataset.from_dict({"de": read_lines(os.path.join(args.data_dir, "train.de.gz")),
                               "en": read_lines(os.path.join(args.data_dir, "train.en.gz"))})
    train = train.map(lambda b: tokenizer(b["de"], text_target=b["en"], truncation=True, max_length=128),
                      batched=True, remove_columns=["de", "en"])
    test_src = read_lines(os.path.join(args.data_dir, "test_2016_flickr.de.gz"))
    test_ref = read_lines(os.path.join(args.data_dir, "test_2016_flickr.en.gz"))

    final = os.path.join(args.output_dir, "final")
    if not os.path.isfile(os.path.join(final, "config.json")):
        set_seed(0)
        config = AutoConfig.from_pretrained(args.compare)  # the same architecture, fresh random weights
        model = AutoModelForSeq2SeqLM.from_config(config)
        training = Seq2SeqTrainingArguments(
            output_dir=args.output_dir, num_train_epochs=args.epochs, learning_rate=1e-3,
            per_device_train_batch_size=64, lr_scheduler_type="inverse_sqrt", warmup_steps=300,
            label_smoothing_factor=0.1, weight_decay=0.0, adam_beta2=0.98, max_grad_norm=1.0,
            train_sampling_strategy=args.sampling, save_strategy="no", logging_steps=100, report_to="none",
            seed=0, use_cpu=True, dataloader_num_workers=0)
        start = time.perf_counter()
        Seq2SeqTrainer(model=model, args=training, train_dataset=train, processing_class=tokenizer,
                       data_collator=DataCollatorForSeq2Seq(tokenizer, model=model)).train()
        print(f"[plain] trained in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)

    for name, folder in (("plain Seq2SeqTrainer", final), ("hf_seqkd (--compare)", args.compare)):
        model = AutoModelForSeq2SeqLM.from_pretrained(folder)
        print(f"[plain] {name}: greedy BLEU {greedy_bleu(model, tokenizer, test_src, test_ref):.2f} ({folder})",
              flush=True)


if __name__ == "__main__":
    main()
