"""DistillationTrainer: exactness of alpha=0, gradient accumulation, checkpoints, vocabulary checks, logging."""

import copy
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, Seq2SeqTrainer, Seq2SeqTrainingArguments

from hf_seqkd import (
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    distillation_loss,
    tiny_seq2seq_model,
)
from hf_seqkd.losses import sequence_cross_entropy

from _helpers import InOrder, training_args
from _helpers import SequentialTrainer as SeqDistillationTrainer


class SeqSeq2SeqTrainer(InOrder, Seq2SeqTrainer):
    pass


def _args(tmp_path, cls=DistillationTrainingArguments, **kw):
    return training_args(tmp_path, cls, **kw)


@pytest.fixture
def teacher(tokenizer):
    return tiny_seq2seq_model(tokenizer, "marian", d_model=48, encoder_layers=2, decoder_layers=2, seed=1)


def _batch(train_set, tokenizer, model, n=4):
    collator = DistillationDataCollator(tokenizer, model=model)
    return collator([train_set[i] for i in range(n)])


class _ExplodingTeacher(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("the teacher must not run with alpha=0")


def test_alpha_zero_is_exactly_seq2seq_trainer(tmp_path, tokenizer, train_set, tiny_marian):
    plain_model = copy.deepcopy(tiny_marian)
    kd_model = copy.deepcopy(tiny_marian)
    collator = DistillationDataCollator(tokenizer, model=tiny_marian)
    plain = SeqSeq2SeqTrainer(model=plain_model, args=_args(tmp_path / "a", Seq2SeqTrainingArguments,
                                                             label_smoothing_factor=0.1),
                              train_dataset=train_set, data_collator=collator)
    kd = SeqDistillationTrainer(model=kd_model, teacher_model=_ExplodingTeacher(),
                                args=_args(tmp_path / "b", alpha=0.0, label_smoothing_factor=0.1),
                                train_dataset=train_set, data_collator=collator)
    assert kd.teacher_model is None
    batch = _batch(train_set, tokenizer, tiny_marian)
    assert kd.compute_loss(kd_model, batch).item() == pytest.approx(plain.compute_loss(plain_model, batch).item(),
                                                                     rel=1e-6)
    plain.train()
    kd.train()
    for (name, p), q in zip(plain_model.named_parameters(), kd_model.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert not torch.equal(next(plain_model.parameters()), next(tiny_marian.parameters()))


def test_loss_is_the_documented_mixture(tmp_path, tokenizer, train_set, tiny_marian, teacher):
    alpha, temperature, eps = 0.3, 2.0, 0.1
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher,
                                  args=_args(tmp_path, alpha=alpha, temperature=temperature,
                                             label_smoothing_factor=eps, divergence="jsd", jsd_beta=0.4),
                                  train_dataset=train_set,
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian))
    batch = _batch(train_set, tokenizer, tiny_marian)
    loss = trainer.compute_loss(tiny_marian, dict(batch))
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
        s = tiny_marian(**inputs).logits
        t = teacher(**inputs).logits
    ce = sequence_cross_entropy(s, batch["labels"], label_smoothing=eps)
    kd = distillation_loss(s, t, batch["labels"], divergence="jsd", jsd_beta=0.4, temperature=temperature)
    assert loss.item() == pytest.approx(((1 - alpha) * ce + alpha * kd).item(), rel=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, tokenizer, train_set, tiny_marian, teacher, alpha):
    a, b = copy.deepcopy(tiny_marian), copy.deepcopy(tiny_marian)
    collator = DistillationDataCollator(tokenizer, model=tiny_marian)
    accumulated = SeqDistillationTrainer(model=a, teacher_model=teacher, train_dataset=train_set,
                                         data_collator=collator,
                                         args=_args(tmp_path / "ga", alpha=alpha, per_device_train_batch_size=4,
                                                    gradient_accumulation_steps=2))
    big = SeqDistillationTrainer(model=b, teacher_model=teacher, train_dataset=train_set, data_collator=collator,
                                 args=_args(tmp_path / "big", alpha=alpha, per_device_train_batch_size=8))
    accumulated.train()
    big.train()
    moved = 0.0
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), tiny_marian.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        moved += (p - r).abs().sum().item()
    assert moved > 0


def test_teacher_receives_no_gradient_and_is_not_saved(tmp_path, tokenizer, train_set, tiny_marian, teacher):
    before = copy.deepcopy(teacher.state_dict())
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=train_set,
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                  args=_args(tmp_path, alpha=0.5, max_steps=2, save_strategy="steps", save_steps=2))
    trainer.train()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])
    saved = load_file(os.path.join(tmp_path, "checkpoint-2", "model.safetensors"))
    student_keys = set(tiny_marian.state_dict())
    assert set(saved) <= student_keys
    # the teacher (width 48) left no tensor in the checkpoint
    assert all(48 not in v.shape for v in saved.values())
    trainer.save_model(str(tmp_path / "final"))
    assert all(48 not in v.shape for v in load_file(str(tmp_path / "final" / "model.safetensors")).values())


def test_logs_ce_and_kd_separately(tmp_path, tokenizer, train_set, tiny_marian, teacher):
    trainer = DistillationTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=train_set,
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                  args=_args(tmp_path, alpha=0.5, max_steps=2))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("loss_ce" in h and "loss_kd" in h for h in logged)
    assert all(h["loss_kd"] > 0 and h["loss_ce"] > 0 for h in logged)


def test_vocabulary_mismatch_is_a_named_error(tmp_path, tokenizer, train_set, tiny_marian):
    from transformers import MarianConfig, MarianMTModel

    other = MarianMTModel(MarianConfig(vocab_size=len(tokenizer) + 20, d_model=16, encoder_layers=1, decoder_layers=1,
                                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                       decoder_ffn_dim=32, pad_token_id=len(tokenizer) + 19))
    with pytest.raises(ValueError, match=rf"teacher vocabulary {len(tokenizer) + 20} != student vocabulary "
                                         rf"{len(tokenizer)}"):
        DistillationTrainer(model=tiny_marian, teacher_model=other, args=_args(tmp_path), train_dataset=train_set)


def test_missing_teacher_is_a_named_error(tmp_path, train_set, tiny_marian):
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTrainer(model=tiny_marian, args=_args(tmp_path, alpha=0.5), train_dataset=train_set)


def test_teacher_loaded_from_path_and_cast(tmp_path, tokenizer, train_set, tiny_marian, teacher):
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(model=tiny_marian, train_dataset=train_set,
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                  args=_args(tmp_path / "run", alpha=0.5, teacher_dtype="bfloat16",
                                             teacher_model_name_or_path=str(tmp_path / "teacher")))
    assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16
    trainer.train()  # the KD loss accepts bf16 teacher logits next to a float32 student


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="divergence"):
        DistillationTrainingArguments(output_dir=str(tmp_path), divergence="kl", report_to=[])
    with pytest.raises(ValueError, match="kd_target"):
        DistillationTrainingArguments(output_dir=str(tmp_path), kd_target="beam", report_to=[])
    with pytest.raises(ValueError, match="alpha"):
        DistillationTrainingArguments(output_dir=str(tmp_path), alpha=1.5, report_to=[])


_WORLD_SIZE_WORKER = '''
import json, os, sys
from transformers import Seq2SeqTrainingArguments
from hf_seqkd import DistillationTrainingArguments
if sys.argv[2] == "ours":
    args = DistillationTrainingArguments(output_dir=sys.argv[1], report_to=[])
else:
    args = Seq2SeqTrainingArguments(output_dir=sys.argv[1], report_to=[])
with open(os.path.join(sys.argv[1], f"{sys.argv[2]}{os.environ['RANK']}.json"), "w") as f:
    json.dump([args.world_size, args.process_index], f)
'''


@pytest.mark.slow
def test_torchrun_without_accelerator_trains_as_one_distributed_job(tmp_path):
    """Two processes under torchrun on a CPU machine form one job (world size 2, ranks 0 and 1). Plain
    Transformers arguments stay single-process there unless use_cpu is set; ours switch it on."""
    import json
    import subprocess
    import sys

    (tmp_path / "worker.py").write_text(_WORLD_SIZE_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    seen = {}
    for which in ("ours", "plain"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(tmp_path / "worker.py"), str(tmp_path), which], capture_output=True, text=True,
                              timeout=240, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        seen[which] = [json.loads((tmp_path / f"{which}{r}.json").read_text()) for r in (0, 1)]
    assert seen["ours"] == [[2, 0], [2, 1]]
    if not torch.cuda.is_available():  # what the switch is for (if Transformers changes this, the test says so)
        assert seen["plain"] == [[1, 0], [1, 0]]


def test_the_same_model_as_teacher_and_student_is_refused_at_construction(tmp_path, train_set, tiny_marian):
    """Passing one module twice used to freeze the student silently and fail later inside train()."""
    trainable = [p.requires_grad for p in tiny_marian.parameters()]
    with pytest.raises(ValueError, match="same model"):
        DistillationTrainer(model=tiny_marian, teacher_model=tiny_marian, args=_args(tmp_path, alpha=0.5),
                            train_dataset=train_set)
    sharing = copy.deepcopy(tiny_marian)
    sharing.model.shared = tiny_marian.model.shared  # a shallow copy shares the embedding matrix
    with pytest.raises(ValueError, match="share"):
        DistillationTrainer(model=tiny_marian, teacher_model=sharing, args=_args(tmp_path, alpha=0.5),
                            train_dataset=train_set)
    assert [p.requires_grad for p in tiny_marian.parameters()] == trainable  # nothing was frozen


def test_a_banned_token_keeps_training_finite(tmp_path, tokenizer, train_set, tiny_marian, teacher):
    """A teacher that bans a token with a -inf output bias, and a student that copied it: every logged loss and
    every weight stays finite, for each divergence (reverse KL used to turn the student's weights into NaN)."""
    banned = 5
    for model in (tiny_marian, teacher):
        model.final_logits_bias[0, banned] = float("-inf")
    for divergence in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        student = copy.deepcopy(tiny_marian)
        trainer = SeqDistillationTrainer(model=student, teacher_model=teacher, train_dataset=train_set,
                                         data_collator=DistillationDataCollator(tokenizer, student),
                                         args=_args(tmp_path / divergence, alpha=0.5, divergence=divergence,
                                                    max_steps=3, label_smoothing_factor=0.1))
        trainer.train()
        losses = [h[k] for h in trainer.state.log_history for k in ("loss", "loss_kd", "loss_ce") if k in h]
        assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses), (divergence, losses)
        assert all(torch.isfinite(p).all() for p in student.parameters()), divergence


def test_early_stopping_stops_when_validation_stops_improving(tmp_path, train_set, tiny_marian, tokenizer):
    """With learning rate 0 the validation loss never improves: patience 2 stops the run after its third
    evaluation (the first sets the best) instead of the 40 steps it was given; the best checkpoint is kept."""
    from hf_seqkd import DistillationDataCollator

    settings = dict(alpha=0.0, learning_rate=0.0, num_train_epochs=10, max_steps=-1, eval_strategy="steps",
                    eval_steps=1, save_strategy="steps", save_steps=1, save_total_limit=1,
                    load_best_model_at_end=True, metric_for_best_model="loss")
    steps = {}
    for patience in (None, 2):
        trainer = DistillationTrainer(model=copy.deepcopy(tiny_marian), train_dataset=train_set,
                                      eval_dataset=train_set.select(range(4)),
                                      data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                      args=_args(tmp_path / str(patience), early_stopping_patience=patience,
                                                 **settings))
        trainer.train()
        steps[patience] = trainer.state.global_step
    assert steps == {None: 40, 2: 3}


def test_early_stopping_can_be_added_when_resuming(tmp_path, train_set, tiny_marian, tokenizer):
    """A run saved without early stopping, resumed with it: Transformers alone fails at the first save
    (``KeyError: 'EarlyStoppingCallback'``, the checkpoint's state has no entry for it); here it goes on and saves."""
    from hf_seqkd import DistillationDataCollator

    settings = dict(alpha=0.0, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                    metric_for_best_model="loss", load_best_model_at_end=True)

    def trainer(**kw):
        return DistillationTrainer(model=copy.deepcopy(tiny_marian), train_dataset=train_set,
                                   eval_dataset=train_set.select(range(4)),
                                   data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                   args=_args(tmp_path, **settings, **kw))

    trainer(max_steps=2).train()
    resumed = trainer(max_steps=4, early_stopping_patience=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4 and (tmp_path / "checkpoint-4" / "trainer_state.json").exists()


class _UserEarlyStopping(EarlyStoppingCallback):
    """A user's subclass: Transformers stores its state under its own class name."""


@pytest.mark.parametrize("user_callback, stops_at", [(None, 4), ("base", 4), ("subclass", 3), ("base_restored", 4)])
def test_a_resumed_run_stops_early_where_the_uninterrupted_run_stops(tmp_path, train_set, tiny_marian, tokenizer,
                                                                      user_callback, stops_at):
    """Early stopping's count of evaluations without improvement survives resuming: with learning rate 0 (the
    validation loss never improves) and patience 3, the run stops after its fourth evaluation, and so does a run
    cut after two and resumed (Transformers alone restarts the count on resuming and stops it after the fifth), and
    one resumed from its last checkpoint trains no further, loading the best checkpoint as the uninterrupted run
    did; also beside a second early-stopping callback of the user's (patience 5), whose states Transformers stores
    as a list that grows at every save, and beside a user's subclass with patience 2, which stops the run itself."""
    from hf_seqkd import DistillationDataCollator

    settings = dict(alpha=0.0, learning_rate=0.0, num_train_epochs=10, eval_strategy="steps", eval_steps=1,
                    save_strategy="steps", save_steps=1, metric_for_best_model="loss", load_best_model_at_end=True,
                    early_stopping_patience=3)
    user = {None: None, "base": lambda: EarlyStoppingCallback(5), "subclass": lambda: _UserEarlyStopping(2),
            "base_restored": lambda: EarlyStoppingCallback(5)}
    if user_callback == "base_restored":  # Transformers' own restore, which pairs the callbacks with the oldest states
        settings["restore_callback_states_from_checkpoint"] = True

    def trainer(out, **kw):
        return DistillationTrainer(model=copy.deepcopy(tiny_marian), train_dataset=train_set,
                                   eval_dataset=train_set.select(range(4)),
                                   data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                   callbacks=[user[user_callback]()] if user_callback else None,
                                   args=_args(out, **{**settings, **kw}))

    whole = trainer(tmp_path / "whole", max_steps=40)
    whole.train()
    trainer(tmp_path / "cut", max_steps=2).train()
    resumed = trainer(tmp_path / "cut", max_steps=40)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert whole.state.global_step == stops_at
    assert resumed.state.global_step == whole.state.global_step
    # resumed from the checkpoint of the evaluation that stopped it, the run trains no further (Transformers alone
    # trains one more step) and ends as the uninterrupted one did: the best checkpoint's weights loaded
    last = str(tmp_path / "whole" / f"checkpoint-{stops_at}")
    again = trainer(tmp_path / "whole", max_steps=40)
    loaded = []
    load_best = again._load_best_model
    again._load_best_model = lambda: loaded.append(again.state.best_model_checkpoint) or load_best()
    again.train(resume_from_checkpoint=last)
    assert again.state.global_step == stops_at and not (tmp_path / "whole" / f"checkpoint-{stops_at + 1}").exists()
    assert loaded == [str(tmp_path / "whole" / "checkpoint-1")]
    # nothing left over for a later run on the same trainer: here the resumed run had no epoch left to skip
    ended = trainer(tmp_path / "ended", max_steps=stops_at)
    ended.train(resume_from_checkpoint=last)
    assert ended.state.global_step == stops_at
    ended.train()
    assert ended.state.global_step == stops_at


def test_early_stopping_settings_are_checked(tmp_path):
    def make(**kw):
        return DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], **kw)

    with pytest.raises(ValueError, match="needs evaluation during training"):
        make(early_stopping_patience=2)
    with pytest.raises(ValueError, match="metric_for_best_model"):
        make(early_stopping_patience=2, eval_strategy="epoch", save_strategy="epoch")
    with pytest.raises(ValueError, match=">= 1"):
        make(early_stopping_patience=0, eval_strategy="epoch")
    with pytest.raises(ValueError, match="set predict_with_generate=True"):  # else it fails at the first evaluation
        make(early_stopping_patience=2, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
             metric_for_best_model="bleu")
    make(early_stopping_patience=2, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
         metric_for_best_model="bleu", predict_with_generate=True)


def test_validation_with_generate_leaves_the_students_generation_config_as_it_was(tmp_path, train_set, tiny_marian,
                                                                                   tokenizer):
    """Seq2SeqTrainer's generating prediction step fills the student's generation config with every default in place
    (``max_length`` 20 among them); the student saved after validating must keep the settings it came with."""
    import json

    from hf_seqkd import make_compute_metrics

    student = copy.deepcopy(tiny_marian)
    metadata = ("transformers_version", "_from_model_config")

    def settings(config_dict):
        return {k: v for k, v in config_dict.items() if k not in metadata}

    before = settings(student.generation_config.to_diff_dict())
    trainer = DistillationTrainer(model=student, train_dataset=train_set, eval_dataset=train_set.select(range(4)),
                                  data_collator=DistillationDataCollator(tokenizer, student),
                                  compute_metrics=make_compute_metrics(tokenizer),
                                  args=_args(tmp_path, alpha=0.0, max_steps=2, eval_strategy="steps", eval_steps=1,
                                             predict_with_generate=True, generation_max_length=8))
    trainer.train()
    assert sum("eval_bleu" in h for h in trainer.state.log_history) == 2  # it did validate, generating
    trainer.save_model(str(tmp_path / "student"))
    with open(tmp_path / "student" / "generation_config.json") as f:
        saved = settings(json.load(f))
    assert "max_length" not in saved
    assert saved == before


def test_the_saved_student_is_the_trained_one_for_a_loaded_marian_model(tmp_path, train_set, tiny_marian, tokenizer):
    """Transformers 5 loads Marian's sinusoidal position tables as trainable parameters, but ``save_pretrained``
    leaves them out (they are recomputed when the model is loaded): trained, they made the saved student differ from
    the one trained and validated. The student loaded from disk, trained at a high learning rate, saved and loaded
    again gives the logits the trained student gave."""
    from hf_seqkd import DistillationDataCollator

    tiny_marian.save_pretrained(tmp_path / "init")
    student = type(tiny_marian).from_pretrained(tmp_path / "init")
    trainer = DistillationTrainer(model=student, train_dataset=train_set,
                                  data_collator=DistillationDataCollator(tokenizer, student),
                                  args=_args(tmp_path / "run", alpha=0.0, learning_rate=5e-2, max_steps=5))
    assert not student.model.encoder.embed_positions.weight.requires_grad
    trainer.train()
    trainer.save_model(str(tmp_path / "trained"))
    batch = _batch(train_set, tokenizer, student)
    reloaded = type(tiny_marian).from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        expected = student.eval()(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-6)


def test_a_student_from_model_init_has_its_unsaved_parameters_frozen(tmp_path, train_set, tiny_marian, tokenizer):
    """The same freezing for a student that ``model_init`` builds (in ``__init__`` and again in ``train``)."""
    from hf_seqkd import DistillationDataCollator

    tiny_marian.save_pretrained(tmp_path / "init")
    built = []

    def model_init():
        built.append(type(tiny_marian).from_pretrained(tmp_path / "init"))
        return built[-1]

    trainer = DistillationTrainer(model_init=model_init, train_dataset=train_set,
                                  data_collator=DistillationDataCollator(tokenizer, tiny_marian),
                                  args=_args(tmp_path / "run", alpha=0.0, max_steps=1))
    trainer.train()
    assert len(built) == 2
    for model in built:
        assert not any(p.requires_grad for n, p in model.named_parameters() if "embed_positions" in n)
