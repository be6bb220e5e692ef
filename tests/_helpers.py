"""Helpers shared by the trainer tests (imported as ``from _helpers import ...``; pytest puts tests/ on the path)."""

from torch.utils.data import SequentialSampler

from hf_seqkd import DistillationTrainer, DistillationTrainingArguments


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
