"""The recipes as a user runs them: their YAML configs parse, and recipes/seq_kd.py works end to end (tiny demo,
Seq-KD cache reuse, the staged Seq-KD -> Seq-Inter + Word-KD student)."""

import enum
import glob
import json
import os
import re
import socket
import time

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM, GenerationMixin

from _helpers import load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "recipes", "configs")
# configs of other recipes (recipes/prune.py, recipes/evaluate.py) are tested with them
CONFIGS = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))
                 if not os.path.basename(p).startswith(("prune_", "evaluate_")))
EXPECTED_CONFIGS = {"opus_mt_de_en.yaml", "opus_mt_de_en_stage2_seq_inter.yaml", "t5_small_from_base.yaml",
                    "nllb_600m_de_en.yaml", "m2m100_418m_en_de.yaml",
                    "word_kd_opus_mt_de_en.yaml"}


def recipe_of(config_path):
    """The recipe a config belongs to, from its usage line `recipes/NAME.py --config recipes/configs/FILE`."""
    text = open(config_path).read()
    found = re.findall(r"recipes/(\w+)\.py --config recipes/configs/" + re.escape(os.path.basename(config_path)),
                       text)
    assert found, f"{config_path} has no usage line 'recipes/<recipe>.py --config recipes/configs/<this file>'"
    assert len(set(found)) == 1, f"{config_path} names several recipes: {found}"
    return found[0]


class _Parsed(Exception):
    def __init__(self, parsed):
        self.parsed = parsed


@pytest.fixture
def offline_parse(monkeypatch):
    """``parse(recipe, argv)``: the dataclasses the recipe's own ``main`` parses from ``argv``, and nothing more.

    The recipe's ``parse_args`` is wrapped to stop right after parsing (no model or data is loaded); sockets
    refuse to connect (parsing must not touch the network), and bf16 is allowed without a GPU (the configs are
    for GPUs; transformers refuses ``bf16=True`` on a CPU-only machine otherwise).
    """
    import transformers.training_args

    import hf_seqkd.config

    def no_network(*args, **kwargs):
        raise AssertionError("parsing a config tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)
    monkeypatch.setattr(hf_seqkd.config, "is_torch_bf16_gpu_available", lambda *a, **k: True)  # hf_seqkd's check

    def parse(recipe_name, argv):
        recipe = load_recipe(recipe_name)
        real = recipe.parse_args

        def parse_and_stop(dataclass_types, args=None):
            raise _Parsed(real(dataclass_types, args))

        monkeypatch.setattr(recipe, "parse_args", parse_and_stop)
        with pytest.raises(_Parsed) as stopped:
            recipe.main(argv)
        return stopped.value.parsed

    return parse


def field_value(parsed, name):
    owners = [obj for obj in parsed if name in getattr(obj, "__dataclass_fields__", {})]
    assert len(owners) == 1, f"{name} is a field of {len(owners)} of the parsed dataclasses"
    return getattr(owners[0], name)


def same(parsed_value, yaml_value):
    if isinstance(parsed_value, enum.Enum):
        parsed_value = parsed_value.value
    if isinstance(yaml_value, bool) or yaml_value is None:
        return parsed_value is yaml_value
    if isinstance(yaml_value, (int, float)):
        return not isinstance(parsed_value, (str, bool)) and parsed_value == pytest.approx(yaml_value)
    if isinstance(yaml_value, list):
        return list(parsed_value) == yaml_value
    if yaml_value == "none" and parsed_value in ([], ["none"], "none"):  # report_to: none
        return True
    return parsed_value == yaml_value


def test_the_configs_are_there():
    assert EXPECTED_CONFIGS <= {os.path.basename(p) for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_config_parses_with_its_recipe(config, offline_parse):
    values = yaml.safe_load(open(config))
    parsed = offline_parse(recipe_of(config), ["--config", config])
    for key, value in values.items():
        assert same(field_value(parsed, key), value), \
            f"{os.path.basename(config)}: {key} parsed as {field_value(parsed, key)!r}, the file says {value!r}"
    assert {"teacher_model_name_or_path", "dataset", "output_dir"} <= set(values)


def test_the_configs_say_what_the_issue_asks(offline_parse):
    def parse(name):
        return offline_parse(recipe_of(os.path.join(CONFIG_DIR, name)), ["--config", os.path.join(CONFIG_DIR, name)])

    stage1 = parse("opus_mt_de_en.yaml")
    assert field_value(stage1, "teacher_model_name_or_path") == "Helsinki-NLP/opus-mt-de-en"
    assert field_value(stage1, "kd_target") == "teacher_target"
    assert field_value(stage1, "num_beams") == 5
    assert field_value(stage1, "bf16") is True
    assert field_value(stage1, "student_decoder_layers") < 6  # a student, not a copy of the teacher

    stage2 = parse("opus_mt_de_en_stage2_seq_inter.yaml")
    assert field_value(stage2, "kd_target") == "seq_inter_target"
    assert field_value(stage2, "num_return_sequences") == 35 and field_value(stage2, "num_beams") >= 35
    assert field_value(stage2, "alpha") == 0.5
    assert field_value(stage2, "init_student_from") == field_value(stage1, "output_dir")  # continues stage 1
    assert field_value(stage2, "learning_rate") < field_value(stage1, "learning_rate")
    for same_data in ("dataset", "dataset_config", "source_lang", "target_lang", "max_train_samples",
                      "max_source_length", "max_new_tokens", "seqkd_cache_dir", "teacher_model_name_or_path"):
        assert field_value(stage2, same_data) == field_value(stage1, same_data), same_data

    t5 = parse("t5_small_from_base.yaml")
    assert field_value(t5, "teacher_model_name_or_path") == "google-t5/t5-base"
    assert field_value(t5, "source_prefix") == "translate English to German: "
    assert (field_value(t5, "source_lang"), field_value(t5, "target_lang")) == ("en", "de")
    assert field_value(t5, "student_init") == "config" and field_value(t5, "student_d_model") == 512

    word_kd = parse("word_kd_opus_mt_de_en.yaml")
    assert field_value(word_kd, "kd_target") == "target" and field_value(word_kd, "alpha") > 0


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_command_line_flags_win_over_the_config(config, offline_parse, tmp_path):
    values = yaml.safe_load(open(config))
    recipe = recipe_of(config)
    out = str(tmp_path / "elsewhere")
    parsed = offline_parse(recipe, ["--config", config, "--learning_rate", "1.25e-05", "--output_dir", out])
    assert field_value(parsed, "learning_rate") == pytest.approx(1.25e-05) != values["learning_rate"]
    assert field_value(parsed, "output_dir") == out
    assert same(field_value(parsed, "teacher_model_name_or_path"), values["teacher_model_name_or_path"])
    # before --config as well
    parsed = offline_parse(recipe, ["--alpha", "0.25", "--bf16", "false", "--config", config])
    assert field_value(parsed, "alpha") == 0.25 and field_value(parsed, "bf16") is False


def test_unknown_key_in_a_config_is_an_error_naming_it(offline_parse, tmp_path):
    config = os.path.join(CONFIG_DIR, "opus_mt_de_en.yaml")
    bad = tmp_path / "typo.yaml"
    bad.write_text(open(config).read() + "\nlearnig_rate: 1.0e-4\n")
    with pytest.raises(ValueError, match=r"typo\.yaml: unknown key\(s\) \['learnig_rate'\]"):
        offline_parse("seq_kd", ["--config", str(bad)])
    # also when its value is null (a null value is otherwise skipped)
    bad.write_text(open(config).read() + "\nmax_train_sample:\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_train_sample'\]"):
        offline_parse("seq_kd", ["--config", str(bad)])
    # a prefix of a real option is not taken for it (argparse abbreviations)
    bad.write_text(open(config).read() + "\nalph: 0.3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['alph'\]"):
        offline_parse("seq_kd", ["--config", str(bad)])


@pytest.mark.parametrize("config", ["opus_mt_de_en.yaml", "word_kd_opus_mt_de_en.yaml"])
def test_unknown_flag_is_an_error_naming_it(config, offline_parse):
    recipe, config = "seq_kd", os.path.join(CONFIG_DIR, config)
    with pytest.raises(ValueError, match=r"unknown option\(s\): \['--not_a_flag', '1'\]"):
        offline_parse(recipe, ["--config", config, "--not_a_flag", "1"])
    with pytest.raises(ValueError, match=r"unknown option\(s\): \['--learning_rat'"):  # no abbreviations
        offline_parse(recipe, ["--config", config, "--learning_rat", "0.1"])
    with pytest.raises(ValueError, match=r"unknown option\(s\): \['--nbest_size'"):  # renamed num_return_sequences
        offline_parse(recipe, ["--config", config, "--nbest_size", "35"])


# ---------------------------------------------------------------------------------------------------------------
# recipes/seq_kd.py end to end, on the tiny offline demo (about 30 s on 2 CPU cores, one torch thread: two
# threads on a busy 2-core machine spin-wait for each other and took 5x longer)


def test_demo_options_are_checked():
    recipe = load_recipe("seq_kd")
    with pytest.raises(ValueError, match="--demo takes only --demo_size"):
        recipe.main(["--demo", "--demo-size", "tiny"])  # a misspelt option would otherwise run the full demo
    with pytest.raises(ValueError, match="--demo takes only --demo_size"):
        recipe.main(["--demo", "--demo_size"])


@pytest.mark.parametrize("argv, size, work_dir", [([], "full", None), (["--demo"], "full", None),
                                                  (["--demo", "--demo_size", "tiny", "--demo_dir", "d"], "tiny", "d")])
def test_no_arguments_and_demo_flags_start_the_demo(argv, size, work_dir, monkeypatch):
    """`accelerate launch recipes/seq_kd.py` with no arguments is the README's first command: the offline demo."""
    import hf_seqkd.demo

    recipe = load_recipe("seq_kd")
    calls = []
    monkeypatch.setattr(hf_seqkd.demo, "run_demo", lambda size, work_dir: calls.append((size, work_dir)))
    recipe.main(argv)
    assert calls == [(size, work_dir)]


def count_generate_calls(mp):
    calls = {"n": 0}
    real = GenerationMixin.generate

    def counting_generate(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    mp.setattr(GenerationMixin, "generate", counting_generate)
    return calls


def cache_entries(cache_dir):
    return sorted(d for d in os.listdir(cache_dir) if os.path.isdir(os.path.join(cache_dir, d)))


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, torch_one_thread):
    """``seq_kd.py --demo --demo_size tiny``: teacher, baseline and Seq-KD student; the Seq-KD student's recipe
    command line (what the demo prints as its equivalent) for the tests that rerun it."""
    from hf_seqkd import DistillationTrainer
    from hf_seqkd.demo import student_arguments

    work = tmp_path_factory.mktemp("demo")
    recipe = load_recipe("seq_kd")
    trained = []
    real_train = DistillationTrainer.train

    def recording_train(self, *args, **kwargs):
        trained.append(self.args.output_dir)
        return real_train(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DistillationTrainer, "train", recording_train)
        generate = count_generate_calls(mp)
        start = time.perf_counter()
        table = recipe.main(["--demo", "--demo_size", "tiny", "--demo_dir", str(work)])
        seconds = time.perf_counter() - start
    print(f"\ntiny demo: {seconds:.1f} s")
    students = [d for d in trained if os.path.basename(d).startswith("student_")]
    assert len(students) == 2, f"the demo should train two students (baseline, Seq-KD), trained {trained}"
    return {"work": work, "recipe": recipe, "table": table, "seconds": seconds,
            "argv": student_arguments(str(work), "tiny", "teacher_target"), "generate_calls": generate["n"]}


@pytest.mark.slow
def test_tiny_demo_produces_students_cards_results_and_the_cache(tiny_demo):
    work = tiny_demo["work"]
    assert tiny_demo["seconds"] < 180, f"the tiny demo took {tiny_demo['seconds']:.0f} s (about 30 s expected)"
    for name, method in (("student_baseline", "baseline"), ("student_seq_kd", "seq-kd")):
        folder = work / name
        student = AutoModelForSeq2SeqLM.from_pretrained(folder)
        assert student.config.d_model == 32 and student.config.encoder_layers == 1  # the demo's tiny student
        card = (folder / "README.md").read_text()
        assert card.startswith("---") and method in card.lower()
        rows = json.loads((folder / "results.json").read_text())
        student_row = next(r for r in rows if r["model"] == "student")
        for key in ("bleu_greedy", "bleu_beam", "chrf", "speedup"):
            assert isinstance(student_row[key], float) and student_row[key] >= 0, key
        # each card compares its student with the teacher (the Seq-KD run reuses the baseline run's teacher row)
        teacher = rows[0]
        assert teacher["role"] == "teacher" and "| teacher |" in card
        assert student_row["speedup"] == pytest.approx(student_row["sent_per_s_greedy_batched"]
                                                       / teacher["sent_per_s_greedy_batched"])
    teacher_row = json.loads((work / "student_baseline" / "results.json").read_text())[0]
    assert teacher_row["role"] == "teacher" and teacher_row["params"] > student_row["params"]
    table = json.loads((work / "demo_results.json").read_text())
    assert [r["model"] for r in table] == ["teacher", "student, no KD (baseline)", "student, Seq-KD"]
    assert table == tiny_demo["table"]
    # the Seq-KD corpus: built once by the teacher's beam search, cached
    assert tiny_demo["generate_calls"] > 0
    entries = cache_entries(work / "seqkd_cache")
    assert len(entries) == 1
    corpus = pq.read_table(work / "seqkd_cache" / entries[0] / "result.parquet")
    assert corpus.num_rows == 1500 and "teacher_target" in corpus.column_names


@pytest.mark.slow
def test_second_run_reuses_the_seqkd_cache(tiny_demo, tmp_path):
    """The Seq-KD run again (1 step, no test split): the corpus comes from the cache, the teacher never generates."""
    argv = tiny_demo["argv"] + ["--output_dir", str(tmp_path / "again"), "--max_steps", "1",
                                "--test_split", "none"]
    before = cache_entries(tiny_demo["work"] / "seqkd_cache")
    with pytest.MonkeyPatch.context() as mp:
        generate = count_generate_calls(mp)
        tiny_demo["recipe"].main(argv)
    assert generate["n"] == 0
    assert cache_entries(tiny_demo["work"] / "seqkd_cache") == before
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "again").config.d_model == 32


@pytest.fixture(scope="module")
def stage2(tiny_demo, tmp_path_factory):
    """Stage 2 with the real stage-2 config, pointed at the demo's teacher, data and Seq-KD student (stage 1)."""
    out = tmp_path_factory.mktemp("stage2")
    work = tiny_demo["work"]
    argv = tiny_demo["argv"]
    teacher = argv[argv.index("--teacher_model_name_or_path") + 1]
    before = cache_entries(work / "seqkd_cache")
    overrides = [
        "--teacher_model_name_or_path", teacher, "--dataset", str(work / "data"), "--source_lang", "src",
        "--target_lang", "tgt", "--init_student_from", str(work / "student_seq_kd"), "--output_dir", str(out),
        "--seqkd_cache_dir", str(work / "seqkd_cache"),
        "--num_beams", "5", "--num_return_sequences", "3", "--max_train_samples", "200", "--max_eval_samples", "16",
        "--max_test_samples", "30",
        "--max_steps", "10", "--eval_steps", "5", "--save_steps", "5", "--logging_steps", "5", "--warmup_steps", "0",
        "--per_device_train_batch_size", "32", "--gradient_accumulation_steps", "1", "--per_device_eval_batch_size",
        "16", "--learning_rate", "1e-3", "--bf16", "false", "--teacher_dtype", "float32",
        "--dataloader_num_workers", "0", "--max_new_tokens", "48", "--generation_max_length", "48",
        "--eval_num_beams", "1", "--evaluate_teacher", "false", "--disable_tqdm", "true",
    ]
    config = os.path.join(CONFIG_DIR, "opus_mt_de_en_stage2_seq_inter.yaml")
    with pytest.MonkeyPatch.context() as mp:
        generate = count_generate_calls(mp)
        rows = tiny_demo["recipe"].main(["--config", config] + overrides)
    new = [e for e in cache_entries(work / "seqkd_cache") if e not in before]
    return {"out": out, "rows": rows, "argv": ["--config", config] + overrides, "new_cache_entries": new,
            "generate_calls": generate["n"]}


@pytest.mark.slow
def test_stage2_seq_inter_with_word_kd_continues_the_stage1_student(tiny_demo, stage2):
    out = stage2["out"]
    stage1 = AutoModelForSeq2SeqLM.from_pretrained(tiny_demo["work"] / "student_seq_kd")
    student = AutoModelForSeq2SeqLM.from_pretrained(out)
    # the stage-1 student's shape (the config's student would otherwise be a copy of the 64-wide teacher) ...
    assert (student.config.d_model, student.config.encoder_layers, student.config.decoder_layers) == (32, 1, 1)
    # ... trained further from its weights
    before, after = stage1.state_dict(), student.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "stage 2 did not train the stage-1 student"
    drift = sum((after[k] - before[k]).norm() ** 2 for k in before) ** 0.5
    size = sum(before[k].norm() ** 2 for k in before) ** 0.5
    assert drift < 0.5 * size, "stage 2 did not start from the stage-1 weights"
    card = (out / "README.md").read_text()
    assert "seq-inter" in card.lower() and "word-kd" in card.lower()
    assert str(tiny_demo["work"] / "student_seq_kd") in card  # the card says where stage 2 started from
    rows = json.loads((out / "results.json").read_text())
    assert rows == stage2["rows"] and [r["model"] for r in rows] == ["student"]
    assert isinstance(rows[0]["bleu_greedy"], float)
    # validation BLEU during training chose the checkpoint (load_best_model_at_end, metric_for_best_model: bleu)
    states = glob.glob(str(out / "checkpoint-*" / "trainer_state.json"))
    assert states, "no checkpoint was saved"
    state = json.loads(open(max(states, key=lambda p: int(p.split("checkpoint-")[1].split(os.sep)[0]))).read())
    assert any("eval_bleu" in entry for entry in state["log_history"])
    assert state["best_metric"] is not None and state["best_model_checkpoint"]
    # the K-best corpus: a new cache entry, with the Seq-Inter choice among the teacher's 3 best
    assert stage2["generate_calls"] > 0 and len(stage2["new_cache_entries"]) == 1
    corpus = pq.read_table(tiny_demo["work"] / "seqkd_cache" / stage2["new_cache_entries"][0] / "result.parquet")
    corpus = corpus.to_pydict()
    assert len(corpus["seq_inter_target"]) == 200
    assert all(len(nbest) == 3 and choice in nbest
               for nbest, choice in zip(corpus["teacher_nbest"], corpus["seq_inter_target"]))


@pytest.mark.slow
def test_seqkd_run_with_the_same_kbest_settings_reuses_the_stage2_corpus(tiny_demo, stage2, tmp_path):
    """With K > 1 a Seq-KD run and a Seq-Inter run share one cached corpus: no second beam search."""
    before = cache_entries(tiny_demo["work"] / "seqkd_cache")
    argv = stage2["argv"] + ["--kd_target", "teacher_target", "--alpha", "0", "--output_dir", str(tmp_path / "kd"),
                             "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
                             "--load_best_model_at_end", "false", "--test_split", "none"]
    with pytest.MonkeyPatch.context() as mp:
        generate = count_generate_calls(mp)
        tiny_demo["recipe"].main(argv)
    assert generate["n"] == 0
    assert cache_entries(tiny_demo["work"] / "seqkd_cache") == before


@pytest.mark.slow
def test_seqkd_corpus_from_a_ctranslate2_teacher(tiny_demo, tmp_path):
    """--teacher_ctranslate2_dir: the corpus is translated by the converted teacher (no `generate` call), gets its
    own cache entry, and the student trains on it."""
    pytest.importorskip("ctranslate2")
    from hf_seqkd.export import to_ctranslate2

    teacher_dir = tiny_demo["argv"][tiny_demo["argv"].index("--teacher_model_name_or_path") + 1]
    ct2 = to_ctranslate2(teacher_dir, tmp_path / "ct2", quantization="float32")
    cache = tmp_path / "cache"
    argv = tiny_demo["argv"] + ["--output_dir", str(tmp_path / "student"), "--max_steps", "2",
                                "--test_split", "none", "--teacher_ctranslate2_dir", str(ct2),
                                "--seqkd_cache_dir", str(cache)]
    with pytest.MonkeyPatch.context() as mp:
        generate = count_generate_calls(mp)
        tiny_demo["recipe"].main(argv)
    assert generate["n"] == 0
    (entry,) = cache_entries(cache)
    corpus = pq.read_table(cache / entry / "result.parquet")
    assert corpus.num_rows == 1500 and all(isinstance(t, str) for t in corpus.column("teacher_target").to_pylist())
    assert json.loads((cache / entry / "settings.json").read_text())["dtype"].startswith("ctranslate2:")
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "student").config.d_model == 32


@pytest.mark.parametrize("recipe_name", ["seq_kd", "prune"])
def test_help_names_the_config_option(recipe_name, capsys):
    with pytest.raises(SystemExit):
        load_recipe(recipe_name).main(["--help"])
    assert "--config FILE.yaml" in capsys.readouterr().out
