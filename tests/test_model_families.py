"""The offline Hub replicas of tests/model_families.py load, follow their family's conventions, and translate the way
their model cards say."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import transformers
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from model_families import (
    ENGLISH_EXAMPLES,
    FAMILIES,
    GERMAN_EXAMPLES,
    SPECS,
    corpus,
    family_of,
    reference_generate,
)

pytestmark = [pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses"),
              pytest.mark.usefixtures("torch_one_thread")]  # tests/conftest.py

MODEL_CLASS = {"marian": "MarianMTModel", "t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration",
               "mbart50": "MBartForConditionalGeneration", "m2m100": "M2M100ForConditionalGeneration",
               "nllb": "M2M100ForConditionalGeneration"}
TOKENIZER_FILES = {"marian": {"source.spm", "target.spm", "vocab.json"}, "t5": {"spiece.model", "tokenizer.json"},
                   "bart": {"vocab.json", "merges.txt", "tokenizer.json"},
                   "mbart50": {"sentencepiece.bpe.model", "tokenizer.json"},
                   "m2m100": {"vocab.json", "sentencepiece.bpe.model", "special_tokens_map.json"},
                   "nllb": {"sentencepiece.bpe.model", "tokenizer.json"}}
DECODER_START = {"marian": "pad", "t5": "pad", "bart": "eos", "mbart50": "eos", "m2m100": "eos", "nllb": "eos"}




def _load(folder, name):
    spec = SPECS[name]
    if spec.src_lang_via == "from_pretrained":
        tokenizer = AutoTokenizer.from_pretrained(folder, src_lang=spec.src_lang["de"])
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if spec.src_lang_via == "attribute":
        tokenizer.src_lang = spec.src_lang["de"]
    return tokenizer


def test_corpus_is_deterministic():
    pairs = corpus()
    assert pairs == corpus() and len(pairs) > 400 and len(set(pairs)) == len(pairs)
    assert all(de.strip() and en.strip() for de, en in pairs)


def test_snapshots_are_cached(family_snapshots):
    assert family_snapshots("bart") == family_snapshots("bart")


@pytest.mark.parametrize("name", FAMILIES)
def test_snapshot_loads_and_ids_are_consistent(family_snapshots, name):
    folder = family_snapshots(name)
    files = {p.name for p in Path(folder).iterdir()}
    assert TOKENIZER_FILES[name] | {"config.json", "generation_config.json", "tokenizer_config.json"} <= files
    assert family_of(folder) == name

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert isinstance(tokenizer, getattr(transformers, SPECS[name].tokenizer_class))
    assert type(model).__name__ == MODEL_CLASS[name]

    config, generation = model.config, model.generation_config
    assert tokenizer.pad_token_id == config.pad_token_id == generation.pad_token_id
    assert tokenizer.eos_token_id == config.eos_token_id == generation.eos_token_id
    start = tokenizer.pad_token_id if DECODER_START[name] == "pad" else tokenizer.eos_token_id
    assert config.decoder_start_token_id == generation.decoder_start_token_id == start
    if name in ("bart", "mbart50", "m2m100", "nllb"):  # fairseq dictionary (MBart50Tokenizer has no bos_token)
        assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
        assert config.bos_token_id == 0

    # Embedding rows vs tokenizer, as on the Hub: t5 rounds up to 128 (32128 vs 32100), m2m100 has 8 madeup words
    # (128112 vs 128104), nllb 2 spare rows (256206 vs 256204); the others match exactly.
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == config.vocab_size == model.get_output_embeddings().weight.shape[0]
    expected_rows = {"t5": -(-len(tokenizer) // 128) * 128, "m2m100": len(tokenizer) + 8, "nllb": len(tokenizer) + 2}
    assert rows == expected_rows.get(name, len(tokenizer))
    assert max(tokenizer.get_vocab().values()) == len(tokenizer) - 1


@pytest.mark.parametrize("name", FAMILIES)
def test_vocabulary_layout(family_snapshots, name):
    folder = Path(family_snapshots(name))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    vocab = tokenizer.get_vocab()
    if name == "marian":
        on_disk = json.loads((folder / "vocab.json").read_text())
        assert on_disk["</s>"] == 0 and on_disk["<unk>"] == 1 and on_disk["<pad>"] == len(on_disk) - 1
        assert tokenizer.pad_token_id == len(tokenizer) - 1 == config["decoder_start_token_id"]
        assert generation["bad_words_ids"] == [[tokenizer.pad_token_id]] and generation["max_length"] == 512
        assert config["scale_embedding"] and config["share_encoder_decoder_embeddings"]
        assert config["static_position_embeddings"]
    elif name == "t5":
        params = config["task_specific_params"]
        assert set(params) == {"summarization", "translation_en_to_de", "translation_en_to_fr", "translation_en_to_ro"}
        assert params["translation_en_to_de"]["prefix"] == SPECS["t5"].prefix[("en", "de")]
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
        assert tokenizer.bos_token is None
        assert vocab["<extra_id_0>"] == len(tokenizer) - 1 and vocab["<extra_id_99>"] == len(tokenizer) - 100
    elif name == "bart":
        assert tokenizer.mask_token_id == len(tokenizer) - 1
        assert json.loads((folder / "vocab.json").read_text()) == vocab
        assert {k: generation[k] for k in ("num_beams", "no_repeat_ngram_size", "forced_bos_token_id",
                                           "forced_eos_token_id", "early_stopping")} == {
            "num_beams": 4, "no_repeat_ngram_size": 3, "forced_bos_token_id": 0, "forced_eos_token_id": 2,
            "early_stopping": True}
    elif name == "mbart50":
        from transformers.models.mbart50.tokenization_mbart50 import FAIRSEQ_LANGUAGE_CODES

        first = vocab["ar_AR"]
        assert len(FAIRSEQ_LANGUAGE_CODES) == 52
        assert [vocab[code] for code in FAIRSEQ_LANGUAGE_CODES] == list(range(first, first + 52))
        assert tokenizer.lang_code_to_id["de_DE"] == vocab["de_DE"] and tokenizer.mask_token_id == first + 52
        assert tokenizer.mask_token_id == len(tokenizer) - 1 and tokenizer.tgt_lang is None
    elif name == "m2m100":
        on_disk = json.loads((folder / "vocab.json").read_text())
        codes = list(tokenizer.lang_code_to_id)
        assert len(codes) == 100 and codes[:2] == ["af", "am"]
        assert [tokenizer.get_lang_id(code) for code in codes] == list(range(len(on_disk), len(on_disk) + 100))
        assert tokenizer.convert_tokens_to_ids("__de__") == tokenizer.get_lang_id("de")
        assert "__en__" in tokenizer.all_special_tokens
        assert tokenizer.tgt_lang is None  # the Hub tokenizer has no target language until one sets it
        assert config["vocab_size"] == len(on_disk) + 100 + 8
    else:  # nllb
        from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

        assert len(FAIRSEQ_LANGUAGE_CODES) == 202
        first = vocab[FAIRSEQ_LANGUAGE_CODES[0]]
        assert [vocab[code] for code in FAIRSEQ_LANGUAGE_CODES] == list(range(first, first + 202))
        assert tokenizer.mask_token_id == first + 202 == len(tokenizer) - 1
        assert tokenizer.legacy_behaviour is False and tokenizer.tgt_lang is None
        assert config["tokenizer_class"] == "NllbTokenizer"


@pytest.mark.parametrize("name,model_file,offset", [("t5", "spiece.model", 0),
                                                    ("mbart50", "sentencepiece.bpe.model", 1),
                                                    ("nllb", "sentencepiece.bpe.model", 1)])
def test_tokenizer_json_agrees_with_sentencepiece(family_snapshots, name, model_file, offset):
    """tokenizer.json (what Transformers 5 loads) segments like the SentencePiece file, with the fairseq offset."""
    folder = Path(family_snapshots(name))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = spm.SentencePieceProcessor(model_file=str(folder / model_file))
    for text in GERMAN_EXAMPLES + ENGLISH_EXAMPLES + [de for de, _ in corpus()[-8:]]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [i + offset for i in processor.encode(text)]


@pytest.mark.parametrize("name", FAMILIES)
def test_german_source_encoding(family_snapshots, name):
    spec = SPECS[name]
    tokenizer = _load(family_snapshots(name), name)
    text = GERMAN_EXAMPLES[0]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert tokens[-1] == tokenizer.eos_token
    if spec.lang_token:  # mBART-50: de_DE X </s>; M2M100: __de__ X </s>; NLLB (non-legacy): deu_Latn X </s>
        assert tokens[0] == spec.lang_token["de"] and spec.lang_token["de"] not in tokens[1:]
    elif name == "bart":
        assert tokens[0] == tokenizer.bos_token
    else:  # marian, t5: X </s>
        assert tokens[0] not in tokenizer.all_special_tokens
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize("name", FAMILIES)
def test_reference_generate(family_snapshots, name):
    folder = family_snapshots(name)
    spec = SPECS[name]
    source, target = ("en", "de") if name == "t5" else ("de", "en")
    sources = ENGLISH_EXAMPLES if source == "en" else GERMAN_EXAMPLES
    rows = reference_generate(folder, sources, source, target, max_new_tokens=4)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(rows) == len(sources)
    for row in rows:
        assert row[0] == model.generation_config.decoder_start_token_id and 2 <= len(row) <= 5
        assert max(row) < model.config.vocab_size
        if spec.needs_forced_bos:
            assert row[1] == tokenizer.convert_tokens_to_ids(spec.lang_token[target])
        elif name == "bart":
            assert row[1] == tokenizer.bos_token_id  # bart-base's generation config forces <s> first
        elif name == "marian":
            assert tokenizer.pad_token_id not in row[1:]  # bad_words_ids=[[pad]]
