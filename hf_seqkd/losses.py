"""Word-level distillation losses: pure functions of tensors.

Word-level KD (Hinton et al. 2015; Kim & Rush 2016, Sec. 3.1, Eq. 3): at every target position j, on the gold
prefix, the student's next-token distribution p is pulled towards the teacher's q:

    L_word = - sum_j sum_k q(t_j = k | s, t_<j) log p(t_j = k | s, t_<j)

which has the same gradient as KL(q || p) ("forward_kl" here). Both distributions are softened by a temperature
T (Hinton et al. 2015, Sec. 2) and the loss is multiplied by T^2 so its gradient scale does not depend on T.

Other divergences, as compared by Wen et al. 2023 (f-DISTILL) and Agarwal et al. 2024 (GKD):
    reverse_kl  KL(p_s || p_t)
    jsd         b * KL(p_t || m) + (1 - b) * KL(p_s || m),   m = b * p_t + (1 - b) * p_s   (b = jsd_beta)
    tvd         0.5 * sum_k |p_t - p_s|

Memory. The divergence is computed over chunks of ``chunk_size`` non-padding positions, in float32, and when
the student logits need a gradient, the gradient of each chunk is computed in the forward pass and stored in
the logits' dtype (a custom autograd function), so no chunk's float32 intermediates outlive the chunk. With
``overwrite_teacher_logits=True`` that gradient is written into the teacher-logits tensor itself (which the
caller no longer needs), and the KD loss allocates no (tokens x vocab) tensor of its own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["DIVERGENCES", "StoredDistributions", "distillation_loss", "fused_ce_and_distillation_loss",
           "token_divergence", "stored_token_divergence", "token_cross_entropy", "sequence_cross_entropy"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _expected_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_k p_k (log p_k - log q_k)`` over the last axis, with ``0 * log 0 = 0``: an entry where ``p_k`` is
    exactly zero (a ``-inf`` log-probability, e.g. a token banned by a ``-inf`` bias) adds nothing, and gets a zero
    gradient rather than ``0 * inf = nan``."""
    p = log_p.exp()
    return (p * (log_p - log_q).masked_fill(p == 0, 0.0)).sum(-1)


def token_divergence(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, divergence: str = "forward_kl",
                     jsd_beta: float = 0.5) -> torch.Tensor:
    """Divergence between teacher and student at each position: ``(..., V)`` log-probabilities -> ``(...)``.

    Entries of probability exactly zero contribute nothing (``0 * log 0 = 0``), with finite gradients, in any
    floating dtype.
    """
    s, t = student_log_probs, teacher_log_probs
    if divergence == "forward_kl":  # KL(p_t || p_s) = sum p_t (log p_t - log p_s)
        return _expected_log_ratio(t, s)
    if divergence == "reverse_kl":  # KL(p_s || p_t)
        return _expected_log_ratio(s, t)
    if divergence == "jsd":  # generalised JSD (GKD, Agarwal et al. 2024, Eq. 1)
        # where both are -inf the mixture is too; any finite stand-in keeps logsumexp's gradient finite there, and
        # both terms are masked at those entries anyway
        both = torch.isneginf(t) & torch.isneginf(s)
        log_m = torch.logsumexp(torch.stack([t.masked_fill(both, 0.0) + math.log(jsd_beta),
                                             s.masked_fill(both, 0.0) + math.log(1 - jsd_beta)]), dim=0)
        return jsd_beta * _expected_log_ratio(t, log_m) + (1 - jsd_beta) * _expected_log_ratio(s, log_m)
    if divergence == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")


TAILS = ("bucket", "uniform")


class StoredDistributions(NamedTuple):
    """The teacher's distributions as :mod:`hf_seqkd.teacher_distributions` stores them, in place of its logits:
    ``ids`` ``(batch, length, k)`` its k most probable tokens at each position, ``log_probs`` ``(batch, length, k)``
    their log-probabilities at the run's temperature, ``tail_log_prob`` ``(batch, length)`` the log of the
    probability the k leave out; ``tail`` how the loss treats that probability (:func:`stored_token_divergence`)."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail_log_prob: torch.Tensor
    tail: str = "bucket"

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ids, self.log_probs, self.tail_log_prob

    def flat(self) -> "StoredDistributions":
        return StoredDistributions(self.ids.reshape(-1, self.ids.shape[-1]),
                                   self.log_probs.reshape(-1, self.log_probs.shape[-1]),
                                   self.tail_log_prob.reshape(-1), self.tail)

    def select(self, index: torch.Tensor) -> "StoredDistributions":
        return StoredDistributions(*(x.index_select(0, index) for x in self.tensors), self.tail)


def _safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last axis that is ``-inf`` (with a zero gradient, not NaN) where every entry is."""
    empty = torch.isneginf(x).all(-1)
    value = torch.logsumexp(x.masked_fill(empty.unsqueeze(-1), 0.0), dim=-1)
    return value.masked_fill(empty, float("-inf"))


def stored_token_divergence(student_log_probs: torch.Tensor, teacher: StoredDistributions,
                            divergence: str = "forward_kl", jsd_beta: float = 0.5) -> torch.Tensor:
    """The divergence between the teacher's stored top-k distribution and the student's: ``(N, V)`` student
    log-probabilities and ``(N, k)`` / ``(N,)`` stored values -> ``(N,)``.

    ``teacher.tail == "uniform"``: the teacher's left-out probability is spread evenly over the V - k other tokens
    (what a label-smoothed teacher's tail mostly is), and the divergence is taken over the whole vocabulary.
    ``"bucket"`` (the default): both distributions are grouped into the teacher's k tokens and one bucket for every
    other token: the teacher's buckets are its k probabilities and its tail (renormalised: float16 rounding leaves
    their sum slightly off one), the student's its probabilities of those k tokens and one minus their sum. Grouping
    never increases an f-divergence (the data-processing inequality; Csiszar 1967), so this is a lower bound of
    :func:`token_divergence` over the full vocabulary. Both equal it when k covers the vocabulary (the tail is then
    ``-inf``). Storing and the choice of the approximation: :mod:`hf_seqkd.teacher_distributions`.
    """
    ids = teacher.ids.long()
    if teacher.tail == "uniform":
        rest = student_log_probs.shape[-1] - ids.shape[-1]
        fill = (teacher.tail_log_prob.float() - math.log(rest)) if rest else \
            torch.full_like(teacher.tail_log_prob, float("-inf"), dtype=torch.float32)
        dense = fill.unsqueeze(-1).expand_as(student_log_probs).scatter(-1, ids, teacher.log_probs.float())
        return token_divergence(student_log_probs, torch.log_softmax(dense, dim=-1), divergence, jsd_beta)
    if teacher.tail != "bucket":
        raise ValueError(f"tail={teacher.tail!r}: use one of {TAILS}")
    student_top = student_log_probs.gather(-1, ids)
    student_tail = _safe_logsumexp(student_log_probs.scatter(-1, ids, float("-inf")))
    student = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)
    buckets = torch.cat([teacher.log_probs.float(), teacher.tail_log_prob.float().unsqueeze(-1)], dim=-1)
    return token_divergence(student, torch.log_softmax(buckets, dim=-1), divergence, jsd_beta)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                        ignore_index: int = -100) -> torch.Tensor:
    """Per-position cross-entropy ``(N, V), (N,) -> (N,)`` with optional label smoothing (Szegedy et al. 2016):
    ``(1 - eps) * NLL + eps * mean_k(-log p_k)``, as ``torch.nn.functional.cross_entropy`` computes it, except that
    the smoothing mass goes only to tokens the model can produce: a ``-inf`` logit (a banned token) is left out of
    the mean instead of making the loss infinite. Zero at ``ignore_index`` positions."""
    if not label_smoothing or not torch.isneginf(logits).any():
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                               reduction="none")
    log_p = F.log_softmax(logits, dim=-1)
    valid = labels.ne(ignore_index)
    nll = -log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    producible = ~torch.isneginf(logits)
    smooth = -log_p.masked_fill(~producible, 0.0).sum(-1) / producible.sum(-1).clamp(min=1)
    return ((1 - label_smoothing) * nll + label_smoothing * smooth).masked_fill(~valid, 0.0)


def _check(student_logits, teacher_logits, labels, divergence, temperature, jsd_beta, vocab_size):
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence == "jsd" and not 0 < jsd_beta < 1:
        raise ValueError(f"jsd needs 0 < jsd_beta < 1, got {jsd_beta} (jsd_beta=0 or 1 makes it identically zero; "
                         "use forward_kl / reverse_kl instead)")
    if isinstance(teacher_logits, StoredDistributions):
        return _check_stored(student_logits, teacher_logits, labels, vocab_size)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or student_logits.shape[:-1] != labels.shape:
        raise ValueError(f"shape mismatch: student logits {tuple(student_logits.shape)}, teacher logits "
                         f"{tuple(teacher_logits.shape)}, labels {tuple(labels.shape)}; the teacher must see the same "
                         "decoder_input_ids as the student")
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(f"teacher vocabulary {vt} != student vocabulary {vs}: word-level KD needs a shared "
                             "vocabulary; pass vocab_size=<the tokenizer's size> to compare over the shared entries")
        vocab_size = vs
    if vocab_size > min(vs, vt):
        raise ValueError(f"vocab_size {vocab_size} is larger than the logits (student {vs}, teacher {vt})")
    return vocab_size


def _check_stored(student_logits, teacher: StoredDistributions, labels, vocab_size):
    shapes = (tuple(teacher.ids.shape[:-1]), tuple(teacher.log_probs.shape[:-1]), tuple(teacher.tail_log_prob.shape))
    if any(shape != tuple(labels.shape) for shape in shapes) or student_logits.shape[:-1] != labels.shape or \
            teacher.ids.shape != teacher.log_probs.shape:
        stored_shapes = [tuple(x.shape) for x in teacher.tensors]
        raise ValueError(f"shape mismatch: student logits {tuple(student_logits.shape)}, labels "
                         f"{tuple(labels.shape)}, stored teacher ids / log-probs / tail {stored_shapes}; the stored "
                         "distributions must cover the same target positions as the labels")
    vocab_size = vocab_size or student_logits.shape[-1]
    if vocab_size > student_logits.shape[-1]:
        raise ValueError(f"vocab_size {vocab_size} is larger than the student's logits ({student_logits.shape[-1]})")
    if teacher.ids.numel() and (int(teacher.ids.min()) < 0 or int(teacher.ids.max()) >= vocab_size):
        raise ValueError(f"stored teacher token ids {int(teacher.ids.min())}..{int(teacher.ids.max())} are outside "
                         f"the student's vocabulary (0..{vocab_size - 1}): the distributions were stored for another "
                         "vocabulary")
    return vocab_size


def _default_chunk_size(vocab_size: int) -> int:
    # about 2M float32 values (8 MB) per chunk tensor: bounded memory, still large enough to be fast
    return max(1, (1 << 21) // max(vocab_size, 1))


class _ChunkedLoss(torch.autograd.Function):
    """Per-position ``kd_weight * KD + ce_weight * CE`` with the gradient computed chunk by chunk in forward.

    Returns the combined per-position loss (differentiable) and the two terms' per-position values (detached,
    for logging).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, positions, divergence, temperature, jsd_beta, vocab_size,
                chunk_size, overwrite_teacher_logits, kd_weight, ce_weight, label_smoothing):
        shape = student_logits.shape
        flat_s = student_logits.reshape(-1, shape[-1])
        stored = isinstance(teacher_logits, StoredDistributions)
        flat_t = teacher_logits.flat() if stored else teacher_logits.reshape(-1, teacher_logits.shape[-1])
        flat_labels = labels.reshape(-1)
        n = flat_s.shape[0]
        total = torch.zeros(n, dtype=torch.float32, device=student_logits.device)
        kd_values, ce_values = torch.zeros_like(total), torch.zeros_like(total)
        needs_grad = ctx.needs_input_grad[0]
        grad = None
        if needs_grad:
            if overwrite_teacher_logits and not stored and teacher_logits.dtype == student_logits.dtype and \
                    teacher_logits.shape == student_logits.shape and teacher_logits.is_contiguous():
                grad = flat_t  # reuse the teacher logits' memory: each chunk is read before it is overwritten
            else:
                grad = torch.empty_like(flat_s)
        grad_real = None if grad is None else (grad if vocab_size == grad.shape[-1] else grad[:, :vocab_size])

        def chunk_loss(s, t, chunk_labels):
            kd = torch.zeros(s.shape[0], device=s.device)
            if kd_weight:
                s_logp = F.log_softmax(s if temperature == 1 else s / temperature, dim=-1)
                if stored:  # log-probabilities stored at this temperature
                    kd = stored_token_divergence(s_logp, t, divergence, jsd_beta) * temperature**2
                else:
                    t_logp = F.log_softmax(t if temperature == 1 else t / temperature, dim=-1)
                    kd = token_divergence(s_logp, t_logp, divergence, jsd_beta) * temperature**2
            ce = torch.zeros_like(kd)
            if ce_weight:
                ce = token_cross_entropy(s, chunk_labels, label_smoothing=label_smoothing)
            return kd, ce

        for idx in positions.split(chunk_size):
            s = flat_s.index_select(0, idx)[:, :vocab_size].float()
            if not kd_weight:
                t = None
            elif stored:
                t = flat_t.select(idx)
            else:
                t = flat_t.index_select(0, idx)[:, :vocab_size].float()
            chunk_labels = flat_labels.index_select(0, idx)
            if needs_grad:
                with torch.enable_grad():
                    s.requires_grad_(True)
                    kd, ce = chunk_loss(s, t, chunk_labels)
                    combined = kd_weight * kd + ce_weight * ce
                    (g,) = torch.autograd.grad(combined.sum(), s)
                grad_real.index_copy_(0, idx, g.to(grad.dtype))
                kd, ce, combined = kd.detach(), ce.detach(), combined.detach()
            else:
                kd, ce = chunk_loss(s, t, chunk_labels)
                combined = kd_weight * kd + ce_weight * ce
            total.index_copy_(0, idx, combined)
            kd_values.index_copy_(0, idx, kd)
            ce_values.index_copy_(0, idx, ce)
        if needs_grad:
            keep = torch.zeros(n, dtype=torch.bool, device=flat_s.device)
            keep[positions] = True
            grad.masked_fill_(~keep.unsqueeze(-1), 0)  # positions without a loss get no gradient
            if grad_real is not grad:
                grad[:, vocab_size:] = 0  # padded vocabulary entries get none either
            ctx.save_for_backward(grad)
            ctx.shape = shape
        ctx.mark_non_differentiable(kd_values, ce_values)
        view = shape[:-1]
        return total.view(view), kd_values.view(view), ce_values.view(view)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_kd=None, grad_ce=None):
        (grad,) = ctx.saved_tensors
        # dL/dlogits = dL/dloss_i * dloss_i/dlogits_i, scaled in place (the buffer is used once)
        grad.mul_(grad_total.reshape(-1, 1).to(grad.dtype))
        return (grad.view(ctx.shape),) + (None,) * 12


def _detached(teacher):
    return StoredDistributions(*(x.detach() for x in teacher.tensors), teacher.tail) \
        if isinstance(teacher, StoredDistributions) else teacher.detach()


def _reduce(per_token, mask, reduction):
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / mask.sum().clamp(min=1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    overwrite_teacher_logits: bool = False,
) -> torch.Tensor:
    """Word-level KD loss between teacher and student next-token distributions.

    Args:
        student_logits: ``(batch, length, V_s)``; gradients flow into it.
        teacher_logits: ``(batch, length, V_t)``, computed on the same decoder inputs; never receives gradients. Or
            the teacher's stored top-k distributions (:class:`StoredDistributions`, log-probabilities already at
            ``temperature``): the divergence is then :func:`stored_token_divergence`'s, over the k tokens and a
            tail bucket (equal to the full one when k covers the vocabulary).
        labels: ``(batch, length)``; positions equal to ``ignore_index`` carry no loss.
        divergence: ``"forward_kl"`` (KL(p_t||p_s), the gradient of Kim & Rush's -sum q log p), ``"reverse_kl"``,
            ``"jsd"`` (generalised, with ``jsd_beta``) or ``"tvd"``.
        temperature: both distributions are ``softmax(logits / T)``; the loss is multiplied by ``T**2``.
        jsd_beta: the JSD mixture weight of the teacher, ``0 < jsd_beta < 1``.
        ignore_index: the label value of padding positions.
        reduction: ``"mean"`` over non-ignored positions, ``"sum"`` (e.g. to divide by the Trainer's
            ``num_items_in_batch`` for exact gradient accumulation), or ``"none"`` (``(batch, length)``, zero at
            ignored positions).
        vocab_size: compare only the first ``vocab_size`` entries (the shared real vocabulary when a model's
            vocabulary is padded). ``None``: the vocabularies must be equal.
        chunk_size: number of positions processed at once (default: about 2M logits per chunk).
        overwrite_teacher_logits: let the loss store its gradient in ``teacher_logits``' memory (same shape and
            dtype only); the caller must not use ``teacher_logits`` afterwards.
    """
    vocab_size = _check(student_logits, teacher_logits, labels, divergence, temperature, jsd_beta, vocab_size)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")
    mask = labels.ne(ignore_index)
    positions = mask.reshape(-1).nonzero().squeeze(-1)
    per_token, _, _ = _ChunkedLoss.apply(
        student_logits, _detached(teacher_logits), labels.clamp(min=0), positions, divergence, float(temperature),
        float(jsd_beta), int(vocab_size), int(chunk_size or _default_chunk_size(vocab_size)), overwrite_teacher_logits,
        1.0, 0.0, 0.0)
    return _reduce(per_token, mask, reduction)


def fused_ce_and_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ce_weight: float,
    kd_weight: float,
    label_smoothing: float = 0.0,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    overwrite_teacher_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ce_weight * CE + kd_weight * distillation_loss`` in one chunked pass (Kim & Rush 2016, Eq. 4 mixture).

    Same value and gradient as computing :func:`sequence_cross_entropy` and :func:`distillation_loss` separately
    and adding them, but the cross-entropy's (tokens x vocab) log-probabilities are never kept for backward: the
    combined gradient is computed chunk by chunk and stored once (in the teacher logits' memory with
    ``overwrite_teacher_logits``). Returns ``(combined, ce, kd)``; only ``combined`` carries gradients, the two
    terms are detached values for logging, reduced the same way. Arguments as in :func:`distillation_loss`
    (``teacher_logits`` may be :class:`StoredDistributions`); ``ce_weight``/``kd_weight`` are fixed numbers.
    """
    vocab_size = _check(student_logits, teacher_logits, labels, divergence, temperature, jsd_beta, vocab_size)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")
    mask = labels.ne(ignore_index)
    positions = mask.reshape(-1).nonzero().squeeze(-1)
    combined, kd, ce = _ChunkedLoss.apply(
        student_logits, _detached(teacher_logits), labels.clamp(min=0), positions, divergence, float(temperature),
        float(jsd_beta), int(vocab_size), int(chunk_size or _default_chunk_size(vocab_size)), overwrite_teacher_logits,
        float(kd_weight), float(ce_weight), float(label_smoothing))
    return (_reduce(combined, mask, reduction), _reduce(ce.detach(), mask, reduction),
            _reduce(kd.detach(), mask, reduction))


def sequence_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                           ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy with optional label smoothing, as the Trainer's ``LabelSmoother`` computes it.

    ``reduction="none"`` gives ``(batch, length)``; ``"sum"`` and ``"mean"`` (over non-ignored positions) a scalar.
    """
    per_token = token_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                    label_smoothing=label_smoothing, ignore_index=ignore_index)
    per_token = per_token.view(labels.shape)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / labels.ne(ignore_index).sum().clamp(min=1)
