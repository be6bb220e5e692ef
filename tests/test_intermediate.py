"""CKD (Wu et al. 2020): layer mappings, the normalised hidden-state loss, and its wiring in the trainer."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

from hf_seqkd import (
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    distillation_loss,
    tiny_seq2seq_model,
)
from hf_seqkd.intermediate import (
    LAYER_MAPPING_STRATEGIES,
    CombinatorialLayerLoss,
    build_ckd_modules,
    concat_teacher_layers,
    layer_mapping,
    normalized_squared_error,
    regular_groups,
    resolve_layer_mapping,
)
from hf_seqkd.losses import sequence_cross_entropy

from _helpers import SequentialTrainer, training_args

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------ mappings
PAPER_6_TO_2 = {  # Wu et al. 2020, 1-based teacher layers for student layers 1 and 2
    "skip": [[3], [6]],
    "regular_comb": [[1, 2, 3], [4, 5, 6]],
    "overlap_comb": [[1, 2, 3, 4], [3, 4, 5, 6]],
    "skip_middle": [[1, 2], [5, 6]],
    "cross_comb": [[1, 3], [4, 6]],
    "skip_comb": [[1, 3, 5], [2, 4, 6]],
}

RULE_6_TO_3 = {  # the documented rule (hf_seqkd.intermediate docstring), worked out by hand
    "skip": [[2], [4], [6]],
    "regular_comb": [[1, 2], [3, 4], [5, 6]],
    "overlap_comb": [[1, 2, 3], [2, 3, 4, 5], [4, 5, 6]],
    "skip_middle": [[1], [3, 4], [6]],
    "cross_comb": [[1], [3], [5]],
    "skip_comb": [[1, 4], [2, 5], [3, 6]],
}

RULE_12_TO_6 = {
    "skip": [[2], [4], [6], [8], [10], [12]],
    "regular_comb": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]],
    "overlap_comb": [[1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9], [8, 9, 10, 11], [10, 11, 12]],
    "skip_middle": [[1], [3], [5], [8], [10], [12]],
    "cross_comb": [[1], [3], [5], [7], [9], [11]],
    "skip_comb": [[1, 7], [2, 8], [3, 9], [4, 10], [5, 11], [6, 12]],
}


@pytest.mark.parametrize("strategy", LAYER_MAPPING_STRATEGIES)
def test_paper_tables_6_to_2(strategy):
    assert layer_mapping(strategy, 6, 2) == {1: PAPER_6_TO_2[strategy][0], 2: PAPER_6_TO_2[strategy][1]}


@pytest.mark.parametrize("n, m, table", [(6, 3, RULE_6_TO_3), (12, 6, RULE_12_TO_6)])
def test_documented_rule_for_other_depths(n, m, table):
    for strategy in LAYER_MAPPING_STRATEGIES:
        got = layer_mapping(strategy, n, m)
        assert list(got) == list(range(1, m + 1)), strategy
        assert list(got.values()) == table[strategy], strategy


def test_every_strategy_is_well_formed_for_any_depths():
    for n in range(1, 13):
        for m in range(1, n + 1):
            groups = regular_groups(n, m)
            sizes = [len(g) for g in groups]
            assert sum(groups, []) == list(range(1, n + 1))  # contiguous partition in order
            assert max(sizes) - min(sizes) <= 1
            for strategy in LAYER_MAPPING_STRATEGIES:
                mapping = layer_mapping(strategy, n, m)
                assert sorted(mapping) == list(range(1, m + 1))
                for group in mapping.values():
                    assert group and group == sorted(set(group)) and 1 <= group[0] and group[-1] <= n
            assert layer_mapping("skip", n, m)[m] == [n]  # PKD-skip always uses the teacher's last layer
            assert sorted(sum(layer_mapping("skip_comb", n, m).values(), [])) == list(range(1, n + 1))


def test_student_deeper_than_teacher_needs_an_explicit_mapping():
    with pytest.raises(ValueError, match="explicit mapping"):
        layer_mapping("regular_comb", 2, 3)
    assert resolve_layer_mapping('{"1": [1], "3": [2]}', 2, 3) == {1: [1], 3: [2]}


def test_explicit_mappings():
    expected = {1: [1, 2, 3], 2: [4, 5, 6]}
    assert resolve_layer_mapping('{"1": [1, 2, 3], "2": [4, 5, 6]}', 6, 2) == expected
    assert resolve_layer_mapping({2: [4, 5, 6], 1: [1, 2, 3]}, 6, 2) == expected
    assert resolve_layer_mapping([[1, 2, 3], [4, 5, 6]], 6, 2) == expected
    assert resolve_layer_mapping('{"2": [6]}', 6, 2) == {2: [6]}  # partial: student layer 1 not distilled
    per_stack = json.dumps({"encoder": {"1": [2, 4], "2": [6]}, "decoder": "skip"})
    assert resolve_layer_mapping(per_stack, 6, 2, "encoder") == {1: [2, 4], 2: [6]}
    assert resolve_layer_mapping(per_stack, 4, 2, "decoder") == {1: [2], 2: [4]}


@pytest.mark.parametrize("spec, message", [
    ("regular", "neither a strategy"),
    ('{"1": [1, 2, 3], "2": [4, 5, 6]', "nor valid JSON"),
    ('{"0": [1]}', r"student layer 0 does not exist; layers are numbered 1\.\.2 \(1-based\)"),
    ('{"3": [1]}', "student layer 3 does not exist"),
    ('{"1": [0, 1]}', r"teacher layer\(s\) \[0\] of student layer 1 do not exist; the teacher has layers 1\.\.6"),
    ('{"2": [7]}', r"teacher layer\(s\) \[7\]"),
    ('{"1": []}', "needs a non-empty list of teacher layers"),
    ('{"1": 3}', "needs a non-empty list of teacher layers"),
    ('{"1": [2, 2]}', "lists a teacher layer twice"),
    ('{"one": [1]}', "student layer 'one' must be an integer"),
    ('{"1": ["a"]}', "teacher layer 'a' of student layer 1 must be an integer"),
    ("{}", "the mapping is empty"),
    ("[[1, 2, 3]]", "needs one group per student layer"),
    ('{"encoder": {"1": [1]}, "middle": {}}', "only have the keys 'encoder' and 'decoder'"),
    ('{"decoder": {"1": [1]}}', "no entry for the encoder"),
])
def test_explicit_mapping_errors_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_layer_mapping(spec, 6, 2, "encoder")


def test_bad_mapping_is_rejected_by_the_arguments(tmp_path):
    with pytest.raises(ValueError, match="neither a strategy"):
        DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], layer_mapping="{1: [1]}")
    with pytest.raises(ValueError, match="intermediate_layers"):
        DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], intermediate_layers="all")


# ----------------------------------------------------------------------------------------------------- loss
def _states(n_layers, batch, length, width, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, width, generator=g) for _ in range(n_layers + 1))


def test_concatenated_sizes_and_projection_shapes_when_widths_differ(tokenizer):
    student = tiny_seq2seq_model(tokenizer, d_model=32, encoder_layers=2, decoder_layers=2)
    teacher = tiny_seq2seq_model(tokenizer, d_model=48, encoder_layers=6, decoder_layers=4)
    modules = build_ckd_modules(student.config, teacher.config, "overlap_comb", "both")
    assert set(modules) == {"encoder", "decoder"}
    assert modules["encoder"].mapping == {1: [1, 2, 3, 4], 2: [3, 4, 5, 6]}
    assert modules["decoder"].mapping == {1: [1, 2, 3], 2: [2, 3, 4]}  # 4 -> 2: groups [1,2] [3,4], extended
    assert modules["encoder"].projections["1"].weight.shape == (4 * 48, 32)
    assert modules["decoder"].projections["2"].weight.shape == (3 * 48, 32)
    teacher_states = _states(6, 2, 5, 48, seed=0)
    assert concat_teacher_layers(teacher_states, [1, 2, 3, 4]).shape == (2, 5, 4 * 48)
    torch.testing.assert_close(concat_teacher_layers(teacher_states, [3, 5])[..., 48:], teacher_states[5])
    loss = modules["encoder"](_states(2, 2, 5, 32, seed=1), teacher_states, torch.ones(2, 5), reduction="mean")
    assert loss.shape == () and 0 < loss.item() < 8  # two layers, each per-token term in [0, 4]


def test_zero_when_projected_student_equals_teacher_and_positive_otherwise():
    d_t, k = 3, 2
    module = CombinatorialLayerLoss({1: [1, 2]}, student_hidden_size=k * d_t, teacher_hidden_size=d_t)
    with torch.no_grad():
        module.projections["1"].weight.copy_(torch.eye(k * d_t))
        module.projections["1"].bias.zero_()
    student = _states(1, 2, 4, k * d_t, seed=0)
    # teacher layers 1 and 2 are the two halves of the student's layer 1, scaled (normalisation removes the scale)
    teacher = (torch.zeros(2, 4, d_t), 3.0 * student[1][..., :d_t], 3.0 * student[1][..., d_t:])
    mask = torch.ones(2, 4)
    assert module(student, teacher, mask).item() == pytest.approx(0.0, abs=1e-5)
    other = (teacher[0], teacher[1], teacher[2] + torch.randn(2, 4, d_t))
    assert module(student, other, mask).item() > 1e-2
    # the pure function: 2 - 2 cos per position
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    torch.testing.assert_close(normalized_squared_error(s, t, reduction="none"), 2 - 2 * cos, rtol=1e-5, atol=1e-5)
    assert normalized_squared_error(s, s).item() == pytest.approx(0.0, abs=1e-5)


def test_padding_does_not_change_the_loss():
    torch.manual_seed(0)
    module = CombinatorialLayerLoss({1: [1, 3], 2: [2, 4]}, student_hidden_size=8, teacher_hidden_size=5)
    student, teacher = _states(2, 3, 6, 8, seed=0), _states(4, 3, 6, 5, seed=1)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 2:] = False
    base = module(student, teacher, mask)
    noisy_s = tuple(torch.where(mask.unsqueeze(-1), h, 100 * torch.randn_like(h)) for h in student)
    noisy_t = tuple(torch.where(mask.unsqueeze(-1), h, torch.randn_like(h)) for h in teacher)
    torch.testing.assert_close(module(noisy_s, noisy_t, mask), base)
    torch.testing.assert_close(module(student, teacher, mask, reduction="mean"), base / mask.sum())
    changed = tuple(h + torch.randn_like(h) * mask.unsqueeze(-1) for h in teacher)
    assert not torch.allclose(module(student, changed, mask), base)


# -------------------------------------------------------------------------------------------------- trainer
def _args(tmp_path, **kw):
    return training_args(tmp_path, **{**dict(alpha=0.2, intermediate_loss_weight=0.7), **kw})


@pytest.fixture
def deep_teacher(tokenizer):
    """A 6+4-layer teacher of width 48 (the student is 2+2 of width 32)."""
    return tiny_seq2seq_model(tokenizer, "marian", d_model=48, encoder_layers=6, decoder_layers=4, seed=1)


def test_loss_is_the_documented_mixture(tmp_path, tokenizer, train_set, tiny_marian, deep_teacher):
    alpha, beta = 0.2, 0.7
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=deep_teacher, train_dataset=train_set,
                                  args=_args(tmp_path, layer_mapping="cross_comb", intermediate_layers="both"),
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian))
    batch = DistillationDataCollator(tokenizer, tiny_marian)([train_set[i] for i in range(4)])
    loss = trainer.compute_loss(tiny_marian, dict(batch))
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
        s = tiny_marian(**inputs, output_hidden_states=True)
        t = deep_teacher(**inputs, output_hidden_states=True)
        labels, mask = batch["labels"], batch["attention_mask"]
        ce = sequence_cross_entropy(s.logits, labels)
        kd = distillation_loss(s.logits, t.logits, labels)
        enc, dec = trainer.distillation_modules["ckd"]["encoder"], trainer.distillation_modules["ckd"]["decoder"]
        assert enc.mapping == {1: [1, 3], 2: [4, 6]} and dec.mapping == {1: [1], 2: [3]}
        ckd_enc = enc(s.encoder_hidden_states, t.encoder_hidden_states, mask, reduction="mean")
        ckd_dec = dec(s.decoder_hidden_states, t.decoder_hidden_states, labels.ne(-100), reduction="mean")
    expected = (1 - alpha - beta) * ce + alpha * kd + beta * (ckd_enc + ckd_dec)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ckd_enc.item() > 0 and ckd_dec.item() > 0


def test_gradient_accumulation_equals_one_big_batch_with_ckd(tmp_path, tokenizer, train_set, tiny_marian,
                                                             deep_teacher):
    a, b = copy.deepcopy(tiny_marian), copy.deepcopy(tiny_marian)
    collator = DistillationDataCollator(tokenizer, model=tiny_marian)
    kw = dict(intermediate_layers="both", layer_mapping="overlap_comb")
    accumulated = SequentialTrainer(model=a, teacher_model=deep_teacher, train_dataset=train_set,
                                     data_collator=collator,
                                     args=_args(tmp_path / "ga", gradient_accumulation_steps=2, **kw))
    big = SequentialTrainer(model=b, teacher_model=deep_teacher, train_dataset=train_set, data_collator=collator,
                             args=_args(tmp_path / "big", per_device_train_batch_size=8, **kw))
    big.distillation_modules.load_state_dict(accumulated.distillation_modules.state_dict())
    initial = copy.deepcopy(big.distillation_modules.state_dict())
    accumulated.train()
    big.train()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    moved = 0.0
    for name, p in accumulated.distillation_modules.state_dict().items():
        torch.testing.assert_close(p, big.distillation_modules.state_dict()[name], rtol=1e-4, atol=1e-6, msg=name)
        moved += (p - initial[name]).abs().sum().item()
    assert moved > 0  # the projections are trained


def test_ckd_trains_end_to_end_and_is_logged(tmp_path, tokenizer, train_set, tiny_marian, deep_teacher):
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=deep_teacher, train_dataset=train_set,
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                  args=_args(tmp_path, max_steps=8, optim="adamw_torch", learning_rate=3e-3,
                                             layer_mapping="skip_comb"))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 8 and all("loss_ckd" in h and "loss_ce" in h and "loss_kd" in h for h in logged)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert logged[-1]["loss_ckd"] < logged[0]["loss_ckd"]
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_projections_are_not_exported(tmp_path, tokenizer, train_set, tiny_marian, deep_teacher):
    plain = copy.deepcopy(tiny_marian)
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=deep_teacher, train_dataset=train_set,
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                  args=_args(tmp_path, max_steps=1, intermediate_layers="both"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert not os.path.exists(tmp_path / "final" / "distillation_modules.safetensors")
    exported = load_file(str(tmp_path / "final" / "model.safetensors"))
    plain.save_pretrained(tmp_path / "plain")
    assert set(exported) == set(load_file(str(tmp_path / "plain" / "model.safetensors")))
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "final")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in plain.parameters())
    assert type(loaded) is type(plain)
