"""The teacher on several processes (hf_seqkd.distributed): replicated, or sharded with FSDP2 or DeepSpeed ZeRO-3
over 2 processes (torchrun, gloo, CPU), each process holding half of it, the student trained exactly as with a
replicated teacher in one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_seqkd import DistillationTrainingArguments
from hf_seqkd.distributed import resolve_teacher_sharding

WORKER = Path(__file__).with_name("_sharding_torchrun_worker.py")


def _run(out, sharding: str, batch_size: int, processes: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    proc = subprocess.run(launcher + [str(WORKER), str(out), sharding, str(batch_size)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(processes)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 8, the teacher replicated (there is nothing to shard over)."""
    return _run(tmp_path_factory.mktemp("single"), "none", 8, 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp", "deepspeed"])
def test_sharded_teacher_trains_the_student_as_one_process_does(sharding, single, tmp_path):
    """Word-KD + CKD, 2 steps, 2 processes x batch 4 with the teacher sharded, against 1 process x batch 8 with it
    replicated: every process holds half of the teacher, in eval mode, frozen, outside the optimizer, and the
    students end equal."""
    if sharding == "deepspeed":
        pytest.importorskip("deepspeed")
    assert single["sharding"] == "replicate" and single["teacher_local"] == single["teacher_full"]
    ranks = _run(tmp_path, sharding, 4, 2)
    for rank in ranks:
        assert rank["sharding"] == sharding and rank["processes"] == 2
        assert rank["teacher_local"] == single["teacher_full"] // 2  # even sizes here: exactly half, not a copy
        assert not (rank["teacher_in_optimizer"] or rank["teacher_training"] or rank["teacher_requires_grad"])
        assert "teacher_sharding" in rank["hybrid_refused"] and "teacher_labels" in rank["hybrid_refused"]
        for name, value in single["student"].items():
            torch.testing.assert_close(rank["student"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert single["trained"] and not single["teacher_training"]


def test_teacher_sharding_is_checked_and_follows_the_student(tmp_path):
    with pytest.raises(ValueError, match="teacher_sharding='zero3' is not one of"):
        DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], teacher_sharding="zero3")

    class OneProcess:
        num_processes = 1

    assert resolve_teacher_sharding("fsdp", OneProcess()) == "replicate"  # nothing to shard over
    with pytest.raises(ValueError, match="not one of"):
        resolve_teacher_sharding("zero3", OneProcess())


# ------------------------------------------------------------------- big-model inference (teacher_device_map)
_LAYERS_ON_DISK = {"model.shared": "cpu", "model.encoder.embed_tokens": "cpu", "model.decoder.embed_tokens": "cpu",
                   "model.encoder.embed_positions": "cpu", "model.decoder.embed_positions": "cpu",
                   "model.encoder.layers": "disk", "model.decoder.layers": "disk", "model.encoder.layer_norm": "cpu",
                   "model.decoder.layer_norm": "cpu", "lm_head": "cpu", "final_logits_bias": "cpu"}


def test_teacher_offloaded_to_disk_builds_the_same_corpus_and_trains(tmp_path, toy_corpus, tokenizer):
    """A teacher loaded with teacher_device_map (its layers offloaded to disk, moved in by accelerate's hooks,
    the CPU machine's stand-in for a teacher spread over GPUs) translates the Seq-KD corpus exactly as the teacher in
    memory does, and trains a Word-KD student without being moved."""
    import json

    from hf_seqkd import (
        DistillationDataCollator,
        DistillationTrainer,
        GenerationSettings,
        build_seqkd_dataset,
        prepare_distillation_dataset,
        tiny_seq2seq_model,
    )
    from hf_seqkd.distributed import is_dispatched, prepare_teacher
    from hf_seqkd.seqkd import model_fingerprint

    teacher = tiny_seq2seq_model(tokenizer, d_model=48, encoder_layers=2, decoder_layers=2, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=1, alpha=0.5,
        per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
        teacher_model_name_or_path=str(tmp_path / "teacher"), teacher_device_map=json.dumps(_LAYERS_ON_DISK),
        teacher_offload_folder=str(tmp_path / "offload"))
    from transformers import AutoModelForSeq2SeqLM

    offloaded = AutoModelForSeq2SeqLM.from_pretrained(args.teacher_model_name_or_path, **args.teacher_loading_kwargs())
    assert is_dispatched(offloaded) and any(p.device.type == "meta" for p in offloaded.parameters())
    sources = toy_corpus["train"].select(range(12))
    generation = GenerationSettings(num_beams=3, num_return_sequences=2, max_new_tokens=20)
    expected = build_seqkd_dataset(sources, teacher, tokenizer, generation, show_progress=False)
    got = build_seqkd_dataset(sources, offloaded, tokenizer, generation, show_progress=False,
                              cache_dir=str(tmp_path / "cache"))
    assert model_fingerprint(offloaded) == model_fingerprint(teacher)  # the cache is keyed by the same weights
    assert got["teacher_nbest"] == expected["teacher_nbest"]
    assert got["teacher_nbest_scores"] == expected["teacher_nbest_scores"]
    with pytest.raises(ValueError, match="cannot be cast"):
        build_seqkd_dataset(sources, offloaded, tokenizer, generation, dtype="bfloat16", show_progress=False)

    student = tiny_seq2seq_model(tokenizer, d_model=32, encoder_layers=2, decoder_layers=2, seed=0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=prepare_distillation_dataset(
        toy_corpus["train"].select(range(8)), tokenizer), data_collator=DistillationDataCollator(tokenizer, student))
    assert is_dispatched(trainer.teacher_model)  # loaded by the trainer from teacher_model_name_or_path
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    with pytest.raises(ValueError, match="cannot shard a teacher loaded with a device_map"):
        prepare_teacher(offloaded, trainer.accelerator, "fsdp")


def test_teacher_device_map_settings_are_checked(tmp_path):
    def make(**kw):
        return DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], **kw)

    assert make(teacher_device_map='{"": "cpu"}', teacher_dtype="bfloat16").teacher_loading_kwargs() == {
        "device_map": {"": "cpu"}, "dtype": "bfloat16"}
    assert make().teacher_loading_kwargs() == {}
    with pytest.raises(ValueError, match="not valid JSON"):
        make(teacher_device_map='{"": cpu}')
    with pytest.raises(ValueError, match="use auto, balanced"):
        make(teacher_device_map="gpu")
    with pytest.raises(ValueError, match="not sharded again"):
        make(teacher_device_map="auto", teacher_sharding="fsdp")
    with pytest.raises(ValueError, match="used only with teacher_device_map"):
        make(teacher_offload_folder=str(tmp_path / "offload"))


# ------------------------------------------------------------------------------- CTranslate2 on several GPUs
def test_each_process_translates_the_corpus_on_its_own_gpu(tmp_path, monkeypatch, toy_corpus, tokenizer):
    """Under torchrun on a GPU machine process r's device is cuda:r: its CTranslate2 teacher must be placed there
    (CTranslate2's default, GPU 0, would put every process's translator on one card)."""
    import hf_seqkd.trainer as trainer_module
    from hf_seqkd import DistillationTrainer

    (tmp_path / "ct2").mkdir()
    (tmp_path / "ct2" / "model.bin").write_bytes(b"")
    seen = []

    class Placed(Exception):
        pass

    def fake_translator(ct2_dir, tokenizer, **kwargs):
        seen.append(kwargs)
        raise Placed

    class OnSecondGpu(DistillationTrainingArguments):
        device = property(lambda self: torch.device("cuda", 1))

    monkeypatch.setattr(trainer_module, "CTranslate2Translator", fake_translator)
    args = OnSecondGpu(output_dir=str(tmp_path / "run"), report_to=[], kd_target="teacher_target", alpha=0.0,
                       teacher_ctranslate2_dir=str(tmp_path / "ct2"))
    with pytest.raises(Placed):
        DistillationTrainer.build_seqkd_corpus(toy_corpus["train"].select(range(4)), None, tokenizer, args)
    assert seen == [{"device": "cuda", "device_index": 1}]


# ------------------------------------------------------------------------------ the shipped accelerate configs
@pytest.mark.parametrize("name, distributed_type, teacher", [
    ("ddp", "MULTI_GPU", "replicate"), ("fsdp", "FSDP", "fsdp"), ("deepspeed_zero2", "DEEPSPEED", "replicate"),
    ("deepspeed_zero3", "DEEPSPEED", "deepspeed")])
def test_accelerate_configs_parse_and_decide_the_teachers_place(name, distributed_type, teacher):
    """Each file in recipes/accelerate_configs is a valid accelerate config of its kind, and the teacher follows
    the student's setting: sharded under FSDP and ZeRO-3, replicated under DDP and ZeRO-2."""
    from types import SimpleNamespace

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = Path(__file__).parents[1] / "recipes" / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType[distributed_type] and config.num_processes > 1
    stage = (config.deepspeed_config or {}).get("zero_stage")
    plugin = SimpleNamespace(zero_stage=stage) if stage is not None else None
    accelerator = SimpleNamespace(num_processes=config.num_processes, distributed_type=config.distributed_type,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    assert resolve_teacher_sharding(None, accelerator) == teacher
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"]


def test_ckd_with_the_student_under_accelerates_deepspeed_is_refused_with_the_reason(tmp_path, monkeypatch,
                                                                                      train_set, tokenizer):
    """`accelerate launch --config_file deepspeed_zero3.yaml` sets no `--deepspeed` file, only accelerate's
    environment: the refusal must see it too."""
    from hf_seqkd import DistillationTrainer, tiny_seq2seq_model

    pytest.importorskip("deepspeed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    args = DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], alpha=0.5,
                                         intermediate_loss_weight=0.3, use_cpu=True)
    student = tiny_seq2seq_model(tokenizer, d_model=32, encoder_layers=2, decoder_layers=2, seed=0)
    teacher = tiny_seq2seq_model(tokenizer, d_model=48, encoder_layers=4, decoder_layers=2, seed=1)
    with pytest.raises(ValueError, match="never run under DeepSpeed"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_set)
