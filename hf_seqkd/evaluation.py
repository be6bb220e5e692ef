"""Evaluation: translate a test set, score it with sacrebleu (offline), time it.

``evaluate.load("sacrebleu")`` fetches its script from the Hub, so the metrics call sacrebleu directly; the
scores are identical to the ``evaluate`` metric's (same corpus BLEU / chrF on detokenized text).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import sacrebleu
import torch
from tqdm.auto import tqdm

from .students import count_parameters

__all__ = ["corpus_scores", "translate", "evaluate_translation", "make_compute_metrics"]


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenization, chrF with char order 6, beta 2)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    refs = [list(references)]
    return {"bleu": sacrebleu.corpus_bleu(list(hypotheses), refs).score,
            "chrf": sacrebleu.corpus_chrf(list(hypotheses), refs).score}


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
    texts = [source_prefix + s for s in sources]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort_by_length else list(range(len(texts)))
    hypotheses: list[str | None] = [None] * len(texts)
    generated = 0
    pad = tokenizer.pad_token_id
    bar = tqdm(total=len(texts), desc="translating", unit="sent", disable=not show_progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True).to(device)
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
                         show_progress: bool = False, return_hypotheses: bool = False,
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
        show_progress: show a progress bar.
        return_hypotheses: include the translations under ``"hypotheses"``.

    Returns a dict with ``bleu``, ``chrf``, ``sentences_per_second``, ``tokens_per_second`` (generated),
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
        **corpus_scores(hypotheses, references),
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


def make_compute_metrics(tokenizer):
    """A ``compute_metrics`` for ``Seq2SeqTrainer(predict_with_generate=True)``: BLEU, chrF, mean length."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        pad = tokenizer.pad_token_id
        predictions = np.where(predictions < 0, pad, predictions)
        labels = np.where(labels < 0, pad, labels)
        hyps = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        scores = corpus_scores(hyps, refs)
        scores["gen_len"] = float(np.mean([np.count_nonzero(p != pad) for p in predictions]))
        return scores

    return compute_metrics
