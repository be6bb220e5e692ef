"""``DistillationTrainer``: a ``Seq2SeqTrainer`` that owns a distillation run: it prepares the data its arguments
describe (tokenization, the Seq-KD corpus when a method needs one) and adds the loss against a teacher.

The losses live in :mod:`hf_seqkd.losses` (word level), :mod:`hf_seqkd.intermediate` (CKD) and
:mod:`hf_seqkd.hybrid` (the gated token/sentence objective); the auxiliary modules (CKD projections, hybrid gate) in
:mod:`hf_seqkd.auxiliary`, which makes them part of the student while ``train()`` runs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils.data import SequentialSampler
from transformers import AutoModelForSeq2SeqLM, EarlyStoppingCallback, PreTrainedModel, Seq2SeqTrainer
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import has_length
from transformers.utils import logging

from .auxiliary import AuxiliaryModules
from .config import DistillationTrainingArguments
from .data import DataError, DistillationDataCollator, decoder_inputs_from_labels, prepare_distillation_dataset
from .distributed import prepare_teacher, resolve_teacher_sharding
from .evaluation import make_compute_metrics
from .export import CTranslate2Translator
from .generation import cap_max_new_tokens, max_target_positions
from .hybrid import TeacherSequenceCache, hybrid_loss
from .languages import Languages, check_single_direction, resolve_languages
from .losses import StoredDistributions, distillation_loss, fused_ce_and_distillation_loss, sequence_cross_entropy
from .seqkd import build_seqkd_dataset
from .students import freeze_unsaved_parameters
from .teacher_distributions import (
    STORED_COLUMNS,
    build_teacher_distributions,
    has_teacher_distributions,
    stored_distributions,
)

logger = logging.get_logger(__name__)

__all__ = ["DistillationTrainer", "check_shared_vocabulary"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Columns the trainer consumes itself: kept by `remove_unused_columns`, removed before the student's forward.
EXTRA_LABEL_COLUMNS = ("teacher_labels",) + STORED_COLUMNS


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
        raise ValueError("the same model was passed as model= (the student) and teacher_model=: the teacher is "
                         "frozen, so the student would not train; pass a separate teacher (e.g. "
                         "make_student(teacher, ...) builds a student from it)")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ValueError(f"the student and the teacher share {len(shared)} parameter tensor(s): freezing the teacher "
                         "would freeze them in the student too; give the student its own copy (copy.deepcopy or "
                         "hf_seqkd.make_student)")


def _check_stored_distributions(dataset, args) -> None:
    """Stored distributions that fit this run: one per label position of every row, k = ``teacher_top_k``, taken
    at the run's temperature (float32-stored, compared to 1e-6)."""
    import numpy as np
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    labels = table.column("labels")
    unpadded = np.asarray(pc.list_value_length(labels)) - np.asarray(
        [sum(1 for t in row if t == -100) for row in labels.to_pylist()])
    stored = np.asarray(pc.list_value_length(table.column("teacher_topk_ids")))
    bad = np.flatnonzero(stored != unpadded)
    if bad.size:
        raise ValueError(f"{bad.size} training row(s) have stored distributions for another number of positions "
                         f"than their labels (row {bad[0]}: {stored[bad[0]]} stored, {unpadded[bad[0]]} labels): the "
                         "labels changed after the distributions were built; rebuild them")
    k = pc.list_value_length(pc.list_flatten(table.column("teacher_topk_ids"))).unique().to_pylist()
    if k and k != [args.teacher_top_k]:
        raise ValueError(f"the stored teacher distributions keep k = {k} tokens per position, but teacher_top_k = "
                         f"{args.teacher_top_k}: set teacher_top_k to the stored k, or rebuild them")
    temperatures = np.unique(np.asarray(table.column("teacher_distribution_temperature")))
    if not np.allclose(temperatures, args.temperature, rtol=1e-6, atol=0):
        raise ValueError(f"the training data's stored teacher distributions were taken at temperature "
                         f"{temperatures.tolist()}, but this run's temperature is {args.temperature}: rebuild them "
                         "(remove the columns) or set temperature to match")


def _cache_dir(args) -> str:
    """Where the Seq-KD corpus and the stored teacher distributions are cached (``seqkd_cache_dir``)."""
    return args.seqkd_cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.output_dir)), "seqkd_cache")


def _pad_to(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """Right-pad ``(batch, l)`` to ``(batch, length)`` with ``value``."""
    if tensor.shape[1] >= length:
        return tensor
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)


@dataclass
class _Batch:
    """One micro-batch, ready for the loss: the gold-prefix inputs (what the teacher sees), the student's inputs
    (twice as many rows with the hybrid objective), and the token counts that normalise each term."""

    inputs: dict
    student_inputs: dict
    labels: torch.Tensor
    teacher_labels: torch.Tensor | None
    size: int
    gold_length: int
    source_mask: torch.Tensor
    local_tokens: torch.Tensor  # target tokens of this micro-batch (for logs)
    n_target: torch.Tensor  # the counts that divide the sums: of the whole accumulated batch while training
    n_source: torch.Tensor
    n_teacher: torch.Tensor | None


class DistillationTrainer(Seq2SeqTrainer):
    """A ``Seq2SeqTrainer`` whose loss adds distillation from a teacher, and which prepares its own data.

    ``loss = (1 - alpha - w) * CE + alpha * T^2 * D(p_teacher || p_student) + w * L_ckd`` (``w`` =
    ``intermediate_loss_weight``); with ``hybrid_gate``
    the word-level term becomes ``alpha * [g * L_token + (1 - g) * L_sentence]`` (see
    [`DistillationTrainingArguments`]).

    Args:
        model: the student.
        teacher_model: the teacher (an instance). When ``None`` and the run needs one (its properties
            ``teacher_runs_during_training`` / ``needs_seqkd_corpus``), ``args.teacher_model_name_or_path`` is
            loaded; a teacher the run does not need is not loaded at all. It runs in eval mode without gradients
            on the accelerator's device, in ``args.teacher_dtype``, and is never saved.
        args: [`DistillationTrainingArguments`].
        train_dataset, eval_dataset: raw parallel data (``source``, ``target`` and, when present, the Seq-KD
            columns ``teacher_target`` / ``seq_inter_target``) or already tokenized data (``input_ids``,
            ``labels``, optionally ``teacher_labels``). Raw data is tokenized with ``processing_class`` as the
            arguments describe (``kd_target``, ``gold_mix_ratio``, lengths, ``source_prefix``); the Seq-KD corpus
            is built first when the method needs columns the data lacks.
        processing_class: the tokenizer (needed for raw data).
        data_collator: default :class:`~hf_seqkd.DistillationDataCollator` for the tokenizer.
        compute_metrics: default, with ``predict_with_generate`` and raw evaluation data, BLEU/chrF against the
            raw references (:func:`~hf_seqkd.make_compute_metrics`).
        **kwargs: everything else ``Seq2SeqTrainer`` takes.

    Attributes:
        method: the run's :class:`~hf_seqkd.config.DistillationMethod`.
        teacher_model: the prepared teacher (``None`` when training does not run it).
        distillation_modules: the :class:`~hf_seqkd.auxiliary.AuxiliaryModules` (may be empty).
        teacher_sequences: the :class:`~hf_seqkd.hybrid.TeacherSequenceCache` of greedy teacher outputs (hybrid
            objective on tokenized data without ``teacher_labels``).
    """

    _tag_names = ["hf_seqkd", "knowledge-distillation"]

    def __init__(self, model=None, teacher_model=None, args: DistillationTrainingArguments | None = None,
                 train_dataset=None, eval_dataset=None, processing_class=None, data_collator=None,
                 compute_metrics=None, **kwargs):
        if args is None:
            args = DistillationTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError(f"DistillationTrainer needs DistillationTrainingArguments, got {type(args).__name__}")
        if args.seqkd_corpus_part:
            raise ValueError(f"seqkd_corpus_part={args.seqkd_corpus_part!r} builds one part of the Seq-KD corpus "
                             "and stops; build it with DistillationTrainer.build_seqkd_corpus (or recipes/seq_kd.py), "
                             "merge the parts (python -m hf_seqkd.cli merge), then train without seqkd_corpus_part")
        self.method = args.method
        self.uses_teacher = args.teacher_runs_during_training
        teacher_model = self._teacher_if_needed(teacher_model, args, train_dataset)
        self.languages = self._resolve_languages(args, processing_class, teacher_model or model, model)
        self.kd_vocab_size = None
        if teacher_model is not None and (self.uses_teacher or args.uses_stored_distributions):
            _check_distinct(model, teacher_model)
            self.kd_vocab_size = check_shared_vocabulary(teacher_model, model, processing_class)
        train_dataset = self._prepare_dataset(train_dataset, args, processing_class, teacher_model, training=True)
        if not self.uses_teacher:
            teacher_model = None  # what it was needed for (corpus, stored distributions) is done: not kept
        eval_dataset, references = self._prepare_eval_dataset(eval_dataset, args, processing_class)
        if data_collator is None and processing_class is not None:
            data_collator = DistillationDataCollator(processing_class, model=model)
        if compute_metrics is None and args.predict_with_generate and references is not None:
            compute_metrics = make_compute_metrics(processing_class, references,
                                                   tokenize=args.resolved_bleu_tokenize(self.languages.target_language))
        self._kd_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._batch_counts = None  # token counts of the current accumulated batch (see get_batch_samples)
        self.teacher_sequences = TeacherSequenceCache(  # generation_max_length counts the decoder start token
            max_new_tokens=None if args.generation_max_length is None else max(1, args.generation_max_length - 1))
        self._check_auxiliary_settings(args)
        if model is not None:  # (a student from model_init: call_model_init)
            self._freeze_unsaved(model)
        if args.early_stopping_patience is not None:
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [EarlyStoppingCallback(
                early_stopping_patience=args.early_stopping_patience,
                early_stopping_threshold=args.early_stopping_threshold)]
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator,
                         compute_metrics=compute_metrics, **kwargs)
        self.teacher_sharding = None  # where the teacher lives, when training runs it (_prepare_teacher)
        self.teacher_model = self._prepare_teacher(teacher_model) if self.uses_teacher else None
        # built after Trainer.__init__ has seeded the RNGs (args.seed): the projections' initialisation is reproducible
        self.distillation_modules = self._build_distillation_modules(args, model, teacher_model)

    # ----------------------------------------------------------------------------------------------- set-up
    def call_model_init(self, trial=None):
        """``Trainer.call_model_init``, the new student's unsaved parameters frozen (as ``__init__`` does for
        ``model``)."""
        return self._freeze_unsaved(super().call_model_init(trial))

    @staticmethod
    def _freeze_unsaved(student):
        """The parameters the saved student would not keep are not trained (:func:`freeze_unsaved_parameters`)."""
        frozen = freeze_unsaved_parameters(student)
        if frozen:
            logger.info(f"Not trained (the saved student recomputes them): {', '.join(frozen)}")
        return student

    @staticmethod
    def _resolve_languages(args, tokenizer, teacher, student) -> Languages:
        """The run's translation direction (:func:`~hf_seqkd.languages.resolve_languages`): set on the tokenizer
        (sources and labels), recorded in the student (forced target token, prefix); every ``generate`` adds it."""
        if tokenizer is None:
            return Languages(source_prefix=args.source_prefix, target_language=args.tgt_lang)
        languages = resolve_languages(tokenizer, teacher, src_lang=args.src_lang, tgt_lang=args.tgt_lang,
                                      source_prefix=args.source_prefix)
        languages.apply(tokenizer)
        languages.apply_to_model(student)
        return languages

    @staticmethod
    def _needs_corpus(args, dataset) -> bool:
        """Raw training data lacks the columns the method trains on (then the teacher builds the corpus)."""
        if dataset is None or "input_ids" in dataset.column_names or not args.needs_seqkd_corpus:
            return False
        wanted = {args.kd_target, args.teacher_labels_column} - {None, "target"}
        return not wanted <= set(dataset.column_names)

    def _teacher_if_needed(self, teacher, args, train_dataset):
        """The teacher instance, loaded from ``teacher_model_name_or_path`` only when the run needs it: during
        training, to build the Seq-KD corpus with Transformers (not with a CTranslate2 teacher), or to compute stored
        distributions the data does not carry."""
        if args.uses_stored_distributions and train_dataset is not None:
            present = [c for c in STORED_COLUMNS if c in train_dataset.column_names]
            if present and len(present) < len(STORED_COLUMNS):
                raise ValueError(f"the training data has the stored-distribution columns {present} but not "
                                 f"{[c for c in STORED_COLUMNS if c not in present]}: rebuild them with "
                                 "build_teacher_distributions (or remove them all and let the trainer build them)")
        needed = (self.uses_teacher or (self._needs_corpus(args, train_dataset) and not args.teacher_ctranslate2_dir)
                  or (args.uses_stored_distributions and not has_teacher_distributions(train_dataset)))
        if teacher is not None or not needed:
            return teacher
        if args.teacher_model_name_or_path is None:
            raise ValueError(f"method {args.method.name!r} needs a teacher (word-level, intermediate and hybrid "
                             "distillation run it; a Seq-KD corpus is built with it): pass teacher_model= or set "
                             "teacher_model_name_or_path (or use alpha=0 and kd_target='target' for plain training)")
        return AutoModelForSeq2SeqLM.from_pretrained(args.teacher_model_name_or_path, **args.teacher_loading_kwargs())

    def _prepare_dataset(self, dataset, args, tokenizer, teacher, training: bool):
        """Tokenized data as it is; raw data completed with the Seq-KD corpus when needed, then tokenized; training
        data with the teacher's stored distributions when the run trains on them."""
        dataset = self._tokenized(dataset, args, tokenizer, teacher, training)
        if training and args.uses_stored_distributions:
            dataset = self._with_teacher_distributions(dataset, args, teacher)
        return dataset

    def _with_teacher_distributions(self, dataset, args, teacher):
        """The tokenized training data with the teacher's top-k distributions of its labels
        (:func:`~hf_seqkd.teacher_distributions.build_teacher_distributions`, cached in ``seqkd_cache_dir``)."""
        if not has_teacher_distributions(dataset):
            if teacher is None:
                raise ValueError("teacher_distributions='stored': the training data carries no stored distributions "
                                 "and no teacher was given to compute them; pass teacher_model= or set "
                                 "teacher_model_name_or_path")
            dataset = build_teacher_distributions(
                dataset, teacher, top_k=args.teacher_top_k, temperature=args.temperature,
                vocab_size=self.kd_vocab_size, cache_dir=_cache_dir(args),
                dtype=args.teacher_dtype, batch_size=args.per_device_train_batch_size)
        _check_stored_distributions(dataset, args)
        return dataset

    def _tokenized(self, dataset, args, tokenizer, teacher, training: bool):
        """Tokenized data as it is; raw data completed with the Seq-KD corpus when needed, then tokenized."""
        if dataset is None or "input_ids" in dataset.column_names:
            return dataset
        if "source" not in dataset.column_names:
            raise DataError(f"the {'training' if training else 'evaluation'} data has neither token ids "
                            f"(input_ids) nor a 'source' text column; columns: {dataset.column_names}")
        if tokenizer is None:
            raise ValueError("raw source/target data needs the tokenizer: pass processing_class=tokenizer")
        check_single_direction(dataset)
        if training and self._needs_corpus(args, dataset):
            dataset = self.build_seqkd_corpus(dataset, teacher, tokenizer, args, self.languages)
        return prepare_distillation_dataset(
            dataset, tokenizer, target_column=args.kd_target if training else "target",
            max_source_length=args.max_source_length, max_target_length=args.max_target_length,
            source_prefix=self.languages.source_prefix, gold_mix_ratio=args.gold_mix_ratio if training else 0.0,
            teacher_labels_column=args.teacher_labels_column if training else None, seed=args.seed)

    def _prepare_eval_dataset(self, dataset, args, tokenizer):
        """The tokenized evaluation data and, for raw data, its reference texts (what validation BLEU scores
        against)."""
        if dataset is None or isinstance(dataset, dict):
            return dataset, None
        references = list(dataset["target"]) if "input_ids" not in dataset.column_names else None
        return self._prepare_dataset(dataset, args, tokenizer, None, training=False), references

    @staticmethod
    def build_seqkd_corpus(dataset, teacher, tokenizer, args: DistillationTrainingArguments,
                           languages: Languages | None = None):
        """The raw training data with the teacher's Seq-KD columns (Kim & Rush 2016, Sec. 3.2-3.3), built with
        :func:`~hf_seqkd.build_seqkd_dataset` (cached in ``seqkd_cache_dir``, resumable, sharded over processes) by
        the Transformers teacher or ``teacher_ctranslate2_dir``. With ``num_return_sequences`` K > 1 the Seq-Inter
        choice is always added (cheap next to the beam search), so Seq-KD and Seq-Inter runs with the same
        settings share one cached corpus. ``languages`` (default: resolved from ``args`` and the tokenizer) give
        the forced target token and the prefix. With ``seqkd_corpus_part`` only that part is built (``None`` is
        returned)."""

        cache_dir = _cache_dir(args)
        if args.teacher_ctranslate2_dir:
            device = torch.device(args.device)  # each process its own GPU (cuda:<local rank>)
            teacher = CTranslate2Translator(args.teacher_ctranslate2_dir, tokenizer, device=device.type
                                            if device.type == "cuda" else "cpu", device_index=device.index or 0)
        if languages is None:
            languages = resolve_languages(tokenizer, teacher, src_lang=args.src_lang, tgt_lang=args.tgt_lang,
                                          source_prefix=args.source_prefix)
        generation = dataclasses.replace(args.seqkd_generation, forced_bos_token_id=languages.forced_bos_token_id)
        return build_seqkd_dataset(
            dataset, teacher, tokenizer, generation, seq_inter=args.num_return_sequences > 1,
            seq_inter_metric=args.seq_inter_metric, source_prefix=languages.source_prefix, cache_dir=cache_dir,
            bleu_tokenize=args.resolved_bleu_tokenize(languages.target_language), corpus_part=args.seqkd_corpus_part)

    def _prepare_teacher(self, teacher: PreTrainedModel) -> torch.nn.Module:
        """Frozen, in eval mode, replicated or sharded over the processes (``args.teacher_sharding``,
        :mod:`hf_seqkd.distributed`)."""
        self.teacher_sharding = resolve_teacher_sharding(self.args.teacher_sharding, self.accelerator)
        if self.teacher_sharding != "replicate" and self.args.uses_hybrid and (
                self.train_dataset is None or "teacher_labels" not in self.train_dataset.column_names):
            raise ValueError(
                "the hybrid's teacher labels cannot be decoded during training by a sharded teacher "
                f"(teacher_sharding={self.teacher_sharding!r}): each process would decode a different number of "
                "new sources while the shards must run every forward together. Decode them into the dataset first "
                "(a 'teacher_labels' column, e.g. prepare_distillation_dataset(teacher_labels_column="
                "'teacher_target')), or use teacher_sharding='replicate'")
        dtype = None if self.args.teacher_dtype is None else _DTYPES[self.args.teacher_dtype]
        return prepare_teacher(teacher, self.accelerator, self.teacher_sharding, dtype,
                               micro_batch_size=self.args.per_device_train_batch_size)

    def _check_auxiliary_settings(self, args: DistillationTrainingArguments) -> None:
        """Settings the auxiliary modules need, fixed before ``Trainer.__init__`` builds the accelerator."""
        if not (self.uses_teacher and args.has_auxiliary_parameters):
            return
        if args.deepspeed or getattr(args, "deepspeed_plugin", None) is not None:  # --deepspeed, or accelerate's
            raise ValueError("CKD projections / a learned hybrid gate with the student under DeepSpeed are not "
                             "supported: they train as a submodule of the student with their own learning rate, and "
                             "that has never run under DeepSpeed (it needs a GPU), so it is refused rather than "
                             "trusted. Train the student with DDP or FSDP (recipes/accelerate_configs/ddp.yaml, "
                             "fsdp.yaml); a large teacher can still be sharded (teacher_sharding='fsdp' or "
                             "'deepspeed')")
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
        submodule of the student meanwhile: the loop zeroes, clips, synchronises, checkpoints and restores them with
        the student's parameters. The student it leaves behind is the plain student."""
        self._stopped_before_resuming = False  # set on resuming by _load_callback_state
        with self.distillation_modules.attached_to(self.accelerator.unwrap_model(self.model)):
            return super().train(*args, **kwargs)

    def _get_eval_sampler(self, eval_dataset):
        """Evaluation keeps the dataset's order: with ``train_sampling_strategy="group_by_length"`` Transformers 5
        also length-groups (and shuffles) the evaluation set, and the validation BLEU/chrF of
        :func:`~hf_seqkd.make_compute_metrics`, which pairs each prediction with the reference at its position, came
        out near 0 for a model scoring 23 (and early stopping on BLEU stopped on noise)."""
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def _load_callback_state(self):
        """On resuming: Transformers' restore of the callbacks' states (only with
        ``restore_callback_states_from_checkpoint``, which also brings back the checkpoint's patience), and in any
        case early stopping's count of evaluations without improvement (``EarlyStoppingCallback`` and its
        subclasses), so that a resumed run stops where the uninterrupted one would. (Transformers alone restarts the
        count: a run resumed on a plateau trained up to ``early_stopping_patience`` evaluations more; and with several
        such callbacks it restores the oldest of the states it appended at every save.) A checkpoint saved at the
        evaluation that stopped the run (a count at its patience) trains no further: the resumed run goes straight
        to its end (the best checkpoint loaded), where Transformers would train one more epoch or evaluation
        interval first."""
        super()._load_callback_state()
        stopping = [c for c in self.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)]
        for name in dict.fromkeys(type(c).__name__ for c in stopping):
            saved = self.state.stateful_callbacks.get(name)
            if not saved:
                continue
            mine = [c for c in stopping if type(c).__name__ == name]
            # several callbacks of a class: their states are appended at every save, the last ones the newest
            saved = saved[-len(mine):] if isinstance(saved, list) else [saved]
            for callback, state in zip(mine, saved):
                count = state.get("attributes", {}).get("early_stopping_patience_counter")
                if count is not None:
                    callback.early_stopping_patience_counter = count
        self._stopped_before_resuming = any(c.early_stopping_patience_counter >= c.early_stopping_patience
                                            for c in stopping)

    def _run_epoch(self, *args, **kwargs):
        """``Trainer._run_epoch``, skipped when the checkpoint resumed from had already stopped the run
        (:meth:`_load_callback_state`): Transformers' loop checks ``should_training_stop`` only after a step."""
        if getattr(self, "_stopped_before_resuming", False):
            self._stopped_before_resuming = False
            logger.info(f"The checkpoint resumed from (step {self.state.global_step}) was saved at the evaluation "
                        "that stopped the run early: no further training")
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        """``Seq2SeqTrainer._save_checkpoint``, also when training resumed from a checkpoint of a run that had fewer
        stateful callbacks (e.g. early stopping added on resuming): Transformers replaces its state with the
        checkpoint's and then fails on the first save, looking up the new callback's entry (``KeyError:
        'EarlyStoppingCallback'``), so the entries are added first."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ExportableState):
                self.state.stateful_callbacks.setdefault(type(callback).__name__, callback.state())
        return super()._save_checkpoint(model, trial)

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
        others = [p for p in self.distillation_modules.parameters()
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
        if self.args.uses_hybrid:
            for batch in batch_samples:
                if "teacher_labels" not in batch:
                    batch["teacher_labels"] = self._teacher_labels(batch)
        counts = {"source": sum(self._source_mask(b).sum() for b in batch_samples)}
        if self.args.uses_hybrid:
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
        return self.teacher_sequences.labels(self.teacher_model, inputs["input_ids"], inputs.get("attention_mask"),
                                             **self.languages.generate_kwargs())

    def _distillation_batch(self, model, inputs, num_items_in_batch) -> _Batch:
        """Split a collated batch into what the loss needs. The token counts divide the terms: those of this
        micro-batch, or, while training, of the whole accumulated (with ``average_tokens_across_devices``,
        all-process) batch, so gradient accumulation is exact."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        teacher_labels = inputs.pop("teacher_labels", None)
        student = self.accelerator.unwrap_model(model)
        if "decoder_input_ids" not in inputs:
            inputs["decoder_input_ids"] = decoder_inputs_from_labels(student, labels)
        size, gold_length = labels.shape
        source_mask = self._source_mask(inputs)
        local_tokens = labels.ne(-100).sum()
        global_counts = num_items_in_batch is not None and self._batch_counts is not None and model.training
        n_target = num_items_in_batch if num_items_in_batch is not None else local_tokens.clamp(min=1)
        n_source = self._batch_counts["source"] if global_counts else source_mask.sum().clamp(min=1)
        student_inputs, n_teacher = inputs, None
        if self.args.uses_hybrid:
            # L_sentence needs the student on the teacher's sequence: one forward pass over [gold; teacher] decoder
            # inputs (source repeated), so a DDP-wrapped student runs forward once per backward
            if teacher_labels is None:
                teacher_labels = self._teacher_labels(inputs)
            teacher_labels = teacher_labels.to(labels.device)
            length = max(labels.shape[1], teacher_labels.shape[1])
            pad_id = student.config.pad_token_id if student.config.pad_token_id is not None else 0
            labels, teacher_labels = _pad_to(labels, length, -100), _pad_to(teacher_labels, length, -100)
            inputs["decoder_input_ids"] = _pad_to(inputs["decoder_input_ids"], length, pad_id)
            if "decoder_attention_mask" in inputs:
                inputs["decoder_attention_mask"] = _pad_to(inputs["decoder_attention_mask"], length, 0)
            student_inputs = self._stack_hybrid_inputs(inputs, teacher_labels, student)
            n_teacher = (self._batch_counts["teacher"] if global_counts and "teacher" in self._batch_counts
                         else teacher_labels.ne(-100).sum().clamp(min=1))
        return _Batch(inputs=inputs, student_inputs=student_inputs, labels=labels, teacher_labels=teacher_labels,
                      size=size, gold_length=gold_length, source_mask=source_mask, local_tokens=local_tokens,
                      n_target=n_target, n_source=n_source, n_teacher=n_teacher)

    @staticmethod
    def _stack_hybrid_inputs(inputs: dict, teacher_labels: torch.Tensor, student) -> dict:
        """Student inputs for ``2 * batch`` rows: the gold decoder inputs, then the teacher sequence's."""
        batch_size = teacher_labels.shape[0]
        teacher_decoder = decoder_inputs_from_labels(student, teacher_labels)
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

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stored = self.args.uses_stored_distributions and "teacher_topk_ids" in inputs
        if not (self.uses_teacher or stored):
            inputs = {k: v for k, v in inputs.items() if k not in EXTRA_LABEL_COLUMNS}
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # the teacher's side: its stored top-k distributions, or (below) its forward pass on the same decoder inputs
        teacher_outputs = stored_distributions(inputs, tail=self.args.teacher_tail) if stored else None
        batch = self._distillation_batch(model, {k: v for k, v in inputs.items() if k not in STORED_COLUMNS},
                                         num_items_in_batch)
        outputs = model(**batch.student_inputs, output_hidden_states=self.args.uses_ckd)
        if teacher_outputs is None:
            teacher_outputs = self._teacher_forward(batch.inputs)
        terms = (self._hybrid_terms if self.args.uses_hybrid else self._word_level_terms)(outputs, teacher_outputs,
                                                                                           batch)
        if self.args.uses_ckd:
            terms["ckd"] = (self._ckd_term(outputs, teacher_outputs, batch), self.args.intermediate_loss_weight)
        loss = sum(weight * value for value, weight in terms.values())
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.model.training:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if not return_outputs:
            return loss
        return loss, Seq2SeqLMOutput(loss=loss, logits=outputs.logits[:batch.size, :batch.gold_length],
                                     encoder_last_hidden_state=outputs.encoder_last_hidden_state[:batch.size])

    def _kd_kwargs(self) -> dict:
        args = self.args
        # overwrite_teacher_logits: the loss stores its gradient in the teacher logits' memory (not used afterwards)
        return dict(divergence=args.divergence, temperature=args.temperature, jsd_beta=args.jsd_beta,
                    vocab_size=self.kd_vocab_size, chunk_size=args.kd_chunk_size, overwrite_teacher_logits=True)

    @property
    def _ce_weight(self) -> float:
        return 1.0 - self.args.alpha - self.args.intermediate_loss_weight

    def _word_level_terms(self, outputs, teacher_outputs, batch: _Batch) -> dict:
        """``(1 - alpha - w) * CE + alpha * KD`` in one chunked pass (Kim & Rush 2016, Eq. 4 mixture); returns
        ``{name: (value divided by its token count, weight)}``."""
        teacher = teacher_outputs if isinstance(teacher_outputs, StoredDistributions) else teacher_outputs.logits
        combined, ce_sum, kd_sum = fused_ce_and_distillation_loss(
            outputs.logits, teacher, batch.labels, ce_weight=self._ce_weight, kd_weight=self.args.alpha,
            label_smoothing=self.args.label_smoothing_factor, reduction="sum", **self._kd_kwargs())
        self._record("loss_ce", ce_sum / batch.local_tokens.clamp(min=1))
        self._record("loss_kd", kd_sum / batch.local_tokens.clamp(min=1))
        return {"ce+kd": (combined / batch.n_target, 1.0)}

    def _hybrid_terms(self, outputs, teacher_outputs, batch: _Batch) -> dict:
        """Wei et al. 2024: ``g * L_token + (1 - g) * L_sentence``, per sentence so that an input gate can weight
        them; the gold CE keeps the weight ``1 - alpha - intermediate_loss_weight``."""
        args, n = self.args, batch.size
        logits = outputs.logits[:n]
        ce_sum = sequence_cross_entropy(logits, batch.labels, label_smoothing=args.label_smoothing_factor,
                                        reduction="sum")
        token = distillation_loss(logits, teacher_outputs.logits, batch.labels, reduction="none",
                                  **self._kd_kwargs()).sum(-1)
        sentence = sequence_cross_entropy(outputs.logits[n:], batch.teacher_labels,
                                          label_smoothing=args.label_smoothing_factor, reduction="none").sum(-1)
        gate = self.distillation_modules["hybrid_gate"](outputs.encoder_last_hidden_state[:n], batch.source_mask)
        self._record("loss_ce", ce_sum / batch.local_tokens.clamp(min=1))
        self._record("loss_token", token.sum() / batch.local_tokens.clamp(min=1))
        self._record("loss_sentence", sentence.sum() / batch.teacher_labels.ne(-100).sum().clamp(min=1))
        self._record("hybrid_gate", gate.mean())
        return {"ce": (ce_sum / batch.n_target, self._ce_weight),
                "hybrid": (hybrid_loss(token, sentence, gate, batch.n_target, batch.n_teacher), args.alpha)}

    def _ckd_term(self, outputs, teacher_outputs, batch: _Batch):
        """CKD (Wu et al. 2020): sums over tokens, the encoder's divided by source tokens, the decoder's by target
        tokens, added over stacks."""
        total, logged = 0.0, 0.0
        for stack, module in self.distillation_modules["ckd"].items():
            student_states = [h[:batch.size] for h in getattr(outputs, f"{stack}_hidden_states")]
            teacher_states = getattr(teacher_outputs, f"{stack}_hidden_states")
            if stack == "encoder":
                mask, count, local = batch.source_mask, batch.n_source, batch.source_mask.sum()
            else:
                mask, count, local = batch.labels.ne(-100), batch.n_target, batch.local_tokens
            value = module(student_states, teacher_states, mask, reduction="sum")
            total = total + value / count
            logged = logged + value.detach() / local.clamp(min=1)
        self._record("loss_ckd", logged)
        return total

    @torch.no_grad()
    def _teacher_forward(self, inputs):
        teacher_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "decoder_input_ids",
                                                 "decoder_attention_mask") if k in inputs}
        return self.teacher_model(**teacher_inputs, output_hidden_states=self.args.uses_ckd)

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
        ``generation_num_beams``, else the run's ``max_new_tokens`` (the final evaluation's limit, so that validation
        measures what it measures) and greedy search (not the student's ``generation_config.max_length``, 20 for a
        model built from a config); the length always capped at the student's position table."""
        kwargs = dict(gen_kwargs or {})
        student = self.accelerator.unwrap_model(self.model)
        positions = max_target_positions(student)
        if kwargs.get("max_length") is None and kwargs.get("max_new_tokens") is None:
            if self.args.generation_max_length is not None:
                kwargs["max_length"] = self.args.generation_max_length
            else:
                kwargs["max_new_tokens"] = self.args.max_new_tokens
        if kwargs.get("max_new_tokens") is not None:
            kwargs["max_new_tokens"] = cap_max_new_tokens(student, kwargs["max_new_tokens"])
        elif positions is not None:  # max_length counts the decoder start token too
            kwargs["max_length"] = min(kwargs["max_length"], positions + 1)
        if kwargs.get("num_beams") is None:
            kwargs["num_beams"] = self.args.generation_num_beams or 1
        for key, value in self.languages.generate_kwargs().items():
            kwargs.setdefault(key, value)
        return kwargs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """``Seq2SeqTrainer.prediction_step``; with ``predict_with_generate`` (which calls the student and
        ``generate`` directly) the trainer's own columns (``teacher_labels``) are removed first, and the student's
        ``generation_config`` is put back afterwards: Transformers fills it with every default in place (``max_length``
        20 among them), which the saved student would keep and every later ``generate(max_new_tokens=...)`` would
        warn about."""
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        inputs = {k: v for k, v in inputs.items() if k not in EXTRA_LABEL_COLUMNS}
        student = self.accelerator.unwrap_model(self.model)  # FSDP1 / XLA-FSDP: self.model is the wrapper
        kept = copy.deepcopy(student.generation_config)
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        finally:
            student.generation_config = kept

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
