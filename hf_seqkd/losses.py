"""Word-level distillation losses: pure functions of tensors.

Word-level KD (Hinton et al. 2015; Kim & Rush 2016, Sec. 3.1, Eq. 3): at every target position j, on the gold
prefix, the student's next-token distribution p is pulled towards the teacher's q:

    L_word = - sum_j sum_k q(t_j = k | s, t_<j) log p(t_j = k | s, t_<j)

which has the same gradient as KL(q || p) ("forward_kl" here). Both distributions are softened by a temperature
T (Hinton et al. 2015, Sec. 2) and the loss is multiplied by T^2 so its gradient scale does not depend on T.

Other divergences, as compared by Wen et al. 2023 (f-DISTILL) and Agarwal et al. 2024 (GKD):
    reverse_kl  KL(p_s || p_t)
    jsd         beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),   m = beta * p_t + (1 - beta) * p_s
    tvd         0.5 * sum_k |p_t - p_s|

Memory. The divergence is computed over chunks of ``chunk_size`` non-padding positions, in float32, and when
the student logits need a gradient, the gradient of each chunk is computed in the forward pass and stored in
the logits' dtype (a custom autograd function), so no chunk's float32 intermediates outlive the chunk. With
``overwrite_teacher_logits=True`` that gradient is written into the teacher-logits tensor itself (which the
caller no longer needs), and the KD loss allocates no (tokens x vocab) tensor of its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DIVERGENCES", "distillation_loss", "token_divergence", "sequence_cross_entropy"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def token_divergence(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, divergence: str = "forward_kl",
                     beta: float = 0.5) -> torch.Tensor:
    """Divergence between teacher and student at each position: ``(..., V)`` log-probabilities -> ``(...)``."""
    s, t = student_log_probs, teacher_log_probs
    if divergence == "forward_kl":  # KL(p_t || p_s) = sum p_t (log p_t - log p_s)
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":  # KL(p_s || p_t)
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    if divergence == "jsd":  # generalised JSD (GKD, Agarwal et al. 2024, Eq. 1)
        log_m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        return (beta * F.kl_div(log_m, t, reduction="none", log_target=True).sum(-1)
                + (1 - beta) * F.kl_div(log_m, s, reduction="none", log_target=True).sum(-1))
    if divergence == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")


def _check(student_logits, teacher_logits, labels, divergence, temperature, beta, vocab_size):
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (beta=0 or 1 makes it identically zero; "
                         "use forward_kl / reverse_kl instead)")
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


class _ChunkedDivergence(torch.autograd.Function):
    """Per-position divergence with the gradient computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, positions, divergence, temperature, beta, vocab_size,
                chunk_size, overwrite_teacher_logits):
        shape = student_logits.shape
        flat_s = student_logits.reshape(-1, shape[-1])
        flat_t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        per_token = torch.zeros(flat_s.shape[0], dtype=torch.float32, device=student_logits.device)
        needs_grad = ctx.needs_input_grad[0]
        grad = None
        if needs_grad:
            if overwrite_teacher_logits and teacher_logits.dtype == student_logits.dtype and \
                    teacher_logits.shape == student_logits.shape and teacher_logits.is_contiguous():
                grad = flat_t  # reuse the teacher logits' memory, chunk by chunk after reading them
            else:
                grad = torch.empty_like(flat_s)
        for idx in positions.split(chunk_size):
            s = flat_s.index_select(0, idx)[:, :vocab_size].float()
            t = flat_t.index_select(0, idx)[:, :vocab_size].float()
            t_logp = F.log_softmax(t / temperature, dim=-1)
            if needs_grad:
                with torch.enable_grad():
                    s = s.detach().requires_grad_(True)
                    loss = token_divergence(F.log_softmax(s / temperature, dim=-1), t_logp, divergence, beta)
                    loss = loss * temperature**2
                    (g,) = torch.autograd.grad(loss.sum(), s)
                rows = torch.zeros(idx.numel(), flat_s.shape[-1], dtype=grad.dtype, device=grad.device)
                rows[:, :vocab_size] = g.to(grad.dtype)
                grad.index_copy_(0, idx, rows)
                loss = loss.detach()
            else:
                loss = token_divergence(F.log_softmax(s / temperature, dim=-1), t_logp, divergence, beta)
                loss = loss * temperature**2
            per_token.index_copy_(0, idx, loss)
        if needs_grad:
            # positions that carry no loss get no gradient
            keep = torch.zeros(flat_s.shape[0], dtype=torch.bool, device=flat_s.device)
            keep[positions] = True
            grad.masked_fill_(~keep.unsqueeze(-1), 0)
            ctx.save_for_backward(grad)
            ctx.shape = shape
        return per_token.view(shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # dL/dlogits = dL/dloss_i * dloss_i/dlogits_i, scaled in place (the buffer is used once)
        grad.mul_(grad_output.reshape(-1, 1).to(grad.dtype))
        return grad.view(ctx.shape), None, None, None, None, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    overwrite_teacher_logits: bool = False,
) -> torch.Tensor:
    """Word-level KD loss between teacher and student next-token distributions.

    Args:
        student_logits: ``(batch, length, V_s)``; gradients flow into it.
        teacher_logits: ``(batch, length, V_t)``, computed on the same decoder inputs; never receives gradients.
        labels: ``(batch, length)``; positions equal to ``ignore_index`` carry no loss.
        divergence: ``"forward_kl"`` (KL(p_t||p_s), the gradient of Kim & Rush's -sum q log p), ``"reverse_kl"``,
            ``"jsd"`` (generalised, with ``beta``) or ``"tvd"``.
        temperature: both distributions are ``softmax(logits / T)``; the loss is multiplied by ``T**2``.
        beta: the JSD mixture weight of the teacher, ``0 < beta < 1``.
        ignore_index: the label value of padding positions.
        reduction: ``"mean"`` over non-ignored positions, ``"sum"`` (e.g. to divide by the Trainer's
            ``num_items_in_batch`` for exact gradient accumulation), or ``"none"`` (``(batch, length)``, zero at
            ignored positions).
        vocab_size: compare only the first ``vocab_size`` entries (the shared real vocabulary when a model's
            vocabulary is padded). ``None``: the vocabularies must be equal.
        chunk_size: number of positions processed at once.
        overwrite_teacher_logits: let the loss store its gradient in ``teacher_logits``' memory (same shape and
            dtype only); the caller must not use ``teacher_logits`` afterwards.
    """
    vocab_size = _check(student_logits, teacher_logits, labels, divergence, temperature, beta, vocab_size)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")
    teacher_logits = teacher_logits.detach()
    mask = labels.ne(ignore_index)
    positions = mask.reshape(-1).nonzero().squeeze(-1)
    per_token = _ChunkedDivergence.apply(student_logits, teacher_logits, positions, divergence, float(temperature),
                                         float(beta), int(vocab_size), int(chunk_size), overwrite_teacher_logits)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)


def sequence_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                           ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy with optional label smoothing, as the Trainer's ``LabelSmoother`` computes it.

    ``reduction="none"`` gives ``(batch, length)``; ``"sum"`` and ``"mean"`` (over non-ignored positions) a scalar.
    """
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    per_token = per_token.view(labels.shape)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / labels.ne(ignore_index).sum().clamp(min=1)
