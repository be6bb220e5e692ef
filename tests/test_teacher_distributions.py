"""Teacher-free word-level KD (issue 18): the teacher's top-k distributions stored once, training against them."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from hf_seqkd import DistillationDataCollator, tiny_seq2seq_model
from hf_seqkd.losses import (
    DIVERGENCES,
    StoredDistributions,
    distillation_loss,
    fused_ce_and_distillation_loss,
)
from hf_seqkd.teacher_distributions import STORED_COLUMNS, build_teacher_distributions

from _helpers import SequentialTrainer, training_args

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def teacher(tokenizer):
    return tiny_seq2seq_model(tokenizer, "marian", d_model=48, encoder_layers=2, decoder_layers=2, seed=1)


def _stored_from_log_probs(log_probs: torch.Tensor, k: int) -> StoredDistributions:
    top, ids = log_probs.topk(k, dim=-1)
    rest = log_probs.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1) if k < log_probs.shape[-1] else torch.full(log_probs.shape[:-1],
                                                                                   float("-inf"))
    return StoredDistributions(ids, top, tail)


def _bucket_reference(student_logits, teacher_log_probs, labels, k, divergence, temperature, jsd_beta=0.5):
    """The slow, obvious way: per position, the teacher's top-k tokens and "everything else" as k + 1 buckets for
    both, and the divergence by its formula."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            if labels[b, j] == -100:
                continue
            q_full = teacher_log_probs[b, j].double().exp()
            p_full = torch.softmax(student_logits[b, j].double() / temperature, dim=-1)
            top = q_full.argsort(descending=True)[:k].tolist()
            q = [q_full[i].item() for i in top] + [max(0.0, 1.0 - sum(q_full[i].item() for i in top))]
            p = [p_full[i].item() for i in top] + [max(0.0, 1.0 - sum(p_full[i].item() for i in top))]
            if divergence == "forward_kl":
                d = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p) if qi > 0)
            elif divergence == "reverse_kl":
                d = sum(pi * math.log(pi / qi) for qi, pi in zip(q, p) if pi > 0)
            elif divergence == "jsd":
                m = [jsd_beta * qi + (1 - jsd_beta) * pi for qi, pi in zip(q, p)]
                d = (jsd_beta * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m) if qi > 0)
                     + (1 - jsd_beta) * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m) if pi > 0))
            else:
                d = 0.5 * sum(abs(qi - pi) for qi, pi in zip(q, p))
            total += d * temperature ** 2
            count += 1
    return total / count


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_stored_loss_with_k_equal_to_the_vocabulary_is_the_online_loss(divergence, temperature, tail):
    torch.manual_seed(0)
    batch, length, vocab = 3, 6, 17
    student = torch.randn(batch, length, vocab, dtype=torch.float64)
    teacher_logits = 3 * torch.randn(batch, length, vocab, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, 4:] = -100
    labels[2, 1:] = -100
    log_probs = torch.log_softmax(teacher_logits / temperature, dim=-1)
    stored = _stored_from_log_probs(log_probs, vocab)._replace(tail=tail)
    for reduction in ("mean", "sum"):
        s1 = student.clone().requires_grad_(True)
        s2 = student.clone().requires_grad_(True)
        online = distillation_loss(s1, teacher_logits, labels, divergence=divergence, temperature=temperature,
                                   reduction=reduction)
        offline = distillation_loss(s2, stored, labels, divergence=divergence, temperature=temperature,
                                    reduction=reduction)
        (g1,), (g2,) = torch.autograd.grad(online, s1), torch.autograd.grad(offline, s2)
        torch.testing.assert_close(offline, online, rtol=1e-6, atol=1e-6)  # the loss computes in float32
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7)
        assert g2[labels.eq(-100)].abs().max() == 0  # padding positions: no gradient


def _random_case(seed, temperature=2.0):
    """Student and teacher logits ``(2, 4, 13)`` in float64, labels with padding, the teacher's log-probabilities."""
    torch.manual_seed(seed)
    student = torch.randn(2, 4, 13, dtype=torch.float64)
    teacher_logits = 2 * torch.randn(2, 4, 13, dtype=torch.float64)
    labels = torch.randint(0, 13, (2, 4))
    labels[1, 2:] = -100
    return student, teacher_logits, labels, torch.log_softmax(teacher_logits / temperature, dim=-1)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_stored_top_k_loss_against_a_bucket_by_bucket_reference(divergence):
    temperature, k = 2.0, 3
    student, teacher_logits, labels, log_probs = _random_case(1, temperature)
    value = distillation_loss(student, _stored_from_log_probs(log_probs, k), labels, divergence=divergence,
                              temperature=temperature, jsd_beta=0.3)
    reference = _bucket_reference(student, log_probs, labels, k, divergence, temperature, jsd_beta=0.3)
    assert value.item() == pytest.approx(reference, rel=1e-5)  # float32 against float64
    # grouping never increases an f-divergence: a lower bound of the online loss
    full = distillation_loss(student, teacher_logits, labels, divergence=divergence, temperature=temperature,
                             jsd_beta=0.3)
    assert value.item() <= full.item() + 1e-12


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_uniform_tail_is_the_full_divergence_to_the_teacher_with_its_tail_spread_evenly(divergence):
    temperature, k = 2.0, 4
    student, _, labels, log_probs = _random_case(3, temperature)
    stored = _stored_from_log_probs(log_probs, k)._replace(tail="uniform")
    # the reference: a dense teacher distribution, built entry by entry
    dense = torch.empty_like(log_probs)
    for b in range(2):
        for j in range(4):
            top = set(stored.ids[b, j].tolist())
            rest = math.exp(stored.tail_log_prob[b, j].item()) / (13 - k)
            for v in range(13):
                dense[b, j, v] = log_probs[b, j, v] if v in top else math.log(rest)
    value = distillation_loss(student, stored, labels, divergence=divergence, temperature=temperature)
    reference = distillation_loss(student, dense * temperature, labels, divergence=divergence,
                                  temperature=temperature)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)


def test_fused_loss_takes_stored_distributions_and_checks_them():
    torch.manual_seed(2)
    student = torch.randn(2, 3, 9, requires_grad=True)
    teacher_logits = torch.randn(2, 3, 9)
    labels = torch.randint(0, 9, (2, 3))
    stored = _stored_from_log_probs(torch.log_softmax(teacher_logits, -1), 9)
    online = fused_ce_and_distillation_loss(student, teacher_logits, labels, ce_weight=0.5, kd_weight=0.5,
                                            label_smoothing=0.1)
    offline = fused_ce_and_distillation_loss(student, stored, labels, ce_weight=0.5, kd_weight=0.5,
                                             label_smoothing=0.1)
    for a, b in zip(online, offline):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same target positions"):
        distillation_loss(student, StoredDistributions(*(x[:, :2] for x in stored.tensors)), labels)
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        distillation_loss(student, StoredDistributions(stored.ids + 5, *stored.tensors[1:]), labels)


# --------------------------------------------------------------------------------------------------- builder
def _direct_top_k(teacher, row, k, temperature):
    """The teacher's top-k at every label position of one row, by a direct forward pass."""
    labels = torch.tensor([row["labels"]])
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([row["input_ids"]]),
                         decoder_input_ids=teacher.prepare_decoder_input_ids_from_labels(labels=labels)).logits[0]
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    top, ids = log_probs.topk(k, dim=-1)
    tail = [math.log(max(1e-300, 1 - math.fsum(math.exp(v) for v in top_row))) for top_row in top.double().tolist()]
    return ids.tolist(), top.tolist(), tail


def test_stored_values_equal_a_direct_forward_in_row_order(teacher, train_set):
    teacher.eval()
    out = build_teacher_distributions(train_set, teacher, top_k=5, temperature=2.0, batch_size=3, shard_size=7,
                                      show_progress=False)
    assert out.column_names == train_set.column_names + list(STORED_COLUMNS)
    assert out["labels"] == train_set["labels"]  # rows in their original order
    assert out.features["teacher_topk_ids"].feature.feature.dtype == "uint16"
    assert out.features["teacher_topk_logprobs"].feature.feature.dtype == "float16"
    for i in range(len(train_set)):
        ids, top, tail = _direct_top_k(teacher, train_set[i], 5, 2.0)
        row = out[i]
        assert len(row["teacher_topk_ids"]) == len(train_set[i]["labels"])
        assert row["teacher_topk_ids"] == ids
        np.testing.assert_allclose(row["teacher_topk_logprobs"], top, rtol=1e-3, atol=2e-3)  # float16
        np.testing.assert_allclose(row["teacher_tail_logprob"], tail, rtol=2e-3, atol=2e-3)
        assert row["teacher_distribution_temperature"] == 2.0


def test_an_interrupted_build_resumes_and_a_rerun_loads_the_cache(teacher, train_set, tmp_path, monkeypatch):
    import hf_seqkd.teacher_distributions as module

    original, calls = module._shard_distributions, []

    def failing(model, input_ids, labels, first_row, **kwargs):
        if first_row == 8:
            raise KeyboardInterrupt("killed during the second shard")
        calls.append(first_row)
        return original(model, input_ids, labels, first_row, **kwargs)

    monkeypatch.setattr(module, "_shard_distributions", failing)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_distributions(train_set, teacher, top_k=4, shard_size=4, cache_dir=tmp_path, show_progress=False)
    assert calls == [0, 4]  # the two finished shards are on disk

    def recording(model, input_ids, labels, first_row, **kwargs):
        calls.append(first_row)
        return original(model, input_ids, labels, first_row, **kwargs)

    calls.clear()
    monkeypatch.setattr(module, "_shard_distributions", recording)
    resumed = build_teacher_distributions(train_set, teacher, top_k=4, shard_size=4, cache_dir=tmp_path,
                                          show_progress=False)
    assert calls == [8, 12]  # only what was missing
    fresh = build_teacher_distributions(train_set, teacher, top_k=4, shard_size=4, show_progress=False)
    for column in STORED_COLUMNS:
        assert resumed[column] == fresh[column], column
    calls.clear()
    build_teacher_distributions(train_set, teacher, top_k=4, shard_size=4, cache_dir=tmp_path, show_progress=False)
    assert calls == []  # the finished result is loaded
    (entry,) = tmp_path.iterdir()
    assert json.loads((entry / "settings.json").read_text())["top_k"] == 4


def test_builder_rejects_bad_input(teacher, train_set, toy_corpus):
    with pytest.raises(ValueError, match="needs tokenized data"):
        build_teacher_distributions(toy_corpus["train"].select(range(4)), teacher)
    with pytest.raises(ValueError, match=r"top_k=0: keep between 1 and the vocabulary size"):
        build_teacher_distributions(train_set, teacher, top_k=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        build_teacher_distributions(train_set, teacher, temperature=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        build_teacher_distributions(train_set, teacher, temperature=float("nan"))
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        build_teacher_distributions(train_set, teacher, batch_size=0)
    with pytest.raises(ValueError, match="vocab_size=999: the teacher has 300 output entries"):
        build_teacher_distributions(train_set, teacher, vocab_size=999)
    assert len(build_teacher_distributions(train_set.select(range(2)), teacher, top_k=np.int64(3),
                                           show_progress=False)[0]["teacher_topk_ids"][0]) == 3
    masked = train_set.select(range(2)).map(lambda row: {"labels": [-100] + row["labels"][1:]})
    with pytest.raises(ValueError, match="row 0's labels have -100 before the end"):
        build_teacher_distributions(masked, teacher)


# --------------------------------------------------------------------------------------------------- trainer
def test_training_on_stored_distributions_loads_no_teacher_and_matches_online(tmp_path, tokenizer, train_set,
                                                                               tiny_marian, teacher, monkeypatch):
    vocab = teacher.get_output_embeddings().weight.shape[0]
    collator = DistillationDataCollator(tokenizer, model=tiny_marian)
    settings = dict(alpha=0.5, temperature=2.0, max_steps=3, label_smoothing_factor=0.1)
    online_student, stored_student = copy.deepcopy(tiny_marian), copy.deepcopy(tiny_marian)
    online = SequentialTrainer(model=online_student, teacher_model=teacher, train_dataset=train_set,
                               data_collator=collator, args=training_args(tmp_path / "online", **settings))
    online.train()

    stored_data = build_teacher_distributions(train_set, teacher, top_k=vocab, temperature=2.0, show_progress=False)

    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a teacher was loaded")

    monkeypatch.setattr(transformers.AutoModelForSeq2SeqLM, "from_pretrained", no_loading)
    stored = SequentialTrainer(model=stored_student, train_dataset=stored_data, data_collator=collator,
                               args=training_args(tmp_path / "stored", teacher_distributions="stored",
                                                  teacher_top_k=vocab, teacher_model_name_or_path="unused/teacher",
                                                  **settings))
    assert stored.teacher_model is None and not stored.uses_teacher
    stored.train()
    online_losses = [h["loss"] for h in online.state.log_history if "loss" in h]
    stored_losses = [h["loss"] for h in stored.state.log_history if "loss" in h]
    assert len(stored_losses) == 3
    np.testing.assert_allclose(stored_losses, online_losses, rtol=2e-3)  # float16 storage
    for (name, p), q in zip(online_student.named_parameters(), stored_student.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)


def test_trainer_builds_the_distributions_then_drops_the_teacher(tmp_path, tokenizer, toy_corpus, tiny_marian,
                                                                 teacher):
    raw = toy_corpus["train"].select(range(12))
    trainer = SequentialTrainer(model=tiny_marian, teacher_model=teacher, train_dataset=raw,
                                processing_class=tokenizer,
                                args=training_args(tmp_path / "run", alpha=0.5, teacher_distributions="stored",
                                                   teacher_top_k=8, seqkd_cache_dir=str(tmp_path / "cache"),
                                                   max_steps=1))
    assert trainer.teacher_model is None
    assert all(c in trainer.train_dataset.column_names for c in STORED_COLUMNS)
    assert len(trainer.train_dataset[0]["teacher_topk_ids"][0]) == 8
    assert any((tmp_path / "cache").iterdir())
    trainer.train()
    assert trainer.args.card_hyperparameters()["teacher_top_k"] == 8
    # stored at another temperature, with another k, for other labels, or with a column missing: refused
    data = trainer.train_dataset
    with pytest.raises(ValueError, match="taken at temperature"):
        SequentialTrainer(model=tiny_marian, train_dataset=data, processing_class=tokenizer,
                          args=training_args(tmp_path / "t2", alpha=0.5, temperature=2.0, teacher_top_k=8,
                                             teacher_distributions="stored"))
    with pytest.raises(ValueError, match=r"keep k = \[8\] tokens per position, but teacher_top_k = 32"):
        SequentialTrainer(model=tiny_marian, train_dataset=data, processing_class=tokenizer,
                          args=training_args(tmp_path / "t3", alpha=0.5, teacher_distributions="stored"))
    longer = data.map(lambda row: {"labels": row["labels"] + row["labels"][-1:]})
    with pytest.raises(ValueError, match="another number of positions than their labels"):
        SequentialTrainer(model=tiny_marian, train_dataset=longer, processing_class=tokenizer,
                          args=training_args(tmp_path / "t4", alpha=0.5, teacher_top_k=8,
                                             teacher_distributions="stored"))
    with pytest.raises(ValueError, match=r"but not \['teacher_tail_logprob'\]"):
        SequentialTrainer(model=tiny_marian, train_dataset=data.remove_columns("teacher_tail_logprob"),
                          processing_class=tokenizer,
                          args=training_args(tmp_path / "t5", alpha=0.5, teacher_top_k=8,
                                             teacher_distributions="stored"))


def test_a_temperature_float32_cannot_represent_is_accepted(tmp_path, tokenizer, train_set, tiny_marian, teacher):
    stored = build_teacher_distributions(train_set, teacher, top_k=4, temperature=0.7, show_progress=False)
    trainer = SequentialTrainer(model=tiny_marian, train_dataset=stored, processing_class=tokenizer,
                                args=training_args(tmp_path, alpha=0.5, temperature=0.7, teacher_top_k=4,
                                                   teacher_distributions="stored"))
    assert trainer.teacher_model is None


def test_stored_distributions_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="teacher_distributions='offline'"):
        training_args(tmp_path, teacher_distributions="offline")
    with pytest.raises(ValueError, match="alpha=0 has no word-level term"):
        training_args(tmp_path, teacher_distributions="stored", alpha=0.0)
    with pytest.raises(ValueError, match="CKD"):
        training_args(tmp_path, teacher_distributions="stored", alpha=0.2, intermediate_loss_weight=0.5)
    with pytest.raises(ValueError, match="teacher_top_k must be a positive"):
        training_args(tmp_path, teacher_distributions="stored", teacher_top_k=0)
    with pytest.raises(ValueError, match="teacher_tail='spread'"):
        training_args(tmp_path, teacher_distributions="stored", teacher_tail="spread")
    args = training_args(tmp_path, teacher_distributions="stored", alpha=0.5)
    assert args.uses_stored_distributions and not args.teacher_runs_during_training and args.needs_teacher_model


def test_a_ctranslate2_teacher_stores_the_same_distributions(teacher, tokenizer, train_set, tmp_path):
    pytest.importorskip("ctranslate2")
    from hf_seqkd.export import CTranslate2Translator, to_ctranslate2

    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    converted = CTranslate2Translator(to_ctranslate2(tmp_path / "teacher", tmp_path / "ct2", quantization="float32"),
                                      tokenizer, intra_threads=1)
    rows = train_set.select(range(8))
    hf = build_teacher_distributions(rows, teacher, top_k=6, temperature=2.0, batch_size=3, show_progress=False)
    ct2 = build_teacher_distributions(rows, converted, top_k=6, temperature=2.0, batch_size=3, show_progress=False)
    pad = tokenizer.pad_token_id
    compared = 0
    for a, b in zip(hf, ct2):
        assert len(a["teacher_topk_ids"]) == len(b["teacher_topk_ids"]) == len(a["labels"])
        for ids_a, ids_b, lp_a, lp_b in zip(a["teacher_topk_ids"], b["teacher_topk_ids"],
                                            a["teacher_topk_logprobs"], b["teacher_topk_logprobs"]):
            if pad in ids_a:  # the exported model bans <pad>; Transformers' forward gives it a probability
                continue
            assert ids_a[:3] == ids_b[:3]
            np.testing.assert_allclose(lp_b, lp_a, atol=5e-3)
            compared += 1
    assert compared > 20


@pytest.mark.slow
def test_two_processes_with_torchrun_equal_one_process(teacher, train_set, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "data.json").write_text(json.dumps({c: list(train_set[c]) for c in ("input_ids", "labels")}))
    worker = Path(__file__).with_name("_distributions_torchrun_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         str(tmp_path / "teacher"), str(tmp_path / "data.json"), str(tmp_path / "cache"), str(out)],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = build_teacher_distributions(train_set, teacher, top_k=5, temperature=2.0, show_progress=False)
    for rank in (0, 1):
        got = json.loads((out / f"result-{rank}.json").read_text())
        for column in STORED_COLUMNS:
            assert got[column] == list(single[column]), column
    # 16 rows in shards of 4: shard i computed by process i % 2, each once
    assert sorted(json.loads((out / "rows-0.json").read_text())) == [0, 8]
    assert sorted(json.loads((out / "rows-1.json").read_text())) == [4, 12]


def test_gradient_accumulation_with_stored_distributions_equals_one_big_batch(tmp_path, tokenizer, train_set,
                                                                             tiny_marian, teacher):
    stored_data = build_teacher_distributions(train_set, teacher, top_k=7, show_progress=False)
    collator = DistillationDataCollator(tokenizer, model=tiny_marian)
    a, b = copy.deepcopy(tiny_marian), copy.deepcopy(tiny_marian)
    common = dict(alpha=0.7, teacher_distributions="stored", teacher_top_k=7)
    SequentialTrainer(model=a, train_dataset=stored_data, data_collator=collator,
                      args=training_args(tmp_path / "ga", per_device_train_batch_size=4,
                                         gradient_accumulation_steps=2, **common)).train()
    SequentialTrainer(model=b, train_dataset=stored_data, data_collator=collator,
                      args=training_args(tmp_path / "big", per_device_train_batch_size=8, **common)).train()
    moved = 0.0
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), tiny_marian.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        moved += (p - r).abs().sum().item()
    assert moved > 0


def test_the_recipe_trains_on_stored_distributions_without_the_teacher_in_memory(tokenizer, toy_corpus, teacher,
                                                                                  tmp_path, monkeypatch):
    """``recipes/seq_kd.py --teacher_distributions stored``: the teacher builds the distributions, then no teacher
    loaded from its folder is alive while the student trains, and the card names the setting."""
    import gc

    from transformers import PreTrainedModel

    from hf_seqkd import DistillationTrainer

    from _helpers import load_recipe, save_teacher_and_data

    recipe = load_recipe("seq_kd")
    save_teacher_and_data(tmp_path, teacher, tokenizer, toy_corpus, {"train": 32, "validation": 8, "test": 8})
    live_models = {}
    real_train = DistillationTrainer.train

    def counting_train(self, *args, **kwargs):
        gc.collect()
        live_models["during_training"] = [  # the teacher loaded from its folder (the student has 1 layer)
            o for o in gc.get_objects() if isinstance(o, PreTrainedModel) and hasattr(o, "lm_head")
            and o.config.encoder_layers == 2 and str(o.name_or_path) == str(tmp_path / "teacher")]
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "train", counting_train)
    del teacher
    out = tmp_path / "student"
    recipe.main([
        "--teacher_model_name_or_path", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "data"),
        "--source_lang", "src", "--target_lang", "tgt", "--alpha", "0.5", "--teacher_distributions", "stored",
        "--teacher_top_k", "8", "--student_encoder_layers", "1", "--student_decoder_layers", "1",
        "--seqkd_cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--save_strategy", "no", "--eval_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--max_new_tokens", "16",
        "--eval_num_beams", "1", "--evaluate_teacher", "false", "--dataloader_num_workers", "0"])
    assert live_models["during_training"] == []  # the teacher the recipe loaded is gone
    card = (out / "README.md").read_text()
    assert "teacher_top_k" in card and "stored" in card
