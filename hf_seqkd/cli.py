"""The recipes' command line: their argument dataclasses, ``--config file.yaml`` parsing, and the steps that turn
arguments into objects (the student, the splits)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import yaml
from transformers import AutoModelForSeq2SeqLM, HfArgumentParser

from .config import DistillationTrainingArguments
from .data import select_split
from .students import make_student, make_student_from_config

__all__ = ["ModelArguments", "DataArguments", "EvalArguments", "make_parser", "parse_args", "load_or_make_student",
           "select_splits"]


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
        model_card_license (`str` or `None`): licence id written into the student's model card.
    """

    tokenizer_name_or_path: Optional[str] = field(default=None,
                                                  metadata={"help": "Tokenizer; None: the teacher's."})
    init_student_from: Optional[str] = field(default=None, metadata={"help": "Continue from this saved student."})
    student_init: str = field(default="copy", metadata={"help": "copy (teacher layers) or config (random init)."})
    student_encoder_layers: Optional[int] = field(default=None, metadata={"help": "Student encoder depth."})
    student_decoder_layers: Optional[int] = field(default=None, metadata={"help": "Student decoder depth."})
    student_encoder_layer_ids: Optional[list[int]] = field(default=None,
                                                           metadata={"help": "Teacher encoder layers to copy."})
    student_decoder_layer_ids: Optional[list[int]] = field(default=None,
                                                           metadata={"help": "Teacher decoder layers to copy."})
    student_d_model: Optional[int] = field(default=None, metadata={"help": "From-config student width."})
    student_ffn_dim: Optional[int] = field(default=None, metadata={"help": "From-config student feed-forward size."})
    student_attention_heads: Optional[int] = field(default=None, metadata={"help": "From-config student heads."})
    seed_student: int = field(default=0, metadata={"help": "Seed of a from-config student."})
    model_card_license: Optional[str] = field(default=None, metadata={"help": "Licence for the model card."})

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
    """The final evaluation on the test split (the length limit is the training arguments' `max_new_tokens`).

    Parameters:
        eval_num_beams (`list[int]`): beam sizes to evaluate (1 = greedy; the largest is the beam-search column).
        eval_batch_size (`int`): sentences per `generate` call.
        evaluate_teacher (`bool`): also evaluate the teacher (for the speed-up and the comparison table).
    """

    eval_num_beams: list[int] = field(default_factory=lambda: [1, 5], metadata={"help": "Beam sizes to evaluate."})
    eval_batch_size: int = field(default=32, metadata={"help": "Sentences per generate call."})
    evaluate_teacher: bool = field(default=True, metadata={"help": "Also evaluate the teacher."})


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


def make_parser(dataclass_types) -> HfArgumentParser:
    """The parser of a recipe (``allow_abbrev=False``: argparse would otherwise take a misspelt prefix such as
    ``--learning_rat`` for the option it abbreviates, silently)."""
    return HfArgumentParser(dataclass_types, allow_abbrev=False,
                            epilog="--config FILE.yaml: a YAML file of these options' values, as defaults (options on "
                                   "the command line win); recipes/configs/ has examples")


def parse_args(dataclass_types, argv: list[str] | None = None):
    """Parse ``dataclass_types`` from the command line, with ``--config file.yaml`` giving defaults.

    Values on the command line win over the YAML file. Unknown names (in the file or on the command line) are
    an error that names them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(dataclass_types)
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


    if model_args.init_student_from:
        return AutoModelForSeq2SeqLM.from_pretrained(model_args.init_student_from)
    if model_args.student_init == "config":
        return make_student_from_config(
            teacher, d_model=model_args.student_d_model, encoder_layers=model_args.student_encoder_layers,
            decoder_layers=model_args.student_decoder_layers, ffn_dim=model_args.student_ffn_dim,
            attention_heads=model_args.student_attention_heads, seed=model_args.seed_student)
    return make_student(teacher,
                        encoder_layers=model_args.student_encoder_layer_ids or model_args.student_encoder_layers,
                        decoder_layers=model_args.student_decoder_layer_ids or model_args.student_decoder_layers)


def select_splits(raw, data_args: DataArguments, training_args: DistillationTrainingArguments) -> tuple:
    """``(train, validation, test)`` of a recipe run, checked up front: validation only when ``eval_strategy``
    evaluates (then it is required), test unless ``--test_split none``; ``--max_*_samples`` keep the first rows."""
    train = select_split(raw, "--train_split", data_args.train_split, data_args.dataset)
    if train is None:
        raise ValueError("--train_split is required: the split to train on")
    evaluation = None
    if training_args.evaluates_during_training:
        evaluation = select_split(raw, "--eval_split", data_args.eval_split, data_args.dataset)
        if evaluation is None:
            raise ValueError(f"--eval_strategy {training_args.eval_strategy} evaluates during training: name the "
                             f"validation split with --eval_split (splits: {', '.join(raw)})")
    test = select_split(raw, "--test_split", data_args.test_split, data_args.dataset)

    def first(dataset, n):
        return None if dataset is None else dataset.select(range(min(n, len(dataset)))) if n else dataset

    return (first(train, data_args.max_train_samples), first(evaluation, data_args.max_eval_samples),
            first(test, data_args.max_test_samples))


def main(argv=None) -> None:
    """``python -m hf_seqkd.cli merge PART_DIR... --into CACHE_DIR``: put together the parts of a Seq-KD corpus built
    on several machines (:func:`hf_seqkd.seqkd.merge_seqkd_parts`)."""
    import argparse

    from .seqkd import merge_seqkd_parts

    parser = argparse.ArgumentParser(prog="python -m hf_seqkd.cli",
                                     description="Merge the parts of a Seq-KD corpus built on several machines.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="put the parts' cache folders together")
    merge.add_argument("parts", nargs="+", help="the seqkd_cache_dir of every part")
    merge.add_argument("--into", required=True, help="the cache folder of the whole corpus")
    args = parser.parse_args(argv)
    print(f"merged into {merge_seqkd_parts(args.parts, args.into)}")


if __name__ == "__main__":
    main()
