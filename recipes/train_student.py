"""Train a student with word-level knowledge distillation (Kim & Rush 2016, Sec. 3.1; Hinton et al. 2015).

    accelerate launch recipes/train_student.py --config recipes/configs/train_student_opus_mt_de_en.yaml
    python recipes/train_student.py --teacher_model_name_or_path PATH --dataset DATA --source_lang de \
        --target_lang en --output_dir out/student --alpha 0.5

`--alpha 0` trains the no-KD baseline (the teacher is then only used to shape the student). Every option of
`DistillationTrainingArguments` (and of transformers' `Seq2SeqTrainingArguments`) is accepted, plus those of
`hf_seqkd.cli.ModelArguments`, `DataArguments` and `EvalArguments`. A YAML file given with `--config` supplies
defaults; flags on the command line win.
"""

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, set_seed

from hf_seqkd import (
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    load_parallel_data,
    make_compute_metrics,
    prepare_distillation_dataset,
)
from hf_seqkd.cli import (DataArguments, EvalArguments, ModelArguments, evaluate_on_test_split, kd_method_name,
                          load_or_make_student, parse_args, save_and_publish_student, select_splits)


def main(argv=None):
    model_args, data_args, eval_args, training_args = parse_args(
        (ModelArguments, DataArguments, EvalArguments, DistillationTrainingArguments), argv)
    if not training_args.teacher_model_name_or_path:
        raise ValueError("--teacher_model_name_or_path is required (the teacher, or the model whose shape the "
                         "student copies)")
    if not data_args.dataset:
        raise ValueError("--dataset is required: a Hub dataset, a folder of SPLIT.LANG files, a .tsv or a .jsonl")
    set_seed(training_args.seed)

    # 1. Teacher and tokenizer
    teacher = AutoModelForSeq2SeqLM.from_pretrained(training_args.teacher_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path
                                              or training_args.teacher_model_name_or_path)

    # 2. Data: DatasetDict(source, target) -> token ids of the chosen target column; the splits checked up front
    raw = load_parallel_data(data_args.dataset, source_lang=data_args.source_lang, target_lang=data_args.target_lang,
                             config_name=data_args.dataset_config)
    train_raw, eval_raw, test = select_splits(raw, data_args, training_args)
    bleu_tokenize = training_args.resolved_bleu_tokenize(data_args.target_lang)
    tokenize = dict(tokenizer=tokenizer, max_source_length=training_args.max_source_length,
                    max_target_length=training_args.max_target_length, source_prefix=training_args.source_prefix)
    train_set = prepare_distillation_dataset(train_raw, target_column=training_args.kd_target,
                                             gold_mix_ratio=training_args.gold_mix_ratio, seed=training_args.seed,
                                             **tokenize)
    eval_set = None if eval_raw is None else prepare_distillation_dataset(eval_raw, **tokenize)

    # 3. Student: copied teacher layers, a from-config model, or a saved student to continue
    student = load_or_make_student(model_args, teacher)

    # 4. Train
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=DistillationDataCollator(tokenizer, model=student), processing_class=tokenizer,
        compute_metrics=make_compute_metrics(tokenizer, eval_raw["target"], tokenize=bleu_tokenize)
        if training_args.predict_with_generate and eval_raw is not None else None)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if not trainer.is_world_process_zero():
        return None

    # 5. Evaluate student and teacher on the test split
    rows = evaluate_on_test_split(test, teacher, trainer.model, tokenizer, data_args, eval_args, trainer.args.device,
                                  source_prefix=training_args.source_prefix, bleu_tokenize=bleu_tokenize)

    # 6. Save the student with its tokenizer, a model card and results.json; push with --push_to_hub
    hyperparameters = {"alpha": training_args.alpha, "temperature": training_args.temperature,
                       "divergence": training_args.divergence, "kd_target": training_args.kd_target,
                       "learning_rate": training_args.learning_rate, "num_train_epochs": training_args.num_train_epochs,
                       "max_steps": training_args.max_steps if training_args.max_steps > 0 else None}
    save_and_publish_student(trainer.model, tokenizer, training_args, data_args, method=kd_method_name(training_args),
                             hyperparameters=hyperparameters, results=rows)
    print(f"Student, tokenizer, model card (README.md) and results.json saved to {training_args.output_dir}")
    return rows


if __name__ == "__main__":
    main()
