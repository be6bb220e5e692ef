"""``DistillationTrainingArguments``: ``Seq2SeqTrainingArguments`` plus every knowledge-distillation field, and the
read-only answers to what a run needs (:class:`DistillationMethod`, the teacher, the Seq-KD corpus)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import Seq2SeqTrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available, logging

from .distributed import check_teacher_sharding
from .evaluation import resolve_bleu_tokenize
from .generation import GenerationSettings
from .hybrid import parse_hybrid_gate
from .intermediate import LAYER_MAPPING_STRATEGIES
from .losses import DIVERGENCES, TAILS
from .seqkd import parse_corpus_part

logger = logging.get_logger(__name__)

__all__ = ["DistillationTrainingArguments", "DistillationMethod", "KD_TARGETS", "INTERMEDIATE_LAYERS"]

KD_TARGETS = ("target", "teacher_target", "seq_inter_target")
INTERMEDIATE_LAYERS = ("encoder", "decoder", "both")


@dataclass(frozen=True)
class DistillationMethod:
    """What a run distils, as data (model cards, tags and reports read it; nothing parses a name back).

    Attributes:
        target: the training target column: ``"target"`` (gold), ``"teacher_target"`` (Seq-KD) or
            ``"seq_inter_target"`` (Seq-Inter).
        word_kd: the word-level term (Kim & Rush 2016, Sec. 3.1) is on.
        ckd: the CKD hidden-state term (Wu et al. 2020) is on.
        hybrid: the hybrid token/sentence objective (Wei et al. 2024) replaces the word-level term.
        divergence: the word-level divergence (``"forward_kl"``, ...).
        continued_from: a saved student this run continued (the staged Seq-KD -> Seq-Inter student), or ``None``.
        sparsity: the fraction of weights pruned (See et al. 2016), or ``None``.
    """

    target: str = "target"
    word_kd: bool = False
    ckd: bool = False
    hybrid: bool = False
    divergence: str = "forward_kl"
    continued_from: str | None = None
    sparsity: float | None = None

    @property
    def name(self) -> str:
        """A short display name, e.g. ``seq-kd+word-kd`` (for tags and titles only)."""
        parts = [{"target": "baseline", "teacher_target": "seq-kd", "seq_inter_target": "seq-inter"}[self.target]]
        parts += [p for p, on in (("hybrid-kd", self.hybrid), ("word-kd", self.word_kd), ("ckd", self.ckd),
                                  ("pruned", self.sparsity is not None)) if on]
        return "+".join(parts)

    def with_(self, **changes) -> "DistillationMethod":
        """A copy with ``changes`` (e.g. ``sparsity=0.8`` for a pruned student)."""
        return DistillationMethod(**{**self.__dict__, **changes})


@dataclass
class DistillationTrainingArguments(Seq2SeqTrainingArguments):
    r"""
    Configuration for [`DistillationTrainer`]. Every field of `Seq2SeqTrainingArguments` applies; the fields below
    add knowledge distillation. The loss of one batch is

        (1 - alpha - intermediate_loss_weight) * CE(labels)                  # label_smoothing_factor applies
        + alpha * T^2 * D(p_teacher^T || p_student^T)                         # word-level KD, Kim & Rush 2016 Sec. 3.1
        + intermediate_loss_weight * L_ckd                                     # CKD, Wu et al. 2020

    With `hybrid_gate` set the word-level term becomes `alpha * [g * L_token + (1 - g) * L_sentence]` (Wei et al.
    2024; `alpha=1` is the paper's objective). Every term is a sum over tokens divided by the token count of the
    whole accumulated (all-process) batch, so gradient accumulation gives the gradient of one big batch. The
    properties (`method`, `teacher_runs_during_training`, `needs_seqkd_corpus`, ...) answer what a run needs; the
    trainer, the recipes and the model card ask them.

    Under `torchrun` (or `accelerate launch` with several processes) on a machine without an accelerator, `use_cpu`
    is switched on, so that the processes train together (gloo) instead of each training alone; without an
    accelerator `dataloader_pin_memory` is switched off (it only speeds up copies to a device). `bf16=True` where
    Transformers cannot train in it (no bf16 GPU, no TPU, `use_cpu` off) raises `ValueError` saying to pass
    `--bf16 false`.

    Parameters:
        > Teacher

        teacher_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Teacher to load with `AutoModelForSeq2SeqLM.from_pretrained` when no `teacher_model` is given to the
            trainer and the run needs one.
        teacher_dtype (`str` or `None`, *optional*, defaults to `None`):
            Run the teacher in `"bfloat16"`, `"float16"` or `"float32"` during training; `None` keeps its dtype.
        teacher_sharding (`str` or `None`, *optional*, defaults to `None`):
            Where the teacher lives on several processes (`hf_seqkd.distributed`): `"replicate"` (a copy per
            process), `"fsdp"` (sharded with FSDP2, about `1 / num_processes` of it per process) or `"deepspeed"`
            (a ZeRO-3 inference engine). `None` follows the student: sharded under FSDP or DeepSpeed ZeRO-3,
            replicated otherwise. A sharded teacher cannot decode the hybrid's teacher labels during training
            (build them into the dataset first).
        teacher_device_map (`str` or `None`, *optional*, defaults to `None`):
            Load the teacher with accelerate's big-model inference, for a teacher larger than one device: `"auto"`,
            `"balanced"`, `"sequential"` or a JSON object `{"module": device}` (`from_pretrained(device_map=...)`;
            layers on several GPUs, the CPU or disk, moved by hooks, never by hf_seqkd). Loaded in
            `teacher_dtype`. Not with a sharded teacher, nor with several processes (each would load its own copy).
            Keep the embeddings and position tables off disk: accelerate reloads offloaded weights from the
            checkpoint, which has no copy of tied embeddings or of Marian's sinusoidal positions.
        teacher_offload_folder (`str` or `None`, *optional*, defaults to `None`):
            Where `teacher_device_map` may put the layers that fit on no device (`offload_folder`).
        teacher_ctranslate2_dir (`str` or `None`, *optional*, defaults to `None`):
            The teacher converted with `hf_seqkd.export.to_ctranslate2`: the Seq-KD corpus is translated by
            CTranslate2 (several times faster on a CPU) instead of `teacher.generate`.

        > Word-level distillation (Hinton et al. 2015; Kim & Rush 2016, Sec. 3.1)

        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the word-level term. `0` trains exactly as a `Seq2SeqTrainer` would (the teacher does not
            run); `1` is pure distillation. Kim & Rush 2016 found 0.5 better than 0.9.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of both distributions; the term is multiplied by its square.
        divergence (`str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"` (KL(teacher || student), Kim & Rush's), `"reverse_kl"`, `"jsd"` (generalised
            Jensen-Shannon with `jsd_beta`) or `"tvd"` (total variation distance).
        jsd_beta (`float`, *optional*, defaults to `0.5`):
            Teacher weight of the generalised JSD mixture `m = jsd_beta * p_t + (1 - jsd_beta) * p_s`, in (0, 1).
        kd_chunk_size (`int`, *optional*, defaults to `1024`):
            Target positions whose vocabulary distributions are processed at once in the KD loss (memory).
        teacher_distributions (`str`, *optional*, defaults to `"online"`):
            Where the word-level term's teacher distributions come from: `"online"` (the teacher runs forward at
            every step) or `"stored"` (its top-`teacher_top_k` log-probabilities and tail are computed once, by one
            teacher-forced pass over the training targets, cached in `seqkd_cache_dir` like the Seq-KD corpus,
            and training runs with no teacher loaded; `hf_seqkd.teacher_distributions`). Not with CKD or the
            hybrid objective, which need the teacher's forward pass. The evaluation loss (on data without stored
            distributions) is then the cross-entropy alone.
        teacher_top_k (`int`, *optional*, defaults to `32`):
            k of the stored distributions (tokens kept per target position; 130 bytes per token at 32).
        teacher_tail (`str`, *optional*, defaults to `"bucket"`):
            What the stored loss does with the probability the top-k leave out: `"bucket"` (both distributions
            grouped into the k tokens and one bucket for the rest) or `"uniform"` (spread evenly over the other
            tokens, the divergence over the whole vocabulary); `hf_seqkd.losses.stored_token_divergence`.

        > Data preparation (the trainer tokenizes raw `source`/`target` data with these)

        max_source_length (`int`, *optional*, defaults to `256`):
            Sources are truncated to this many tokens (the number of truncated sentences is logged).
        max_target_length (`int`, *optional*, defaults to `256`):
            Targets are truncated to this many tokens.
        source_prefix (`str`, *optional*, defaults to `""`):
            Text put before every source, e.g. T5's `"translate German to English: "`; empty: the model's own prefix
            for the language pair when it has one (T5's `task_specific_params`).
        src_lang (`str` or `None`, *optional*, defaults to `None`):
            The source language as the tokenizer codes it (`"deu_Latn"` for NLLB, `"de_DE"` for mBART-50, `"de"` for
            M2M100), as `run_translation.py` names it; `None`: the code the tokenizer was loaded with. Tokenizers
            without codes ignore it.
        tgt_lang (`str` or `None`, *optional*, defaults to `None`):
            The target language, likewise; for a multilingual tokenizer its token is forced as the first generated
            token of every `generate` the run makes (`forced_bos_token_id`). For other tokenizers a plain name
            (`"zh"`) still chooses the BLEU tokenizer. `hf_seqkd.languages.resolve_languages` resolves both.
        bleu_tokenize (`str` or `None`, *optional*, defaults to `None`):
            sacrebleu's tokenizer for BLEU in validation, Seq-Inter and the evaluations (`"13a"`, `"zh"`,
            `"ja-mecab"`, `"char"`, ...); `None` chooses it from the target language
            (`hf_seqkd.evaluation.resolve_bleu_tokenize`).
        generation_num_beams (`int` or `None`, *optional*, defaults to `None`):
            Beam size of validation with `predict_with_generate`; `None` decodes greedily, as the greedy column of
            the final evaluation does (Transformers' own default would be the model's generation config).
        early_stopping_patience (`int` or `None`, *optional*, defaults to `None`):
            Stop training once `metric_for_best_model` (e.g. `"bleu"`: validation BLEU) has not improved by more than
            `early_stopping_threshold` for this many evaluations in a row (Transformers' `EarlyStoppingCallback`);
            with `load_best_model_at_end=True` the best checkpoint is the one kept. Needs `eval_strategy` and
            `metric_for_best_model`. `None`: train for the whole `num_train_epochs` / `max_steps`. A run resumed from
            a checkpoint keeps the count of evaluations without improvement, and stops where it would have.
        early_stopping_threshold (`float`, *optional*, defaults to `0.0`):
            The smallest change of `metric_for_best_model` that counts as an improvement.

        > Sequence-level distillation (Kim & Rush 2016, Sec. 3.2-3.3)

        kd_target (`str`, *optional*, defaults to `"target"`):
            The column to train on: `"target"` (gold references, the baseline), `"teacher_target"` (Seq-KD) or
            `"seq_inter_target"` (Seq-Inter). Given raw data without it, the trainer builds the Seq-KD corpus.
        gold_mix_ratio (`float`, *optional*, defaults to `0.0`):
            Fraction of training pairs whose target is replaced by the gold reference when `kd_target` is not
            `"target"` (chosen once, reproducibly from `seed`).
        num_beams (`int`, *optional*, defaults to `5`):
            The teacher's beam size for the Seq-KD corpus (Kim & Rush used 5).
        num_return_sequences (`int`, *optional*, defaults to `1`):
            K, the size of the teacher's K-best list; `seq_inter_target` needs K > 1 (the paper: 35, with a beam of
            35). At most `num_beams` (an error otherwise, never a silent rewrite).
        max_new_tokens (`int`, *optional*, defaults to `128`):
            The longest translation the run generates: the corpus, validation with `predict_with_generate` (unless
            `generation_max_length` is set) and the recipes' final evaluation (the hybrid objective's teacher
            decoding has its own limit, see `hybrid_gate`).
        generation_batch_size (`int`, *optional*, defaults to `64`):
            The most sentences per `generate` call while building the corpus.
        max_tokens_per_batch (`int` or `None`, *optional*, defaults to `None`):
            Token budget per `generate` call (sentences x longest source x beams).
        seq_inter_metric (`str`, *optional*, defaults to `"bleu"`):
            Similarity to the reference for Seq-Inter: `"bleu"` (smoothed sentence BLEU, the paper's) or `"chrf"`.
        seqkd_cache_dir (`str` or `None`, *optional*, defaults to `None`):
            Where the corpus is cached (default `<output_dir>/../seqkd_cache`): a rerun with the same teacher, data
            and settings reuses it, an interrupted one resumes.
        seqkd_corpus_part (`str` or `None`, *optional*, defaults to `None`):
            `"i/N"`: build only part i of N of the Seq-KD corpus into `seqkd_cache_dir` and stop (machines without
            a shared file system; `recipes/seq_kd.py` then exits). Merge the parts' folders with
            `python -m hf_seqkd.cli merge PART_DIR... --into CACHE_DIR` and run again with that cache.

        > Intermediate-layer distillation (CKD, Wu et al. 2020)

        intermediate_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the hidden-state loss; `0` disables it (the paper's example run: `alpha=0.2`, `0.7`). Its
            projections train as part of the student and are not in the exported student.
        layer_mapping (`str`, *optional*, defaults to `"regular_comb"`):
            A strategy name (`"skip"`, `"regular_comb"`, `"overlap_comb"`, `"skip_middle"`, `"cross_comb"`,
            `"skip_comb"`; their rule for any depths is in `hf_seqkd.intermediate`) or an explicit JSON mapping of
            1-based student layers to 1-based teacher layers, e.g. `'{"1": [1, 2, 3], "2": [4, 5, 6]}'`.
        intermediate_layers (`str`, *optional*, defaults to `"encoder"`):
            Which stack to distil: `"encoder"` (the paper's choice), `"decoder"` or `"both"`.

        > Hybrid token/sentence distillation (Wei et al. 2024)

        hybrid_gate (`str` or `None`, *optional*, defaults to `None`):
            `None` disables the hybrid objective; `"scalar"` learns one gate; `"input"` a gate per sentence from the
            student's mean-pooled encoder output; a number (e.g. `"0.5"`) fixes it. Needs `alpha > 0`. The teacher's
            sequences come from the `teacher_target` column (the Seq-KD corpus, built when missing) or, for
            tokenized data without `teacher_labels`, from greedy decoding (cached per sentence; at most
            `generation_max_length - 1` new tokens, or twice the source length plus 10 when it is unset).
        hybrid_gate_init (`float`, *optional*, defaults to `0.5`):
            Initial value of a learned gate; strictly inside `hybrid_gate_bounds`.
        hybrid_gate_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of a learned gate (same schedule as the student's); `None`: a tenth of `learning_rate`.
        hybrid_gate_bounds (`str`, *optional*, defaults to `"0.1,0.9"`):
            A learned gate is `lo + (hi - lo) * sigmoid(.)`. Trained on the loss it weights, a gate moves towards
            the currently smaller term and ends at a bound; the bounds keep both terms (`docs/hybrid_gate.md`).
    """

    # teacher
    teacher_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Teacher to load."})
    teacher_dtype: Optional[str] = field(default=None, metadata={"help": "bfloat16, float16 or float32."})
    teacher_sharding: Optional[str] = field(default=None, metadata={"help": "replicate, fsdp or deepspeed (None: "
                                                                            "follow the student's FSDP / ZeRO-3)."})
    teacher_device_map: Optional[str] = field(default=None, metadata={"help": "Big-model inference for the teacher: "
                                                                              "auto, balanced, sequential or JSON."})
    teacher_offload_folder: Optional[str] = field(default=None, metadata={"help": "Disk offload folder of "
                                                                                  "teacher_device_map."})
    teacher_ctranslate2_dir: Optional[str] = field(default=None, metadata={"help": "Translate the Seq-KD corpus with "
                                                                                    "this CTranslate2 teacher."})
    # word level
    alpha: float = field(default=0.5, metadata={"help": "Weight of the word-level KD term (0 = Seq2SeqTrainer)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature for word-level KD."})
    divergence: str = field(default="forward_kl", metadata={"help": f"One of {DIVERGENCES}."})
    jsd_beta: float = field(default=0.5, metadata={"help": "Teacher weight of the generalised JSD mixture."})
    kd_chunk_size: int = field(default=1024, metadata={"help": "Positions per chunk in the KD loss."})
    teacher_distributions: str = field(default="online", metadata={"help": "online (teacher forward every step) or "
                                                                           "stored (top-k computed once)."})
    teacher_top_k: int = field(default=32, metadata={"help": "k of the stored teacher distributions."})
    teacher_tail: str = field(default="bucket", metadata={"help": "bucket or uniform: the stored loss's tail."})
    # data preparation
    max_source_length: int = field(default=256, metadata={"help": "Source truncation length (tokens)."})
    max_target_length: int = field(default=256, metadata={"help": "Target truncation length (tokens)."})
    source_prefix: str = field(default="", metadata={"help": "Text put before every source (T5's task prefix)."})
    src_lang: Optional[str] = field(default=None, metadata={"help": "Source language code of the tokenizer "
                                                                    "(deu_Latn, de_DE, de)."})
    tgt_lang: Optional[str] = field(default=None, metadata={"help": "Target language code of the tokenizer, forced "
                                                                    "as the first generated token."})
    bleu_tokenize: Optional[str] = field(default=None, metadata={"help": "sacrebleu tokenizer of BLEU (None: from "
                                                                          "the target language)."})
    early_stopping_patience: Optional[int] = field(default=None, metadata={"help": "Stop after this many "
                                                                                   "evaluations without improvement."})
    early_stopping_threshold: float = field(default=0.0, metadata={"help": "Least improvement that counts."})
    # sequence level
    kd_target: str = field(default="target", metadata={"help": f"Training target column, one of {KD_TARGETS}."})
    gold_mix_ratio: float = field(default=0.0, metadata={"help": "Fraction of pairs kept with the gold target."})
    num_beams: int = field(default=5, metadata={"help": "The teacher's beam size for the Seq-KD corpus."})
    num_return_sequences: int = field(default=1, metadata={"help": "K of the teacher's K-best list (Seq-Inter: K > 1, "
                                                                   "at most num_beams)."})
    max_new_tokens: int = field(default=128, metadata={"help": "The longest translation generated (corpus, "
                                                               "validation, final evaluation)."})
    generation_batch_size: int = field(default=64, metadata={"help": "Sentences per generate call (corpus)."})
    max_tokens_per_batch: Optional[int] = field(default=None, metadata={"help": "Token budget per generate call."})
    seq_inter_metric: str = field(default="bleu", metadata={"help": "bleu or chrf."})
    seqkd_cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache of the Seq-KD corpus."})
    seqkd_corpus_part: Optional[str] = field(default=None, metadata={"help": "i/N: build only this part of the "
                                                                             "Seq-KD corpus, then stop."})
    # CKD
    intermediate_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the CKD hidden-state loss."})
    layer_mapping: str = field(default="regular_comb", metadata={"help": "CKD mapping strategy or JSON mapping."})
    intermediate_layers: str = field(default="encoder", metadata={"help": "encoder, decoder or both."})
    # hybrid
    hybrid_gate: Optional[str] = field(default=None, metadata={"help": "None, 'scalar', 'input' or a fixed float."})
    hybrid_gate_init: float = field(default=0.5, metadata={"help": "Initial value of a learned hybrid gate."})
    hybrid_gate_learning_rate: Optional[float] = field(default=None, metadata={"help": "Learning rate of a learned "
                                                                                       "gate (None: lr / 10)."})
    hybrid_gate_bounds: str = field(default="0.1,0.9", metadata={"help": "lo,hi range of a learned gate."})

    def __post_init__(self):
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # Under torchrun on a machine without an accelerator, Transformers' arguments stay single-process
            # unless use_cpu is set: every process would train the whole model alone and write the same folder.
            self.use_cpu = True
            logger.info("WORLD_SIZE > 1 and no accelerator: use_cpu=True (distributed training on CPUs, gloo)")
        if self.dataloader_pin_memory and not _has_accelerator():  # pinned memory serves only a device's copies:
            self.dataloader_pin_memory = False                    # torch warns at every data loader otherwise
        if ((self.bf16 or self.bf16_full_eval) and not self.use_cpu and not is_torch_bf16_gpu_available()
                and not is_torch_xla_available()):
            # where Transformers refuses it too, with a message ("Your setup doesn't support bf16/gpu") that does not
            # say which setting to change
            raise ValueError("bf16=True (mixed precision on a GPU with bfloat16, Ampere or newer; the recipes' Hub "
                             "configs set it) but this machine has no such GPU: pass --bf16 false to train in float32 "
                             "(or --use_cpu true to train in bfloat16 on the CPU, which most CPUs run slowly)")
        super().__post_init__()
        self._check_early_stopping()
        self._check_teacher()
        self._check_word_level()
        self._check_sequence_level()
        self._check_ckd_and_hybrid()

    def _check_early_stopping(self):
        metric = (self.metric_for_best_model or "").removeprefix("eval_")
        evaluates = self.evaluates_during_training
        if metric in ("bleu", "chrf") and evaluates and not self.predict_with_generate:
            raise ValueError(f"metric_for_best_model={self.metric_for_best_model!r} is computed from the student's "
                             "translations of the validation split: set predict_with_generate=True (or choose "
                             "metric_for_best_model='loss')")
        if self.early_stopping_patience is None:
            return
        if self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience={self.early_stopping_patience}: give a number of evaluations "
                             ">= 1 (or None to train to the end)")
        if not evaluates:
            raise ValueError("early_stopping_patience needs evaluation during training: set eval_strategy (steps or "
                             "epoch) and a validation split")
        if self.metric_for_best_model is None or not self.load_best_model_at_end:
            raise ValueError("early_stopping_patience needs metric_for_best_model (e.g. bleu, with "
                             "predict_with_generate) and load_best_model_at_end=True, so that the best checkpoint is "
                             f"the one kept (got metric_for_best_model={self.metric_for_best_model!r}, "
                             f"load_best_model_at_end={self.load_best_model_at_end})")

    def _check_teacher(self):
        if self.teacher_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}: use bfloat16, float16, float32 or None")
        if self.teacher_offload_folder and self.teacher_device_map is None:
            raise ValueError(f"teacher_offload_folder={self.teacher_offload_folder!r} is used only with "
                             "teacher_device_map (big-model inference); set both, or neither")
        if self.teacher_device_map is not None:
            self.teacher_loading_kwargs()  # a malformed device map is an error now, not after the data is loaded
            if self.world_size > 1:
                raise ValueError(f"teacher_device_map={self.teacher_device_map!r} spreads one teacher over this "
                                 f"machine's devices, but this run has {self.world_size} processes, each of which "
                                 "would load its own copy over the same devices. Build the corpus in one process "
                                 "(python recipes/seq_kd.py, not torchrun / accelerate launch), or shard the teacher "
                                 "over the processes with teacher_sharding='fsdp' or 'deepspeed'")
            if self.teacher_sharding not in (None, "replicate"):
                raise ValueError(f"teacher_device_map={self.teacher_device_map!r} with teacher_sharding="
                                 f"{self.teacher_sharding!r}: a teacher placed by big-model inference is not sharded "
                                 "again; use one or the other")
        check_teacher_sharding(self.teacher_sharding)
        if self.teacher_ctranslate2_dir and not os.path.isfile(os.path.join(self.teacher_ctranslate2_dir,
                                                                             "model.bin")):
            raise ValueError(f"teacher_ctranslate2_dir={self.teacher_ctranslate2_dir}: no CTranslate2 model there "
                             "(model.bin); convert the teacher with hf_seqkd.export.to_ctranslate2 first")

    def teacher_loading_kwargs(self) -> dict:
        """``AutoModelForSeq2SeqLM.from_pretrained`` arguments for the teacher: with ``teacher_device_map``, the
        device map, the offload folder and ``teacher_dtype`` (cast while loading); else none."""
        if self.teacher_device_map is None:
            return {}
        device_map = self.teacher_device_map
        if device_map.lstrip().startswith("{"):
            try:
                device_map = json.loads(device_map)
            except json.JSONDecodeError as e:
                raise ValueError(f"teacher_device_map={self.teacher_device_map!r} is not valid JSON ({e}); give "
                                 'e.g. \'{"model.encoder": 0, "model.decoder": 1, "lm_head": 1}\' or "auto"') from e
        elif device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(f"teacher_device_map={device_map!r}: use auto, balanced, balanced_low_0, sequential or a "
                             'JSON object mapping module names to devices (e.g. \'{"": "cuda:0"}\')')
        kwargs = {"device_map": device_map}
        if self.teacher_offload_folder:
            kwargs["offload_folder"] = self.teacher_offload_folder
        if self.teacher_dtype is not None:
            kwargs["dtype"] = self.teacher_dtype
        return kwargs

    def _check_word_level(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r} is not one of {DIVERGENCES}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.teacher_distributions not in ("online", "stored"):
            raise ValueError(f"teacher_distributions={self.teacher_distributions!r}: use 'online' (the teacher runs "
                             "at every step) or 'stored' (its top-k distributions computed once)")
        if self.teacher_distributions == "stored":
            if self.teacher_tail not in TAILS:
                raise ValueError(f"teacher_tail={self.teacher_tail!r}: use one of {TAILS}")
            if self.teacher_top_k < 1:
                raise ValueError(f"teacher_top_k must be a positive number of tokens, got {self.teacher_top_k}")
            if self.alpha <= 0:
                raise ValueError("teacher_distributions='stored' stores the teacher's word-level distributions, and "
                                 "alpha=0 has no word-level term: set alpha > 0 or leave teacher_distributions unset")
            if self.intermediate_loss_weight > 0 or self.hybrid_gate is not None:
                raise ValueError("teacher_distributions='stored' replaces only the word-level term; CKD "
                                 "(intermediate_loss_weight > 0) and the hybrid objective (hybrid_gate) need the "
                                 "teacher's forward pass at every step: use teacher_distributions='online' with them")

    def _check_sequence_level(self):
        if self.kd_target not in KD_TARGETS:
            raise ValueError(f"kd_target={self.kd_target!r} is not one of {KD_TARGETS}")
        if not 0.0 <= self.gold_mix_ratio <= 1.0:
            raise ValueError(f"gold_mix_ratio must be in [0, 1], got {self.gold_mix_ratio}")
        for name in ("max_source_length", "max_target_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive number of tokens, got {getattr(self, name)}")
        self.seqkd_generation  # noqa: B018 - raises on a bad or conflicting beam size / K / limit
        if self.kd_target == "seq_inter_target" and self.num_return_sequences < 2:
            raise ValueError(f"kd_target='seq_inter_target' chooses among the teacher's K-best list and needs "
                             f"num_return_sequences K > 1, got {self.num_return_sequences} (Kim & Rush used K = 35 "
                             "with num_beams = 35)")
        if self.seqkd_corpus_part is not None:
            parse_corpus_part(self.seqkd_corpus_part)  # raises on a bad value
        if self.seq_inter_metric not in ("bleu", "chrf"):
            raise ValueError(f"seq_inter_metric={self.seq_inter_metric!r}: use 'bleu' or 'chrf'")
        if self.bleu_tokenize is not None:
            self.resolved_bleu_tokenize()  # raises on an unknown tokenizer name

    def _check_ckd_and_hybrid(self):
        if self.intermediate_loss_weight < 0 or self.alpha + self.intermediate_loss_weight > 1.0 + 1e-9:
            raise ValueError(f"need intermediate_loss_weight >= 0 and alpha + intermediate_loss_weight <= 1, got "
                             f"alpha={self.alpha}, intermediate_loss_weight={self.intermediate_loss_weight}")
        if self.intermediate_layers not in INTERMEDIATE_LAYERS:
            raise ValueError(f"intermediate_layers={self.intermediate_layers!r} is not one of {INTERMEDIATE_LAYERS}")
        gate = parse_hybrid_gate(self.hybrid_gate)  # raises on a bad value
        if gate is not None and self.alpha <= 0:
            raise ValueError(f"hybrid_gate={self.hybrid_gate!r} needs alpha > 0: alpha is the weight of the hybrid "
                             "term (alpha=1 is Wei et al.'s objective)")
        lo, hi = self.gate_bounds
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"hybrid_gate_bounds={self.hybrid_gate_bounds!r}: need 0 <= lo < hi <= 1")
        if gate in ("scalar", "input") and not lo < self.hybrid_gate_init < hi:
            raise ValueError(f"hybrid_gate_init={self.hybrid_gate_init} must lie strictly inside "
                             f"hybrid_gate_bounds ({lo}, {hi})")
        if self.hybrid_gate_learning_rate is not None and self.hybrid_gate_learning_rate < 0:
            raise ValueError(f"hybrid_gate_learning_rate must be >= 0, got {self.hybrid_gate_learning_rate}")
        mapping = str(self.layer_mapping).strip()
        if mapping not in LAYER_MAPPING_STRATEGIES:
            try:
                json.loads(mapping)
            except json.JSONDecodeError as e:
                raise ValueError(f"layer_mapping={self.layer_mapping!r} is neither a strategy "
                                 f"({', '.join(LAYER_MAPPING_STRATEGIES)}) nor valid JSON ({e.msg})") from None

    # ------------------------------------------------------------------------ what the run needs (one owner)
    @property
    def evaluates_during_training(self) -> bool:
        """Validation runs during training (``eval_strategy`` is not ``"no"``): a validation split is needed."""
        return str(self.eval_strategy) not in ("no", "IntervalStrategy.NO")

    @property
    def uses_hybrid(self) -> bool:
        """The hybrid token/sentence objective replaces the word-level term (``hybrid_gate`` is set)."""
        return self.hybrid_gate is not None

    @property
    def uses_word_kd(self) -> bool:
        """The word-level term is on (``alpha > 0`` without the hybrid objective, which replaces it)."""
        return self.alpha > 0 and not self.uses_hybrid

    @property
    def uses_ckd(self) -> bool:
        """The CKD hidden-state term is on (``intermediate_loss_weight > 0``)."""
        return self.intermediate_loss_weight > 0

    @property
    def uses_stored_distributions(self) -> bool:
        """The word-level term trains against the teacher's stored top-k distributions (``teacher_distributions=
        "stored"``), not its forward pass."""
        return self.uses_word_kd and self.teacher_distributions == "stored"

    @property
    def teacher_runs_during_training(self) -> bool:
        """The teacher's forward pass is part of every training step (online word-level, CKD or hybrid terms)."""
        return (self.alpha > 0 and not self.uses_stored_distributions) or self.uses_ckd or self.uses_hybrid

    @property
    def needs_teacher_model(self) -> bool:
        """The run needs the teacher as a Transformers model: during training, to build the Seq-KD corpus (unless a
        CTranslate2 teacher builds it), or to compute the stored distributions (unless the data carries them)."""
        return (self.teacher_runs_during_training or self.uses_stored_distributions
                or (self.needs_seqkd_corpus and not self.teacher_ctranslate2_dir))

    @property
    def needs_seqkd_corpus(self) -> bool:
        """Raw training data needs the teacher's translations: Seq-KD / Seq-Inter targets, or the hybrid objective's
        teacher sequences (its ``teacher_target``)."""
        return self.kd_target != "target" or self.uses_hybrid

    @property
    def teacher_labels_column(self) -> str | None:
        """The corpus column tokenized into ``teacher_labels`` (the hybrid objective's sentence-level target)."""
        return "teacher_target" if self.uses_hybrid else None

    @property
    def has_auxiliary_parameters(self) -> bool:
        """The run trains modules of its own besides the student: CKD projections or a learned hybrid gate."""
        return self.uses_ckd or parse_hybrid_gate(self.hybrid_gate) in ("scalar", "input")

    @property
    def method(self) -> DistillationMethod:
        """The distillation method of this run, as data."""
        return DistillationMethod(target=self.kd_target, word_kd=self.uses_word_kd, ckd=self.uses_ckd,
                                  hybrid=self.uses_hybrid, divergence=self.divergence)

    @property
    def seqkd_generation(self) -> GenerationSettings:
        """How the teacher decodes the Seq-KD corpus (``num_beams``, ``num_return_sequences``, ...)."""
        return GenerationSettings(num_beams=self.num_beams, num_return_sequences=self.num_return_sequences,
                                  max_new_tokens=self.max_new_tokens, generation_batch_size=self.generation_batch_size,
                                  max_tokens_per_batch=self.max_tokens_per_batch)

    def card_hyperparameters(self) -> dict:
        """The settings of this run's method, for its model card: only those the method used (no corpus settings
        for a run that built no corpus), ``None`` values left out."""
        out = {"kd_target": self.kd_target, "learning_rate": self.learning_rate,
               "num_train_epochs": None if self.max_steps > 0 else self.num_train_epochs,
               "max_steps": self.max_steps if self.max_steps > 0 else None,
               "label_smoothing_factor": self.label_smoothing_factor or None, "src_lang": self.src_lang,
               "tgt_lang": self.tgt_lang, "source_prefix": self.source_prefix or None}
        if self.alpha > 0:
            out.update(alpha=self.alpha, temperature=self.temperature, divergence=self.divergence,
                       jsd_beta=self.jsd_beta if self.divergence == "jsd" else None)
        if self.uses_stored_distributions:
            out.update(teacher_distributions="stored", teacher_top_k=self.teacher_top_k,
                       teacher_tail=self.teacher_tail)
        if self.needs_seqkd_corpus:
            out.update(num_beams=self.num_beams, num_return_sequences=self.num_return_sequences,
                       max_new_tokens=self.max_new_tokens,
                       seq_inter_metric=self.seq_inter_metric if self.num_return_sequences > 1 else None,
                       gold_mix_ratio=self.gold_mix_ratio or None)
        if self.uses_ckd:
            out.update(intermediate_loss_weight=self.intermediate_loss_weight, layer_mapping=self.layer_mapping,
                       intermediate_layers=self.intermediate_layers)
        if self.uses_hybrid:
            out.update(hybrid_gate=self.hybrid_gate, hybrid_gate_bounds=self.hybrid_gate_bounds,
                       hybrid_gate_init=self.hybrid_gate_init,
                       hybrid_gate_learning_rate=self.hybrid_gate_learning_rate)
        return {k: v for k, v in out.items() if v is not None}

    @property
    def gate_bounds(self) -> tuple[float, float]:
        try:
            lo, hi = (float(x) for x in str(self.hybrid_gate_bounds).split(","))
        except ValueError:
            raise ValueError(f"hybrid_gate_bounds={self.hybrid_gate_bounds!r}: expected 'lo,hi', e.g. '0.1,0.9'") \
                from None
        return lo, hi

    def resolved_bleu_tokenize(self, target_language: str | None = None) -> str:
        """``bleu_tokenize``, or the sacrebleu tokenizer for ``target_language``
        (:func:`hf_seqkd.evaluation.resolve_bleu_tokenize`)."""

        return resolve_bleu_tokenize(target_language, self.bleu_tokenize)


def _has_accelerator() -> bool:
    """A CUDA (or other torch accelerator) device is available."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
