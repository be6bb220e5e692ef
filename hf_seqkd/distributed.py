"""Where the teacher lives when training runs on several processes.

A teacher that fits on every device is replicated (a frozen copy per process, as under DDP). One that does not is
sharded over the processes with the engine the student uses, or with one chosen for the teacher alone:

* ``"fsdp"``: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) on each transformer layer and on the whole
  model, parameters gathered for each layer's forward and freed after it (ZeRO-3's schedule, no optimizer state: the
  teacher is frozen);
* ``"deepspeed"``: a DeepSpeed ZeRO stage-3 inference engine (``deepspeed.initialize`` without an optimizer, the
  pattern TRL uses for its teachers).

Either way each process keeps about ``1 / num_processes`` of the teacher's parameters, the teacher is in eval mode,
needs no gradient, is in no optimizer and is never saved. A sharded teacher runs a collective in every forward, so
every process must call it the same number of times: the trainer's per-step forward does; decoding a variable number
of new sources per process (the hybrid's teacher labels when they are not in the dataset) does not, and is refused.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

__all__ = ["TEACHER_SHARDING", "check_teacher_sharding", "resolve_teacher_sharding", "prepare_teacher",
           "local_parameter_count", "is_dispatched", "dispatched_dtype"]

TEACHER_SHARDING = ("replicate", "fsdp", "deepspeed")


def is_dispatched(model) -> bool:
    """Whether ``model`` was placed by accelerate's big-model inference (``from_pretrained(device_map=...)``: its
    layers on several devices, the CPU or disk, moved by hooks): such a model is used where it is, never moved."""
    return bool(getattr(model, "hf_device_map", None))


def dispatched_dtype(teacher, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a teacher placed by big-model inference runs in: the one it was loaded in (it cannot be cast in
    place).

    Raises:
        ValueError: ``dtype`` is given and is not the teacher's.
    """
    own = next(teacher.parameters()).dtype
    if dtype is not None and dtype != own:
        raise ValueError(f"the teacher was loaded with a device_map (big-model inference) in {own} and cannot be cast "
                         f"to {dtype} in place: load it in that dtype (from_pretrained(..., "
                         f"dtype={str(dtype).replace('torch.', '')!r}, device_map=...); the recipes do so with "
                         "teacher_dtype) and leave the dtype of the call unset")
    return own


def check_teacher_sharding(value: str | None) -> None:
    """Raises ValueError unless ``value`` is one of :data:`TEACHER_SHARDING` or ``None``."""
    if value is not None and value not in TEACHER_SHARDING:
        raise ValueError(f"teacher_sharding={value!r} is not one of {TEACHER_SHARDING} (or None: follow the "
                         "student's FSDP / DeepSpeed ZeRO-3 setting)")


def _zero_stage(accelerator: Accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def resolve_teacher_sharding(requested: str | None, accelerator: Accelerator) -> str:
    """The sharding to use: ``requested`` when given, else the student's (FSDP -> ``"fsdp"``, DeepSpeed ZeRO-3 ->
    ``"deepspeed"``, anything else -> ``"replicate"``). One process has nothing to shard over: ``"replicate"``.

    Raises:
        ValueError: ``requested`` is not one of :data:`TEACHER_SHARDING`.
    """
    check_teacher_sharding(requested)
    if accelerator.num_processes == 1:
        return "replicate"
    if requested is not None:
        return requested
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED and _zero_stage(accelerator) == 3:
        return "deepspeed"
    return "replicate"


def prepare_teacher(teacher: torch.nn.Module, accelerator: Accelerator, sharding: str,
                    dtype: torch.dtype | None = None, micro_batch_size: int = 1) -> torch.nn.Module:
    """The teacher frozen, in eval mode, in ``dtype`` (``None``: its own), on the accelerator's device, replicated
    or sharded (module docstring). Returns the module to call: the teacher itself, or its DeepSpeed engine.

    Args:
        teacher: the teacher model (unwrapped).
        accelerator: the training run's accelerator (device, process count, the student's DeepSpeed settings).
        sharding: ``"replicate"``, ``"fsdp"`` or ``"deepspeed"`` (:func:`resolve_teacher_sharding`).
        dtype: the teacher's dtype during training.
        micro_batch_size: sentences per forward on one process (DeepSpeed's ``train_micro_batch_size_per_gpu``).

    Raises:
        ImportError: ``"deepspeed"`` without DeepSpeed installed.
    """
    teacher.eval()
    teacher.requires_grad_(False)
    if is_dispatched(teacher):
        if sharding != "replicate":
            raise ValueError(f"teacher_sharding={sharding!r} cannot shard a teacher loaded with a device_map "
                             "(big-model inference places it across devices itself); load it without "
                             "teacher_device_map, or use teacher_sharding='replicate'")
        dispatched_dtype(teacher, dtype)
        return teacher  # used where it was placed
    if dtype is not None:
        teacher.to(dtype)
    if sharding == "replicate":
        return teacher.to(accelerator.device)
    if sharding == "fsdp":
        return _shard_fsdp(teacher.to(accelerator.device), accelerator)
    if sharding == "deepspeed":
        return _shard_deepspeed(teacher, accelerator, micro_batch_size)
    raise ValueError(f"sharding={sharding!r} is not one of {TEACHER_SHARDING}")


def _layer_classes(teacher: torch.nn.Module, accelerator: Accelerator) -> set[str]:
    """The classes sharded one by one: the FSDP plugin's ``transformer_cls_names_to_wrap`` when the student runs
    under FSDP with that set, else the model's ``_no_split_modules`` (its transformer layers)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) if plugin is not None else None
    return set(names or getattr(teacher, "_no_split_modules", None) or ())


def _shard_fsdp(teacher: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    cpu_offload = getattr(plugin, "cpu_offload", None)  # FSDP1's CPUOffload(offload_params=...) or FSDP2's policy
    offloads = bool(getattr(cpu_offload, "offload_params", False)) or isinstance(cpu_offload, CPUOffloadPolicy)
    offload = {"offload_policy": CPUOffloadPolicy()} if offloads else {}
    layers = _layer_classes(teacher, accelerator)
    for module in [m for m in teacher.modules() if type(m).__name__ in layers]:
        fully_shard(module, mesh=mesh, reshard_after_forward=True, **offload)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True, **offload)
    return teacher


def _shard_deepspeed(teacher: torch.nn.Module, accelerator: Accelerator, micro_batch_size: int):
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("teacher_sharding='deepspeed' needs DeepSpeed: pip install deepspeed (or use "
                          "teacher_sharding='fsdp', which needs only torch)") from e
    dtype = next(teacher.parameters()).dtype
    hidden = getattr(teacher.config, "d_model", None) or getattr(teacher.config, "hidden_size", None)
    zero = {"stage": 3}
    if hidden:  # the sizes DeepSpeed's own docs suggest for a model of this width (no "auto" outside its Trainer)
        zero.update(reduce_bucket_size=hidden * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                    stage3_param_persistence_threshold=10 * hidden)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    student_zero = plugin.deepspeed_config.get("zero_optimization", {}) if plugin is not None else {}
    if "offload_param" in student_zero:  # the student's parameter offload (to CPU or NVMe) applies to the teacher
        zero["offload_param"] = student_zero["offload_param"]
    config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": int(micro_batch_size),
              "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    torch.nn.Module.train(engine, False)  # the engine and the model (DeepSpeedEngine.eval sets the model's only)
    return engine


def local_parameter_count(module: torch.nn.Module) -> int:
    """Parameters this process holds of ``module`` (all of them when replicated; its shard when sharded by FSDP2
    or DeepSpeed ZeRO-3)."""
    total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3 keeps this process's partition there
            total += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):  # an FSDP2 DTensor
            total += p.to_local().numel()
        else:
            total += p.numel()
    return total
