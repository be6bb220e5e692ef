"""Compare saved models on a test set: quality against speed and size (teacher, students, pruned, CTranslate2).

    python recipes/evaluate.py --config recipes/configs/evaluate_opus_mt.yaml
    python recipes/evaluate.py --models teacher=Helsinki-NLP/opus-mt-de-en student=out/seqkd_student \
        pruned=out/pruned/sparsity-80 ct2=out/seqkd_student_ct2 --tokenizer out/seqkd_student \
        --dataset wmt16 --dataset_config de-en --source_lang de --target_lang en --max_test_samples 1000 \
        --output_dir out/comparison

Every model is a Transformers folder (or a Hub id in the local cache) or a CTranslate2 folder (``model.bin``,
from ``hf_seqkd.export.to_ctranslate2``; its tokenizer comes from the folder, else ``--tokenizer``, else the
Transformers model in ``--models`` whose vocabulary it has). A bare path is named after its folder.

Steps, top to bottom:
 1. read the test split;
 2. evaluate each model in turn (`hf_seqkd.report.compare_models`): BLEU and chrF with greedy and beam search;
    sentences/s and tokens/s batched and at batch size 1 (on the first `--batch1_samples` sentences; beam search
    at batch size 1 for the models `--batch1_beam` names);
    parameters (total and non-zero), size on disk; speed-up over the first model. Transformers and CTranslate2
    run on the same number of CPU threads (`--threads`);
 3. how sure the comparison is (`hf_seqkd.significance.add_significance`): sacrebleu's paired test of every model
    against `--baseline` (the first model by default): the 95% confidence interval of each BLEU and chrF, and the
    p-value of each difference (`--significance bs`: paired bootstrap resampling; `ar`: approximate randomization);
 4. write `results.md`, `results.json` and `bleu_vs_speed.png` (BLEU against sentences/s, one point per model)
    to `--output_dir` and print the table.
"""

from dataclasses import dataclass, field
from typing import Optional

from hf_seqkd import load_parallel_data
from hf_seqkd.cli import DataArguments, parse_args
from hf_seqkd.data import select_split
from hf_seqkd.evaluation import resolve_bleu_tokenize
from hf_seqkd.report import compare_models, parse_model_specs, report_table, signature_line, write_report
from hf_seqkd.significance import add_significance


@dataclass
class ComparisonArguments:
    """What to compare and how.

    Parameters:
        models (`list[str]`): `NAME=PATH` or `PATH` of every model; the first is the reference of the speed-up.
        tokenizer (`str` or `None`): tokenizer of models whose folder has none (CTranslate2 folders).
        num_beams (`int`): beam size of the beam-search columns (1: greedy only).
        eval_batch_size (`int`): sentences per call in the batched runs.
        batch1_samples (`int`): time batch size 1 on the first this many test sentences (0: skip).
        batch1_beam (`str`): which models also get beam search timed at batch size 1 (the slowest run): `all`,
            `first` (only the reference model, typically the teacher) or `none`.
        max_new_tokens (`int`): generation length limit.
        output_dir (`str`): where results.md, results.json and bleu_vs_speed.png go.
        device (`str`): `auto` (CUDA when there is a GPU), `cpu` or `cuda`.
        threads (`int`): CPU threads for Transformers and CTranslate2 alike (0: torch's default).
        ct2_compute_type (`str`): CTranslate2 compute type (`default`: the saved weight type).
        source_prefix (`str`): text put before every source (T5's task prefix; empty: the model's own for the pair).
        src_lang, tgt_lang (`str` or `None`): language codes of multilingual tokenizers (NLLB `deu_Latn`, mBART-50
            `de_DE`, M2M100 `de`); default: the codes `--source_lang`/`--target_lang` name, else what each tokenizer
            was saved with.
        bleu_tokenize (`str` or `None`): sacrebleu's tokenizer for BLEU (`None`: chosen from `--target_lang`).
        baseline (`str` or `None`): the model every other is tested against (`None`: the first).
        significance (`str`): sacrebleu's paired test: `bs` (paired bootstrap resampling), `ar` (approximate
            randomization) or `none`.
        significance_samples (`int`): its resamples (`bs`) or trials (`ar`); 0: sacrebleu's default (1,000 / 10,000).
    """

    models: list[str] = field(default_factory=list, metadata={"help": "NAME=PATH or PATH of every model."})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "Tokenizer of folders without one (CT2)."})
    num_beams: int = field(default=5, metadata={"help": "Beam size of the beam-search columns (1: greedy only)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Sentences per call in the batched runs."})
    batch1_samples: int = field(default=200, metadata={"help": "Time batch size 1 on this many sentences (0: skip)."})
    batch1_beam: str = field(default="all", metadata={"help": "Beam search at batch 1 for: all, first or none."})
    max_new_tokens: int = field(default=128, metadata={"help": "Generation length limit."})
    output_dir: str = field(default="comparison", metadata={"help": "Folder of results.md/.json and the plot."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    threads: int = field(default=0, metadata={"help": "CPU threads for both back-ends (0: torch's default)."})
    ct2_compute_type: str = field(default="default", metadata={"help": "CTranslate2 compute type."})
    source_prefix: str = field(default="", metadata={"help": "Text put before every source (T5's task prefix)."})
    src_lang: Optional[str] = field(default=None, metadata={"help": "Source language code of the tokenizers."})
    tgt_lang: Optional[str] = field(default=None, metadata={"help": "Target language code of the tokenizers."})
    bleu_tokenize: Optional[str] = field(default=None, metadata={"help": "sacrebleu tokenizer (None: from the "
                                                                          "target language)."})
    baseline: Optional[str] = field(default=None, metadata={"help": "Model the others are tested against "
                                                                    "(default: the first)."})
    significance: str = field(default="bs", metadata={"help": "Paired test: bs (bootstrap), ar (approximate "
                                                              "randomization) or none."})
    significance_samples: int = field(default=0, metadata={"help": "Resamples (bs) / trials (ar); 0: sacrebleu's "
                                                                   "default."})


def parse(argv=None):
    """The recipe's arguments (``--config file.yaml`` supplies defaults): what to compare, and the data."""
    return parse_args((ComparisonArguments, DataArguments), argv)


def main(argv=None):
    args, data_args = parse(argv)
    if not args.models:
        raise ValueError("--models is required: NAME=PATH (or PATH) of every model to compare")
    if not data_args.dataset:
        raise ValueError("--dataset is required: a Hub dataset, a folder of SPLIT.LANG files, a .tsv or a .jsonl")
    models = parse_model_specs(args.models)
    if args.significance not in ("bs", "ar", "none"):
        raise ValueError(f"--significance {args.significance!r}: use bs (paired bootstrap resampling), ar "
                         "(approximate randomization) or none")
    if args.baseline is not None and args.baseline not in [name for name, _ in models]:
        raise ValueError(f"--baseline {args.baseline!r} is not one of the models ({', '.join(n for n, _ in models)}); "
                         "name one of them")
    if args.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: use auto, cpu or cuda")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"

    # 1. The test split
    raw = load_parallel_data(data_args.dataset, source_lang=data_args.source_lang, target_lang=data_args.target_lang,
                             config_name=data_args.dataset_config)
    test = select_split(raw, "--test_split", data_args.test_split, data_args.dataset)
    if test is None:
        raise ValueError("--test_split is required: the split to compare the models on")
    if data_args.max_test_samples:
        test = test.select(range(min(data_args.max_test_samples, len(test))))

    bleu_tokenize = resolve_bleu_tokenize(args.tgt_lang or data_args.target_lang, args.bleu_tokenize)

    # 2. Every model in turn: quality, speed (batched and batch 1), parameters, size; speed-up over the first
    rows = compare_models(models, test["source"], test["target"], tokenizer=args.tokenizer, device=device,
                          compute_type=args.ct2_compute_type, threads=args.threads or None, show_progress=True,
                          num_beams=args.num_beams, batch_size=args.eval_batch_size,
                          batch1_samples=args.batch1_samples, batch1_beam=args.batch1_beam,
                          max_new_tokens=args.max_new_tokens,
                          source_prefix=args.source_prefix,
                          languages=dict(src_lang=args.src_lang, tgt_lang=args.tgt_lang,
                                         source_lang=data_args.source_lang, target_lang=data_args.target_lang),
                          bleu_tokenize=bleu_tokenize)
    for result in rows:
        result.dataset, result.split = data_args.dataset, data_args.test_split

    # 3. Confidence intervals and paired tests against the baseline
    if args.significance != "none" and len(rows) > 1:
        add_significance(rows, test["target"], baseline=args.baseline or 0, test=args.significance,
                         n_samples=args.significance_samples, tokenize=bleu_tokenize)

    # 4. Markdown table, JSON and the BLEU-against-speed plot
    paths = write_report(rows, args.output_dir, title=f"Model comparison on {data_args.dataset} "
                                                      f"({data_args.test_split})")
    print(report_table(rows) + "\n" + signature_line(rows))
    print(f"Wrote {paths['markdown']}, {paths['json']} and {paths['plot']}")
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()
