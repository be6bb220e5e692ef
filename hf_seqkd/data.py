"""Parallel data: loading (Hub datasets, plain text pairs, TSV, JSONL), validation, tokenization, collation.

Every loader returns a ``datasets.DatasetDict`` whose splits have the columns ``source`` and ``target``.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import datasets
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import DataCollatorForSeq2Seq
from transformers.models.bart.modeling_bart import shift_tokens_right

logger = logging.getLogger(__name__)

__all__ = ["load_parallel_data", "read_lines", "prepare_distillation_dataset", "DistillationDataCollator",
           "DataError", "select_split", "decoder_inputs_from_labels"]

# file stems of a corpus folder and the split names they become
_SPLIT_ALIASES = {"train": "train", "val": "validation", "valid": "validation", "dev": "validation",
                  "validation": "validation", "test": "test"}


class DataError(ValueError):
    """Bad parallel data: the message names the file (or dataset) and the problem."""


def _open_text(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (``.gz`` allowed), without line ends; invalid UTF-8 names file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    lines = []
    with _open_text(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {number}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
            lines.append(line.rstrip("\r\n"))
    return lines


def _pairs_from_files(source_file: str, target_file: str) -> dict[str, list[str]]:
    sources, targets = read_lines(source_file), read_lines(target_file)
    if len(sources) != len(targets):
        raise DataError(f"{source_file} has {len(sources)} lines but {target_file} has {len(targets)}: "
                        "parallel files must have one sentence per line, aligned")
    return {"source": sources, "target": targets}


def _pairs_from_tsv(path: str, source_column: int | str = 0, target_column: int | str = 1) -> dict[str, list[str]]:
    sources, targets = [], []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            sources.append("")
            targets.append("")
            continue
        fields = line.split("\t")
        if isinstance(source_column, str) or isinstance(target_column, str):
            raise DataError(f"{path}: TSV columns are selected by position (0, 1, ...), got {source_column!r}")
        if len(fields) <= max(source_column, target_column):
            raise DataError(f"{path}, line {number}: expected at least {max(source_column, target_column) + 1} "
                            f"tab-separated fields, found {len(fields)}")
        sources.append(fields[source_column])
        targets.append(fields[target_column])
    return {"source": sources, "target": targets}


def _get_pair(record: Mapping[str, Any], source_lang, target_lang, where: str) -> tuple[str, str]:
    if "translation" in record and isinstance(record["translation"], Mapping):
        pair = record["translation"]
        keys = (source_lang, target_lang)
    else:
        pair = record
        keys = (source_lang or "source", target_lang or "target")
    missing = [k for k in keys if k is None or k not in pair]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}; available: {sorted(pair)} "
                        "(set source_lang/target_lang to the language codes of the translation column)")
    return pair[keys[0]], pair[keys[1]]


def _pairs_from_jsonl(path: str, source_lang, target_lang) -> dict[str, list[str]]:
    sources, targets = [], []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: invalid JSON ({e.msg})") from None
        s, t = _get_pair(record, source_lang, target_lang, f"{path}, line {number}")
        sources.append(s)
        targets.append(t)
    return {"source": sources, "target": targets}


def _find_split_files(folder: str, source_lang: str, target_lang: str) -> dict[str, tuple[str, str]]:
    """``{split: (source_file, target_file)}`` for files named ``STEM.LANG[.gz]`` in ``folder``."""
    found: dict[str, tuple[str, str]] = {}
    for name in sorted(os.listdir(folder)):
        base = name[:-3] if name.endswith(".gz") else name
        stem, dot, lang = base.rpartition(".")
        if not dot or lang != source_lang:
            continue
        target = None
        for candidate in (f"{stem}.{target_lang}.gz", f"{stem}.{target_lang}"):
            if os.path.isfile(os.path.join(folder, candidate)):
                target = os.path.join(folder, candidate)
        if target is None:
            raise DataError(f"{os.path.join(folder, name)} has no {target_lang} counterpart ({stem}.{target_lang})")
        split = _SPLIT_ALIASES.get(stem, stem)
        found[split] = (os.path.join(folder, name), target)
    if not found:
        raise DataError(f"{folder}: no files named <split>.{source_lang}[.gz] with a <split>.{target_lang}[.gz] pair")
    return found


def _drop_empty(pairs: dict[str, list[str]], where: str) -> dict[str, list[str]]:
    keep = [i for i, (s, t) in enumerate(zip(pairs["source"], pairs["target"])) if s.strip() and t.strip()]
    dropped = len(pairs["source"]) - len(keep)
    if dropped:
        logger.warning(f"{where}: dropped {dropped} pair(s) with an empty source or target")
    return {k: [v[i] for i in keep] for k, v in pairs.items()}


def _load_split(spec, source_lang, target_lang) -> dict[str, list[str]]:
    if isinstance(spec, (list, tuple)):
        if len(spec) != 2:
            raise DataError(f"a split given as a list needs two files (source, target), got {spec}")
        return _pairs_from_files(*spec)
    path = str(spec)
    plain = path[:-3] if path.endswith(".gz") else path
    if plain.endswith(".tsv"):
        return _pairs_from_tsv(path)
    if plain.endswith((".jsonl", ".json")):
        return _pairs_from_jsonl(path, source_lang, target_lang)
    raise DataError(f"{path}: unknown file type; use .tsv, .jsonl, or a (source_file, target_file) pair")


def load_parallel_data(
    data: str | Mapping[str, Any],
    *,
    source_lang: str | None = None,
    target_lang: str | None = None,
    config_name: str | None = None,
    splits: Sequence[str] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Load a parallel corpus as a ``DatasetDict`` with ``source`` and ``target`` columns.

    Args:
        data: one of
            * a folder of ``SPLIT.LANG[.gz]`` text files, one sentence per line (e.g. ``train.de.gz`` +
              ``train.en.gz``, ``val.*`` becomes ``validation``);
            * a single ``.tsv`` (source TAB target) or ``.jsonl`` file (becomes ``train``);
            * a mapping ``{split: (source_file, target_file) | "file.tsv" | "file.jsonl"}``;
            * a Hub dataset name (loaded with ``datasets.load_dataset(data, config_name)``) whose rows have a
              ``translation`` column ``{source_lang: ..., target_lang: ...}`` or ``source``/``target`` columns.
        source_lang, target_lang: language codes (file suffixes, ``translation`` keys). JSONL records may have
            either a ``translation`` dict or keys ``source_lang``/``target_lang`` (default ``source``/``target``).
        config_name: the Hub dataset's configuration.
        splits: keep only these splits.
        max_samples: keep at most this many pairs per split (a random subset, reproducible from ``seed``).

    Empty pairs are dropped (with a count in a warning). Files of different lengths, invalid UTF-8, invalid
    JSON and missing keys raise :class:`DataError` naming the file, line and problem.
    """
    raw: dict[str, dict[str, list[str]]] = {}
    if isinstance(data, Mapping):
        for split, spec in data.items():
            raw[split] = _load_split(spec, source_lang, target_lang)
    elif os.path.isdir(data):
        if not (source_lang and target_lang):
            raise DataError(f"{data} is a folder: set source_lang and target_lang to pick its files")
        for split, files in _find_split_files(data, source_lang, target_lang).items():
            raw[split] = _pairs_from_files(*files)
    elif os.path.isfile(data):
        raw["train"] = _load_split(data, source_lang, target_lang)
    elif str(data).endswith((".tsv", ".jsonl", ".json", ".gz", ".txt")):
        raise DataError(f"{data}: no such file")
    else:
        raw = _load_hub_dataset(str(data), config_name, source_lang, target_lang)

    if splits is not None:
        unknown = [s for s in splits if s not in raw]
        if unknown:
            raise DataError(f"split(s) {unknown} not found in {data}; available: {sorted(raw)}")
        raw = {s: raw[s] for s in splits}
    out = {}
    for split, pairs in raw.items():
        pairs = _drop_empty(pairs, f"{data} [{split}]")
        if not pairs["source"]:
            raise DataError(f"{data} [{split}]: no sentence pairs (its files are empty, or every line has an empty "
                            "source or target)")
        dataset = Dataset.from_dict(pairs)
        if max_samples is not None and len(dataset) > max_samples:
            indices = sorted(random.Random(seed).sample(range(len(dataset)), max_samples))
            dataset = dataset.select(indices)
        out[split] = dataset
    return DatasetDict(out)


def _load_hub_dataset(name, config_name, source_lang, target_lang) -> dict[str, dict[str, list[str]]]:

    try:
        loaded = datasets.load_dataset(name, config_name)
    except Exception as e:  # the datasets library raises many types; name the dataset in ours
        raise DataError(f"could not load {name!r} (config {config_name!r}) as a local path or a Hub dataset: "
                        f"{e}") from e
    raw = {}
    for split, dataset in loaded.items():
        columns = dataset.column_names
        if "translation" in columns:
            records = dataset["translation"]
            where = f"{name} [{split}] translation column"
            pairs = [_get_pair({"translation": r}, source_lang, target_lang, where) for r in records]
        elif {"source", "target"} <= set(columns):
            pairs = list(zip(dataset["source"], dataset["target"]))
        elif source_lang in columns and target_lang in columns:
            pairs = list(zip(dataset[source_lang], dataset[target_lang]))
        else:
            raise DataError(f"{name} [{split}]: no 'translation' column and no source/target columns; "
                            f"columns are {columns}")
        raw[split] = {"source": [p[0] for p in pairs], "target": [p[1] for p in pairs]}
    return raw


def prepare_distillation_dataset(
    dataset: Dataset,
    tokenizer,
    *,
    target_column: str = "target",
    max_source_length: int = 256,
    max_target_length: int = 256,
    source_prefix: str = "",
    gold_mix_ratio: float = 0.0,
    teacher_labels_column: str | None = None,
    seed: int = 0,
    num_proc: int | None = None,
) -> Dataset:
    """Tokenize a ``source``/``target`` dataset for the trainer.

    Args:
        dataset: a split with a ``source`` column and ``target_column``.
        tokenizer: the (shared) tokenizer.
        target_column: what the student is trained on: ``target`` (gold), ``teacher_target`` (Seq-KD) or
            ``seq_inter_target`` (Seq-Inter).
        max_source_length, max_target_length: truncation lengths; the number of truncated sentences is logged.
        source_prefix: prepended to every source (T5-style task prefix, e.g. ``"translate German to English: "``).
        gold_mix_ratio: with a distilled ``target_column``, this fraction of pairs (chosen reproducibly from
            ``seed``) keeps the gold ``target`` instead.
        teacher_labels_column: also tokenize this column (e.g. ``teacher_target``) into ``teacher_labels`` (used
            by the hybrid objective's sentence-level term).

    Returns ``input_ids``, ``attention_mask``, ``labels`` (and ``teacher_labels``), the text columns removed.
    """
    for column in ("source", target_column) + ((teacher_labels_column,) if teacher_labels_column else ()):
        if column not in dataset.column_names:
            hint = " (build it with hf_seqkd.build_seqkd_dataset)" if column != "target" else ""
            raise DataError(f"column {column!r} not in the dataset{hint}; columns are {dataset.column_names}")
    targets = list(dataset[target_column])
    if gold_mix_ratio > 0 and target_column != "target":
        rng = random.Random(seed)
        gold = dataset["target"]
        targets = [g if rng.random() < gold_mix_ratio else t for t, g in zip(targets, gold)]
    sources = [source_prefix + s for s in dataset["source"]]

    encoded = tokenizer(sources, max_length=max_source_length, truncation=True)
    labels = tokenizer(text_target=targets, max_length=max_target_length, truncation=True)["input_ids"]
    columns = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
    if teacher_labels_column:
        columns["teacher_labels"] = tokenizer(text_target=list(dataset[teacher_labels_column]),
                                              max_length=max_target_length, truncation=True)["input_ids"]
    for name, limit in (("input_ids", max_source_length), ("labels", max_target_length)):
        cut = sum(len(x) >= limit for x in columns[name])
        if cut:
            logger.warning(f"{cut} of {len(dataset)} {'sources' if name == 'input_ids' else 'targets'} reached "
                           f"{limit} tokens and were truncated")
    return Dataset.from_dict(columns)


def decoder_inputs_from_labels(model, labels):
    """Teacher-forcing decoder inputs: ``labels`` shifted right behind the decoder start token (-100 -> pad).

    ``model.prepare_decoder_input_ids_from_labels`` where the model has it; M2M100 and NLLB do not (Transformers 5),
    so the same shift is done from their config's ``decoder_start_token_id`` and ``pad_token_id``.
    """
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return model.prepare_decoder_input_ids_from_labels(labels=labels)

    config = model.config
    return shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)


def select_split(raw, flag: str, name: str | None, dataset: str):
    """The split ``name`` of ``raw`` (``None`` for ``""`` or ``"none"``: skipped on purpose); a missing split is an
    error that names the flag and the splits there are, raised before any long work.

    Args:
        raw: a ``DatasetDict``.
        flag: the option that named it (``"--test_split"``), for the message.
        name: the split's name.
        dataset: the corpus's name, for the message.
    """
    if not name or str(name).lower() == "none":
        return None
    if name not in raw:
        raise ValueError(f"{flag} {name!r} is not a split of {dataset}; its splits are: {', '.join(raw)} "
                         f"(use {flag} none to do without)")
    return raw[name]


# the teacher's stored distributions (hf_seqkd.teacher_distributions): ids (k per position), log-probabilities (k per
# position), the tail's log-probability (one per position), the temperature they were taken at (one per row)
STORED_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob",
                  "teacher_distribution_temperature")


def _pad_stored(rows: list[dict], length: int) -> dict:
    """The stored teacher distributions of a batch as tensors ``(batch, length, k)`` / ``(batch, length)``, padded
    with zeros on the right (padding positions carry no loss: their labels are -100)."""
    k = next((len(r["teacher_topk_ids"][0]) for r in rows if len(r["teacher_topk_ids"])), 1)
    ids = torch.zeros(len(rows), length, k, dtype=torch.long)
    log_probs = torch.zeros(len(rows), length, k, dtype=torch.float32)
    tail = torch.zeros(len(rows), length, dtype=torch.float32)
    for b, r in enumerate(rows):
        n = len(r["teacher_topk_ids"])
        if n:
            ids[b, :n] = torch.as_tensor(np.asarray(r["teacher_topk_ids"], dtype=np.int64))
            log_probs[b, :n] = torch.as_tensor(np.asarray(r["teacher_topk_logprobs"], dtype=np.float32))
            tail[b, :n] = torch.as_tensor(np.asarray(r["teacher_tail_logprob"], dtype=np.float32))
    temperature = torch.tensor([float(r["teacher_distribution_temperature"]) for r in rows])
    return {"teacher_topk_ids": ids, "teacher_topk_logprobs": log_probs, "teacher_tail_logprob": tail,
            "teacher_distribution_temperature": temperature}


@dataclass
class DistillationDataCollator:
    """``DataCollatorForSeq2Seq`` that pads on the right and also pads ``teacher_labels`` (with -100) and stored
    teacher distributions (:mod:`hf_seqkd.teacher_distributions`: zeros, to the labels' length).

    Args:
        tokenizer: the tokenizer (pads inputs).
        model: the student (``decoder_input_ids`` are made from ``labels`` for it, :func:`decoder_inputs_from_labels`).
        pad_to_multiple_of: passed to the inner collator.
    """

    tokenizer: Any
    model: Any = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        # Always pad on the right, whatever the tokenizer was saved with: left-padded labels would put padding
        # between the decoder start token and the target, and left-padded sources shift absolute positions.
        tokenizer = copy.copy(self.tokenizer)
        tokenizer.padding_side = "right"
        self._inner = DataCollatorForSeq2Seq(tokenizer, model=self.model, label_pad_token_id=-100,
                                             pad_to_multiple_of=self.pad_to_multiple_of)

    def __call__(self, features):
        extra = None
        if features and "teacher_labels" in features[0]:
            extra = [list(f["teacher_labels"]) for f in features]
            features = [{k: v for k, v in f.items() if k != "teacher_labels"} for f in features]
        stored = None
        if features and "teacher_topk_ids" in features[0]:  # hf_seqkd.teacher_distributions
            stored = [{k: f[k] for k in STORED_COLUMNS} for f in features]
            features = [{k: v for k, v in f.items() if k not in STORED_COLUMNS} for f in features]
        batch = self._inner(features)
        if stored is not None:
            batch.update(_pad_stored(stored, batch["labels"].shape[1]))
        if self.model is not None and "labels" in batch and "decoder_input_ids" not in batch:
            # DataCollatorForSeq2Seq only asks models that have prepare_decoder_input_ids_from_labels; M2M100 and
            # NLLB (Transformers 5) neither have it nor shift the labels in forward
            batch["decoder_input_ids"] = decoder_inputs_from_labels(self.model, batch["labels"])
        if extra is not None:
            width = max(len(x) for x in extra)
            batch["teacher_labels"] = torch.tensor([x + [-100] * (width - len(x)) for x in extra], dtype=torch.long)
        return batch
