"""Decoding with a Transformers model: the generation settings shared by the Seq-KD corpus and the evaluation, the
limits a model can represent, and the K-best translations with their length-normalised log-probabilities.

A sequence's score is what Transformers' beam search ranks by, ``sum_t log p(y_t | y_<t, x) / |y|`` (the processed
log-probabilities of the generated tokens, ``</s>`` included, ``length_penalty=1.0``). :class:`ScoreRecorder` keeps
one value per continuation the search considers, so memory grows with the batch, not with the vocabulary times the
output length as ``output_scores=True`` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .languages import target_token_id

__all__ = ["GenerationSettings", "SEQKD_LENGTH_PENALTY", "max_target_positions", "max_source_positions",
           "cap_max_new_tokens", "encode_sources", "translate", "generate_kbest", "ScoreRecorder"]

# Beam search ranks and scores hypotheses by sum(log p) / length ** length_penalty. With 1.0 the score is the
# per-token mean log-probability, reported as ``teacher_score``; it is passed explicitly so that a teacher's own
# generation config (e.g. length_penalty=0.6) cannot silently change what the score means.
SEQKD_LENGTH_PENALTY = 1.0


@dataclass
class GenerationSettings:
    """How a model decodes, like ``transformers.GenerationConfig``, with the same names: one object for the Seq-KD
    corpus (:func:`hf_seqkd.build_seqkd_dataset`) and the recipes' flags of the same names.

    Args:
        num_beams: beam size (1 = greedy search; Kim & Rush 2016 used 5 for Seq-KD).
        num_return_sequences: K, the size of the K-best list (``1 <= K <= num_beams``; Seq-Inter needs ``K > 1``,
            the paper used 35).
        max_new_tokens: the longest translation, in tokens (capped at the model's position table).
        generation_batch_size: the most sentences per ``generate`` call.
        max_tokens_per_batch: a token budget per call, counted as sentences x longest source (tokens) x
            ``num_beams``; ``None``: ``generation_batch_size`` only.
        forced_bos_token_id: the token forced as the first generated one (a multilingual model's target language,
            :class:`hf_seqkd.languages.Languages`); ``None``: the model's own generation config decides.

    Raises:
        ValueError: a value out of range, or ``num_return_sequences > num_beams`` (beam search returns at most
            ``num_beams`` hypotheses: raise ``num_beams``, nothing does it silently).
    """

    num_beams: int = 5
    num_return_sequences: int = 1
    max_new_tokens: int = 128
    generation_batch_size: int = 64
    max_tokens_per_batch: int | None = None
    forced_bos_token_id: int | None = None

    def __post_init__(self):
        for name in ("num_beams", "num_return_sequences", "max_new_tokens", "generation_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences must be between 1 and num_beams={self.num_beams}, got "
                             f"{self.num_return_sequences}: beam search returns at most num_beams hypotheses; set "
                             f"num_beams to at least {self.num_return_sequences} (Kim & Rush's Seq-Inter: a beam "
                             "of 35 for a 35-best list)")
        if self.max_tokens_per_batch is not None and (not isinstance(self.max_tokens_per_batch, int)
                                                      or self.max_tokens_per_batch < 1):
            raise ValueError(f"max_tokens_per_batch must be a positive integer or None, got "
                             f"{self.max_tokens_per_batch!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ generation limits
def max_target_positions(model) -> int | None:
    """The longest decoder input ``model`` can represent (its position table), or ``None`` when it has no fixed
    one (T5's relative positions). A translation of ``n`` new tokens feeds the decoder ``n`` positions (the start
    token and the first ``n - 1`` outputs), so ``max_new_tokens`` may be at most this."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None) if config is not None else None
    return int(value) if value else None


def max_source_positions(model, tokenizer=None) -> int | None:
    """The longest source ``model`` (and ``tokenizer``'s ``model_max_length``, when it is set) can take."""
    limits = [max_target_positions(model)]
    if tokenizer is not None and (tokenizer.model_max_length or 0) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    limits = [x for x in limits if x]
    return min(limits) if limits else None


def cap_max_new_tokens(model, max_new_tokens: int) -> int:
    """``max_new_tokens`` capped at :func:`max_target_positions`: a runaway translation is cut, never a crash."""
    limit = max_target_positions(model)
    return int(max_new_tokens) if limit is None else min(int(max_new_tokens), limit)


def encode_sources(tokenizer, texts: Sequence[str], model=None, max_length: int | None = None, **kwargs):
    """``tokenizer(texts)`` padded on the right and truncated to ``max_length`` (default: what ``model`` can take).

    Right padding always: with absolute positions (Marian, BART) left padding would shift every position of a
    shorter sentence and make its translation depend on its batch neighbours.
    """
    if max_length is None and model is not None:
        max_length = max_source_positions(model, tokenizer)
    return tokenizer(list(texts), padding=True, padding_side="right", truncation=max_length is not None,
                     max_length=max_length, **kwargs)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _force_target_language(tokenizer, generate_kwargs: dict) -> None:
    bos = target_token_id(tokenizer, generate_kwargs.get("forced_bos_token_id"))
    if bos is not None:
        generate_kwargs["forced_bos_token_id"] = bos


# ---------------------------------------------------------------------------------------------- translate
@torch.inference_mode()
def translate(model, tokenizer, sources: Sequence[str], *, num_beams: int = 1, batch_size: int = 32,
              max_new_tokens: int = 128, source_prefix: str = "", sort_by_length: bool = True,
              show_progress: bool = False, **generate_kwargs) -> tuple[list[str], int]:
    """Translate ``sources``; returns (hypotheses in input order, number of generated tokens).

    Batches are formed from length-sorted sources when ``sort_by_length`` (less padding), order is restored; the
    length limit is capped at the model's position table and sources are truncated to what it can take. Without a
    ``forced_bos_token_id`` the tokenizer's ``tgt_lang`` (NLLB, M2M100, mBART-50) is forced.
    """

    model.eval()
    _force_target_language(tokenizer, generate_kwargs)
    device = _device_of(model)
    max_new_tokens = cap_max_new_tokens(model, max_new_tokens)
    texts = [source_prefix + s for s in sources]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort_by_length else list(range(len(texts)))
    hypotheses: list[str | None] = [None] * len(texts)
    generated = 0
    pad = tokenizer.pad_token_id
    bar = tqdm(total=len(texts), desc="translating", unit="sent", disable=not show_progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = encode_sources(tokenizer, [texts[i] for i in idx], model, return_tensors="pt").to(device)
        out = model.generate(**enc, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False,
                             **generate_kwargs)
        out = out[:, 1:]  # drop the decoder start token
        generated += int(out.ne(pad).sum().item())
        for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True)):
            hypotheses[i] = text.strip()
        bar.update(len(idx))
    bar.close()
    return hypotheses, generated


# ------------------------------------------------------------------------------------- K-best with scores
class ScoreRecorder:
    """Records the processed log-probability of every continuation a search considers, so that the chosen tokens'
    log-probabilities can be read back after ``generate`` without ``output_scores=True`` (which keeps every step's
    rows x vocabulary scores) and without a per-step top-k over the vocabulary.

    Two hooks of ``generate`` share it: :attr:`processor`, a logits processor appended after the model's own, holds a
    reference to the step's scores and the rows they extend; :attr:`criterion`, a stopping criterion (it never
    stops), is called once per step with the continuations the search considers (beam search: the best
    ``(1 + number of </s> ids) * num_beams`` of each sentence; greedy: one per row), their new token last. Each
    continuation's value is read from the row whose tokens are its prefix (rows with equal prefixes have equal
    scores), and the step's scores are let go: at most one step's scores are alive at a time, and per step one
    value per continuation is kept.

    The values are what beam search ranks by (log-softmax, then the processors; renormalised again when the
    generation config says ``renormalize_logits``) and, for greedy search, the log-softmax of the processed logits
    whose argmax is taken (as ``compute_transition_scores(normalize_logits=True)`` computes it).

    Args:
        num_beams: the search's beam size (1: greedy).
        normalize: take the log-softmax of the recorded rows (greedy search, or ``renormalize_logits``).
    """

    def __init__(self, num_beams: int, normalize: bool):
        self.num_beams, self.normalize = int(num_beams), bool(normalize)
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (parent rows, tokens, values)
        self._rows = self._scores = None
        self.processor, self.criterion = _RecorderProcessor(self), _RecorderCriterion(self)

    def _hold(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        self._rows, self._scores = input_ids.clone(), scores

    def _record(self, continuations: torch.Tensor) -> None:
        rows, scores = self._rows, self._scores
        self._rows = self._scores = None
        if scores is None:
            return
        sentences = rows.shape[0] // self.num_beams
        prefix, tokens = continuations[:, :-1], continuations[:, -1]
        per_sentence = continuations.shape[0] // sentences
        same = (prefix.view(sentences, per_sentence, 1, -1) == rows.view(sentences, 1, self.num_beams, -1)).all(-1)
        first = torch.arange(sentences, device=rows.device).unsqueeze(1) * self.num_beams
        parents = torch.where(same.any(-1), first + same.int().argmax(-1), -1).view(-1)
        values = scores[parents.clamp(min=0), tokens].float()
        if self.normalize:  # log_softmax(x) = x - logsumexp(x), without a rows x vocabulary copy
            values = values - _logsumexp_rows(scores)[parents.clamp(min=0), 0]
        self.steps.append((parents, tokens, torch.where(parents >= 0, values, float("nan"))))

    def token_log_probs(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The recorded log-probability of ``tokens[s, t]`` at step ``t`` as a continuation of row ``rows[s, t]``
        (``-1``: no step), ``(sequences, steps)``; ``nan`` where that continuation was not recorded."""
        out = torch.full(tokens.shape, float("nan"))
        for t in range(min(tokens.shape[1], len(self.steps))):
            parents, candidates, values = (x.cpu() for x in self.steps[t])
            valid = rows[:, t] >= 0
            hit = (parents == rows[valid, t].unsqueeze(-1)) & (candidates == tokens[valid, t].unsqueeze(-1))
            out[valid, t] = torch.where(hit.any(-1), values[hit.int().argmax(-1)], float("nan"))
        return out


class _RecorderProcessor(LogitsProcessor):
    def __init__(self, recorder: ScoreRecorder):
        self.recorder = recorder

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.recorder._hold(input_ids, scores)
        return scores


class _RecorderCriterion(StoppingCriteria):
    def __init__(self, recorder: ScoreRecorder):
        self.recorder = recorder

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.recorder._record(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _logsumexp_rows(scores: torch.Tensor, rows_per_chunk: int = 64) -> torch.Tensor:
    """``logsumexp`` over the vocabulary in float32, ``(rows, 1)``, a few rows at a time (bounded temporaries)."""
    return torch.cat([torch.logsumexp(scores[i:i + rows_per_chunk].float(), dim=-1, keepdim=True)
                      for i in range(0, scores.shape[0], rows_per_chunk)])


class _SelfAttentionReorderingCache(EncoderDecoderCache):
    """An encoder-decoder cache whose beam-search reordering leaves the cross-attention part alone: the
    cross-attention keys and values are the same for every beam of a sentence and beam search never moves a row to
    another sentence, so reordering them is an expensive identity (bit for bit the same result)."""

    def reorder_cache(self, beam_idx):
        self.self_attention_cache.reorder_cache(beam_idx)


# generate's keyword for a cache object: "cache" since Transformers 5.x (where "past_key_values" is deprecated)
_CACHE_KWARG = "cache" if "cache" in getattr(__import__("transformers.generation.utils", fromlist=["x"]),
                                             "ALL_CACHE_NAMES", []) else "past_key_values"


def _beam_search_cache(model):
    if not getattr(model.config, "is_encoder_decoder", False):
        return None
    return _SelfAttentionReorderingCache(DynamicCache(config=model.config), DynamicCache(config=model.config))


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else model.config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


@torch.inference_mode()
def generate_kbest(model, tokenizer, texts: list[str], generation: GenerationSettings,
                   max_source_length: int | None = None,
                   **generate_kwargs) -> tuple[list[list[str]], list[list[float]]]:
    """One ``generate`` call: per text, its ``num_return_sequences``-best translations (best first) and their
    length-normalised log-probabilities (module docstring), without keeping per-step full scores.

    Args:
        model: an encoder-decoder ``PreTrainedModel`` in eval mode.
        tokenizer: encodes ``texts`` (right padding) and decodes the outputs.
        texts: the sources (prefix already applied).
        generation: beam size, K, length limit.
        max_source_length: truncate sources to this (default: what the model can take).
        **generate_kwargs: further ``generate`` arguments (``forced_bos_token_id``, ...).
    """
    enc = encode_sources(tokenizer, texts, model, max_length=max_source_length, return_tensors="pt")
    beams = generation.num_beams
    eos = _eos_ids(model)
    recorder = ScoreRecorder(beams, normalize=beams == 1 or bool(getattr(model.generation_config,
                                                                         "renormalize_logits", False)))
    cache = _beam_search_cache(model) if beams > 1 else None
    if generation.forced_bos_token_id is not None:
        generate_kwargs.setdefault("forced_bos_token_id", generation.forced_bos_token_id)
    _force_target_language(tokenizer, generate_kwargs)
    out = model.generate(
        input_ids=enc["input_ids"].to(model.device), attention_mask=enc["attention_mask"].to(model.device),
        **({_CACHE_KWARG: cache} if cache is not None else {}),
        num_beams=beams, num_return_sequences=generation.num_return_sequences,
        max_new_tokens=cap_max_new_tokens(model, generation.max_new_tokens),  # a runaway output is cut, not a crash
        do_sample=False, length_penalty=SEQKD_LENGTH_PENALTY, use_cache=True,
        logits_processor=LogitsProcessorList([recorder.processor]),
        stopping_criteria=StoppingCriteriaList([recorder.criterion]), return_dict_in_generate=True,
        output_scores=False,
        **generate_kwargs)
    sequences = out.sequences.cpu()
    generated = sequences[:, 1:]  # after the decoder start token
    if beams > 1:
        rows = out.beam_indices.cpu()[:, :generated.shape[1]]
    else:  # greedy: row s is row s at every step; stop after the first </s>
        is_eos = torch.isin(generated, torch.tensor(eos)).int()
        before_end = (is_eos.cumsum(dim=1) - is_eos) == 0
        rows = torch.where(before_end, torch.arange(len(generated)).unsqueeze(1), -1)
    token_log_probs = recorder.token_log_probs(generated, rows)
    counted = rows >= 0
    if torch.isnan(token_log_probs[counted]).any():  # cannot happen (see ScoreRecorder); loud if it ever does
        raise RuntimeError("generate_kbest: a chosen token was not among the recorded candidates")
    scores = (torch.where(counted, token_log_probs, 0.0).sum(1) / counted.sum(1).clamp(min=1)).tolist()
    decoded = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    k = generation.num_return_sequences
    return ([decoded[i * k:(i + 1) * k] for i in range(len(texts))],
            [scores[i * k:(i + 1) * k] for i in range(len(texts))])
