"""Model comparison (hf_seqkd.report, recipes/evaluate.py) and pruning with retraining (recipes/prune.py)."""

import importlib.util
import json
import os
import struct

import numpy as np
import pytest
import sacrebleu
import torch
from transformers import AutoModelForSeq2SeqLM

from hf_seqkd import (
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    prepare_distillation_dataset,
    tiny_seq2seq_model,
    train_tokenizer,
)
from hf_seqkd.pruning import prune_model, weight_class
from hf_seqkd.report import (
    EvaluationResult,
    add_speedup,
    check_tokenizer,
    compare_models,
    ctranslate2_parameter_counts,
    evaluate_model,
    load_for_evaluation,
    parse_model_specs,
    plot_bleu_vs_speed,
    write_report,
)

from _helpers import load_recipe, write_split_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 24


# one torch thread for the whole module (module fixtures included): see tests/conftest.py
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def trained_dir(tokenizer, toy_corpus, tmp_path_factory):
    """A 2+2-layer Marian (d=32) trained for 60 steps on the toy corpus (no teacher), saved with its tokenizer."""
    model = tiny_seq2seq_model(tokenizer, "marian", d_model=32, encoder_layers=2, decoder_layers=2, seed=0)
    out = tmp_path_factory.mktemp("trained")
    args = DistillationTrainingArguments(output_dir=str(out / "run"), alpha=0.0, max_steps=60, learning_rate=5e-3,
                                         per_device_train_batch_size=32, report_to=[], save_strategy="no",
                                         use_cpu=True, disable_tqdm=True, seed=0)
    train = prepare_distillation_dataset(toy_corpus["train"], tokenizer)
    DistillationTrainer(model=model, args=args, train_dataset=train,
                        data_collator=DistillationDataCollator(tokenizer, model)).train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_dir(toy_corpus, tmp_path_factory):
    """The toy corpus as SPLIT.src / SPLIT.tgt files (small splits)."""
    folder = tmp_path_factory.mktemp("data")
    write_split_files(folder, toy_corpus, {"train": 64, "validation": 8, "test": 16})
    return folder


def _direct_counts(model):
    """(total, nonzero) over distinct parameters, counted here with torch."""
    params = dict(model.named_parameters())  # tied tensors once
    return (sum(p.numel() for p in params.values()),
            sum(int(torch.count_nonzero(p)) for p in params.values()))


def _prunable_sparsity(model):
    """Fraction of zeros among the trainable weight matrices (positions excluded), counted here."""
    weights = [p for n, p in model.named_parameters()
               if p.dim() >= 2 and p.requires_grad and weight_class(n) != "positions"]
    total = sum(p.numel() for p in weights)
    return 1 - sum(int(torch.count_nonzero(p)) for p in weights) / total, total


# ------------------------------------------------------------------------------------------------ library
def test_row_of_a_trained_and_a_pruned_model(trained_dir, toy_corpus, tmp_path):
    test = toy_corpus["test"].select(range(16))
    sources, refs = list(test["source"]), list(test["target"])
    model, tok, kind = load_for_evaluation(trained_dir)
    assert kind == "transformers"
    row = evaluate_model(model, tok, sources, refs, name="trained", path=trained_dir, num_beams=3, batch_size=64,
                         batch1_samples=3, max_new_tokens=MAX_NEW)

    # BLEU / chrF: sacrebleu on translations made here with generate (one batch, like batch_size=64 above)
    enc = tok(sources, return_tensors="pt", padding=True)
    for beams, key in ((1, "greedy"), (3, "beam")):
        with torch.no_grad():
            ids = model.generate(**enc, num_beams=beams, do_sample=False, max_new_tokens=MAX_NEW)
        hyps = [h.strip() for h in tok.batch_decode(ids, skip_special_tokens=True)]
        assert row[f"bleu_{key}"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
        assert row[f"chrf_{key}"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert row["bleu_greedy"] > 0  # trained: not a degenerate score

    # size on disk: the weight file, and every file of the folder
    assert row["size_bytes"] == os.path.getsize(trained_dir / "model.safetensors")
    assert row["size_mb"] == pytest.approx(row["size_bytes"] / 2**20)
    assert row["folder_bytes"] == sum(f.stat().st_size for f in trained_dir.iterdir() if f.is_file())
    # speeds and settings
    for key in ("greedy_batched", "beam_batched", "greedy_batch1", "beam_batch1"):
        assert row[f"sent_per_s_{key}"] > 0 and row[f"tok_per_s_{key}"] > row[f"sent_per_s_{key}"]
    assert (row["batch1_sentences"], row["test_sentences"], row["num_beams"], row["threads"]) == (3, 16, 3, 1)

    # a pruned model: non-zero parameters as counted directly with torch
    pruned = AutoModelForSeq2SeqLM.from_pretrained(trained_dir)
    prune_model(pruned, sparsity=0.7)
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "pruned")
    prow = evaluate_model(loaded, tok, sources[:4], refs[:4], num_beams=1, batch1_samples=0, max_new_tokens=8)
    total, nonzero = _direct_counts(loaded)
    assert (prow["params"], prow["nonzero_params"]) == (total, nonzero)
    assert nonzero < 0.5 * total and prow["sparsity"] == pytest.approx(1 - nonzero / total)
    assert prow["bleu_beam"] is None and prow["sent_per_s_greedy_batch1"] is None and prow["size_bytes"] is None


def test_ctranslate2_parameter_counts_read_model_bin(tmp_path):
    """A model.bin written in CTranslate2's layout: counts skip scalars, quantization scales and aliases."""
    def string(s):
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    def variable(name, array, type_id):
        data = array.tobytes()
        return (string(name) + struct.pack("<B", array.ndim) + b"".join(struct.pack("<I", d) for d in array.shape)
                + struct.pack("<B", type_id) + struct.pack("<I", len(data)) + data)

    variables = [
        variable("decoder/num_heads", np.array(2, dtype=np.int8), 1),  # scalar: left out
        variable("w32", np.array([[0.0, -0.0, 1.5], [2.0, 0.0, -3.0]], dtype=np.float32), 0),  # 6 values, 3 non-zero
        variable("w8/weight", np.array([[0, 5, -7, 0]], dtype=np.int8), 1),  # 4 values, 2 non-zero
        variable("w8/weight_scale", np.array([0.5], dtype=np.float32), 0),  # quantization scale: left out
        variable("w16", np.array([0.0, -0.0, 1.0], dtype=np.float16), 4),  # 3 values, 1 non-zero
    ]
    blob = struct.pack("<I", 6) + string("TransformerSpec") + struct.pack("<I", 7) + struct.pack("<I", len(variables))
    blob += b"".join(variables) + struct.pack("<I", 1) + string("alias/w32") + string("w32")
    (tmp_path / "model.bin").write_bytes(blob)
    assert ctranslate2_parameter_counts(tmp_path) == (13, 6)
    (tmp_path / "model.bin").write_bytes(struct.pack("<I", 3) + blob[4:])
    assert ctranslate2_parameter_counts(tmp_path) == (None, None)  # an unknown layout version


def test_speedup_is_relative_to_the_first_model():
    rows = [EvaluationResult(model="a", sent_per_s_greedy_batched=10.0, sent_per_s_greedy_batch1=2.0,
                             sent_per_s_beam_batched=4.0),
            EvaluationResult(model="b", sent_per_s_greedy_batched=35.0, sent_per_s_greedy_batch1=3.0),
            EvaluationResult(model="c", sent_per_s_greedy_batched=5.0, sent_per_s_greedy_batch1=None)]
    assert add_speedup(rows) is rows
    assert [r["speedup"] for r in rows] == [1.0, 3.5, 0.5]
    assert [r["speedup_batch1"] for r in rows] == [1.0, 1.5, None]
    # Kim & Rush's comparison: greedy over the reference's beam search
    assert [r["speedup_over_beam"] for r in rows] == [2.5, 8.75, 1.25]
    add_speedup(rows, reference=1)
    assert [r["speedup"] for r in rows] == pytest.approx([10 / 35, 1.0, 5 / 35])


def test_write_report_files_and_plot(tmp_path):
    rows = [{"model": "teacher", "kind": "transformers", "params": 74_000_000, "nonzero_params": 74_000_000,
             "bleu_greedy": 30.5, "bleu_beam": 31.0, "sent_per_s_greedy_batched": 12.0, "test_sentences": 100,
             "sent_per_s_beam_batched": 4.0,
             "batch_size": 32, "batch1_sentences": 20, "num_beams": 5, "threads": 2, "device": "cpu"},
            {"model": "student", "kind": "transformers", "params": 20_000_000, "nonzero_params": 4_000_000,
             "bleu_greedy": 28.25, "sent_per_s_greedy_batched": 60.0},
            {"model": "student-ct2", "kind": "ctranslate2", "bleu_greedy": 28.0, "sent_per_s_greedy_batched": 300.0},
            {"model": "broken", "bleu_greedy": None, "sent_per_s_greedy_batched": None}]
    rows = add_speedup([EvaluationResult.from_dict(r) for r in rows])
    paths = write_report(rows, tmp_path / "report")
    assert set(paths) == {"markdown", "json", "plot"}

    md = paths["markdown"].read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + len(rows)  # header, separator, one line per model
    for row, line in zip(rows, table[2:]):
        assert line.startswith(f"| {row['model']} |")
    assert "Speed-up" in table[0] and "| 5.00 |" in table[3]  # the student: 60 / 12
    assert any("first 20 sentences" in line for line in md)  # batch-1 timing is on a subset: said so
    assert json.loads(paths["json"].read_text()) == [r.to_dict() for r in rows]

    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, annotations = plot_bleu_vs_speed(rows)
    # one per model with values, and the teacher's beam search
    assert [a.get_text() for a in annotations] == ["teacher", "student", "student-ct2", "teacher, beam 5"]
    assert [tuple(a.xy) for a in annotations] == [(12.0, 30.5), (60.0, 28.25), (300.0, 28.0), (4.0, 31.0)]
    (scatter,) = fig.axes[0].collections
    np.testing.assert_allclose(scatter.get_offsets(), [[12.0, 30.5], [60.0, 28.25], [300.0, 28.0], [4.0, 31.0]])
    _, annotations = plot_bleu_vs_speed(rows, beam_models=[])
    assert [a.get_text() for a in annotations] == ["teacher", "student", "student-ct2"]
    assert fig.axes[0].get_xscale() == "log"


def test_plot_labels_of_crowded_points_do_not_overlap():
    """Many same-size students sit close together: every label still gets a place of its own inside the plot."""
    rows = [{"model": "teacher", "sent_per_s_greedy_batched": 57.0, "bleu_greedy": 32.6},
            {"model": "far_away_ct2_int8", "sent_per_s_greedy_batched": 170.0, "bleu_greedy": 32.8}]
    rows += [{"model": f"student_with_a_long_name_{i}", "sent_per_s_greedy_batched": 80.0 + 2.5 * i,
              "bleu_greedy": 22.0 + 0.6 * (i % 4)} for i in range(8)]
    fig, annotations = plot_bleu_vs_speed(rows)
    assert [a.get_text() for a in annotations] == [r["model"] for r in rows]
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    frame = fig.axes[0].get_window_extent(renderer)
    for a in annotations:
        a.update_positions(renderer)
    boxes = [Text.get_window_extent(a, renderer) for a in annotations]  # the text only, not its leader line
    for i, box in enumerate(boxes):
        name = annotations[i].get_text()
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name
        for j in range(i):
            assert not box.overlaps(boxes[j]), (name, annotations[j].get_text())


def test_parse_model_specs_and_bad_inputs(trained_dir, tokenizer, toy_corpus, tmp_path):
    assert parse_model_specs(["teacher=a/b", "x/y/student/", "ct2=/abs/c"]) == \
        [("teacher", "a/b"), ("student", "x/y/student/"), ("ct2", "/abs/c")]
    with pytest.raises(ValueError, match="twice"):
        parse_model_specs(["a=x", "a=y"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a Transformers model folder"):
        load_for_evaluation(tmp_path / "junk")
    with pytest.raises(ValueError, match="cannot load"):
        load_for_evaluation(tmp_path / "does-not-exist")
    # a tokenizer with more tokens than the model has embeddings
    big = train_tokenizer(list(toy_corpus["train"]["source"]) + list(toy_corpus["train"]["target"]), vocab_size=400)
    assert len(big) > len(tokenizer)
    with pytest.raises(ValueError, match="mismatched tokenizer"):
        load_for_evaluation(trained_dir, big)
    model = AutoModelForSeq2SeqLM.from_pretrained(trained_dir)
    check_tokenizer(model, tokenizer)  # the right one passes


def test_compare_models_times_batch1_beam_search_for_the_models_asked(trained_dir, toy_corpus):
    """``batch1_beam="first"``: only the reference model gets the (slow) beam-search run at batch size 1; every
    model keeps its greedy batch-1 timing and both batched runs."""
    test = toy_corpus["test"].select(range(6))
    common = dict(num_beams=2, batch1_samples=2, max_new_tokens=8, threads=1)
    models = [("a", str(trained_dir)), ("b", str(trained_dir))]
    rows = compare_models(models, test["source"], test["target"], batch1_beam="first", **common)
    assert rows[0]["sent_per_s_beam_batch1"] is not None and rows[1]["sent_per_s_beam_batch1"] is None
    for r in rows:
        assert r["sent_per_s_greedy_batch1"] is not None and r["bleu_beam"] is not None
    rows = compare_models(models[:1], test["source"], test["target"], batch1_beam="none", **common)
    assert rows[0]["sent_per_s_beam_batch1"] is None and rows[0]["sent_per_s_greedy_batch1"] is not None
    with pytest.raises(ValueError, match="batch1_beam='some'"):
        compare_models(models, test["source"], test["target"], batch1_beam="some", **common)


# ----------------------------------------------------------------------------------------- the recipes
def test_evaluate_recipe_on_transformers_and_ctranslate2(trained_dir, data_dir, tokenizer, toy_corpus, tmp_path):
    pytest.importorskip("ctranslate2")
    from hf_seqkd.export import to_ctranslate2

    ct2 = to_ctranslate2(trained_dir, tmp_path / "ct2_int8", quantization="int8")  # no tokenizer files in there
    evaluate = load_recipe("evaluate")
    out = tmp_path / "comparison"
    common = ["--dataset", str(data_dir), "--source_lang", "src", "--target_lang", "tgt", "--num_beams", "2",
              "--batch1_samples", "4", "--max_new_tokens", str(MAX_NEW), "--threads", "1", "--device", "cpu"]
    rows = evaluate.main(["--models", f"hf={trained_dir}", ct2, *common, "--output_dir", str(out)])

    assert [(r["model"], r["kind"]) for r in rows] == [("hf", "transformers"), ("ct2_int8", "ctranslate2")]
    hf, converted = rows
    assert hf["speedup"] == 1.0
    ratio = converted["sent_per_s_greedy_batched"] / hf["sent_per_s_greedy_batched"]
    assert converted["speedup"] == pytest.approx(ratio)
    assert converted["threads"] == hf["threads"] == 1  # CTranslate2 on as many threads as torch
    assert converted["size_bytes"] == os.path.getsize(os.path.join(ct2, "model.bin")) < hf["size_bytes"]
    assert 0 < converted["nonzero_params"] <= converted["params"]
    assert abs(converted["bleu_greedy"] - hf["bleu_greedy"]) < 0.3 * hf["bleu_greedy"] + 1  # int8: close
    for r in rows:
        assert r["test_sentences"] == 16 and r["batch1_sentences"] == 4 and r["bleu_beam"] is not None
    assert json.loads((out / "results.json").read_text()) == rows
    assert (out / "bleu_vs_speed.png").read_bytes()[:4] == b"\x89PNG"
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 and table[2].startswith("| hf |") and table[3].startswith("| ct2_int8 |")
    # issue 20: the comparison says how sure it is: sacrebleu's paired bootstrap against the first model, on the
    # hypotheses each model produced (kept in the results), the same numbers as sacrebleu's own PairedTest
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    references = [line for line in (data_dir / "test.tgt").read_text().splitlines()][:16]
    for decoding in ("greedy", "beam"):
        systems = [(r["model"], r[f"hypotheses_{decoding}"]) for r in rows]
        assert all(len(h) == 16 for _, h in systems)
        _, direct = PairedTest(systems, {"BLEU": BLEU(), "chrF": CHRF()}, [references], test_type="bs")()
        bleu_key = next(k for k in direct if k.startswith("BLEU"))
        assert hf[f"bleu_{decoding}_p_value"] is None and hf[f"bleu_{decoding}"] == direct[bleu_key][0].score
        assert hf[f"bleu_{decoding}_ci"] == pytest.approx(direct[bleu_key][0].ci)
        if systems[0][1] != systems[1][1]:
            assert converted[f"bleu_{decoding}_p_value"] == pytest.approx(direct[bleu_key][1].p_value)
        else:  # word for word the same: p = 1
            assert converted[f"bleu_{decoding}_p_value"] == 1.0
        assert converted[f"bleu_{decoding}_ci"] == pytest.approx(direct[bleu_key][1].ci)
    assert converted["significance_baseline"] == "hf" and "bs:1000" in converted["significance_test"]
    assert " ± " in table[2] and "95% confidence interval" in (out / "results.md").read_text()

    # a tokenizer that does not belong to the CTranslate2 model
    other = train_tokenizer(["qq rr ss tt uu vv ww"] * 50, vocab_size=60)
    other.save_pretrained(tmp_path / "other_tok")
    with pytest.raises(ValueError, match="does not match the CTranslate2 vocabulary"):
        evaluate.main(["--models", ct2, "--tokenizer", str(tmp_path / "other_tok"), *common,
                       "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="no tokenizer files"):  # nothing to take the tokenizer from
        evaluate.main(["--models", ct2, *common, "--output_dir", str(tmp_path / "x")])


def test_prune_recipe_prunes_retrains_and_saves(trained_dir, data_dir, tmp_path):
    prune = load_recipe("prune")
    out = tmp_path / "pruned"
    rows = prune.main([
        "--model_name_or_path", str(trained_dir), "--teacher_model_name_or_path", str(trained_dir), "--alpha", "0.5",
        "--sparsities", "0.5", "0.8", "--dataset", str(data_dir), "--source_lang", "src", "--target_lang", "tgt",
        "--max_steps", "4", "--per_device_train_batch_size", "16", "--learning_rate", "1e-2",
        "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm",
        "True", "--eval_num_beams", "1", "--max_new_tokens", str(MAX_NEW), "--output_dir", str(out)])

    assert [r["sparsity"] for r in rows] == [0.0, 0.5, 0.8]
    assert rows[0]["bleu_pruned"] is None and rows[0]["bleu_greedy"] > 0
    original = AutoModelForSeq2SeqLM.from_pretrained(trained_dir)
    for row, sparsity in zip(rows[1:], (0.5, 0.8)):
        folder = out / f"sparsity-{int(sparsity * 100)}"
        assert row["path"] == str(folder)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder)
        measured, total = _prunable_sparsity(model)
        assert abs(measured - sparsity) <= 1 / total + 1e-9
        assert row["measured_sparsity"] == pytest.approx(measured)
        assert (row["params"], row["nonzero_params"]) == _direct_counts(model)
        # the masks held through retraining: the weights pruning removes from the original are still zero, the
        # others moved
        reference = AutoModelForSeq2SeqLM.from_pretrained(trained_dir)
        masks = prune_model(reference, sparsity=sparsity, scope="class_blind")
        for name, mask in masks.items():
            weight = model.get_parameter(name).detach()
            assert (weight[~mask] == 0).all(), name
            assert not torch.equal(weight[mask], original.get_parameter(name).detach()[mask]), name
        assert row["bleu_pruned"] is not None and row["bleu_greedy"] is not None
        card = (folder / "README.md").read_text()
        assert "pruning" in card and f"{row['nonzero_params']:,}" in card and f"| sparsity | {sparsity:g} |" in card
        assert (folder / "tokenizer.json").is_file()
    assert json.loads((out / "results.json").read_text()) == rows


def test_prune_recipe_retrains_on_seqkd_targets(trained_dir, data_dir, tmp_path):
    """--kd_target teacher_target: the Seq-KD corpus is built (cached in --seqkd_cache_dir), then retraining."""
    prune = load_recipe("prune")
    rows = prune.main([
        "--model_name_or_path", str(trained_dir), "--teacher_model_name_or_path", str(trained_dir), "--alpha", "0",
        "--kd_target", "teacher_target", "--num_beams", "2",
        "--seqkd_cache_dir", str(tmp_path / "cache"), "--max_train_samples", "32", "--sparsities", "0.6",
        "--pruning_scope", "class_uniform", "--dataset", str(data_dir), "--source_lang", "src",
        "--target_lang", "tgt", "--max_steps", "2", "--per_device_train_batch_size", "16", "--save_strategy", "no",
        "--eval_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "True", "--eval_num_beams",
        "1", "--max_test_samples", "4", "--max_new_tokens", "8", "--output_dir", str(tmp_path / "pruned")])
    assert any((tmp_path / "cache").iterdir())  # the teacher's translations, cached
    assert [r["sparsity"] for r in rows] == [0.0, 0.6]
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "pruned" / "sparsity-60")
    assert abs(_prunable_sparsity(model)[0] - 0.6) < 0.01  # class_uniform: 60% of every class
    assert "kd_target | teacher_target" in (tmp_path / "pruned" / "sparsity-60" / "README.md").read_text()


def test_prune_recipe_rejects_bad_arguments(trained_dir, data_dir, tmp_path):
    prune = load_recipe("prune")
    base = ["--model_name_or_path", str(trained_dir), "--dataset", str(data_dir), "--source_lang", "src",
            "--target_lang", "tgt", "--output_dir", str(tmp_path / "p"), "--report_to", "none", "--use_cpu"]
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        prune.main(base + ["--alpha", "0", "--sparsities", "0.5", "1.0"])
    with pytest.raises(ValueError, match="--pruning_scope 'global'"):
        prune.main(base + ["--alpha", "0", "--pruning_scope", "global"])
    with pytest.raises(ValueError, match="needs --teacher_model_name_or_path"):
        prune.main(base + ["--sparsities", "0.5"])  # alpha defaults to 0.5: word-level KD
    with pytest.raises(ValueError, match="repeated"):
        prune.main(base + ["--alpha", "0", "--sparsities", "0.5", "0.5"])


@pytest.mark.parametrize("recipe, config", [("prune", "prune_opus_mt_student.yaml"),
                                            ("evaluate", "evaluate_opus_mt.yaml")])
def test_recipe_configs_parse(recipe, config):
    args = load_recipe(recipe).parse(["--config", os.path.join(ROOT, "recipes", "configs", config)])
    if recipe == "prune":
        prune_args, data_args, eval_args, training_args = args
        assert prune_args.sparsities == [0.5, 0.8, 0.9] and prune_args.pruning_scope == "class_blind"
        assert training_args.kd_target == "teacher_target" and training_args.alpha == 0.0
        assert training_args.max_steps == 5000 and training_args.seqkd_cache_dir == "out/seqkd_cache"
        assert eval_args.eval_num_beams == [1, 5] and data_args.source_lang == "de"
    else:
        comparison, data_args = args
        names = [name for name, _ in parse_model_specs(comparison.models)]
        assert names == ["teacher", "seqkd_student", "pruned_80", "seqkd_student_ct2_int8"]
        assert comparison.num_beams == 5 and comparison.batch1_samples == 200
        assert data_args.test_split == "test" and data_args.target_lang == "en"


def test_decode_speed_bench_pairs_rounds_and_counts_outputs_at_the_limit(trained_dir, data_dir, tokenizer,
                                                                         tmp_path, capsys):
    from hf_seqkd.evaluation import translate

    spec = importlib.util.spec_from_file_location("bench_decode_speed", os.path.join(ROOT, "bench", "decode_speed.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # speed-ups are paired within a round: reference seconds / model seconds, round by round
    assert bench.paired_speedups({"t": [2.0, 4.0], "s": [1.0, 8.0]}, "t") == {"t": [1.0, 1.0], "s": [2.0, 0.5]}
    assert [bench.rotate(list("abc"), r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]

    random_dir = tmp_path / "random"  # untrained: its translations tend to run to the length limit
    tiny_seq2seq_model(tokenizer, "marian", d_model=32, encoder_layers=2, decoder_layers=2, seed=1).save_pretrained(
        random_dir)
    tokenizer.save_pretrained(random_dir)
    limit, batch = 8, 8
    result = bench.main(["--models", f"trained={trained_dir}", f"random={random_dir}", "--data_dir", str(data_dir),
                "--split", "test", "--source_lang", "src", "--target_lang", "tgt", "--rounds", "2",
                "--batch1_sentences", "3", "--batched_sentences", "16", "--batch_size", str(batch),
                "--max_new_tokens", str(limit), "--threads", "1", "--beam_models", "trained", "--num_beams", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}
    assert list(rows) == ["trained", "random", "trained, beam 2"]
    assert rows["trained"][2] == rows["trained"][5] == "1.00 (1.00-1.00)"  # the reference against itself
    assert rows["trained, beam 2"][7] == rows["trained, beam 2"][8] == "1.00 (1.00-1.00)"  # ... and its beam search
    # the returned medians are the table's (for programs: the deploy study's JSON)
    assert result["reference"] == "trained" and result["reference_beam"] == "trained, beam 2"
    for label, cells in rows.items():
        got = result["rows"][label]
        assert f"{got['sent_per_s_batch1']:.2f}" == cells[0].split()[0]
        assert f"{got['speedup_batched']:.2f}" == cells[5].split()[0]
        assert f"{got['speedup_over_reference_beam_batch1']:.2f}" == cells[7].split()[0]
        assert got["at_limit"] == int(cells[6])
    with pytest.raises(SystemExit):  # a --beam_models name that is not among the models
        bench.main(["--models", f"trained={trained_dir}", "--beam_models", "teacher"])
    assert "--beam_models: teacher not among the --models names" in capsys.readouterr().err

    sources = (data_dir / "test.src").read_text().splitlines()[:16]
    for name, folder in (("trained", trained_dir), ("random", random_dir)):
        model, tok, _ = load_for_evaluation(folder)
        hypotheses, _ = translate(model, tok, sources, batch_size=batch, max_new_tokens=limit)
        lengths = [len(tok(text_target=h, add_special_tokens=False)["input_ids"]) for h in hypotheses]
        expected = sum(n >= limit - 1 for n in lengths)
        assert int(rows[name][6]) == expected, name
    assert expected > 0  # the random model does hit the limit, so the column is checked on a non-zero count


def test_decode_speed_step_cost_splits_a_sentence_into_its_first_step_and_each_further_step(trained_dir, data_dir,
                                                                                           capsys, monkeypatch):
    """--step_cost: each row also timed at batch 1 with one decoding step; the table's per-step cost is
    (t - t_first) / output tokens, recomputed here from the timed calls themselves."""
    import statistics

    spec = importlib.util.spec_from_file_location("bench_decode_speed", os.path.join(ROOT, "bench", "decode_speed.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []

    def recording(*args, **kwargs):
        out = bench_timed_decode(*args, **kwargs)
        calls.append((kwargs.get("batch_size"), kwargs.get("max_new_tokens"), len(args[2]), out))
        return out

    bench_timed_decode = bench.timed_decode
    monkeypatch.setattr(bench, "timed_decode", recording)
    result = bench.main(["--models", f"trained={trained_dir}", "--data_dir", str(data_dir), "--split", "test",
                         "--source_lang", "src", "--target_lang", "tgt", "--rounds", "3", "--batch1_sentences", "4",
                         "--batched_sentences", "8", "--batch_size", "4", "--max_new_tokens", "16", "--threads", "1",
                         "--step_cost"])
    calls = calls[1:]  # the untimed warm-up
    first = [out for batch, limit, n, out in calls if (batch, limit) == (1, 1)]
    whole = [out for batch, limit, n, out in calls if (batch, limit) == (1, 16)]
    assert len(first) == len(whole) == 3
    assert all(n == 4 for batch, limit, n, out in calls if batch == 1)  # the same --batch1_sentences
    assert all(k <= 1 for out in first for k in out["target_lengths"])  # one step: at most one token each
    row = result["rows"]["trained"]
    ms_whole = statistics.median(o["seconds"] for o in whole) * 1000 / 4
    ms_first = statistics.median(o["seconds"] for o in first) * 1000 / 4
    per_sentence = whole[0]["target_tokens"] / 4
    assert per_sentence > 1
    assert row["ms_per_sentence_batch1"] == pytest.approx(ms_whole)
    assert row["ms_first_step_batch1"] == pytest.approx(ms_first)
    # paired within each round: round r's whole translation less round r's first step
    further = statistics.median((w["seconds"] - f["seconds"]) * 1000 / 4 / per_sentence for w, f in zip(whole, first))
    assert row["ms_per_further_token_batch1"] == pytest.approx(further)
    assert "| trained | " in capsys.readouterr().out.split("ms per further output token")[1]


def test_the_machine_description_names_the_cpu_model_and_its_vector_instructions(monkeypatch):
    """Speed ratios differ between CPU models (bench/RESULTS.md), so the machine recorded beside them names it."""
    import platform

    from hf_seqkd.report import describe_machine

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    text = describe_machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            assert f", {models[0]} (" in text
    assert f"({torch.backends.cpu.get_cpu_capability()})" in text
    assert text.startswith(f"{platform.node()} {platform.machine()}, ")
    assert f"{os.cpu_count()} CPUs" in text and text.endswith(f"torch {torch.__version__} (3 threads)")
    assert describe_machine(threads=2) == text.replace("(3 threads)", "(2 threads)")  # a subprocess's threads
