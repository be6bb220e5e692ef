"""How sure a comparison is: sacrebleu's paired significance tests, and claims judged over seeds.

* :func:`paired_test`: BLEU and chrF of several systems on one test set, each with its 95% confidence interval, and the
  p-value of each system's difference from the first (the baseline), by sacrebleu's own implementation
  (``sacrebleu.significance.PairedTest``): paired bootstrap resampling (Koehn 2004, ``"bs"``) or approximate
  randomization (Riezler & Maxwell 2005, ``"ar"``).
* :func:`add_significance`: the same for :class:`~hf_seqkd.evaluation.EvaluationResult` rows that kept their
  hypotheses, filling their ``*_ci`` and ``*_p_value`` fields.
* :func:`judge_claim`: "A beats B" over several training seeds: it *holds* only when the mean difference exceeds the
  seed spread and the paired test agrees on every seed, *does not hold* when the same is true the other way round,
  and is *not resolved at this size* otherwise.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from .evaluation import resolve_bleu_tokenize

__all__ = ["SystemScores", "paired_test", "add_significance", "Claim", "judge_claim", "HOLDS", "DOES_NOT_HOLD",
           "NOT_RESOLVED"]

HOLDS, DOES_NOT_HOLD, NOT_RESOLVED = "holds", "does not hold", "not resolved at this size"
_TESTS = {"bs": "paired bootstrap resampling", "ar": "approximate randomization"}


@dataclass
class SystemScores:
    """One system of a :func:`paired_test`: corpus ``bleu`` / ``chrf``, the half-width of their 95% confidence
    intervals (``bleu_ci``, ``chrf_ci``: the score is ``bleu ± bleu_ci``; bootstrap resampling), and the two-sided
    p-value of the difference from the baseline (``None`` for the baseline itself)."""

    name: str
    bleu: float
    bleu_ci: float | None
    bleu_p_value: float | None
    chrf: float
    chrf_ci: float | None
    chrf_p_value: float | None


def paired_test(systems: Sequence[tuple[str, Sequence[str]]], references: Sequence[str], *, test: str = "bs",
                n_samples: int = 0, tokenize: str = "13a") -> tuple[list[SystemScores], dict[str, str]]:
    """sacrebleu's paired significance test of every system against the first.

    Args:
        systems: ``(name, hypotheses)`` pairs; the first is the baseline. Every list has one hypothesis per reference.
        references: the test set's references (one per sentence).
        test: ``"bs"`` (paired bootstrap resampling, 1,000 resamples by default) or ``"ar"`` (approximate
            randomization, 10,000 trials by default; the confidence intervals then come from 1,000 bootstrap
            resamples).
        n_samples: resamples / trials (0: sacrebleu's default).
        tokenize: sacrebleu's BLEU tokenizer (:func:`~hf_seqkd.evaluation.resolve_bleu_tokenize`).

    Returns:
        ``(scores, signatures)``: a :class:`SystemScores` per system, in order, and the sacrebleu signatures of BLEU
        and chrF (``{"bleu": ..., "chrf": ...}``, with the test, its samples and its seed). The random seed is
        sacrebleu's (``SACREBLEU_SEED``, 12345 by default), so the numbers repeat. A system whose score equals the
        baseline's gets p = 1 for it (sacrebleu's test gives its smallest p-value there).

    Raises:
        ValueError: an unknown ``test`` or tokenizer, fewer than two systems, duplicate names, empty references,
            hypotheses that are not strings, a system whose number of hypotheses is not the number of references,
            ``n_samples < 0``.
    """
    if test not in _TESTS:
        raise ValueError(f"test={test!r}: use 'bs' (paired bootstrap resampling) or 'ar' (approximate randomization)")
    if len(systems) < 2:
        raise ValueError(f"paired_test needs a baseline and at least one system to compare with it; got "
                         f"{len(systems)} system(s)")
    names = [name for name, _ in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"paired_test: system names must differ; got {names}")
    if isinstance(references, str) or not len(references):
        raise ValueError("paired_test needs the references as a non-empty list of strings, one per sentence")
    if n_samples < 0:
        raise ValueError(f"n_samples={n_samples}: the number of resamples / trials must be >= 0 (0: sacrebleu's "
                         "default)")
    tokenize = resolve_bleu_tokenize(tokenize=tokenize)  # a clear error for an unknown tokenizer
    for name, hypotheses in systems:
        if isinstance(hypotheses, str) or not all(isinstance(h, str) for h in hypotheses):
            raise ValueError(f"paired_test: the hypotheses of {name!r} must be a list of strings, one per sentence")
        if len(hypotheses) != len(references):
            raise ValueError(f"paired_test: {name!r} has {len(hypotheses)} hypotheses but there are "
                             f"{len(references)} references; every system must translate the whole test set")
    metrics = {"BLEU": BLEU(tokenize=tokenize), "chrF": CHRF()}
    signatures, results = PairedTest([(name, list(hyps)) for name, hyps in systems], metrics, [list(references)],
                                     test_type=test, n_samples=n_samples, n_ar_confidence=0 if test == "ar" else -1)()
    bleu_key, chrf_key = (next(k for k in results if k.startswith(prefix)) for prefix in ("BLEU", "chrF"))
    def number(x):  # sacrebleu gives numpy floats
        return None if x is None else float(x)

    scores = [SystemScores(name, *(number(getattr(r, a)) for r in (bleu, chrf) for a in ("score", "ci", "p_value")))
              for name, bleu, chrf in zip(results["System"], results[bleu_key], results[chrf_key])]
    for score in scores[1:]:
        # no difference at all: sacrebleu counts resampled differences strictly above the observed one (zero here,
        # and often every resample's too, e.g. for systems that differ only in words no reference has), which gives
        # its smallest p-value; with no observed difference the right one is 1
        if score.bleu == scores[0].bleu:
            score.bleu_p_value = 1.0
        if score.chrf == scores[0].chrf:
            score.chrf_p_value = 1.0
    return scores, {"bleu": signatures[bleu_key].format(), "chrf": signatures[chrf_key].format()}


def add_significance(results: Sequence, references: Sequence[str], *, baseline: int | str = 0, test: str = "bs",
                     n_samples: int = 0, tokenize: str = "13a") -> Sequence:
    """Fill the confidence intervals and p-values of :class:`~hf_seqkd.evaluation.EvaluationResult` rows.

    For each decoding (greedy, beam) that every row translated with (``hypotheses_greedy`` / ``hypotheses_beam``),
    :func:`paired_test` against the ``baseline`` row sets ``bleu_<decoding>_ci``, ``chrf_<decoding>_ci``,
    ``bleu_<decoding>_p_value`` and ``chrf_<decoding>_p_value`` (``None`` for the baseline), and
    ``significance_baseline`` / ``significance_test`` on every row. Rows without hypotheses are left alone.

    Args:
        results: the rows (:func:`~hf_seqkd.evaluation.evaluate_model` keeps the hypotheses).
        references: the test set's references, in the rows' order.
        baseline: the index or the ``model`` name of the baseline row.
        test, n_samples, tokenize: as :func:`paired_test`.

    Returns ``results``.

    Raises:
        ValueError: no rows, ``baseline`` names no row, translations of another length than ``references``.
    """
    rows = list(results)
    names = [r.model for r in rows]
    if not rows:
        raise ValueError("add_significance: no rows")
    if isinstance(baseline, str):
        if baseline not in names:
            raise ValueError(f"baseline={baseline!r} is not one of the models compared ({', '.join(names)}); "
                             "name one of them")
        baseline = names.index(baseline)
    if isinstance(baseline, bool) or not 0 <= baseline < len(rows):
        raise ValueError(f"baseline={baseline} is not a row index (0..{len(rows) - 1})")
    for decoding in ("greedy", "beam"):
        field = f"hypotheses_{decoding}"
        if getattr(rows[baseline], field) is None:
            continue
        wrong = [r.model for r in rows if getattr(r, field) is not None and len(getattr(r, field)) != len(references)]
        if wrong:
            raise ValueError(f"add_significance: {len(references)} references, but the {decoding} translations of "
                             f"{', '.join(wrong)} have another length; pass the references of the test set the rows "
                             "were evaluated on")
        others = [r for r in rows if getattr(r, field) is not None and r is not rows[baseline]]
        if not others:
            continue
        systems = [rows[baseline]] + others
        labels = [r.model for r in systems]
        if len(set(labels)) != len(labels):
            labels = [f"{i}: {label}" for i, label in enumerate(labels)]
        scores, signatures = paired_test([(label, getattr(r, field)) for label, r in zip(labels, systems)],
                                         references, test=test, n_samples=n_samples, tokenize=tokenize)
        for row, s in zip(systems, scores):
            for metric in ("bleu", "chrf"):
                setattr(row, f"{metric}_{decoding}_ci", getattr(s, f"{metric}_ci"))
                setattr(row, f"{metric}_{decoding}_p_value", getattr(s, f"{metric}_p_value"))
            row.significance_baseline = rows[baseline].model
            row.significance_test = f"{_TESTS[test]}; {signatures['bleu']}"
    return results


# -------------------------------------------------------------------------------------------------- claims
@dataclass
class Claim:
    """The verdict of :func:`judge_claim`: ``verdict`` (:data:`HOLDS`, :data:`DOES_NOT_HOLD` or
    :data:`NOT_RESOLVED`), the mean score of each side over the seeds, their difference, the seed spread it was
    held against, the largest paired p-value over the seeds, and the number of seeds."""

    verdict: str
    mean_a: float
    mean_b: float
    difference: float
    spread: float
    p_value: float | None
    seeds: int

    def describe(self, unit: str = "BLEU") -> str:
        """E.g. ``"29.56 vs 26.83 (+2.73 BLEU, seed spread 0.40, 3 seeds, largest paired p = 0.001): holds"``."""
        seeds = f"{self.seeds} seed{'s' if self.seeds != 1 else ''}"
        p = (", no paired test" if self.p_value is None else
             f", {'largest ' if self.seeds > 1 else ''}paired p = {self.p_value:.3g}")
        return (f"{self.mean_a:.2f} vs {self.mean_b:.2f} ({self.difference:+.2f} {unit}, seed spread "
                f"{self.spread:.2f}, {seeds}{p}): {self.verdict}")


def _spread(values: Sequence[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else 0.0


def judge_claim(scores_a: Sequence[float], scores_b: Sequence[float], p_values: Sequence[float] | None = None, *,
                alpha: float = 0.05, min_seeds: int = 2) -> Claim:
    """Judge the claim "A scores higher than B" over training seeds (issue 20's rule).

    The seed spread is the larger of the two sides' ranges (max - min over the seeds). The claim *holds* when the
    mean difference is positive, larger than the spread, and the paired test of every seed's pair has
    ``p < alpha``; it *does not hold* when the same is true with A and B swapped; otherwise it is *not resolved at
    this size* (also with fewer than ``min_seeds`` seeds per side, whose spread is unknown).

    Args:
        scores_a, scores_b: the score (e.g. BLEU) of each seed's model of A and of B.
        p_values: the paired test's p-value of each seed's pair; ``None`` where no paired test applies (e.g. a
            difference of differences): the seeds alone decide.
        alpha: the significance level.
        min_seeds: seeds each side needs before a claim can be resolved.

    Raises:
        ValueError: no scores, or ``p_values`` of another length than the pairs.
    """
    scores_a, scores_b = [float(x) for x in scores_a], [float(x) for x in scores_b]
    if not scores_a or not scores_b:
        raise ValueError("judge_claim needs at least one score on each side")
    if not all(math.isfinite(x) for x in scores_a + scores_b):
        raise ValueError(f"judge_claim: scores must be finite numbers, got {scores_a} and {scores_b}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: the significance level must be between 0 and 1 (e.g. 0.05)")
    if p_values is not None:
        p_values = [float(p) for p in p_values]
        if not all(0 <= p <= 1 for p in p_values):  # also false for NaN
            raise ValueError(f"judge_claim: p-values must lie in [0, 1], got {p_values}")
    if p_values is not None and len(p_values) != min(len(scores_a), len(scores_b)):
        raise ValueError(f"judge_claim: {len(p_values)} p-values for {min(len(scores_a), len(scores_b))} seed pairs")
    mean_a, mean_b = statistics.fmean(scores_a), statistics.fmean(scores_b)
    difference, spread = mean_a - mean_b, max(_spread(scores_a), _spread(scores_b))
    p_max = max(p_values) if p_values else None
    resolved = (min(len(scores_a), len(scores_b)) >= min_seeds and (p_max is None or p_max < alpha)
                and abs(difference) > spread)
    verdict = NOT_RESOLVED if not resolved else HOLDS if difference > 0 else DOES_NOT_HOLD
    return Claim(verdict, mean_a, mean_b, difference, spread, p_max, min(len(scores_a), len(scores_b)))

