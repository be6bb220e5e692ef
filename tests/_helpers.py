"""Helpers shared by the trainer tests (imported as ``from _helpers import ...``; pytest puts tests/ on the path)."""

from torch.utils.data import SequentialSampler

from hf_seqkd import DistillationTrainer, DistillationTrainingArguments, GenerationSettings, build_seqkd_dataset


class InOrder:
    """Trainer mixin: feed batches in dataset order, so that two runs see the same examples."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class SequentialTrainer(InOrder, DistillationTrainer):
    """A ``DistillationTrainer`` that visits the training set in order."""


def training_args(tmp_path, cls=DistillationTrainingArguments, **overrides):
    """Arguments of a deterministic one-step CPU run with plain SGD; ``overrides`` win."""
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=1,
                report_to=[], save_strategy="no", logging_steps=1, seed=0, optim="sgd", lr_scheduler_type="constant",
                warmup_steps=0, disable_tqdm=True, dataloader_num_workers=0, use_cpu=True)
    base.update(overrides)
    return cls(**base)


def build(dataset, teacher, tokenizer, *, num_beams=5, num_return_sequences=1, max_new_tokens=128, batch_size=64,
          max_tokens_per_batch=None, **kwargs):
    """``build_seqkd_dataset`` with the generation settings given as keywords (as the corpus tests were written)."""
    return build_seqkd_dataset(dataset, teacher, tokenizer, GenerationSettings(
        num_beams=num_beams, num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
        generation_batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch), **kwargs)


def write_split_files(folder, corpus, sizes: dict) -> None:
    """The first ``n`` pairs of each split of ``corpus`` as ``SPLIT.src`` / ``SPLIT.tgt`` files in ``folder``."""
    for split, n in sizes.items():
        part = corpus[split].select(range(n))
        (folder / f"{split}.src").write_text("\n".join(part["source"]) + "\n")
        (folder / f"{split}.tgt").write_text("\n".join(part["target"]) + "\n")


def load_recipe(name: str, module_name: str | None = None):
    """A recipe script of ``recipes/`` as a module (they are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name or f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_teacher_and_data(folder, teacher, tokenizer, corpus, sizes: dict):
    """``folder/teacher`` (model and tokenizer, like a Hub snapshot) and ``folder/data`` (SPLIT.src / SPLIT.tgt
    files of the first rows of each split of ``corpus``); returns the two paths."""
    teacher.save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    (folder / "data").mkdir()
    write_split_files(folder / "data", corpus, sizes)
    return folder / "teacher", folder / "data"
