"""Bad input to the recipes is refused before the first long step (the teacher's beam search, training), with an
error that names what was asked for and what exists."""

import os

import pytest
from transformers import GenerationMixin

from hf_seqkd import DataError, DistillationTrainer, tiny_seq2seq_model

from _helpers import load_recipe, write_split_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    model = tiny_seq2seq_model(tokenizer, "marian", d_model=16, encoder_layers=2, decoder_layers=1, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_dir(toy_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_split_files(folder, toy_corpus, {"train": 16, "validation": 4, "test": 4})
    return folder


@pytest.fixture
def no_long_work(monkeypatch):
    """Fail the test if the teacher generates or the trainer trains: the error must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("long work started before the bad argument was noticed")

    monkeypatch.setattr(GenerationMixin, "generate", refuse)
    monkeypatch.setattr(DistillationTrainer, "train", refuse)


def _argv(teacher_dir, data_dir, tmp_path, *extra):
    return ["--teacher_model_name_or_path", str(teacher_dir), "--dataset", str(data_dir), "--source_lang", "src",
            "--target_lang", "tgt", "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none",
            "--student_encoder_layers", "1", "--student_decoder_layers", "1", *extra]


@pytest.mark.parametrize("flag, value", [("--test_split", "nosuch"), ("--train_split", "trian"),
                                         ("--eval_split", "valid_typo")])
def test_a_misspelt_split_is_refused_before_any_work(flag, value, teacher_dir, data_dir, tmp_path, no_long_work):
    extra = [flag, value, "--kd_target", "teacher_target"]
    if flag == "--eval_split":
        extra += ["--eval_strategy", "steps", "--eval_steps", "1"]
    with pytest.raises(ValueError, match=rf"{flag} {value!r}.*(test|train|validation)"):
        load_recipe("seq_kd").main(_argv(teacher_dir, data_dir, tmp_path, *extra))
    assert not (tmp_path / "out" / "results.json").exists()


def test_no_test_evaluation_is_said_explicitly(teacher_dir, data_dir, tmp_path, monkeypatch):
    """``--test_split none`` (or '') skips the final evaluation on purpose; it is not an error."""
    rows = load_recipe("seq_kd").main(_argv(teacher_dir, data_dir, tmp_path, "--test_split", "none"))
    assert rows == []


def test_empty_files_are_a_named_error(teacher_dir, tmp_path, no_long_work):
    empty = tmp_path / "empty"
    empty.mkdir()
    for split in ("train", "test"):
        (empty / f"{split}.src").write_text("")
        (empty / f"{split}.tgt").write_text("")
    with pytest.raises(DataError, match=rf"{empty}.*no sentence pairs"):
        load_recipe("seq_kd").main(_argv(teacher_dir, empty, tmp_path))


@pytest.mark.parametrize("extra, message", [
    (["--student_encoder_layers", "5"], r"between 1 and 2"),
    (["--init_student_from", "/no/such/student"], r"/no/such/student"),
    (["--teacher_ctranslate2_dir", "/no/such/ct2"], r"/no/such/ct2"),
    (["--student_init", "config", "--student_d_model", "30", "--student_attention_heads", "4"], r"30.*4"),
])
def test_bad_student_and_teacher_settings_are_refused_before_the_corpus(extra, message, teacher_dir, data_dir,
                                                                        tmp_path, no_long_work):
    argv = _argv(teacher_dir, data_dir, tmp_path, "--kd_target", "teacher_target") + extra
    with pytest.raises((ValueError, OSError), match=message):
        load_recipe("seq_kd").main(argv)


def test_prune_recipe_refuses_a_misspelt_test_split(teacher_dir, data_dir, tmp_path, no_long_work):
    argv = ["--model_name_or_path", str(teacher_dir), "--dataset", str(data_dir), "--source_lang", "src",
            "--target_lang", "tgt", "--output_dir", str(tmp_path / "pruned"), "--sparsities", "0.5", "--alpha", "0",
            "--max_steps", "1", "--report_to", "none", "--test_split", "tset"]
    with pytest.raises(ValueError, match=r"--test_split 'tset'.*test"):
        load_recipe("prune").main(argv)


def test_bf16_without_a_gpu_names_the_setting_to_change(teacher_dir, data_dir, tmp_path, no_long_work, monkeypatch):
    """The Hub configs set ``bf16: true``; on a machine without a GPU the recipe says to pass ``--bf16 false``
    (Transformers alone says "Your setup doesn't support bf16/gpu")."""
    from hf_seqkd import DistillationTrainingArguments

    with pytest.raises(ValueError, match=r"bf16=True .* no such GPU: pass --bf16 false"):
        load_recipe("seq_kd").main(_argv(teacher_dir, data_dir, tmp_path, "--bf16", "true"))
    # where Transformers takes bf16, so does hf_seqkd: on the CPU when asked for (use_cpu), on a bf16 GPU
    assert DistillationTrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to=[]).bf16
    import transformers.training_args

    import hf_seqkd.config

    for module in (transformers.training_args, hf_seqkd.config):
        monkeypatch.setattr(module, "is_torch_bf16_gpu_available", lambda *a, **k: True)
    assert DistillationTrainingArguments(output_dir=str(tmp_path), bf16=True, report_to=[]).bf16


def test_no_pinned_memory_without_an_accelerator(tmp_path, monkeypatch):
    """Pinning serves only copies to a device: off without one (torch warns at every data loader otherwise), left as
    asked with one."""
    import hf_seqkd.config
    from hf_seqkd import DistillationTrainingArguments

    monkeypatch.setattr(hf_seqkd.config, "_has_accelerator", lambda: False)
    assert not DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[]).dataloader_pin_memory
    monkeypatch.setattr(hf_seqkd.config, "_has_accelerator", lambda: True)
    assert DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[]).dataloader_pin_memory
