"""Students: smaller models made from a teacher, from-config models, and tokenizers for from-scratch setups.

* :func:`make_student` shrinks a teacher by copying a subset of its layers ("shrink and fine-tune",
  Shleifer & Rush 2020, Sec. 3): embeddings and every non-layer weight are copied, and the chosen layers
  spread over the teacher with the first and the last kept.
* :func:`make_student_from_config` builds a randomly initialised, smaller model of the teacher's family that
  shares its vocabulary (and so its tokenizer).
* :func:`train_tokenizer` trains a shared source/target vocabulary with the ``tokenizers`` library.
* :func:`tiny_seq2seq_model` builds a small Marian, BART or T5 model for a tokenizer from
  :func:`train_tokenizer` (tests, the offline demo, from-scratch teachers).
"""

from __future__ import annotations

import copy
import re
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForSeq2SeqLM, PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "layers_to_copy",
    "make_student",
    "make_student_from_config",
    "train_tokenizer",
    "tiny_seq2seq_model",
    "count_parameters",
    "freeze_unsaved_parameters",
]

# Shleifer & Rush 2020 (Table 10 / their LAYERS_TO_COPY): which teacher layers a k-layer student copies.
_SHLEIFER_RUSH_LAYER_MAPS = {
    12: {1: [0], 2: [0, 11], 3: [0, 6, 11], 4: [0, 4, 8, 11], 6: [0, 2, 4, 7, 9, 11],
         9: [0, 1, 2, 4, 5, 7, 9, 10, 11]},
    6: {1: [0], 2: [0, 5], 3: [0, 2, 5], 4: [0, 1, 3, 5]},
}

# Per model family: the config attributes holding the encoder/decoder depth and the state-dict prefixes of
# the layer stacks.
_DEPTH_ATTRIBUTES = (("encoder_layers", "decoder_layers"), ("num_layers", "num_decoder_layers"))
_LAYER_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?P<side>encoder|decoder)\.(?:layers|block))\.(?P<index>\d+)\.(?P<rest>.*)$")


def layers_to_copy(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Teacher layer indices (0-based) a student with ``num_student_layers`` copies.

    Uses Shleifer & Rush (2020)'s published maps for 12- and 6-layer teachers (12->6: [0, 2, 4, 7, 9, 11],
    12->3: [0, 6, 11], 6->3: [0, 2, 5]) and otherwise spreads the layers evenly, first and last kept:
    ``round(i * (n - 1) / (k - 1))`` for ``i = 0..k-1``.
    """
    n, k = num_teacher_layers, num_student_layers
    if not 1 <= k <= n:
        raise ValueError(f"a student needs between 1 and {n} layers to copy from a {n}-layer teacher, got {k}")
    if k == n:
        return list(range(n))
    if k in _SHLEIFER_RUSH_LAYER_MAPS.get(n, {}):
        return list(_SHLEIFER_RUSH_LAYER_MAPS[n][k])
    if k == 1:
        return [0]
    return [int(round(i * (n - 1) / (k - 1))) for i in range(k)]


def _depths(config) -> tuple[str, str]:
    for enc, dec in _DEPTH_ATTRIBUTES:
        if hasattr(config, enc) and hasattr(config, dec):
            return enc, dec
    raise ValueError(
        f"make_student does not know where {type(config).__name__} keeps its layer counts "
        f"(looked for {_DEPTH_ATTRIBUTES}); supported families: Marian, BART/mBART, M2M100/NLLB, T5"
    )


def _resolve_layers(given, num_layers: int | None, teacher_layers: int, side: str) -> list[int]:
    if given is not None:
        ids = [int(i) for i in given]
        bad = [i for i in ids if not 0 <= i < teacher_layers]
        if bad:
            raise ValueError(f"{side} layer ids {bad} are outside the teacher's 0..{teacher_layers - 1}")
        if num_layers is not None and num_layers != len(ids):
            raise ValueError(f"{side}: {num_layers} layers asked for but {len(ids)} layer ids given ({ids})")
        return ids
    if num_layers is None:
        return list(range(teacher_layers))
    return layers_to_copy(teacher_layers, num_layers)


def make_student(
    teacher: PreTrainedModel,
    encoder_layers: int | Sequence[int] | None = None,
    decoder_layers: int | Sequence[int] | None = None,
) -> PreTrainedModel:
    """A smaller model of the teacher's class whose layers are copies of chosen teacher layers.

    Args:
        teacher: an encoder-decoder model (Marian, BART/mBART, M2M100/NLLB, T5).
        encoder_layers: the number of encoder layers (chosen by :func:`layers_to_copy`) or an explicit list of
            0-based teacher layer indices. ``None`` keeps all.
        decoder_layers: the same for the decoder.

    Returns:
        The student, in the teacher's dtype, on the CPU, with ``config.student_layer_map`` recording the copy.
    """
    config = copy.deepcopy(teacher.config)
    enc_attr, dec_attr = _depths(config)
    n_enc, n_dec = getattr(config, enc_attr), getattr(config, dec_attr)
    enc_ids = _resolve_layers(None if isinstance(encoder_layers, int) or encoder_layers is None else encoder_layers,
                              encoder_layers if isinstance(encoder_layers, int) else None, n_enc, "encoder")
    dec_ids = _resolve_layers(None if isinstance(decoder_layers, int) or decoder_layers is None else decoder_layers,
                              decoder_layers if isinstance(decoder_layers, int) else None, n_dec, "decoder")
    setattr(config, enc_attr, len(enc_ids))
    setattr(config, dec_attr, len(dec_ids))
    config.student_layer_map = {"encoder": enc_ids, "decoder": dec_ids}

    student = type(teacher)(config)
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    chosen = {"encoder": enc_ids, "decoder": dec_ids}
    new_state = {}
    for key in student_state:
        match = _LAYER_KEY.match(key)
        if match is None:
            source_key = key
        else:
            teacher_index = chosen[match["side"]][int(match["index"])]
            source_key = f"{match['prefix']}.{teacher_index}.{match['rest']}"
            if source_key not in teacher_state and "relative_attention_bias" in key:
                # T5 keeps its relative position bias in block 0 only: take it from the teacher's block 0.
                source_key = f"{match['prefix']}.0.{match['rest']}"
        if source_key not in teacher_state:
            raise ValueError(f"make_student: no teacher weight {source_key!r} for student weight {key!r}")
        new_state[key] = teacher_state[source_key].detach().clone()
    student.load_state_dict(new_state, strict=True)
    student.to(next(teacher.parameters()).dtype)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def make_student_from_config(
    teacher_or_config,
    *,
    d_model: int | None = None,
    encoder_layers: int | None = None,
    decoder_layers: int | None = None,
    ffn_dim: int | None = None,
    attention_heads: int | None = None,
    scale_embedding: bool | None = True,
    seed: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised model of the teacher's family and vocabulary, of the given size.

    ``None`` keeps the teacher's value. For Marian, ``scale_embedding=True`` (the default here) multiplies
    token embeddings by sqrt(d_model): without it a from-scratch Marian's token embeddings are far weaker than
    its sinusoidal positions and it learns to ignore its source.
    """

    config = copy.deepcopy(getattr(teacher_or_config, "config", teacher_or_config))
    enc_attr, dec_attr = _depths(config)
    if encoder_layers is not None:
        setattr(config, enc_attr, encoder_layers)
    if decoder_layers is not None:
        setattr(config, dec_attr, decoder_layers)
    if d_model is not None:
        config.d_model = d_model
    if ffn_dim is not None:
        for name in ("encoder_ffn_dim", "decoder_ffn_dim", "d_ff"):
            if hasattr(config, name):
                setattr(config, name, ffn_dim)
    if attention_heads is not None:
        for name in ("encoder_attention_heads", "decoder_attention_heads", "num_heads"):
            if hasattr(config, name):
                setattr(config, name, attention_heads)
        if hasattr(config, "d_kv") and d_model is not None:
            config.d_kv = d_model // attention_heads
    if scale_embedding is not None and hasattr(config, "scale_embedding"):
        config.scale_embedding = scale_embedding
    if hasattr(config, "student_layer_map"):
        del config.student_layer_map
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(config)
    teacher_generation = getattr(teacher_or_config, "generation_config", None)
    if teacher_generation is not None:
        model.generation_config = copy.deepcopy(teacher_generation)
    return model


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    *,
    model: str = "bpe",
    lowercase: bool = False,
    min_frequency: int = 2,
    split_punctuation: bool = True,
):
    """Train a shared source/target subword vocabulary and return a ``PreTrainedTokenizerFast``.

    Layout, as in real opus-mt vocabularies: ``</s>`` = 0, ``<unk>`` = 1, ..., ``<pad>`` = the last id (the
    CTranslate2 Marian converter drops the last row, expecting it to be the pad). Every encoded sequence ends
    with ``</s>``; detokenization undoes the SentencePiece-style ``▁`` word boundaries.

    Args:
        texts: source and target sentences together (a shared vocabulary).
        vocab_size: the size including the three special tokens.
        model: ``"bpe"`` or ``"unigram"``.
        lowercase: lowercase during normalisation.
        min_frequency: minimum pair frequency for a BPE merge.
        split_punctuation: punctuation is a subword of its own (``"▁fence"``, ``"."``), as SentencePiece splits
            at script boundaries. ``False`` lets merges join words and punctuation (``"▁fence."``): on Multi30k
            that spent 1,243 of 8,000 entries on such pairs.
    """

    norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    specials = ["</s>", "<unk>"]
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=specials, min_frequency=min_frequency,
                                      show_progress=False)
    elif model == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size - 1, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
    else:
        raise ValueError(f"train_tokenizer: unknown model {model!r}; use 'bpe' or 'unigram'")
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    if split_punctuation:  # after Metaspace: "▁fence." -> "▁fence", "." (decoding stays exact)
        tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer, pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator((t for t in texts if t), trainer)
    tok.add_special_tokens(["<pad>"])  # appended: pad is the last id
    eos_id = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    assert tokenizer.pad_token_id == len(tokenizer) - 1, "pad must be the last vocabulary entry"
    return tokenizer


def tiny_seq2seq_model(
    tokenizer,
    family: str = "marian",
    *,
    d_model: int = 32,
    encoder_layers: int = 2,
    decoder_layers: int = 2,
    ffn_dim: int | None = None,
    attention_heads: int = 4,
    dropout: float = 0.0,
    max_position_embeddings: int = 256,
    seed: int | None = 0,
) -> PreTrainedModel:
    """A small randomly initialised Marian, BART or T5 model for ``tokenizer`` (from :func:`train_tokenizer`).

    The decoder starts from ``<pad>`` (as Marian and T5 do) and ends with ``</s>``; Marian uses
    ``scale_embedding=True`` (see :func:`make_student_from_config`).
    """
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        MarianConfig,
        MarianMTModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    if seed is not None:
        torch.manual_seed(seed)
    ffn_dim = ffn_dim or 4 * d_model
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               decoder_start_token_id=tokenizer.pad_token_id)
    vocab = len(tokenizer)
    if family == "marian":
        config = MarianConfig(vocab_size=vocab, d_model=d_model, encoder_layers=encoder_layers,
                              decoder_layers=decoder_layers, encoder_attention_heads=attention_heads,
                              decoder_attention_heads=attention_heads, encoder_ffn_dim=ffn_dim,
                              decoder_ffn_dim=ffn_dim,
                              dropout=dropout, attention_dropout=0.0, activation_dropout=0.0,
                              max_position_embeddings=max_position_embeddings, scale_embedding=True,
                              share_encoder_decoder_embeddings=True, forced_eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=None, **ids)
        model = MarianMTModel(config)
    elif family == "bart":
        config = BartConfig(vocab_size=vocab, d_model=d_model, encoder_layers=encoder_layers,
                            decoder_layers=decoder_layers, encoder_attention_heads=attention_heads,
                            decoder_attention_heads=attention_heads, encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim,
                            dropout=dropout, attention_dropout=0.0, activation_dropout=0.0,
                            max_position_embeddings=max_position_embeddings, scale_embedding=True,
                            forced_eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                            forced_bos_token_id=None, **ids)
        model = BartForConditionalGeneration(config)
    elif family == "t5":
        config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // attention_heads, d_ff=ffn_dim,
                          num_layers=encoder_layers, num_decoder_layers=decoder_layers, num_heads=attention_heads,
                          dropout_rate=dropout, **ids)
        model = T5ForConditionalGeneration(config)
    else:
        raise ValueError(f"tiny_seq2seq_model: unknown family {family!r}; use 'marian', 'bart' or 't5'")
    return model


def count_parameters(model: torch.nn.Module, *, nonzero: bool = False) -> int:
    """Number of (distinct) parameters; ``nonzero=True`` counts only non-zero entries (pruned models)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += int(torch.count_nonzero(p).item()) if nonzero else p.numel()
    return total


def unsaved_parameter_names(model: torch.nn.Module) -> set[str]:
    """The names ``save_pretrained`` leaves out of a model's weights (its class's ``_keys_to_ignore_on_save``:
    Marian's sinusoidal position tables); empty for other models."""
    return set(getattr(model, "_keys_to_ignore_on_save", None) or ())


def freeze_unsaved_parameters(model: torch.nn.Module) -> list[str]:
    """Freeze (``requires_grad=False``) the parameters that ``save_pretrained`` leaves out, the model class's
    ``_keys_to_ignore_on_save`` (Marian's sinusoidal position tables, recomputed when a model is loaded); returns
    their names.

    A model built from a config has them frozen, but Transformers 5 loads them trainable, so a trainer would update
    them and the saved model would differ from the one it trained and validated (``DistillationTrainer`` calls
    this on its student). Other models are left as they are (an empty list)."""
    ignored = unsaved_parameter_names(model)
    frozen = []
    for name, param in model.named_parameters():
        if name in ignored and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
