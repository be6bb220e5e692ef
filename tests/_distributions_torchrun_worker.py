"""Worker for tests/test_teacher_distributions.py: ``build_teacher_distributions`` under ``torchrun
--nproc_per_node 2`` (gloo, CPU).

Usage: torchrun --standalone --nproc_per_node 2 _distributions_torchrun_worker.py MODEL_DIR DATA_JSON CACHE_DIR OUT_DIR

Writes ``OUT_DIR/result-<rank>.json`` (the assembled dataset's columns) and ``OUT_DIR/rows-<rank>.json`` (the first
rows of the shards this process computed).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSeq2SeqLM  # noqa: E402

import hf_seqkd.teacher_distributions as module  # noqa: E402


def main():
    model_dir, data_json, cache_dir, out_dir = sys.argv[1:5]
    torch.set_num_threads(1)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    with open(data_json) as f:
        dataset = Dataset.from_dict(json.load(f))
    computed, original = [], module._shard_distributions

    def recording(model, input_ids, labels, first_row, **kwargs):
        computed.append(first_row)
        return original(model, input_ids, labels, first_row, **kwargs)

    module._shard_distributions = recording
    result = module.build_teacher_distributions(dataset, teacher, top_k=5, temperature=2.0, shard_size=4,
                                                cache_dir=cache_dir, show_progress=False)
    state = PartialState()
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes}"
    with open(os.path.join(out_dir, f"result-{state.process_index}.json"), "w") as f:
        json.dump({c: list(result[c]) for c in module.STORED_COLUMNS}, f)
    with open(os.path.join(out_dir, f"rows-{state.process_index}.json"), "w") as f:
        json.dump(computed, f)
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
