"""Sequence-level KD data (Kim & Rush 2016, Sec. 3.2-3.3): build_seqkd_dataset and select_seq_inter."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sacrebleu
import torch
from datasets import Dataset

from hf_seqkd import tiny_seq2seq_model
from hf_seqkd.seqkd import make_length_batches, select_seq_inter

from _helpers import build

MAX_NEW = 24
BEAM = dict(num_beams=4, max_new_tokens=MAX_NEW, show_progress=False)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


def _train(model, tokenizer, corpus, steps=300, batch_size=32, lr=3e-3, seed=0):
    """A plain torch loop: a few hundred steps give the tiny Marian source-dependent, varied beams."""
    sources, targets = list(corpus["source"]), list(corpus["target"])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(sources), (batch_size,), generator=g).tolist()
        enc = tokenizer([sources[i] for i in idx], text_target=[targets[i] for i in idx], return_tensors="pt",
                        padding=True)
        labels = enc["labels"].masked_fill(enc["labels"] == tokenizer.pad_token_id, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def teacher(tokenizer, toy_corpus):
    model = tiny_seq2seq_model(tokenizer, "marian", d_model=32, encoder_layers=2, decoder_layers=2, seed=0)
    return _train(model, tokenizer, toy_corpus["train"])


@pytest.fixture(scope="module")
def data(toy_corpus):
    """40 unseen sources of varied length (3..~25 tokens) with references."""
    return toy_corpus["validation"]


def _count_calls(model, monkeypatch, fail_on_call=None):
    """Wrap model.generate: record each call's source lengths; raise on call number ``fail_on_call``."""
    calls = []
    original = model.generate

    def wrapper(*args, **kwargs):
        if fail_on_call is not None and len(calls) + 1 == fail_on_call:
            raise RuntimeError("injected failure")
        calls.append(kwargs["attention_mask"].sum(dim=1).tolist())
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", wrapper)
    return calls


def _direct(model, tokenizer, sources, num_beams=4, k=1):
    """Reference: one unpadded ``generate`` per sentence; returns (texts, scores, sequences) per sentence."""
    out = []
    with torch.inference_mode():
        for s in sources:
            o = model.generate(**tokenizer([s], return_tensors="pt"), num_beams=num_beams, num_return_sequences=k,
                               max_new_tokens=MAX_NEW, do_sample=False, length_penalty=1.0,
                               output_scores=True, return_dict_in_generate=True)
            texts = tokenizer.batch_decode(o.sequences, skip_special_tokens=True)
            scores = o.sequences_scores.tolist() if num_beams > 1 else None
            out.append((texts, scores, o.sequences))
    return out


def _teacher_forced_mean_logprob(model, tokenizer, source, sequence, eos_id):
    """Mean log p of the generated tokens up to and including the first </s>, by a plain forward pass."""
    generated = sequence[1:].tolist()  # drop the decoder start token
    generated = generated[: generated.index(eos_id) + 1]
    with torch.inference_mode():
        logits = model(**tokenizer([source], return_tensors="pt"),
                       decoder_input_ids=sequence[None, : len(generated)]).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[torch.arange(len(generated)), torch.tensor(generated)].mean().item()


# ---------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("sort_by_length", [True, False])
def test_matches_direct_generate_in_original_order(teacher, tokenizer, data, sort_by_length):
    out = build(data, teacher, tokenizer, batch_size=8, shard_size=16, sort_by_length=sort_by_length,
                              **BEAM)
    direct = _direct(teacher, tokenizer, data["source"])
    assert out["source"] == data["source"] and out["target"] == data["target"]
    assert out["teacher_target"] == [texts[0] for texts, _, _ in direct]
    assert out["teacher_score"] == pytest.approx([scores[0] for _, scores, _ in direct], abs=1e-5)
    # the outputs depend on the source (an order bug cannot hide behind identical translations)
    assert len(set(out["teacher_target"])) > 30
    # one padded, unsorted batch gives the same translations too: with attention masks padding changes the
    # floats only in the last bits (scores differ by ~1e-7 here), not the beams' choices
    enc = tokenizer(list(data["source"]), return_tensors="pt", padding=True)
    with torch.inference_mode():
        batch = teacher.generate(**enc, num_beams=4, max_new_tokens=MAX_NEW, length_penalty=1.0)
    assert tokenizer.batch_decode(batch, skip_special_tokens=True) == out["teacher_target"]


@pytest.mark.parametrize("num_beams", [4, 1])
def test_teacher_score_is_length_normalised_logprob(teacher, tokenizer, data, num_beams):
    rows = data.select(range(12))
    out = build(rows, teacher, tokenizer, num_beams=num_beams, max_new_tokens=MAX_NEW,
                              batch_size=5, show_progress=False)
    direct = _direct(teacher, tokenizer, rows["source"], num_beams=num_beams)
    eos = tokenizer.eos_token_id
    for source, got_text, got_score, (texts, _, seqs) in zip(rows["source"], out["teacher_target"],
                                                             out["teacher_score"], direct):
        assert got_text == texts[0]
        assert eos in seqs[0, 1:].tolist(), "the teacher should finish before max_new_tokens"
        expected = _teacher_forced_mean_logprob(teacher, tokenizer, source, seqs[0], eos)
        assert got_score == pytest.approx(expected, abs=1e-4)


def test_nbest_and_seq_inter(teacher, tokenizer, data):
    k = 3
    out = build(data, teacher, tokenizer, num_return_sequences=k, seq_inter=True, batch_size=8,
                              shard_size=16, **BEAM)
    direct = _direct(teacher, tokenizer, data["source"], k=k)
    assert out["teacher_nbest"] == [texts for texts, _, _ in direct]
    for got, (_, scores, _) in zip(out["teacher_nbest_scores"], direct):
        assert got == pytest.approx(scores, abs=1e-5)
        assert got == sorted(got, reverse=True)
    assert out["teacher_target"] == [n[0] for n in out["teacher_nbest"]]
    assert out["teacher_score"] == [s[0] for s in out["teacher_nbest_scores"]]
    # Seq-Inter: the K-best candidate with the highest smoothed sentence BLEU against the reference
    for nbest, ref, chosen in zip(out["teacher_nbest"], out["target"], out["seq_inter_target"]):
        bleu = [sacrebleu.sentence_bleu(c, [ref], smooth_method="exp").score for c in nbest]
        assert chosen in nbest and sacrebleu.sentence_bleu(chosen, [ref], smooth_method="exp").score == max(bleu)
    assert out["seq_inter_target"] != out["teacher_target"], "Seq-Inter should not always keep the 1-best"
    chrf = build(data.select(range(10)), teacher, tokenizer, num_return_sequences=k, seq_inter=True,
                               seq_inter_metric="chrf", **BEAM)
    for nbest, ref, chosen, scores in zip(chrf["teacher_nbest"], chrf["target"], chrf["seq_inter_target"],
                                          chrf["teacher_nbest_scores"]):
        assert chosen == select_seq_inter(nbest, ref, "chrf", scores)


def test_length_sorted_batches_and_token_budget(teacher, tokenizer, data, monkeypatch):
    calls = _count_calls(teacher, monkeypatch)
    unsorted = build(data, teacher, tokenizer, batch_size=8, shard_size=40, sort_by_length=False,
                                   **BEAM)
    unsorted_calls = list(calls)
    calls.clear()
    sorted_ = build(data, teacher, tokenizer, batch_size=8, shard_size=40, **BEAM)
    flat = [n for call in calls for n in call]
    assert flat == sorted(flat, reverse=True), "batches are formed longest first"
    assert all(len(call) <= 8 for call in calls)
    padded = lambda cs: sum(len(c) * max(c) for c in cs)  # noqa: E731
    assert padded(calls) < padded(unsorted_calls)
    assert sorted_["teacher_target"] == unsorted["teacher_target"]

    calls.clear()
    budget = 4 * 4 * 12  # 4 beams x 12 tokens x 4 sentences
    budgeted = build(data, teacher, tokenizer, batch_size=40, shard_size=40,
                                   max_tokens_per_batch=budget, **BEAM)
    assert all(len(c) * max(c) * 4 <= budget or len(c) == 1 for c in calls)
    assert max(len(c) for c in calls) > 4, "short sentences fill bigger batches"
    assert budgeted["teacher_target"] == unsorted["teacher_target"]


def test_make_length_batches():
    lengths = [3, 9, 5, 9, 1, 4]
    assert make_length_batches(lengths, batch_size=2) == [[1, 3], [2, 5], [0, 4]]
    assert make_length_batches(lengths, batch_size=4, sort_by_length=False) == [[0, 1, 2, 3], [4, 5]]
    # budget 20 with 2 beams: 9*2=18 fits one sentence; then 5,4 -> 2*5*2=20; then 3,1
    assert make_length_batches(lengths, batch_size=10, max_tokens_per_batch=20, num_beams=2) == [[1], [3], [2, 5],
                                                                                                  [0, 4]]
    assert make_length_batches([50], batch_size=4, max_tokens_per_batch=10) == [[0]]


def test_caller_teacher_left_as_it_was(teacher, tokenizer, data):
    model = copy.deepcopy(teacher).train()
    out = build(data.select(range(4)), model, tokenizer, num_beams=1, max_new_tokens=8,
                              dtype="float64", show_progress=False)
    assert len(out) == 4
    assert model.training and next(model.parameters()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- cache / resume


def test_cache_is_reused_and_keyed_by_inputs(teacher, tokenizer, data, tmp_path, monkeypatch):
    rows = data.select(range(12))
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.model.decoder.layers[1].fc2.bias[0] += 1e-3  # one value, deep inside
    calls = _count_calls(teacher, monkeypatch)
    first = build(rows, teacher, tokenizer, cache_dir=tmp_path, shard_size=5, **BEAM)
    assert len(calls) == 3
    (entry,) = os.listdir(tmp_path)
    assert len(entry) == 64 and (tmp_path / entry / "result.parquet").exists()

    calls.clear()
    again = build(rows, teacher, tokenizer, cache_dir=tmp_path, shard_size=5, **BEAM)
    assert calls == [] and again.to_dict() == first.to_dict()
    # batching settings are not part of the key: still cached
    build(rows, teacher, tokenizer, cache_dir=tmp_path, shard_size=7, batch_size=2, **BEAM)
    assert calls == []

    # every input that changes the output is: settings, sources, the teacher's weights
    build(rows, teacher, tokenizer, cache_dir=tmp_path, num_beams=3, max_new_tokens=MAX_NEW,
                        show_progress=False)
    assert len(calls) == 1
    build(rows, teacher, tokenizer, cache_dir=tmp_path, source_prefix="ka ", **BEAM)
    assert len(calls) == 2
    build(data.select(range(1, 13)), teacher, tokenizer, cache_dir=tmp_path, **BEAM)
    assert len(calls) == 3
    changed_calls = _count_calls(changed, monkeypatch)
    build(rows, changed, tokenizer, cache_dir=tmp_path, **BEAM)
    assert len(changed_calls) == 1
    assert len(os.listdir(tmp_path)) == 5
    # an explicit teacher fingerprint replaces hashing the weights
    changed_calls.clear()
    build(rows, changed, tokenizer, cache_dir=tmp_path, teacher_fingerprint="teacher-v1", **BEAM)
    build(rows, teacher, tokenizer, cache_dir=tmp_path, teacher_fingerprint="teacher-v1", **BEAM)
    assert len(changed_calls) == 1 and len(calls) == 3


def test_interrupted_run_resumes_from_finished_shards(teacher, tokenizer, data, tmp_path, monkeypatch):
    kwargs = dict(cache_dir=tmp_path, shard_size=16, batch_size=16, **BEAM)  # shards 0-16, 16-32, 32-40
    expected = build(data, teacher, tokenizer, shard_size=16, batch_size=16, **BEAM)

    _count_calls(teacher, monkeypatch, fail_on_call=3)  # one generate call per shard: dies in the third
    with pytest.raises(RuntimeError, match="injected failure"):
        build(data, teacher, tokenizer, **kwargs)
    (entry,) = tmp_path.iterdir()
    assert sorted(p.name for p in entry.glob("shard-*")) == ["shard-000000000-000000016.parquet",
                                                               "shard-000000016-000000032.parquet"]
    assert not (entry / "result.parquet").exists()

    monkeypatch.undo()
    calls = _count_calls(teacher, monkeypatch)
    resumed = build(data, teacher, tokenizer, **kwargs)
    assert len(calls) == 1 and len(calls[0]) == 8, "only the missing shard is generated"
    assert resumed.to_dict() == expected.to_dict()
    assert (entry / "result.parquet").exists()


@pytest.mark.slow
def test_two_processes_with_torchrun_equal_one_process(teacher, tokenizer, data, tmp_path):
    model_dir, out_dir, cache = tmp_path / "teacher", tmp_path / "out", tmp_path / "cache"
    out_dir.mkdir()
    tokenizer.save_pretrained(model_dir)
    teacher.save_pretrained(model_dir)
    rows = data.select(range(30))
    kwargs = dict(num_beams=4, num_return_sequences=2, max_new_tokens=MAX_NEW, shard_size=5, batch_size=4,
                  seq_inter=True)
    (tmp_path / "data.json").write_text(json.dumps({"columns": rows.to_dict(), "kwargs": kwargs}))
    worker = Path(__file__).with_name("_seqkd_torchrun_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         str(model_dir), str(tmp_path / "data.json"), str(cache), str(out_dir)],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    single = build(rows, teacher, tokenizer, show_progress=False, **kwargs).to_dict()
    for rank in (0, 1):
        got = json.loads((out_dir / f"result-{rank}.json").read_text())
        assert list(got) == list(single)
        for column in ("source", "target", "teacher_target", "teacher_nbest", "seq_inter_target"):
            assert got[column] == single[column], column
        assert got["teacher_score"] == pytest.approx(single["teacher_score"], abs=1e-5)
    # shard i (5 rows) went to process i % 2, and no row was translated twice
    roundtrip = tokenizer.batch_decode(tokenizer(list(rows["source"]))["input_ids"], skip_special_tokens=True)
    for rank in (0, 1):
        done = json.loads((out_dir / f"rows-{rank}.json").read_text())
        mine = [s for i, s in enumerate(roundtrip) if (i // 5) % 2 == rank]
        assert sorted(done) == sorted(mine)
    (entry,) = cache.iterdir()
    assert len(list(entry.glob("shard-*.parquet"))) == 6 and (entry / "result.parquet").exists()


# ---------------------------------------------------------------------------------------------- select_seq_inter


def test_select_seq_inter_picks_highest_sentence_bleu():
    ref = "the cat sat on the mat"
    nbest = ["a dog ran away", "the cat sat on a mat", "the cat sat on the mat", "cat mat"]
    assert select_seq_inter(nbest, ref) == "the cat sat on the mat"
    assert select_seq_inter(nbest, ref, return_index=True) == 2
    nbest = ["the cat sat", "a cat sat on the mat today", "the dog sat on the mat", "on the mat"]
    bleu = [sacrebleu.sentence_bleu(c, [ref], smooth_method="exp").score for c in nbest]
    assert select_seq_inter(nbest, ref, return_index=True) == bleu.index(max(bleu))


def test_select_seq_inter_ties_and_empty_candidates():
    ref = "a b c d"
    tied = ["a b x", "a b y", "a b z"]  # the same sentence BLEU
    assert select_seq_inter(tied, ref, return_index=True) == 0  # no scores: the beam's own order
    assert select_seq_inter(tied, ref, scores=[-1.5, -0.5, -0.9]) == "a b y"
    assert select_seq_inter(tied, ref, scores=[-0.5, -1.5, -0.5], return_index=True) == 0
    assert select_seq_inter(["", "a b"], ref) == "a b"
    assert select_seq_inter(["", ""], ref, scores=[-2.0, -1.0], return_index=True) == 1
    assert select_seq_inter(["x", ""], "", return_index=True) == 0
    with pytest.raises(ValueError, match="empty"):
        select_seq_inter([], ref)
    with pytest.raises(ValueError, match="metric"):
        select_seq_inter(["a"], ref, metric="ter")
    with pytest.raises(ValueError, match="scores"):
        select_seq_inter(["a", "b"], ref, scores=[0.0])


def test_select_seq_inter_chrf():
    ref = "unbelievable"
    nbest = ["xyz", "unbelievably"]  # no shared word: BLEU ties at 0, chrF sees the shared characters
    assert select_seq_inter(nbest, ref, "bleu") == "xyz"
    assert select_seq_inter(nbest, ref, "chrf") == "unbelievably"
    chrf = [sacrebleu.sentence_chrf(c, [ref]).score for c in nbest]
    assert chrf[1] > chrf[0]


# ---------------------------------------------------------------------------------------------- errors


def test_clear_errors(tiny_marian, tokenizer, data):
    with pytest.raises(ValueError, match=r"'src'.*\['source', 'target'\]"):
        build(data, tiny_marian, tokenizer, source_column="src")
    with pytest.raises(ValueError, match="num_return_sequences > 1"):
        build(data, tiny_marian, tokenizer, seq_inter=True)
    with pytest.raises(ValueError, match=r"target column 'ref'.*\['source', 'target'\]"):
        build(data, tiny_marian, tokenizer, seq_inter=True, num_return_sequences=2, target_column="ref")
    with pytest.raises(ValueError, match="seq_inter_metric"):
        build(data, tiny_marian, tokenizer, seq_inter=True, num_return_sequences=2,
                            seq_inter_metric="ter")
    with pytest.raises(ValueError, match="empty"):
        build(data.select([]), tiny_marian, tokenizer)
    with pytest.raises(ValueError, match="between 1 and num_beams=2"):
        build(data, tiny_marian, tokenizer, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="batch_size"):
        build(data, tiny_marian, tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        build(data, tiny_marian, tokenizer, max_tokens_per_batch=0)
    with pytest.raises(TypeError, match="dataset\\['train'\\]"):
        build({"train": data}, tiny_marian, tokenizer)
    with pytest.raises(ValueError, match="row 1 of column 'source'"):
        build(Dataset.from_dict({"source": ["a", None]}), tiny_marian, tokenizer)
    two_processes = SimpleNamespace(num_processes=2, process_index=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="cache_dir"):
        build(data, tiny_marian, tokenizer, accelerator=two_processes)


# ----------------------------------------------------------------------------- the cache key (fault 8 audit)
def test_cache_key_covers_every_tokenizer_setting_that_changes_the_source(family_snapshots, tmp_path):
    """Tokenizers whose vocabulary (``get_vocab``) stays the same while their encoding changes: a SentencePiece
    Marian tokenizer with another source model, an M2M100 tokenizer with another source language. A saved and
    reloaded tokenizer keeps its key, so caches survive reloading."""
    import shutil

    from transformers import AutoTokenizer

    from hf_seqkd.seqkd import _tokenizer_fingerprint

    marian = family_snapshots("marian")
    tok = AutoTokenizer.from_pretrained(marian)
    tok.save_pretrained(tmp_path / "again")
    assert _tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "again")) == _tokenizer_fingerprint(tok)
    other = tmp_path / "other_spm"
    shutil.copytree(marian, other)
    shutil.copy(os.path.join(marian, "target.spm"), other / "source.spm")  # another source segmentation
    swapped = AutoTokenizer.from_pretrained(other)
    assert swapped.get_vocab() == tok.get_vocab()
    text = "Der Mann liest ein Buch im Park."
    assert swapped(text)["input_ids"] != tok(text)["input_ids"]
    assert _tokenizer_fingerprint(swapped) != _tokenizer_fingerprint(tok)

    m2m = AutoTokenizer.from_pretrained(family_snapshots("m2m100"))
    m2m.src_lang = "de"
    german = _tokenizer_fingerprint(m2m)
    m2m.src_lang = "en"
    assert _tokenizer_fingerprint(m2m) != german


# ---------------------------------------------------------------------------------------------- corpus parts
def test_corpus_parts_built_apart_and_merged_equal_one_run(teacher, tokenizer, data, tmp_path, monkeypatch):
    """Machines without a shared file system: each builds its part (corpus_part='i/N'), the parts' folders are
    merged, and the corpus equals one run's; a merged folder is loaded without translating anything."""
    from hf_seqkd.seqkd import merge_seqkd_parts

    rows = data.select(range(20))
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=MAX_NEW, shard_size=3, batch_size=4,
                  seq_inter=True, show_progress=False)
    calls = _count_calls(teacher, monkeypatch)
    for i in (1, 2, 3):
        assert build(rows, teacher, tokenizer, cache_dir=tmp_path / f"machine{i}", corpus_part=f"{i}/3",
                     **kwargs) is None
    built = [sum(len(c) for c in calls)]
    (entry,) = (tmp_path / "machine2").iterdir()
    # 7 shards of 3 rows: shard j belongs to part j % 3 + 1
    assert sorted(p.name for p in entry.glob("shard-*")) == [f"shard-{s:09d}-{min(s + 3, 20):09d}.parquet"
                                                               for s in (3, 12)]
    with pytest.raises(ValueError, match=r"parts \[1, 3\] of 3 given"):
        merge_seqkd_parts([tmp_path / "machine1", tmp_path / "machine3"], tmp_path / "merged")
    build(rows, teacher, tokenizer, cache_dir=tmp_path / "other", corpus_part="2/3",
          **dict(kwargs, num_beams=4))
    with pytest.raises(ValueError, match="do not belong together"):
        merge_seqkd_parts([tmp_path / "machine1", tmp_path / "other", tmp_path / "machine3"], tmp_path / "merged")
    folder = merge_seqkd_parts([tmp_path / f"machine{i}" for i in (3, 1, 2)], tmp_path / "merged")
    assert (Path(folder) / "result.parquet").exists()

    calls.clear()
    merged = build(rows, teacher, tokenizer, cache_dir=tmp_path / "merged", **kwargs)
    assert calls == []  # loaded, not translated
    single = build(rows, teacher, tokenizer, **kwargs)
    assert merged.to_dict() == single.to_dict()
    assert built[0] == 20  # every row translated once over the three parts
    with pytest.raises(ValueError, match=r"corpus_part='3/2': expected 'i/N' with 1 <= i <= N"):
        build(rows, teacher, tokenizer, cache_dir=tmp_path / "x", corpus_part="3/2", **kwargs)
    with pytest.raises(ValueError, match="pass cache_dir"):
        build(rows, teacher, tokenizer, corpus_part="1/2", **kwargs)
    with pytest.raises(ValueError, match="holds no corpus part"):
        merge_seqkd_parts([tmp_path / "nothing"], tmp_path / "merged2")


def test_recipe_builds_corpus_parts_and_trains_from_the_merged_corpus(teacher, tokenizer, toy_corpus, tmp_path,
                                                                       monkeypatch):
    """``recipes/seq_kd.py --seqkd_corpus_part i/N`` on each "machine", ``python -m hf_seqkd.cli merge``, then the
    training run finds the whole corpus in the merged cache and translates nothing."""
    from transformers import GenerationMixin

    from hf_seqkd.cli import main as cli_main

    from _helpers import load_recipe, save_teacher_and_data

    recipe = load_recipe("seq_kd")
    save_teacher_and_data(tmp_path, teacher, tokenizer, toy_corpus, {"train": 24, "validation": 4, "test": 4})
    common = ["--teacher_model_name_or_path", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "data"),
              "--source_lang", "src", "--target_lang", "tgt", "--kd_target", "teacher_target", "--alpha", "0",
              "--num_beams", "2", "--max_new_tokens", "16", "--student_encoder_layers", "1",
              "--student_decoder_layers", "1", "--max_steps", "1", "--per_device_train_batch_size", "8",
              "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
              "--use_cpu", "true", "--test_split", "none", "--dataloader_num_workers", "0"]
    for i in (1, 2):
        out = recipe.main(common + ["--seqkd_corpus_part", f"{i}/2", "--seqkd_cache_dir", str(tmp_path / f"m{i}"),
                                    "--output_dir", str(tmp_path / f"out{i}")])
        assert out is None and not (tmp_path / f"out{i}" / "config.json").exists()  # no student trained
    cli_main(["merge", str(tmp_path / "m1"), str(tmp_path / "m2"), "--into", str(tmp_path / "merged")])

    def no_generate(*args, **kwargs):
        raise AssertionError("the merged corpus should have been loaded, not translated")

    monkeypatch.setattr(GenerationMixin, "generate", no_generate)
    recipe.main(common + ["--seqkd_cache_dir", str(tmp_path / "merged"), "--output_dir", str(tmp_path / "student")])
    assert (tmp_path / "student" / "config.json").exists()


def test_corpus_part_settings_are_checked(tmp_path, tiny_marian):
    from hf_seqkd import DistillationTrainer

    from _helpers import training_args

    with pytest.raises(ValueError, match=r"corpus_part='0/2': expected 'i/N'"):
        training_args(tmp_path, seqkd_corpus_part="0/2")
    with pytest.raises(ValueError, match="corpus_part='two': expected"):
        training_args(tmp_path, seqkd_corpus_part="two")
    with pytest.raises(ValueError, match="builds one part of the Seq-KD corpus and stops"):
        DistillationTrainer(model=tiny_marian, args=training_args(tmp_path, seqkd_corpus_part="1/2", alpha=0.0))
