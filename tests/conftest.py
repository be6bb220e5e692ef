"""Shared fixtures: everything offline, tiny, and made by the tests themselves."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_seqkd import make_toy_corpus, prepare_distillation_dataset, tiny_seq2seq_model, train_tokenizer  # noqa: E402

from model_families import family_snapshots  # noqa: E402,F401  (session fixture: the Hub-like family replicas)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def toy_corpus():
    """A small synthetic parallel corpus (DatasetDict train/validation/test with source/target)."""
    return make_toy_corpus(num_train=600, num_test=40, seed=0)


@pytest.fixture(scope="session")
def tokenizer(toy_corpus):
    """A tiny shared-vocabulary BPE tokenizer trained on the toy corpus (pad is the last id)."""
    train = toy_corpus["train"]
    return train_tokenizer(list(train["source"]) + list(train["target"]), vocab_size=300)


@pytest.fixture
def train_set(toy_corpus, tokenizer):
    """The first 16 training pairs, tokenized for the trainer."""
    return prepare_distillation_dataset(toy_corpus["train"].select(range(16)), tokenizer)


@pytest.fixture
def tiny_marian(tokenizer):
    """A fresh 2+2-layer Marian model of width 32 with random weights."""
    return tiny_seq2seq_model(tokenizer, "marian", d_model=32, encoder_layers=2, decoder_layers=2, seed=0)


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a whole test module (``pytestmark = pytest.mark.usefixtures("torch_one_thread")``):
    on a busy 2-core machine two OpenMP threads spin-wait and run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
