"""The trainable modules a distillation run owns besides the student: CKD's projections (Wu et al. 2020) and the
hybrid objective's learned gate (Wei et al. 2024).

They must be trained exactly like the student's own parameters at every point of the loop (zeroing after each
optimizer step, gradient accumulation, one global clipping norm, mixed precision, DDP/FSDP/DeepSpeed gradient
synchronisation, checkpoints and resume). Rather than re-implementing each of those, :class:`AuxiliaryModules` is
registered as a submodule of the student while ``DistillationTrainer.train`` runs (:meth:`AuxiliaryModules.
attached_to`), so the loop's own machinery sees one model; it is removed again afterwards, so the student that is
saved, evaluated or exported is the plain student.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .hybrid import DEFAULT_GATE_LR_FACTOR, make_hybrid_gate
from .intermediate import build_ckd_modules, hidden_size

__all__ = ["AuxiliaryModules", "ATTRIBUTE"]

# the student's submodule name while training; checkpoints hold the modules' weights under this prefix
ATTRIBUTE = "hf_seqkd_auxiliary"


class AuxiliaryModules(nn.ModuleDict):
    """``"ckd"`` (``{"encoder", "decoder"}`` projections) and ``"hybrid_gate"``, each present when the run uses it.

    Build with :meth:`from_args`; the trainer reads :meth:`parameter_groups` for its optimizer and trains inside
    :meth:`attached_to`.
    """

    @classmethod
    def from_args(cls, args, student_config, teacher_config) -> "AuxiliaryModules":
        """The modules ``args`` (``DistillationTrainingArguments``) asks for, for these student and teacher configs."""
        modules = cls()
        if args.uses_ckd:
            modules["ckd"] = build_ckd_modules(student_config, teacher_config, args.layer_mapping,
                                               args.intermediate_layers)
        if args.uses_hybrid:
            modules["hybrid_gate"] = make_hybrid_gate(args.hybrid_gate, hidden_size(student_config),
                                                      args.hybrid_gate_init, args.gate_bounds)
        return modules

    @property
    def has_parameters(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def gate_parameters(self) -> list[nn.Parameter]:
        """The learned gate's parameters (empty for a fixed gate or no hybrid objective)."""
        if "hybrid_gate" not in self:
            return []
        return [p for p in self["hybrid_gate"].parameters() if p.requires_grad]

    def gate_learning_rate(self, args) -> float:
        """``hybrid_gate_learning_rate``, or :data:`~hf_seqkd.hybrid.DEFAULT_GATE_LR_FACTOR` x ``learning_rate``."""
        if args.hybrid_gate_learning_rate is not None:
            return args.hybrid_gate_learning_rate
        return DEFAULT_GATE_LR_FACTOR * args.learning_rate

    @contextlib.contextmanager
    def attached_to(self, student: nn.Module):
        """Register these modules as ``student.hf_seqkd_auxiliary`` for the duration (no-op without parameters)."""
        if not self.has_parameters:
            yield
            return
        student.add_module(ATTRIBUTE, self)
        try:
            yield
        finally:
            delattr(student, ATTRIBUTE)
