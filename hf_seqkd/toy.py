"""A small synthetic parallel corpus the package generates itself (tests and the offline demo; no download).

Sentences of an invented source language are translated into an invented target language by rules that a
real translation has too:

* word order changes (the adjective follows its noun in the source and precedes it in the target; the verb
  moves to the end, as in a German subordinate clause);
* every source word has several valid translations with skewed probabilities, and the reference picks one of
  them at random, so the corpus has several valid references per source pattern, as real data does. A model
  trained on the references learns the average of those choices; the teacher's beam search returns the mode.
  With independent word choices, though, the per-word mode *is* the sequence mode and a small student trained
  on the references learns it as well as one trained on the teacher's output (measured: same BLEU).
* ``alternative_order > 0`` adds what makes sequence-level KD (Kim & Rush 2016, Sec. 3.2) pay off: multimodality
  at the level of the whole sentence. With that probability the reference uses a second word order (the
  phrases in reverse order, the verb first), chosen per sentence. A student trained on the references has to
  learn two alignments of every source to its target; the teacher's beam search returns the majority order, so
  a student trained on the teacher's output learns one (used by the offline demo of ``recipes/seq_kd.py``).
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

__all__ = ["make_toy_corpus", "TOY_LEXICON"]

_SYLLABLES_SRC = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "del", "pri", "gun", "ha", "bel", "zor", "mek", "ti"]
_SYLLABLES_TGT = ["ba", "ne", "ri", "to", "sel", "am", "ku", "dor", "fi", "lan", "pe", "wis", "gor", "mu", "vet"]


def _words(rng: random.Random, syllables: list[str], count: int, used: set[str]) -> list[str]:
    out = []
    while len(out) < count:
        w = "".join(rng.choice(syllables) for _ in range(rng.choice([2, 2, 3])))
        if w not in used:
            used.add(w)
            out.append(w)
    return out


def _lexicon(seed: int = 1234, sizes=(("noun", 40), ("adj", 20), ("verb", 20), ("det", 3))):
    rng = random.Random(seed)
    used_src: set[str] = set()
    used_tgt: set[str] = set()
    lexicon = {}
    for cls, n in sizes:
        src = _words(rng, _SYLLABLES_SRC, n, used_src)
        entries = {}
        for w in src:
            k = rng.choice([1, 2, 3, 3])  # number of valid translations
            variants = _words(rng, _SYLLABLES_TGT, k, used_tgt)
            weights = [0.6, 0.25, 0.15][:k]
            total = sum(weights)
            entries[w] = (variants, [x / total for x in weights])
        lexicon[cls] = entries
    return lexicon


TOY_LEXICON = _lexicon()


def _translate_word(rng: random.Random, cls: str, word: str) -> str:
    variants, weights = TOY_LEXICON[cls][word]
    return rng.choices(variants, weights)[0]


def _sentence(rng: random.Random, alternative_order: float = 0.0) -> tuple[str, str]:
    lex = TOY_LEXICON
    nouns, adjs, verbs, dets = (list(lex[c]) for c in ("noun", "adj", "verb", "det"))
    src, phrases = [], []
    n_phrases = rng.choice([1, 2, 2, 3])
    verb = rng.choice(verbs)
    for i in range(n_phrases):
        det, noun = rng.choice(dets), rng.choice(nouns)
        adj = rng.choice(adjs) if rng.random() < 0.6 else None
        # source: det noun [adj]   target: det [adj] noun
        src += [det, noun] + ([adj] if adj else [])
        phrase = [_translate_word(rng, "det", det)] + ([_translate_word(rng, "adj", adj)] if adj else [])
        phrases.append(phrase + [_translate_word(rng, "noun", noun)])
        if i == 0:
            src.append(verb)  # source: the verb after the first phrase; target: at the end
    verb_tgt = _translate_word(rng, "verb", verb)
    if alternative_order and rng.random() < alternative_order:  # the second valid order: verb first, phrases reversed
        tgt = [verb_tgt] + [w for phrase in reversed(phrases) for w in phrase]
    else:
        tgt = [w for phrase in phrases for w in phrase] + [verb_tgt]
    return " ".join(src), " ".join(tgt)


def make_toy_corpus(num_train: int = 4000, num_test: int = 200, seed: int = 0, alternative_order: float = 0.0):
    """A ``DatasetDict`` with ``train``/``validation``/``test`` splits of ``source``/``target`` pairs.

    Test sources do not occur in training. Deterministic for a given seed.

    Args:
        num_train, num_test: sentences in the training split and in each of validation and test.
        seed: the random seed.
        alternative_order: probability that a reference uses the second word order (sentence-level
            multimodality, see the module docstring); ``0`` (default) keeps one order.
    """
    if not 0.0 <= alternative_order < 0.5:
        raise ValueError(f"alternative_order must be in [0, 0.5) so that the usual order stays the majority, "
                         f"got {alternative_order}")

    rng = random.Random(seed)
    splits = {"train": num_train, "validation": num_test, "test": num_test}
    seen: set[str] = set()
    out = {}
    for name, n in splits.items():
        sources, targets = [], []
        while len(sources) < n:
            s, t = _sentence(rng, alternative_order)
            if name != "train" and s in seen:
                continue
            if name == "train":
                seen.add(s)
            sources.append(s)
            targets.append(t)
        out[name] = Dataset.from_dict({"source": sources, "target": targets})
    return DatasetDict(out)
