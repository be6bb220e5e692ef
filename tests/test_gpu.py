"""Checks that need a GPU (skipped without CUDA): a half-precision teacher's word-level KD loss, and the Seq-KD corpus
built on CUDA. ``bench/gpu_check.sh`` runs this file on a GPU machine; its dry mode runs the same checks on the CPU
(``HF_SEQKD_GPU_TEST_DEVICE=cpu``), so that the checks themselves are exercised without a GPU."""

import copy
import math
import os

import pytest
import torch
from transformers import MarianConfig, MarianMTModel

from hf_seqkd import tiny_seq2seq_model
from hf_seqkd.losses import distillation_loss, fused_ce_and_distillation_loss

from _helpers import build

DEVICE = os.environ.get("HF_SEQKD_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)

pytestmark = [pytest.mark.skipif(DEVICE is None, reason="needs CUDA (a GPU)"),
              pytest.mark.usefixtures("torch_one_thread")]  # tests/conftest.py; the CPU (dry) run stays light


def _marian(vocab: int, d_model: int, layers: int, seed: int) -> MarianMTModel:
    """A random Marian model whose output layer (untied, std 0.5) spreads the logits like a trained model's (std ~4,
    largest probability ~0.25 on average over 32k tokens): with the default initialisation every distribution is
    nearly uniform, and rounding would look harmless."""
    torch.manual_seed(seed)
    config = MarianConfig(vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                          encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, encoder_attention_heads=4,
                          decoder_attention_heads=4, pad_token_id=vocab - 1, decoder_start_token_id=vocab - 1,
                          eos_token_id=0, scale_embedding=True, dropout=0.0, max_position_embeddings=128,
                          tie_word_embeddings=False)
    model = MarianMTModel(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_teacher_word_kd_loss_is_finite_and_close_to_float32(dtype):
    """A teacher run in bf16 / fp16 (``teacher_dtype``) gives half-precision logits; the word-KD loss and its gradient
    (computed in float32 chunks inside) must stay finite and close to those of the same teacher in float32. The
    vocabulary (32k) and batch are large enough for the loss to be computed over several chunks."""
    device = torch.device(DEVICE)
    vocab, batch, source_length, target_length = 32000, 8, 20, 24
    teacher = _marian(vocab, 64, 2, seed=1).to(device).eval().requires_grad_(False)
    teacher_half = copy.deepcopy(teacher).to(dtype)
    student = _marian(vocab, 32, 1, seed=2).to(device)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocab - 1, (batch, source_length), generator=g)
    labels = torch.randint(1, vocab - 1, (batch, target_length), generator=g)
    for row in range(batch):  # targets of different lengths: padded positions carry no loss
        labels[row, target_length - 3 * row:] = -100
    input_ids, labels = input_ids.to(device), labels.to(device)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  decoder_input_ids=student.prepare_decoder_input_ids_from_labels(labels=labels))
    with torch.no_grad():
        logits_fp32 = teacher(**inputs).logits
        logits_half = teacher_half(**inputs).logits
    assert logits_half.dtype == dtype and torch.isfinite(logits_half).all()

    def loss_and_grad(teacher_logits, divergence):
        student_logits = student(**inputs).logits.detach().requires_grad_(True)
        loss = distillation_loss(student_logits, teacher_logits, labels, divergence=divergence, temperature=2.0)
        loss.backward()
        return loss.detach(), student_logits.grad

    # on the CPU the half-precision losses were within 3e-4 (bf16) and 5e-5 (fp16) of float32's, relatively
    rel = 5e-3 if dtype == torch.bfloat16 else 1e-3
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss32, grad32 = loss_and_grad(logits_fp32, divergence)
        loss_half, grad_half = loss_and_grad(logits_half, divergence)
        assert loss_half.dtype == torch.float32 and math.isfinite(loss_half.item()), divergence
        assert torch.isfinite(grad_half).all(), divergence
        assert loss_half.item() == pytest.approx(loss32.item(), rel=rel), divergence
        cosine = torch.nn.functional.cosine_similarity(grad_half.flatten(), grad32.flatten(), dim=0)
        assert cosine.item() > 0.99, (divergence, cosine.item())

    # the fused CE + KD pass (the DistillationTrainer's word-level KD) with the half-precision teacher
    student_logits = student(**inputs).logits
    fused32, ce32, kd32 = fused_ce_and_distillation_loss(student_logits.detach(), logits_fp32, labels, ce_weight=0.5,
                                                         kd_weight=0.5)
    fused_half, ce_half, kd_half = fused_ce_and_distillation_loss(student_logits, logits_half, labels,
                                                                  ce_weight=0.5, kd_weight=0.5)
    assert all(math.isfinite(x.item()) for x in (fused_half, ce_half, kd_half))
    assert ce_half.item() == pytest.approx(ce32.item(), rel=1e-5)  # the CE does not involve the teacher
    assert kd_half.item() == pytest.approx(kd32.item(), rel=rel)
    fused_half.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_seqkd_corpus_on_the_device_matches_the_cpu(tokenizer, toy_corpus):
    """``build_seqkd_dataset`` on the device (float32) gives the same beam-search targets, K-best lists and scores as
    on the CPU, and leaves the teacher where it was. (A random tiny teacher: on the CPU its 2-best lists are the same
    in float32 and float64, so they do not hinge on rounding.) In the device's default dtype (bf16 on CUDA) the
    scores stay finite."""
    teacher = tiny_seq2seq_model(tokenizer, "marian", d_model=32, encoder_layers=2, decoder_layers=2, seed=0).eval()
    data = toy_corpus["validation"]
    settings = dict(num_beams=4, num_return_sequences=2, max_new_tokens=16, batch_size=16, show_progress=False)
    on_cpu = build(data, teacher, tokenizer, device="cpu", dtype=torch.float32, **settings)
    on_device = build(data, teacher, tokenizer, device=DEVICE, dtype=torch.float32, **settings)
    assert next(teacher.parameters()).device.type == "cpu"  # the device move is undone
    assert on_device["teacher_target"] == on_cpu["teacher_target"]
    assert on_device["teacher_nbest"] == on_cpu["teacher_nbest"]
    assert on_device["teacher_score"] == pytest.approx(on_cpu["teacher_score"], abs=1e-4)
    assert len(set(on_cpu["teacher_target"])) > 1  # the sources matter: not one output for every sentence

    default = build(data, teacher, tokenizer, device=DEVICE, **settings)  # bf16 (or fp16) on CUDA
    assert len(default) == len(data) and all(math.isfinite(s) for s in default["teacher_score"])
    assert next(teacher.parameters()).dtype == torch.float32  # a dtype change happens on a copy
