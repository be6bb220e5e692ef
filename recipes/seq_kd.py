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

import sys

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, set_seed

from hf_seqkd import (
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    load_parallel_data,
    make_compute_metrics,
    prepare_distillation_dataset,
)
from hf_seqkd.cli import (DataArguments, EvalArguments, ModelArguments, SeqKDArguments, build_seqkd_corpus,
                          check_teacher_ctranslate2_dir, dataclass_to_dict, evaluate_on_test_split, kd_method_name,
                          load_or_make_student, parse_args, save_and_publish_student, select_splits)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] == "--demo":  # the offline demo: --demo [--demo_size tiny] [--demo_dir DIR]
        from hf_seqkd.demo import run_demo

        given = argv[1:]  # the options after --demo (none when the recipe is run without arguments)
        options = dict(zip(given[::2], given[1::2]))
        unknown = [a for a in given[::2] if a not in ("--demo_size", "--demo_dir")]
        if unknown or len(given) % 2:
            raise ValueError(f"--demo takes only --demo_size full|tiny and --demo_dir DIR, got {given}")
        return run_demo(main, size=options.get("--demo_size", "full"), work_dir=options.get("--demo_dir"))
    model_args, data_args, eval_args, seqkd_args, training_args = parse_args(
        (ModelArguments, DataArguments, EvalArguments, SeqKDArguments, DistillationTrainingArguments), argv)
    if not training_args.teacher_model_name_or_path or not data_args.dataset:
        raise ValueError("--teacher_model_name_or_path and --dataset are required (run with no arguments for the "
                         "offline demo)")
    set_seed(training_args.seed)

    # 1. Teacher, tokenizer, corpus, student: everything a user names is loaded or checked before the long steps
    check_teacher_ctranslate2_dir(seqkd_args.teacher_ctranslate2_dir)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(training_args.teacher_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path
                                              or training_args.teacher_model_name_or_path)
    raw = load_parallel_data(data_args.dataset, source_lang=data_args.source_lang, target_lang=data_args.target_lang,
                             config_name=data_args.dataset_config)
    train_raw, eval_raw, test = select_splits(raw, data_args, training_args)
    student = load_or_make_student(model_args, teacher)
    bleu_tokenize = training_args.resolved_bleu_tokenize(data_args.target_lang)

    # 2. The Seq-KD corpus: the teacher's beam search over every training source (cached, resumable, sharded over
    #    the processes), when training on it (--kd_target teacher_target / seq_inter_target) or for --hybrid_gate
    train_raw = build_seqkd_corpus(train_raw, teacher, tokenizer, seqkd_args, training_args, data_args)
    tokenize = dict(tokenizer=tokenizer, max_source_length=training_args.max_source_length,
                    max_target_length=training_args.max_target_length, source_prefix=training_args.source_prefix)
    hybrid = training_args.hybrid_gate is not None and "teacher_target" in train_raw.column_names
    train_set = prepare_distillation_dataset(train_raw, target_column=training_args.kd_target,
                                             gold_mix_ratio=training_args.gold_mix_ratio, seed=training_args.seed,
                                             teacher_labels_column="teacher_target" if hybrid else None, **tokenize)
    eval_set = None if eval_raw is None else prepare_distillation_dataset(eval_raw, **tokenize)

    # 3. Train
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=DistillationDataCollator(tokenizer, model=student), processing_class=tokenizer,
        compute_metrics=make_compute_metrics(tokenizer, eval_raw["target"], tokenize=bleu_tokenize)
        if training_args.predict_with_generate and eval_raw is not None else None)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if not trainer.is_world_process_zero():
        return None

    # 5. Evaluate teacher and student on the test split
    rows = evaluate_on_test_split(test, teacher, trainer.model, tokenizer, data_args, eval_args, trainer.args.device,
                                  source_prefix=training_args.source_prefix, bleu_tokenize=bleu_tokenize)

    # 6. Save the student with its tokenizer, a model card and results.json; push with --push_to_hub
    hyperparameters = {**dataclass_to_dict(seqkd_args), "alpha": training_args.alpha,
                       "temperature": training_args.temperature, "kd_target": training_args.kd_target,
                       "learning_rate": training_args.learning_rate, "num_train_epochs": training_args.num_train_epochs,
                       "max_steps": training_args.max_steps if training_args.max_steps > 0 else None,
                       "init_student_from": model_args.init_student_from}
    save_and_publish_student(trainer.model, tokenizer, training_args, data_args, method=kd_method_name(training_args),
                             hyperparameters=hyperparameters, results=rows, license=seqkd_args.model_card_license)
    print(f"Student, tokenizer, model card (README.md) and results.json saved to {training_args.output_dir}")
    return rows


if __name__ == "__main__":
    main()
