"""``DistillationTrainer``: a ``Seq2SeqTrainer`` that adds the loss against a teacher.

The trainer owns the wiring, the losses live in :mod:`hf_seqkd.losses` (word level), :mod:`hf_seqkd.intermediate`
(CKD) and :mod:`hf_seqkd.hybrid` (the gated token/sentence objective).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers import AutoModelForSeq2SeqLM, PreTrainedModel, Seq2SeqTrainer
from transformers.utils import logging

from .config import DistillationTrainingArguments
from .losses import distillation_loss, sequence_cross_entropy

logger = logging.get_logger(__name__)

__all__ = ["DistillationTrainer", "check_shared_vocabulary"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Columns the trainer consumes itself: kept by `remove_unused_columns`, removed before the student's forward.
EXTRA_LABEL_COLUMNS = ("teacher_labels",)


def _vocab_rows(model: PreTrainedModel) -> int:
    out = model.get_output_embeddings()
    return out.weight.shape[0] if out is not None else model.config.vocab_size


def check_shared_vocabulary(teacher: PreTrainedModel, student: PreTrainedModel, tokenizer=None) -> int | None:
    """The number of vocabulary entries word-level KD compares, or a ``ValueError`` if there is no shared one.

    Equal output vocabularies are compared whole (returns ``None``). Different sizes are accepted only when a
    tokenizer is given and both models cover it (padded vocabularies): then its length is returned.
    """
    v_teacher, v_student = _vocab_rows(teacher), _vocab_rows(student)
    if v_teacher == v_student:
        return None
    if tokenizer is not None and len(tokenizer) <= min(v_teacher, v_student):
        logger.info(f"teacher vocabulary {v_teacher} != student vocabulary {v_student}: comparing the "
                    f"{len(tokenizer)} entries of the shared tokenizer")
        return len(tokenizer)
    raise ValueError(
        f"teacher vocabulary {v_teacher} != student vocabulary {v_student}: word-level KD needs a shared "
        "vocabulary; build the student with hf_seqkd.make_student / make_student_from_config, or use the "
        "teacher's tokenizer for both"
    )


class DistillationTrainer(Seq2SeqTrainer):
    """A ``Seq2SeqTrainer`` whose loss adds word-level distillation from a teacher.

    ``loss = (1 - alpha - beta) * CE + alpha * T^2 * D(p_teacher || p_student) + beta * L_ckd``

    Args:
        model: the student.
        teacher_model: the teacher (an instance). When ``None``, ``args.teacher_model_name_or_path`` is loaded.
            It runs in eval mode without gradients on the accelerator's device, in ``args.teacher_dtype``, sees
            the same ``input_ids``, ``attention_mask`` and ``decoder_input_ids`` as the student and is never
            saved in checkpoints.
        args: [`DistillationTrainingArguments`].
        **kwargs: everything ``Seq2SeqTrainer`` takes (datasets, ``data_collator``, ``processing_class``, ...).
    """

    _tag_names = ["hf_seqkd", "knowledge-distillation"]

    def __init__(self, model=None, teacher_model=None, args: DistillationTrainingArguments | None = None, **kwargs):
        if args is None:
            args = DistillationTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError(f"DistillationTrainer needs DistillationTrainingArguments, got {type(args).__name__}")
        self.uses_teacher = self._needs_teacher(args)
        if self.uses_teacher and teacher_model is None:
            if args.teacher_model_name_or_path is None:
                raise ValueError("word-level / intermediate / hybrid distillation needs a teacher: pass teacher_model= "
                                 "or set teacher_model_name_or_path (or use alpha=0 for plain training)")
            teacher_model = AutoModelForSeq2SeqLM.from_pretrained(args.teacher_model_name_or_path)
        self.kd_vocab_size = None
        if self.uses_teacher:
            self.kd_vocab_size = check_shared_vocabulary(teacher_model, model, kwargs.get("processing_class"))
        self._kd_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(model=model, args=args, **kwargs)
        self.teacher_model = self._prepare_teacher(teacher_model) if self.uses_teacher else None

    # ----------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _needs_teacher(args: DistillationTrainingArguments) -> bool:
        return args.alpha > 0 or args.intermediate_loss_weight > 0 or args.hybrid_gate is not None

    def _prepare_teacher(self, teacher: PreTrainedModel) -> PreTrainedModel:
        teacher.eval()
        teacher.requires_grad_(False)
        if self.args.teacher_dtype is not None:
            teacher.to(_DTYPES[self.args.teacher_dtype])
        return teacher.to(self.accelerator.device)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for name in EXTRA_LABEL_COLUMNS:
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.uses_teacher:
            inputs = {k: v for k, v in inputs.items() if k not in EXTRA_LABEL_COLUMNS}
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        args = self.args
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        extras = {k: inputs.pop(k) for k in EXTRA_LABEL_COLUMNS if k in inputs}
        if "decoder_input_ids" not in inputs:
            inputs["decoder_input_ids"] = self.accelerator.unwrap_model(model).prepare_decoder_input_ids_from_labels(
                labels=labels)
        outputs = model(**inputs, output_hidden_states=self._wants_hidden_states())
        teacher_outputs = self._teacher_forward(inputs)
        num_tokens = labels.ne(-100).sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp(min=1)

        terms = self._loss_terms(outputs, teacher_outputs, labels, inputs, extras)  # name -> (sum, weight)
        loss = sum(weight * value for value, weight in terms.values()) / denominator
        if args.average_tokens_across_devices and num_items_in_batch is not None and self.model.training:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        self._log_terms(terms, num_tokens)
        return (loss, outputs) if return_outputs else loss

    def _wants_hidden_states(self) -> bool:
        return self.args.intermediate_loss_weight > 0

    @torch.no_grad()
    def _teacher_forward(self, inputs):
        teacher_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in inputs}
        return self.teacher_model(**teacher_inputs, output_hidden_states=self._wants_hidden_states())

    def _loss_terms(self, outputs, teacher_outputs, labels, inputs, extras) -> dict:
        """Each term as (sum over target tokens, weight); the total is their weighted sum / tokens."""
        args = self.args
        ce = sequence_cross_entropy(outputs.logits, labels, label_smoothing=args.label_smoothing_factor,
                                    reduction="sum")
        kd = distillation_loss(outputs.logits, teacher_outputs.logits, labels, divergence=args.divergence,
                               temperature=args.temperature, beta=args.jsd_beta, reduction="sum",
                               vocab_size=self.kd_vocab_size, chunk_size=args.kd_chunk_size,
                               overwrite_teacher_logits=True)
        ce_weight = 1.0 - args.alpha - args.intermediate_loss_weight
        return {"ce": (ce, ce_weight), "kd": (kd, args.alpha)}

    def _log_terms(self, terms: dict, num_tokens: torch.Tensor):
        mode = "train" if self.model.training else "eval"
        n = num_tokens.clamp(min=1)
        for name, (value, _) in terms.items():
            self._kd_metrics[mode][f"loss_{name}"].append((value.detach() / n).item())

    def log(self, logs: dict, *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        metrics = {k: sum(v) / len(v) for k, v in self._kd_metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        self._kd_metrics[mode].clear()
        super().log(logs, *args, **kwargs)
