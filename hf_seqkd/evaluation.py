"""Evaluation: translate a test set, score it with sacrebleu (offline), time it.

``evaluate.load("sacrebleu")`` fetches its script from the Hub, so the metrics call sacrebleu directly; the
scores are identical to the ``evaluate`` metric's (same corpus BLEU / chrF on detokenized text).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .students import count_parameters

__all__ = ["corpus_scores", "resolve_bleu_tokenize", "translate", "evaluate_translation", "make_compute_metrics",
           "max_target_positions", "max_source_positions", "cap_max_new_tokens"]

# Target languages written without spaces between words, and sacrebleu's tokenizer for them. Keys are the first
# part of a language code ("zh" of "zh_CN", "zho" of NLLB's "zho_Hans"), two- and three-letter ISO 639 codes.
_NO_SPACE_TOKENIZERS = {
    "zh": "zh", "zho": "zh", "cmn": "zh", "yue": "zh", "wuu": "zh",
    "ja": "ja-mecab", "jpn": "ja-mecab",
    "ko": "ko-mecab", "kor": "ko-mecab",
    # Thai, Lao, Khmer, Burmese, Tibetan, Dzongkha: flores200's SentencePiece model when it is at hand, else characters
    **{code: "flores200" for code in ("th", "tha", "lo", "lao", "km", "khm", "my", "mya", "bo", "bod", "dz", "dzo")},
}
_MECAB_EXTRAS = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]"}


def _mecab_available(name: str) -> bool:
    try:
        from sacrebleu.metrics.bleu import _get_tokenizer

        _get_tokenizer(name)()
        return True
    except Exception:  # noqa: BLE001 - missing mecab / dictionary: any import or runtime error
        return False


def _flores_available() -> bool:
    """flores200's SentencePiece model is in sacrebleu's local cache (it is downloaded on first use otherwise)."""
    import os

    from sacrebleu.utils import SACREBLEU_DIR

    return os.path.isfile(os.path.join(SACREBLEU_DIR, "models", "flores200sacrebleuspm"))


def resolve_bleu_tokenize(language: str | None = None, tokenize: str | None = None) -> str:
    """The sacrebleu tokenizer for BLEU: ``tokenize`` when given, otherwise chosen from the target ``language``.

    Languages written without spaces need their own tokenizer, or BLEU counts whole sentences as words (three
    Chinese sentence pairs: 0.00 with ``13a``, 49.07 with ``zh``). sacrebleu's choices: ``zh`` for Chinese,
    ``ja-mecab`` / ``ko-mecab`` for Japanese / Korean (``pip install "sacrebleu[ja]"`` / ``"sacrebleu[ko]"``; without
    them ``char``, with a warning), ``flores200`` for Thai, Lao, Khmer, Burmese, Tibetan and Dzongkha when its model
    is in sacrebleu's cache (``char`` otherwise: the machines here cannot download it), ``13a`` (sacrebleu's default)
    for every other language and when the language is unknown.

    Args:
        language: a language code as the data, a tokenizer or a model card names it (``"zh"``, ``"zh_CN"``,
            ``"zho_Hans"``, ``"ja_XX"``, ``"de"``); ``None``: unknown.
        tokenize: an explicit sacrebleu tokenizer name (``"13a"``, ``"intl"``, ``"zh"``, ``"char"``, ...).

    Raises:
        ValueError: ``tokenize`` is not one of sacrebleu's tokenizers.
    """
    import warnings

    from sacrebleu.metrics.bleu import _TOKENIZERS

    if tokenize is not None:
        if tokenize not in _TOKENIZERS:
            raise ValueError(f"bleu_tokenize={tokenize!r} is not a sacrebleu tokenizer; choose one of "
                             f"{', '.join(_TOKENIZERS)} (13a is sacrebleu's default)")
        return tokenize
    key = str(language or "").replace("-", "_").split("_")[0].lower()
    choice = _NO_SPACE_TOKENIZERS.get(key, "13a")
    if choice in _MECAB_EXTRAS and not _mecab_available(choice):
        warnings.warn(f"BLEU for {language!r} wants sacrebleu's {choice} tokenizer, which needs "
                      f'pip install "{_MECAB_EXTRAS[choice]}"; scoring on characters (char) instead', stacklevel=2)
        return "char"
    if choice == "flores200" and not _flores_available():
        return "char"
    return choice


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = "13a") -> dict:
    """Corpus BLEU (sacrebleu, tokenizer ``tokenize``) and chrF (character order 6, beta 2) with their signatures.

    Returns ``{"bleu", "chrf", "bleu_signature", "chrf_signature"}``; the signatures (e.g.
    ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``) say how the numbers were computed.
    """
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    refs = [list(references)]
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    return {"bleu": bleu.corpus_score(list(hypotheses), refs).score,
            "chrf": chrf.corpus_score(list(hypotheses), refs).score,
            "bleu_signature": bleu.get_signature().format(), "chrf_signature": chrf.get_signature().format()}


# ------------------------------------------------------------------------------------------ generation limits
def max_target_positions(model) -> int | None:
    """The longest decoder input ``model`` can represent (its position table), or ``None`` when it has no fixed
    one (T5's relative positions). A translation of ``n`` new tokens feeds the decoder ``n`` positions (the start
    token and the first ``n - 1`` outputs), so ``max_new_tokens`` may be at most this."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None) if config is not None else None
    return int(value) if value else None


def max_source_positions(model, tokenizer=None) -> int | None:
    """The longest source ``model`` (and ``tokenizer``'s ``model_max_length``, when it is set) can take."""
    limits = [max_target_positions(model)]
    if tokenizer is not None and (tokenizer.model_max_length or 0) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    limits = [x for x in limits if x]
    return min(limits) if limits else None


def cap_max_new_tokens(model, max_new_tokens: int) -> int:
    """``max_new_tokens`` capped at :func:`max_target_positions`: a runaway translation is cut, never a crash."""
    limit = max_target_positions(model)
    return int(max_new_tokens) if limit is None else min(int(max_new_tokens), limit)


def encode_sources(tokenizer, texts: Sequence[str], model=None, **kwargs):
    """``tokenizer(texts)`` padded on the right and truncated to what ``model`` can take: with absolute positions
    (Marian, BART) left padding would shift every position of a shorter sentence and make its translation depend on
    its batch neighbours."""
    limit = max_source_positions(model, tokenizer) if model is not None else None
    return tokenizer(list(texts), padding=True, padding_side="right", truncation=limit is not None,
                     max_length=limit, **kwargs)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def translate(model, tokenizer, sources: Sequence[str], *, num_beams: int = 1, batch_size: int = 32,
              max_new_tokens: int = 128, source_prefix: str = "", sort_by_length: bool = True,
              show_progress: bool = False, **generate_kwargs) -> tuple[list[str], int]:
    """Translate ``sources``; returns (hypotheses in input order, number of generated tokens).

    Batches are formed from length-sorted sources when ``sort_by_length`` (less padding), order is restored.
    """
    model.eval()
    device = _device_of(model)
    max_new_tokens = cap_max_new_tokens(model, max_new_tokens)
    texts = [source_prefix + s for s in sources]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort_by_length else list(range(len(texts)))
    hypotheses: list[str | None] = [None] * len(texts)
    generated = 0
    pad = tokenizer.pad_token_id
    bar = tqdm(total=len(texts), desc="translating", unit="sent", disable=not show_progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = encode_sources(tokenizer, [texts[i] for i in idx], model, return_tensors="pt").to(device)
        out = model.generate(**enc, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False,
                             **generate_kwargs)
        out = out[:, 1:]  # drop the decoder start token
        generated += int(out.ne(pad).sum().item())
        for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True)):
            hypotheses[i] = text.strip()
        bar.update(len(idx))
    bar.close()
    return hypotheses, generated


def evaluate_translation(model, tokenizer, sources: Sequence[str], references: Sequence[str], *, num_beams: int = 1,
                         batch_size: int = 32, max_new_tokens: int = 128, source_prefix: str = "",
                         bleu_tokenize: str = "13a", show_progress: bool = False, return_hypotheses: bool = False,
                         **generate_kwargs) -> dict:
    """BLEU, chrF, speed and size of ``model`` on a test set.

    Args:
        model: a seq2seq model (any device; it is used where it is).
        tokenizer: its tokenizer.
        sources, references: the test set (detokenized text).
        num_beams: 1 = greedy, else beam search.
        batch_size: sentences per ``generate`` call (length-sorted batches).
        max_new_tokens: generation length limit.
        source_prefix: T5-style task prefix.
        bleu_tokenize: sacrebleu's tokenizer for BLEU (:func:`resolve_bleu_tokenize`).
        show_progress: show a progress bar.
        return_hypotheses: include the translations under ``"hypotheses"``.

    Returns a dict with ``bleu``, ``chrf``, ``bleu_signature``, ``chrf_signature``, ``sentences_per_second``, ``tokens_per_second`` (generated),
    ``seconds``, ``num_parameters``, ``num_nonzero_parameters``, ``num_beams``, ``batch_size``.
    """
    if len(sources) != len(references):
        raise ValueError(f"{len(sources)} sources but {len(references)} references")
    if len(sources) == 0:
        raise ValueError("evaluate_translation needs at least one sentence")
    if _device_of(model).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    hypotheses, generated = translate(model, tokenizer, sources, num_beams=num_beams, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, source_prefix=source_prefix,
                                      show_progress=show_progress, **generate_kwargs)
    if _device_of(model).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        **corpus_scores(hypotheses, references, tokenize=bleu_tokenize),
        "sentences_per_second": len(sources) / seconds,
        "tokens_per_second": generated / seconds,
        "seconds": seconds,
        "num_parameters": count_parameters(model),
        "num_nonzero_parameters": count_parameters(model, nonzero=True),
        "num_beams": num_beams,
        "batch_size": batch_size,
    }
    if return_hypotheses:
        result["hypotheses"] = hypotheses
    return result


def make_compute_metrics(tokenizer, references: Sequence[str] | None = None, *, tokenize: str = "13a"):
    """A ``compute_metrics`` for ``Seq2SeqTrainer(predict_with_generate=True)``: BLEU, chrF and mean output length.

    Args:
        tokenizer: decodes the predictions.
        references: the raw reference texts of the evaluation set, in its order (what the final evaluation scores
            against). ``None`` rebuilds them from the label ids, which loses what the tokenizer cannot represent and
            what truncation cut (a warning says so).
        tokenize: the sacrebleu tokenizer of BLEU (:func:`resolve_bleu_tokenize`).

    Raises (when called):
        ValueError: the number of predictions is not the number of references.
    """
    import logging

    if references is None:
        logging.getLogger(__name__).warning(
            "make_compute_metrics without references: validation BLEU is computed against references decoded from "
            "the label ids (unknown characters and truncated words are lost); pass the raw references")
    references = None if references is None else [str(r).strip() for r in references]

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        pad = tokenizer.pad_token_id
        predictions = np.where(predictions < 0, pad, predictions)
        hyps = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        refs = references
        if refs is None:
            labels = np.where(labels < 0, pad, labels)
            refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        if len(refs) != len(hyps):
            raise ValueError(f"compute_metrics: {len(refs)} references but {len(hyps)} predictions; the references "
                             "must be those of the evaluation set, in its order")
        scores = corpus_scores(hyps, refs, tokenize=tokenize)
        scores = {k: v for k, v in scores.items() if not k.endswith("_signature")}  # logged metrics are numbers
        scores["gen_len"] = float(np.mean([np.count_nonzero(p != pad) for p in predictions]))
        return scores

    return compute_metrics
