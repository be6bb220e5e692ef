"""Worker for tests/test_seqkd.py: ``build_seqkd_dataset`` under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Usage: torchrun --standalone --nproc_per_node 2 _seqkd_torchrun_worker.py MODEL_DIR SOURCES_JSON CACHE_DIR OUT_DIR

Loads the tokenizer and the teacher saved by the test, generates with a shared cache directory, and writes
``OUT_DIR/rows-<rank>.json`` (the sources this process's teacher translated) and, on every process,
``OUT_DIR/result-<rank>.json`` (the assembled dataset as a dict of columns).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _helpers import build  # noqa: E402


def main():
    model_dir, sources_json, cache_dir, out_dir = sys.argv[1:5]
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    with open(sources_json) as f:
        data = json.load(f)
    dataset = Dataset.from_dict(data["columns"])

    translated = []
    original_generate = teacher.generate

    def recording_generate(*args, **kwargs):
        translated.extend(tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True))
        return original_generate(*args, **kwargs)

    teacher.generate = recording_generate
    result = build(dataset, teacher, tokenizer, cache_dir=cache_dir, show_progress=False, **data["kwargs"])
    state = PartialState()  # initialised by build_seqkd_dataset from the torchrun environment
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes}"
    rank = state.process_index
    with open(os.path.join(out_dir, f"rows-{rank}.json"), "w") as f:
        json.dump(translated, f)
    with open(os.path.join(out_dir, f"result-{rank}.json"), "w") as f:
        json.dump(result.to_dict(), f)
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
