"""Hybrid token/sentence-level distillation (Wei, Sun, Leng, Tan, Yu & Guo 2024, "Sentence-Level or Token-Level?
A Comprehensive Study on Knowledge Distillation", IJCAI).

Wei et al. find token-level KD (the teacher's full next-token distribution) better in "simple" settings and
sentence-level KD (training on the teacher's output sequence) better in "complex" ones, and combine them with a
gate ``g`` (their hybrid method):

    L_hybrid = g * L_token + (1 - g) * L_sentence

* ``L_token`` is word-level KD (Kim & Rush 2016, Sec. 3.1): ``T^2 * D(p_teacher^T || p_student^T)`` at every
  position of the gold target's prefix (the batch ``labels``), computed by
  :func:`hf_seqkd.losses.distillation_loss` with the trainer's ``divergence`` and ``temperature``; per token.
* ``L_sentence`` is the student's cross-entropy on the teacher's argmax output sequence ``y_hat`` (Kim & Rush
  2016, Sec. 3.2), per token of ``y_hat``. ``y_hat`` comes from the ``teacher_labels`` column when the data has
  one (e.g. the tokenized Seq-KD ``teacher_target``); otherwise the teacher decodes the batch greedily and
  :class:`TeacherSequenceCache` keeps the result, keyed by the source token ids, so every sentence is decoded
  once for the whole run. It needs its own student pass with decoder inputs from ``y_hat``.

Gates (:func:`make_hybrid_gate`): ``"scalar"`` (one learned ``g``), ``"input"`` (a ``g`` per sentence computed
from the student's mean-pooled encoder output) or a fixed number. A learned gate is ``lo + (hi - lo) *
sigmoid(z)``. Since ``dL/dg = L_token - L_sentence`` (per sentence for the input gate), a gate trained on the loss
it weights moves towards whichever term is currently smaller; the bounds ``(lo, hi)`` and a separate (small)
learning rate limit how far (measurements: ``docs/hybrid_gate.md``).

In the trainer the hybrid term replaces the word-level term, weighted by ``alpha``:
``L = (1 - alpha - w) * CE(gold) + alpha * L_hybrid + w * L_ckd`` (``w = intermediate_loss_weight``; ``alpha=1``,
``w=0``: the paper's).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .generation import cap_max_new_tokens

__all__ = [
    "DEFAULT_GATE_LR_FACTOR",
    "parse_hybrid_gate",
    "ScalarGate",
    "InputGate",
    "FixedGate",
    "make_hybrid_gate",
    "masked_mean",
    "hybrid_loss",
    "TeacherSequenceCache",
    "sequences_to_labels",
]

GATE_KINDS = ("scalar", "input")

# A learned gate's learning rate when ``hybrid_gate_learning_rate`` is not set: this fraction of the student's
# (measured in bench/hybrid_gate.py, docs/hybrid_gate.md: at the student's rate an input gate saturates at its
# bound within a few hundred steps; at a tenth it moves slowly and still follows the sign of L_token - L_sentence).
DEFAULT_GATE_LR_FACTOR = 0.1


def parse_hybrid_gate(spec) -> str | float | None:
    """``None``, ``"scalar"``, ``"input"`` or a fixed gate value in ``[0, 1]`` (from a string such as ``"0.3"``).

    Args:
        spec: the ``hybrid_gate`` argument.
    """
    if spec is None:
        return None
    if isinstance(spec, str) and spec.strip().lower() in GATE_KINDS:
        return spec.strip().lower()
    try:
        value = float(spec)
    except (TypeError, ValueError):
        raise ValueError(f"hybrid_gate={spec!r}: use 'scalar', 'input' or a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a fixed hybrid_gate must be in [0, 1], got {value}")
    return value


def _logit_for(init: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    if not lo < init < hi:
        raise ValueError(f"hybrid_gate_init={init} must lie strictly inside hybrid_gate_bounds ({lo}, {hi})")
    p = (init - lo) / (hi - lo)
    return math.log(p / (1 - p))


def masked_mean(hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the positions where ``mask`` is set: ``(batch, length, d) -> (batch, d)``.

    Args:
        hidden_states: ``(batch, length, d)``.
        mask: ``(batch, length)``; ``None`` averages over all positions.
    """
    if mask is None:
        return hidden_states.mean(1)
    m = mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * m).sum(1) / m.sum(1).clamp(min=1)


class ScalarGate(nn.Module):
    """One learned gate for the whole corpus: ``g = lo + (hi - lo) * sigmoid(z)``.

    Args:
        init: the initial ``g``, strictly inside ``bounds``.
        bounds: ``(lo, hi)`` with ``0 <= lo < hi <= 1``.
    """

    def __init__(self, init: float = 0.5, bounds: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.logit = nn.Parameter(torch.tensor(_logit_for(init, self.bounds)))

    def extra_repr(self) -> str:
        return f"bounds={self.bounds}"

    def forward(self, encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``g`` repeated for each sentence, ``(batch,)``.

        Args:
            encoder_hidden_states: ``(batch, length, d_s)``; only its batch size is used.
            attention_mask: unused.
        """
        lo, hi = self.bounds
        g = lo + (hi - lo) * torch.sigmoid(self.logit)
        return g.expand(encoder_hidden_states.shape[0])


class InputGate(nn.Module):
    """A gate per sentence from the student's mean-pooled encoder output:
    ``g_b = lo + (hi - lo) * sigmoid(w . mean_t(h_{b,t}) + c)``.

    The pooled states are detached: the gate reads the student's representation but does not train it (the
    student cannot lower its loss by moving the gate). ``w`` starts at zero and ``c`` at the logit of ``init``, so
    every sentence starts at ``g = init``.

    Args:
        hidden_size: the student's width ``d_s``.
        init: the initial ``g``, strictly inside ``bounds``.
        bounds: ``(lo, hi)`` with ``0 <= lo < hi <= 1``.
    """

    def __init__(self, hidden_size: int, init: float = 0.5, bounds: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.proj = nn.Linear(int(hidden_size), 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, _logit_for(init, self.bounds))

    def extra_repr(self) -> str:
        return f"bounds={self.bounds}"

    def forward(self, encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch,)`` gate values.

        Args:
            encoder_hidden_states: ``(batch, length, d_s)``, the student's last encoder states.
            attention_mask: ``(batch, length)`` source mask (pooling ignores padding).
        """
        pooled = masked_mean(encoder_hidden_states.detach().to(self.proj.weight.dtype), attention_mask)
        lo, hi = self.bounds
        return lo + (hi - lo) * torch.sigmoid(self.proj(pooled).squeeze(-1))


class FixedGate(nn.Module):
    """A constant gate (no parameters).

    Args:
        value: ``g`` in ``[0, 1]``.
    """

    def __init__(self, value: float):
        super().__init__()
        self.value = float(value)

    def extra_repr(self) -> str:
        return f"value={self.value}"

    def forward(self, encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch,)`` filled with ``value``.

        Args:
            encoder_hidden_states: ``(batch, length, d_s)``; only its batch size and device are used.
            attention_mask: unused.
        """
        return torch.full((encoder_hidden_states.shape[0],), self.value, device=encoder_hidden_states.device)


def make_hybrid_gate(spec, hidden_size: int, init: float = 0.5, bounds: tuple[float, float] = (0.0, 1.0)) -> nn.Module:
    """The gate module for a ``hybrid_gate`` argument.

    Args:
        spec: ``"scalar"``, ``"input"`` or a fixed value (number or numeric string).
        hidden_size: the student's width (input gate).
        init: initial value of a learned gate.
        bounds: ``(lo, hi)`` range of a learned gate.
    """
    kind = parse_hybrid_gate(spec)
    if kind is None:
        raise ValueError("make_hybrid_gate needs a gate ('scalar', 'input' or a number), got None")
    if kind == "scalar":
        return ScalarGate(init, bounds)
    if kind == "input":
        return InputGate(hidden_size, init, bounds)
    return FixedGate(kind)


def hybrid_loss(token_loss: torch.Tensor, sentence_loss: torch.Tensor, gate: torch.Tensor,
                token_count, sentence_count) -> torch.Tensor:
    """``sum_b g_b * L_token,b / N_token + sum_b (1 - g_b) * L_sentence,b / N_sentence`` (Wei et al. 2024).

    For a gate shared by the batch this is ``g * mean-per-token L_token + (1 - g) * mean-per-token L_sentence``.

    Args:
        token_loss: ``(batch,)``, each sentence's word-level KD summed over its gold target tokens.
        sentence_loss: ``(batch,)``, each sentence's cross-entropy on the teacher's sequence, summed over its tokens.
        gate: ``(batch,)`` gate values (or a scalar).
        token_count: the number of gold target tokens to average over (int or tensor).
        sentence_count: the number of teacher-sequence tokens to average over.
    """
    gate = gate.to(token_loss.dtype)
    return (gate * token_loss).sum() / token_count + ((1 - gate) * sentence_loss).sum() / sentence_count


def _eos_ids(teacher) -> set[int]:
    ids = set()
    for source in (getattr(teacher, "generation_config", None), teacher.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids}


def sequences_to_labels(sequences: torch.Tensor, eos_token_ids: Sequence[int] | set[int],
                        pad_token_id: int | None) -> list[tuple[int, ...]]:
    """Turn ``generate`` outputs of an encoder-decoder model into label id sequences.

    The first position (the decoder start token) is dropped and each row is cut after its first end-of-sequence
    token (kept, as in tokenized targets); a row without one loses its trailing padding.

    Args:
        sequences: ``(batch, length)`` from ``model.generate``.
        eos_token_ids: the end-of-sequence id(s).
        pad_token_id: the padding id (``None``: no padding to strip).
    """
    out = []
    for row in sequences[:, 1:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_token_ids), None)
        if cut is not None:
            row = row[:cut + 1]
        elif pad_token_id is not None:
            while row and row[-1] == pad_token_id:
                row.pop()
        out.append(tuple(row))
    return out


class TeacherSequenceCache:
    """The teacher's greedy (argmax) output for each source sentence, decoded once and kept.

    Keys are the source token ids without padding (``tuple`` of ints), values the label ids (decoder start token
    dropped, end-of-sequence kept). The cache lives in memory for the whole run (a few bytes per token).

    Args:
        max_new_tokens: a fixed generation limit; ``None`` uses ``2 * (longest source in the batch) + 10``.
    """

    def __init__(self, max_new_tokens: int | None = None):
        self.max_new_tokens = max_new_tokens
        self._store: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.num_decoded = 0  # sentences decoded so far (cache misses)

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key) -> bool:
        return tuple(key) in self._store

    @staticmethod
    def keys_for(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[int, ...]]:
        """The cache key of each row: its token ids where ``attention_mask`` is set.

        Args:
            input_ids: ``(batch, length)`` source ids.
            attention_mask: ``(batch, length)``; ``None``: the whole row.
        """
        ids = input_ids.tolist()
        if attention_mask is None:
            return [tuple(r) for r in ids]
        return [tuple(t for t, m in zip(r, mr) if m) for r, mr in zip(ids, attention_mask.tolist())]

    @torch.no_grad()
    def labels(self, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               generate: Callable | None = None, **generate_kwargs) -> torch.Tensor:
        """Teacher label ids for a batch, ``(batch, length)`` padded with -100, decoding only uncached sources.

        Args:
            teacher: an encoder-decoder model (decoded greedily: ``num_beams=1``, ``do_sample=False``).
            input_ids: ``(batch, length)`` source ids.
            attention_mask: ``(batch, length)`` source mask.
            generate: optional replacement for ``teacher.generate`` (called with the same keyword arguments).
            **generate_kwargs: further ``generate`` arguments (``forced_bos_token_id`` of a multilingual teacher).
        """
        keys = self.keys_for(input_ids, attention_mask)
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self._store}.values())
        if missing:
            index = torch.tensor(missing, device=input_ids.device)
            sub_ids = input_ids.index_select(0, index)
            sub_mask = attention_mask.index_select(0, index) if attention_mask is not None else None
            limit = self.max_new_tokens
            if limit is None:
                longest = int(sub_mask.sum(1).max()) if sub_mask is not None else sub_ids.shape[1]
                limit = 2 * longest + 10
            limit = cap_max_new_tokens(teacher, limit)  # within the teacher's position table
            was_training = teacher.training
            teacher.eval()
            sequences = (generate or teacher.generate)(input_ids=sub_ids, attention_mask=sub_mask, do_sample=False,
                                                       num_beams=1, max_new_tokens=limit, **generate_kwargs)
            teacher.train(was_training)
            pad = getattr(teacher.generation_config, "pad_token_id", None)
            if pad is None:
                pad = teacher.config.pad_token_id
            for i, row in zip(missing, sequences_to_labels(sequences, _eos_ids(teacher), pad)):
                self._store[keys[i]] = row
            self.num_decoded += len(missing)
        rows = [self._store[k] for k in keys]
        width = max(1, max(len(r) for r in rows))
        out = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(input_ids.device)
