"""load_parallel_data: every input format, and a clear error for each kind of bad input."""

import gzip
import json
import logging

import pytest
import torch

from hf_seqkd import DataError, DistillationDataCollator, load_parallel_data, prepare_distillation_dataset


def _write(path, lines, gz=False):
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return str(path)


def test_folder_of_plain_and_gzipped_files(tmp_path):
    _write(tmp_path / "train.de.gz", ["ein Hund", "eine Katze", "ein Haus"], gz=True)
    _write(tmp_path / "train.en.gz", ["a dog", "a cat", "a house"], gz=True)
    _write(tmp_path / "val.de", ["ein Baum"])
    _write(tmp_path / "val.en", ["a tree"])
    _write(tmp_path / "test_2016_flickr.de", ["ein Mann"])
    _write(tmp_path / "test_2016_flickr.en", ["a man"])
    data = load_parallel_data(str(tmp_path), source_lang="de", target_lang="en")
    assert sorted(data) == ["test_2016_flickr", "train", "validation"]
    assert data["train"]["source"] == ["ein Hund", "eine Katze", "ein Haus"]
    assert data["train"]["target"] == ["a dog", "a cat", "a house"]
    assert data["validation"][0] == {"source": "ein Baum", "target": "a tree"}


def test_mapping_of_file_pairs_tsv_and_jsonl(tmp_path):
    src = _write(tmp_path / "a.de", ["eins", "zwei"])
    tgt = _write(tmp_path / "a.en", ["one", "two"])
    tsv = _write(tmp_path / "b.tsv", ["drei\tthree", "vier\tfour"])
    jsonl = _write(tmp_path / "c.jsonl", [json.dumps({"translation": {"de": "fünf", "en": "five"}}),
                                          json.dumps({"translation": {"de": "sechs", "en": "six"}})])
    data = load_parallel_data({"train": (src, tgt), "validation": tsv, "test": jsonl}, source_lang="de",
                              target_lang="en")
    assert data["train"]["target"] == ["one", "two"]
    assert data["validation"]["source"] == ["drei", "vier"]
    assert data["test"][0] == {"source": "fünf", "target": "five"}
    plain = load_parallel_data(_write(tmp_path / "d.jsonl", [json.dumps({"source": "x", "target": "y"})]))
    assert plain["train"][0] == {"source": "x", "target": "y"}


def test_hub_dataset_translation_column(monkeypatch):
    import datasets
    from datasets import Dataset, DatasetDict

    fake = DatasetDict({"train": Dataset.from_dict({"translation": [{"de": "hallo", "en": "hello"},
                                                                    {"de": "welt", "en": "world"}]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: fake)
    data = load_parallel_data("someone/wmt-like", source_lang="de", target_lang="en")
    assert data["train"]["source"] == ["hallo", "welt"] and data["train"]["target"] == ["hello", "world"]
    with pytest.raises(DataError, match=r"missing key\(s\) \['fr'\]"):
        load_parallel_data("someone/wmt-like", source_lang="de", target_lang="fr")


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    src = _write(tmp_path / "train.de", ["a", "b", "c"])
    tgt = _write(tmp_path / "train.en", ["a", "b"])
    with pytest.raises(DataError, match=r"train\.de has 3 lines but .*train\.en has 2"):
        load_parallel_data({"train": (src, tgt)})


def test_invalid_utf8_names_file_and_line(tmp_path):
    (tmp_path / "train.de").write_bytes(b"gut\nschlecht \xff\xfe\n")
    _write(tmp_path / "train.en", ["good", "bad"])
    with pytest.raises(DataError, match=r"train\.de, line 2: invalid UTF-8"):
        load_parallel_data(str(tmp_path), source_lang="de", target_lang="en")


def test_missing_jsonl_keys_and_bad_json(tmp_path):
    path = _write(tmp_path / "x.jsonl", [json.dumps({"translation": {"de": "a", "en": "b"}})])
    with pytest.raises(DataError, match=r"x\.jsonl, line 1: missing key"):
        load_parallel_data(path, source_lang="de", target_lang="fr")
    bad = _write(tmp_path / "y.jsonl", ["{not json"])
    with pytest.raises(DataError, match=r"y\.jsonl, line 1: invalid JSON"):
        load_parallel_data(bad)


def test_missing_files_and_bad_tsv(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_parallel_data(str(tmp_path / "nope.tsv"))
    tsv = _write(tmp_path / "z.tsv", ["only one field"])
    with pytest.raises(DataError, match=r"z\.tsv, line 1: expected at least 2 tab-separated fields"):
        load_parallel_data(tsv)
    _write(tmp_path / "train.de", ["a"])
    with pytest.raises(DataError, match="no en counterpart"):
        load_parallel_data(str(tmp_path), source_lang="de", target_lang="en")


def test_empty_lines_dropped_with_a_count(tmp_path, caplog):
    src = _write(tmp_path / "a.de", ["eins", "", "drei", "vier"])
    tgt = _write(tmp_path / "a.en", ["one", "two", "   ", "four"])
    with caplog.at_level(logging.WARNING):
        data = load_parallel_data({"train": (src, tgt)})
    assert data["train"]["source"] == ["eins", "vier"]
    assert "dropped 2 pair(s)" in caplog.text


def test_tokenization_truncation_prefix_and_kd_target(tokenizer, caplog):
    from datasets import Dataset

    ds = Dataset.from_dict({"source": ["ka lo " * 30, "mi"], "target": ["ba ne", "ri"],
                            "teacher_target": ["to", "sel am"]})
    with caplog.at_level(logging.WARNING):
        out = prepare_distillation_dataset(ds, tokenizer, max_source_length=8, target_column="teacher_target",
                                           source_prefix="tu ", teacher_labels_column="teacher_target")
    assert "1 of 2 sources reached 8 tokens and were truncated" in caplog.text
    assert len(out[0]["input_ids"]) == 8 and out[0]["input_ids"][-1] == tokenizer.eos_token_id
    assert out[1]["input_ids"] == tokenizer("tu mi")["input_ids"]
    assert out[1]["labels"] == tokenizer(text_target="sel am")["input_ids"]
    batch = DistillationDataCollator(tokenizer)([out[0], out[1]])
    assert batch["teacher_labels"].shape[0] == 2 and (batch["teacher_labels"] == -100).any()
    mixed = prepare_distillation_dataset(ds, tokenizer, target_column="teacher_target", gold_mix_ratio=1.0)
    assert mixed[0]["labels"] == tokenizer(text_target="ba ne")["input_ids"]
    with pytest.raises(DataError, match="column 'seq_inter_target' not in the dataset"):
        prepare_distillation_dataset(ds, tokenizer, target_column="seq_inter_target")


def test_collator_pads_on_the_right_whatever_the_tokenizer_says(tokenizer, tiny_marian, toy_corpus):
    """A tokenizer saved with padding_side='left' must not produce left-padded labels (the decoder would read
    padding right after its start token) or left-padded sources (shifted absolute positions)."""
    data = prepare_distillation_dataset(toy_corpus["train"].select(range(6)), tokenizer)
    features = [data[i] for i in range(6)]
    right = DistillationDataCollator(tokenizer, model=tiny_marian)(features)
    tokenizer.padding_side = "left"
    try:
        left = DistillationDataCollator(tokenizer, model=tiny_marian)(features)
    finally:
        tokenizer.padding_side = "right"
    for key in right:
        assert torch.equal(left[key], right[key]), key
    first = features[0]["input_ids"]
    assert right["input_ids"][0, :len(first)].tolist() == first  # the sentence starts at position 0
