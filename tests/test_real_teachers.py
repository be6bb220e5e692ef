"""Real teachers: every user path of hf_seqkd on Hub-like replicas of the six families users bring (opus-mt, T5,
BART, mBART-50, M2M100, NLLB-200), each compared with the family's model-card call
(``model_families.reference_generate``: language codes on the tokenizer, ``forced_bos_token_id``, T5's prefix),
token for token, into English and out of it.

The replicas are trained for a few hundred steps on a small built-in corpus in every direction their card calls
(plus copying for the many-to-many ones), so their output depends on the requested target language as a real
checkpoint's does; ``test_the_replicas_need_their_languages`` checks that a wrong call gives a different output,
so that the comparisons below can fail.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings

import pyarrow.parquet as pq
import pytest
import sacrebleu
import torch
from datasets import Dataset
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from hf_seqkd import DistillationTrainer, DistillationTrainingArguments, GenerationSettings, build_seqkd_dataset
from hf_seqkd.data import decoder_inputs_from_labels
from hf_seqkd.evaluation import timed_decode
from hf_seqkd.generation import ScoreRecorder, cap_max_new_tokens, translate
from hf_seqkd.hub import translation_pipeline
from hf_seqkd.languages import check_single_direction, resolve_languages
from hf_seqkd.students import make_student

from _helpers import training_args
from model_families import SPECS, corpus, reference_generate

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MAX_NEW_TOKENS = 24
PAIRS = corpus()[::41][:8]  # sentences the replicas were trained on: their outputs end well before the limit
SOURCES = {"de": [de for de, _ in PAIRS], "en": [en for _, en in PAIRS]}
# (family, source, target): opus-mt-de-en and bart one way; T5 with the prefix its config has (en->de) and one
# given by the user (de->en); the multilingual families both ways
CASES = [("marian", "de", "en"), ("bart", "de", "en"), ("t5", "en", "de"), ("t5", "de", "en")] + [
    (name, src, tgt) for name in ("mbart50", "m2m100", "nllb") for src, tgt in (("de", "en"), ("en", "de"))]
MULTILINGUAL = [case for case in CASES if SPECS[case[0]].needs_forced_bos]
IDS = [f"{name}-{src}-{tgt}" for name, src, tgt in CASES]
ML_IDS = [f"{name}-{src}-{tgt}" for name, src, tgt in MULTILINGUAL]


def codes(name, src, tgt) -> dict:
    """The tokenizer's language codes for the direction (``{}`` for families without codes)."""
    spec = SPECS[name]
    return {} if spec.src_lang is None else {"src_lang": spec.src_lang[src], "tgt_lang": spec.src_lang[tgt]}


def card_tokenizer(folder, name, src, tgt):
    """The tokenizer loaded as the multilingual model cards load it: ``from_pretrained(..., src_lang, tgt_lang)``."""
    return AutoTokenizer.from_pretrained(folder, **codes(name, src, tgt))


def user_prefix(name, src, tgt) -> str:
    """The prefix a user passes: only T5 de->en, which t5-small's config has no prefix for."""
    return SPECS[name].prefix[(src, tgt)] if (name, src, tgt) == ("t5", "de", "en") else ""


def expected(folder, name, src, tgt, sources=None, **generate_kwargs) -> list[list[int]]:
    """The model-card call's output ids (decoder start first, cut after </s>)."""
    return reference_generate(folder, SOURCES[src] if sources is None else sources, src, tgt, family=name,
                              **{"max_new_tokens": MAX_NEW_TOKENS, **generate_kwargs})


def texts(tokenizer, rows) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


@pytest.fixture(scope="module")
def ctranslate2_dirs(family_snapshots, tmp_path_factory):
    """``get(name)``: the family replica converted to CTranslate2 (float32), once per module."""
    pytest.importorskip("ctranslate2")
    from hf_seqkd.export import to_ctranslate2

    done = {}

    def get(name):
        if name not in done:
            done[name] = to_ctranslate2(family_snapshots(name), tmp_path_factory.mktemp(f"ct2-{name}") / "ct2",
                                        quantization="float32", force=True)
        return done[name]

    return get


# ---------------------------------------------------------------------------------------------- the references
@pytest.mark.parametrize("name", ["t5", "mbart50", "m2m100", "nllb"])
def test_the_replicas_need_their_languages(family_snapshots, name):
    """A call without the forced target token (without T5's prefix) translates differently: the comparisons with
    the card's call below fail when a path leaves the languages out."""
    folder = family_snapshots(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    differs = []
    for src, tgt in (("de", "en"), ("en", "de")):
        right = expected(folder, name, src, tgt)
        if name == "t5":
            model = AutoModelForSeq2SeqLM.from_pretrained(folder)
            batch = tokenizer(SOURCES[src], return_tensors="pt", padding=True)
            wrong = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS).tolist()
        else:
            wrong = expected(folder, name, src, tgt, forced_bos_token_id=None)
        differs.append(texts(tokenizer, right) != texts(tokenizer, wrong))
    assert any(differs)
    right = texts(tokenizer, expected(folder, name, "de", "en"))  # and it does translate: English words out
    assert sum(len({"The", "the", "A", "a"} & set(t.split())) > 0 for t in right) >= len(right) // 2


# ---------------------------------------------------------------------------------------- the Seq-KD corpus
@pytest.mark.parametrize("name,src,tgt", CASES, ids=IDS)
def test_corpus_follows_a_tokenizer_loaded_with_its_languages(family_snapshots, name, src, tgt):
    """build_seqkd_dataset with nothing but the tokenizer the card loads (and a T5 prefix the user names) gives
    the card's beam search output."""
    folder = family_snapshots(name)
    tokenizer = card_tokenizer(folder, name, src, tgt)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(folder)
    languages = resolve_languages(tokenizer, teacher, source_lang=src, target_lang=tgt,
                                  source_prefix=user_prefix(name, src, tgt))
    out = build_seqkd_dataset(Dataset.from_dict({"source": SOURCES[src]}), teacher, tokenizer,
                              GenerationSettings(num_beams=3, max_new_tokens=MAX_NEW_TOKENS),
                              source_prefix=languages.source_prefix)
    reference = expected(folder, name, src, tgt, num_beams=3, length_penalty=1.0)
    assert [t.strip() for t in out["teacher_target"]] == texts(tokenizer, reference)


@pytest.mark.parametrize("name,src,tgt", CASES, ids=IDS)
def test_ctranslate2_corpus_and_decoding_follow_the_languages(family_snapshots, ctranslate2_dirs, name, src, tgt):
    """The CTranslate2 teacher (target prefix, the generation config's options) gives the card's output: the
    Seq-KD corpus (texts and scores, as the Transformers teacher's) and timed decoding."""
    from hf_seqkd.export import CTranslate2Translator

    folder = family_snapshots(name)
    tokenizer = card_tokenizer(folder, name, src, tgt)
    translator = CTranslate2Translator(ctranslate2_dirs(name), tokenizer)
    prefix = resolve_languages(tokenizer, AutoModelForSeq2SeqLM.from_pretrained(folder), source_lang=src,
                               target_lang=tgt, source_prefix=user_prefix(name, src, tgt)).source_prefix
    reference = texts(tokenizer, expected(folder, name, src, tgt, num_beams=1))
    data = Dataset.from_dict({"source": SOURCES[src]})
    out = build_seqkd_dataset(data, translator, tokenizer,
                              GenerationSettings(num_beams=1, max_new_tokens=MAX_NEW_TOKENS), source_prefix=prefix)
    assert [t.strip() for t in out["teacher_target"]] == reference
    # the scores too, also for outputs cut at a short limit (a forced </s> counts as Transformers counts it)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    for limit in (MAX_NEW_TOKENS, 6):
        settings = GenerationSettings(num_beams=1, max_new_tokens=limit)
        ours = build_seqkd_dataset(data, translator, tokenizer, settings, source_prefix=prefix)
        theirs = build_seqkd_dataset(data, model, tokenizer, settings, source_prefix=prefix)
        assert ours["teacher_target"] == theirs["teacher_target"]
        torch.testing.assert_close(torch.tensor(ours["teacher_score"]), torch.tensor(theirs["teacher_score"]),
                                   atol=2e-3, rtol=0)
    decoded = timed_decode(translator, tokenizer, SOURCES[src], reference, max_new_tokens=MAX_NEW_TOKENS,
                           source_prefix=prefix)
    assert decoded["hypotheses"] == reference and decoded["bleu"] == pytest.approx(100.0)


@pytest.mark.parametrize("name,src,tgt", CASES, ids=IDS)
def test_translate_follows_the_tokenizer(family_snapshots, name, src, tgt):
    """hf_seqkd's translate (evaluation, reports, timing, pruning evaluation) with the card's tokenizer."""
    folder = family_snapshots(name)
    tokenizer = card_tokenizer(folder, name, src, tgt)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    prefix = resolve_languages(tokenizer, model, source_lang=src, target_lang=tgt,
                               source_prefix=user_prefix(name, src, tgt)).source_prefix
    hypotheses, _ = translate(model, tokenizer, SOURCES[src], max_new_tokens=MAX_NEW_TOKENS, source_prefix=prefix)
    assert hypotheses == texts(tokenizer, expected(folder, name, src, tgt, num_beams=1))


def test_ctranslate2_follows_the_generation_config(family_snapshots, ctranslate2_dirs, tmp_path):
    """bart-base's generation config (no_repeat_ngram_size=3, forced <s>) and changes to it (no repeated bigram,
    a banned word, a minimum length) reach CTranslate2 as they reach generate."""
    from hf_seqkd.export import CTranslate2Translator

    folder = family_snapshots("bart")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    sources = SOURCES["de"]

    def hf(**kwargs):
        batch = tokenizer(sources, return_tensors="pt", padding=True)
        return texts(tokenizer, model.generate(**batch, num_beams=1, max_new_tokens=40, **kwargs))

    def ct2(folder_):
        return [h.strip() for h in CTranslate2Translator(folder_, tokenizer).translate(sources, max_new_tokens=40)]

    assert ct2(ctranslate2_dirs("bart")) == hf()
    changed = tmp_path / "ct2"
    os.makedirs(changed)
    for entry in os.listdir(ctranslate2_dirs("bart")):
        os.symlink(os.path.join(ctranslate2_dirs("bart"), entry), changed / entry)
    config = json.loads((changed / "generation_config.json").read_text())
    (changed / "generation_config.json").unlink()
    options = {"no_repeat_ngram_size": 2, "bad_words_ids": [[tokenizer.convert_tokens_to_ids("Ġthe")]],
               "min_new_tokens": 14}
    (changed / "generation_config.json").write_text(json.dumps({**config, **options}))
    stricter = hf(**options)
    assert sum(a != b for a, b in zip(stricter, hf())) >= len(sources) // 2  # the options change the output ...
    assert ct2(changed) == stricter  # ... and CTranslate2 follows them


# ------------------------------------------------------------------------------------------------ the trainer
def _raw(src, tgt, n=8):
    return Dataset.from_dict({"source": SOURCES[src][:n], "target": SOURCES[tgt][:n]})


@pytest.mark.parametrize("name,src,tgt", MULTILINGUAL + [("t5", "en", "de")],
                         ids=ML_IDS + ["t5-en-de"])
def test_trainer_follows_the_named_languages(family_snapshots, tmp_path, name, src, tgt):
    """A tokenizer loaded plainly (English by default) plus src_lang/tgt_lang in the arguments: the corpus is the
    card's, sources and labels carry the right codes, validation generates into the target language, and the
    student records what calling it needs."""
    folder = family_snapshots(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(folder)
    spec = SPECS[name]
    named = codes(name, src, tgt) or {"src_lang": src, "tgt_lang": tgt}
    args = training_args(tmp_path, DistillationTrainingArguments, kd_target="teacher_target", num_beams=3,
                         max_new_tokens=MAX_NEW_TOKENS, max_target_length=2 * MAX_NEW_TOKENS,
                         generation_max_length=MAX_NEW_TOKENS + 1, seqkd_cache_dir=str(tmp_path / "cache"),
                         predict_with_generate=True, per_device_eval_batch_size=8, **named)
    greedy = texts(tokenizer, expected(folder, name, src, tgt, num_beams=1))
    validation = Dataset.from_dict({"source": SOURCES[src], "target": greedy})
    trainer = DistillationTrainer(model=make_student(teacher, encoder_layers=2, decoder_layers=2),
                                  teacher_model=teacher, args=args, train_dataset=_raw(src, tgt),
                                  eval_dataset=validation, processing_class=tokenizer)
    # the corpus: the card's beam search
    row = trainer.train_dataset[0]
    beam = texts(tokenizer, expected(folder, name, src, tgt, num_beams=3, length_penalty=1.0))
    corpus_texts = [tokenizer.decode(r["labels"], skip_special_tokens=True).strip() for r in trainer.train_dataset]
    assert sorted(corpus_texts) == sorted(beam)
    if spec.needs_forced_bos:
        source_code = tokenizer.convert_tokens_to_ids(spec.lang_token[src])
        target_code = tokenizer.convert_tokens_to_ids(spec.lang_token[tgt])
        assert row["input_ids"][0] == source_code and row["labels"][0] == target_code
        assert trainer.model.generation_config.forced_bos_token_id == target_code
        assert (tokenizer.src_lang, tokenizer.tgt_lang) == (spec.src_lang[src], spec.src_lang[tgt])
    else:  # T5 en->de: the prefix from the model's task_specific_params
        assert tokenizer.decode(row["input_ids"]).startswith("translate English to German:")
        assert trainer.model.config.prefix == "translate English to German: "
    # validation during training: the student is the teacher's copy, so it predicts the card's greedy output
    trainer.model.load_state_dict(teacher.state_dict())
    metrics = trainer.evaluate()
    assert metrics["eval_bleu"] == pytest.approx(100.0) and metrics["eval_chrf"] == pytest.approx(100.0)


@pytest.mark.parametrize("name,src,tgt", [("nllb", "de", "en"), ("mbart50", "en", "de"), ("m2m100", "en", "de")],
                         ids=["nllb-de-en", "mbart50-en-de", "m2m100-en-de"])
def test_hybrid_teacher_labels_are_the_cards_greedy_output(family_snapshots, tmp_path, name, src, tgt):
    folder = family_snapshots(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(folder)
    args = training_args(tmp_path, DistillationTrainingArguments, alpha=0.5, hybrid_gate="scalar",
                         generation_max_length=MAX_NEW_TOKENS + 1, max_target_length=MAX_NEW_TOKENS,
                         **codes(name, src, tgt))
    trainer = DistillationTrainer(model=make_student(teacher, encoder_layers=1, decoder_layers=1),
                                  teacher_model=teacher, args=args, train_dataset=_raw(src, tgt),
                                  processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])  # the first four sources
    labels = trainer._teacher_labels(batch)
    reference = expected(folder, name, src, tgt, sources=SOURCES[src][:4], num_beams=1)
    for row, ref in zip(labels.tolist(), reference):
        assert [t for t in row if t != -100] == ref[1:]  # the decoder start is not a label


@pytest.mark.parametrize("method", ["word_kd", "ckd", "hybrid"])
@pytest.mark.parametrize("name", ["nllb", "m2m100"])
def test_word_kd_ckd_and_hybrid_train_on_m2m100_models(family_snapshots, tmp_path, name, method):
    """M2M100ForConditionalGeneration (NLLB's class too) has no prepare_decoder_input_ids_from_labels in
    Transformers 5: the decoder inputs are the labels shifted right behind the decoder start."""
    folder = family_snapshots(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = {"word_kd": dict(alpha=0.5), "ckd": dict(alpha=0.25, intermediate_loss_weight=0.25),
                "hybrid": dict(alpha=0.5, hybrid_gate="scalar")}[method]
    teacher = AutoModelForSeq2SeqLM.from_pretrained(folder)
    trainer = DistillationTrainer(
        model=make_student(teacher, encoder_layers=1, decoder_layers=1), teacher_model=teacher,
        args=training_args(tmp_path, DistillationTrainingArguments, max_steps=2, generation_max_length=8,
                           **codes(name, "de", "en"), **settings),
        train_dataset=_raw("de", "en"), processing_class=tokenizer)
    labels = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])["labels"]
    decoder_input_ids = decoder_inputs_from_labels(trainer.model, labels)
    start = teacher.config.decoder_start_token_id
    assert decoder_input_ids[:, 0].tolist() == [start, start]
    assert decoder_input_ids[:, 1].tolist() == labels[:, 0].tolist()
    assert labels[:, 0].tolist() == [tokenizer.convert_tokens_to_ids("eng_Latn" if name == "nllb" else "__en__")] * 2
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


@pytest.mark.parametrize("name,src,tgt", [("nllb", "de", "en"), ("mbart50", "en", "de"), ("t5", "en", "de")],
                         ids=["nllb-de-en", "mbart50-en-de", "t5-en-de"])
def test_stored_distributions_train_as_the_online_teacher_does(family_snapshots, tmp_path, name, src, tgt):
    """Word-KD from the teacher's stored distributions (k = the whole vocabulary) trains the student exactly as
    the teacher running online: the stored pass sees the same labels (language codes, T5's prefix on the sources)
    and the same decoder inputs (M2M100's class has no prepare_decoder_input_ids_from_labels)."""
    import copy

    from _helpers import SequentialTrainer
    from _helpers import training_args as deterministic_args

    folder = family_snapshots(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(folder)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    student = make_student(teacher, encoder_layers=1, decoder_layers=1)
    runs = {}
    for way in ("online", "stored"):
        stored = {"teacher_distributions": "stored", "teacher_top_k": vocab} if way == "stored" else {}
        trainer = SequentialTrainer(
            model=copy.deepcopy(student), teacher_model=teacher, processing_class=tokenizer,
            train_dataset=_raw(src, tgt),
            args=deterministic_args(tmp_path / way, DistillationTrainingArguments, alpha=0.5, temperature=2.0,
                                    max_steps=2, **codes(name, src, tgt), **stored))
        assert (trainer.teacher_model is None) == (way == "stored")
        trainer.train()
        runs[way] = trainer
    online, stored = (runs[w].model for w in ("online", "stored"))
    for (parameter, p), q in zip(online.named_parameters(), stored.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=parameter)
    assert any(not torch.equal(p, q) for p, q in zip(online.parameters(), student.parameters()))  # it trained


# ---------------------------------------------------------------------------------------------- the languages
def test_t5_prefix_comes_from_the_config_and_a_missing_one_warns(family_snapshots):
    folder = family_snapshots("t5")
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForSeq2SeqLM.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the config has the prefix
        languages = resolve_languages(tokenizer, model, source_lang="en", target_lang="de")
    assert languages.source_prefix == "translate English to German: " and languages.forced_bos_token_id is None
    with pytest.warns(UserWarning, match="source_prefix"):
        assert resolve_languages(tokenizer, model, source_lang="de", target_lang="en").source_prefix == ""
    given = resolve_languages(tokenizer, model, source_lang="de", target_lang="en", source_prefix="übersetze: ")
    assert given.source_prefix == "übersetze: "


@pytest.mark.parametrize("name,example", [("nllb", "eng_Latn"), ("mbart50", "en_XX"), ("m2m100", "en")])
def test_a_multilingual_teacher_needs_a_target_language(family_snapshots, name, example):
    tokenizer = AutoTokenizer.from_pretrained(family_snapshots(name))
    with pytest.raises(ValueError, match=re.escape(repr(example))):
        resolve_languages(tokenizer, source_lang="de")
    with pytest.raises(ValueError, match="tgt_lang='xx_Unknown' is not a language code"):
        resolve_languages(tokenizer, src_lang=SPECS[name].src_lang["de"], tgt_lang="xx_Unknown")
    # the data's two-letter names are enough, as src_lang/tgt_lang too
    for kwargs in ({"source_lang": "de", "target_lang": "en"}, {"src_lang": "de", "tgt_lang": "en"}):
        named = resolve_languages(tokenizer, **kwargs)
        assert (named.src_lang, named.tgt_lang) == (SPECS[name].src_lang["de"], SPECS[name].src_lang["en"])
        assert named.forced_bos_token == SPECS[name].lang_token["en"]
    with pytest.warns(UserWarning, match="no source language named: sources are tagged"):
        resolve_languages(tokenizer, tgt_lang=SPECS[name].src_lang["en"])


def test_mixed_directions_are_refused_clearly():
    mixed = Dataset.from_dict({"source": ["a", "b"], "tgt_lang": ["deu_Latn", "fra_Latn"]})
    with pytest.raises(ValueError, match=r"mixes translation directions: column 'tgt_lang'.*'deu_Latn', 'fra_Latn'"):
        check_single_direction(mixed)
    check_single_direction(Dataset.from_dict({"source": ["a", "b"], "tgt_lang": ["deu_Latn"] * 2}))


def test_corpus_building_keeps_no_per_step_distributions(family_snapshots, monkeypatch):
    """The teacher's scores come from a recorder that keeps one value per continuation considered, not from
    output_scores (steps x rows x vocabulary floats)."""
    folder = family_snapshots("nllb")
    tokenizer = card_tokenizer(folder, "nllb", "de", "en")
    teacher = AutoModelForSeq2SeqLM.from_pretrained(folder)
    calls = []
    real = type(teacher).generate

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        recorders = [p.recorder for p in kwargs.get("logits_processor", [])
                     if isinstance(getattr(p, "recorder", None), ScoreRecorder)]
        calls.append((kwargs.get("output_scores"), getattr(out, "scores", None), recorders))
        return out

    monkeypatch.setattr(type(teacher), "generate", spy)
    build_seqkd_dataset(Dataset.from_dict({"source": SOURCES["de"]}), teacher, tokenizer,
                        GenerationSettings(num_beams=4, max_new_tokens=MAX_NEW_TOKENS))
    assert calls
    for output_scores, scores, recorders in calls:
        assert not output_scores and scores is None
        (recorder,) = recorders
        # one value per continuation considered: (1 + one </s> id) x 4 beams per sentence
        assert recorder.steps and all(values.shape == (2 * 4 * len(SOURCES["de"]),) for _, _, values in recorder.steps)


# ----------------------------------------------------------------------------------- recipes, saved students
def _write_data(folder, src, tgt, sizes):
    os.makedirs(folder, exist_ok=True)
    pairs = corpus()
    start = 0
    for split, n in sizes.items():
        chunk = pairs[start:start + n]
        start += n
        for lang, side in ((src, 0 if src == "de" else 1), (tgt, 0 if tgt == "de" else 1)):
            with open(os.path.join(folder, f"{split}.{lang}"), "w", encoding="utf-8") as f:
                f.write("\n".join(p[side] for p in chunk) + "\n")
    return str(folder)


def _run_config(config, teacher, data, out, *extra):
    from test_recipes import CONFIG_DIR, load_recipe

    recipe = load_recipe("seq_kd")
    tiny = ["--config", os.path.join(CONFIG_DIR, config), "--teacher_model_name_or_path", teacher,
            "--dataset", data, "--output_dir", str(out / "student"),
            "--seqkd_cache_dir", str(out / "cache"), "--student_encoder_layers", "2", "--student_decoder_layers", "2",
            "--max_train_samples", "12", "--max_eval_samples", "4", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--num_beams", "3",
            "--max_new_tokens", str(MAX_NEW_TOKENS), "--max_target_length", str(MAX_NEW_TOKENS),
            "--generation_max_length", str(MAX_NEW_TOKENS + 1), "--eval_steps", "2", "--save_steps", "2",
            "--eval_num_beams", "1", "--eval_batch_size", "8", "--bf16", "false", "--teacher_dtype", "float32",
            "--dataloader_num_workers", "0", "--use_cpu", "true", "--disable_tqdm", "true", "--warmup_steps", "0",
            *extra]
    return recipe.main(tiny)


def _corpus_texts(cache_dir) -> list[str]:
    """The teacher_target column of the one corpus in ``cache_dir``, in row order."""
    (path,) = [os.path.join(root, "result.parquet") for root, _, names in os.walk(cache_dir)
               if "result.parquet" in names]
    table = pq.read_table(path).to_pydict()
    return [text for _, text in sorted(zip(table["_row"], table["teacher_target"]))]


def _card_blocks(readme):
    return re.findall(r"```python\n(.*?)```", open(readme, encoding="utf-8").read(), flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("config,name,src,tgt", [("m2m100_418m_en_de.yaml", "m2m100", "en", "de"),
                                                 ("nllb_600m_de_en.yaml", "nllb", "de", "en")],
                         ids=["m2m100-en-de", "nllb-de-en"])
def test_config_runs_on_the_replica_and_the_student_card_works(family_snapshots, tmp_path, monkeypatch, config,
                                                              name, src, tgt):
    """recipes/configs/<config> with tiny sizes on the family's replica: the corpus is the card's beam search in
    the target language (also without src_lang/tgt_lang: from the data's names), the evaluation forces the target
    language, the saved student records its languages and forced token, and every code block of its model card
    runs as written (with the folder in place of the Hub id) and translates as the card's generate call does."""
    folder = family_snapshots(name)
    data = _write_data(tmp_path / "data", src, tgt, {"train": 12, "val": 4, "test": 4})
    rows = _run_config(config, folder, data, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_sources = open(os.path.join(data, f"train.{src}"), encoding="utf-8").read().splitlines()
    beam = texts(tokenizer, expected(folder, name, src, tgt, sources=train_sources, num_beams=3,
                                     length_penalty=1.0))
    assert [t.strip() for t in _corpus_texts(tmp_path / "run" / "cache")] == beam
    # the teacher's evaluation: the card's greedy call scored against the test references
    test_sources = open(os.path.join(data, f"test.{src}"), encoding="utf-8").read().splitlines()
    references = open(os.path.join(data, f"test.{tgt}"), encoding="utf-8").read().splitlines()
    greedy = texts(tokenizer, expected(folder, name, src, tgt, sources=test_sources, num_beams=1))
    teacher_row = next(r for r in rows if r["role"] == "teacher")
    assert teacher_row["bleu_greedy"] == pytest.approx(sacrebleu.corpus_bleu(greedy, [references]).score)
    # the saved student
    student = tmp_path / "run" / "student"
    spec = SPECS[name]
    saved = json.loads((student / "tokenizer_config.json").read_text())
    assert (saved["src_lang"], saved["tgt_lang"]) == (spec.src_lang[src], spec.src_lang[tgt])
    target_code = tokenizer.convert_tokens_to_ids(spec.lang_token[tgt])
    assert AutoModelForSeq2SeqLM.from_pretrained(student).generation_config.forced_bos_token_id == target_code
    # its model card, run as written
    blocks = _card_blocks(student / "README.md")
    model_id = re.search(r'AutoModelForSeq2SeqLM.from_pretrained\("([^"]+)"\)', blocks[0]).group(1)
    example = re.search(r'tokenizer\(\["([^"]+)"\]', blocks[0]).group(1)
    limit = int(re.search(r"max_new_tokens=(\d+)", blocks[0]).group(1))  # the length is set, within the positions
    assert limit == cap_max_new_tokens(AutoModelForSeq2SeqLM.from_pretrained(student), 256)
    card_call = tokenizer.batch_decode(reference_generate(str(student), [example], src, tgt, num_beams=5,
                                                         max_new_tokens=limit),
                                       skip_special_tokens=True)
    monkeypatch.chdir(tmp_path)
    printed = []
    for block in blocks:
        if 'pipeline("translation"' in block:  # Transformers 4.x only (Transformers 5 removed the task)
            continue
        # float32 instead of the card's int8: int8 rounding can change a tiny model's output
        code = block.replace(f'"{model_id}"', repr(str(student))).replace('quantization="int8"',
                                                                           'quantization="float32"')
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, "README.md", "exec"), {})
        printed.append(stdout.getvalue().strip())
    assert len(printed) == 3  # generate, hf_seqkd's pipeline, CTranslate2
    assert printed[0] == repr(card_call)
    assert printed[1] == printed[2] == card_call[0].strip()


def test_pipeline_takes_languages_and_applies_prefixes(family_snapshots):
    nllb = family_snapshots("nllb")
    tokenizer = AutoTokenizer.from_pretrained(nllb)
    translator = translation_pipeline(nllb, src_lang="deu_Latn", tgt_lang="eng_Latn")
    got = [r["translation_text"].strip() for r in translator(SOURCES["de"][:3])]
    assert got == texts(tokenizer, expected(nllb, "nllb", "de", "en", sources=SOURCES["de"][:3],
                                            max_new_tokens=None))
    t5 = family_snapshots("t5")
    tokenizer = AutoTokenizer.from_pretrained(t5)
    translator = translation_pipeline(t5, src_lang="en", tgt_lang="de")  # the prefix from the config
    got = [r["translation_text"].strip() for r in translator(SOURCES["en"][:3], max_new_tokens=MAX_NEW_TOKENS)]
    assert got == texts(tokenizer, expected(t5, "t5", "en", "de", sources=SOURCES["en"][:3]))
    with pytest.raises(ValueError, match="tgt_lang"):
        translation_pipeline(nllb)


@pytest.mark.slow
def test_prune_and_evaluate_recipes_follow_the_languages(family_snapshots, ctranslate2_dirs, tmp_path):
    """recipes/evaluate.py (Transformers and CTranslate2) and recipes/prune.py on NLLB, German->English, with only
    the data's language names: with the card's greedy output as references every evaluation scores BLEU 100, and the
    pruned student is saved with its languages."""
    from test_recipes import load_recipe

    folder = family_snapshots("nllb")
    data = _write_data(tmp_path / "data", "de", "en", {"train": 8, "test": 6})
    test_sources = open(os.path.join(data, "test.de"), encoding="utf-8").read().splitlines()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    greedy = texts(tokenizer, expected(folder, "nllb", "de", "en", sources=test_sources, num_beams=1))
    with open(os.path.join(data, "test.en"), "w", encoding="utf-8") as f:
        f.write("\n".join(greedy) + "\n")
    common = ["--dataset", data, "--source_lang", "de", "--target_lang", "en", "--max_new_tokens",
              str(MAX_NEW_TOKENS)]
    rows = load_recipe("evaluate").main([
        "--models", f"nllb={folder}", ctranslate2_dirs("nllb"), "--tokenizer", folder, "--num_beams", "1",
        "--batch1_samples", "0", "--threads", "1", "--device", "cpu", "--output_dir", str(tmp_path / "eval"),
        *common])
    assert [(r["kind"], r["bleu_greedy"]) for r in rows] == [("transformers", pytest.approx(100.0)),
                                                             ("ctranslate2", pytest.approx(100.0))]
    rows = load_recipe("prune").main([
        "--model_name_or_path", folder, "--alpha", "0", "--sparsities", "0.3", "--max_steps", "1",
        "--per_device_train_batch_size",
        "4", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm",
        "True", "--eval_num_beams", "1", "--output_dir", str(tmp_path / "pruned"), *common])
    assert rows[0]["sparsity"] == 0.0 and rows[0]["bleu_greedy"] == pytest.approx(100.0)
    pruned = tmp_path / "pruned" / "sparsity-30"
    saved = json.loads((pruned / "tokenizer_config.json").read_text())
    assert (saved["src_lang"], saved["tgt_lang"]) == ("deu_Latn", "eng_Latn")
    assert AutoModelForSeq2SeqLM.from_pretrained(pruned).generation_config.forced_bos_token_id == \
        tokenizer.convert_tokens_to_ids("eng_Latn")
    assert 'tgt_lang="eng_Latn"' in (pruned / "README.md").read_text()


def test_card_lists_only_what_the_method_used(tmp_path):
    word_kd = DistillationTrainingArguments(output_dir=str(tmp_path), alpha=0.5, src_lang="deu_Latn",
                                            tgt_lang="eng_Latn", report_to=[]).card_hyperparameters()
    assert {"alpha", "temperature", "src_lang", "tgt_lang"} <= set(word_kd)
    assert not {"num_beams", "num_return_sequences", "max_new_tokens", "source_prefix"} & set(word_kd)
    seqkd = DistillationTrainingArguments(output_dir=str(tmp_path), kd_target="teacher_target", num_beams=4, alpha=0.0,
                                          source_prefix="translate English to German: ",
                                          report_to=[]).card_hyperparameters()
    assert seqkd["num_beams"] == 4 and seqkd["source_prefix"] == "translate English to German: "
    assert "alpha" not in seqkd and "src_lang" not in seqkd


@pytest.mark.parametrize("name", list(SPECS))
def test_make_student_save_and_reload_every_family(family_snapshots, tmp_path, name):
    """A student copied from each family's teacher keeps its generation config and tokenizer through
    save_student and from_pretrained, and decodes the same after reloading."""
    from hf_seqkd.hub import save_student

    folder = family_snapshots(name)
    src, tgt = ("en", "de") if name == "t5" else ("de", "en")
    tokenizer = card_tokenizer(folder, name, src, tgt)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(folder)
    student = make_student(teacher, encoder_layers=1, decoder_layers=1)
    assert student.generation_config.to_diff_dict() == teacher.generation_config.to_diff_dict()
    save_student(student, tokenizer, tmp_path / "student")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "student")
    again = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert reloaded.generation_config.to_diff_dict() == teacher.generation_config.to_diff_dict()
    assert getattr(again, "tgt_lang", None) == codes(name, src, tgt).get("tgt_lang")
    prefix = SPECS[name].prefix.get((src, tgt), "")
    before, _ = translate(student, tokenizer, SOURCES[src], max_new_tokens=8, source_prefix=prefix)
    after, _ = translate(reloaded, again, SOURCES[src], max_new_tokens=8, source_prefix=prefix)
    assert before == after


@pytest.mark.parametrize("name,src,tgt", CASES, ids=IDS)
def test_teacher_scores_equal_transformers_sequences_scores(family_snapshots, name, src, tgt):
    """The K-best scores read from the recorder equal the scores generate returns with output_scores=True (the
    length-normalised log-probability, length_penalty 1), for each family's processors (forced tokens,
    renormalize_logits, no_repeat_ngram_size, bad words)."""
    from hf_seqkd.generation import generate_kbest

    folder = family_snapshots(name)
    tokenizer = card_tokenizer(folder, name, src, tgt)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    texts_in = [SPECS[name].prefix.get((src, tgt), "") + s for s in SOURCES[src]]
    nbest, scores = generate_kbest(model, tokenizer, texts_in, GenerationSettings(
        num_beams=4, num_return_sequences=3, max_new_tokens=MAX_NEW_TOKENS))
    batch = tokenizer(texts_in, return_tensors="pt", padding=True)
    bos = {"forced_bos_token_id": tokenizer.convert_tokens_to_ids(SPECS[name].lang_token[tgt])} \
        if SPECS[name].needs_forced_bos else {}
    out = model.generate(**batch, num_beams=4, num_return_sequences=3, max_new_tokens=MAX_NEW_TOKENS,
                         length_penalty=1.0, output_scores=True, return_dict_in_generate=True, **bos)
    assert [t for row in nbest for t in row] == tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
    torch.testing.assert_close(torch.tensor(scores).flatten(), out.sequences_scores, atol=1e-5, rtol=0)
