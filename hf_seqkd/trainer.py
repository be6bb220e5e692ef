"""``DistillationTrainer``: a ``Seq2SeqTrainer`` that adds the loss against a teacher.

The trainer owns the wiring, the losses live in :mod:`hf_seqkd.losses` (word level), :mod:`hf_seqkd.intermediate`
(CKD) and :mod:`hf_seqkd.hybrid` (the gated token/sentence objective).

The auxiliary modules (CKD's projections, the hybrid gate: ``trainer.distillation_modules``, an
:class:`~hf_seqkd.auxiliary.AuxiliaryModules`) are part of the student while ``train()`` runs, so the training loop
zeroes, accumulates, clips, synchronises, checkpoints and restores them as it does the student's parameters; the
saved and exported student is the plain student.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch import nn
from transformers import AutoModelForSeq2SeqLM, PreTrainedModel, Seq2SeqTrainer
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .config import DistillationTrainingArguments
from .evaluation import cap_max_new_tokens, max_target_positions
from .auxiliary import AuxiliaryModules
from .hybrid import TeacherSequenceCache, hybrid_loss, parse_hybrid_gate
from .losses import distillation_loss, fused_ce_and_distillation_loss, sequence_cross_entropy

logger = logging.get_logger(__name__)

__all__ = ["DistillationTrainer", "check_shared_vocabulary", "DISTILLATION_MODULES_NAME"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Columns the trainer consumes itself: kept by `remove_unused_columns`, removed before the student's forward.
EXTRA_LABEL_COLUMNS = ("teacher_labels",)

# File of the auxiliary modules (CKD projections, hybrid gate) inside a checkpoint folder.
DISTILLATION_MODULES_NAME = "distillation_modules.safetensors"


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


def _check_distinct(student, teacher) -> None:
    """The teacher is frozen: it must not be the student, nor share a parameter with it."""
    if teacher is student:
        raise ValueError("the same model was passed as model= (the student) and teacher_model=: the teacher is frozen, "
                         "so the student would not train; pass a separate teacher (e.g. make_student(teacher, ...) "
                         "builds a student from it)")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ValueError(f"the student and the teacher share {len(shared)} parameter tensor(s): freezing the teacher "
                         "would freeze them in the student too; give the student its own copy (copy.deepcopy or "
                         "hf_seqkd.make_student)")


def _pad_to(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """Right-pad ``(batch, l)`` to ``(batch, length)`` with ``value``."""
    if tensor.shape[1] >= length:
        return tensor
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)


class DistillationTrainer(Seq2SeqTrainer):
    """A ``Seq2SeqTrainer`` whose loss adds distillation from a teacher.

    ``loss = (1 - alpha - beta) * CE + alpha * T^2 * D(p_teacher || p_student) + beta * L_ckd``, and with
    ``hybrid_gate`` set the word-level term becomes ``alpha * [g * L_token + (1 - g) * L_sentence]`` (see
    [`DistillationTrainingArguments`] and the module docstring for the auxiliary modules).

    Args:
        model: the student.
        teacher_model: the teacher (an instance). When ``None``, ``args.teacher_model_name_or_path`` is loaded.
            It runs in eval mode without gradients on the accelerator's device, in ``args.teacher_dtype``, sees
            the same ``input_ids``, ``attention_mask`` and ``decoder_input_ids`` as the student and is never
            saved in checkpoints.
        args: [`DistillationTrainingArguments`].
        **kwargs: everything ``Seq2SeqTrainer`` takes (datasets, ``data_collator``, ``processing_class``, ...).

    Attributes:
        teacher_model: the prepared teacher (``None`` when ``alpha == 0`` and nothing else needs it).
        distillation_modules: ``nn.ModuleDict`` of the auxiliary trainable modules (may be empty).
        teacher_sequences: the :class:`~hf_seqkd.hybrid.TeacherSequenceCache` of greedy teacher outputs
            (hybrid objective without a ``teacher_labels`` column).
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
            _check_distinct(model, teacher_model)
            self.kd_vocab_size = check_shared_vocabulary(teacher_model, model, kwargs.get("processing_class"))
        self._kd_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._batch_counts = None  # token counts of the current accumulated batch (see get_batch_samples)
        self.hybrid_gate_kind = parse_hybrid_gate(args.hybrid_gate)
        self.teacher_sequences = TeacherSequenceCache(max_new_tokens=args.generation_max_length)
        self._check_auxiliary_settings(args)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher_model = self._prepare_teacher(teacher_model) if self.uses_teacher else None
        # built after Trainer.__init__ has seeded the RNGs (args.seed): the projections' initialisation is reproducible
        self.distillation_modules = self._build_distillation_modules(args, model, self.teacher_model)

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

    def _check_auxiliary_settings(self, args: DistillationTrainingArguments) -> None:
        """Settings the auxiliary modules need, fixed before ``Trainer.__init__`` builds the accelerator."""
        if not (self.uses_teacher and args.has_auxiliary_parameters):
            return
        if args.deepspeed:
            raise ValueError("CKD projections / a learned hybrid gate are not supported with DeepSpeed yet; use DDP or "
                             "FSDP")
        if args.ddp_find_unused_parameters:
            raise ValueError("ddp_find_unused_parameters=True cannot be used with CKD projections or a learned hybrid "
                             "gate: they are used after the student's forward pass, which DDP's unused-parameter "
                             "search would count as unused; leave it unset")
        # trained as part of the student (see train()); DDP must not search for unused parameters at the end of the
        # student's forward, where these have not been used yet
        args.ddp_find_unused_parameters = False

    def _build_distillation_modules(self, args, student, teacher) -> AuxiliaryModules:
        """CKD projections (Wu et al. 2020) and the hybrid gate (Wei et al. 2024), on the training device."""
        modules = AuxiliaryModules.from_args(args, student.config, teacher.config) if self.uses_teacher \
            else AuxiliaryModules()
        for stack, module in modules["ckd"].items() if "ckd" in modules else ():
            logger.info(f"CKD {stack} mapping (student layer -> teacher layers): {module.mapping}")
        return modules.to(args.device)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for name in EXTRA_LABEL_COLUMNS:
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    # ---------------------------------------------------------------------------------- auxiliary modules
    def train(self, *args, **kwargs):
        """``Seq2SeqTrainer.train`` with the auxiliary modules (CKD projections, learned gate) registered as a
        submodule of the student meanwhile (:class:`~hf_seqkd.auxiliary.AuxiliaryModules`): the loop zeroes, clips,
        synchronises, checkpoints and restores them with the student's parameters. The student it leaves behind
        is the plain student."""
        with self.distillation_modules.attached_to(self.accelerator.unwrap_model(self.model)):
            return super().train(*args, **kwargs)

    def create_optimizer(self, model=None):
        """``Seq2SeqTrainer.create_optimizer`` (which sees the auxiliary modules as part of the model); a learned
        gate gets a group of its own with ``hybrid_gate_learning_rate`` (default a tenth of ``learning_rate``) and no
        weight decay. Auxiliary parameters missing from an optimizer passed in through ``optimizers=`` are added."""
        optimizer = super().create_optimizer(model)
        gate = self.distillation_modules.gate_parameters()
        gate_ids = {id(p) for p in gate}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gate_ids]
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        others = [p for n, p in self.distillation_modules.named_parameters()
                  if p.requires_grad and id(p) not in present and id(p) not in gate_ids]
        if others:
            optimizer.add_param_group({"params": others, "weight_decay": self.args.weight_decay,
                                       "lr": self.args.learning_rate})
        if gate:
            optimizer.add_param_group({"params": gate, "weight_decay": 0.0,
                                       "lr": self.distillation_modules.gate_learning_rate(self.args)})
        return optimizer

    # ---------------------------------------------------------------------------------- batches and token counts
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """``Trainer.get_batch_samples``, plus: the teacher's greedy outputs for hybrid batches without a
        ``teacher_labels`` column, and the accumulated batch's source and teacher-sequence token counts (summed
        over processes like ``num_items_in_batch``) that normalise encoder CKD and ``L_sentence`` exactly."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._batch_counts = None
        if not self.uses_teacher or num_items_in_batch is None or not batch_samples:
            return batch_samples, num_items_in_batch
        if self.hybrid_gate_kind is not None:
            for batch in batch_samples:
                if "teacher_labels" not in batch:
                    batch["teacher_labels"] = self._teacher_labels(batch)
        counts = {"source": sum(self._source_mask(b).sum() for b in batch_samples)}
        if self.hybrid_gate_kind is not None:
            counts["teacher"] = sum(b["teacher_labels"].ne(-100).sum() for b in batch_samples)
        for name, value in counts.items():
            value = value.to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                value = self.accelerator.gather(value).sum()
            counts[name] = value / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())
        self._batch_counts = counts
        return batch_samples, num_items_in_batch

    def _source_mask(self, inputs) -> torch.Tensor:
        if inputs.get("attention_mask") is not None:
            return inputs["attention_mask"].bool()
        pad = self.accelerator.unwrap_model(self.model).config.pad_token_id
        return inputs["input_ids"].ne(pad)

    def _teacher_labels(self, inputs) -> torch.Tensor:
        """The teacher's greedy output for each source of the batch as labels (-100 padded), cached."""
        return self.teacher_sequences.labels(self.teacher_model, inputs["input_ids"], inputs.get("attention_mask"))

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
        student = self.accelerator.unwrap_model(model)
        if "decoder_input_ids" not in inputs:
            inputs["decoder_input_ids"] = student.prepare_decoder_input_ids_from_labels(labels=labels)
        batch_size, gold_length = labels.shape
        hybrid = self.hybrid_gate_kind is not None

        # Token counts that normalise the terms: of this micro-batch, or of the whole accumulated (and, with
        # average_tokens_across_devices, all-process) batch during training, for exact gradient accumulation.
        num_tokens = labels.ne(-100).sum()
        source_mask = self._source_mask(inputs)
        global_counts = num_items_in_batch is not None and self._batch_counts is not None and model.training
        n_target = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp(min=1)
        n_source = self._batch_counts["source"] if global_counts else source_mask.sum().clamp(min=1)

        student_inputs = inputs
        if hybrid:
            # L_sentence needs the student on the teacher's sequence: one forward pass over [gold; teacher] decoder
            # inputs (source repeated), so a DDP-wrapped student runs forward once per backward.
            teacher_labels = extras.get("teacher_labels")
            if teacher_labels is None:
                teacher_labels = self._teacher_labels(inputs)
            teacher_labels = teacher_labels.to(labels.device)
            length = max(labels.shape[1], teacher_labels.shape[1])
            pad_id = student.config.pad_token_id if student.config.pad_token_id is not None else 0
            labels = _pad_to(labels, length, -100)
            teacher_labels = _pad_to(teacher_labels, length, -100)
            inputs["decoder_input_ids"] = _pad_to(inputs["decoder_input_ids"], length, pad_id)
            if "decoder_attention_mask" in inputs:
                inputs["decoder_attention_mask"] = _pad_to(inputs["decoder_attention_mask"], length, 0)
            student_inputs = self._stack_hybrid_inputs(inputs, teacher_labels, student)
            n_teacher = (self._batch_counts["teacher"] if global_counts and "teacher" in self._batch_counts
                         else teacher_labels.ne(-100).sum().clamp(min=1))

        wants_hidden = self._wants_hidden_states()
        outputs = model(**student_inputs, output_hidden_states=wants_hidden)
        logits = outputs.logits[:batch_size]  # the gold-prefix half (the whole output without hybrid)
        teacher_outputs = self._teacher_forward(inputs)

        terms = {}  # name -> (value already divided by its token count, weight)
        ce_weight = 1.0 - args.alpha - args.intermediate_loss_weight
        kd_kwargs = dict(divergence=args.divergence, temperature=args.temperature, beta=args.jsd_beta,
                         vocab_size=self.kd_vocab_size, chunk_size=args.kd_chunk_size, overwrite_teacher_logits=True)
        if not hybrid:
            # (1 - alpha - beta) * CE + alpha * KD in one chunked pass (Kim & Rush 2016, Eq. 4 mixture)
            combined, ce_sum, kd_sum = fused_ce_and_distillation_loss(
                logits, teacher_outputs.logits, labels, ce_weight=ce_weight, kd_weight=args.alpha,
                label_smoothing=args.label_smoothing_factor, reduction="sum", **kd_kwargs)
            terms["ce+kd"] = (combined / n_target, 1.0)
            self._record("loss_ce", ce_sum / num_tokens.clamp(min=1))
            self._record("loss_kd", kd_sum / num_tokens.clamp(min=1))
        else:
            # Wei et al. 2024: g * L_token + (1 - g) * L_sentence, per sentence so that an input gate can weight
            # them; the gold CE keeps the weight 1 - alpha - beta
            ce_sum = sequence_cross_entropy(logits, labels, label_smoothing=args.label_smoothing_factor,
                                            reduction="sum")
            terms["ce"] = (ce_sum / n_target, ce_weight)
            self._record("loss_ce", ce_sum / num_tokens.clamp(min=1))
            token = distillation_loss(logits, teacher_outputs.logits, labels, reduction="none", **kd_kwargs).sum(-1)
            sentence = sequence_cross_entropy(outputs.logits[batch_size:], teacher_labels,
                                              label_smoothing=args.label_smoothing_factor, reduction="none").sum(-1)
            gate = self.distillation_modules["hybrid_gate"](outputs.encoder_last_hidden_state[:batch_size],
                                                            source_mask)
            terms["hybrid"] = (hybrid_loss(token, sentence, gate, n_target, n_teacher), args.alpha)
            self._record("loss_token", token.sum() / num_tokens.clamp(min=1))
            self._record("loss_sentence", sentence.sum() / teacher_labels.ne(-100).sum().clamp(min=1))
            self._record("hybrid_gate", gate.mean())
        if args.intermediate_loss_weight > 0:
            ckd, ckd_logged = self._ckd_loss(outputs, teacher_outputs, source_mask, labels, batch_size,
                                             n_source, n_target, num_tokens)
            terms["ckd"] = (ckd, args.intermediate_loss_weight)
            self._record("loss_ckd", ckd_logged)

        loss = sum(weight * value for value, weight in terms.values())
        if args.average_tokens_across_devices and num_items_in_batch is not None and self.model.training:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if not return_outputs:
            return loss
        return loss, Seq2SeqLMOutput(loss=loss, logits=logits[:, :gold_length],
                                     encoder_last_hidden_state=outputs.encoder_last_hidden_state[:batch_size])

    @staticmethod
    def _stack_hybrid_inputs(inputs: dict, teacher_labels: torch.Tensor, student) -> dict:
        """Student inputs for ``2 * batch`` rows: the gold decoder inputs, then the teacher sequence's."""
        batch_size = teacher_labels.shape[0]
        teacher_decoder = student.prepare_decoder_input_ids_from_labels(labels=teacher_labels)
        stacked = {}
        for key, value in inputs.items():
            if key == "decoder_input_ids":
                stacked[key] = torch.cat([value, teacher_decoder])
            elif key == "decoder_attention_mask":
                mask = torch.ones_like(teacher_labels)
                mask[:, 1:] = teacher_labels[:, :-1].ne(-100)
                stacked[key] = torch.cat([value, mask.to(value.dtype)])
            elif torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size:
                stacked[key] = torch.cat([value, value])
            else:
                stacked[key] = value
        return stacked

    def _ckd_loss(self, outputs, teacher_outputs, source_mask, labels, batch_size, n_source, n_target, num_tokens):
        """CKD (Wu et al. 2020): sums over tokens, the encoder's divided by source tokens, the decoder's by
        target tokens, added over stacks. Returns (the loss term, its per-token value on this batch for logs)."""
        total, logged = 0.0, 0.0
        for stack, module in self.distillation_modules["ckd"].items():
            student_states = getattr(outputs, f"{stack}_hidden_states")
            teacher_states = getattr(teacher_outputs, f"{stack}_hidden_states")
            student_states = [h[:batch_size] for h in student_states]
            if stack == "encoder":
                mask, count, local = source_mask, n_source, source_mask.sum()
            else:
                mask, count, local = labels.ne(-100), n_target, num_tokens
            value = module(student_states, teacher_states, mask, reduction="sum")
            total = total + value / count
            logged = logged + value.detach() / local.clamp(min=1)
        return total, logged

    # ------------------------------------------------------------------------------------------ validation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        """``Seq2SeqTrainer.evaluate`` whose generation (``predict_with_generate``) measures what the final
        evaluation measures: :meth:`validation_generation_kwargs`."""
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                                **self.validation_generation_kwargs(gen_kwargs))

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test", **gen_kwargs):
        """``Seq2SeqTrainer.predict`` with the generation settings of :meth:`validation_generation_kwargs`."""
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                               **self.validation_generation_kwargs(gen_kwargs))

    def validation_generation_kwargs(self, gen_kwargs: dict | None = None) -> dict:
        """The ``generate`` settings of validation: the caller's, else ``generation_max_length`` /
        ``generation_num_beams``, else ``max_new_tokens = max_target_length`` and greedy search (not the student's
        ``generation_config.max_length``, 20 for a model built from a config); the length always capped at the
        student's position table."""
        kwargs = dict(gen_kwargs or {})
        student = self.accelerator.unwrap_model(self.model)
        positions = max_target_positions(student)
        if kwargs.get("max_length") is None and kwargs.get("max_new_tokens") is None:
            if self.args.generation_max_length is not None:
                kwargs["max_length"] = self.args.generation_max_length
            else:
                kwargs["max_new_tokens"] = self.args.max_target_length
        if kwargs.get("max_new_tokens") is not None:
            kwargs["max_new_tokens"] = cap_max_new_tokens(student, kwargs["max_new_tokens"])
        elif positions is not None:  # max_length counts the decoder start token too
            kwargs["max_length"] = min(kwargs["max_length"], positions + 1)
        if kwargs.get("num_beams") is None:
            kwargs["num_beams"] = self.args.generation_num_beams or 1
        return kwargs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """``Seq2SeqTrainer.prediction_step``; with ``predict_with_generate`` (which calls the student and
        ``generate`` directly) the trainer's own columns (``teacher_labels``) are removed first."""
        if self.args.predict_with_generate and not prediction_loss_only:
            inputs = {k: v for k, v in inputs.items() if k not in EXTRA_LABEL_COLUMNS}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)

    def _wants_hidden_states(self) -> bool:
        return self.args.intermediate_loss_weight > 0

    @torch.no_grad()
    def _teacher_forward(self, inputs):
        teacher_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "decoder_input_ids",
                                                 "decoder_attention_mask") if k in inputs}
        return self.teacher_model(**teacher_inputs, output_hidden_states=self._wants_hidden_states())

    # --------------------------------------------------------------------------------------------- logging
    def _record(self, name: str, value) -> None:
        mode = "train" if self.model.training else "eval"
        self._kd_metrics[mode][name].append(float(value.detach().float()) if torch.is_tensor(value) else float(value))

    def log(self, logs: dict, *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        metrics = {k: sum(v) / len(v) for k, v in self._kd_metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        self._kd_metrics[mode].clear()
        super().log(logs, *args, **kwargs)
