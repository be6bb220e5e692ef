"""How sure a comparison is (issue 20): sacrebleu's paired tests, confidence intervals, claims judged over seeds."""

import importlib.util
import json
import os

import pytest
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from hf_seqkd.evaluation import EvaluationResult
from hf_seqkd.report import markdown_table
from hf_seqkd.significance import (
    DOES_NOT_HOLD,
    HOLDS,
    NOT_RESOLVED,
    add_significance,
    judge_claim,
    paired_test,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFERENCES = ["a man is riding a bike down the street", "two dogs play in the snow", "a girl in a red dress jumps",
              "people are waiting for the bus", "a woman is cooking in a kitchen", "the boy kicks a ball",
              "three men are working on a roof", "a child eats an ice cream"] * 5
GOOD = ["a man rides a bike down the street", "two dogs play in snow", "a girl in a red dress is jumping",
        "people wait for the bus", "a woman cooks in a kitchen", "the boy kicks the ball",
        "three men work on a roof", "a child is eating ice cream"] * 5
WORSE = ["a man on a bike", "dogs in the snow", "a girl jumps", "people and a bus", "a woman in a kitchen",
         "a boy and a ball", "men on a roof", "a child eats"] * 5


def _sacrebleu_direct(systems, test_type):
    """sacrebleu's own PairedTest, called here directly: the reference computation."""
    _, results = PairedTest([(n, list(h)) for n, h in systems], {"BLEU": BLEU(), "chrF": CHRF()}, [REFERENCES],
                            test_type=test_type, n_ar_confidence=0 if test_type == "ar" else -1)()
    bleu = next(k for k in results if k.startswith("BLEU"))
    chrf = next(k for k in results if k.startswith("chrF"))
    return results[bleu], results[chrf]


@pytest.mark.parametrize("test_type", ["bs", "ar"])
def test_paired_test_equals_sacrebleus_own(test_type):
    systems = [("good", GOOD), ("worse", WORSE), ("mixed", GOOD[:20] + WORSE[20:])]
    scores, signatures = paired_test(systems, REFERENCES, test=test_type)
    bleu, chrf = _sacrebleu_direct(systems, test_type)
    assert [s.name for s in scores] == ["good", "worse", "mixed"]
    for mine, b, c in zip(scores, bleu, chrf):
        assert (mine.bleu, mine.chrf) == pytest.approx((b.score, c.score))
        assert (mine.bleu_ci, mine.chrf_ci) == pytest.approx((b.ci, c.ci))
        assert (mine.bleu_p_value, mine.chrf_p_value) == (b.p_value, c.p_value)
    assert scores[0].bleu_p_value is None and scores[1].bleu_p_value < 0.01  # much worse: p near 0
    assert f"{test_type}:" in signatures["bleu"] and "seed:12345" in signatures["bleu"]
    json.dumps([vars(s) for s in scores])  # plain floats


@pytest.mark.parametrize("test_type", ["bs", "ar"])
def test_identical_systems_have_p_one_and_a_broken_copy_p_near_zero(test_type):
    broken = ["zzz qqq"] * len(GOOD)
    scores, _ = paired_test([("good", GOOD), ("copy", list(GOOD)), ("broken", broken)], REFERENCES, test=test_type)
    assert scores[1].bleu_p_value == scores[1].chrf_p_value == 1.0
    assert scores[1].bleu == scores[0].bleu
    assert scores[2].bleu_p_value <= 0.001 and scores[2].chrf_p_value <= 0.001


def test_an_equal_score_has_p_one_even_when_the_words_differ():
    # "carpet" and "rug" match no reference: the two systems score the same, so nothing tells them apart
    a = [h + " carpet" for h in GOOD]
    b = [h + " rug" for h in GOOD]
    for test_type in ("bs", "ar"):
        scores, _ = paired_test([("a", a), ("b", b)], REFERENCES, test=test_type)
        assert scores[0].bleu == scores[1].bleu and scores[1].bleu_p_value == 1.0


def test_paired_test_rejects_bad_input():
    with pytest.raises(ValueError, match="'bs'.*'ar'"):
        paired_test([("a", GOOD), ("b", WORSE)], REFERENCES, test="bootstrap")
    with pytest.raises(ValueError, match="at least one system"):
        paired_test([("a", GOOD)], REFERENCES)
    with pytest.raises(ValueError, match="'b' has 3 hypotheses but there are 40 references"):
        paired_test([("a", GOOD), ("b", WORSE[:3])], REFERENCES)
    with pytest.raises(ValueError, match="names must differ"):
        paired_test([("a", GOOD), ("a", WORSE)], REFERENCES)
    with pytest.raises(ValueError, match="non-empty list"):
        paired_test([("a", []), ("b", [])], [])
    with pytest.raises(ValueError, match="must be a list of strings"):
        paired_test([("a", GOOD), ("b", [None] * len(GOOD))], REFERENCES)
    with pytest.raises(ValueError, match="not a sacrebleu tokenizer"):
        paired_test([("a", GOOD), ("b", WORSE)], REFERENCES, tokenize="nope")
    with pytest.raises(ValueError, match="n_samples=-5"):
        paired_test([("a", GOOD), ("b", WORSE)], REFERENCES, n_samples=-5)


def _row(name, greedy, beam=None):
    return EvaluationResult(model=name, bleu_greedy=BLEU().corpus_score(greedy, [REFERENCES]).score,
                            hypotheses_greedy=list(greedy), hypotheses_beam=None if beam is None else list(beam))


def test_add_significance_fills_the_rows_against_the_named_baseline():
    rows = [_row("teacher", GOOD, GOOD), _row("student", WORSE, GOOD[:20] + WORSE[20:]), _row("no_hyps", WORSE)]
    rows[2].hypotheses_greedy = None
    add_significance(rows, REFERENCES, baseline="student")
    greedy_scores, _ = paired_test([("s", WORSE), ("t", GOOD)], REFERENCES)
    beam_scores, _ = paired_test([("s", GOOD[:20] + WORSE[20:]), ("t", GOOD)], REFERENCES)
    student, teacher = rows[1], rows[0]
    assert student.bleu_greedy_p_value is None and student.bleu_greedy_ci == pytest.approx(greedy_scores[0].bleu_ci)
    assert teacher.bleu_greedy_p_value == greedy_scores[1].bleu_p_value
    assert teacher.chrf_greedy_p_value == greedy_scores[1].chrf_p_value
    assert teacher.bleu_beam_p_value == beam_scores[1].bleu_p_value
    assert teacher.bleu_beam_ci == pytest.approx(beam_scores[1].bleu_ci)
    assert rows[2].bleu_greedy_ci is None and rows[2].significance_baseline is None  # no hypotheses: left alone
    assert teacher.significance_baseline == "student" and "paired bootstrap" in teacher.significance_test
    restored = EvaluationResult.from_dict(json.loads(json.dumps(teacher.to_dict())))
    assert restored.bleu_greedy_p_value == teacher.bleu_greedy_p_value
    assert restored.hypotheses_greedy == GOOD
    table = markdown_table(rows, ["model", "bleu_greedy", "bleu_greedy_p_value"])
    assert f"{student.bleu_greedy:.2f} ± {student.bleu_greedy_ci:.2f}" in table
    with pytest.raises(ValueError, match="baseline='nobody' is not one of the models compared"):
        add_significance(rows, REFERENCES, baseline="nobody")
    with pytest.raises(ValueError, match="39 references, but the greedy translations of teacher, student"):
        add_significance(rows, REFERENCES[:-1])


def test_judge_claim_on_hand_made_numbers():
    # the difference (+0.5) is inside the seed spread (1.0): not resolved, however small the p-values
    inside = judge_claim([30.0, 31.0, 30.5], [30.2, 29.8, 30.0], [0.001, 0.001, 0.001])
    assert inside.verdict == NOT_RESOLVED and inside.spread == pytest.approx(1.0)
    assert inside.difference == pytest.approx(0.5)
    # beyond the spread and every paired test agrees: holds; the other way round: does not hold
    assert judge_claim([32.0, 32.4, 32.2], [30.0, 30.3, 30.1], [0.001, 0.002, 0.01]).verdict == HOLDS
    assert judge_claim([30.0, 30.3, 30.1], [32.0, 32.4, 32.2], [0.001, 0.002, 0.01]).verdict == DOES_NOT_HOLD
    # one seed's paired test disagrees: not resolved
    assert judge_claim([32.0, 32.4, 32.2], [30.0, 30.3, 30.1], [0.001, 0.2, 0.01]).verdict == NOT_RESOLVED
    # one seed: its spread is unknown
    one = judge_claim([35.0], [30.0], [0.001])
    assert one.verdict == NOT_RESOLVED and "1 seed," in one.describe()
    assert judge_claim([35.0], [30.0], [0.001], min_seeds=1).verdict == HOLDS
    # no paired test applies: the seeds alone decide
    assert judge_claim([3.0, 3.2], [1.0, 1.1]).verdict == HOLDS
    assert "holds" in judge_claim([32.0, 32.4, 32.2], [30.0, 30.3, 30.1], [0.001, 0.002, 0.01]).describe()
    with pytest.raises(ValueError, match="2 p-values for 3 seed pairs"):
        judge_claim([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="p-values must lie in"):
        judge_claim([30.0, 31.0], [20.0, 21.0], [0.01, float("nan")])
    with pytest.raises(ValueError, match="alpha=5"):
        judge_claim([30.0, 31.0], [20.0, 21.0], [0.9, 0.9], alpha=5)
    with pytest.raises(ValueError, match="finite"):
        judge_claim([30.0, float("nan")], [20.0, 21.0])
    import numpy as np

    assert judge_claim(np.array([32.0, 32.4]), np.array([30.0, 30.3]), np.array([0.01, 0.01])).verdict == HOLDS


@pytest.fixture(scope="module")
def multi30k():
    spec = importlib.util.spec_from_file_location("bench_multi30k_sig", os.path.join(ROOT, "bench", "multi30k.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study_row(name, hypotheses):
    return {"model": name, "kind": "transformers", "bleu_greedy": BLEU().corpus_score(hypotheses, [REFERENCES]).score,
            "hypotheses_greedy": list(hypotheses)}


def test_study_claims_over_seeds(multi30k):
    # Seq-KD's seeds are far better than the baseline's: holds; the hybrid vs Word-KD: one seed's hybrid is better,
    # another's worse, the difference inside the spread: not resolved; the hybrid vs Seq-KD: clearly worse, so
    # "the hybrid beats both" does not hold
    half = GOOD[:20] + WORSE[20:]
    rows = {r["model"]: r for r in [
        _study_row("baseline", WORSE), _study_row("baseline_seed1", WORSE[:38] + GOOD[38:]),
        _study_row("seq_kd", GOOD), _study_row("seq_kd_seed1", GOOD[:36] + WORSE[36:]),
        _study_row("word_kd", half), _study_row("word_kd_seed1", GOOD[:24] + WORSE[24:]),
        _study_row("hybrid", GOOD[:24] + WORSE[24:]), _study_row("hybrid_seed1", half)]}
    claims = multi30k.Claims(rows, REFERENCES)
    assert list(claims.seeds("seq_kd")) == [-1, 1]
    seq = claims.claim("seq_kd", "baseline")
    assert seq.verdict == HOLDS and seq.seeds == 2
    expected_p = max(paired_test([("b", rows[b]["hypotheses_greedy"]), ("a", rows[a]["hypotheses_greedy"])],
                                 REFERENCES)[0][1].bleu_p_value
                     for a, b in (("seq_kd", "baseline"), ("seq_kd_seed1", "baseline_seed1")))
    assert seq.p_value == expected_p
    hybrid = claims.claim("hybrid", "word_kd")
    assert hybrid.verdict == NOT_RESOLVED and hybrid.difference == pytest.approx(0.0)
    findings = multi30k._findings(rows, REFERENCES)
    assert any(line.startswith("Seq-KD beats the baseline") and line.endswith(": holds.") for line in findings)
    hybrid_line = next(line for line in findings if line.startswith("The hybrid beats"))
    assert f"{NOT_RESOLVED}; against Seq-KD" in hybrid_line and hybrid_line.endswith(f"both: {DOES_NOT_HOLD}.")
    table = multi30k.seed_table(rows)
    assert "| seq_kd | 2 |" in table and "| baseline | 2 |" in table


def test_study_trains_the_seeded_stages_with_their_seed(multi30k, tmp_path):
    study = multi30k.Study("smoke", str(tmp_path / "study"), str(tmp_path / "data"))
    specs = dict(study.student_specs())
    assert specs["seq_kd_seed1"] == {**specs["seq_kd"], "seed": 1}
    assert "word_kd_seed1" not in specs  # not a seeded stage of this preset
    seeded = multi30k.Study("cpu", str(tmp_path / "cpu"), str(tmp_path / "data"),
                            {"seeded_stages": ("seq_kd", "seq_kd_seq_inter_word_kd")})
    specs = dict(seeded.student_specs())
    assert specs["seq_kd_seq_inter_word_kd_seed2"]["init"] == "seq_kd_seed2"  # fine-tunes its own seed's student
    args = seeded.training_args(str(tmp_path / "out"), 1, 1e-3, seed=2)
    assert args[args.index("--seed") + 1] == "2"
    args = seeded.training_args(str(tmp_path / "out"), 1, 1e-3)
    assert args[args.index("--seed") + 1] == "0"
    # the stage record keeps what changed outcomes in earlier runs
    study.run_stage("seq_kd_seed1", lambda: {})
    record = json.loads(open(study.marker("seq_kd_seed1")).read())
    assert record["settings"]["seed"] == 1 and record["settings"]["threads"] >= 1
    assert record["settings"]["corpus_backend"] == "ctranslate2"
    assert multi30k._settings_cell(record["settings"]).startswith(f"{record['settings']['threads']} thread(s), seed 1")


def test_study_report_and_results_json(multi30k, tmp_path):
    """The report of a (partial) study: stage settings, the seed table, the claims with their verdicts, and the
    results JSON for programs."""
    import gzip

    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / f"{multi30k.TEST_SPLIT}.en.gz", "wt") as f:
        f.write("\n".join(REFERENCES) + "\n")
    study = multi30k.Study("smoke", str(tmp_path / "study"), str(data))
    study.run_stage("seq_kd", lambda: {})
    study.run_stage("seq_kd_seed1", lambda: {})
    rows = [dict(_study_row(name, hyps), params=100, nonzero_params=100, test_sentences=len(REFERENCES),
                 bleu_signature="nrefs:1|tok:13a|version:2.6.0")
            for name, hyps in (("teacher", GOOD), ("baseline", WORSE), ("baseline_seed1", WORSE[:38] + GOOD[38:]),
                               ("seq_kd", GOOD), ("seq_kd_seed1", GOOD[:36] + WORSE[36:]))]
    (tmp_path / "study" / "report").mkdir()
    (tmp_path / "study" / "report" / "results.json").write_text(json.dumps(rows))
    text = multi30k.write_study_report(study, str(tmp_path / "report.md"), results_dir=str(tmp_path / "results"))
    assert "seed 1" in text and "corpus ctranslate2 float32" in text
    assert "| seq_kd | 2 |" in text
    assert "Seq-KD beats the baseline on greedy BLEU" in text and ": holds." in text
    saved = json.loads((tmp_path / "results" / "multi30k_smoke.json").read_text())
    assert saved["preset"] == "smoke" and [m["model"] for m in saved["models"]][:2] == ["teacher", "baseline"]
    assert saved["models"][1]["bleu_greedy"] == pytest.approx(rows[1]["bleu_greedy"])
    assert [s["stage"] for s in saved["stages"]] == ["seq_kd", "seq_kd_seed1"]
    assert saved["claims"] and saved["claims"][0].startswith("Seq-KD beats the baseline")


def test_seed_names(multi30k):
    assert multi30k.seed_group("baseline_seed1") == "baseline" and multi30k.seed_of("baseline_seed12") == 12
    for name in ("my_seedless_model", "x_seed", "x_seed²", "_seed1", "teacher"):
        assert multi30k.seed_group(name) == name and multi30k.seed_of(name) is None
    assert multi30k.seed_group("x_seed1_seed2") == "x_seed1"
    assert multi30k.seed_group(multi30k.seeded_name("hybrid", 2)) == "hybrid"
