"""hf_seqkd: knowledge distillation for sequence-to-sequence models on HuggingFace Transformers.

Word-level KD (Hinton et al. 2015; Kim & Rush 2016), sequence-level KD and Seq-Inter (Kim & Rush 2016),
combinatorial intermediate-layer KD (Wu et al. 2020) and hybrid token/sentence KD (Wei et al. 2024), as a
``Seq2SeqTrainer`` subclass and ``datasets``-based corpus building.
"""

from .config import DistillationMethod, DistillationTrainingArguments
from .data import DataError, DistillationDataCollator, load_parallel_data, prepare_distillation_dataset, read_lines
from .evaluation import EvaluationResult, corpus_scores, evaluate_model, evaluate_translation, make_compute_metrics
from .generation import GenerationSettings, translate
from .losses import distillation_loss, fused_ce_and_distillation_loss, sequence_cross_entropy
from .seqkd import build_seqkd_dataset, make_length_batches, model_fingerprint, select_seq_inter
from .students import (
    count_parameters,
    freeze_unsaved_parameters,
    layers_to_copy,
    make_student,
    make_student_from_config,
    tiny_seq2seq_model,
    train_tokenizer,
)
from .toy import make_toy_corpus
from .trainer import DistillationTrainer, check_shared_vocabulary

__all__ = [
    "DistillationMethod", "DistillationTrainingArguments", "DataError", "DistillationDataCollator",
    "load_parallel_data", "prepare_distillation_dataset", "read_lines", "EvaluationResult", "corpus_scores",
    "evaluate_model", "evaluate_translation", "make_compute_metrics", "GenerationSettings", "translate",
    "distillation_loss", "fused_ce_and_distillation_loss", "sequence_cross_entropy", "build_seqkd_dataset",
    "make_length_batches", "model_fingerprint", "select_seq_inter", "count_parameters", "freeze_unsaved_parameters",
    "layers_to_copy", "make_student", "make_student_from_config", "tiny_seq2seq_model", "train_tokenizer",
    "make_toy_corpus", "DistillationTrainer", "check_shared_vocabulary",
]

__version__ = "0.1.0"
