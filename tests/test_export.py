"""CTranslate2 export: the converted tiny Marian translates as Transformers does."""

import contextlib
import json
import sys

import pytest
import torch

ctranslate2 = pytest.importorskip("ctranslate2")

from hf_seqkd import tiny_seq2seq_model  # noqa: E402
from hf_seqkd.export import CTranslate2Translator, to_ctranslate2, translate_ctranslate2  # noqa: E402

MAX_NEW = 48


@contextlib.contextmanager
def _one_thread():
    """Torch with one thread: with two threads on a busy 2-core machine, OpenMP spin-waiting makes this
    training 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_marian_dir(tokenizer, toy_corpus, tmp_path_factory):
    """A 2+2-layer Marian (d=64) trained for 150 AdamW steps on the toy corpus, saved with its tokenizer."""
    model = tiny_seq2seq_model(tokenizer, "marian", d_model=64, encoder_layers=2, decoder_layers=2, seed=0)
    train = toy_corpus["train"]
    src, tgt = list(train["source"]), list(train["target"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    with _one_thread():
        _train(model, tokenizer, src, tgt, optimizer, gen)
    model.eval()
    out = tmp_path_factory.mktemp("marian")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _train(model, tokenizer, src, tgt, optimizer, gen, steps=150):
    for _ in range(steps):
        idx = torch.randint(0, len(src), (32,), generator=gen).tolist()
        batch = tokenizer([src[i] for i in idx], text_target=[tgt[i] for i in idx], padding=True,
                          return_tensors="pt")
        batch["labels"][batch["labels"] == tokenizer.pad_token_id] = -100
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def hf_greedy(trained_marian_dir, tokenizer, toy_corpus):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(trained_marian_dir).eval()
    sources = list(toy_corpus["test"]["source"])
    with torch.no_grad(), _one_thread():
        ids = model.generate(**tokenizer(sources, return_tensors="pt", padding=True), num_beams=1,
                             do_sample=False, max_new_tokens=MAX_NEW)
    hyps = tokenizer.batch_decode(ids, skip_special_tokens=True)
    # sentences whose translation ended before the length limit (at the limit Transformers forces </s>)
    lengths = (ids != tokenizer.pad_token_id).sum(-1)
    finished = [i for i in range(len(sources)) if lengths[i] < MAX_NEW]
    return sources, hyps, finished, model


def test_trained_model_is_not_degenerate(hf_greedy):
    sources, hyps, finished, model = hf_greedy
    assert len(set(hyps)) >= 0.75 * len(hyps)  # different sources get different translations
    assert len(finished) >= 0.75 * len(hyps)
    # the reason for the Marian adapter: training moved the tied <pad> row (the decoder's start embedding)
    assert model.model.shared.weight[model.config.pad_token_id].norm() > 0


def test_float32_conversion_translates_exactly_like_transformers(trained_marian_dir, tokenizer, hf_greedy,
                                                                 tmp_path):
    from ctranslate2.converters import transformers as ct2_transformers

    original_loader = ct2_transformers._MODEL_LOADERS["MarianConfig"]
    out = to_ctranslate2(trained_marian_dir, tmp_path / "ct2", quantization="float32")
    assert ct2_transformers._MODEL_LOADERS["MarianConfig"] is original_loader  # registry restored
    config = json.loads((tmp_path / "ct2" / "config.json").read_text())
    assert config["decoder_start_token"] == "<pad>"
    vocab = json.loads((tmp_path / "ct2" / "shared_vocabulary.json").read_text())
    assert vocab == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))  # pad kept: same ids

    sources, hyps, finished, _ = hf_greedy
    ct2 = translate_ctranslate2(out, tokenizer, sources, num_beams=1, batch_size=16, max_new_tokens=MAX_NEW,
                               intra_threads=1)
    assert len(ct2) == len(sources) and all(isinstance(h, str) for h in ct2)
    same = [i for i in finished if ct2[i] == hyps[i]]
    assert same == finished, [(hyps[i], ct2[i]) for i in finished if ct2[i] != hyps[i]]
    assert ct2.seconds > 0 and ct2.sentences_per_second > 0 and ct2.num_sentences == len(sources)
    assert ct2.timing["sentences_per_second"] == pytest.approx(len(sources) / ct2.seconds)
    assert "<pad>" not in " ".join(ct2) and "</s>" not in " ".join(ct2)

    with pytest.raises(RuntimeError):  # exists: CTranslate2 refuses without force
        to_ctranslate2(trained_marian_dir, tmp_path / "ct2", quantization="float32")
    to_ctranslate2(trained_marian_dir, tmp_path / "ct2", quantization="float32", force=True)


def test_int8_conversion_is_close(trained_marian_dir, tokenizer, hf_greedy, tmp_path):
    out = to_ctranslate2(trained_marian_dir, tmp_path / "ct2_int8")  # default: int8
    sources, hyps, finished, _ = hf_greedy
    translator = CTranslate2Translator(out, trained_marian_dir, intra_threads=1)  # tokenizer loaded from the folder
    ct2 = translator.translate(sources, max_new_tokens=MAX_NEW)
    assert translator.last_timing["num_sentences"] == len(sources)
    same = sum(ct2[i] == hyps[i] for i in finished)
    assert same >= 0.8 * len(finished), (same, len(finished))
    beams = translator(sources[:8], num_beams=4, max_new_tokens=MAX_NEW)
    assert len(beams) == 8 and all(b.strip() for b in beams)
    assert list(translator.translate([])) == []


def test_missing_tokenizer_and_missing_ctranslate2_errors(tiny_marian, tmp_path, monkeypatch):
    tiny_marian.save_pretrained(tmp_path / "no_tok")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        to_ctranslate2(tmp_path / "no_tok", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="config.json"):
        to_ctranslate2(tmp_path / "nothing", tmp_path / "out")
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    monkeypatch.setitem(sys.modules, "ctranslate2.converters", None)
    with pytest.raises(ImportError, match=r'pip install "hf_seqkd\[ct2\]"'):
        to_ctranslate2(tmp_path / "no_tok", tmp_path / "out")


@pytest.mark.parametrize("family", ["marian", "bart", "t5"])
def test_converted_scores_match_transformers(family, tokenizer, toy_corpus, tmp_path):
    """Teacher-forced log-probabilities of the references agree (encoder, decoder start, output layer).

    The weights are perturbed so that nothing sits at its initial value (Marian's <pad> row is then non-zero,
    as after training). A converted Marian never generates <pad> (see hf_seqkd.export), so its Transformers
    log-softmax is taken without the <pad> logit; BART and T5 keep it (stock CTranslate2 loaders).
    """
    model = tiny_seq2seq_model(tokenizer, family, d_model=32, encoder_layers=2, decoder_layers=2, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    out = to_ctranslate2(tmp_path / "hf", tmp_path / "ct2", quantization="float32")

    test = toy_corpus["test"]
    sources, targets = list(test["source"][:8]), list(test["target"][:8])
    src_tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in tokenizer(sources)["input_ids"]]
    tgt_tokens = [tokenizer.convert_ids_to_tokens(ids[:-1]) for ids in tokenizer(text_target=targets)["input_ids"]]
    translator = ctranslate2.Translator(str(out), intra_threads=1)
    ct2_scores = torch.tensor([sum(r.log_probs) for r in translator.score_batch(src_tokens, tgt_tokens)])

    batch = tokenizer(sources, text_target=targets, padding=True, return_tensors="pt")
    labels = batch["labels"]
    mask = labels != tokenizer.pad_token_id
    with torch.no_grad(), _one_thread():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=labels.masked_fill(~mask, -100)).logits
    if family == "marian":
        logits[..., tokenizer.pad_token_id] = float("-inf")
    logp = torch.log_softmax(logits, -1).gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    hf_scores = torch.where(mask, logp, 0.0).sum(-1)
    torch.testing.assert_close(ct2_scores, hf_scores, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_seqkd_corpus_from_a_ctranslate2_teacher_matches_transformers(trained_marian_dir, tokenizer, toy_corpus,
                                                                      tmp_path, num_beams):
    """build_seqkd_dataset with the teacher converted to CTranslate2 (float32): the same translations and scores
    (length-normalised log-probabilities) as with the Transformers teacher; its cache is keyed by the files."""
    from transformers import AutoModelForSeq2SeqLM

    from _helpers import build

    model = AutoModelForSeq2SeqLM.from_pretrained(trained_marian_dir).eval()
    translator = CTranslate2Translator(to_ctranslate2(trained_marian_dir, tmp_path / "ct2", quantization="float32"),
                                       tokenizer, intra_threads=1)
    data = toy_corpus["test"]
    k = 1 if num_beams == 1 else 2
    settings = dict(num_beams=num_beams, num_return_sequences=k, max_new_tokens=MAX_NEW, show_progress=False)
    with _one_thread():
        reference = build(data, model, tokenizer, **settings)
    cache = tmp_path / "cache"
    out = build(data, translator, tokenizer, cache_dir=cache, **settings)
    assert out["source"] == data["source"]
    same = [i for i, (a, b) in enumerate(zip(out["teacher_target"], reference["teacher_target"])) if a == b]
    assert len(same) >= 0.9 * len(data), f"only {len(same)} of {len(data)} translations agree"
    for i in same:
        assert out["teacher_score"][i] == pytest.approx(reference["teacher_score"][i], abs=1e-3)
    if k > 1:
        assert all(len(x) == k for x in out["teacher_nbest"])
    assert any(s != out["teacher_score"][0] for s in out["teacher_score"])

    class NoTranslation:  # a rerun with the same inputs must load the cache and translate nothing
        compute_type = translator.translator.compute_type

        def translate_batch(self, *args, **kwargs):
            raise AssertionError("translate_batch called although the result is cached")

    real, translator.translator = translator.translator, NoTranslation()
    again = build(data, translator, tokenizer, cache_dir=cache, **settings)
    assert again["teacher_target"] == out["teacher_target"]
    translator.translator = real
    with pytest.raises(ValueError, match="compute type"):
        build(data, translator, tokenizer, dtype="bfloat16", **settings)
    # another conversion of the same model (int8 weights) is another teacher: a new cache entry
    int8 = CTranslate2Translator(to_ctranslate2(trained_marian_dir, tmp_path / "ct2_int8", quantization="int8"),
                                 tokenizer, intra_threads=1)
    build(data, int8, tokenizer, cache_dir=cache, **settings)
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2


def test_a_student_with_a_padded_vocabulary_exports_and_translates_alike(trained_marian_dir, tokenizer, hf_greedy,
                                                                         tmp_path):
    """A model with more vocabulary rows than its tokenizer (padded for KD, as the README allows) converts, and the
    converted model translates as the original does with the padding rows suppressed (they are never generated)."""
    from transformers import AutoModelForSeq2SeqLM

    sources, _, _, _ = hf_greedy
    model = AutoModelForSeq2SeqLM.from_pretrained(trained_marian_dir).eval()
    rows = len(tokenizer) + 8
    model.resize_token_embeddings(rows)
    with torch.no_grad():  # make the padding rows attractive: a converter that does not ban them would emit them
        model.get_output_embeddings().weight[len(tokenizer):] = model.get_output_embeddings().weight[5] * 3
    assert model.get_output_embeddings().weight.shape[0] == rows
    model.save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")
    out = to_ctranslate2(tmp_path / "padded", tmp_path / "ct2", quantization="float32")
    vocab = json.loads((tmp_path / "ct2" / "shared_vocabulary.json").read_text())
    assert len(vocab) == rows
    assert vocab[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    with torch.no_grad(), _one_thread():
        ids = model.generate(**tokenizer(sources, return_tensors="pt", padding=True), num_beams=1, do_sample=False,
                             max_new_tokens=MAX_NEW, suppress_tokens=list(range(len(tokenizer), rows)))
    reference = tokenizer.batch_decode(ids, skip_special_tokens=True)
    lengths = (ids != tokenizer.pad_token_id).sum(-1)
    finished = [i for i in range(len(sources)) if lengths[i] < MAX_NEW]
    ct2 = translate_ctranslate2(out, tokenizer, sources, num_beams=1, max_new_tokens=MAX_NEW, intra_threads=1)
    assert len(finished) > len(sources) // 2
    assert [ct2[i] for i in finished] == [reference[i] for i in finished]
    assert "hf_seqkd_unused" not in " ".join(ct2)
