"""Distil a seq2seq teacher into a student, by any of hf_seqkd's methods: the front door of hf_seqkd.

    accelerate launch recipes/seq_kd.py                                  # the offline demo (no arguments)
    python recipes/seq_kd.py --demo --demo_size tiny --demo_dir /tmp/demo   # a smaller demo (the CI test)
    accelerate launch recipes/seq_kd.py --config recipes/configs/opus_mt_de_en.yaml
    accelerate launch recipes/seq_kd.py --teacher_model_name_or_path T --dataset D --source_lang de \
        --target_lang en --kd_target teacher_target --output_dir out/seqkd_student

The method is set by the training arguments: `--kd_target target|teacher_target|seq_inter_target` (gold, Seq-KD,
Seq-Inter; Kim & Rush 2016), `--alpha` (word-level KD; `--teacher_distributions stored --teacher_top_k 32` computes
the teacher's distributions once and trains without it), `--intermediate_loss_weight` (CKD), `--hybrid_gate`
(hybrid KD); `--alpha 0 --kd_target target` trains the baseline. The paper's best student, staged:
    python recipes/seq_kd.py --config C.yaml --kd_target teacher_target --output_dir out/stage1
    python recipes/seq_kd.py --config C.yaml --kd_target seq_inter_target --num_beams 35 --num_return_sequences 35 \
        --alpha 0.5 --init_student_from out/stage1 --learning_rate 1e-4 --output_dir out/stage2
"""

import json
import os
import sys

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, set_seed

from hf_seqkd import DistillationTrainer, DistillationTrainingArguments, load_parallel_data
from hf_seqkd.cli import DataArguments, EvalArguments, ModelArguments, load_or_make_student, parse_args, select_splits
from hf_seqkd.distributed import is_dispatched
from hf_seqkd.evaluation import evaluate_models
from hf_seqkd.hub import card_usage, make_model_card, push_student, save_student
from hf_seqkd.languages import resolve_languages
from hf_seqkd.report import markdown_table, signature_line
from hf_seqkd.significance import add_significance

ARGUMENTS = (ModelArguments, DataArguments, EvalArguments, DistillationTrainingArguments)
TABLE = ["model", "params", "bleu_greedy", "bleu_greedy_p_value", "bleu_beam", "chrf", "sent_per_s_greedy_batched",
         "speedup_over_beam"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] == "--demo":
        return demo(argv[1:])
    model_args, data_args, eval_args, training_args = parse_args(ARGUMENTS, argv)
    if not training_args.teacher_model_name_or_path or not data_args.dataset:
        raise ValueError("--teacher_model_name_or_path and --dataset are required (run with no arguments for the "
                         "offline demo)")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/opus-mt-de-en-seqkd-student)")
    set_seed(training_args.seed)

    # 1. Teacher, tokenizer, splits, student: everything a user names is loaded or checked before the long steps
    teacher = AutoModelForSeq2SeqLM.from_pretrained(training_args.teacher_model_name_or_path,
                                                    **training_args.teacher_loading_kwargs())
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path
                                              or training_args.teacher_model_name_or_path)
    raw = load_parallel_data(data_args.dataset, source_lang=data_args.source_lang, target_lang=data_args.target_lang,
                             config_name=data_args.dataset_config)
    train, validation, test = select_splits(raw, data_args, training_args)
    languages = resolve_languages(tokenizer, teacher, src_lang=training_args.src_lang, tgt_lang=training_args.tgt_lang,
                                  source_lang=data_args.source_lang, target_lang=data_args.target_lang,
                                  source_prefix=training_args.source_prefix)
    languages.apply(tokenizer)  # sources and labels tagged with the codes
    languages.apply_to_arguments(training_args, data_args.source_lang)  # the trainer follows them
    if training_args.seqkd_corpus_part:  # one machine's part of the corpus, merged later (python -m hf_seqkd.seqkd)
        DistillationTrainer.build_seqkd_corpus(train, teacher, tokenizer, training_args, languages)
        print(f"Part {training_args.seqkd_corpus_part} of the Seq-KD corpus is in {training_args.seqkd_cache_dir}; "
              "merge the parts with: python -m hf_seqkd.cli merge PART_DIR... --into CACHE_DIR")
        return None
    student = load_or_make_student(model_args, teacher)

    # 2. Train: the trainer builds (or reuses) the Seq-KD corpus when the method needs it, tokenizes, trains
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args, train_dataset=train,
                                  eval_dataset=validation, processing_class=tokenizer)
    if not training_args.teacher_runs_during_training:
        teacher = None  # its work (corpus, stored distributions) is done: not in memory while the student trains
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if not trainer.is_world_process_zero():
        return None

    # 3. Teacher and student on the test split: BLEU, chrF (greedy and beam) with 95% confidence intervals and the
    #    student's paired test against the teacher (sacrebleu), sentences/s, parameters
    if eval_args.evaluate_teacher and teacher is None:
        teacher = AutoModelForSeq2SeqLM.from_pretrained(training_args.teacher_model_name_or_path,
                                                    **training_args.teacher_loading_kwargs())
    if eval_args.evaluate_teacher and not is_dispatched(teacher):  # (placed by big-model inference: used there)
        teacher.to(trainer.args.device)
    models = [("teacher", "teacher", teacher)] if eval_args.evaluate_teacher else []
    bleu_tokenize = training_args.resolved_bleu_tokenize(languages.target_language or data_args.target_lang)
    results = [] if test is None else evaluate_models(
        models + [("student", "student", trainer.model)], tokenizer, test["source"], test["target"],
        num_beams=max(eval_args.eval_num_beams), batch_size=eval_args.eval_batch_size, batch1_samples=0,
        max_new_tokens=training_args.max_new_tokens, source_prefix=languages.source_prefix,
        bleu_tokenize=bleu_tokenize, generate_kwargs=languages.generate_kwargs())
    if len(results) > 1:  # 95% confidence intervals, and the student's paired test against the teacher
        add_significance(results, test["target"], baseline="teacher", tokenize=bleu_tokenize)
    if results:
        print(markdown_table(results, TABLE) + "\n" + signature_line(results))

    # 4. The student with its tokenizer, a model card and results.json; pushed with --push_to_hub
    out = training_args.output_dir
    card = make_model_card(
        teacher_name=training_args.teacher_model_name_or_path,
        method=training_args.method.with_(continued_from=model_args.init_student_from),
        hyperparameters={**training_args.card_hyperparameters(), "init_student_from": model_args.init_student_from},
        results=results, source_lang=data_args.source_lang or "src", target_lang=data_args.target_lang or "tgt",
        datasets=data_args.dataset, license=model_args.model_card_license, eval_split=data_args.test_split,
        hub_model_id=training_args.hub_model_id, usage=card_usage(languages, trainer.model, tokenizer))
    save_student(trainer.model, tokenizer, out, card)
    rows = [r.to_dict() for r in results]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    if training_args.push_to_hub:
        push_student(out, training_args.hub_model_id, private=bool(training_args.hub_private_repo),
                     token=training_args.hub_token)
    print(f"Student, tokenizer, model card (README.md) and results.json saved to {out}")
    return rows


def demo(options):
    """``--demo [--demo_size full|tiny] [--demo_dir DIR]``: the offline demo (:mod:`hf_seqkd.demo`)."""
    from hf_seqkd.demo import run_demo

    given = dict(zip(options[::2], options[1::2]))
    if len(options) % 2 or set(given) - {"--demo_size", "--demo_dir"}:
        raise ValueError(f"--demo takes only --demo_size full|tiny and --demo_dir DIR, got {options}")
    return run_demo(size=given.get("--demo_size", "full"), work_dir=given.get("--demo_dir"))


if __name__ == "__main__":
    main()
