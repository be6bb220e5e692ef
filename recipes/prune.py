"""Prune a saved student and retrain it (Kim & Rush 2016, Sec. 5.3; See, Luong & Manning 2016).

    python recipes/prune.py --config recipes/configs/prune_opus_mt_student.yaml
    python recipes/prune.py --model_name_or_path out/seqkd_student --sparsities 0.5 0.8 0.9 \
        --dataset D --source_lang de --target_lang en --alpha 0 --max_steps 2000 --output_dir out/pruned
    python recipes/prune.py --model_name_or_path out/seqkd_student --teacher_model_name_or_path T \
        --kd_target teacher_target --alpha 0.5 --sparsities 0.8 --max_steps 2000 --output_dir out/pruned

Retraining uses the distillation trainer with any of its methods: `--alpha 0 --kd_target target` retrains on the
references (no teacher needed), `--kd_target teacher_target` on the teacher's translations (Seq-KD; the corpus is
built or reused from the Seq-KD cache, `--seqkd_cache_dir`, as in `recipes/seq_kd.py`), `--alpha > 0` adds
word-level KD (needs `--teacher_model_name_or_path`). Every option of `DistillationTrainingArguments`,
`hf_seqkd.cli.DataArguments` and `EvalArguments` and of the Seq-KD corpus (`recipes/seq_kd.py`) is accepted.

Steps, top to bottom:
 1. load the student, its tokenizer, the teacher (when the method needs one) and the corpus;
 2. build (or reuse from the cache) the Seq-KD corpus when `--kd_target` is not `target`;
 3. evaluate the unpruned student on the test split (greedy BLEU, chrF, sentences/s);
 4. for every sparsity: prune a fresh copy of the student by weight magnitude (`prune_model`, `--pruning_scope`),
    evaluate it, retrain it with the pruned weights held at zero (`PruningCallback`), evaluate again, fold the
    masks into the weights and save it with its tokenizer and a model card to `<output_dir>/sparsity-XX`
    (pushed with `--push_to_hub --hub_model_id`, one repository per sparsity when there are several);
 5. print the table (sparsity, parameters, non-zero parameters, BLEU before and after retraining) and write it to
    `<output_dir>/results.json`.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, set_seed

from hf_seqkd import (
    DistillationDataCollator,
    DistillationTrainer,
    DistillationTrainingArguments,
    load_parallel_data,
    make_compute_metrics,
    prepare_distillation_dataset,
)
from hf_seqkd.cli import (DataArguments, EvalArguments, SeqKDArguments, build_seqkd_corpus,
                          check_teacher_ctranslate2_dir, parse_args, select_splits)
from hf_seqkd.hub import make_model_card, push_student, save_student, write_model_card
from hf_seqkd.pruning import DEFAULT_PRUNED_CLASSES, SCOPES, PruningCallback, fold_pruning, prune_model, sparsity_report
from hf_seqkd.report import evaluate_model, model_disk_size, report_table


@dataclass
class PruneArguments:
    """What to prune and how.

    Parameters:
        model_name_or_path (`str`): the saved student to prune.
        tokenizer_name_or_path (`str` or `None`): its tokenizer (default: the student's folder).
        sparsities (`list[float]`): fractions of the prunable weights to remove, each in [0, 1); one pruned and
            retrained model per value.
        pruning_scope (`str`): `class_blind` (one global threshold, See et al.'s best), `class_uniform` or
            `class_distribution`.
        pruning_include (`list[str]` or `None`): weight classes to prune (default: all but position embeddings).
    """

    model_name_or_path: str = field(default="", metadata={"help": "The saved student to prune."})
    tokenizer_name_or_path: Optional[str] = field(default=None,
                                                  metadata={"help": "Tokenizer (default: the student's)."})
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9],
                                    metadata={"help": "Target sparsities in [0, 1)."})
    pruning_scope: str = field(default="class_blind", metadata={"help": f"One of {SCOPES}."})
    pruning_include: Optional[list[str]] = field(default=None, metadata={"help": "Weight classes to prune."})

    def __post_init__(self):
        if self.pruning_scope not in SCOPES:
            raise ValueError(f"--pruning_scope {self.pruning_scope!r}: use one of {', '.join(SCOPES)}")
        if not self.sparsities:
            raise ValueError("--sparsities needs at least one value")
        for s in self.sparsities:
            if not 0.0 <= s < 1.0:
                raise ValueError(f"--sparsities: {s} is outside [0, 1) (the fraction of weights removed)")


def sparsity_name(sparsity: float) -> str:
    """The output sub-folder of a sparsity: 0.8 -> ``sparsity-80``, 0.05 -> ``sparsity-05``, 0.875 ->
    ``sparsity-87.5``."""
    percent = round(sparsity * 100, 2)
    return f"sparsity-{percent:g}" if percent % 1 else f"sparsity-{int(percent):02d}"


def pruned_sparsity(report: dict, include) -> float:
    """Measured sparsity of the weight classes that were pruned (from ``sparsity_report``)."""
    classes = [c for c in (include or DEFAULT_PRUNED_CLASSES) if c in report["classes"]]
    total = sum(report["classes"][c]["total"] for c in classes)
    return 1.0 - sum(report["classes"][c]["nonzero"] for c in classes) / total if total else 0.0


def parse(argv=None):
    """The recipe's arguments (``--config file.yaml`` supplies defaults): prune, data, eval, Seq-KD, training."""
    return parse_args((PruneArguments, DataArguments, EvalArguments, SeqKDArguments, DistillationTrainingArguments),
                      argv)


def main(argv=None):
    prune_args, data_args, eval_args, seqkd_args, training_args = parse(argv)
    if not prune_args.model_name_or_path or not data_args.dataset or not training_args.output_dir:
        raise ValueError("--model_name_or_path (the saved student), --dataset and --output_dir are required")
    needs_teacher = training_args.alpha > 0 or training_args.kd_target != "target" or \
        training_args.intermediate_loss_weight > 0 or training_args.hybrid_gate is not None
    if needs_teacher and not training_args.teacher_model_name_or_path:
        raise ValueError(f"retraining with alpha={training_args.alpha} (word-level KD), kd_target="
                         f"{training_args.kd_target!r} needs --teacher_model_name_or_path; use --alpha 0 "
                         "--kd_target target to retrain on the references alone")
    names = [sparsity_name(s) for s in prune_args.sparsities]
    if len(set(names)) != len(names):
        raise ValueError(f"--sparsities {prune_args.sparsities}: a value is repeated")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/opus-mt-de-en-student-pruned)")
    push, training_args.push_to_hub = training_args.push_to_hub, False  # the recipe pushes the finished models
    output_dir = training_args.output_dir
    set_seed(training_args.seed)

    # 1. Student, tokenizer, teacher, corpus (the splits checked before any long work)
    check_teacher_ctranslate2_dir(seqkd_args.teacher_ctranslate2_dir)
    tokenizer = AutoTokenizer.from_pretrained(prune_args.tokenizer_name_or_path or prune_args.model_name_or_path)
    student = AutoModelForSeq2SeqLM.from_pretrained(prune_args.model_name_or_path)
    teacher = None
    if needs_teacher:
        teacher = AutoModelForSeq2SeqLM.from_pretrained(training_args.teacher_model_name_or_path)
    raw = load_parallel_data(data_args.dataset, source_lang=data_args.source_lang, target_lang=data_args.target_lang,
                             config_name=data_args.dataset_config)
    train_raw, eval_raw, test = select_splits(raw, data_args, training_args)

    # 2. The Seq-KD corpus when retraining on the teacher's translations (cached: a seq_kd.py run's is reused)
    train_raw = build_seqkd_corpus(train_raw, teacher, tokenizer, seqkd_args, training_args, data_args)
    tokenize = dict(tokenizer=tokenizer, max_source_length=training_args.max_source_length,
                    max_target_length=training_args.max_target_length, source_prefix=training_args.source_prefix)
    with_teacher_labels = training_args.hybrid_gate is not None and "teacher_target" in train_raw.column_names
    train_set = prepare_distillation_dataset(
        train_raw, target_column=training_args.kd_target, gold_mix_ratio=training_args.gold_mix_ratio,
        seed=training_args.seed, teacher_labels_column="teacher_target" if with_teacher_labels else None, **tokenize)
    eval_set = None if eval_raw is None else prepare_distillation_dataset(eval_raw, **tokenize)
    beams = max(eval_args.eval_num_beams)
    bleu_tokenize = training_args.resolved_bleu_tokenize(data_args.target_lang)

    def evaluate(model, name, num_beams=1):
        """Test-split scores of ``model`` (greedy, plus beam search with ``num_beams`` > 1); {} without a test split."""
        if test is None:
            return {}
        r = evaluate_model(model.to(training_args.device), tokenizer, test["source"], test["target"], name=name,
                           num_beams=num_beams, batch_size=eval_args.eval_batch_size, batch1_samples=0,
                           max_new_tokens=eval_args.max_new_tokens, source_prefix=training_args.source_prefix,
                           bleu_tokenize=bleu_tokenize)
        return {"bleu_greedy": r["bleu_greedy"], "bleu_beam": r["bleu_beam"], "chrf": r["chrf_greedy"],
                "sentences_per_second": r["sent_per_s_greedy_batched"]}

    # 3. The unpruned student, for reference
    report = sparsity_report(student)
    rows = [{"model": os.path.basename(os.path.normpath(prune_args.model_name_or_path)), "sparsity": 0.0,
             "measured_sparsity": pruned_sparsity(report, prune_args.pruning_include), "params": report["total"],
             "nonzero_params": report["nonzero"], "bleu_pruned": None, **evaluate(student, "unpruned", beams),
             "size_bytes": model_disk_size(prune_args.model_name_or_path)["size_bytes"],
             "path": prune_args.model_name_or_path}]
    del student

    # 4. Prune, retrain with the masks held, fold, evaluate, save: one model per sparsity
    for sparsity, name in zip(prune_args.sparsities, names):
        out_dir = os.path.join(output_dir, name)
        training_args.output_dir = out_dir
        set_seed(training_args.seed)
        model = AutoModelForSeq2SeqLM.from_pretrained(prune_args.model_name_or_path)
        prune_model(model, sparsity=sparsity, scope=prune_args.pruning_scope, include=prune_args.pruning_include)
        before = evaluate(model, f"{name} (pruned)").get("bleu_greedy")
        trainer = DistillationTrainer(
            model=model, teacher_model=teacher, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
            data_collator=DistillationDataCollator(tokenizer, model=model), processing_class=tokenizer,
            callbacks=[PruningCallback()],
            compute_metrics=make_compute_metrics(tokenizer, eval_raw["target"], tokenize=bleu_tokenize)
            if training_args.predict_with_generate and eval_raw is not None else None)
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        if not trainer.is_world_process_zero():
            continue
        fold_pruning(model)
        # count what is saved: the reloaded folder (loading can differ from the in-memory model, e.g. an embedding
        # row that Transformers re-initialises)
        save_student(model, tokenizer, out_dir)
        report = sparsity_report(AutoModelForSeq2SeqLM.from_pretrained(out_dir))
        row = {"model": name, "sparsity": sparsity,
               "measured_sparsity": pruned_sparsity(report, prune_args.pruning_include),
               "params": report["total"], "nonzero_params": report["nonzero"], "bleu_pruned": before,
               **evaluate(model, name, beams)}
        hyper = {"sparsity": sparsity, "pruning_scope": prune_args.pruning_scope,
                 "pruning_include": prune_args.pruning_include, "nonzero_parameters": report["nonzero"],
                 "total_parameters": report["total"], "pruned_from": prune_args.model_name_or_path,
                 "kd_target": training_args.kd_target, "alpha": training_args.alpha,
                 "learning_rate": training_args.learning_rate,
                 "max_steps": training_args.max_steps if training_args.max_steps > 0 else None,
                 "num_train_epochs": None if training_args.max_steps > 0 else training_args.num_train_epochs}
        hub_id = training_args.hub_model_id and (training_args.hub_model_id if len(names) == 1
                                                 else f"{training_args.hub_model_id}-{name}")
        model_name = hub_id.split("/")[-1] if hub_id else f"{rows[0]['model']}-{name}"
        card_columns = ("model", "params", "nonzero_params", "bleu_greedy", "bleu_beam", "chrf", "sentences_per_second")
        card_rows = [{**{k: r.get(k) for k in card_columns}, "BLEU before retraining": r["bleu_pruned"], "role": role}
                     for r, role in ((rows[0], "unpruned"), ({**row, "model": model_name}, "student"))]
        card = make_model_card(
            teacher_name=training_args.teacher_model_name_or_path or prune_args.model_name_or_path, method="pruned",
            hyperparameters={k: v for k, v in hyper.items() if v is not None}, results=card_rows,
            source_lang=data_args.source_lang or "src", target_lang=data_args.target_lang or "tgt",
            datasets=data_args.dataset, license=seqkd_args.model_card_license, eval_split=data_args.test_split,
            hub_model_id=hub_id, model_name=model_name,
            extra_text=f"Pruned from `{prune_args.model_name_or_path}`: {sparsity:.0%} of its weight matrices "
                       f"({prune_args.pruning_scope}), {report['nonzero']:,} of {report['total']:,} parameters "
                       "non-zero (the weights are stored dense, with zeros).")
        write_model_card(out_dir, card)
        row.update(size_bytes=model_disk_size(out_dir)["size_bytes"], path=out_dir)
        rows.append(row)
        if push:
            push_student(out_dir, hub_id, private=bool(training_args.hub_private_repo), token=training_args.hub_token)
            print(f"Pushed {out_dir} to https://huggingface.co/{hub_id}")
        del trainer, model

    # 5. The table
    training_args.output_dir = output_dir
    print(report_table(rows, [("model", "Model"), ("sparsity", "Sparsity"), ("measured_sparsity", "Measured"),
                              ("params", "Parameters"), ("nonzero_params", "Non-zero"),
                              ("bleu_pruned", "BLEU before retraining"), ("bleu_greedy", "BLEU after retraining"),
                              ("bleu_beam", "BLEU beam, after"), ("chrf", "chrF after"),
                              ("sentences_per_second", "Sent/s")]))
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(f"Pruned students (model, tokenizer, README.md) in {output_dir}/sparsity-*; table in "
          f"{os.path.join(output_dir, 'results.json')} (bleu_pruned: before retraining, bleu_greedy: after)")
    return rows


if __name__ == "__main__":
    main()
