"""The trainer's own trainable modules (CKD projections, learned hybrid gate) go through the training loop exactly as
the student's parameters do: zeroed after every optimizer step, clipped in one global norm, checkpointed and
restored, so that a resumed run equals an uninterrupted one.

Each test computes the reference independently: the gradient of the step's loss by ``torch.autograd.grad`` (which
does not accumulate into ``.grad``), compared with what the optimizer receives."""

import copy

import pytest
import torch
from transformers import TrainerCallback

from hf_seqkd import DistillationDataCollator, prepare_distillation_dataset, tiny_seq2seq_model

from _helpers import SequentialTrainer, training_args

# CKD with a scalar gate, CKD alone, and each learned gate alone
SETUPS = {
    "ckd": dict(alpha=0.2, intermediate_loss_weight=0.7, layer_mapping="regular_comb"),
    "scalar_gate": dict(alpha=1.0, hybrid_gate="scalar", hybrid_gate_learning_rate=0.05),
    "input_gate": dict(alpha=1.0, hybrid_gate="input", hybrid_gate_learning_rate=0.05),
}


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


@pytest.fixture
def teacher(tokenizer):
    return tiny_seq2seq_model(tokenizer, "marian", d_model=48, encoder_layers=4, decoder_layers=2, seed=1)


@pytest.fixture
def data(toy_corpus, tokenizer):
    """24 pairs with a stand-in teacher sequence (the gold target with its words reversed)."""
    rows = toy_corpus["train"].select(range(24))
    rows = rows.add_column("teacher_target", [" ".join(t.split()[::-1]) for t in rows["target"]])
    return prepare_distillation_dataset(rows, tokenizer, teacher_labels_column="teacher_target")


class FreshGradientTrainer(SequentialTrainer):
    """Records, at every micro-batch, the gradient of that micro-batch's loss alone (``autograd.grad``, which leaves
    ``.grad`` untouched) for every trainable parameter of the student and of the auxiliary modules."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        params = self._tracked()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        self.fresh.append({n: (torch.zeros_like(p) if g is None else g.detach().clone())
                           for (n, p), g in zip(params, grads)})
        return super().training_step(model, inputs, num_items_in_batch)

    def _tracked(self):
        student = [(f"student.{n}", p) for n, p in self.accelerator.unwrap_model(self.model).named_parameters()
                   if p.requires_grad and "hf_seqkd_auxiliary" not in n]
        aux = [(f"aux.{n}", p) for n, p in self.distillation_modules.named_parameters() if p.requires_grad]
        return student + aux


class HandedToOptimizer(TrainerCallback):
    """The ``.grad`` of every tracked parameter just before each optimizer step."""

    def __init__(self):
        self.trainer, self.grads = None, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                           for n, p in self.trainer._tracked()})


def _trainer(tmp_path, model, teacher, data, tokenizer, setup, **overrides):
    handed = HandedToOptimizer()
    args = training_args(tmp_path, **{**SETUPS[setup], "generation_max_length": 8, **overrides})
    trainer = FreshGradientTrainer(model=model, teacher_model=teacher, args=args, train_dataset=data,
                                   data_collator=DistillationDataCollator(tokenizer, model), callbacks=[handed])
    trainer.fresh, handed.trainer = [], trainer
    return trainer, handed


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_optimizer_receives_the_fresh_gradient_of_each_step(tmp_path, tokenizer, tiny_marian, teacher, data, setup):
    """SGD, no clipping, 5 steps: the gradient handed to the optimizer is that step's gradient, not the running
    sum of every earlier step's (what an auxiliary module that is never zeroed would get)."""
    trainer, handed = _trainer(tmp_path, tiny_marian, teacher, data, tokenizer, setup, max_steps=5, max_grad_norm=0.0)
    trainer.train()
    assert len(handed.grads) == len(trainer.fresh) == 5
    aux_names = [n for n in handed.grads[0] if n.startswith("aux.")]
    assert aux_names
    for step, (got, fresh) in enumerate(zip(handed.grads, trainer.fresh)):
        for name in got:
            torch.testing.assert_close(got[name], fresh[name], rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")
    assert any(fresh[n].abs().sum() > 0 for fresh in trainer.fresh[1:] for n in aux_names)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_clip_norm_is_the_norm_of_the_fresh_gradients(tmp_path, tokenizer, tiny_marian, teacher, data, setup):
    """The logged ``grad_norm`` (one global norm over the student and the auxiliary modules, which the default
    ``max_grad_norm`` clips) is the norm of that step's own gradients."""
    trainer, _ = _trainer(tmp_path, tiny_marian, teacher, data, tokenizer, setup, max_steps=4, max_grad_norm=1.0)
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    expected = [torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in fresh.values()])).item()
                for fresh in trainer.fresh]
    assert len(logged) == 4
    assert logged == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_two_steps_then_resume_then_two_equals_four_straight(tmp_path, tokenizer, tiny_marian, teacher, data, setup):
    """A run resumed from a checkpoint is the run that was not interrupted (AdamW, clipping on)."""
    kw = dict(optim="adamw_torch", learning_rate=3e-3, max_grad_norm=1.0)
    straight_model, resumed_model = copy.deepcopy(tiny_marian), copy.deepcopy(tiny_marian)
    straight, _ = _trainer(tmp_path / "straight", straight_model, teacher, data, tokenizer, setup, max_steps=4, **kw)
    straight.train()

    first, _ = _trainer(tmp_path / "resumed", copy.deepcopy(tiny_marian), teacher, data, tokenizer, setup,
                        max_steps=2, save_strategy="steps", save_steps=2, **kw)
    first.train()
    second, _ = _trainer(tmp_path / "resumed", resumed_model, teacher, data, tokenizer, setup, max_steps=4,
                         save_strategy="steps", save_steps=2, **kw)
    with torch.no_grad():  # a different start, so that only a restored checkpoint can make them equal
        for p in second.distillation_modules.parameters():
            p.add_(0.5)
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert second.state.global_step == 4
    for (name, a), b in zip(straight_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for (name, a), b in zip(straight.distillation_modules.named_parameters(),
                            second.distillation_modules.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
