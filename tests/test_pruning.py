"""Magnitude pruning (See et al. 2016; Kim & Rush 2016, Sec. 5.3): masks, classes, tied weights, retraining."""

import copy
import os

import pytest
import torch

from hf_seqkd import count_parameters, tiny_seq2seq_model
from hf_seqkd.pruning import (
    GradualPruningCallback,
    PruningCallback,
    apply_pruning_masks,
    fold_pruning,
    prune_model,
    pruning_masks,
    remove_pruning,
    sparsity_report,
    weight_class,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


def _weights(model):
    """Reference list of prunable weights: distinct trainable matrices, positions excluded."""
    return {n: p for n, p in model.named_parameters()
            if p.dim() >= 2 and p.requires_grad and weight_class(n) != "positions"}


def _batch(tokenizer, toy_corpus, n=16, offset=0):
    train = toy_corpus["train"]
    src = list(train["source"][offset:offset + n])
    tgt = list(train["target"][offset:offset + n])
    batch = tokenizer(src, text_target=tgt, padding=True, return_tensors="pt")
    batch["labels"][batch["labels"] == tokenizer.pad_token_id] = -100
    return batch


def test_weight_classes_from_names():
    assert weight_class("model.shared.weight") == "embeddings"
    assert weight_class("shared.weight") == "embeddings"
    assert weight_class("model.encoder.embed_tokens.weight") == "embeddings"
    assert weight_class("model.encoder.layers.0.self_attn.k_proj.weight") == "attention"
    assert weight_class("model.decoder.layers.1.encoder_attn.out_proj.weight") == "attention"
    assert weight_class("decoder.block.0.layer.1.EncDecAttention.q.weight") == "attention"
    assert weight_class("encoder.block.0.layer.0.SelfAttention.o.weight") == "attention"
    assert weight_class("model.decoder.layers.0.fc1.weight") == "feed_forward"
    assert weight_class("encoder.block.0.layer.1.DenseReluDense.wi_0.weight") == "feed_forward"
    assert weight_class("lm_head.weight") == "output"
    assert weight_class("model.encoder.embed_positions.weight") == "positions"
    assert weight_class("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight") == "positions"


def test_class_blind_matches_sorted_threshold_reference(tiny_marian):
    model = tiny_marian
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = _weights(model)
    flat = torch.cat([p.detach().abs().reshape(-1) for p in weights.values()])
    k = int(round(0.8 * flat.numel()))
    threshold = torch.sort(flat).values[k - 1]
    ties = int((flat == threshold).sum())
    assert ties == 1 or threshold == 0  # reference well defined

    masks = prune_model(model, sparsity=0.8, scope="class_blind")

    assert set(masks) == set(weights)
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == k
    for name, p in weights.items():
        expected_keep = before[name].abs() > threshold
        if ties == 1:
            assert torch.equal(masks[name], expected_keep), name
        assert torch.equal(p.detach(), before[name] * masks[name]), name
    # biases and layer norms untouched
    for name, p in model.named_parameters():
        if p.dim() < 2:
            assert torch.equal(p.detach(), before[name]), name


def test_class_uniform_prunes_each_class_by_the_target(tokenizer):
    for family in ("marian", "t5"):
        model = tiny_seq2seq_model(tokenizer, family, d_model=32, encoder_layers=1, decoder_layers=1, seed=1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        masks = prune_model(model, sparsity=0.6, scope="class_uniform")
        report = sparsity_report(model)
        by_class = {}
        for name in masks:
            by_class.setdefault(weight_class(name), []).append(name)
        assert set(by_class) == {"embeddings", "attention", "feed_forward"}
        for cls, names in by_class.items():
            total = sum(masks[n].numel() for n in names)
            pruned = sum(int((~masks[n]).sum()) for n in names)
            assert pruned == int(round(0.6 * total)), (family, cls)
            assert report["classes"][cls]["sparsity"] == pytest.approx(0.6, abs=1.0 / total + 1e-9)
            # the pruned ones are the smallest of their class
            kept = torch.cat([before[n].abs()[masks[n]] for n in names])
            gone = torch.cat([before[n].abs()[~masks[n]] for n in names])
            assert gone.max() <= kept.min(), (family, cls)
        # positions (T5 relative attention bias) are not pruned by default
        for name, p in model.named_parameters():
            if weight_class(name) == "positions":
                assert torch.equal(p.detach(), before[name])


def test_class_distribution_uses_lambda_sigma_thresholds(tiny_marian):
    model = tiny_marian
    before = {n: p.detach().clone() for n, p in _weights(model).items()}
    masks = prune_model(model, sparsity=0.7, scope="class_distribution")
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == int(round(0.7 * total))
    sigma = {}
    for cls in {weight_class(n) for n in masks}:
        sigma[cls] = torch.cat([before[n].reshape(-1) for n in masks if weight_class(n) == cls]).std()
    kept = torch.cat([before[n].abs()[masks[n]] / sigma[weight_class(n)] for n in masks])
    gone = torch.cat([before[n].abs()[~masks[n]] / sigma[weight_class(n)] for n in masks])
    assert gone.max() <= kept.min() + 1e-6


def test_tied_embedding_pruned_once_and_counted_once(tiny_marian):
    model = tiny_marian
    shared = model.model.shared.weight
    masks = prune_model(model, sparsity=0.5)
    # one tensor, one mask, no alias names
    assert "model.shared.weight" in masks
    tied_copies = {"lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
    assert not tied_copies & set(masks)
    assert model.lm_head.weight is shared and model.model.encoder.embed_tokens.weight is shared
    assert torch.equal(shared.detach() == 0, ~masks["model.shared.weight"] | (shared.detach() == 0))
    report = sparsity_report(model)
    assert report["total"] == count_parameters(model)
    assert report["nonzero"] == count_parameters(model, nonzero=True)
    assert report["classes"]["embeddings"]["total"] == shared.numel()
    assert report["classes"]["embeddings"]["tensors"] == 1
    assert "output" not in report["classes"]
    assert report["masked"] == sum(int((~m).sum()) for m in masks.values())
    assert report["prunable_total"] == sum(p.numel() for p in _weights(model).values())


def test_include_restricts_classes(tiny_marian):
    model = tiny_marian
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = prune_model(model, sparsity=0.5, include=["feed_forward"])
    assert masks and all(weight_class(n) == "feed_forward" for n in masks)
    for name, p in model.named_parameters():
        if weight_class(name) != "feed_forward":
            assert torch.equal(p.detach(), before[name]), name
    with pytest.raises(ValueError):
        prune_model(model, sparsity=1.5)
    with pytest.raises(ValueError):
        prune_model(model, scope="layer_wise")


def test_iterative_pruning_keeps_old_zeros(tiny_marian):
    first = {n: m.clone() for n, m in prune_model(tiny_marian, sparsity=0.5).items()}
    second = prune_model(tiny_marian, sparsity=0.8)
    for name, mask in first.items():
        assert not (second[name] & ~mask).any(), name  # nothing pruned before comes back
    assert sparsity_report(tiny_marian)["prunable_sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_masks_stay_fixed_through_adamw_steps_and_fold_releases_them(tiny_marian, tokenizer, toy_corpus):
    model = tiny_marian
    masks = prune_model(model, sparsity=0.8)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(4):
        loss = model(**_batch(tokenizer, toy_corpus, offset=16 * step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, mask in masks.items():
        p = model.get_parameter(name).detach()
        assert (p[~mask] == 0).all(), name  # exactly zero after optimizer steps
        assert not torch.equal(p[mask], start[name][mask]), name  # the rest did train
        assert (optimizer.state[model.get_parameter(name)]["exp_avg"][~mask] == 0).all()

    fold_pruning(model)
    assert pruning_masks(model) == {}
    assert remove_pruning is fold_pruning
    # hooks are gone: a fresh optimizer now moves the formerly pruned weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**_batch(tokenizer, toy_corpus)).loss.backward()
    optimizer.step()
    shared = model.get_parameter("model.shared.weight").detach()
    assert (shared[~masks["model.shared.weight"]] != 0).any()


def test_stale_optimizer_state_is_undone_by_forward_hook_and_callback(tiny_marian, tokenizer, toy_corpus):
    model = tiny_marian
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**_batch(tokenizer, toy_corpus)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    masks = prune_model(model, sparsity=0.8)  # the optimizer still has momentum at pruned positions
    model(**_batch(tokenizer, toy_corpus, offset=16)).loss.backward()
    optimizer.step()
    name = "model.encoder.layers.0.fc1.weight"
    param = model.get_parameter(name)
    assert (param.detach()[~masks[name]] != 0).any()  # momentum moved them
    PruningCallback(masks).on_step_end(None, None, None, model=model)
    assert (param.detach()[~masks[name]] == 0).all()
    optimizer.zero_grad()
    model(**_batch(tokenizer, toy_corpus, offset=32)).loss.backward()
    optimizer.step()
    assert (param.detach()[~masks[name]] != 0).any()
    with torch.no_grad():
        model(**_batch(tokenizer, toy_corpus))  # forward in training mode re-applies the masks
    assert (param.detach()[~masks[name]] == 0).all()


def test_save_while_masked_loads_as_plain_model(tiny_marian, tokenizer, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model = tiny_marian
    plain_keys = set(model.state_dict())
    prune_model(model, sparsity=0.8)
    assert set(model.state_dict()) == plain_keys  # no weight_orig / weight_mask renaming
    model.save_pretrained(tmp_path / "masked")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "masked")
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    assert sparsity_report(loaded)["nonzero"] == sparsity_report(model)["nonzero"]
    assert loaded.lm_head.weight is loaded.model.shared.weight
    # a pruned, folded model still generates, and saves the same zeros
    fold_pruning(model)
    assert not model._forward_pre_hooks
    assert all(not p._backward_hooks for p in model.parameters())
    model.eval()
    enc = tokenizer(["tipri lomi delzorgun privo"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5)
    assert out.shape[0] == 1
    model.save_pretrained(tmp_path / "folded")
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "folded")
    assert sparsity_report(again)["nonzero"] == sparsity_report(loaded)["nonzero"]


def test_deepcopy_of_pruned_model_is_independent(tiny_marian):
    prune_model(tiny_marian, sparsity=0.5)
    clone = copy.deepcopy(tiny_marian)
    fold_pruning(clone)
    assert pruning_masks(clone) == {} and pruning_masks(tiny_marian)
    # the original's gradient hooks are still installed
    assert all(tiny_marian.get_parameter(n)._backward_hooks for n in pruning_masks(tiny_marian))
    apply_pruning_masks(tiny_marian)


def test_masks_survive_a_trainer_loop_and_checkpoints(tiny_marian, tokenizer, toy_corpus, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    model = tiny_marian
    masks = prune_model(model, sparsity=0.8)
    before = {n: model.get_parameter(n).detach().clone() for n in masks}
    train = toy_corpus["train"].select(range(64)).map(
        lambda b: tokenizer(b["source"], text_target=b["target"]), batched=True,
        remove_columns=["source", "target"])
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=16, learning_rate=1e-2,
        weight_decay=0.1, save_strategy="steps", save_steps=2, logging_strategy="no", report_to="none",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                             processing_class=tokenizer, callbacks=[PruningCallback(masks)])
    trainer.train()
    for name, mask in masks.items():
        p = model.get_parameter(name).detach()
        assert (p[~mask] == 0).all(), name
        assert not torch.equal(p[mask], before[name][mask]), name
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert checkpoint.is_dir(), os.listdir(tmp_path / "run")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(checkpoint)
    for name, mask in masks.items():
        assert (loaded.get_parameter(name).detach()[~mask] == 0).all(), name


def test_masks_survive_distillation_trainer(tokenizer, toy_corpus, tmp_path):
    """Retraining a pruned student with word-level KD (Kim & Rush 2016, Sec. 5.3 retrain after pruning)."""
    try:
        from hf_seqkd.config import DistillationTrainingArguments
        from hf_seqkd.trainer import DistillationTrainer
    except ImportError as err:  # pragma: no cover - the trainer lives in another module
        pytest.skip(f"DistillationTrainer unavailable: {err}")
    from transformers import DataCollatorForSeq2Seq

    teacher = tiny_seq2seq_model(tokenizer, "marian", d_model=32, seed=1)
    student = tiny_seq2seq_model(tokenizer, "marian", d_model=32, seed=0)
    masks = prune_model(student, sparsity=0.8)
    before = {n: student.get_parameter(n).detach().clone() for n in masks}
    train = toy_corpus["train"].select(range(64)).map(
        lambda b: tokenizer(b["source"], text_target=b["target"]), batched=True,
        remove_columns=["source", "target"])
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "kd"), max_steps=3, per_device_train_batch_size=16, learning_rate=1e-2,
        alpha=0.5, save_strategy="no", report_to="none", use_cpu=True, logging_strategy="no", disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  data_collator=DataCollatorForSeq2Seq(tokenizer, model=student),
                                  processing_class=tokenizer, callbacks=[PruningCallback()])
    trainer.train()
    for name, mask in masks.items():
        p = student.get_parameter(name).detach()
        assert (p[~mask] == 0).all(), name
        assert not torch.equal(p[mask], before[name][mask]), name


def test_gradual_pruning_follows_zhu_and_gupta_schedule_and_holds_the_masks(tiny_marian, tokenizer, toy_corpus,
                                                                          tmp_path):
    """4 pruning events over the first half of 8 steps to 80%: after steps 1-4 the sparsity is Zhu & Gupta's
    s_k = 0.8 * (1 - (1 - k/4)^3) (0.4625, 0.7, 0.7875, 0.8, worked out by hand), then 0.8 while retraining; the
    weights pruned at an event stay zero afterwards."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    weights = _weights(tiny_marian)
    total = sum(p.numel() for p in weights.values())
    seen, zero_at = [], {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            current = _weights(model)
            seen.append(sum(int((p == 0).sum()) for p in current.values()) / total)
            for name, p in current.items():
                if name in zero_at:  # zeros of the previous steps are still zero
                    assert (p.detach()[zero_at[name]] == 0).all(), (state.global_step, name)
                zero_at[name] = p.detach() == 0

    train = toy_corpus["train"].select(range(64)).map(
        lambda b: tokenizer(b["source"], text_target=b["target"]), batched=True, remove_columns=["source", "target"])
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                                    learning_rate=1e-2, save_strategy="no", logging_strategy="no", report_to="none",
                                    use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Seq2SeqTrainer(model=tiny_marian, args=args, train_dataset=train,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=tiny_marian),
                             callbacks=[GradualPruningCallback(0.8, num_events=4, ramp=0.5), Probe()])
    trainer.train()
    expected = [0.4625, 0.7, 0.7875, 0.8, 0.8, 0.8, 0.8, 0.8]
    assert seen == pytest.approx(expected, abs=1.5 / total)  # round(s * total) weights, one tie at most


def test_gradual_pruning_settings_are_checked():
    with pytest.raises(ValueError, match="num_events must be >= 1"):
        GradualPruningCallback(0.8, num_events=0)
    with pytest.raises(ValueError, match="ramp must be in"):
        GradualPruningCallback(0.8, num_events=2, ramp=0.0)


def test_prune_recipe_prunes_gradually_and_says_so(tiny_marian, tokenizer, toy_corpus, tmp_path):
    """recipes/prune.py --pruning_events 3: the student is pruned during retraining (nothing before it: no
    "pruned, not retrained" row), ends at the target sparsity, and its card records the schedule."""
    from _helpers import load_recipe, write_split_files

    tiny_marian.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    (tmp_path / "data").mkdir()
    write_split_files(tmp_path / "data", toy_corpus, {"train": 32, "test": 4})
    argv = ["--model_name_or_path", str(tmp_path / "student"), "--dataset", str(tmp_path / "data"),
            "--source_lang", "src", "--target_lang", "tgt", "--output_dir", str(tmp_path / "pruned"),
            "--sparsities", "0.6", "--alpha", "0", "--max_steps", "6", "--per_device_train_batch_size", "8",
            "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "True",
            "--eval_num_beams", "1", "--max_new_tokens", "8", "--pruning_events", "3", "--pruning_ramp", "0.5"]
    rows = load_recipe("prune").main(argv)
    assert rows[-1]["measured_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert rows[-1].get("bleu_pruned") is None  # no one-shot pruned model was evaluated before retraining
    card = (tmp_path / "pruned" / "sparsity-60" / "README.md").read_text()
    assert "pruning_events" in card and "pruning_ramp" in card
    with pytest.raises(ValueError, match="--pruning_events 0"):
        load_recipe("prune").main(argv[:-4] + ["--pruning_events", "0"])


def test_gradual_pruning_resumed_from_a_checkpoint_keeps_its_masks(tiny_marian, tokenizer, toy_corpus, tmp_path):
    """Resumed after the ramp (checkpoint at step 4 of 8), the model is pruned to the last event's sparsity again,
    so the retraining steps 5-8 keep 80% of the weights at zero instead of letting them grow back; a run that
    would keep a best checkpoint from before the last event is refused."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    initial = copy.deepcopy(tiny_marian)
    total = sum(p.numel() for p in _weights(tiny_marian).values())
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(sum(int((p == 0).sum()) for p in _weights(model).values()) / total)

    train = toy_corpus["train"].select(range(64)).map(
        lambda b: tokenizer(b["source"], text_target=b["target"]), batched=True, remove_columns=["source", "target"])

    def run(model, resume=None, **extra):
        args = Seq2SeqTrainingArguments(
            output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2,
            save_strategy="steps", save_steps=4, logging_strategy="no", report_to="none", use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, seed=0, **extra)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train,
                                 eval_dataset=train.select(range(8)) if extra else None,
                                 data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                                 callbacks=[GradualPruningCallback(0.8, num_events=4, ramp=0.5), Probe()])
        trainer.train(resume_from_checkpoint=resume)

    run(tiny_marian)
    seen.clear()
    run(initial, resume=str(tmp_path / "checkpoint-4"))
    assert seen == pytest.approx([0.8] * 4, abs=1.5 / total)
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        run(copy.deepcopy(initial), eval_strategy="steps", eval_steps=4, load_best_model_at_end=True)


def test_a_loaded_marian_models_sinusoidal_position_tables_are_never_pruned(tmp_path, tiny_marian):
    """Transformers 5 loads them trainable; they are not saved (recomputed on loading), so pruning them, even with
    positions named in ``include``, would give a saved model whose masks do not hold."""
    from transformers import MarianMTModel

    tiny_marian.save_pretrained(tmp_path)
    model = MarianMTModel.from_pretrained(tmp_path)
    tables = {n: p.detach().clone() for n, p in model.named_parameters() if "embed_positions" in n}
    assert len(tables) == 2
    masks = prune_model(model, sparsity=0.9, include=["positions", "attention"])
    assert masks and not any("embed_positions" in n for n in masks)
    for name, p in model.named_parameters():
        if name in tables:
            assert torch.equal(p.detach(), tables[name])
