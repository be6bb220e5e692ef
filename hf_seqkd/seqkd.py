"""Sequence-level knowledge distillation data (Kim & Rush 2016): the teacher translates the training set.

* Sec. 3.2 (Seq-KD): the teacher's beam search over every training source; the student trains on the 1-best.
  :func:`build_seqkd_dataset` adds ``teacher_target`` and ``teacher_score`` (its length-normalised log-probability).
* Sec. 3.3 (Seq-Inter): the K-best list (``teacher_nbest``, ``teacher_nbest_scores``) and the candidate closest to
  the reference by smoothed sentence BLEU (``seq_inter_target``, :func:`select_seq_inter`).

How the work is done: rows are cut into shards of ``shard_size`` (shard ``i`` belongs to process ``i % N``); inside a
shard, sources are length-sorted into batches (``generation_batch_size`` sentences, ``max_tokens_per_batch``
tokens), translated by a ``datasets.Dataset.map`` whose rows are those batches, and put back in order. With
``cache_dir`` each finished shard is written atomically under a sha256 fingerprint of everything that changes the
output (the teacher's weights and configs, the tokenizer's files and settings, the texts, the generation settings),
so a killed run resumes and a rerun loads the result. Batching settings are not part of the fingerprint: with
attention masks and right padding a sentence's translation does not depend on its neighbours.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from datasets import Dataset, concatenate_datasets
from datasets.table import InMemoryTable
from sacrebleu.metrics import BLEU, CHRF
from tqdm.auto import tqdm

from .distributed import dispatched_dtype, is_dispatched
from .export import CTranslate2Translator
from .generation import SEQKD_LENGTH_PENALTY, GenerationSettings, generate_kbest, max_source_positions
from .languages import check_single_direction, target_token_id

__all__ = [
    "build_seqkd_dataset",
    "merge_seqkd_parts",
    "select_seq_inter",
    "make_length_batches",
    "model_fingerprint",
]

_CACHE_FORMAT_VERSION = 2
_RESULT_FILE = "result.parquet"


# ----------------------------------------------------------------------------------------------------------
# Seq-Inter (Kim & Rush 2016, Sec. 3.3): the K-best candidate closest to the reference


_METRICS: dict[str, Any] = {}


def _sentence_similarity(candidate: str, reference: str, metric: str, tokenize: str = "13a") -> float:
    if not candidate.strip():
        return 0.0  # an empty candidate shares nothing with the reference (and sacrebleu need not see it)
    key = (metric, tokenize if metric == "bleu" else None)
    if key not in _METRICS:

        # Exactly what sacrebleu.sentence_bleu(c, [r], smooth_method="exp", tokenize=...) / sentence_chrf(c, [r])
        # build on every call; made once here because Seq-Inter scores K candidates for every training sentence.
        _METRICS[key] = BLEU(smooth_method="exp", effective_order=True, tokenize=tokenize) if metric == "bleu" \
            else CHRF()
    return float(_METRICS[key].sentence_score(candidate, [reference]).score)


def select_seq_inter(
    nbest: Sequence[str],
    reference: str,
    metric: str = "bleu",
    scores: Sequence[float] | None = None,
    *,
    tokenize: str = "13a",
    return_index: bool = False,
):
    """The candidate of a K-best list closest to the reference (Kim & Rush 2016, Sec. 3.3, Seq-Inter).

    Similarity is smoothed sentence-level BLEU (``sacrebleu.sentence_bleu(c, [ref], smooth_method="exp")``)
    or chrF (``sacrebleu.sentence_chrf``). Ties are broken by the higher teacher score, then by the earlier
    position in ``nbest`` (the beam's own ranking). Empty candidates score 0 and never raise.

    Args:
        nbest: the teacher's K-best translations, best first.
        reference: the reference translation.
        metric: ``"bleu"`` (default) or ``"chrf"``.
        scores: optional teacher scores (one per candidate, higher is better) used to break ties.
        tokenize: sacrebleu's tokenizer for BLEU (``hf_seqkd.evaluation.resolve_bleu_tokenize`` picks it from the
            target language: ``"zh"`` for Chinese, where ``"13a"`` would score every candidate 0).
        return_index: return the position in ``nbest`` instead of the text.

    Returns:
        The chosen candidate text, or its index if ``return_index=True``.

    Raises:
        ValueError: on an empty ``nbest``, an unknown metric, or ``scores`` of the wrong length.
    """
    if metric not in ("bleu", "chrf"):
        raise ValueError(f"select_seq_inter: unknown metric {metric!r}; use 'bleu' or 'chrf'")
    if len(nbest) == 0:
        raise ValueError("select_seq_inter: the n-best list is empty; there is no candidate to choose")
    if scores is not None and len(scores) != len(nbest):
        raise ValueError(f"select_seq_inter: {len(scores)} scores for {len(nbest)} candidates")
    similarity = [_sentence_similarity(c or "", reference or "", metric, tokenize) for c in nbest]
    tie_break = [float(s) for s in scores] if scores is not None else [0.0] * len(nbest)
    best = max(range(len(nbest)), key=lambda i: (similarity[i], tie_break[i], -i))
    return best if return_index else nbest[best]


# ----------------------------------------------------------------------------------------------------------
# Fingerprints for the cache


def _update_text(h, text: str) -> None:
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))  # length-prefixed: ["ab", "c"] and ["a", "bc"] differ
    h.update(data)


def _config_json(config) -> str:
    if config is None:
        return "null"
    d = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash"):
        d.pop(volatile, None)
    return json.dumps(d, sort_keys=True, default=str)


def model_fingerprint(model) -> str:
    """sha256 (hex) over every byte of ``model``'s state dict (names, dtypes, shapes, values) and its configs.

    Args:
        model: a ``torch.nn.Module``; ``config`` and ``generation_config`` (if present) are hashed too, minus
            ``_name_or_path`` and ``transformers_version``, so a saved and reloaded model keeps its fingerprint.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    if is_dispatched(model) and any(t.device.type == "meta" for t in state.values()):
        from accelerate.utils.modeling import get_state_dict_offloaded_model  # layers offloaded to CPU or disk

        onloaded = get_state_dict_offloaded_model(model)  # (it leaves out the model's own buffers: kept from state)
        state = {name: onloaded[name] if tensor.device.type == "meta" else tensor for name, tensor in state.items()}
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        _update_text(h, f"{name}|{flat.dtype}|{tuple(tensor.shape)}")
        h.update(flat.view(torch.uint8).numpy())
    _update_text(h, _config_json(getattr(model, "config", None)))
    _update_text(h, _config_json(getattr(model, "generation_config", None)))
    return h.hexdigest()


# tokenizer_config.json keys that record how a tokenizer was loaded, not how it tokenizes
_TOKENIZER_LOADING_KEYS = {"is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir", "token",
                           "revision", "trust_remote_code", "_from_auto", "use_auth_token", "force_download",
                           "proxies", "subfolder", "tokenizer_file"}


def _json_without(data: bytes, keys) -> str:
    try:
        value = json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in keys}
    return json.dumps(value, sort_keys=True, default=str)


def _tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (hex) of everything that decides how ``tokenizer`` encodes a source and decodes an output: every file
    ``save_pretrained`` writes (vocabularies, SentencePiece models, merges, configuration; minus the keys that only
    record how it was loaded), and the settings that live on the object (languages set after loading, padding and
    truncation sides, the post-processor of a fast tokenizer as it is now)."""

    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            _update_text(h, name)
            if name == "tokenizer.json":  # transformers switches padding/truncation on and off per call
                _update_text(h, _json_without(data, {"padding", "truncation"}))
            elif name.endswith(".json"):
                _update_text(h, _json_without(data, _TOKENIZER_LOADING_KEYS))
            else:
                h.update(data)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = {"class": type(tokenizer).__name__, "padding_side": tokenizer.padding_side,
             "truncation_side": getattr(tokenizer, "truncation_side", None),
             "model_max_length": tokenizer.model_max_length, "special": tokenizer.special_tokens_map,
             "src_lang": getattr(tokenizer, "src_lang", None), "tgt_lang": getattr(tokenizer, "tgt_lang", None),
             "post_processor": backend.post_processor.__getstate__() if backend is not None
             and backend.post_processor is not None else None}
    _update_text(h, json.dumps(state, sort_keys=True, default=str))
    return h.hexdigest()


def _ctranslate2_fingerprint(translator) -> str:
    """sha256 (hex) over every file of a CTranslate2 model folder (weights, config, vocabulary)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(translator.ct2_dir)):
        path = os.path.join(translator.ct2_dir, name)
        if os.path.isfile(path):
            _update_text(h, name)
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _fingerprint(teacher, tokenizer, sources, targets, settings, teacher_fingerprint) -> str:
    h = hashlib.sha256()
    _update_text(h, f"hf_seqkd.seqkd v{_CACHE_FORMAT_VERSION}")
    if teacher_fingerprint is None:
        teacher_fingerprint = (_ctranslate2_fingerprint(teacher) if _is_ctranslate2(teacher)
                               else model_fingerprint(teacher))
    _update_text(h, teacher_fingerprint)
    _update_text(h, _tokenizer_fingerprint(tokenizer))
    _update_text(h, json.dumps(settings, sort_keys=True, default=str))
    h.update(len(sources).to_bytes(8, "little"))
    for text in sources:
        _update_text(h, text)
    if targets is not None:
        for text in targets:
            _update_text(h, text)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Batching


def make_length_batches(
    lengths: Sequence[int],
    *,
    batch_size: int,
    max_tokens_per_batch: int | None = None,
    num_beams: int = 1,
    sort_by_length: bool = True,
) -> list[list[int]]:
    """Cut positions ``0..len(lengths)-1`` into batches (lists of positions).

    With ``sort_by_length`` the positions are visited longest first (ties in original order), otherwise in
    order. A batch takes the next sentence unless it would then hold more than ``batch_size`` sentences or
    cost more than ``max_tokens_per_batch``, where cost = sentences x longest source (tokens) x ``num_beams``
    (each beam is one decoder row, and output length follows source length). A sentence over the budget on
    its own gets a batch of its own.

    Args:
        lengths: token lengths of the sources.
        batch_size: the most sentences in a batch.
        max_tokens_per_batch: the token budget, or ``None`` for none.
        num_beams: the beam size the cost is multiplied by.
        sort_by_length: visit longest first instead of in order.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (-lengths[i], i)) if sort_by_length else list(range(n))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        too_many = len(current) + 1 > batch_size
        cost = (len(current) + 1) * new_longest * num_beams
        too_big = max_tokens_per_batch is not None and cost > max_tokens_per_batch
        if current and (too_many or too_big):
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class _CorpusJob:
    """What one corpus build asks of the teacher (everything that changes its output is in here)."""

    generation: GenerationSettings
    max_source_length: int | None
    seq_inter: bool
    seq_inter_metric: str
    bleu_tokenize: str

    def fingerprint_settings(self, dtype, source_prefix: str) -> dict:
        """The settings the cache key covers; the batching knobs are left out (they do not change the output)."""
        settings = {"num_beams": self.generation.num_beams,
                    "num_return_sequences": self.generation.num_return_sequences,
                    "max_new_tokens": self.generation.max_new_tokens, "max_source_length": self.max_source_length,
                    "seq_inter": self.seq_inter, "length_penalty": SEQKD_LENGTH_PENALTY, "do_sample": False,
                    "dtype": str(dtype), "source_prefix": source_prefix}
        if self.generation.forced_bos_token_id is not None:
            settings["forced_bos_token_id"] = self.generation.forced_bos_token_id
        if self.seq_inter:
            settings["seq_inter_metric"] = self.seq_inter_metric
            if self.seq_inter_metric == "bleu":
                settings["bleu_tokenize"] = self.bleu_tokenize
        return settings


def _is_ctranslate2(teacher) -> bool:

    return isinstance(teacher, CTranslate2Translator)


def _kbest(model, tokenizer, texts: list[str], job: _CorpusJob):
    """Per text, the teacher's K-best translations and their length-normalised log-probabilities."""
    if _is_ctranslate2(model):
        return model.translate_kbest(texts, job.generation, max_source_length=job.max_source_length)
    return generate_kbest(model, tokenizer, texts, job.generation, max_source_length=job.max_source_length)


def _generate_batches(batch, *, model, tokenizer, job: _CorpusJob, progress) -> dict[str, list]:
    """``Dataset.map`` function: each input row is one pre-formed batch, each output row one sentence."""
    out: dict[str, list] = {name: [] for name in _output_columns(job, with_row=True)}
    targets = batch["_targets"] if job.seq_inter else [None] * len(batch["_rows"])
    for rows, texts, refs in zip(batch["_rows"], batch["_sources"], targets):
        nbest, nbest_scores = _kbest(model, tokenizer, texts, job)
        out["_row"].extend(rows)
        out["teacher_target"].extend(c[0] for c in nbest)
        out["teacher_score"].extend(s[0] for s in nbest_scores)
        if job.generation.num_return_sequences > 1:
            out["teacher_nbest"].extend(nbest)
            out["teacher_nbest_scores"].extend(nbest_scores)
        if job.seq_inter:
            out["seq_inter_target"].extend(select_seq_inter(c, r, job.seq_inter_metric, s, tokenize=job.bleu_tokenize)
                                           for c, s, r in zip(nbest, nbest_scores, refs))
        progress.update(len(rows))
    return out


def _output_columns(job: _CorpusJob, with_row: bool = False) -> list[str]:
    names = (["_row"] if with_row else []) + ["teacher_target", "teacher_score"]
    if job.generation.num_return_sequences > 1:
        names += ["teacher_nbest", "teacher_nbest_scores"]
    if job.seq_inter:
        names += ["seq_inter_target"]
    return names


def _generate_shard(model, tokenizer, sources, targets, first_row: int, job: _CorpusJob, *, sort_by_length: bool,
                    progress):
    """Translate one shard; returns a pyarrow table with ``_row`` and the output columns, in row order."""

    lengths = [len(ids) for ids in tokenizer(sources, truncation=job.max_source_length is not None,
                                             max_length=job.max_source_length)["input_ids"]]
    batches = make_length_batches(lengths, batch_size=job.generation.generation_batch_size,
                                  max_tokens_per_batch=job.generation.max_tokens_per_batch,
                                  num_beams=job.generation.num_beams, sort_by_length=sort_by_length)
    columns = {"_rows": [[first_row + i for i in b] for b in batches],
               "_sources": [[sources[i] for i in b] for b in batches]}
    if job.seq_inter:
        columns["_targets"] = [[targets[i] for i in b] for b in batches]
    batch_table = Dataset.from_dict(columns)
    done = batch_table.map(
        _generate_batches,
        fn_kwargs=dict(model=model, tokenizer=tokenizer, job=job, progress=progress),
        batched=True,
        batch_size=1,  # one pre-formed (length-sorted, token-budgeted) batch per call
        remove_columns=batch_table.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=f"seqkd-shard-{first_row}",  # a fixed fingerprint: datasets must not hash the teacher
    )
    return done.with_format("arrow")[:].sort_by("_row")  # back to the original order


@contextlib.contextmanager
def _teacher_for_generation(teacher, device: torch.device, dtype: torch.dtype):
    """The teacher in eval mode on ``device`` in ``dtype``; the caller's model is left as it was.

    A dtype change happens on a copy (casting the caller's fp32 weights to half and back would lose bits);
    a device move and eval mode are undone afterwards.
    """
    if _is_ctranslate2(teacher):  # a converted model: device and compute type were fixed when it was loaded
        yield teacher
        return
    if is_dispatched(teacher):  # placed by accelerate's big-model inference: its hooks move each layer's inputs
        was_training = teacher.training
        teacher.eval()
        try:
            yield teacher
        finally:
            teacher.train(was_training)
        return
    first = next(teacher.parameters())
    was_training, old_device = teacher.training, first.device
    model = teacher if first.dtype == dtype else copy.deepcopy(teacher)
    model.to(device=device, dtype=dtype)
    model.eval()
    try:
        yield model
    finally:
        if model is teacher:
            teacher.to(old_device)
            teacher.train(was_training)
        else:
            del model


# ----------------------------------------------------------------------------------------------------------
# Shard storage: files under the cache directory, or a dict when there is no cache


class _ShardStore:
    def __init__(self, directory: str | None):
        self.directory = directory
        self.memory: dict[tuple[int, int], Any] = {}

    def _path(self, start: int, end: int) -> str:
        return os.path.join(self.directory, f"shard-{start:09d}-{end:09d}.parquet")

    def has(self, start: int, end: int) -> bool:
        if self.directory is None:
            return (start, end) in self.memory
        return os.path.exists(self._path(start, end))

    def save(self, start: int, end: int, table) -> None:
        if self.directory is None:
            self.memory[(start, end)] = table
        else:
            _write_parquet_atomic(table, self._path(start, end))

    def load(self, start: int, end: int):
        if self.directory is None:
            return self.memory[(start, end)]

        return pq.read_table(self._path(start, end))


def _write_parquet_atomic(table, path: str) -> None:

    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old state or the complete file


def _write_text_atomic(text: str, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# The public entry point


def _has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def _resolve_dtype(dtype, device: torch.device, teacher) -> torch.dtype | str:
    if _is_ctranslate2(teacher):
        if dtype is not None:
            raise ValueError("build_seqkd_dataset: a CTranslate2 teacher runs in the compute type it was loaded "
                             "with (CTranslate2Translator(compute_type=...)); leave dtype unset")
        return f"ctranslate2:{teacher.translator.compute_type}"
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"build_seqkd_dataset: unknown dtype {dtype!r} (e.g. 'float32', 'bfloat16')")
        dtype = resolved
    if is_dispatched(teacher):  # loaded with a device_map: in the dtype it was loaded in (cast while loading)
        return dispatched_dtype(teacher, dtype)
    if dtype is not None:
        return dtype
    if device.type == "cuda":  # half precision on GPUs: bf16 where the card has it, else fp16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return next(teacher.parameters()).dtype


def _max_source_length(tokenizer, teacher) -> int | None:
    return max_source_positions(teacher if not _is_ctranslate2(teacher) else None, tokenizer)


def _check_arguments(dataset, generation, *, shard_size, seq_inter, seq_inter_metric, source_column, target_column):

    if not isinstance(dataset, Dataset):
        hint = " (pick a split, e.g. dataset['train'])" if hasattr(dataset, "keys") else ""
        raise TypeError(f"build_seqkd_dataset needs a datasets.Dataset, got {type(dataset).__name__}{hint}")
    if not isinstance(generation, GenerationSettings):
        raise TypeError(f"build_seqkd_dataset: generation must be a GenerationSettings, got "
                        f"{type(generation).__name__} (e.g. GenerationSettings(num_beams=5, num_return_sequences=5))")
    if source_column not in dataset.column_names:
        raise ValueError(f"build_seqkd_dataset: source column {source_column!r} not in the dataset; "
                         f"available columns: {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("build_seqkd_dataset: the dataset is empty; there is nothing for the teacher to translate")
    check_single_direction(dataset)
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"build_seqkd_dataset: shard_size must be a positive integer, got {shard_size!r}")
    if seq_inter:
        if generation.num_return_sequences < 2:
            raise ValueError("build_seqkd_dataset: seq_inter=True chooses among the teacher's K-best list "
                             "(Kim & Rush 2016, Sec. 3.3) and needs num_return_sequences > 1 "
                             f"(got {generation.num_return_sequences})")
        if target_column not in dataset.column_names:
            raise ValueError(f"build_seqkd_dataset: seq_inter=True compares the K-best list with the reference, "
                             f"but the target column {target_column!r} is not in the dataset; available columns: "
                             f"{dataset.column_names}")
        if seq_inter_metric not in ("bleu", "chrf"):
            raise ValueError(f"build_seqkd_dataset: unknown seq_inter_metric {seq_inter_metric!r}; "
                             f"use 'bleu' or 'chrf'")


def _texts(dataset, column: str, prefix: str = "") -> list[str]:
    texts = dataset[column]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"build_seqkd_dataset: row {i} of column {column!r} is {type(text).__name__}, "
                             f"not a string")
    return [prefix + t for t in texts] if prefix else list(texts)


@contextlib.contextmanager
def _datasets_progress_bars_off():

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the per-batch map bars would only hide our sentences/s bar
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def build_seqkd_dataset(
    dataset,
    teacher,
    tokenizer,
    generation: GenerationSettings | None = None,
    *,
    seq_inter: bool = False,
    seq_inter_metric: str = "bleu",
    bleu_tokenize: str = "13a",
    source_prefix: str = "",
    source_column: str = "source",
    target_column: str = "target",
    sort_by_length: bool = True,
    cache_dir: str | os.PathLike | None = None,
    shard_size: int = 1000,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    accelerator=None,
    show_progress: bool = True,
    teacher_fingerprint: str | None = None,
    corpus_part: str | tuple[int, int] | None = None,
):
    """Sequence-level KD data: the dataset with the teacher's beam-search translations of its sources (Kim & Rush
    2016, Sec. 3.2; Sec. 3.3 with ``seq_inter``). The module docstring says how the work is batched, cached, resumed
    and split over processes.

    Added columns (existing columns of the same names are replaced):

    * ``teacher_target``: the 1-best translation (``tokenizer.batch_decode(..., skip_special_tokens=True)``);
    * ``teacher_score``: its length-normalised log-probability, the mean processed log-probability per generated
      token including ``</s>`` (what beam search ranks by with ``length_penalty=1.0``, set explicitly; for greedy
      search the mean of ``compute_transition_scores(normalize_logits=True)``), computed without keeping every
      step's full scores (:class:`hf_seqkd.generation.ScoreRecorder`);
    * with ``num_return_sequences=K > 1``: ``teacher_nbest`` (K texts, best first) and ``teacher_nbest_scores``;
    * with ``seq_inter=True``: ``seq_inter_target`` = :func:`select_seq_inter` of the K-best and the reference.

    Args:
        dataset: a ``datasets.Dataset`` with a text column of sources.
        teacher: an encoder-decoder ``PreTrainedModel`` (a DDP/accelerate wrapper is unwrapped), used in eval mode
            under ``torch.inference_mode()``; a device move is undone afterwards and a dtype change happens on a
            copy. Or a :class:`hf_seqkd.export.CTranslate2Translator` (the teacher converted with
            :func:`hf_seqkd.export.to_ctranslate2`): CTranslate2's beam search, several times faster on a CPU; its
            scores have the same definition and agree with Transformers' to about 1e-5 (``bench/RESULTS.md``);
            ``dtype``/``device`` do not apply.
        tokenizer: the teacher's tokenizer (used to encode sources, right-padded, and decode outputs).
        generation: :class:`~hf_seqkd.generation.GenerationSettings` (beam size, K, length limit, batch sizes);
            default ``GenerationSettings()`` (beam 5, 1-best, 128 tokens, 64 sentences per call). Without a
            ``forced_bos_token_id`` the tokenizer's ``tgt_lang`` (NLLB, M2M100, mBART-50) is forced.
        seq_inter: add ``seq_inter_target`` (needs ``num_return_sequences > 1`` and ``target_column``).
        seq_inter_metric: ``"bleu"`` (smoothed sentence BLEU, as in the paper) or ``"chrf"``.
        bleu_tokenize: sacrebleu's tokenizer for Seq-Inter's sentence BLEU (``"zh"`` for Chinese targets; see
            :func:`hf_seqkd.evaluation.resolve_bleu_tokenize`).
        source_prefix: text put before every source (e.g. ``"translate German to English: "`` for T5).
        source_column: the column with the source texts.
        target_column: the column with the references (used by ``seq_inter`` only).
        sort_by_length: form batches from length-sorted sources (longest first) within each shard; the result is
            always in the original order.
        cache_dir: where finished shards and the final result are kept (under ``cache_dir/<sha256>/``), for reuse
            and resumption; ``None`` keeps nothing (single process only).
        shard_size: rows per shard, the unit of saving, resuming and splitting over processes.
        dtype: the teacher's dtype during generation (``torch.dtype`` or a name); default: bf16 (fp16 where bf16
            is unsupported) on CUDA, the teacher's own dtype elsewhere.
        device: where to generate; default: the accelerate state's device (the process's GPU, else the CPU).
        accelerator: an ``accelerate.Accelerator`` (or ``PartialState``) giving the process layout; default
            ``accelerate.PartialState()`` (``cpu=True`` without an accelerator), which picks up torchrun /
            ``accelerate launch``.
        show_progress: a tqdm bar (sentences, sentences/s) on each node's main process.
        teacher_fingerprint: a string identifying the teacher for the cache instead of hashing all its weights
            (e.g. a checkpoint id with revision); you are responsible for it changing when the weights do.
        corpus_part: ``"i/N"`` (or ``(i, N)``, 1 <= i <= N): build only part i of N, for machines without a shared
            file system: shard ``j`` belongs to part ``j % N + 1`` (and, within a part, to process
            ``(j // N) % processes``). The part's shards and a manifest go to ``cache_dir`` and nothing is returned;
            :func:`merge_seqkd_parts` puts the parts' cache folders together, after which this function with the same
            inputs and the merged ``cache_dir`` returns the whole corpus (the same rows, order and texts as one run).

    Returns:
        A ``datasets.Dataset``: every input row once, in the original order, with the added columns (``None`` with
        ``corpus_part``).

    Raises:
        TypeError: ``dataset`` is not a ``datasets.Dataset``, ``generation`` not a ``GenerationSettings``.
        ValueError: a missing source/target column, an empty dataset, invalid sizes, ``seq_inter`` without a
            K-best list or a reference column, several processes without a shared ``cache_dir``, rows of several
            translation directions (:func:`hf_seqkd.languages.check_single_direction`).
    """

    generation = generation if generation is not None else GenerationSettings()
    _check_arguments(dataset, generation, shard_size=shard_size, seq_inter=seq_inter,
                     seq_inter_metric=seq_inter_metric, source_column=source_column, target_column=target_column)
    generation = dataclasses.replace(  # a tokenizer loaded with tgt_lang=... names the target language
        generation, forced_bos_token_id=target_token_id(tokenizer, generation.forced_bos_token_id))
    # PartialState picks up torchrun / `accelerate launch`; on a machine without an accelerator it needs cpu=True to
    # see a multi-process (gloo) launch at all. An already initialised state is reused as it is.
    state = accelerator if accelerator is not None else PartialState(cpu=not _has_accelerator())
    if state.num_processes > 1 and cache_dir is None:
        raise ValueError(f"build_seqkd_dataset runs on {state.num_processes} processes: pass a cache_dir on a file "
                         f"system all of them share; the processes exchange their shards through it")
    if not hasattr(teacher, "generate") and not _is_ctranslate2(teacher) and hasattr(teacher, "module"):
        teacher = teacher.module  # DistributedDataParallel / accelerate wrapper
    device = torch.device(device) if device is not None else torch.device(state.device)
    dtype = _resolve_dtype(dtype, device, teacher)
    sources = _texts(dataset, source_column, source_prefix)
    targets = _texts(dataset, target_column) if seq_inter else None
    job = _CorpusJob(generation=generation, max_source_length=_max_source_length(tokenizer, teacher),
                     seq_inter=seq_inter, seq_inter_metric=seq_inter_metric, bleu_tokenize=bleu_tokenize)
    part = parse_corpus_part(corpus_part)
    if part is not None and cache_dir is None:
        raise ValueError(f"build_seqkd_dataset: corpus_part={corpus_part!r} builds one part into a cache folder; "
                         "pass cache_dir (then merge the parts' folders with merge_seqkd_parts)")

    with _datasets_progress_bars_off():
        store, result_path = _ShardStore(None), None
        if cache_dir is not None:
            settings = job.fingerprint_settings(dtype, source_prefix)
            fingerprint = _fingerprint(teacher, tokenizer, sources, targets, settings, teacher_fingerprint)
            directory = os.path.join(os.fspath(cache_dir), fingerprint)
            result_path = os.path.join(directory, _RESULT_FILE)
            if os.path.exists(result_path):  # a finished run with the same inputs: nothing to generate
                return None if part is not None else _attach(dataset, pq.read_table(result_path), job)
            os.makedirs(directory, exist_ok=True)
            if state.is_main_process:
                _write_text_atomic(json.dumps(dict(settings, num_rows=len(sources)), indent=2, default=str),
                                   os.path.join(directory, "settings.json"))
            store = _ShardStore(directory)
        _generate_missing_shards(teacher, tokenizer, sources, targets, job, store, state, shard_size=shard_size,
                                 device=device, dtype=dtype, sort_by_length=sort_by_length,
                                 show_progress=show_progress, part=part)
        if part is not None:
            if state.is_main_process:
                _write_text_atomic(json.dumps({"part": part[0], "parts": part[1], "fingerprint": fingerprint,
                                               "num_rows": len(sources), "shard_size": shard_size}),
                                   os.path.join(directory, f"part-{part[0]}-of-{part[1]}.json"))
            return None
        result = _assemble(store, len(sources), shard_size, cache_dir)
        if result_path is not None and state.is_main_process:
            _write_parquet_atomic(result, result_path)
        return _attach(dataset, result, job)


def _shards(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """Shard ``i`` covers rows ``[i * shard_size, (i + 1) * shard_size)``."""
    return [(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def parse_corpus_part(corpus_part) -> tuple[int, int] | None:
    """``"2/4"`` or ``(2, 4)`` -> ``(2, 4)``; a clear error for anything else."""
    if corpus_part is None:
        return None
    try:
        i, n = (int(x) for x in (corpus_part.split("/") if isinstance(corpus_part, str) else corpus_part))
    except (TypeError, ValueError):
        i = n = 0
    if not 1 <= i <= n:
        raise ValueError(f"corpus_part={corpus_part!r}: expected 'i/N' with 1 <= i <= N, e.g. '2/4' for the second "
                         "of four parts")
    return i, n


def _my_shards(num_shards: int, rank: int, num_processes: int, part: tuple[int, int] | None) -> list[int]:
    """The shards this process builds: shard ``j`` belongs to part ``j % N + 1`` and, within its part, to process
    ``(j // N) % num_processes`` (without parts: ``j % num_processes``)."""
    if part is None:
        return [j for j in range(num_shards) if j % num_processes == rank]
    i, n = part
    return [j for j in range(num_shards) if j % n == i - 1 and (j // n) % num_processes == rank]


def _generate_missing_shards(teacher, tokenizer, sources, targets, job, store, state, *, shard_size, device, dtype,
                             sort_by_length, show_progress, part=None) -> None:
    """Translate this process's shards that are not stored yet (:func:`build_missing_shards`)."""

    def translate_shard(model, start, end, progress):
        shard_targets = targets[start:end] if targets is not None else None
        return _generate_shard(model, tokenizer, sources[start:end], shard_targets, start, job,
                               sort_by_length=sort_by_length, progress=progress)

    build_missing_shards(teacher, translate_shard, store, state, len(sources), shard_size, device=device, dtype=dtype,
                         desc="teacher beam search", show_progress=show_progress, part=part)


def build_missing_shards(teacher, make_shard, store, state, num_rows: int, shard_size: int, *, device, dtype,
                         desc: str, show_progress: bool, part=None) -> None:
    """The shard loop of every teacher pass over a corpus (the Seq-KD corpus, the stored teacher distributions):
    this process's shards (:func:`_my_shards`) that ``store`` lacks are made by ``make_shard(model, start, end,
    progress)`` (a pyarrow table) with the teacher prepared once (:func:`_teacher_for_generation`) and saved one by
    one; then every process waits for the others."""
    rank, num_processes = state.process_index, state.num_processes
    shards = _shards(num_rows, shard_size)
    todo = [shards[j] for j in _my_shards(len(shards), rank, num_processes, part) if not store.has(*shards[j])]
    if todo:
        progress = tqdm(total=sum(e - s for s, e in todo), unit="sent", dynamic_ncols=True,
                        desc=f"{desc} (process {rank + 1}/{num_processes})" if num_processes > 1 else desc,
                        disable=not (show_progress and state.is_local_main_process))
        with _teacher_for_generation(teacher, device, dtype) as model:
            for start, end in todo:
                store.save(start, end, make_shard(model, start, end, progress))
        progress.close()
    state.wait_for_everyone()  # every shard is on disk now


def _assemble(store, num_rows: int, shard_size: int, cache_dir):
    """The shards' rows in order, checked to cover every row exactly once."""

    tables = [store.load(s, e) for s, e in _shards(num_rows, shard_size)]
    result = pa.concat_tables([t.cast(tables[0].schema) for t in tables])
    if result.column("_row").to_pylist() != list(range(num_rows)):
        raise RuntimeError(f"build_seqkd_dataset: the shards do not cover rows 0..{num_rows - 1} exactly once; the "
                           f"cache under {cache_dir} may be corrupt")
    return result


def _attach(dataset, table, job: _CorpusJob):
    """``dataset`` with the generated columns of ``table`` (replacing columns of the same names)."""

    new_columns = _output_columns(job)
    generated = Dataset(InMemoryTable(table.select(new_columns)))
    kept = dataset.remove_columns([c for c in new_columns if c in dataset.column_names])
    return concatenate_datasets([kept, generated], axis=1)


def merge_seqkd_parts(part_dirs: Sequence[str | os.PathLike], cache_dir: str | os.PathLike) -> str:
    """Put together the parts of a Seq-KD corpus built on several machines (``build_seqkd_dataset(...,
    corpus_part="i/N", cache_dir=part_dir)`` on each) into ``cache_dir``.

    Checks that the parts belong together (one fingerprint: the same teacher, tokenizer, texts and generation
    settings; the same shard size and number of parts) and that every part is there once, copies their shards and
    writes the assembled result. ``build_seqkd_dataset`` with the same inputs and ``cache_dir`` then returns the
    corpus without translating anything: the same rows, order and texts as one run.

    Args:
        part_dirs: the ``cache_dir`` of each part (copied from its machine), in any order.
        cache_dir: where the whole corpus goes (may be one of ``part_dirs``).

    Returns:
        The merged corpus's folder (``cache_dir/<fingerprint>``).

    Raises:
        ValueError: a folder without a part, parts of different corpora or settings, a part missing or given twice.
    """
    import shutil

    manifests = []
    for folder in part_dirs:
        found = sorted(Path(folder).glob("*/part-*-of-*.json"))
        if not found:
            raise ValueError(f"merge_seqkd_parts: {folder} holds no corpus part (part-<i>-of-<N>.json); build one "
                             "with build_seqkd_dataset(..., corpus_part='i/N', cache_dir=that folder)")
        for path in found:
            manifests.append((path, json.loads(path.read_text())))
    keys = {(m["fingerprint"], m["parts"], m["shard_size"], m["num_rows"]) for _, m in manifests}
    if len(keys) != 1:
        found = "; ".join(f"{p.parent.parent}: part {m['part']}/{m['parts']} of {m['fingerprint'][:12]}, "
                          f"shard_size {m['shard_size']}, {m['num_rows']} rows" for p, m in manifests)
        raise ValueError("merge_seqkd_parts: the parts do not belong together (different teachers, data, generation "
                         f"settings, shard sizes or numbers of parts): {found}")
    fingerprint, parts, shard_size, num_rows = keys.pop()
    have = sorted(m["part"] for _, m in manifests)
    if have != list(range(1, parts + 1)):
        raise ValueError(f"merge_seqkd_parts: parts {have} of {parts} given; every part 1..{parts} is needed exactly "
                         "once")
    target = Path(cache_dir) / fingerprint
    target.mkdir(parents=True, exist_ok=True)
    for path, _ in manifests:
        for item in path.parent.iterdir():
            if item.name.startswith(("shard-", "part-", "settings")) and not (target / item.name).exists():
                shutil.copyfile(item, target / item.name)
    result = _assemble(_ShardStore(str(target)), num_rows, shard_size, target)
    _write_parquet_atomic(result, str(target / _RESULT_FILE))
    return str(target)

