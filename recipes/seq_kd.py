"""Sequence-level knowledge distillation (Kim & Rush 2016, Sec. 3.2-3.3): the front door of hf_seqkd.

    accelerate launch recipes/seq_kd.py                                  # the offline demo (no arguments)
    python recipes/seq_kd.py --demo --demo_size tiny --demo_dir /tmp/demo   # a smaller demo (the CI test)
    accelerate launch recipes/seq_kd.py --config recipes/configs/opus_mt_de_en.yaml
    accelerate launch recipes/seq_kd.py --teacher_model_name_or_path T --dataset D --source_lang de \
        --target_lang en --kd_target teacher_target --output_dir out/seqkd_student

Steps, top to bottom:
 1. load the teacher, its tokenizer and the corpus;
 2. build (or reuse from the cache) the Seq-KD corpus: the teacher's beam-search translation of every training
    source (`teacher_target`), its K-best list and the Seq-Inter target when asked (`build_seqkd_dataset`, spread
    over all processes under `accelerate launch`);
 3. make the student (`make_student` copies teacher layers, or a from-config size, or `--init_student_from` a
    saved student for the staged Seq-KD -> Seq-Inter fine-tuning);
 4. train it on `--kd_target` (`target` = baseline, `teacher_target` = Seq-KD, `seq_inter_target` = Seq-Inter),
    with word-level KD on top when `--alpha > 0`;
 5. evaluate teacher and student on the test split (BLEU, chrF, greedy and beam, sentences/s, speed-up);
 6. save the student with its tokenizer and a model card (and push it with `--push_to_hub --hub_model_id`).

The paper's best student, staged (see README, "Seq-KD, Seq-Inter and Word-KD staged"):
    python recipes/seq_kd.py --config C.yaml --kd_target teacher_target --output_dir out/stage1
    python recipes/seq_kd.py --config C.yaml --kd_target seq_inter_target --nbest_size 35 --alpha 0.5 \
        --init_student_from out/stage1 --learning_rate 1e-4 --output_dir out/stage2
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, set_seed

from hf_seqkd import (
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    build_seqkd_dataset,
    evaluate_translation,
    load_parallel_data,
    make_compute_metrics,
    prepare_distillation_dataset,
)
from hf_seqkd.cli import (DataArguments, EvalArguments, ModelArguments, dataclass_to_dict, load_or_make_student,
                          markdown_table, parse_args)
from hf_seqkd.hub import make_model_card, push_student, save_student


@dataclass
class SeqKDArguments:
    """How the teacher builds the Seq-KD corpus.

    Parameters:
        teacher_num_beams (`int`): beam size of the teacher's translations (Kim & Rush used 5).
        nbest_size (`int`): K, the size of the teacher's K-best list; `seq_inter_target` needs K > 1 (the paper: 35).
        seq_inter_metric (`str`): similarity to the reference for Seq-Inter: `"bleu"` (smoothed sentence BLEU) or `"chrf"`.
        teacher_max_new_tokens (`int`): the longest teacher translation, in tokens.
        generation_batch_size (`int`): the most sentences per `generate` call.
        max_tokens_per_batch (`int` or `None`): token budget per `generate` call (sentences x source tokens x beams).
        seqkd_cache_dir (`str` or `None`): where the Seq-KD corpus is cached (default `<output_dir>/../seqkd_cache`);
            a rerun with the same teacher, data and settings reuses it, an interrupted one resumes.
        model_card_license (`str` or `None`): licence id written into the model card.
    """

    teacher_num_beams: int = field(default=5, metadata={"help": "Teacher beam size for the Seq-KD corpus."})
    nbest_size: int = field(default=1, metadata={"help": "K of the teacher's K-best list (Seq-Inter needs K > 1)."})
    seq_inter_metric: str = field(default="bleu", metadata={"help": "bleu or chrf."})
    teacher_max_new_tokens: int = field(default=128, metadata={"help": "Longest teacher translation (tokens)."})
    generation_batch_size: int = field(default=64, metadata={"help": "Sentences per generate call."})
    max_tokens_per_batch: Optional[int] = field(default=None, metadata={"help": "Token budget per generate call."})
    seqkd_cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache of the Seq-KD corpus."})
    model_card_license: Optional[str] = field(default=None, metadata={"help": "Licence for the model card."})


def evaluate_models(models, tokenizer, test, eval_args, data_args):
    """Rows of the results table: every model at every beam size, speed-up against the first (the teacher)."""
    rows = []
    for name, role, model in models:
        row = {"model": name, "role": role}
        for beams in eval_args.eval_num_beams:
            r = evaluate_translation(model, tokenizer, test["source"], test["target"], num_beams=beams,
                                     batch_size=eval_args.eval_batch_size, max_new_tokens=eval_args.max_new_tokens,
                                     source_prefix=data_args.source_prefix)
            key = "greedy" if beams == 1 else "beam"
            row.update({f"bleu_{key}": r["bleu"], f"chrf_{key}": r["chrf"], f"sent_per_s_{key}": r["sentences_per_second"]})
            row["params"] = r["num_parameters"]
        row["chrf"] = row.get("chrf_greedy", row.get("chrf_beam"))
        row["sentences_per_second"] = row.get("sent_per_s_greedy", row.get("sent_per_s_beam"))
        rows.append(row)
    teacher_speed = rows[0].get("sent_per_s_beam") or rows[0]["sentences_per_second"]
    for row in rows:  # the student greedy against the teacher with beam search, as Kim & Rush compare them
        row["speedup"] = row["sentences_per_second"] / teacher_speed
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] == "--demo":  # the offline demo: --demo [--demo_size tiny] [--demo_dir DIR]
        from hf_seqkd.demo import run_demo

        options = dict(zip(argv[1::2], argv[2::2]))
        return run_demo(main, size=options.get("--demo_size", "full"), work_dir=options.get("--demo_dir"))
    model_args, data_args, eval_args, seqkd_args, training_args = parse_args(
        (ModelArguments, DataArguments, EvalArguments, SeqKDArguments, DistillationTrainingArguments), argv)
    if not training_args.teacher_model_name_or_path or not data_args.dataset:
        raise ValueError("--teacher_model_name_or_path and --dataset are required (run with no arguments for the "
                         "offline demo)")
    set_seed(training_args.seed)

    # 1. Teacher, tokenizer, corpus
    teacher = AutoModelForSeq2SeqLM.from_pretrained(training_args.teacher_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path
                                              or training_args.teacher_model_name_or_path)
    raw = load_parallel_data(data_args.dataset, source_lang=data_args.source_lang, target_lang=data_args.target_lang,
                             config_name=data_args.dataset_config)
    train_raw = raw[data_args.train_split]
    if data_args.max_train_samples:
        train_raw = train_raw.select(range(min(data_args.max_train_samples, len(train_raw))))

    # 2. The Seq-KD corpus: the teacher's beam search over every training source (cached, resumable, sharded)
    if training_args.kd_target != "target":
        seq_inter = training_args.kd_target == "seq_inter_target"
        if seq_inter and seqkd_args.nbest_size < 2:
            raise ValueError("--kd_target seq_inter_target needs --nbest_size K > 1 (Kim & Rush used K = 35)")
        cache_dir = seqkd_args.seqkd_cache_dir or os.path.join(os.path.dirname(
            os.path.abspath(training_args.output_dir)), "seqkd_cache")
        train_raw = build_seqkd_dataset(
            train_raw, teacher, tokenizer, num_beams=max(seqkd_args.teacher_num_beams, seqkd_args.nbest_size),
            num_return_sequences=seqkd_args.nbest_size, max_new_tokens=seqkd_args.teacher_max_new_tokens,
            batch_size=seqkd_args.generation_batch_size, max_tokens_per_batch=seqkd_args.max_tokens_per_batch,
            seq_inter=seq_inter, seq_inter_metric=seqkd_args.seq_inter_metric, source_prefix=data_args.source_prefix,
            cache_dir=cache_dir)
    tokenize = dict(tokenizer=tokenizer, max_source_length=data_args.max_source_length,
                    max_target_length=data_args.max_target_length, source_prefix=data_args.source_prefix)
    hybrid = training_args.hybrid_gate is not None and "teacher_target" in train_raw.column_names
    train_set = prepare_distillation_dataset(train_raw, target_column=training_args.kd_target,
                                             gold_mix_ratio=training_args.gold_mix_ratio, seed=training_args.seed,
                                             teacher_labels_column="teacher_target" if hybrid else None, **tokenize)
    eval_set = None
    if data_args.eval_split and data_args.eval_split in raw and training_args.eval_strategy != "no":
        eval_raw = raw[data_args.eval_split]
        if data_args.max_eval_samples:
            eval_raw = eval_raw.select(range(min(data_args.max_eval_samples, len(eval_raw))))
        eval_set = prepare_distillation_dataset(eval_raw, **tokenize)

    # 3. Student
    student = load_or_make_student(model_args, teacher)

    # 4. Train
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=DistillationDataCollator(tokenizer, model=student), processing_class=tokenizer,
        compute_metrics=make_compute_metrics(tokenizer) if training_args.predict_with_generate else None)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if not trainer.is_world_process_zero():
        return None

    # 5. Evaluate teacher and student on the test split
    rows = []
    if data_args.test_split in raw:
        test = raw[data_args.test_split]
        if data_args.max_test_samples:
            test = test.select(range(min(data_args.max_test_samples, len(test))))
        device = trainer.args.device
        models = ([("teacher", "teacher", teacher.to(device))] if eval_args.evaluate_teacher else []) + \
            [("student", "student", trainer.model)]
        rows = evaluate_models(models, tokenizer, test, eval_args, data_args)
        print(markdown_table(rows, ["model", "params", "bleu_greedy", "bleu_beam", "chrf", "sentences_per_second",
                                    "speedup"]))

    # 6. Save the student with a model card; push if asked
    method = {"target": "baseline", "teacher_target": "seq-kd", "seq_inter_target": "seq-inter"}[training_args.kd_target]
    if training_args.alpha > 0:
        method += "+word-kd"
    hyper = {k: v for k, v in {**dataclass_to_dict(seqkd_args), "alpha": training_args.alpha,
                               "temperature": training_args.temperature, "kd_target": training_args.kd_target,
                               "learning_rate": training_args.learning_rate,
                               "num_train_epochs": training_args.num_train_epochs,
                               "max_steps": training_args.max_steps}.items() if v is not None}
    card = make_model_card(teacher_name=training_args.teacher_model_name_or_path, method=method, hyperparameters=hyper,
                           results=rows or None, source_lang=data_args.source_lang or "src",
                           target_lang=data_args.target_lang or "tgt", datasets=data_args.dataset,
                           license=seqkd_args.model_card_license, eval_split=data_args.test_split,
                           hub_model_id=training_args.hub_model_id)
    save_student(trainer.model, tokenizer, training_args.output_dir, card)
    with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    if training_args.push_to_hub:
        if not training_args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/opus-mt-de-en-seqkd-student)")
        push_student(training_args.output_dir, training_args.hub_model_id, private=bool(training_args.hub_private_repo),
                     token=training_args.hub_token)
    print(f"Student, tokenizer, model card (README.md) and results.json saved to {training_args.output_dir}")
    return rows


if __name__ == "__main__":
    main()
