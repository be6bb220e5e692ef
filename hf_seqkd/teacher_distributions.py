"""Word-level KD without the teacher in memory: the teacher's top-k next-token distributions, stored once.

Word-level KD (Kim & Rush 2016, Sec. 3.1, Eq. 3) needs the teacher's distribution q(. | s, t_<j) at every target
position. Online, the teacher runs forward at every training step of every epoch, beside the student. Stored, one
teacher-forced pass over the training targets keeps, per position, the k most probable tokens (ids in the smallest
integer type that holds the vocabulary, log-probabilities in float16) and the log of the probability the k leave
out (the *tail*); training then needs no teacher at all.

The approximation (:func:`hf_seqkd.losses.stored_token_divergence`): both distributions are grouped into the
same k + 1 buckets, the teacher's k tokens and "every other token". The teacher's buckets are its k stored
probabilities and its tail; the student's are its probabilities of the teacher's k tokens and one minus their sum.
The divergence (forward or reverse KL, generalised JSD, TVD: all f-divergences) is taken between the two bucket
distributions. Grouping never increases an f-divergence (the data-processing inequality, Csiszar 1967), so the
stored loss is a lower bound of the full one, equal to it when k covers the vocabulary; the tail bucket keeps the
mass the top-k leave out, which renormalising over the top-k would drop. Log-probabilities are taken at
the run's temperature T before the top-k is chosen (the temperature is stored with each row and checked).

:func:`build_teacher_distributions` does the one pass with the Seq-KD corpus's machinery (:mod:`hf_seqkd.seqkd`):
shards of rows, length-sorted batches, each finished shard kept under a fingerprint of the teacher, the token ids
and the settings in ``cache_dir``, so an interrupted build resumes, and shard ``i`` built by process ``i % N``.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from datasets import Dataset, concatenate_datasets
from datasets.table import InMemoryTable

from .data import STORED_COLUMNS, decoder_inputs_from_labels
from .losses import StoredDistributions, _safe_logsumexp
from .seqkd import (
    _assemble,
    _ctranslate2_fingerprint,
    _has_accelerator,
    _is_ctranslate2,
    _resolve_dtype,
    _ShardStore,
    _write_parquet_atomic,
    _write_text_atomic,
    build_missing_shards,
    model_fingerprint,
)

__all__ = ["STORED_COLUMNS", "build_teacher_distributions", "has_teacher_distributions", "stored_distributions"]

_FORMAT_VERSION = 1
_RESULT_FILE = "result.parquet"


def has_teacher_distributions(dataset) -> bool:
    """The dataset carries stored teacher distributions (every column of :data:`STORED_COLUMNS`)."""
    return dataset is not None and all(c in dataset.column_names for c in STORED_COLUMNS)


# ------------------------------------------------------------------------------------------------- the builder
def _id_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= np.iinfo(np.uint16).max + 1 else pa.int32()


def _nested(values: np.ndarray, lengths: list[int], k: int, value_type: pa.DataType) -> pa.Array:
    """Rows of ``lengths[i]`` positions x ``k`` values, as ``list<list<value_type>>``."""
    inner_offsets = pa.array(np.arange(0, values.size + 1, k, dtype=np.int32))
    inner = pa.ListArray.from_arrays(inner_offsets, pa.array(values.reshape(-1), type=value_type))
    outer_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(outer_offsets, inner)


def _transformers_logits(teacher, input_ids, labels, rows, pad_id: int) -> torch.Tensor:
    """``(rows, longest label, V)`` logits of a teacher-forced pass over ``rows``."""
    device = next(teacher.parameters()).device
    width_src = max(len(input_ids[i]) for i in rows)
    width_tgt = max(max(len(labels[i]) for i in rows), 1)
    src = torch.full((len(rows), width_src), pad_id, dtype=torch.long)
    mask = torch.zeros_like(src)
    tgt = torch.full((len(rows), width_tgt), -100, dtype=torch.long)
    for b, i in enumerate(rows):
        src[b, :len(input_ids[i])] = torch.as_tensor(input_ids[i])
        mask[b, :len(input_ids[i])] = 1
        tgt[b, :len(labels[i])] = torch.as_tensor(labels[i])
    return teacher(input_ids=src.to(device), attention_mask=mask.to(device),
                   decoder_input_ids=decoder_inputs_from_labels(teacher, tgt).to(device)).logits


def _ctranslate2_logits(translator, input_ids, labels, rows) -> torch.Tensor:
    """The same from a CTranslate2 teacher: greedy decoding forced through each label sequence
    (``target_prefix`` = the labels but the last, ``min_decoding_length=0`` so that ``</s>`` is allowed at the first
    step), whose full-vocabulary logits at every step (``return_logits_vocab``) are the teacher-forced ones. A
    model exported by :func:`hf_seqkd.export.to_ctranslate2` bans ``<pad>`` (Transformers' forward does not)."""
    tokenizer = translator.tokenizer
    sources = [tokenizer.convert_ids_to_tokens(list(input_ids[i])) for i in rows]
    prefixes = [tokenizer.convert_ids_to_tokens(list(labels[i][:-1])) for i in rows]
    width = max(max(len(labels[i]) for i in rows), 1)
    try:
        results = translator.translator.translate_batch(
            sources, target_prefix=prefixes, beam_size=1, max_decoding_length=width, min_decoding_length=0,
            return_logits_vocab=True)
    except TypeError as e:  # an older CTranslate2 without return_logits_vocab
        import ctranslate2

        raise RuntimeError(f"storing a CTranslate2 teacher's distributions needs translate_batch(return_logits_vocab="
                           f"True), which ctranslate2 {ctranslate2.__version__} does not take ({e}); upgrade it "
                           "(4.8 is tested) or pass the Transformers teacher") from None
    steps = [np.stack([np.asarray(x, dtype=np.float32) for x in r.logits[0]]) for r in results]
    out = torch.zeros(len(rows), width, steps[0].shape[-1])
    for b, (i, step) in enumerate(zip(rows, steps)):
        n = len(labels[i])
        out[b, :n] = torch.from_numpy(step[:n])
    return out


@torch.inference_mode()
def _shard_distributions(teacher, input_ids, labels, first_row: int, *, top_k: int, temperature: float,
                         vocab_size: int, batch_size: int, pad_id: int, progress) -> pa.Table:
    """One teacher-forced pass over a shard's rows (length-sorted batches); a table in row order."""
    order = sorted(range(len(labels)), key=lambda i: -(len(input_ids[i]) + len(labels[i])))
    per_row: dict[int, tuple] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        logits = (_ctranslate2_logits(teacher, input_ids, labels, rows) if _is_ctranslate2(teacher)
                  else _transformers_logits(teacher, input_ids, labels, rows, pad_id))
        log_probs = torch.log_softmax(logits[..., :vocab_size].float() / temperature, dim=-1)
        top, ids = log_probs.topk(top_k, dim=-1)
        tail = _safe_logsumexp(log_probs.scatter(-1, ids, float("-inf")))
        for b, i in enumerate(rows):
            n = len(labels[i])
            per_row[i] = (ids[b, :n].cpu().numpy(), top[b, :n].cpu().numpy(), tail[b, :n].cpu().numpy())
        progress.update(len(rows))
    lengths = [len(labels[i]) for i in range(len(labels))]
    ids_all = np.concatenate([per_row[i][0] for i in range(len(labels))]) if labels else np.zeros((0, top_k))
    top_all = np.concatenate([per_row[i][1] for i in range(len(labels))]) if labels else np.zeros((0, top_k))
    tail_all = np.concatenate([per_row[i][2] for i in range(len(labels))]) if labels else np.zeros(0)
    tail_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    id_type = _id_type(vocab_size)
    return pa.table({
        "_row": pa.array(np.arange(first_row, first_row + len(labels), dtype=np.int64)),
        "teacher_topk_ids": _nested(ids_all.astype(id_type.to_pandas_dtype()), lengths, top_k, id_type),
        "teacher_topk_logprobs": _nested(top_all.astype(np.float16), lengths, top_k, pa.float16()),
        "teacher_tail_logprob": pa.ListArray.from_arrays(tail_offsets, pa.array(tail_all.astype(np.float16),
                                                                                type=pa.float16())),
        "teacher_distribution_temperature": pa.array(np.full(len(labels), temperature, dtype=np.float32)),
    })


def _fingerprint(teacher, input_ids, labels, settings: dict, teacher_fingerprint: str | None) -> str:
    if teacher_fingerprint is None:
        teacher_fingerprint = (_ctranslate2_fingerprint(teacher) if _is_ctranslate2(teacher)
                               else model_fingerprint(teacher))
    h = hashlib.sha256()
    h.update(f"hf_seqkd.teacher_distributions v{_FORMAT_VERSION}".encode())
    h.update(teacher_fingerprint.encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(len(labels).to_bytes(8, "little"))
    for column in (input_ids, labels):
        for ids in column:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def build_teacher_distributions(dataset, teacher, *, top_k: int = 32, temperature: float = 1.0,
                                vocab_size: int | None = None, batch_size: int = 32,
                                cache_dir: str | os.PathLike | None = None, shard_size: int = 1000,
                                dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                                accelerator=None, show_progress: bool = True,
                                teacher_fingerprint: str | None = None) -> Dataset:
    """The teacher's top-k next-token distributions at every position of each row's ``labels`` (module docstring).

    One teacher-forced pass (no generation): the decoder sees ``labels`` shifted right, as the student will while
    training, so the stored distributions are those online word-level KD would compute for the same target. For
    Seq-KD + Word-KD (Kim & Rush's strongest combination) tokenize the ``teacher_target`` column into ``labels``
    first (:func:`hf_seqkd.prepare_distillation_dataset` does; :class:`hf_seqkd.DistillationTrainer` with
    ``teacher_distributions="stored"`` does all of it).

    Added columns (:data:`STORED_COLUMNS`): ``teacher_topk_ids`` ``(positions, k)`` (uint16 when the vocabulary
    has at most 65,536 entries, else int32), ``teacher_topk_logprobs`` ``(positions, k)`` float16 log-probabilities
    at ``temperature``, best first, ``teacher_tail_logprob`` ``(positions,)`` float16 log of the probability the k
    leave out, and ``teacher_distribution_temperature`` (one float per row). Storage: ``4k + 2`` bytes per target
    token (130 at k = 32).

    Args:
        dataset: a tokenized ``datasets.Dataset`` with ``input_ids`` and ``labels`` (lists of ids, no padding).
        teacher: the teacher, a seq2seq ``PreTrainedModel`` (used in eval mode; a dtype change happens on a copy), or
            a :class:`~hf_seqkd.export.CTranslate2Translator`: greedy decoding forced through the labels returns the
            full-vocabulary logits of every step (``return_logits_vocab``), the teacher-forced distributions (tested
            against Transformers'; ``<pad>``, banned by the exporter, gets none); ``dtype``/``device`` do not apply.
        top_k: k, the tokens kept per position (at most the vocabulary).
        temperature: the softmax temperature of the stored log-probabilities (that of the training run).
        vocab_size: keep the first ``vocab_size`` logits (the vocabulary shared with the student when a model's
            is padded); default: all of the teacher's.
        batch_size: rows per teacher forward pass (length-sorted within a shard).
        cache_dir: where finished shards and the result are kept (``cache_dir/<sha256>/``) for reuse and resumption;
            ``None`` keeps nothing (single process only).
        shard_size: rows per shard (the unit of saving, resuming and splitting over processes).
        dtype: the teacher's dtype for the pass; default its own (bf16/fp16 on CUDA).
        device: where to run; default the accelerate state's device.
        accelerator: an ``accelerate.Accelerator`` / ``PartialState`` (default ``PartialState()``).
        show_progress: a progress bar on each node's main process.
        teacher_fingerprint: identifies the teacher for the cache instead of hashing its weights.

    Returns:
        ``dataset`` (every row, in order) with the four columns added (existing ones of those names replaced).

    Raises:
        TypeError: ``dataset`` is not a ``datasets.Dataset``.
        ValueError: no ``input_ids`` / ``labels`` columns, an empty dataset, ``top_k`` outside ``1..vocabulary``,
            a temperature that is not a finite number > 0, ``batch_size < 1``, ``vocab_size`` above the teacher's,
            -100 inside a row's labels (only trailing padding), several processes without a shared ``cache_dir``.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"build_teacher_distributions needs a datasets.Dataset, got {type(dataset).__name__}")
    missing = [c for c in ("input_ids", "labels") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"build_teacher_distributions needs tokenized data: column(s) {missing} missing (columns: "
                         f"{dataset.column_names}); tokenize with hf_seqkd.prepare_distillation_dataset first")
    if len(dataset) == 0:
        raise ValueError("build_teacher_distributions: the dataset is empty")
    if hasattr(teacher, "module") and not hasattr(teacher, "generate"):
        teacher = teacher.module
    rows = (len(teacher.tokenizer) if _is_ctranslate2(teacher) else teacher.get_output_embeddings().weight.shape[0])
    vocab = int(rows if vocab_size is None else vocab_size)
    if not 1 <= vocab <= rows:
        raise ValueError(f"vocab_size={vocab_size}: the teacher has {rows} output entries; keep at most that many")
    try:
        top_k = operator.index(top_k) if not isinstance(top_k, bool) else None
    except TypeError:
        top_k = None
    if top_k is None or not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k!r}: keep between 1 and the vocabulary size ({vocab}) tokens per position")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of rows, got {batch_size!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    state = accelerator if accelerator is not None else PartialState(cpu=not _has_accelerator())
    if state.num_processes > 1 and cache_dir is None:
        raise ValueError(f"build_teacher_distributions runs on {state.num_processes} processes: pass a cache_dir on "
                         "a file system all of them share; the processes exchange their shards through it")
    device = torch.device(device) if device is not None else torch.device(state.device)
    dtype = _resolve_dtype(dtype, device, teacher)
    input_ids = [list(ids) for ids in dataset["input_ids"]]
    labels = [_unpadded(row, i) for i, row in enumerate(dataset["labels"])]
    settings = {"top_k": top_k, "temperature": float(temperature), "vocab_size": vocab, "dtype": str(dtype)}

    store, result_path = _ShardStore(None), None
    if cache_dir is not None:
        directory = os.path.join(os.fspath(cache_dir), _fingerprint(teacher, input_ids, labels, settings,
                                                                    teacher_fingerprint))
        result_path = os.path.join(directory, _RESULT_FILE)
        if os.path.exists(result_path):
            return _attach(dataset, pq.read_table(result_path))
        os.makedirs(directory, exist_ok=True)
        if state.is_main_process:
            _write_text_atomic(json.dumps(dict(settings, num_rows=len(labels)), indent=2),
                               os.path.join(directory, "settings.json"))
        store = _ShardStore(directory)
    pad_id = getattr(getattr(teacher, "config", None), "pad_token_id", None) or 0

    def distributions_shard(model, start, end, progress):
        return _shard_distributions(model, input_ids[start:end], labels[start:end], start, top_k=top_k,
                                    temperature=temperature, vocab_size=vocab, batch_size=batch_size, pad_id=pad_id,
                                    progress=progress)

    build_missing_shards(teacher, distributions_shard, store, state, len(labels), shard_size, device=device,
                         dtype=dtype, desc="teacher distributions", show_progress=show_progress)
    result = _assemble(store, len(labels), shard_size, cache_dir)
    if result_path is not None and state.is_main_process:
        _write_parquet_atomic(result, result_path)
    return _attach(dataset, result)


def _unpadded(row, index: int) -> list[int]:
    """A row's labels without trailing -100 padding; -100 anywhere else would shift the positions (an error)."""
    row = list(row)
    while row and row[-1] == -100:
        row.pop()
    if -100 in row:
        raise ValueError(f"build_teacher_distributions: row {index}'s labels have -100 before the end ({row}); the "
                         "stored distributions follow the label positions, so only trailing padding can be -100")
    return row


def _attach(dataset, table) -> Dataset:
    stored = Dataset(InMemoryTable(table.select(list(STORED_COLUMNS))))
    kept = dataset.remove_columns([c for c in STORED_COLUMNS if c in dataset.column_names])
    return concatenate_datasets([kept, stored], axis=1)


def stored_distributions(batch: dict, tail: str = "bucket") -> StoredDistributions:
    """The :class:`~hf_seqkd.losses.StoredDistributions` of a collated batch (its padded stored columns)."""
    return StoredDistributions(batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                               batch["teacher_tail_logprob"], tail)
