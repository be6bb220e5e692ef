"""Evaluation: BLEU settings chosen from the target language, validation that measures what the final evaluation
measures, generation limits a model can represent, and translations that do not depend on the batching."""

import numpy as np
import pytest
import sacrebleu
import torch

from hf_seqkd import corpus_scores, evaluate_translation, make_compute_metrics, select_seq_inter, translate


def resolve_bleu_tokenize(*args):
    from hf_seqkd.evaluation import resolve_bleu_tokenize as resolve

    return resolve(*args)


# three Chinese sentence pairs: no spaces between words, so sacrebleu's default 13a tokenizer sees one "word" each
ZH_HYPOTHESES = ["我喜欢吃苹果。", "今天天气很好。", "他在图书馆看书。"]
ZH_REFERENCES = ["我喜欢吃香蕉。", "今天天气非常好。", "他在图书馆读书。"]


@pytest.mark.parametrize("language, expected", [
    ("zh", "zh"), ("zh_CN", "zh"), ("zho_Hans", "zh"), ("zh-TW", "zh"), ("de", "13a"), ("en_XX", "13a"),
    ("eng_Latn", "13a"), (None, "13a"), ("th", "char"), ("tha_Thai", "char"), ("lo", "char"), ("my", "char"),
])
def test_bleu_tokenizer_is_chosen_from_the_target_language(language, expected, monkeypatch):
    monkeypatch.setattr("hf_seqkd.evaluation._flores_available", lambda: False)  # offline: no SentencePiece model
    assert resolve_bleu_tokenize(language) == expected
    assert resolve_bleu_tokenize(language, "intl") == "intl"  # an explicit choice wins


def test_japanese_and_korean_fall_back_to_characters_without_mecab(monkeypatch):
    monkeypatch.setattr("hf_seqkd.evaluation._mecab_available", lambda name: False)
    with pytest.warns(UserWarning, match=r"sacrebleu\[ja\]"):
        assert resolve_bleu_tokenize("ja") == "char"
    with pytest.warns(UserWarning, match=r"sacrebleu\[ko\]"):
        assert resolve_bleu_tokenize("kor_Hang") == "char"
    monkeypatch.setattr("hf_seqkd.evaluation._mecab_available", lambda name: True)
    assert resolve_bleu_tokenize("ja_XX") == "ja-mecab" and resolve_bleu_tokenize("ko") == "ko-mecab"


def test_unknown_bleu_tokenizer_is_a_named_error():
    with pytest.raises(ValueError, match="bleu_tokenize='zh-char'.*13a"):
        resolve_bleu_tokenize("de", "zh-char")


def test_chinese_bleu_with_the_chinese_tokenizer():
    default = corpus_scores(ZH_HYPOTHESES, ZH_REFERENCES)
    assert default["bleu"] == pytest.approx(0.0)  # the fault: every sentence one token
    scores = corpus_scores(ZH_HYPOTHESES, ZH_REFERENCES, tokenize=resolve_bleu_tokenize("zh"))
    reference = sacrebleu.corpus_bleu(ZH_HYPOTHESES, [ZH_REFERENCES], tokenize="zh")
    assert scores["bleu"] == pytest.approx(reference.score) and scores["bleu"] > 40
    assert "tok:zh" in scores["bleu_signature"] and "nrefs:1" in scores["bleu_signature"]
    assert scores["chrf_signature"].startswith("nrefs:1")


def test_seq_inter_on_a_chinese_kbest_list_picks_the_closest_candidate():
    """With 13a every candidate scores 0 and the 1-best wins by default; with the Chinese tokenizer the candidate
    with the highest sentence BLEU (computed here with sacrebleu directly) is chosen."""
    reference = "我们明天早上去公园散步。"
    nbest = ["明天我们去公园。", "我们明天早上去公园散步吧。", "我们早上去散步。"]
    bleu = [sacrebleu.sentence_bleu(c, [reference], smooth_method="exp", tokenize="zh").score for c in nbest]
    assert max(bleu) > 50 and bleu.index(max(bleu)) == 1
    assert select_seq_inter(nbest, reference, tokenize="zh", return_index=True) == 1
    assert select_seq_inter(nbest, reference, return_index=True) == 0  # 13a: all zero, the beam's order


# ---------------------------------------------------------------------- validation during training (fault 4)
def test_compute_metrics_scores_against_the_raw_references(tokenizer):
    """References rebuilt from label ids lose what the tokenizer cannot represent (unknown characters) and what
    truncation cut: validation must score against the raw reference text, as the final evaluation does."""
    references = ["the blue car stops ÿ near ßhere", "a dog runs " + " ".join(["fast"] * 40)]
    labels = tokenizer(text_target=references, max_length=12, truncation=True)["input_ids"]
    width = max(map(len, labels))
    label_ids = np.array([x + [-100] * (width - len(x)) for x in labels])
    pad = tokenizer.pad_token_id
    predictions = np.array([[pad] + x + [pad] * (width - len(x)) for x in labels])
    hypotheses = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
    assert hypotheses != references  # the tokenizer loses something here
    expected = sacrebleu.corpus_bleu(hypotheses, [references]).score
    metrics = make_compute_metrics(tokenizer, references=references)(
        type("EvalPrediction", (), {"predictions": predictions, "label_ids": label_ids})())
    assert metrics["bleu"] == pytest.approx(expected) and metrics["bleu"] < 99
    with pytest.raises(ValueError, match="2 references.*3 predictions"):
        make_compute_metrics(tokenizer, references=references)(
            type("EvalPrediction", (), {"predictions": np.concatenate([predictions, predictions[:1]]),
                                        "label_ids": label_ids})())


# ------------------------------------------------------------------------- generation limits (fault 5)
def _never_stops(tokenizer, max_positions=64):
    """A small Marian whose end-of-sequence logit is -inf: every translation runs to the length limit."""
    from hf_seqkd import tiny_seq2seq_model

    model = tiny_seq2seq_model(tokenizer, "marian", d_model=16, encoder_layers=1, decoder_layers=1,
                               max_position_embeddings=max_positions, seed=3)
    model.final_logits_bias[0, tokenizer.eos_token_id] = float("-inf")
    return model.eval()


def test_translation_limit_is_capped_at_the_position_table(tokenizer):
    """A limit beyond what the model's position table represents, and sources longer than it, are cut, not a
    crash (IndexError) deep inside the model."""
    model = _never_stops(tokenizer)
    long_source = " ".join(["one two three four"] * 30)  # far beyond 64 tokens
    hypotheses, generated = translate(model, tokenizer, ["one two", long_source], max_new_tokens=500, batch_size=2)
    assert len(hypotheses) == 2 and generated <= 2 * 64
    out = evaluate_translation(model, tokenizer, ["one two"], ["one two"], num_beams=2, max_new_tokens=500)
    assert out["bleu"] >= 0


# ---------------------------------------------------------------------- batch invariance (fault 8, audit)
def test_translations_do_not_depend_on_the_batching_even_with_left_padding(tokenizer, toy_corpus):
    """A tokenizer saved with padding_side='left' must not shift a Marian model's (absolute) positions: the
    translation of a sentence is the same whatever its batch neighbours."""
    from hf_seqkd import tiny_seq2seq_model

    model = tiny_seq2seq_model(tokenizer, "marian", d_model=32, encoder_layers=2, decoder_layers=2, seed=4).eval()
    sources = list(toy_corpus["test"]["source"][:12])
    tokenizer.padding_side = "left"
    try:
        one = [translate(model, tokenizer, [s], max_new_tokens=12, batch_size=1)[0][0] for s in sources]
        batched, _ = translate(model, tokenizer, sources, max_new_tokens=12, batch_size=7, sort_by_length=False)
        beam_one = [translate(model, tokenizer, [s], num_beams=3, max_new_tokens=12)[0][0] for s in sources[:6]]
        beam_batched, _ = translate(model, tokenizer, sources[:6], num_beams=3, max_new_tokens=12, batch_size=6)
    finally:
        tokenizer.padding_side = "right"
    assert one == batched
    assert beam_one == beam_batched


def _copy_task(tokenizer, toy_corpus):
    """20 texts of 5-24 words as their own translations, and a student whose ``generate`` is a stand-in that emits
    each source's reference (honouring the limit it is given; 20 tokens without one, as ``generate`` does when
    neither the call nor the generation config sets a length)."""
    from datasets import Dataset

    from hf_seqkd import prepare_distillation_dataset, tiny_seq2seq_model

    words = " ".join(toy_corpus["train"]["target"]).split()
    texts = [" ".join(words[i:i + n]) for i, n in zip(range(0, 400, 20), range(5, 30))]
    encoded = prepare_distillation_dataset(Dataset.from_dict({"source": texts, "target": texts}), tokenizer)
    lengths = [len(x) for x in encoded["labels"]]
    student = tiny_seq2seq_model(tokenizer, "marian", d_model=16, encoder_layers=1, decoder_layers=1, seed=0)
    default_limit = 20
    answers = {tuple(s): y for s, y in zip(encoded["input_ids"], encoded["labels"])}
    start, pad = student.config.decoder_start_token_id, tokenizer.pad_token_id

    def generate(input_ids=None, attention_mask=None, max_new_tokens=None, max_length=None, **kwargs):
        limit = max_new_tokens + 1 if max_new_tokens is not None else (max_length or default_limit)
        rows = [([start] + answers[tuple(i for i, m in zip(ids, mask) if m)])[:limit]
                for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]
        width = max(map(len, rows))
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])

    student.generate = generate
    return texts, encoded, lengths, student


def _validating_trainer(tmp_path, tokenizer, texts, encoded, student, **kw):
    from hf_seqkd import DistillationDataCollator, DistillationTrainer

    from _helpers import training_args

    return DistillationTrainer(model=student, train_dataset=encoded, eval_dataset=encoded,
                               data_collator=DistillationDataCollator(tokenizer, student), processing_class=tokenizer,
                               compute_metrics=make_compute_metrics(tokenizer, references=texts),
                               args=training_args(tmp_path, alpha=0.0, predict_with_generate=True,
                                                  per_device_eval_batch_size=8, **kw))


@pytest.mark.parametrize("sampling", ["random", "group_by_length"])
def test_validation_lets_translations_run_as_long_as_the_targets(tmp_path, tokenizer, toy_corpus, sampling):
    """A copy task with 12-35-token targets and a student whose generation config says max_length=20 (every model
    built from a config): a model that reproduces each reference scores 100 in validation, as it would in the final
    evaluation, instead of being cut at 20 tokens. The 'model' is the reference itself, emitted by a stand-in
    generate that honours the limit it is given. With length-grouped training batches too (Transformers 5 groups
    the evaluation set as well, and the predictions then met other sentences' references)."""
    texts, encoded, lengths, student = _copy_task(tokenizer, toy_corpus)
    assert min(lengths) <= 14 and max(lengths) >= 30
    metrics = _validating_trainer(tmp_path, tokenizer, texts, encoded, student,
                                  train_sampling_strategy=sampling).evaluate()
    assert metrics["eval_bleu"] == pytest.approx(100.0)
    assert metrics["eval_gen_len"] == pytest.approx(sum(lengths) / len(lengths))


def test_validation_stops_translations_where_the_final_evaluation_stops(tmp_path, tokenizer, toy_corpus):
    """Validation generates up to the run's ``max_new_tokens``, the final evaluation's limit, not up to the longer
    ``max_target_length`` (a student whose outputs run on used to score differently in validation, where it chose
    the checkpoint, than in the final evaluation): the same BLEU as ``evaluate_translation`` at that limit."""
    from hf_seqkd.evaluation import evaluate_translation

    texts, encoded, lengths, student = _copy_task(tokenizer, toy_corpus)
    limit = 12
    metrics = _validating_trainer(tmp_path, tokenizer, texts, encoded, student, max_new_tokens=limit,
                                  max_target_length=64).evaluate()
    assert metrics["eval_gen_len"] == pytest.approx(sum(min(n, limit) for n in lengths) / len(lengths))
    final = evaluate_translation(student, tokenizer, texts, texts, max_new_tokens=limit, batch_size=8)["bleu"]
    assert metrics["eval_bleu"] == pytest.approx(final) and final < 90


@pytest.mark.parametrize("num_beams", [1, 3])
def test_beam_output_probability_is_the_product_of_the_models_token_probabilities(tiny_marian, tokenizer,
                                                                                   toy_corpus, num_beams):
    """Kim & Rush's p(t = y_hat): checked against scoring each sentence's own output one prefix at a time (the slow,
    obvious way), on a batch whose outputs end at different lengths (some at the limit)."""
    from hf_seqkd.evaluation import beam_output_probability

    model = tiny_marian.eval()
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # a random model that listens to its source, nudged to end at different steps
        for name, param in model.named_parameters():
            if "encoder_attn." in name and "layer_norm" not in name:
                param.mul_(5)
        model.final_logits_bias[0, eos] = 0.4
    sources = list(toy_corpus["test"]["source"][:6])
    got = beam_output_probability(model, tokenizer, sources, num_beams=num_beams, batch_size=6, max_new_tokens=8)
    expected, lengths = [], []
    with torch.no_grad():
        for source in sources:
            encoded = tokenizer(source, return_tensors="pt")
            output = model.generate(**encoded, num_beams=num_beams, do_sample=False, max_new_tokens=8)[0].tolist()
            tokens = output[1:]
            if eos in tokens:
                tokens = tokens[:tokens.index(eos) + 1]
            lengths.append(len(tokens))
            probability = 1.0
            for i, token in enumerate(tokens):
                logits = model(**encoded, decoder_input_ids=torch.tensor([output[:i + 1]])).logits[0, -1]
                probability *= torch.softmax(logits.double(), -1)[token].item()
            expected.append(probability)
    assert len(set(lengths)) > 1, lengths
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert model.training is False


def test_printing_a_result_leaves_out_the_translations():
    """``print(evaluate_model(...))`` (the README's quick start) shows the scores, not every translation of the test
    set; the translations stay on the result and in ``to_dict``."""
    from hf_seqkd.evaluation import EvaluationResult

    hypotheses = [f"sentence number {i}" for i in range(300)]
    result = EvaluationResult(model="student", bleu_greedy=31.5, hypotheses_greedy=hypotheses,
                              hypotheses_beam=hypotheses)
    text = repr(result)
    assert "bleu_greedy=31.5" in text and "sentence number" not in text
    assert result.to_dict()["hypotheses_greedy"] == hypotheses
