"""The translation direction of a run: tokenizer language codes, the target-language token ``generate`` must force,
the task prefix, resolved once for a teacher (and the student that shares its tokenizer) and applied everywhere.

Multilingual models need their languages named (as ``run_translation.py`` does): NLLB-200 and M2M100 tag sources with
a source-language token and need ``forced_bos_token_id`` (the target-language token) in every ``generate``; mBART-50
the same with ``en_XX``-style codes. T5 needs a task prefix (``"translate English to German: "``). Without them a
teacher translates into the wrong language, silently.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

__all__ = ["Languages", "check_single_direction", "language_codes", "resolve_languages", "target_token_id"]

# ISO 639-1 -> ISO 639-3 (+ script where NLLB needs one), to find an NLLB code from a data set's two-letter name
_ISO3 = {
    "af": "afr", "am": "amh", "ar": "arb", "az": "azj", "be": "bel", "bg": "bul", "bn": "ben", "bs": "bos",
    "ca": "cat", "cs": "ces", "cy": "cym", "da": "dan", "de": "deu", "el": "ell", "en": "eng", "es": "spa",
    "et": "est", "eu": "eus", "fa": "pes", "fi": "fin", "fr": "fra", "ga": "gle", "gl": "glg", "gu": "guj",
    "he": "heb", "hi": "hin", "hr": "hrv", "hu": "hun", "hy": "hye", "id": "ind", "is": "isl", "it": "ita",
    "ja": "jpn", "ka": "kat", "kk": "kaz", "km": "khm", "kn": "kan", "ko": "kor", "lo": "lao", "lt": "lit",
    "lv": "lvs", "mk": "mkd", "ml": "mal", "mn": "khk", "mr": "mar", "ms": "zsm", "my": "mya", "ne": "npi",
    "nl": "nld", "no": "nob", "nb": "nob", "pa": "pan", "pl": "pol", "ps": "pbt", "pt": "por", "ro": "ron",
    "ru": "rus", "si": "sin", "sk": "slk", "sl": "slv", "sq": "als", "sr": "srp", "sv": "swe", "sw": "swh",
    "ta": "tam", "te": "tel", "th": "tha", "tl": "tgl", "tr": "tur", "uk": "ukr", "ur": "urd", "uz": "uzn",
    "vi": "vie", "zh": "zho_Hans", "zu": "zul",
}
_NLLB_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")


@dataclass(frozen=True)
class Languages:
    """A run's translation direction.

    Attributes:
        src_lang, tgt_lang: the tokenizer's language codes (``"deu_Latn"``, ``"de_DE"``, ``"de"``), ``None`` for a
            tokenizer without codes.
        forced_bos_token_id, forced_bos_token: the target-language token every ``generate`` must force (``None``
            when the model needs none).
        source_prefix: the text put before every source (T5's task prefix), ``""`` for none.
        target_language: the target language as far as it is known (a code or a plain name), for the BLEU
            tokenizer (:func:`hf_seqkd.evaluation.resolve_bleu_tokenize`).
    """

    src_lang: str | None = None
    tgt_lang: str | None = None
    forced_bos_token_id: int | None = None
    forced_bos_token: str | None = None
    source_prefix: str = ""
    target_language: str | None = None

    def apply(self, tokenizer) -> None:
        """Set the codes on ``tokenizer`` (sources and ``text_target`` labels get them), and in its saved
        configuration."""
        for name in ("src_lang", "tgt_lang"):
            value = getattr(self, name)
            if value is not None:
                setattr(tokenizer, name, value)
                tokenizer.init_kwargs[name] = value

    def generate_kwargs(self) -> dict:
        """What every ``generate`` of the run adds: ``forced_bos_token_id`` when the model needs it."""
        return {} if self.forced_bos_token_id is None else {"forced_bos_token_id": self.forced_bos_token_id}

    def apply_to_model(self, model) -> None:
        """Record in ``model`` what calling it needs: ``generation_config.forced_bos_token_id`` and ``config.prefix``
        (read by Transformers 4's translation pipeline), so that a saved student translates as it was trained."""
        if self.forced_bos_token_id is not None:
            model.generation_config.forced_bos_token_id = self.forced_bos_token_id
        if self.source_prefix:
            model.config.prefix = self.source_prefix

    def apply_to_arguments(self, args, source_language: str | None = None) -> None:
        """Write the direction into a run's ``DistillationTrainingArguments`` (``src_lang``, ``tgt_lang``,
        ``source_prefix``), so that the trainer resolves the same one; for a tokenizer without codes the plain names
        stay (they choose the BLEU tokenizer)."""
        args.src_lang = self.src_lang or args.src_lang or source_language
        args.tgt_lang = self.tgt_lang or self.target_language
        args.source_prefix = self.source_prefix

    def usage(self) -> dict:
        """The calling conventions a model card shows (:func:`hf_seqkd.hub.make_model_card`)."""
        return {"src_lang": self.src_lang, "tgt_lang": self.tgt_lang, "forced_bos_token": self.forced_bos_token,
                "source_prefix": self.source_prefix}


def language_codes(tokenizer) -> dict[str, int] | None:
    """``{code: token id}`` of a tokenizer with language codes (NLLB, M2M100, mBART-50), ``None`` for others."""
    if not hasattr(tokenizer, "set_src_lang_special_tokens"):
        return None
    mapping = getattr(tokenizer, "lang_code_to_id", None)
    if isinstance(mapping, dict) and mapping:  # mBART-50 ("de_DE"), M2M100 ("de" -> the id of "__de__")
        return dict(mapping)
    special = getattr(tokenizer, "extra_special_tokens", None) or getattr(tokenizer, "additional_special_tokens", [])
    if isinstance(special, dict):
        special = list(special.values())
    codes = [t for t in special if isinstance(t, str) and _NLLB_CODE.match(t)]  # NLLB ("deu_Latn")
    return {code: tokenizer.convert_tokens_to_ids(code) for code in codes} or None


def target_token_id(tokenizer, forced_bos_token_id: int | None = None) -> int | None:
    """The token a ``generate`` with ``tokenizer``'s sources must force first: ``forced_bos_token_id`` when given,
    else the token of the tokenizer's own ``tgt_lang`` (a tokenizer loaded with ``tgt_lang=...``, as the
    multilingual model cards do), else ``None`` (the model's generation config decides).

    Raises:
        ValueError: the tokenizer's ``tgt_lang`` is not one of its codes.
    """
    if forced_bos_token_id is not None:
        return forced_bos_token_id
    target = getattr(tokenizer, "tgt_lang", None)
    codes = language_codes(tokenizer) if target else None
    if not codes:
        return None
    _check_code("tgt_lang", target, codes, tokenizer)
    return codes[target]


def _code_for(name: str | None, codes: dict[str, int]) -> str | None:
    """The code of ``codes`` a data set's language name means (``"de"`` -> ``"deu_Latn"`` / ``"de_DE"`` / ``"de"``);
    ``None`` when it names none or several."""
    if not name:
        return None
    if name in codes:
        return name
    key = str(name).replace("-", "_").split("_")[0].lower()
    candidates = [c for c in codes if c.split("_")[0].lower() == key]  # mBART-50: "de" -> "de_DE"
    if not candidates and key in _ISO3:  # NLLB: "de" -> "deu_Latn"
        iso3 = _ISO3[key]
        candidates = [c for c in codes if c == iso3 or c.startswith(iso3 + "_") or c.split("_")[0] == iso3]
    return candidates[0] if len(candidates) == 1 else None


def _check_code(role: str, code: str, codes: dict[str, int], tokenizer) -> None:
    if code not in codes:
        near = [c for c in codes if c[:2].lower() == str(code)[:2].lower()] or list(codes)[:12]
        raise ValueError(f"{role}={code!r} is not a language code of {type(tokenizer).__name__}; codes like "
                         f"{near} (the tokenizer knows {len(codes)}), e.g. --{role} {near[0]}")


def _t5_prefix(model, source: str | None, target: str | None) -> str:
    params = getattr(getattr(model, "config", None), "task_specific_params", None) or {}
    if not source or not target:
        return ""
    task = params.get(f"translation_{source.split('_')[0].lower()}_to_{target.split('_')[0].lower()}") or {}
    return task.get("prefix") or ""


def resolve_languages(tokenizer, model=None, *, src_lang: str | None = None, tgt_lang: str | None = None,
                      source_lang: str | None = None, target_lang: str | None = None,
                      source_prefix: str = "") -> Languages:
    """The translation direction of a teacher and its tokenizer, from what the user named.

    For a tokenizer with language codes (NLLB, M2M100, mBART-50): ``src_lang`` / ``tgt_lang`` when given (a code, or
    a name that means exactly one: ``"de"`` -> ``"deu_Latn"`` / ``"de_DE"``), else the
    code the data's ``source_lang`` / ``target_lang`` (e.g. ``"de"``) names, else what the tokenizer was loaded with
    (``AutoTokenizer.from_pretrained(..., src_lang=..., tgt_lang=...)``, as the model cards do); the target code is
    forced as the first generated token. For a tokenizer without codes the names only choose the BLEU tokenizer. An
    empty ``source_prefix`` takes the model's own task prefix for the pair when it has one (T5's
    ``task_specific_params``), with a warning when a T5 model has none for it.

    Args:
        tokenizer: the teacher's tokenizer. model: the teacher (its config gives T5's prefixes).
        src_lang, tgt_lang: language codes as the tokenizer names them (``"deu_Latn"``, ``"de_DE"``, ``"de"``).
        source_lang, target_lang: the data's language names (file suffixes, ``translation`` keys).
        source_prefix: a task prefix given by the user.

    Raises:
        ValueError: a code the tokenizer does not know, or no target language for a tokenizer with codes (the
            message lists codes).
    """
    codes = language_codes(tokenizer)
    if codes is None:
        prefix = source_prefix or _t5_prefix(model, src_lang or source_lang, tgt_lang or target_lang)
        is_t5 = getattr(getattr(model, "config", None), "model_type", "") in ("t5", "mt5", "umt5")
        if is_t5 and not prefix:
            warnings.warn(f"a T5 model without a source_prefix for {src_lang or source_lang}->"
                          f"{tgt_lang or target_lang}: T5 reads the task from the prefix (e.g. "
                          "'translate English to German: '); without one it may not translate", stacklevel=2)
        return Languages(src_lang=None, tgt_lang=None, source_prefix=prefix,
                         target_language=tgt_lang or target_lang)
    # a code as the tokenizer spells it, or a name that means one code ("de" -> "deu_Latn" / "de_DE")
    src = ((_code_for(src_lang, codes) or src_lang) if src_lang else _code_for(source_lang, codes)) \
        or getattr(tokenizer, "src_lang", None)
    tgt = ((_code_for(tgt_lang, codes) or tgt_lang) if tgt_lang else _code_for(target_lang, codes)) \
        or getattr(tokenizer, "tgt_lang", None)
    if tgt is None:
        example = _code_for("en", codes) or next(iter(codes))
        raise ValueError(f"{type(tokenizer).__name__} translates into many languages and no target language was "
                         f"named: set tgt_lang (--tgt_lang), e.g. {example!r}, or load the tokenizer with "
                         f"tgt_lang=...; it knows {len(codes)} codes: {list(codes)[:20]}...")
    if src is None:
        raise ValueError(f"{type(tokenizer).__name__}: no source language: set src_lang (--src_lang)")
    if not src_lang and not source_lang and not tokenizer.init_kwargs.get("src_lang"):
        warnings.warn(f"no source language named: sources are tagged {src!r}, {type(tokenizer).__name__}'s default; "
                      f"set src_lang (--src_lang) if they are not in that language", stacklevel=2)
    _check_code("src_lang", src, codes, tokenizer)
    _check_code("tgt_lang", tgt, codes, tokenizer)
    bos = codes[tgt]
    return Languages(src_lang=src, tgt_lang=tgt, forced_bos_token_id=bos,
                     forced_bos_token=tokenizer.convert_ids_to_tokens(bos), source_prefix=source_prefix,
                     target_language=tgt)


_DIRECTION_COLUMNS = ("src_lang", "tgt_lang", "source_lang", "target_lang", "lang_pair", "language_pair")


def check_single_direction(dataset) -> None:
    """Refuse a data set whose rows name several translation directions (a per-row ``src_lang`` / ``tgt_lang`` /
    ``lang_pair`` column with more than one value): a run has one direction (one forced target token, one prefix).

    Raises:
        ValueError: naming the column and its values, and the fix (one run, or one corpus, per direction).
    """
    for column in getattr(dataset, "column_names", None) or ():
        if column in _DIRECTION_COLUMNS:
            values = sorted({str(v) for v in dataset.unique(column)})
            if len(values) > 1:
                raise ValueError(
                    f"the data mixes translation directions: column {column!r} has {len(values)} values "
                    f"{values[:10]}; hf_seqkd distils one direction per run (one forced target language, one "
                    f"prefix). Split it, e.g. dataset.filter(lambda r: r[{column!r}] == {values[0]!r}), and build "
                    "one Seq-KD corpus (or run) per direction; the corpora can be concatenated afterwards")
