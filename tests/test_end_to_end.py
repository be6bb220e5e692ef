"""End to end: a tiny teacher learns the toy task, then recipes/seq_kd.py distils a student from it."""

import json
import os

import pytest
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from hf_seqkd import (
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    evaluate_translation,
    make_toy_corpus,
    prepare_distillation_dataset,
    tiny_seq2seq_model,
    train_tokenizer,
)

from _helpers import load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    """A 2+2-layer Marian (d 64) trained for 300 steps on 2,000 toy pairs (about 15 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("teacher")
    corpus = make_toy_corpus(num_train=2000, num_test=100, seed=0)
    tokenizer = train_tokenizer(list(corpus["train"]["source"]) + list(corpus["train"]["target"]), vocab_size=400)
    teacher = tiny_seq2seq_model(tokenizer, "marian", d_model=64, encoder_layers=2, decoder_layers=2, ffn_dim=128)
    args = DistillationTrainingArguments(output_dir=str(folder / "run"), alpha=0.0, max_steps=300,
                                         per_device_train_batch_size=32, learning_rate=3e-3, warmup_steps=30,
                                         report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    DistillationTrainer(model=teacher, args=args,
                        train_dataset=prepare_distillation_dataset(corpus["train"], tokenizer),
                        data_collator=DistillationDataCollator(tokenizer, teacher)).train()
    teacher.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    data = folder / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.src").write_text("\n".join(corpus[split]["source"]) + "\n")
        (data / f"{split}.tgt").write_text("\n".join(corpus[split]["target"]) + "\n")
    return {"model": str(folder / "model"), "data": str(data), "corpus": corpus, "tokenizer": tokenizer,
            "teacher": teacher}


@pytest.mark.slow
def test_teacher_learns_the_toy_task(trained_teacher):
    test = trained_teacher["corpus"]["test"]
    result = evaluate_translation(trained_teacher["teacher"], trained_teacher["tokenizer"], test["source"],
                                  test["target"], max_new_tokens=40)
    untrained = tiny_seq2seq_model(trained_teacher["tokenizer"], "marian", d_model=64, ffn_dim=128)
    baseline = evaluate_translation(untrained, trained_teacher["tokenizer"], test["source"], test["target"],
                                    max_new_tokens=40)
    assert result["bleu"] > 10 and result["bleu"] > baseline["bleu"] + 10


@pytest.mark.slow
def test_seq_kd_recipe_with_word_kd(trained_teacher, tmp_path):
    recipe = load_recipe("seq_kd")
    out = tmp_path / "student"
    rows = recipe.main([
        "--teacher_model_name_or_path", trained_teacher["model"], "--dataset", trained_teacher["data"],
        "--source_lang", "src", "--target_lang", "tgt", "--output_dir", str(out),
        "--student_init", "copy", "--student_encoder_layers", "1", "--student_decoder_layers", "1",
        "--alpha", "0.5", "--temperature", "1.0", "--max_steps", "150", "--per_device_train_batch_size", "32",
        "--learning_rate", "3e-3", "--warmup_steps", "15", "--logging_steps", "25", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--eval_num_beams", "1",
        "--max_new_tokens", "40", "--eval_strategy", "no",
    ])
    # the student was saved alone and loads as a plain model
    student = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert student.config.encoder_layers == 1 and student.config.decoder_layers == 1
    assert AutoTokenizer.from_pretrained(out).pad_token_id == trained_teacher["tokenizer"].pad_token_id
    results = {r["model"]: r for r in rows}
    assert results["student"]["params"] < results["teacher"]["params"]
    assert results["student"]["bleu_greedy"] > 5.0  # learned the task in 150 steps
    assert results["teacher"]["speedup"] == 1.0 and results["student"]["speedup"] > 0
    assert json.loads((out / "results.json").read_text()) == rows
    card = (out / "README.md").read_text()  # every saved student carries a model card from the run
    assert "knowledge-distillation" in card and "baseline+word-kd" in card and "alpha" in card


@pytest.mark.slow
def test_recipe_rejects_unknown_options(trained_teacher, tmp_path):
    recipe = load_recipe("seq_kd")
    with pytest.raises(ValueError, match=r"unknown option\(s\): \['--not_an_option'"):
        recipe.main(["--teacher_model_name_or_path", trained_teacher["model"], "--dataset", trained_teacher["data"],
                     "--output_dir", str(tmp_path), "--not_an_option", "1"])
