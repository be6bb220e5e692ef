"""Hybrid token/sentence KD (Wei et al. 2024): the loss, the gates, the teacher-sequence cache, and the shared
checkpointing of the auxiliary modules (hybrid gate and CKD projections)."""

import copy
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, TrainerCallback

from hf_seqkd import (
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    distillation_loss,
    prepare_distillation_dataset,
    tiny_seq2seq_model,
)
from hf_seqkd.auxiliary import ATTRIBUTE
from hf_seqkd.hybrid import (
    FixedGate,
    InputGate,
    ScalarGate,
    TeacherSequenceCache,
    hybrid_loss,
    make_hybrid_gate,
    sequences_to_labels,
)
from hf_seqkd.losses import sequence_cross_entropy

from _helpers import SequentialTrainer, training_args


def _args(tmp_path, **kw):
    return training_args(tmp_path, **{**dict(alpha=1.0, hybrid_gate="scalar", generation_max_length=8), **kw})


@pytest.fixture
def seqkd_set(toy_corpus, tokenizer):
    """16 pairs with a stand-in ``teacher_target`` column (the gold target, words reversed)."""
    data = toy_corpus["train"].select(range(16))
    data = data.add_column("teacher_target", [" ".join(t.split()[::-1]) for t in data["target"]])
    return prepare_distillation_dataset(data, tokenizer, teacher_labels_column="teacher_target")


@pytest.fixture
def teacher(tokenizer):
    return tiny_seq2seq_model(tokenizer, "marian", d_model=48, encoder_layers=4, decoder_layers=2, seed=1)


def _collate(tokenizer, model, dataset, n=4):
    return DistillationDataCollator(tokenizer, model)([dataset[i] for i in range(n)])


def _manual_terms(student, teacher, batch):
    """Per-sentence L_token (gold prefix) and L_sentence (teacher sequence), and the gold CE, by hand."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    gold = student(**inputs, decoder_input_ids=batch["decoder_input_ids"])
    t_logits = teacher(**inputs, decoder_input_ids=batch["decoder_input_ids"]).logits
    on_teacher = student(**inputs, decoder_input_ids=student.prepare_decoder_input_ids_from_labels(
        labels=batch["teacher_labels"]))
    token = distillation_loss(gold.logits, t_logits, batch["labels"], reduction="none").sum(-1)
    sentence = sequence_cross_entropy(on_teacher.logits, batch["teacher_labels"], reduction="none").sum(-1)
    ce = sequence_cross_entropy(gold.logits, batch["labels"])
    return token, sentence, ce, gold.encoder_last_hidden_state


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_loss_is_g_token_plus_one_minus_g_sentence(tmp_path, tokenizer, seqkd_set, tiny_marian, teacher, alpha):
    g = 0.3
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=seqkd_set,
                                  args=_args(tmp_path, hybrid_gate=str(g), alpha=alpha),
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian))
    batch = _collate(tokenizer, tiny_marian, seqkd_set)
    assert batch["teacher_labels"].shape != batch["labels"].shape or not torch.equal(batch["teacher_labels"],
                                                                                    batch["labels"])
    loss = trainer.compute_loss(tiny_marian, dict(batch))
    with torch.no_grad():
        token, sentence, ce, _ = _manual_terms(tiny_marian, teacher, batch)
    l_token = token.sum() / batch["labels"].ne(-100).sum()
    l_sentence = sentence.sum() / batch["teacher_labels"].ne(-100).sum()
    expected = (1 - alpha) * ce + alpha * (g * l_token + (1 - g) * l_sentence)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert l_token.item() > 0 and l_sentence.item() > 0


def test_hybrid_loss_function_weights_each_sentence():
    token, sentence = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
    gate = torch.tensor([0.0, 0.5, 1.0])
    expected = (0 * 1 + 0.5 * 2 + 1 * 3) / 10 + (1 * 4 + 0.5 * 5 + 0 * 6) / 20
    assert hybrid_loss(token, sentence, gate, 10, 20).item() == pytest.approx(expected)
    assert hybrid_loss(token, sentence, torch.tensor(0.25), 6, 15).item() == pytest.approx(0.25 * 1 + 0.75 * 1)


def test_input_gate_weights_sentences_by_their_own_gate(tmp_path, tokenizer, seqkd_set, tiny_marian, teacher):
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=seqkd_set,
                                  args=_args(tmp_path, hybrid_gate="input"),
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian))
    gate = trainer.distillation_modules["hybrid_gate"]
    with torch.no_grad():
        gate.proj.weight.normal_(0, 1.0)  # make the gates differ between sentences
    batch = _collate(tokenizer, tiny_marian, seqkd_set)
    loss = trainer.compute_loss(tiny_marian, dict(batch))
    with torch.no_grad():
        token, sentence, _, encoded = _manual_terms(tiny_marian, teacher, batch)
        g = gate(encoded, batch["attention_mask"])
    assert g.std() > 1e-3 and ((g > 0.1) & (g < 0.9)).all()
    expected = hybrid_loss(token, sentence, g, batch["labels"].ne(-100).sum(), batch["teacher_labels"].ne(-100).sum())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------- the gates
def test_gates_start_at_init_and_respect_bounds():
    scalar = ScalarGate(init=0.3, bounds=(0.2, 0.8))
    states = torch.randn(5, 7, 16)
    torch.testing.assert_close(scalar(states), torch.full((5,), 0.3))
    with torch.no_grad():
        scalar.logit.fill_(50.0)
    assert scalar(states)[0].item() == pytest.approx(0.8)
    gate = InputGate(16, init=0.7, bounds=(0.1, 0.9))
    torch.testing.assert_close(gate(states, torch.ones(5, 7)), torch.full((5,), 0.7))
    with torch.no_grad():
        gate.proj.weight.normal_(0, 100.0)
    values = gate(states, torch.ones(5, 7))
    assert ((values >= 0.1 - 1e-6) & (values <= 0.9 + 1e-6)).all() and values.min() < 0.2 and values.max() > 0.8
    assert isinstance(make_hybrid_gate("0.25", 16), FixedGate) and make_hybrid_gate(0.25, 16)(states)[0] == 0.25
    with pytest.raises(ValueError, match="strictly inside"):
        ScalarGate(init=0.95, bounds=(0.1, 0.9))


def test_input_gate_ignores_padding():
    gate = InputGate(4, bounds=(0.0, 1.0))
    with torch.no_grad():
        gate.proj.weight.normal_()
    states, mask = torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    other = states.clone()
    other[0, 3:] = 1e3
    torch.testing.assert_close(gate(states, mask), gate(other, mask))


@pytest.mark.parametrize("kind", ["scalar", "input"])
def test_gate_receives_gradients_towards_the_smaller_term(tmp_path, tokenizer, seqkd_set, tiny_marian, teacher, kind):
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=seqkd_set,
                                  args=_args(tmp_path, hybrid_gate=kind),
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian))
    batch = _collate(tokenizer, tiny_marian, seqkd_set)
    trainer.compute_loss(tiny_marian, dict(batch)).backward()
    gate = trainer.distillation_modules["hybrid_gate"]
    grads = [p.grad for p in gate.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    bias_grad = gate.logit.grad if kind == "scalar" else gate.proj.bias.grad
    # dL/dg = L_token - L_sentence: the untrained student's token KD is far below its CE on the teacher's sequence,
    # so gradient descent raises g (the gradient on the gate's logit is negative)
    assert bias_grad.item() < 0
    if kind == "input":  # the gate reads the encoder but does not train it: the same encoder gradient as with
        # its per-sentence values frozen into constants
        with torch.no_grad():
            gate.proj.weight.normal_(0, 0.05)
        captured = []
        hook = gate.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
        tiny_marian.zero_grad()
        trainer.compute_loss(tiny_marian, dict(batch)).backward()
        hook.remove()
        assert captured[0].std() > 0
        enc_grad = tiny_marian.model.encoder.layers[0].fc1.weight.grad.clone()
        trainer.distillation_modules["hybrid_gate"] = _ConstantGate(captured[0])
        tiny_marian.zero_grad()
        trainer.compute_loss(tiny_marian, dict(batch)).backward()
        torch.testing.assert_close(tiny_marian.model.encoder.layers[0].fc1.weight.grad, enc_grad)


class _ConstantGate(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values = values

    def forward(self, encoder_hidden_states, attention_mask=None):
        return self.values


def test_gate_has_its_own_learning_rate_and_is_logged(tmp_path, tokenizer, seqkd_set, tiny_marian, teacher):
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=seqkd_set,
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                  args=_args(tmp_path, max_steps=3, hybrid_gate_learning_rate=0.5,
                                             optim="adamw_torch", learning_rate=1e-3))
    trainer.train()
    gate_groups = [g for g in trainer.optimizer.param_groups
                   if any(p is trainer.distillation_modules["hybrid_gate"].logit for p in g["params"])]
    assert len(gate_groups) == 1 and gate_groups[0]["lr"] == pytest.approx(0.5)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    assert all({"hybrid_gate", "loss_token", "loss_sentence", "loss_ce"} <= set(h) for h in logged)
    assert logged[0]["hybrid_gate"] == pytest.approx(0.5)
    assert logged[-1]["hybrid_gate"] > 0.6  # Adam with lr 0.5: about 0.5 logit units per step towards L_token
    default = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=seqkd_set,
                                  args=_args(tmp_path / "default", learning_rate=2e-3))
    gate = default.distillation_modules["hybrid_gate"].logit
    groups = [g for g in default.create_optimizer().param_groups if any(p is gate for p in g["params"])]
    assert groups[0]["lr"] == pytest.approx(2e-4)  # a tenth of the student's by default


# -------------------------------------------------------------------------------- teacher sequences (cache)
def test_sequences_to_labels():
    sequences = torch.tensor([[9, 5, 6, 0, 9, 9], [9, 7, 0, 8, 0, 9], [9, 4, 4, 4, 4, 4], [9, 3, 9, 9, 9, 9]])
    assert sequences_to_labels(sequences, {0}, 9) == [(5, 6, 0), (7, 0), (4, 4, 4, 4, 4), (3,)]


def test_greedy_teacher_outputs_are_cached_across_epochs(tmp_path, tokenizer, train_set, tiny_marian, teacher):
    calls = []
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=train_set.select(range(8)),
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                  args=_args(tmp_path, max_steps=-1, num_train_epochs=3, hybrid_gate="input",
                                             per_device_train_batch_size=3))
    original = teacher.generate
    teacher.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or original(**kw)
    trainer.train()
    assert sum(calls) == 8 and len(trainer.teacher_sequences) == 8  # each sentence decoded once in 3 epochs
    assert trainer.state.global_step == 9
    # the cached labels are the teacher's greedy output, without the decoder start token
    batch = _collate(tokenizer, tiny_marian, train_set, n=2)
    labels = trainer.teacher_sequences.labels(teacher, batch["input_ids"], batch["attention_mask"])
    generated = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=1,
                         do_sample=False, max_new_tokens=7)  # generation_max_length 8 counts the decoder start
    for row, gen in zip(labels, generated):
        n = int(row.ne(-100).sum())
        assert row[:n].tolist() == gen[1:n + 1].tolist()
    assert sum(calls) == 8  # served from the cache


def test_cache_key_ignores_padding(teacher, tokenizer):
    cache = TeacherSequenceCache(max_new_tokens=4)
    ids = torch.tensor([[5, 6, 7, 0]])
    short = cache.labels(teacher, ids[:, :3], torch.ones(1, 3, dtype=torch.long))
    padded = cache.labels(teacher, torch.tensor([[5, 6, 7, tokenizer.pad_token_id]]), torch.tensor([[1, 1, 1, 0]]))
    assert torch.equal(short, padded) and cache.num_decoded == 1


# ----------------------------------------------------------------------- accumulation, checkpoints, export
def test_gradient_accumulation_equals_one_big_batch(tmp_path, tokenizer, train_set, tiny_marian, teacher):
    a, b = copy.deepcopy(tiny_marian), copy.deepcopy(tiny_marian)
    collator = DistillationDataCollator(tokenizer, model=tiny_marian)
    kw = dict(hybrid_gate="input", alpha=0.7)  # teacher sequences from greedy decoding, normalised per token
    accumulated = SequentialTrainer(model=a, teacher_model=teacher, train_dataset=train_set, data_collator=collator,
                                     args=_args(tmp_path / "ga", gradient_accumulation_steps=2, **kw))
    big = SequentialTrainer(model=b, teacher_model=teacher, train_dataset=train_set, data_collator=collator,
                             args=_args(tmp_path / "big", per_device_train_batch_size=8, **kw))
    for trainer in (accumulated, big):
        with torch.no_grad():
            trainer.distillation_modules["hybrid_gate"].proj.weight.copy_(torch.linspace(-0.05, 0.05, 32))
    accumulated.train()
    big.train()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    gate_a, gate_b = (t.distillation_modules["hybrid_gate"].proj for t in (accumulated, big))
    torch.testing.assert_close(gate_a.weight, gate_b.weight, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(gate_a.weight, torch.linspace(-0.05, 0.05, 32))


def _auxiliary_part(state: dict) -> dict:
    """The auxiliary modules' entries of a checkpoint's state dict, named as in ``trainer.distillation_modules``."""
    prefix = ATTRIBUTE + "."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class _Snapshot(TrainerCallback):
    """Copies the trainer's auxiliary modules and the student when training (re)starts, i.e. after a checkpoint
    was loaded."""

    def __init__(self):
        self.trainer, self.at_start, self.model_at_start = None, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_start = {k: v.clone() for k, v in self.trainer.distillation_modules.state_dict().items()}
        self.model_at_start = {k: v.clone() for k, v in model.state_dict().items()}


def test_gate_and_projections_survive_save_and_resume(tmp_path, tokenizer, seqkd_set, tiny_marian, teacher):
    def make(max_steps, model):
        snapshot = _Snapshot()
        trainer = DistillationTrainer(
            model=model, teacher_model=teacher, train_dataset=seqkd_set, callbacks=[snapshot],
            data_collator=DistillationDataCollator(tokenizer, model),
            args=_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2, alpha=0.5,
                       intermediate_loss_weight=0.3, layer_mapping="regular_comb", optim="adamw_torch"))
        snapshot.trainer = trainer
        return trainer, snapshot

    first, _ = make(2, tiny_marian)
    initial = {k: v.clone() for k, v in first.distillation_modules.state_dict().items()}
    assert {"hybrid_gate.logit", "ckd.encoder.projections.1.weight", "ckd.encoder.projections.2.bias"} <= set(initial)
    first.train()
    # the checkpoint holds them with the student (they are a submodule of it while training), under a prefix
    saved = _auxiliary_part(load_file(str(tmp_path / "checkpoint-2" / "model.safetensors")))
    assert set(saved) == set(initial)
    for k, v in first.distillation_modules.state_dict().items():
        torch.testing.assert_close(saved[k], v)
        assert not torch.equal(saved[k], initial[k]), k  # they were trained

    fresh_model = tiny_seq2seq_model(tokenizer, "marian", d_model=32, encoder_layers=2, decoder_layers=2, seed=5)
    second, snapshot = make(4, fresh_model)
    assert not torch.equal(second.distillation_modules.state_dict()["hybrid_gate.logit"], saved["hybrid_gate.logit"])
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for k, v in saved.items():
        torch.testing.assert_close(snapshot.at_start[k], v, msg=k)  # restored before training went on
    # the student too, tied weights included (Transformers warns that the tied copies are "missing" from the
    # checkpoint: they are restored through the shared matrix)
    student = {k: v for k, v in load_file(str(tmp_path / "checkpoint-2" / "model.safetensors")).items()
               if not k.startswith(ATTRIBUTE + ".")}
    for k, v in student.items():
        torch.testing.assert_close(snapshot.model_at_start[k], v, msg=k)
    for tied in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(snapshot.model_at_start[tied], student["model.shared.weight"], msg=tied)
    assert second.state.global_step == 4
    resumed = _auxiliary_part(load_file(str(tmp_path / "checkpoint-4" / "model.safetensors")))
    assert all(not torch.equal(resumed[k], saved[k]) for k in saved)  # and trained further
    # their optimizer state was restored too (Adam's step count continues from 2)
    gate_state = second.optimizer.state[second.distillation_modules["hybrid_gate"].logit]
    assert int(gate_state["step"]) == 4


def test_exported_student_has_neither_gate_nor_projections(tmp_path, tokenizer, seqkd_set, tiny_marian, teacher):
    plain = copy.deepcopy(tiny_marian)
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=seqkd_set,
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                  args=_args(tmp_path, max_steps=1, hybrid_gate="input", alpha=0.6,
                                             intermediate_loss_weight=0.2))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert not os.path.exists(tmp_path / "final" / "distillation_modules.safetensors")
    exported = load_file(str(tmp_path / "final" / "model.safetensors"))
    plain.save_pretrained(tmp_path / "plain")
    assert set(exported) == set(load_file(str(tmp_path / "plain" / "model.safetensors")))
    assert not any("gate" in k or "projection" in k for k in exported)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "final")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in plain.parameters())


# ------------------------------------------------------------------------------------------ end to end, args
@pytest.mark.parametrize("kind", ["scalar", "input"])
def test_hybrid_trains_end_to_end(tmp_path, tokenizer, train_set, tiny_marian, teacher, kind):
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=train_set,
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                  args=_args(tmp_path, max_steps=8, hybrid_gate=kind, optim="adamw_torch",
                                             learning_rate=3e-3))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 8 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert logged[-1]["loss_sentence"] < logged[0]["loss_sentence"]
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_hybrid_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="hybrid_gate"):
        DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], hybrid_gate="learned")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], hybrid_gate="1.5")
    with pytest.raises(ValueError, match="needs alpha > 0"):
        DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], hybrid_gate="scalar", alpha=0.0)
    with pytest.raises(ValueError, match="strictly inside"):
        DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], hybrid_gate="input",
                                      hybrid_gate_init=0.95)
    with pytest.raises(ValueError, match="hybrid_gate_bounds"):
        DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], hybrid_gate_bounds="0.9,0.1")


# ------------------------------------------------------------------------------------ two processes (DDP)
_DDP_WORKER = '''
import os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_setup import make_trainer

out = sys.argv[1]
trainer = make_trainer(out, per_device_train_batch_size=4)
assert trainer.accelerator.num_processes == 2
with torch.no_grad():  # a different initialisation on process 1: the trainer must broadcast process 0's
    for p in trainer.distillation_modules.parameters():
        p.add_(trainer.args.process_index)
trainer.train()
torch.save({"student": trainer.model.state_dict(), "modules": trainer.distillation_modules.state_dict()},
           os.path.join(out, f"rank{trainer.args.process_index}.pt"))
'''

_DDP_SETUP = '''
import torch
from torch.utils.data import SequentialSampler
from hf_seqkd import (DistillationDataCollator, DistillationTrainer, DistillationTrainingArguments, make_toy_corpus,
                      prepare_distillation_dataset, tiny_seq2seq_model, train_tokenizer)


class SequentialTrainer(DistillationTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def make_trainer(out, **kw):
    corpus = make_toy_corpus(num_train=200, num_test=10, seed=0)
    tokenizer = train_tokenizer(list(corpus["train"]["source"]) + list(corpus["train"]["target"]), vocab_size=200)
    data = prepare_distillation_dataset(corpus["train"].select(range(16)), tokenizer)
    student = tiny_seq2seq_model(tokenizer, d_model=32, encoder_layers=2, decoder_layers=2, seed=0)
    teacher = tiny_seq2seq_model(tokenizer, d_model=48, encoder_layers=4, decoder_layers=2, seed=1)
    args = DistillationTrainingArguments(
        output_dir=out + "/run", max_steps=2, learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant",
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, alpha=0.6,
        intermediate_loss_weight=0.3, layer_mapping="regular_comb", hybrid_gate="input", generation_max_length=8,
        dataloader_num_workers=0, **kw)
    trainer = SequentialTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                data_collator=DistillationDataCollator(tokenizer, student))
    with torch.no_grad():
        trainer.distillation_modules["hybrid_gate"].proj.weight.copy_(torch.linspace(-0.05, 0.05, 32))
    return trainer
'''


@pytest.mark.slow
def test_two_processes_equal_one_big_batch(tmp_path):
    """Under torchrun (gloo, CPU), the gate and the projections get process 0's initial values and averaged
    gradients: both processes end with the same modules, equal to one process training on both halves."""
    import subprocess
    import sys

    (tmp_path / "ddp_setup.py").write_text(_DDP_SETUP)
    (tmp_path / "worker.py").write_text(_DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "worker.py"), str(tmp_path)], capture_output=True, text=True, timeout=240,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    sys.path.insert(0, str(tmp_path))
    try:
        from ddp_setup import make_trainer
    finally:
        sys.path.remove(str(tmp_path))
    single = make_trainer(str(tmp_path / "single"), per_device_train_batch_size=8)
    initial = {k: v.clone() for k, v in single.distillation_modules.state_dict().items()}
    single.train()
    for part in ("modules", "student"):
        expected = single.distillation_modules.state_dict() if part == "modules" else single.model.state_dict()
        for name, value in expected.items():
            for rank in ranks:
                torch.testing.assert_close(rank[part][name], value, rtol=1e-4, atol=1e-6, msg=f"{part}: {name}")
    assert all(not torch.equal(initial[k], v) for k, v in single.distillation_modules.state_dict().items())


def test_evaluation_with_and_without_generation(tmp_path, tokenizer, seqkd_set, tiny_marian, teacher):
    for generate in (False, True):
        trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=seqkd_set,
                                      eval_dataset=seqkd_set.select(range(4)), processing_class=tokenizer,
                                      data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                      args=_args(tmp_path / str(generate), hybrid_gate="input", alpha=0.5,
                                                 intermediate_loss_weight=0.2, predict_with_generate=generate,
                                                 per_device_eval_batch_size=4))
        metrics = trainer.evaluate()
        assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
        logged = trainer.state.log_history[-1]
        if not generate:  # the distillation terms are logged for evaluation too
            assert {"eval_loss_token", "eval_loss_sentence", "eval_hybrid_gate", "eval_loss_ckd"} <= set(logged)


def test_greedy_teacher_decoding_stays_within_the_position_table(tmp_path, tokenizer, toy_corpus):
    """Sources of 207 and 241 tokens, a teacher with 256 positions that never stops: the default limit (twice the
    longest source plus 10) is capped at the position table instead of crashing train() with an IndexError."""
    student = tiny_seq2seq_model(tokenizer, "marian", d_model=16, encoder_layers=1, decoder_layers=1, seed=0)
    teacher = tiny_seq2seq_model(tokenizer, "marian", d_model=16, encoder_layers=1, decoder_layers=1, seed=2)
    teacher.final_logits_bias[0, tokenizer.eos_token_id] = float("-inf")  # never stops
    words = " ".join(toy_corpus["train"]["source"][:200]).split()
    rows = {"source": [" ".join(words[:n]) for n in (400, 400)], "target": ["a b", "c d"]}
    from datasets import Dataset

    data = prepare_distillation_dataset(Dataset.from_dict(rows), tokenizer, max_source_length=241)
    data = data.map(lambda r, i: {"input_ids": r["input_ids"][:(207, 241)[i] - 1] + [tokenizer.eos_token_id],
                                  "attention_mask": [1] * (207, 241)[i]}, with_indices=True)
    assert [len(x) for x in data["input_ids"]] == [207, 241]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data,
                                  data_collator=DistillationDataCollator(tokenizer, student),
                                  args=training_args(tmp_path, alpha=1.0, hybrid_gate="0.5", max_steps=1,
                                                     per_device_train_batch_size=2))
    trainer.train()
    assert max(len(v) for v in trainer.teacher_sequences._store.values()) == 256
