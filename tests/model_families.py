"""Offline replicas of six Hub translation-model families, for tests.

``build_family(name, folder)`` writes a folder that looks like a Hub snapshot of the family's usual checkpoint
(config.json, generation_config.json, model.safetensors, the tokenizer files the Hub repository has, plus what
``tokenizer.save_pretrained`` writes in Transformers 5), loadable with ``AutoTokenizer.from_pretrained(folder)`` and
``AutoModelForSeq2SeqLM.from_pretrained(folder)``. Everything is made in the test: the SentencePiece / byte-level BPE
models are trained on a small built-in German/English corpus, the model is a tiny random one (d_model 32, 2+2
layers, 4 heads, ffn 64), and nothing is downloaded.

=========  ==========================================  ===============================================================
family     replica of                                  tokenizer files (special ids)
=========  ==========================================  ===============================================================
marian     Helsinki-NLP/opus-mt-de-en                  source.spm, target.spm, vocab.json
                                                       (</s>=0, <unk>=1, <pad>=last=decoder start)
t5         google-t5/t5-small                          spiece.model (+ tokenizer.json), 100 <extra_id_*>
                                                       (<pad>=0=decoder start, </s>=1, <unk>=2)
bart       facebook/bart-base                          vocab.json, merges.txt (+ tokenizer.json)
                                                       (<s>=0, <pad>=1, </s>=2=decoder start, <unk>=3, <mask>=last)
mbart50    facebook/mbart-large-50-many-to-many-mmt    sentencepiece.bpe.model (unigram) (+ tokenizer.json); fairseq
                                                       ids (<s>=0, <pad>=1, </s>=2=decoder start, <unk>=3, spm id+1),
                                                       then the 52 mBART-50 codes (ar_AR ... sl_SI), then <mask>
m2m100     facebook/m2m100_418M                        vocab.json (fairseq dictionary, frequency order) +
                                                       sentencepiece.bpe.model; then 100 codes __af__ ... __zu__;
                                                       config vocab = len(vocab.json) + 100 + 8 "madeup words"
nllb       facebook/nllb-200-distilled-600M            sentencepiece.bpe.model (BPE) + tokenizer.json; fairseq ids,
                                                       then the 202 FLORES codes (ace_Arab ... zul_Latn), then
                                                       <mask>; config vocab = len(tokenizer) + 2
=========  ==========================================  ===============================================================

As on the Hub, the embedding matrix is larger than the tokenizer for t5 (rounded up to a multiple of 128, like
32128 vs 32100), m2m100 (+8 madeup words, 128112 vs 128104) and nllb (+2, 256206 vs 256204); it matches for
marian, bart and mbart50.

Transformers 5 runs the t5, bart, mbart50 and nllb tokenizers on the ``tokenizers`` library; loading those from a
bare SentencePiece file needs protobuf (often absent), so their snapshots carry tokenizer.json, built here the way
Transformers' own SentencePiece conversion does (``read_sentencepiece`` parses the model without protobuf), and the
tests check it segments like the SentencePiece file. marian and m2m100 stay sentencepiece-python tokenizers.

``SPECS[name]`` records how the family's model card says to translate (language codes, T5 prefixes, forced BOS),
and ``reference_generate`` performs exactly that call. ``family_snapshots`` is a session-scoped pytest fixture
(``from model_families import family_snapshots`` in a test module, or in a conftest) returning ``name -> folder``.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

FAMILIES = ("marian", "t5", "bart", "mbart50", "m2m100", "nllb")

HUB_IDS = {
    "marian": "Helsinki-NLP/opus-mt-de-en",
    "t5": "google-t5/t5-small",
    "bart": "facebook/bart-base",
    "mbart50": "facebook/mbart-large-50-many-to-many-mmt",
    "m2m100": "facebook/m2m100_418M",
    "nllb": "facebook/nllb-200-distilled-600M",
}

# Tiny model shape shared by all families.
D_MODEL, LAYERS, HEADS, FFN = 32, 2, 4, 64
SEED = 0
TRAIN_STEPS = {"marian": 300, "bart": 300, "t5": 800}  # teacher-forcing steps (see _train); others 400


@dataclass(frozen=True)
class FamilySpec:
    """How a family's Hub model card says to call it for German<->English.

    ``src_lang``: language codes as the tokenizer takes them (``tokenizer.src_lang = ...`` /
    ``from_pretrained(..., src_lang=...)``), ``None`` for families without codes. ``lang_token``: the vocabulary
    token of each code (differs from ``src_lang`` only for m2m100: "de" -> "__de__"). ``needs_forced_bos``: the card
    passes ``forced_bos_token_id=<target code id>`` to ``generate``. ``prefix``: T5 task prefixes per
    (source, target). ``src_lang_via``: "attribute" (``tokenizer.src_lang = code``), "from_pretrained"
    (``AutoTokenizer.from_pretrained(folder, src_lang=code)``) or None.
    """

    name: str
    hub_id: str
    tokenizer_class: str
    src_lang: dict | None = None
    lang_token: dict | None = None
    needs_forced_bos: bool = False
    prefix: dict = field(default_factory=dict)
    src_lang_via: str | None = None


SPECS: dict[str, FamilySpec] = {
    "marian": FamilySpec("marian", HUB_IDS["marian"], "MarianTokenizer"),
    # t5-small's config only has translation_en_to_{de,fr,ro}; the ("de", "en") prefix is a replica convenience that
    # the real checkpoint was not trained with (it is NOT in the replica's config.task_specific_params either).
    "t5": FamilySpec("t5", HUB_IDS["t5"], "T5Tokenizer",
                     prefix={("en", "de"): "translate English to German: ",
                             ("de", "en"): "translate German to English: "}),
    "bart": FamilySpec("bart", HUB_IDS["bart"], "BartTokenizer"),  # = RobertaTokenizer in Transformers 5
    "mbart50": FamilySpec("mbart50", HUB_IDS["mbart50"], "MBart50Tokenizer",
                          src_lang={"de": "de_DE", "en": "en_XX"}, lang_token={"de": "de_DE", "en": "en_XX"},
                          needs_forced_bos=True, src_lang_via="attribute"),
    "m2m100": FamilySpec("m2m100", HUB_IDS["m2m100"], "M2M100Tokenizer",
                         src_lang={"de": "de", "en": "en"}, lang_token={"de": "__de__", "en": "__en__"},
                         needs_forced_bos=True, src_lang_via="attribute"),
    "nllb": FamilySpec("nllb", HUB_IDS["nllb"], "NllbTokenizer",
                       src_lang={"de": "deu_Latn", "en": "eng_Latn"}, lang_token={"de": "deu_Latn", "en": "eng_Latn"},
                       needs_forced_bos=True, src_lang_via="from_pretrained"),
}

# ----------------------------------------------------------------------------------------------------------------
# A small built-in German/English corpus (templated Multi30k-like captions plus some fixed sentences).
# ----------------------------------------------------------------------------------------------------------------

_SUBJECTS = [  # (German, English, plural)
    ("Der Mann", "The man", False), ("Die Frau", "The woman", False), ("Das Kind", "The child", False),
    ("Ein Junge", "A boy", False), ("Ein Mädchen", "A girl", False), ("Der Hund", "The dog", False),
    ("Ein älterer Herr", "An older gentleman", False), ("Die Lehrerin", "The teacher", False),
    ("Zwei Männer", "Two men", True), ("Drei Kinder", "Three children", True), ("Die Leute", "The people", True),
    ("Einige Frauen", "Some women", True),
]
_VERBS = [  # (German singular, German plural, English singular, English plural)
    ("liest", "lesen", "reads", "read"), ("sieht", "sehen", "sees", "see"), ("hält", "halten", "holds", "hold"),
    ("kauft", "kaufen", "buys", "buy"), ("trägt", "tragen", "carries", "carry"),
    ("sucht", "suchen", "is looking for", "are looking for"), ("findet", "finden", "finds", "find"),
    ("wirft", "werfen", "throws", "throw"), ("verkauft", "verkaufen", "sells", "sell"),
]
_OBJECTS = [
    ("einen Ball", "a ball"), ("ein Buch", "a book"), ("eine Tasche", "a bag"), ("einen Hut", "a hat"),
    ("eine Zeitung", "a newspaper"), ("ein Fahrrad", "a bicycle"), ("einen Apfel", "an apple"),
    ("eine Kamera", "a camera"), ("einen roten Ball", "a red ball"), ("ein kleines Boot", "a small boat"),
    ("eine blaue Jacke", "a blue jacket"), ("zwei Bücher", "two books"), ("frisches Brot", "fresh bread"),
]
_PLACES = [
    ("im Park", "in the park"), ("auf der Straße", "on the street"), ("am Strand", "at the beach"),
    ("vor dem Haus", "in front of the house"), ("in der Stadt", "in the city"), ("neben dem Auto", "next to the car"),
    ("auf dem Markt", "at the market"), ("im Schnee", "in the snow"), ("", ""),
]
_FIXED = [
    ("Das Wetter ist heute schön.", "The weather is nice today."),
    ("Ich heiße Anna und wohne in Berlin.", "My name is Anna and I live in Berlin."),
    ("Wie spät ist es?", "What time is it?"),
    ("Der Zug fährt um 8 Uhr ab.", "The train leaves at 8 o'clock."),
    ("Wir trinken Kaffee mit Milch.", "We drink coffee with milk."),
    ("Die Straße ist nass, weil es regnet.", "The street is wet because it is raining."),
    ("Er spielt Gitarre und sie singt.", "He plays the guitar and she sings."),
    ("Kannst du mir bitte helfen?", "Can you help me, please?"),
    ("Das Haus hat 3 Zimmer und einen großen Garten.", "The house has 3 rooms and a large garden."),
    ("Ein Mann in einem blauen Hemd steht auf einer Leiter.", "A man in a blue shirt is standing on a ladder."),
    ("Eine Gruppe von Menschen wartet an der Bushaltestelle.", "A group of people is waiting at the bus stop."),
    ("Ein schwarzer Hund rennt über eine grüne Wiese.", "A black dog is running across a green meadow."),
    ("Zwei Mädchen spielen Fußball auf dem Schulhof.", "Two girls are playing soccer in the schoolyard."),
    ("Ein Arbeiter repariert die Straße.", "A worker is repairing the road."),
    ("Die Sonne scheint und die Vögel singen.", "The sun is shining and the birds are singing."),
    ("Morgen fahren wir nach München.", "Tomorrow we are going to Munich."),
    ("Das Essen war sehr gut, danke!", "The food was very good, thank you!"),
    ("Sie liest jeden Abend ein Kapitel.", "She reads a chapter every evening."),
    ("Der Preis beträgt 12,50 Euro.", "The price is 12.50 euros."),
    ("Frau Müller öffnet die Tür.", "Mrs. Müller opens the door."),
    ("Die Kinder lachen über den Clown.", "The children are laughing at the clown."),
    ("Ein Radfahrer fährt durch den Wald.", "A cyclist rides through the forest."),
    ("Über den Fluss führt eine alte Brücke.", "An old bridge leads across the river."),
    ("Die Straße heißt „Goethestraße“.", 'The street is called "Goethestraße".'),
]


def corpus(n_templated: int = 400, seed: int = SEED) -> list[tuple[str, str]]:
    """Deterministic parallel (German, English) sentence pairs: ``n_templated`` templated ones plus fixed ones."""
    rng = random.Random(seed)
    combos = [(s, v, o, p) for s in _SUBJECTS for v in _VERBS for o in _OBJECTS for p in _PLACES]
    pairs = []
    for subject, verb, obj, place in rng.sample(combos, n_templated):
        (de_s, en_s, plural), (de_v, de_vp, en_v, en_vp), (de_o, en_o), (de_p, en_p) = subject, verb, obj, place
        de = " ".join(x for x in (de_s, de_vp if plural else de_v, de_o, de_p) if x) + "."
        en = " ".join(x for x in (en_s, en_vp if plural else en_v, en_o, en_p) if x) + "."
        pairs.append((de, en))
    return pairs + list(_FIXED)


GERMAN_EXAMPLES = ["Der Mann liest ein Buch im Park.", "Zwei Kinder spielen am Strand."]
ENGLISH_EXAMPLES = ["The man reads a book in the park.", "Two children are playing at the beach."]

# ----------------------------------------------------------------------------------------------------------------
# SentencePiece helpers (no protobuf needed: the model proto is read with a tiny wire-format parser).
# ----------------------------------------------------------------------------------------------------------------


def train_sentencepiece(lines, vocab_size: int, model_type: str = "unigram", **options) -> bytes:
    """Train a SentencePiece model in memory (one thread, quiet) and return the serialized model."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)), model_writer=buffer, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2, **options)
    return buffer.getvalue()


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def read_sentencepiece(model: bytes) -> tuple[list[tuple[str, float, int]], bytes | None]:
    """``(pieces, precompiled_charsmap)`` of a serialized SentencePiece ModelProto; a piece is (piece, score, type)
    with type 1 normal, 2 unknown, 3 control, 4 user defined (``sentencepiece_model.proto``)."""
    pieces, charsmap = [], None
    for number, value in _proto_fields(model):
        if number == 1:  # repeated SentencePiece pieces
            piece, score, kind = "", 0.0, 1
            for sub, sub_value in _proto_fields(value):
                if sub == 1:
                    piece = sub_value.decode("utf-8")
                elif sub == 2:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub == 3:
                    kind = sub_value
            pieces.append((piece, score, kind))
        elif number == 3:  # NormalizerSpec
            for sub, sub_value in _proto_fields(value):
                if sub == 2:
                    charsmap = bytes(sub_value) or None
    return pieces, charsmap


def _extract_like_transformers(model: bytes, bpe: bool) -> dict:
    """The kwargs ``SentencePieceExtractor.extract`` gives a TokenizersBackend class (Transformers 5) when it loads a
    tokenizer from a bare ``*.model`` file: vocab (+ merges for BPE), the control/user-defined pieces as
    ``additional_special_tokens`` and the precompiled normalizer charsmap. Done here without protobuf."""
    from transformers import AddedToken
    from transformers.tokenization_utils_base import generate_merges

    pieces, charsmap = read_sentencepiece(model)
    kwargs: dict = {}
    if bpe:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        kwargs["vocab"], kwargs["merges"] = vocab, generate_merges(vocab)
    else:
        kwargs["vocab"] = [(piece, score) for piece, score, _ in pieces]
    kwargs["additional_special_tokens"] = [
        AddedToken(piece, normalized=False, special=kind == 3) for piece, _, kind in pieces if kind in (3, 4)]
    kwargs["_spm_precompiled_charsmap"] = charsmap
    return kwargs


def _piece_counts(spm_model: bytes, lines) -> Counter:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    counts = Counter()
    for line in lines:
        counts.update(processor.encode(line, out_type=str))
    return counts


def _frequency_ordered(pieces: list[str], counts: Counter) -> list[str]:
    """Pieces ordered like a fairseq/Marian dictionary: by corpus frequency, ties in first-seen order."""
    first = {}
    for piece in pieces:
        first.setdefault(piece, len(first))
    return sorted(first, key=lambda p: (-counts[p], first[p]))


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------------------------------
# The six families.
# ----------------------------------------------------------------------------------------------------------------


def _marian(folder: Path, de: list[str], en: list[str]):
    from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer

    # opus-mt-de-en: one SentencePiece (unigram) model per side, one joint vocabulary (Marian's vocab.yml as
    # vocab.json) in frequency order with </s>=0, <unk>=1 and <pad> appended LAST.
    source_spm, target_spm = train_sentencepiece(de, 200), train_sentencepiece(en, 200)
    (folder / "source.spm").write_bytes(source_spm)
    (folder / "target.spm").write_bytes(target_spm)
    counts = _piece_counts(source_spm, de) + _piece_counts(target_spm, en)
    pieces = [p for model in (source_spm, target_spm) for p, _, kind in read_sentencepiece(model)[0] if kind == 1]
    tokens = ["</s>", "<unk>"] + _frequency_ordered(pieces, counts) + ["<pad>"]
    _write_json(folder / "vocab.json", {token: i for i, token in enumerate(tokens)})
    tokenizer = MarianTokenizer(
        source_spm=str(folder / "source.spm"), target_spm=str(folder / "target.spm"), vocab=str(folder / "vocab.json"),
        source_lang="de", target_lang="en", model_max_length=512, separate_vocabs=False)
    pad = len(tokens) - 1
    config = MarianConfig(
        vocab_size=len(tokens), decoder_vocab_size=len(tokens), d_model=D_MODEL, encoder_layers=LAYERS,
        decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN, max_position_embeddings=512, activation_function="swish", dropout=0.1,
        attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True, share_encoder_decoder_embeddings=True,
        static_position_embeddings=True, normalize_embedding=False, add_bias_logits=False,
        pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, bos_token_id=0, forced_eos_token_id=0)
    generation = GenerationConfig(
        bad_words_ids=[[pad]], bos_token_id=0, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
        max_length=512, num_beams=4, pad_token_id=pad, renormalize_logits=True)
    return tokenizer, MarianMTModel, config, generation


T5_TASK_SPECIFIC_PARAMS = {  # exactly as in t5-small's config.json
    "summarization": {"early_stopping": True, "length_penalty": 2.0, "max_length": 200, "min_length": 30,
                      "no_repeat_ngram_size": 3, "num_beams": 4, "prefix": "summarize: "},
    "translation_en_to_de": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                             "prefix": "translate English to German: "},
    "translation_en_to_fr": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                             "prefix": "translate English to French: "},
    "translation_en_to_ro": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                             "prefix": "translate English to Romanian: "},
}


def _t5(folder: Path, de: list[str], en: list[str]):
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration, T5Tokenizer
    from transformers.convert_slow_tokenizer import T5Converter

    # t5-small's spiece.model: unigram, <pad>=0, </s>=1, <unk>=2, no <s>; the 100 sentinels come after it.
    prefixes = [p["prefix"] for p in T5_TASK_SPECIFIC_PARAMS.values()] + [SPECS["t5"].prefix[("de", "en")]]
    model = train_sentencepiece(en + de + prefixes, 300, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (folder / "spiece.model").write_bytes(model)
    kwargs = _extract_like_transformers(model, bpe=False)
    # t5-small's tokenizer_config lists the sentinels <extra_id_0> ... <extra_id_99> (not the control pieces)
    kwargs["additional_special_tokens"] = [f"<extra_id_{i}>" for i in range(100)]
    kwargs = T5Converter.convert_from_spm(**kwargs, extra_ids=100)
    tokenizer = T5Tokenizer(**kwargs, model_max_length=512, vocab_file=str(folder / "spiece.model"))
    config = T5Config(
        vocab_size=_round_up(len(tokenizer), 128), d_model=D_MODEL, d_kv=D_MODEL // HEADS, d_ff=FFN,
        num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=32,
        dropout_rate=0.1, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        n_positions=512, output_past=True, task_specific_params=T5_TASK_SPECIFIC_PARAMS)
    generation = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    return tokenizer, T5ForConditionalGeneration, config, generation


def _bart(folder: Path, de: list[str], en: list[str]):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer, GenerationConfig

    # bart-base: GPT-2 byte-level BPE, vocab.json + merges.txt, <s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask>=last.
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(en + de, vocab_size=500, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["<mask>"] = len(vocab)
    _write_json(folder / "vocab.json", vocab)
    merges = [tuple(line.split(" ")) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=D_MODEL, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_position_embeddings=1024, activation_function="gelu", scale_embedding=False,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    generation = GenerationConfig(
        bos_token_id=0, decoder_start_token_id=2, early_stopping=True, eos_token_id=2, forced_bos_token_id=0,
        forced_eos_token_id=2, no_repeat_ngram_size=3, num_beams=4, pad_token_id=1)
    return tokenizer, BartForConditionalGeneration, config, generation


def _mbart50(folder: Path, de: list[str], en: list[str]):
    from transformers import GenerationConfig, MBart50Tokenizer, MBartConfig, MBartForConditionalGeneration
    from transformers.convert_slow_tokenizer import MBart50Converter

    # sentencepiece.bpe.model (a unigram model despite its name, <unk>=0 <s>=1 </s>=2); fairseq ids = spm id + 1.
    model = train_sentencepiece(en + de, 250)
    (folder / "sentencepiece.bpe.model").write_bytes(model)
    kwargs = MBart50Converter.convert_from_spm(**_extract_like_transformers(model, bpe=False))
    kwargs.pop("additional_special_tokens")  # <s>/</s> (control pieces) are named tokens already; the codes are added
    tokenizer = MBart50Tokenizer(**kwargs, src_lang=None, tgt_lang=None, model_max_length=1024,
                                 vocab_file=str(folder / "sentencepiece.bpe.model"))
    config = MBartConfig(
        vocab_size=len(tokenizer), d_model=D_MODEL, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_position_embeddings=1024, activation_function="relu", scale_embedding=True, dropout=0.1,
        attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=2, tokenizer_class="MBart50Tokenizer")
    generation = GenerationConfig(
        bos_token_id=0, decoder_start_token_id=2, early_stopping=True, eos_token_id=2, forced_eos_token_id=2,
        max_length=200, num_beams=5, pad_token_id=1)
    return tokenizer, MBartForConditionalGeneration, config, generation


def _m2m100(folder: Path, de: list[str], en: list[str]):
    from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    # vocab.json is the fairseq dictionary (<s>=0 <pad>=1 </s>=2 <unk>=3, then pieces by frequency, so NOT in
    # SentencePiece id order); the 100 language tokens follow it, then 8 "madeup words" that exist only in the
    # embedding matrix (128104 tokens vs vocab_size 128112 on the Hub).
    model = train_sentencepiece(en + de, 250, model_type="bpe")
    (folder / "sentencepiece.bpe.model").write_bytes(model)
    pieces = [p for p, _, kind in read_sentencepiece(model)[0] if kind == 1]
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + _frequency_ordered(pieces, _piece_counts(model, en + de))
    _write_json(folder / "vocab.json", {token: i for i, token in enumerate(tokens)})
    tokenizer = M2M100Tokenizer(
        vocab_file=str(folder / "vocab.json"), spm_file=str(folder / "sentencepiece.bpe.model"), src_lang=None,
        tgt_lang=None, language_codes="m2m100", num_madeup_words=8, model_max_length=1024)
    config = M2M100Config(
        vocab_size=len(tokens) + len(tokenizer.lang_code_to_id) + 8, d_model=D_MODEL, encoder_layers=LAYERS,
        decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN, max_position_embeddings=1024, activation_function="relu", scale_embedding=True,
        dropout=0.1, attention_dropout=0.1, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    generation = GenerationConfig(
        bos_token_id=0, decoder_start_token_id=2, early_stopping=True, eos_token_id=2, max_length=200, num_beams=5,
        pad_token_id=1)
    return tokenizer, M2M100ForConditionalGeneration, config, generation


def _nllb(folder: Path, de: list[str], en: list[str]):
    from transformers import AddedToken, GenerationConfig, M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer
    from transformers.convert_slow_tokenizer import NllbConverter
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    # sentencepiece.bpe.model (BPE), fairseq ids (spm id + 1), then the 202 language codes, then <mask> (pinned via
    # added_tokens_decoder as in the Hub's tokenizer_config.json; Transformers 5 would otherwise add <mask> first).
    model = train_sentencepiece(en + de, 250, model_type="bpe")
    (folder / "sentencepiece.bpe.model").write_bytes(model)
    kwargs = NllbConverter.convert_from_spm(**_extract_like_transformers(model, bpe=True))
    kwargs.pop("additional_special_tokens")  # the Hub config lists the language codes instead of <s>/</s>
    base = len(kwargs["vocab"])
    codes = list(FAIRSEQ_LANGUAGE_CODES)
    added = {base + i: AddedToken(code, special=True, normalized=False) for i, code in enumerate(codes)}
    added[base + len(codes)] = AddedToken("<mask>", special=True, normalized=True, lstrip=True)
    tokenizer = NllbTokenizer(**kwargs, added_tokens_decoder=added, additional_special_tokens=codes, src_lang=None,
                              tgt_lang=None, legacy_behaviour=False, model_max_length=1024,
                              vocab_file=str(folder / "sentencepiece.bpe.model"))
    config = M2M100Config(
        vocab_size=len(tokenizer) + 2, d_model=D_MODEL, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_position_embeddings=1024, activation_function="relu", scale_embedding=True, dropout=0.1,
        attention_dropout=0.1, encoder_layerdrop=0.0, decoder_layerdrop=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, tokenizer_class="NllbTokenizer")
    generation = GenerationConfig(bos_token_id=0, decoder_start_token_id=2, eos_token_id=2, max_length=200,
                                  pad_token_id=1)
    return tokenizer, M2M100ForConditionalGeneration, config, generation


def _hub_tokenizer_config(name: str, folder: Path, tokenizer) -> None:
    """Make the saved tokenizer config look like the Hub repository's where that changes how it loads."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if name in ("mbart50", "m2m100", "nllb"):
        # save_pretrained writes the default source language ("en_XX", "en", "eng_Latn"); the Hub repos have
        # none (the class then falls back to that same default) and no target language.
        config.update(src_lang=None, tgt_lang=None)
    if name == "m2m100":
        # m2m100_418M's files predate `added_tokens_decoder`: tokenizer_config.json has none, and the language
        # tokens are listed in special_tokens_map.json. Loaded that way they are special tokens (skipped by
        # decode(skip_special_tokens=True)); Transformers 5.24's M2M100Tokenizer.__init__ alone never registers them.
        config = {key: config[key] for key in ("bos_token", "eos_token", "sep_token", "unk_token", "pad_token",
                                               "src_lang", "tgt_lang", "language_codes", "num_madeup_words",
                                               "sp_model_kwargs", "model_max_length", "tokenizer_class")}
        special = {key: config[key] for key in ("bos_token", "eos_token", "sep_token", "unk_token", "pad_token")}
        special["additional_special_tokens"] = list(tokenizer.lang_token_to_id)
        _write_json(folder / "special_tokens_map.json", special)
    _write_json(path, config)


_BUILDERS = {"marian": _marian, "t5": _t5, "bart": _bart, "mbart50": _mbart50, "m2m100": _m2m100, "nllb": _nllb}


def build_family(name: str, folder: str | os.PathLike, seed: int = SEED) -> str:
    """Write a Hub-like snapshot of family ``name`` (tokenizer files, config, generation config, random tiny
    weights) into ``folder`` (created if needed) and return it as a string."""
    import torch

    if name not in _BUILDERS:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = corpus(seed=seed)
    de, en = [d for d, _ in pairs], [e for _, e in pairs]
    with warnings.catch_warnings():  # MarianTokenizer: "Recommended: pip install sacremoses."
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        tokenizer, model_class, config, generation = _BUILDERS[name](folder, de, en)
    tokenizer.save_pretrained(str(folder))
    _hub_tokenizer_config(name, folder, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        _train(name, model, tokenizer, pairs, TRAIN_STEPS.get(name, 400))
    model.generation_config = generation
    model.save_pretrained(str(folder))
    return str(folder)


def _directions(name: str) -> list[tuple[str, str]]:
    """The directions a replica is trained on: opus-mt-de-en and bart (fine-tuned) one; the others both, plus
    copying (de->de, en->en: for T5 without a prefix, for the many-to-many models with the source's own code), so
    that, as with the real checkpoints, only the target code or the prefix says which language to produce."""
    if name in ("marian", "bart"):
        return [("de", "en")]
    return [("de", "en"), ("en", "de"), ("de", "de"), ("en", "en")]


def _train(name: str, model, tokenizer, pairs, steps: int, batch_size: int = 16) -> None:
    """A few hundred steps of teacher forcing on the built-in corpus, in each direction the family's card calls
    (language codes, T5 prefixes), so that the replica's output depends on its source and on the requested
    target language as a real checkpoint's does (random weights give near-uniform, input-independent output).
    The tokenizer is saved already; the languages set on it here are not."""
    import torch

    spec = SPECS[name]
    batches = []
    for source, target in _directions(name):
        if spec.src_lang:
            tokenizer.src_lang, tokenizer.tgt_lang = spec.src_lang[source], spec.src_lang[target]
        prefix = spec.prefix.get((source, target), "")
        side = {"de": 0, "en": 1}
        texts = [prefix + pair[side[source]] for pair in pairs]
        targets = [pair[side[target]] for pair in pairs]
        encoded = tokenizer(texts, text_target=targets, padding=True, return_tensors="pt")
        labels = encoded["labels"].masked_fill(encoded["labels"] == tokenizer.pad_token_id, -100)
        batches.append((encoded["input_ids"], encoded["attention_mask"], labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        input_ids, attention_mask, labels = batches[step % len(batches)]
        rows = torch.randint(len(input_ids), (batch_size,), generator=generator)
        loss = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# ----------------------------------------------------------------------------------------------------------------
# The model-card call.
# ----------------------------------------------------------------------------------------------------------------

_CLASS_TO_FAMILY = {"MarianTokenizer": "marian", "T5Tokenizer": "t5", "T5TokenizerFast": "t5", "BartTokenizer": "bart",
                    "BartTokenizerFast": "bart", "RobertaTokenizer": "bart", "MBart50Tokenizer": "mbart50",
                    "MBart50TokenizerFast": "mbart50", "M2M100Tokenizer": "m2m100", "NllbTokenizer": "nllb",
                    "NllbTokenizerFast": "nllb"}


def family_of(folder: str | os.PathLike) -> str:
    """The family of a snapshot folder, from the ``tokenizer_class`` in its tokenizer_config.json."""
    config = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
    return _CLASS_TO_FAMILY[config["tokenizer_class"]]


def reference_generate(folder, sources, source_lang: str, target_lang: str, *, family: str | None = None,
                       **generate_kwargs) -> list[list[int]]:
    """Translate ``sources`` the way the family's Hub model card does and return the generated token ids.

    * marian / bart: ``tok(sources, return_tensors="pt", padding=True)``; ``model.generate(**batch)`` (the
      languages are ignored: an opus-mt checkpoint has one fixed direction; bart-base is not a translation model).
    * t5: the task prefix (``SPECS["t5"].prefix[(source, target)]``) is prepended to every source.
    * mbart50: ``tok.src_lang = "de_DE"``; ``generate(..., forced_bos_token_id=tok.lang_code_to_id["en_XX"])``.
    * m2m100: ``tok.src_lang = "de"``; ``generate(..., forced_bos_token_id=tok.get_lang_id("en"))``.
    * nllb: ``AutoTokenizer.from_pretrained(folder, src_lang="deu_Latn")``;
      ``generate(..., forced_bos_token_id=tok.convert_tokens_to_ids("eng_Latn"))``.

    ``generate_kwargs`` are added to (and override) the card's arguments. Each row is the generated sequence,
    decoder start token included, cut after its first EOS (so without the batch's padding).
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = str(folder)
    name = family or family_of(folder)
    spec = SPECS[name]
    sources = [sources] if isinstance(sources, str) else list(sources)
    kwargs: dict = {}
    if spec.src_lang_via == "from_pretrained":
        tokenizer = AutoTokenizer.from_pretrained(folder, src_lang=spec.src_lang[source_lang])
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if spec.src_lang_via == "attribute":
        tokenizer.src_lang = spec.src_lang[source_lang]
    if spec.prefix:
        if (source_lang, target_lang) not in spec.prefix:
            raise ValueError(f"{name}: no task prefix for {source_lang}->{target_lang}")
        sources = [spec.prefix[(source_lang, target_lang)] + text for text in sources]
    if name == "mbart50":
        kwargs["forced_bos_token_id"] = tokenizer.lang_code_to_id[spec.src_lang[target_lang]]
    elif name == "m2m100":
        kwargs["forced_bos_token_id"] = tokenizer.get_lang_id(spec.src_lang[target_lang])
    elif name == "nllb":
        kwargs["forced_bos_token_id"] = tokenizer.convert_tokens_to_ids(spec.src_lang[target_lang])
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    batch = tokenizer(sources, return_tensors="pt", padding=True)
    output = model.generate(**batch, **{**kwargs, **generate_kwargs})
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    rows = []
    for row in output.tolist():  # cut each row after its first EOS (what follows is the batch's padding)
        end = next((i for i, token in enumerate(row) if i > 0 and token in eos), len(row) - 1)
        rows.append(row[:end + 1])
    return rows


# ----------------------------------------------------------------------------------------------------------------
# pytest fixture.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def family_snapshots(tmp_path_factory):
    """``get(name) -> folder``: builds each family's snapshot once per test session, on first use."""
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(f"hub-{name}"))
        return built[name]

    return get
