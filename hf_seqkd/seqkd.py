"""Sequence-level knowledge distillation data: the teacher translates the training set with beam search.

Kim & Rush (2016), "Sequence-Level Knowledge Distillation":

* Sec. 3.2 (Seq-KD): run the teacher's beam search over every training source and train the student on the
  1-best output instead of (or next to) the reference. :func:`build_seqkd_dataset` adds the columns
  ``teacher_target`` (the 1-best text) and ``teacher_score`` (its length-normalised log-probability).
* Sec. 3.3 (Seq-Inter): keep the K-best list and train on the candidate closest to the reference (smoothed
  sentence BLEU in the paper). ``num_return_sequences=K`` adds ``teacher_nbest``/``teacher_nbest_scores``;
  ``seq_inter=True`` adds ``seq_inter_target``, chosen by :func:`select_seq_inter`.

How :func:`build_seqkd_dataset` does the work
---------------------------------------------
1. The rows are cut into shards of ``shard_size`` consecutive rows (original order). Shard ``i`` belongs to
   process ``i % num_processes`` (torchrun / accelerate), so processes never share work.
2. Inside a shard the sources are tokenized once, sorted by token length (longest first) and cut into
   pre-formed batches of at most ``batch_size`` sentences and ``max_tokens_per_batch`` tokens (padded source
   tokens x ``num_beams``). Similar lengths mean little padding and, because beam search runs until the
   longest output of a batch is done, few wasted decoder steps.
3. The generation itself is a ``datasets.Dataset.map(batched=True, batch_size=1)`` over a small dataset
   whose rows *are* those batches (columns ``_rows``/``_sources``/``_targets``); each call runs one
   ``teacher.generate`` and returns one output row per sentence (a batched map may return more rows than it
   was given). The shard's rows are then put back in their original order.
4. With ``cache_dir`` every finished shard is written to ``cache_dir/<fingerprint>/`` (tmp file, then
   ``os.replace``: a shard file is complete or absent), so a killed run resumes from its finished shards.
   After all processes are done (``wait_for_everyone``) each process assembles the same result from the
   shards and the main process writes ``result.parquet``; a rerun with the same inputs just loads that.
   The fingerprint (sha256) covers every byte of the teacher's weights, its config and generation config,
   the tokenizer, the source texts (and target texts for Seq-Inter) and every setting that changes the
   output. Batching settings (``batch_size``, ``max_tokens_per_batch``, ``sort_by_length``, ``shard_size``)
   are performance knobs and not part of it: with attention masks a sentence's beam search does not depend
   on its batch neighbours (up to float rounding, see the tests). Shard files are named by their row range,
   so resuming with a different ``shard_size`` regenerates the shards (the old files are ignored).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import DynamicCache, EncoderDecoderCache

from .evaluation import cap_max_new_tokens, max_source_positions

__all__ = [
    "build_seqkd_dataset",
    "select_seq_inter",
    "make_length_batches",
    "model_fingerprint",
    "SEQKD_LENGTH_PENALTY",
]

# Beam search ranks and scores hypotheses by sum(log p) / length ** length_penalty (HF generate, where the
# length counts the generated tokens including </s>). With 1.0 the score is the per-token mean log-probability,
# the "length-normalised" score reported as ``teacher_score``; it is passed explicitly so a teacher's own
# generation_config (e.g. length_penalty=0.6) cannot silently change what the score means.
SEQKD_LENGTH_PENALTY = 1.0

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
        from sacrebleu.metrics import BLEU, CHRF

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
    for name, tensor in sorted(model.state_dict().items()):
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
    import tempfile

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


class _SelfAttentionReorderingCache(EncoderDecoderCache):
    """An encoder-decoder cache whose beam-search reordering leaves the cross-attention part alone (see
    :func:`_beam_search_cache`)."""

    def reorder_cache(self, beam_idx):
        self.self_attention_cache.reorder_cache(beam_idx)


@dataclass
class _GenerationSettings:
    num_beams: int
    num_return_sequences: int
    max_new_tokens: int
    max_source_length: int | None
    seq_inter: bool
    seq_inter_metric: str
    bleu_tokenize: str = "13a"


def _beam_search_cache(model):
    """A fresh KV cache for one beam-search ``generate`` call of an encoder-decoder model, or ``None``.

    After every step, beam search reorders the whole cache along the rows (``beam_idx``). The cross-attention keys
    and values are the same for every beam of a sentence (computed from its encoder output, which ``generate``
    copies ``num_beams`` times), and the reordering never moves a row to another sentence, so reordering them is an
    expensive identity: this cache reorders the self-attention part only. The result is bit for bit the same; the
    time saved was about 3% of beam search for a 3-layer Marian teacher on a CPU (``bench/RESULTS.md``).
    """
    if not getattr(model.config, "is_encoder_decoder", False):
        return None
    return _SelfAttentionReorderingCache(DynamicCache(config=model.config), DynamicCache(config=model.config))


def _is_ctranslate2(teacher) -> bool:
    from .export import CTranslate2Translator

    return isinstance(teacher, CTranslate2Translator)


def _translate_ctranslate2(translator, tokenizer, texts: list[str], cfg: _GenerationSettings):
    """One ``translate_batch`` call of a CTranslate2 teacher, with the same outputs as :func:`_translate`.

    The scores are CTranslate2's with ``length_penalty=1.0``: the summed log-probabilities divided by the number of
    generated tokens including ``</s>``, the same definition as Transformers' ``sequences_scores`` (measured: equal
    to 1e-5 for a converted Marian in float32).
    """
    ids = tokenizer(texts, truncation=cfg.max_source_length is not None, max_length=cfg.max_source_length)["input_ids"]
    results = translator.translator.translate_batch(
        [tokenizer.convert_ids_to_tokens(x) for x in ids], max_batch_size=len(texts), beam_size=cfg.num_beams,
        num_hypotheses=cfg.num_return_sequences, max_decoding_length=cfg.max_new_tokens,
        length_penalty=SEQKD_LENGTH_PENALTY, return_scores=True,
        max_input_length=0)
    nbest = [tokenizer.batch_decode([tokenizer.convert_tokens_to_ids(h) for h in r.hypotheses],
                                    skip_special_tokens=True) for r in results]
    return nbest, [[float(x) for x in r.scores] for r in results]


@torch.inference_mode()
def _translate(model, tokenizer, texts: list[str], cfg: _GenerationSettings):
    """One ``generate`` call: per text, its K-best translations and their length-normalised log-probs."""
    if _is_ctranslate2(model):
        return _translate_ctranslate2(model, tokenizer, texts, cfg)
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                    truncation=cfg.max_source_length is not None, max_length=cfg.max_source_length)
    cache = _beam_search_cache(model) if cfg.num_beams > 1 else None
    out = model.generate(
        input_ids=enc["input_ids"].to(model.device),
        attention_mask=enc["attention_mask"].to(model.device),
        **({"past_key_values": cache} if cache is not None else {}),
        num_beams=cfg.num_beams,
        num_return_sequences=cfg.num_return_sequences,
        max_new_tokens=cap_max_new_tokens(model, cfg.max_new_tokens),  # a runaway output is cut, never a crash
        do_sample=False,
        length_penalty=SEQKD_LENGTH_PENALTY,
        use_cache=True,
        output_scores=True,  # beam search returns sequences_scores only together with the step scores
        return_dict_in_generate=True,
    )
    decoded = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
    if cfg.num_beams > 1:
        # sum of the generated tokens' log-probs / (number of generated tokens incl. </s>) ** 1.0
        scores = out.sequences_scores.float().tolist()
    else:
        scores = _greedy_scores(model, out)
    k = cfg.num_return_sequences
    return ([decoded[i * k:(i + 1) * k] for i in range(len(texts))],
            [scores[i * k:(i + 1) * k] for i in range(len(texts))])


def _greedy_scores(model, out) -> list[float]:
    """Mean log-probability of the generated tokens up to and including the first </s> (greedy search)."""
    token_logprobs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    generated = out.sequences[:, -token_logprobs.shape[1]:]
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else model.config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=generated.device)
    is_eos = torch.isin(generated, eos).int()
    keep = (is_eos.cumsum(dim=1) - is_eos) == 0  # positions before or at the first </s>
    total = torch.where(keep, token_logprobs.float(), torch.zeros_like(token_logprobs, dtype=torch.float)).sum(1)
    return (total / keep.sum(dim=1).clamp(min=1)).tolist()


def _generate_batches(batch, *, model, tokenizer, cfg: _GenerationSettings, progress) -> dict[str, list]:
    """``Dataset.map`` function: each input row is one pre-formed batch, each output row one sentence."""
    out: dict[str, list] = {name: [] for name in _output_columns(cfg, with_row=True)}
    targets = batch["_targets"] if cfg.seq_inter else [None] * len(batch["_rows"])
    for rows, texts, refs in zip(batch["_rows"], batch["_sources"], targets):
        nbest, nbest_scores = _translate(model, tokenizer, texts, cfg)
        out["_row"].extend(rows)
        out["teacher_target"].extend(c[0] for c in nbest)
        out["teacher_score"].extend(s[0] for s in nbest_scores)
        if cfg.num_return_sequences > 1:
            out["teacher_nbest"].extend(nbest)
            out["teacher_nbest_scores"].extend(nbest_scores)
        if cfg.seq_inter:
            out["seq_inter_target"].extend(select_seq_inter(c, r, cfg.seq_inter_metric, s, tokenize=cfg.bleu_tokenize)
                                           for c, s, r in zip(nbest, nbest_scores, refs))
        progress.update(len(rows))
    return out


def _output_columns(cfg: _GenerationSettings, with_row: bool = False) -> list[str]:
    names = (["_row"] if with_row else []) + ["teacher_target", "teacher_score"]
    if cfg.num_return_sequences > 1:
        names += ["teacher_nbest", "teacher_nbest_scores"]
    if cfg.seq_inter:
        names += ["seq_inter_target"]
    return names


def _generate_shard(model, tokenizer, sources, targets, first_row: int, cfg: _GenerationSettings, *,
                    batch_size: int, max_tokens_per_batch: int | None, sort_by_length: bool, progress):
    """Translate one shard; returns a pyarrow table with ``_row`` and the output columns, in row order."""
    from datasets import Dataset

    lengths = [len(ids) for ids in tokenizer(sources, truncation=cfg.max_source_length is not None,
                                             max_length=cfg.max_source_length)["input_ids"]]
    batches = make_length_batches(lengths, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
                                  num_beams=cfg.num_beams, sort_by_length=sort_by_length)
    columns = {"_rows": [[first_row + i for i in b] for b in batches],
               "_sources": [[sources[i] for i in b] for b in batches]}
    if cfg.seq_inter:
        columns["_targets"] = [[targets[i] for i in b] for b in batches]
    batch_table = Dataset.from_dict(columns)
    done = batch_table.map(
        _generate_batches,
        fn_kwargs=dict(model=model, tokenizer=tokenizer, cfg=cfg, progress=progress),
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
        import pyarrow.parquet as pq

        return pq.read_table(self._path(start, end))


def _write_parquet_atomic(table, path: str) -> None:
    import pyarrow.parquet as pq

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
        return resolved
    if dtype is not None:
        return dtype
    if device.type == "cuda":  # half precision on GPUs: bf16 where the card has it, else fp16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return next(teacher.parameters()).dtype


def _max_source_length(tokenizer, teacher) -> int | None:
    return max_source_positions(teacher if not _is_ctranslate2(teacher) else None, tokenizer)


def _check_arguments(dataset, *, num_beams, num_return_sequences, max_new_tokens, batch_size,
                     max_tokens_per_batch, shard_size, seq_inter, seq_inter_metric, source_column, target_column):
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        hint = " (pick a split, e.g. dataset['train'])" if hasattr(dataset, "keys") else ""
        raise TypeError(f"build_seqkd_dataset needs a datasets.Dataset, got {type(dataset).__name__}{hint}")
    if source_column not in dataset.column_names:
        raise ValueError(f"build_seqkd_dataset: source column {source_column!r} not in the dataset; "
                         f"available columns: {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("build_seqkd_dataset: the dataset is empty; there is nothing for the teacher to translate")
    for name, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"build_seqkd_dataset: {name} must be a positive integer, got {value!r}")
    if not isinstance(num_return_sequences, int) or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"build_seqkd_dataset: num_return_sequences must be between 1 and num_beams={num_beams}, "
                         f"got {num_return_sequences!r} (beam search returns at most num_beams hypotheses)")
    if max_tokens_per_batch is not None and (not isinstance(max_tokens_per_batch, int) or max_tokens_per_batch < 1):
        raise ValueError(f"build_seqkd_dataset: max_tokens_per_batch must be a positive integer or None, "
                         f"got {max_tokens_per_batch!r}")
    if seq_inter:
        if num_return_sequences < 2:
            raise ValueError("build_seqkd_dataset: seq_inter=True chooses among the teacher's K-best list "
                             "(Kim & Rush 2016, Sec. 3.3) and needs num_return_sequences > 1 "
                             f"(got {num_return_sequences})")
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
    import datasets

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
    *,
    num_beams: int = 5,
    num_return_sequences: int = 1,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    max_tokens_per_batch: int | None = None,
    sort_by_length: bool = True,
    seq_inter: bool = False,
    seq_inter_metric: str = "bleu",
    bleu_tokenize: str = "13a",
    source_column: str = "source",
    target_column: str = "target",
    source_prefix: str = "",
    cache_dir: str | os.PathLike | None = None,
    shard_size: int = 1000,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    accelerator=None,
    show_progress: bool = True,
    teacher_fingerprint: str | None = None,
):
    """Sequence-level KD data: the dataset with the teacher's beam-search translations of its sources.

    Kim & Rush (2016), Sec. 3.2: the student is trained on the teacher's 1-best beam output; Sec. 3.3
    (Seq-Inter): on the K-best candidate closest to the reference. See the module docstring for how the work
    is sharded, batched (``Dataset.map`` over pre-formed length-sorted batches), cached and split over processes.

    Added columns (existing columns of the same names are replaced):

    * ``teacher_target``: the 1-best translation (``tokenizer.batch_decode(..., skip_special_tokens=True)``);
    * ``teacher_score``: its length-normalised log-probability, i.e. the mean log-probability per generated
      token including ``</s>`` (beam search: HF's ``sequences_scores`` with ``length_penalty=1.0``, set
      explicitly; greedy: the same mean from ``compute_transition_scores``, i.e. of the log-softmax of the
      processed logits);
    * with ``num_return_sequences=K > 1``: ``teacher_nbest`` (K texts, best first) and ``teacher_nbest_scores``;
    * with ``seq_inter=True``: ``seq_inter_target`` = :func:`select_seq_inter` of the K-best and the reference.

    Args:
        dataset: a ``datasets.Dataset`` with a text column of sources.
        teacher: an encoder-decoder ``PreTrainedModel`` (a DDP/accelerate wrapper is unwrapped). It is used in
            eval mode under ``torch.inference_mode()``; a device move is undone afterwards and a dtype change
            happens on a copy, so the caller's model is left as it was. Or a
            :class:`hf_seqkd.export.CTranslate2Translator` (the teacher converted with
            :func:`hf_seqkd.export.to_ctranslate2`): CTranslate2's beam search, several times faster on a CPU
            (``bench/generation.py``); the scores have the same definition, ``dtype``/``device`` do not apply.
        tokenizer: the teacher's tokenizer (pads on the right; used to encode sources and decode outputs).
        num_beams: beam size (1 = greedy search).
        num_return_sequences: K, the size of the returned K-best list (``1 <= K <= num_beams``).
        max_new_tokens: the longest translation, in tokens.
        batch_size: the most sentences per ``generate`` call.
        max_tokens_per_batch: token budget per ``generate`` call, counted as sentences x longest source in the
            batch (tokens) x ``num_beams``; ``None`` for no budget (``batch_size`` only). A longer sentence than
            the budget allows gets a batch of its own. Mind the memory: to return ``sequences_scores`` HF keeps
            every step's (sentences x beams x vocabulary) log-probabilities until the call ends.
        sort_by_length: form batches from length-sorted sources (longest first) within each shard; the result
            is always in the original order.
        seq_inter: add ``seq_inter_target`` (needs ``num_return_sequences > 1`` and ``target_column``).
        seq_inter_metric: ``"bleu"`` (smoothed sentence BLEU, as in the paper) or ``"chrf"``.
        bleu_tokenize: sacrebleu's tokenizer for Seq-Inter's sentence BLEU (``"zh"`` for Chinese targets; see
            :func:`hf_seqkd.evaluation.resolve_bleu_tokenize`).
        source_column: the column with the source texts.
        target_column: the column with the references (used by ``seq_inter`` only).
        source_prefix: text put before every source (e.g. ``"translate German to English: "`` for T5).
        cache_dir: where finished shards and the final result are kept (under ``cache_dir/<sha256>/``), for
            reuse and resumption; ``None`` keeps nothing (single process only).
        shard_size: rows per shard, the unit of saving, resuming and splitting over processes.
        dtype: the teacher's dtype during generation (``torch.dtype`` or a name); default: bf16 (fp16 where
            bf16 is unsupported) on CUDA, the teacher's own dtype elsewhere.
        device: where to generate; default: the accelerate state's device (the process's GPU, else the CPU).
        accelerator: an ``accelerate.Accelerator`` (or ``PartialState``) giving the process layout; default:
            ``accelerate.PartialState()`` (``cpu=True`` on machines without an accelerator), which picks up
            torchrun / ``accelerate launch``.
        show_progress: show a tqdm bar (sentences, sentences/s) on each node's main process.
        teacher_fingerprint: a string identifying the teacher for the cache instead of hashing all its weights
            (e.g. a checkpoint id with revision); you are responsible for it changing when the weights do.

    Returns:
        A ``datasets.Dataset``: every input row once, in the original order, with the added columns.

    Raises:
        TypeError: ``dataset`` is not a ``datasets.Dataset``.
        ValueError: a missing source/target column, an empty dataset, invalid sizes, ``seq_inter`` without a
            K-best list or a reference column, several processes without a shared ``cache_dir``.
    """
    from accelerate import PartialState
    from datasets import Dataset, concatenate_datasets
    from datasets.table import InMemoryTable
    from tqdm.auto import tqdm

    _check_arguments(dataset, num_beams=num_beams, num_return_sequences=num_return_sequences,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
                     shard_size=shard_size, seq_inter=seq_inter, seq_inter_metric=seq_inter_metric,
                     source_column=source_column, target_column=target_column)
    # PartialState picks up torchrun / `accelerate launch`; on a machine without an accelerator it needs
    # cpu=True to see a multi-process (gloo) launch at all. An already initialised state is reused as it is.
    state = accelerator if accelerator is not None else PartialState(cpu=not _has_accelerator())
    num_processes, rank = state.num_processes, state.process_index
    if num_processes > 1 and cache_dir is None:
        raise ValueError(f"build_seqkd_dataset runs on {num_processes} processes: pass a cache_dir on a file "
                         f"system all of them share; the processes exchange their shards through it")
    if not hasattr(teacher, "generate") and hasattr(teacher, "module"):
        teacher = teacher.module  # DistributedDataParallel / accelerate wrapper
    device = torch.device(device) if device is not None else torch.device(state.device)
    dtype = _resolve_dtype(dtype, device, teacher)

    sources = _texts(dataset, source_column, source_prefix)
    targets = _texts(dataset, target_column) if seq_inter else None
    cfg = _GenerationSettings(num_beams=num_beams, num_return_sequences=num_return_sequences,
                              max_new_tokens=max_new_tokens, max_source_length=_max_source_length(tokenizer, teacher),
                              seq_inter=seq_inter, seq_inter_metric=seq_inter_metric, bleu_tokenize=bleu_tokenize)
    new_columns = _output_columns(cfg)

    def attach(table):
        generated = Dataset(InMemoryTable(table.select(new_columns)))
        kept = dataset.remove_columns([c for c in new_columns if c in dataset.column_names])
        return concatenate_datasets([kept, generated], axis=1)

    with _datasets_progress_bars_off():
        store = _ShardStore(None)
        if cache_dir is not None:
            settings = dict(vars(cfg), length_penalty=SEQKD_LENGTH_PENALTY, do_sample=False, dtype=str(dtype),
                            source_prefix=source_prefix)
            if not seq_inter:
                settings.pop("seq_inter_metric")
            if not seq_inter or seq_inter_metric != "bleu":
                settings.pop("bleu_tokenize")
            fingerprint = _fingerprint(teacher, tokenizer, sources, targets, settings, teacher_fingerprint)
            directory = os.path.join(os.fspath(cache_dir), fingerprint)
            result_path = os.path.join(directory, _RESULT_FILE)
            if os.path.exists(result_path):  # a finished run with the same inputs: nothing to generate
                import pyarrow.parquet as pq

                return attach(pq.read_table(result_path))
            os.makedirs(directory, exist_ok=True)
            if state.is_main_process:
                _write_text_atomic(json.dumps(dict(settings, num_rows=len(sources)), indent=2, default=str),
                                   os.path.join(directory, "settings.json"))
            store = _ShardStore(directory)

        # Shard i covers rows [i * shard_size, (i + 1) * shard_size) and belongs to process i % num_processes.
        shards = [(start, min(start + shard_size, len(sources))) for start in range(0, len(sources), shard_size)]
        todo = [(s, e) for i, (s, e) in enumerate(shards) if i % num_processes == rank and not store.has(s, e)]
        if todo:
            progress = tqdm(total=sum(e - s for s, e in todo), unit="sent", dynamic_ncols=True,
                            desc=f"teacher beam search (process {rank + 1}/{num_processes})" if num_processes > 1
                            else "teacher beam search",
                            disable=not (show_progress and state.is_local_main_process))
            with _teacher_for_generation(teacher, device, dtype) as model:
                for start, end in todo:
                    table = _generate_shard(model, tokenizer, sources[start:end],
                                            targets[start:end] if seq_inter else None, start, cfg,
                                            batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
                                            sort_by_length=sort_by_length, progress=progress)
                    store.save(start, end, table)
            progress.close()
        state.wait_for_everyone()  # every shard is on disk now

        import pyarrow as pa

        tables = [store.load(s, e) for s, e in shards]
        result = pa.concat_tables([t.cast(tables[0].schema) for t in tables])
        rows = result.column("_row").to_pylist()
        if rows != list(range(len(sources))):
            raise RuntimeError(f"build_seqkd_dataset: the shards do not cover rows 0..{len(sources) - 1} exactly "
                               f"once; the cache under {cache_dir} may be corrupt")
        if cache_dir is not None and state.is_main_process:
            _write_parquet_atomic(result, result_path)
        return attach(result)
