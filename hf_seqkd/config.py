"""``DistillationTrainingArguments``: ``Seq2SeqTrainingArguments`` plus every knowledge-distillation field."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import Seq2SeqTrainingArguments
from transformers.utils import logging

from .hybrid import parse_hybrid_gate
from .intermediate import LAYER_MAPPING_STRATEGIES
from .losses import DIVERGENCES

logger = logging.get_logger(__name__)

__all__ = ["DistillationTrainingArguments", "KD_TARGETS", "INTERMEDIATE_LAYERS"]

KD_TARGETS = ("target", "teacher_target", "seq_inter_target")
INTERMEDIATE_LAYERS = ("encoder", "decoder", "both")


@dataclass
class DistillationTrainingArguments(Seq2SeqTrainingArguments):
    r"""
    Configuration for [`DistillationTrainer`]. Every field of `Seq2SeqTrainingArguments` applies; the fields below
    add knowledge distillation.

    The loss of one batch is

        (1 - alpha - intermediate_loss_weight) * CE(labels)                       # label_smoothing_factor applies
        + alpha * T^2 * D(p_teacher^T || p_student^T)                              # word-level KD, Kim & Rush 2016 Sec. 3.1
        + intermediate_loss_weight * L_ckd                                          # CKD, Wu et al. 2020

    With `hybrid_gate` set, the word-level term is replaced by the hybrid objective of Wei et al. 2024 (still weighted
    by `alpha`; `alpha=1` is the paper's objective, a smaller `alpha` keeps some gold cross-entropy):

        alpha * [g * L_token + (1 - g) * L_sentence]

    where `L_token` is the word-level KD term above (on the gold prefix) and `L_sentence` the student's cross-entropy
    on the teacher's argmax output sequence (see `hf_seqkd.hybrid`).

    Every term is a sum over tokens divided by a token count of the whole (accumulated, all-process) batch: target
    tokens for CE, word-level KD, `L_token` and decoder CKD, source tokens for encoder CKD, teacher-sequence tokens for
    `L_sentence`; so gradient accumulation gives the gradient of one big batch.

    Under `torchrun` (or `accelerate launch` with several processes) on a machine without an accelerator,
    `use_cpu` is switched on, so that the processes train together (gloo) instead of each training alone.

    Parameters:
        > Word-level distillation

        teacher_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Teacher to load with `AutoModelForSeq2SeqLM.from_pretrained` when no `teacher_model` instance is given to
            the trainer.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the word-level distillation term. `0` trains exactly as a `Seq2SeqTrainer` would (the teacher is
            not run at all); `1` is pure distillation. Kim & Rush 2016 found 0.5 better than 0.9.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature applied to both teacher and student logits; the term is multiplied by its square.
        divergence (`str`, *optional*, defaults to `"forward_kl"`):
            One of `"forward_kl"` (KL(teacher || student), Kim & Rush's word-level KD), `"reverse_kl"`, `"jsd"`
            (generalised Jensen-Shannon with `jsd_beta`) or `"tvd"` (total variation distance).
        jsd_beta (`float`, *optional*, defaults to `0.5`):
            Teacher weight `beta` of the generalised JSD mixture `m = beta * p_t + (1 - beta) * p_s`; `0 < beta < 1`.
        teacher_dtype (`str` or `None`, *optional*, defaults to `None`):
            Run the teacher in `"bfloat16"`, `"float16"` or `"float32"`; `None` keeps the dtype it was loaded in.
        kd_chunk_size (`int`, *optional*, defaults to `1024`):
            Number of target positions whose vocabulary distributions are processed at once in the KD loss (memory).

        > Data preparation and evaluation

        max_source_length (`int`, *optional*, defaults to `256`):
            Sources are truncated to this many tokens (the number of truncated sentences is logged).
        max_target_length (`int`, *optional*, defaults to `256`):
            Targets are truncated to this many tokens. Validation with `predict_with_generate` lets translations run
            this long (unless `generation_max_length` is set), capped at the student's position table.
        source_prefix (`str`, *optional*, defaults to `""`):
            Text put before every source, e.g. T5's `"translate German to English: "`.
        bleu_tokenize (`str` or `None`, *optional*, defaults to `None`):
            sacrebleu's tokenizer for BLEU in validation, Seq-Inter and the evaluations (`"13a"`, `"zh"`,
            `"ja-mecab"`, `"char"`, ...); `None` chooses it from the target language
            (`hf_seqkd.evaluation.resolve_bleu_tokenize`: `zh` for Chinese, `13a` for languages written with spaces).
        generation_num_beams (`int` or `None`, *optional*, defaults to `None`):
            Beam size of validation with `predict_with_generate`; `None` decodes greedily, as the greedy column of
            the final evaluation does (Transformers' own default would be the model's generation config).

        > Sequence-level distillation

        kd_target (`str`, *optional*, defaults to `"target"`):
            Column to train on: `"target"` (gold references, the baseline), `"teacher_target"` (Seq-KD, Kim & Rush
            2016 Sec. 3.2) or `"seq_inter_target"` (Seq-Inter, Sec. 3.3). Used by the recipes and
            [`prepare_distillation_dataset`] when tokenizing.
        gold_mix_ratio (`float`, *optional*, defaults to `0.0`):
            Fraction of training pairs whose target is replaced by the gold reference when `kd_target` is not
            `"target"` (chosen once, reproducibly from `seed`).

        > Intermediate-layer distillation (CKD, Wu et al. 2020)

        intermediate_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight `beta` of the hidden-state loss; `0` disables it (the paper's example run: `alpha=0.2`,
            `beta=0.7`). The projections it trains are saved in checkpoints (with the student's weights, under the
            prefix `hf_seqkd_auxiliary.`) but not in the exported student.
        layer_mapping (`str`, *optional*, defaults to `"regular_comb"`):
            A strategy name (`"skip"`, `"regular_comb"`, `"overlap_comb"`, `"skip_middle"`, `"cross_comb"`,
            `"skip_comb"`; their rule for any teacher/student depth is in `hf_seqkd.intermediate`) or an explicit JSON
            mapping of 1-based student layers to lists of 1-based teacher layers, e.g.
            `'{"1": [1, 2, 3], "2": [4, 5, 6]}'` (per stack: `'{"encoder": {...}, "decoder": {...}}'`).
        intermediate_layers (`str`, *optional*, defaults to `"encoder"`):
            Which stack to distil: `"encoder"` (the paper's choice), `"decoder"` or `"both"`.

        > Hybrid token/sentence distillation (Wei et al. 2024)

        hybrid_gate (`str` or `None`, *optional*, defaults to `None`):
            `None` disables the hybrid objective; `"scalar"` learns one gate `g`; `"input"` computes `g` per sentence
            from the student's mean-pooled encoder output (a learned `Linear(d_s, 1)`); a number (e.g. `"0.5"`)
            fixes `g`. Needs `alpha > 0` (the hybrid term's weight). The teacher's output sequences come from the
            `teacher_labels` column when present, else from greedy decoding (cached per source sentence; its
            length limit is `generation_max_length`, or twice the source length plus 10).
        hybrid_gate_init (`float`, *optional*, defaults to `0.5`):
            Initial gate value for the learned gates; strictly inside `hybrid_gate_bounds`.
        hybrid_gate_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of a learned gate's parameters (same schedule as the student's); `None` uses a tenth of
            `learning_rate`. At the full rate an input gate reached its bound within ~300 steps on the toy corpus.
        hybrid_gate_bounds (`str`, *optional*, defaults to `"0.1,0.9"`):
            A learned gate is `lo + (hi - lo) * sigmoid(.)`. A gate trained on the loss it weights moves towards the
            currently smaller term (its gradient is `L_token - L_sentence`) and, given enough steps, ends at a
            bound; the bounds keep both terms in the objective. Measurements: `docs/hybrid_gate.md`.
    """

    teacher_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Teacher to load when none is passed."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the word-level KD term (0 = plain Seq2SeqTrainer)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature for word-level KD."})
    divergence: str = field(default="forward_kl", metadata={"help": f"One of {DIVERGENCES}."})
    jsd_beta: float = field(default=0.5, metadata={"help": "Teacher weight of the generalised JSD mixture."})
    teacher_dtype: Optional[str] = field(default=None, metadata={"help": "bfloat16, float16 or float32 for the teacher."})
    kd_chunk_size: int = field(default=1024, metadata={"help": "Positions per chunk in the KD loss."})
    max_source_length: int = field(default=256, metadata={"help": "Source truncation length (tokens)."})
    max_target_length: int = field(default=256, metadata={"help": "Target truncation length (tokens); also the "
                                                                   "validation generation limit."})
    source_prefix: str = field(default="", metadata={"help": "Text put before every source (T5's task prefix)."})
    bleu_tokenize: Optional[str] = field(default=None, metadata={"help": "sacrebleu tokenizer of BLEU (None: from "
                                                                          "the target language)."})
    kd_target: str = field(default="target", metadata={"help": f"Training target column, one of {KD_TARGETS}."})
    gold_mix_ratio: float = field(default=0.0, metadata={"help": "Fraction of pairs kept with the gold target."})
    intermediate_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the CKD hidden-state loss."})
    layer_mapping: str = field(default="regular_comb", metadata={"help": "CKD mapping strategy or JSON mapping."})
    intermediate_layers: str = field(default="encoder", metadata={"help": "encoder, decoder or both."})
    hybrid_gate: Optional[str] = field(default=None, metadata={"help": "None, 'scalar', 'input' or a fixed float."})
    hybrid_gate_init: float = field(default=0.5, metadata={"help": "Initial value of a learned hybrid gate."})
    hybrid_gate_learning_rate: Optional[float] = field(default=None, metadata={"help": "Learning rate of a learned gate (None: learning_rate / 10)."})
    hybrid_gate_bounds: str = field(default="0.1,0.9", metadata={"help": "lo,hi range of a learned gate."})

    def __post_init__(self):
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # Under torchrun on a machine without an accelerator, Transformers' arguments stay single-process
            # unless use_cpu is set: every process would train the whole model alone and write the same folder.
            self.use_cpu = True
            logger.info("WORLD_SIZE > 1 and no accelerator: use_cpu=True (distributed training on CPUs, gloo)")
        super().__post_init__()
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r} is not one of {DIVERGENCES}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.kd_target not in KD_TARGETS:
            raise ValueError(f"kd_target={self.kd_target!r} is not one of {KD_TARGETS}")
        if not 0.0 <= self.gold_mix_ratio <= 1.0:
            raise ValueError(f"gold_mix_ratio must be in [0, 1], got {self.gold_mix_ratio}")
        if self.intermediate_loss_weight < 0 or self.alpha + self.intermediate_loss_weight > 1.0 + 1e-9:
            raise ValueError(f"need intermediate_loss_weight >= 0 and alpha + intermediate_loss_weight <= 1, got "
                             f"alpha={self.alpha}, intermediate_loss_weight={self.intermediate_loss_weight}")
        if self.intermediate_layers not in INTERMEDIATE_LAYERS:
            raise ValueError(f"intermediate_layers={self.intermediate_layers!r} is not one of {INTERMEDIATE_LAYERS}")
        if self.teacher_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}: use bfloat16, float16, float32 or None")
        for name in ("max_source_length", "max_target_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive number of tokens, got {getattr(self, name)}")
        if self.bleu_tokenize is not None:
            self.resolved_bleu_tokenize()  # raises on an unknown tokenizer name
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

    def resolved_bleu_tokenize(self, target_language: str | None = None) -> str:
        """``bleu_tokenize``, or the sacrebleu tokenizer for ``target_language``
        (:func:`hf_seqkd.evaluation.resolve_bleu_tokenize`)."""
        from .evaluation import resolve_bleu_tokenize

        return resolve_bleu_tokenize(target_language, self.bleu_tokenize)

    @property
    def uses_hybrid(self) -> bool:
        """The hybrid token/sentence objective replaces the word-level term (``hybrid_gate`` is set)."""
        return self.hybrid_gate is not None

    @property
    def uses_ckd(self) -> bool:
        """The CKD hidden-state term is on (``intermediate_loss_weight > 0``)."""
        return self.intermediate_loss_weight > 0

    @property
    def has_auxiliary_parameters(self) -> bool:
        """The run trains modules of its own besides the student: CKD projections or a learned hybrid gate."""
        return self.uses_ckd or parse_hybrid_gate(self.hybrid_gate) in ("scalar", "input")

    @property
    def gate_bounds(self) -> tuple[float, float]:
        try:
            lo, hi = (float(x) for x in str(self.hybrid_gate_bounds).split(","))
        except ValueError:
            raise ValueError(f"hybrid_gate_bounds={self.hybrid_gate_bounds!r}: expected 'lo,hi', e.g. '0.1,0.9'")
        return lo, hi


def _has_accelerator() -> bool:
    """A CUDA (or other torch accelerator) device is available."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
