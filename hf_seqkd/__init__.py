"""hf_seqkd: knowledge distillation for sequence-to-sequence models on HuggingFace Transformers."""

from .students import (
    count_parameters,
    layers_to_copy,
    make_student,
    make_student_from_config,
    tiny_seq2seq_model,
    train_tokenizer,
)
from .toy import make_toy_corpus

__version__ = "0.1.0"
