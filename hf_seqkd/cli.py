"""What the recipes share: their argument dataclasses, ``--config file.yaml`` parsing, student creation, tables.

The recipes in ``recipes/`` stay readable top-to-bottom scripts; the pieces they have in common live here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import yaml
from transformers import HfArgumentParser

__all__ = ["ModelArguments", "DataArguments", "EvalArguments", "SeqKDArguments", "build_seqkd_corpus", "parse_args", "load_or_make_student",
           "markdown_table", "evaluate_models", "evaluate_on_test_split", "first_rows", "kd_method_name", "save_and_publish_student"]


@dataclass
class ModelArguments:
    """The student (the teacher is `teacher_model_name_or_path` in the training arguments).

    Parameters:
        tokenizer_name_or_path (`str` or `None`): tokenizer; defaults to the teacher's.
        init_student_from (`str` or `None`): continue from this saved student (or checkpoint) instead of making one.
        student_init (`str`): `"copy"` copies teacher layers (`make_student`, Shleifer & Rush 2020); `"config"`
            builds a randomly initialised student of the sizes below (`make_student_from_config`).
        student_encoder_layers, student_decoder_layers (`int` or `None`): student depth (`None` keeps the teacher's).
        student_encoder_layer_ids, student_decoder_layer_ids (`list[int]` or `None`): explicit teacher layers to copy.
        student_d_model, student_ffn_dim, student_attention_heads (`int` or `None`): from-config student width.
        seed_student (`int`): seed of a from-config student's initialisation.
    """

    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer (default: the teacher's)."})
    init_student_from: Optional[str] = field(default=None, metadata={"help": "Continue from this saved student."})
    student_init: str = field(default="copy", metadata={"help": "copy (teacher layers) or config (random init)."})
    student_encoder_layers: Optional[int] = field(default=None, metadata={"help": "Student encoder depth."})
    student_decoder_layers: Optional[int] = field(default=None, metadata={"help": "Student decoder depth."})
    student_encoder_layer_ids: Optional[list[int]] = field(default=None, metadata={"help": "Teacher encoder layers to copy."})
    student_decoder_layer_ids: Optional[list[int]] = field(default=None, metadata={"help": "Teacher decoder layers to copy."})
    student_d_model: Optional[int] = field(default=None, metadata={"help": "From-config student width."})
    student_ffn_dim: Optional[int] = field(default=None, metadata={"help": "From-config student feed-forward size."})
    student_attention_heads: Optional[int] = field(default=None, metadata={"help": "From-config student heads."})
    seed_student: int = field(default=0, metadata={"help": "Seed of a from-config student."})

    def __post_init__(self):
        if self.student_init not in ("copy", "config"):
            raise ValueError(f"student_init={self.student_init!r}: use 'copy' or 'config'")


@dataclass
class DataArguments:
    """The corpus.

    Parameters:
        dataset (`str`): a Hub dataset name, a folder of `SPLIT.LANG[.gz]` files, a `.tsv` or a `.jsonl` file.
        dataset_config (`str` or `None`): the Hub dataset's configuration.
        source_lang, target_lang (`str`): language codes.
        train_split, eval_split, test_split (`str`): split names (`eval_split` may be empty to skip evaluation during
            training).
        max_train_samples, max_eval_samples, max_test_samples (`int` or `None`): subsample the splits.

    How the texts are tokenized (`max_source_length`, `max_target_length`, `source_prefix`) is a training argument:
    the trainer prepares the data ([`DistillationTrainingArguments`]).
    """

    dataset: str = field(default="", metadata={"help": "Hub dataset, folder of SPLIT.LANG files, .tsv or .jsonl."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration."})
    source_lang: Optional[str] = field(default=None, metadata={"help": "Source language code."})
    target_lang: Optional[str] = field(default=None, metadata={"help": "Target language code."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str = field(default="validation", metadata={"help": "Validation split ('' to skip)."})
    test_split: str = field(default="test", metadata={"help": "Test split for the final evaluation."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Subsample the training split."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Subsample the validation split."})
    max_test_samples: Optional[int] = field(default=None, metadata={"help": "Subsample the test split."})


@dataclass
class EvalArguments:
    """The final evaluation on the test split.

    Parameters:
        eval_num_beams (`list[int]`): beam sizes to evaluate (1 = greedy).
        eval_batch_size (`int`): sentences per `generate` call.
        max_new_tokens (`int`): generation length limit.
        evaluate_teacher (`bool`): also evaluate the teacher (for the speed-up and the comparison table).
    """

    eval_num_beams: list[int] = field(default_factory=lambda: [1, 5], metadata={"help": "Beam sizes to evaluate."})
    eval_batch_size: int = field(default=32, metadata={"help": "Sentences per generate call."})
    max_new_tokens: int = field(default=128, metadata={"help": "Generation length limit."})
    evaluate_teacher: bool = field(default=True, metadata={"help": "Also evaluate the teacher."})


@dataclass
class SeqKDArguments:
    """How the teacher builds the Seq-KD corpus.

    Parameters:
        teacher_num_beams (`int`): beam size of the teacher's translations (Kim & Rush used 5).
        nbest_size (`int`): K, the size of the teacher's K-best list; `seq_inter_target` needs K > 1 (the paper: 35).
        seq_inter_metric (`str`): similarity to the reference for Seq-Inter: `"bleu"` (smoothed sentence BLEU) or `"chrf"`.
        teacher_max_new_tokens (`int`): the longest teacher translation, in tokens.
        generation_batch_size (`int`): the most sentences per `generate` call.
        max_tokens_per_batch (`int` or `None`): token budget per `generate` call (sentences x source tokens x beams).
        seqkd_cache_dir (`str` or `None`): where the Seq-KD corpus is cached (default `<output_dir>/../seqkd_cache`);
            a rerun with the same teacher, data and settings reuses it, an interrupted one resumes.
        teacher_ctranslate2_dir (`str` or `None`): the teacher converted with `hf_seqkd.export.to_ctranslate2`; when
            set, the corpus is translated by CTranslate2 (several times faster on a CPU, `bench/RESULTS.md`) instead
            of `teacher.generate`. Training still uses the Transformers teacher for word-level terms.
        model_card_license (`str` or `None`): licence id written into the model card.
    """

    teacher_num_beams: int = field(default=5, metadata={"help": "Teacher beam size for the Seq-KD corpus."})
    nbest_size: int = field(default=1, metadata={"help": "K of the teacher's K-best list (Seq-Inter needs K > 1)."})
    seq_inter_metric: str = field(default="bleu", metadata={"help": "bleu or chrf."})
    teacher_max_new_tokens: int = field(default=128, metadata={"help": "Longest teacher translation (tokens)."})
    generation_batch_size: int = field(default=64, metadata={"help": "Sentences per generate call."})
    max_tokens_per_batch: Optional[int] = field(default=None, metadata={"help": "Token budget per generate call."})
    seqkd_cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache of the Seq-KD corpus."})
    teacher_ctranslate2_dir: Optional[str] = field(default=None, metadata={"help": "Translate the corpus with this CTranslate2 conversion of the teacher."})
    model_card_license: Optional[str] = field(default=None, metadata={"help": "Licence for the model card."})


def build_seqkd_corpus(train_raw, teacher, tokenizer, seqkd_args: SeqKDArguments, training_args, data_args):
    """Step 2 of the recipes: the training split with the teacher's Seq-KD columns, when the run needs them.

    They are built (or loaded from the cache) for ``kd_target`` ``teacher_target`` / ``seq_inter_target`` and for the
    hybrid objective, whose sentence-level term uses the teacher's beam output. With ``nbest_size`` K > 1 the
    Seq-Inter choice is always added (cheap next to the beam search), so Seq-KD and Seq-Inter runs with the same
    teacher settings share one cached corpus. Otherwise ``train_raw`` is returned as it is.
    """
    from .seqkd import build_seqkd_dataset

    if training_args.kd_target == "target" and training_args.hybrid_gate is None:
        return train_raw
    if training_args.kd_target == "seq_inter_target" and seqkd_args.nbest_size < 2:
        raise ValueError("--kd_target seq_inter_target needs --nbest_size K > 1 (Kim & Rush used K = 35)")
    cache_dir = seqkd_args.seqkd_cache_dir or os.path.join(os.path.dirname(
        os.path.abspath(training_args.output_dir)), "seqkd_cache")
    if seqkd_args.teacher_ctranslate2_dir:
        from .export import CTranslate2Translator

        device = "cuda" if str(training_args.device).startswith("cuda") else "cpu"
        teacher = CTranslate2Translator(seqkd_args.teacher_ctranslate2_dir, tokenizer, device=device)
    return build_seqkd_dataset(
        train_raw, teacher, tokenizer, num_beams=max(seqkd_args.teacher_num_beams, seqkd_args.nbest_size),
        num_return_sequences=seqkd_args.nbest_size, max_new_tokens=seqkd_args.teacher_max_new_tokens,
        batch_size=seqkd_args.generation_batch_size, max_tokens_per_batch=seqkd_args.max_tokens_per_batch,
        seq_inter=seqkd_args.nbest_size > 1, seq_inter_metric=seqkd_args.seq_inter_metric,
        source_prefix=training_args.source_prefix, cache_dir=cache_dir)


def _load_yaml_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of argument names to values")
    return values


def _yaml_keys(path: str) -> list[str]:
    return [str(key) for key in _load_yaml_config(path)]


def _yaml_to_argv(path: str) -> list[str]:
    values = _load_yaml_config(path)
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_args(dataclass_types, argv: list[str] | None = None):
    """Parse ``dataclass_types`` from the command line, with ``--config file.yaml`` giving defaults.

    Values on the command line win over the YAML file. Unknown names (in the file or on the command line) are
    an error that names them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # allow_abbrev=False: argparse would otherwise take a misspelt prefix (`--learning_rat`, a YAML key `alph`) for
    # the option it abbreviates, silently
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a file name")
        unknown_keys = [key for key in _yaml_keys(argv[i + 1]) if f"--{key}" not in parser._option_string_actions]
        if unknown_keys:  # named here, with the file, also when their value is null (skipped below)
            raise ValueError(f"--config {argv[i + 1]}: unknown key(s) {unknown_keys}; see --help for the accepted "
                             "arguments")
        argv = _yaml_to_argv(argv[i + 1]) + argv[:i] + argv[i + 2:]
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ValueError(f"unknown option(s): {unknown}; see --help for the accepted arguments")
    return tuple(parsed)


def load_or_make_student(model_args: ModelArguments, teacher):
    """The student the recipes train: a saved one (``init_student_from``) or one made from ``teacher``."""
    from transformers import AutoModelForSeq2SeqLM

    from .students import make_student, make_student_from_config

    if model_args.init_student_from:
        return AutoModelForSeq2SeqLM.from_pretrained(model_args.init_student_from)
    if model_args.student_init == "config":
        return make_student_from_config(
            teacher, d_model=model_args.student_d_model, encoder_layers=model_args.student_encoder_layers,
            decoder_layers=model_args.student_decoder_layers, ffn_dim=model_args.student_ffn_dim,
            attention_heads=model_args.student_attention_heads, seed=model_args.seed_student)
    return make_student(teacher, encoder_layers=model_args.student_encoder_layer_ids or model_args.student_encoder_layers,
                        decoder_layers=model_args.student_decoder_layer_ids or model_args.student_decoder_layers)


def select_split(raw, flag: str, name: str | None, dataset: str):
    """The split ``name`` of ``raw`` (``None`` for ``""`` or ``"none"``: skipped on purpose); a missing split is an
    error that names the flag and the splits there are, raised before any long work."""
    if not name or str(name).lower() == "none":
        return None
    if name not in raw:
        raise ValueError(f"{flag} {name!r} is not a split of {dataset}; its splits are: {', '.join(raw)} "
                         f"(use {flag} none to do without)")
    return raw[name]


def select_splits(raw, data_args: DataArguments, training_args) -> tuple:
    """``(train, validation, test)`` of a recipe run, checked up front (:func:`select_split`): validation only when
    ``eval_strategy`` evaluates (then it is required), test unless ``--test_split none``."""
    train = select_split(raw, "--train_split", data_args.train_split, data_args.dataset)
    if train is None:
        raise ValueError("--train_split is required: the split to train on")
    evaluation = None
    if str(getattr(training_args, "eval_strategy", "no")) not in ("no", "IntervalStrategy.NO"):
        evaluation = select_split(raw, "--eval_split", data_args.eval_split, data_args.dataset)
        if evaluation is None:
            raise ValueError(f"--eval_strategy {training_args.eval_strategy} evaluates during training: name the "
                             f"validation split with --eval_split (splits: {', '.join(raw)})")
    test = select_split(raw, "--test_split", data_args.test_split, data_args.dataset)
    return (first_rows(train, data_args.max_train_samples),
            None if evaluation is None else first_rows(evaluation, data_args.max_eval_samples),
            None if test is None else first_rows(test, data_args.max_test_samples))


def check_teacher_ctranslate2_dir(path: str | None) -> None:
    """A ``--teacher_ctranslate2_dir`` must be a CTranslate2 folder (``model.bin``): checked before the corpus."""
    if path and not os.path.isfile(os.path.join(path, "model.bin")):
        raise ValueError(f"--teacher_ctranslate2_dir {path}: no CTranslate2 model there (model.bin); convert the "
                         "teacher with hf_seqkd.export.to_ctranslate2 first")


def first_rows(dataset, n: int | None):
    """The first ``n`` rows of ``dataset`` (all of them when ``n`` is None or 0): ``--max_*_samples``."""
    return dataset.select(range(min(n, len(dataset)))) if n else dataset


def evaluate_on_test_split(test, teacher, student, tokenizer, data_args: DataArguments, eval_args: EvalArguments,
                           device, source_prefix: str = "", bleu_tokenize: str = "13a") -> list[dict]:
    """Step 5 of the training recipes: teacher (with ``--evaluate_teacher``) and student on ``--test_split``
    (:func:`evaluate_models`), the table printed; ``[]`` without a test split (``--test_split none``)."""
    if test is None:
        return []
    models = ([("teacher", "teacher", teacher.to(device))] if eval_args.evaluate_teacher else []) + \
        [("student", "student", student)]
    rows = evaluate_models(models, tokenizer, test, eval_args, source_prefix=source_prefix, bleu_tokenize=bleu_tokenize)
    print(markdown_table(rows, ["model", "params", "bleu_greedy", "bleu_beam", "chrf", "sentences_per_second",
                                "speedup"]))
    return rows


def evaluate_models(models, tokenizer, test, eval_args: EvalArguments, *, source_prefix: str = "",
                    bleu_tokenize: str = "13a") -> list[dict]:
    """The recipes' results table: every ``(name, role, model)`` at every beam size of ``eval_args``, BLEU, chrF,
    sentences/s and parameters; ``speedup`` is each model's greedy speed over the first model's (the teacher's)
    beam-search speed, as Kim & Rush compare them."""
    from .evaluation import evaluate_translation

    rows = []
    for name, role, model in models:
        row = {"model": name, "role": role}
        for beams in eval_args.eval_num_beams:
            r = evaluate_translation(model, tokenizer, test["source"], test["target"], num_beams=beams,
                                     batch_size=eval_args.eval_batch_size, max_new_tokens=eval_args.max_new_tokens,
                                     source_prefix=source_prefix, bleu_tokenize=bleu_tokenize)
            key = "greedy" if beams == 1 else "beam"
            row.update({f"bleu_{key}": r["bleu"], f"chrf_{key}": r["chrf"], f"sent_per_s_{key}": r["sentences_per_second"]})
            row["params"] = r["num_parameters"]
        row["chrf"] = row.get("chrf_greedy", row.get("chrf_beam"))
        row["sentences_per_second"] = row.get("sent_per_s_greedy", row.get("sent_per_s_beam"))
        rows.append(row)
    first_speed = rows[0].get("sent_per_s_beam") or rows[0]["sentences_per_second"] if rows else None
    for row in rows:
        row["speedup"] = row["sentences_per_second"] / first_speed
    return rows


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".2f") -> str:
    """A Markdown table of ``rows`` (dicts); missing cells are blank."""
    if not rows:
        return ""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def cell(value):
        if isinstance(value, float):
            return format(value, floatfmt)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
            return f"{value:,}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def dataclass_to_dict(obj) -> dict:
    """The fields of a dataclass instance (for saving a run's settings)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def kd_method_name(training_args) -> str:
    """A short name of the distillation method of a run, for model cards: e.g. ``seq-kd+word-kd``."""
    method = {"target": "baseline", "teacher_target": "seq-kd", "seq_inter_target": "seq-inter"}[training_args.kd_target]
    if training_args.hybrid_gate is not None:
        return method + "+hybrid-kd"
    if training_args.alpha > 0:
        method += "+word-kd"
    if training_args.intermediate_loss_weight > 0:
        method += "+ckd"
    return method


def save_and_publish_student(model, tokenizer, training_args, data_args, *, method: str, hyperparameters: dict,
                             results: list[dict] | None, license: str | None = None) -> str:
    """What every recipe does last: save the student, its tokenizer, a model card (README.md) and results.json to
    ``training_args.output_dir``, and push the folder with ``--push_to_hub --hub_model_id``.

    Returns the output folder.
    """
    from .hub import make_model_card, push_student, save_student

    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/opus-mt-de-en-seqkd-student)")
    hyperparameters = {k: v for k, v in hyperparameters.items() if v is not None}
    card = make_model_card(teacher_name=training_args.teacher_model_name_or_path, method=method,
                           hyperparameters=hyperparameters, results=results or None,
                           source_lang=data_args.source_lang or "src", target_lang=data_args.target_lang or "tgt",
                           datasets=data_args.dataset, license=license, eval_split=data_args.test_split,
                           hub_model_id=training_args.hub_model_id)
    out = training_args.output_dir
    save_student(model, tokenizer, out, card)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results or [], f, indent=2)
    if training_args.push_to_hub:
        push_student(out, training_args.hub_model_id, private=bool(training_args.hub_private_repo),
                     token=training_args.hub_token)
        print(f"Pushed {out} to https://huggingface.co/{training_args.hub_model_id}")
    return out
