"""The synthetic corpus: deterministic, and the sentence-level multimodality of ``alternative_order``."""

import pytest

from hf_seqkd import make_toy_corpus
from hf_seqkd.toy import TOY_LEXICON


def _verb_translations():
    return {variant for variants, _ in TOY_LEXICON["verb"].values() for variant in variants}


def test_deterministic_and_default_has_one_order():
    a, b = make_toy_corpus(300, 20, seed=3), make_toy_corpus(300, 20, seed=3, alternative_order=0.0)
    assert a["train"]["target"] == b["train"]["target"] and a["test"]["source"] == b["test"]["source"]
    verbs = _verb_translations()
    # one order: the verb's translation always ends the reference, never starts it
    assert all(t.split()[-1] in verbs and t.split()[0] not in verbs for t in a["train"]["target"])


def test_alternative_order_is_a_second_valid_order_at_the_given_rate():
    corpus = make_toy_corpus(3000, 20, seed=0, alternative_order=0.4)
    verbs = _verb_translations()
    flipped = [t.split()[0] in verbs for t in corpus["train"]["target"]]
    assert abs(sum(flipped) / len(flipped) - 0.4) < 0.03
    for source, target, is_flipped in zip(corpus["train"]["source"], corpus["train"]["target"], flipped):
        words = target.split()
        assert (words[-1] in verbs) != is_flipped  # the verb is either first or last
        assert len(words) == len(source.split())  # same words, another order
    with pytest.raises(ValueError, match="alternative_order"):
        make_toy_corpus(10, 2, alternative_order=0.5)
