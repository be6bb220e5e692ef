"""Worker for tests/test_distributed.py: a distillation run (Word-KD + CKD) whose teacher is sharded over 2 processes
(``torchrun --nproc_per_node 2``, gloo, CPU), or the same run in one process with a replicated teacher.

Usage: [torchrun --standalone --nproc_per_node 2] _sharding_torchrun_worker.py OUT_DIR SHARDING|none BATCH_SIZE
Writes OUT_DIR/rank<r>.pt: the trained student's state dict and where the teacher lived.
"""

import dataclasses
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402

from hf_seqkd import (  # noqa: E402
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    make_toy_corpus,
    prepare_distillation_dataset,
    tiny_seq2seq_model,
    train_tokenizer,
)
from hf_seqkd.distributed import local_parameter_count  # noqa: E402

torch.set_num_threads(1)


class SequentialTrainer(DistillationTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main(out: str, sharding: str, batch_size: int) -> None:
    corpus = make_toy_corpus(num_train=200, num_test=10, seed=0)
    tokenizer = train_tokenizer(list(corpus["train"]["source"]) + list(corpus["train"]["target"]), vocab_size=200)
    data = prepare_distillation_dataset(corpus["train"].select(range(16)), tokenizer)
    student = tiny_seq2seq_model(tokenizer, d_model=32, encoder_layers=2, decoder_layers=2, seed=0)
    # dropout: a teacher left in training mode would drop units at random and train a different student
    teacher = tiny_seq2seq_model(tokenizer, d_model=48, encoder_layers=4, decoder_layers=2, seed=1, dropout=0.3)
    full = sum(p.numel() for p in teacher.parameters())
    args = DistillationTrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=2, learning_rate=1e-2, optim="sgd",
        lr_scheduler_type="constant", report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
        alpha=0.6, temperature=2.0, intermediate_loss_weight=0.3, layer_mapping="regular_comb",
        dataloader_num_workers=0, per_device_train_batch_size=batch_size,
        teacher_sharding=None if sharding == "none" else sharding)
    trainer = SequentialTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                data_collator=DistillationDataCollator(tokenizer, student))
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trained = {k: v.detach().clone() for k, v in student.state_dict().items()}
    result = {"student": trained, "trained": any(not torch.equal(initial[k], v) for k, v in trained.items()),
                "sharding": trainer.teacher_sharding, "processes": trainer.accelerator.num_processes,
                "teacher_local": local_parameter_count(trainer.teacher_model), "teacher_full": full,
                "teacher_in_optimizer": any(id(p) in optimized for p in trainer.teacher_model.parameters()),
                "teacher_training": any(m.training for m in trainer.teacher_model.modules()),
                "teacher_requires_grad": any(p.requires_grad for p in trainer.teacher_model.parameters()),
                "rank": trainer.args.process_index}
    if trainer.teacher_sharding != "replicate":  # decoding teacher labels in training needs every shard in step
        try:
            fresh = tiny_seq2seq_model(tokenizer, d_model=48, encoder_layers=4, decoder_layers=2, seed=1)
            SequentialTrainer(model=student, teacher_model=fresh, train_dataset=data,
                              args=dataclasses.replace(args, hybrid_gate="input"),
                              data_collator=DistillationDataCollator(tokenizer, student))
            result["hybrid_refused"] = ""
        except ValueError as e:
            result["hybrid_refused"] = str(e)
    torch.save(result, os.path.join(out, f"rank{result['rank']}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
