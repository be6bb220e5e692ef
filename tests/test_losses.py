"""distillation_loss against a direct, unchunked reference computed the slow, obvious way (float64)."""

import pytest
import torch

from hf_seqkd.losses import DIVERGENCES, distillation_loss, sequence_cross_entropy


def reference_loss(student_logits, teacher_logits, labels, divergence, temperature, beta=0.5, ignore_index=-100):
    """Loop over positions; the textbook formulas in float64."""
    total, count = 0.0, 0
    B, L, _ = student_logits.shape
    for b in range(B):
        for j in range(L):
            if labels[b, j] == ignore_index:
                continue
            p_s = torch.softmax(student_logits[b, j].double() / temperature, -1)
            p_t = torch.softmax(teacher_logits[b, j].double() / temperature, -1)
            if divergence == "forward_kl":
                d = (p_t * (p_t.log() - p_s.log())).sum()
            elif divergence == "reverse_kl":
                d = (p_s * (p_s.log() - p_t.log())).sum()
            elif divergence == "jsd":
                m = beta * p_t + (1 - beta) * p_s
                d = beta * (p_t * (p_t / m).log()).sum() + (1 - beta) * (p_s * (p_s / m).log()).sum()
            elif divergence == "tvd":
                d = 0.5 * (p_t - p_s).abs().sum()
            total = total + temperature**2 * d
            count += 1
    return total / count


def _inputs(seed=0, B=3, L=7, V=50):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, L, V, generator=g) * 2
    teacher = torch.randn(B, L, V, generator=g) * 3
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 5:] = -100
    labels[2, 2:] = -100
    return student, teacher, labels


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_reference_value_and_gradient(divergence, temperature):
    student, teacher, labels = _inputs()
    beta = 0.3
    s1 = student.clone().requires_grad_(True)
    loss = distillation_loss(s1, teacher, labels, divergence=divergence, temperature=temperature, jsd_beta=beta,
                             chunk_size=4)  # several chunks
    s2 = student.clone().double().requires_grad_(True)
    ref = reference_loss(s2, teacher.double(), labels, divergence, temperature, beta)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


def test_reverse_and_forward_kl_differ_on_asymmetric_inputs():
    student, teacher, labels = _inputs(1)
    fwd = distillation_loss(student, teacher, labels, divergence="forward_kl")
    rev = distillation_loss(student, teacher, labels, divergence="reverse_kl")
    assert abs(fwd.item() - rev.item()) > 1e-2


def test_zero_when_distributions_match():
    student, _, labels = _inputs(2)
    for divergence in DIVERGENCES:
        value = distillation_loss(student, student.clone(), labels, divergence=divergence).item()
        assert value == pytest.approx(0, abs=1e-5)


def test_padding_positions_do_not_change_value_or_gradient():
    student, teacher, labels = _inputs(3)
    changed = teacher.clone()
    changed[labels == -100] = torch.randn_like(changed[labels == -100]) * 10
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    la = distillation_loss(a, teacher, labels)
    lb = distillation_loss(b, changed, labels)
    assert la.item() == pytest.approx(lb.item(), abs=1e-7)
    la.backward()
    lb.backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.all(a.grad[labels == -100] == 0)


def test_gradients_reach_only_the_student():
    student, teacher, labels = _inputs(4)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distillation_loss(student, teacher, labels).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_reductions_and_chunking_agree():
    student, teacher, labels = _inputs(5)
    n = labels.ne(-100).sum()
    mean = distillation_loss(student, teacher, labels, chunk_size=1000)
    total = distillation_loss(student, teacher, labels, reduction="sum", chunk_size=3)
    per_token = distillation_loss(student, teacher, labels, reduction="none", chunk_size=2)
    assert total.item() == pytest.approx(mean.item() * n.item(), rel=1e-6)
    assert per_token.shape == labels.shape
    assert per_token[labels == -100].abs().sum() == 0
    assert per_token.sum().item() == pytest.approx(total.item(), rel=1e-6)


def test_per_token_reduction_backpropagates_weights():
    student, teacher, labels = _inputs(6)
    weights = torch.rand(labels.shape)
    a = student.clone().requires_grad_(True)
    (distillation_loss(a, teacher, labels, reduction="none") * weights).sum().backward()
    b = student.clone().double().requires_grad_(True)
    ref = 0
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            if labels[i, j] != -100:
                one = torch.full_like(labels, -100)
                one[i, j] = labels[i, j]
                ref = ref + weights[i, j] * reference_loss(b, teacher.double(), one, "forward_kl", 1.0)
    ref.backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-7)


def test_overwrite_teacher_logits_gives_same_gradient():
    student, teacher, labels = _inputs(7)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    distillation_loss(a, teacher.clone(), labels, temperature=2.0).backward()
    distillation_loss(b, teacher.clone(), labels, temperature=2.0, overwrite_teacher_logits=True).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_padded_vocabulary_compares_shared_entries():
    student, teacher, labels = _inputs(8, V=40)
    padded_student = torch.cat([student, torch.randn(*student.shape[:2], 8)], -1)  # model vocab 48 > 40
    value = distillation_loss(padded_student, teacher, labels, vocab_size=40)
    assert value.item() == pytest.approx(distillation_loss(student, teacher, labels).item(), rel=1e-6)
    with pytest.raises(ValueError, match="teacher vocabulary 40 != student vocabulary 48"):
        distillation_loss(padded_student, teacher, labels)


def test_bad_arguments_are_named():
    student, teacher, labels = _inputs(9)
    with pytest.raises(ValueError, match="unknown divergence"):
        distillation_loss(student, teacher, labels, divergence="kl")
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, labels, temperature=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        distillation_loss(student, teacher[:, :-1], labels)


def test_sequence_cross_entropy_matches_trainer_label_smoother():
    from transformers.trainer_pt_utils import LabelSmoother

    student, _, labels = _inputs(10)
    for eps in (0.0, 0.1):
        ours = sequence_cross_entropy(student, labels, label_smoothing=eps)
        if eps == 0:
            ref = torch.nn.functional.cross_entropy(student.view(-1, 50), labels.view(-1), ignore_index=-100)
        else:
            ref = LabelSmoother(epsilon=eps)({"logits": student}, labels)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_fused_ce_and_kd_equals_the_separate_terms(divergence):
    from hf_seqkd.losses import fused_ce_and_distillation_loss

    student, teacher, labels = _inputs(11)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    combined, ce, kd = fused_ce_and_distillation_loss(a, teacher.clone(), labels, ce_weight=0.3, kd_weight=0.7,
                                                      label_smoothing=0.1, divergence=divergence, temperature=2.0,
                                                      chunk_size=3, overwrite_teacher_logits=True)
    ref_ce = sequence_cross_entropy(b, labels, label_smoothing=0.1)
    ref_kd = distillation_loss(b, teacher, labels, divergence=divergence, temperature=2.0)
    ref = 0.3 * ref_ce + 0.7 * ref_kd
    assert combined.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-5) and kd.item() == pytest.approx(ref_kd.item(), rel=1e-5)
    assert not ce.requires_grad and not kd.requires_grad
    combined.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------ banned tokens: -inf logits (fault 2)
def _with_banned_token(dtype, banned=7, seed=12):
    """Logits where the same vocabulary entry is -inf for teacher and student (a model that bans a token with a
    -inf bias, and a student copied from it), and the same inputs with that entry removed."""
    student, teacher, labels = _inputs(seed)
    labels[labels == banned] = banned + 1  # a banned token is never a label
    keep = [i for i in range(student.shape[-1]) if i != banned]
    reduced = (student[..., keep].clone(), teacher[..., keep].clone(), labels - (labels > banned).long())
    reduced[2][labels == -100] = -100
    student[..., banned] = float("-inf")
    teacher[..., banned] = float("-inf")
    return student.to(dtype), teacher.to(dtype), labels, reduced, banned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("fused", [False, True])
def test_a_banned_token_contributes_nothing(divergence, dtype, fused):
    """0 * log 0 = 0: an entry of probability exactly 0 under both models adds nothing to the divergence (the
    reference: the same loss over the vocabulary without that entry, where the softmax of the others is
    unchanged), and the gradient is finite, zero at the banned entry."""
    from hf_seqkd.losses import fused_ce_and_distillation_loss

    student, teacher, labels, (r_student, r_teacher, r_labels), banned = _with_banned_token(dtype)
    s = student.clone().requires_grad_(True)
    r = r_student.clone().to(dtype).requires_grad_(True)
    kw = dict(divergence=divergence, temperature=2.0, jsd_beta=0.3, chunk_size=4)
    if fused:
        loss = fused_ce_and_distillation_loss(s, teacher, labels, ce_weight=0.5, kd_weight=0.5, **kw)[0]
        ref = fused_ce_and_distillation_loss(r, r_teacher.to(dtype), r_labels, ce_weight=0.5, kd_weight=0.5, **kw)[0]
    else:
        loss = distillation_loss(s, teacher, labels, **kw)
        ref = distillation_loss(r, r_teacher.to(dtype), r_labels, **kw)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    ref.backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[..., banned] == 0).all()
    keep = [i for i in range(student.shape[-1]) if i != banned]
    torch.testing.assert_close(s.grad[..., keep].float(), r.grad.float(), rtol=1e-3, atol=1e-6)


def test_token_divergence_with_zero_probabilities_is_finite_in_half_precision():
    """The per-position function itself (used on bf16/fp16 log-probabilities): finite value and gradient."""
    from hf_seqkd.losses import token_divergence

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        logits_s = torch.randn(4, 9, dtype=dtype)
        logits_t = torch.randn(4, 9, dtype=dtype)
        logits_s[:, 2] = logits_t[:, 2] = float("-inf")
        for divergence in DIVERGENCES:
            s = torch.log_softmax(logits_s.float(), -1).to(dtype).requires_grad_(True)
            t = torch.log_softmax(logits_t.float(), -1).to(dtype)
            value = token_divergence(s, t, divergence, jsd_beta=0.5)
            value.sum().backward()
            assert torch.isfinite(value).all() and torch.isfinite(s.grad).all(), (divergence, dtype)


def test_label_smoothing_ignores_a_banned_token():
    """Label-smoothed CE with a -inf logit: the smoothing mass goes to the tokens the model can produce (torch's
    own label smoothing would give inf); equal to the CE over the vocabulary without the banned entry."""
    student, _, labels, (r_student, _, r_labels), _ = _with_banned_token(torch.float32)
    ours = sequence_cross_entropy(student, labels, label_smoothing=0.1)
    ref = sequence_cross_entropy(r_student, r_labels, label_smoothing=0.1)
    assert torch.isfinite(ours) and ours.item() == pytest.approx(ref.item(), rel=1e-5)
