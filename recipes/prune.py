"""Prune a saved student and retrain it (Kim & Rush 2016, Sec. 5.3; See, Luong & Manning 2016).

    python recipes/prune.py --config recipes/configs/prune_opus_mt_student.yaml
    python recipes/prune.py --model_name_or_path out/seqkd_student --sparsities 0.5 0.8 0.9 \
        --dataset D --source_lang de --target_lang en --alpha 0 --max_steps 2000 --output_dir out/pruned
    python recipes/prune.py --model_name_or_path out/seqkd_student --teacher_model_name_or_path T \
        --kd_target teacher_target --alpha 0.5 --sparsities 0.8 --max_steps 2000 --output_dir out/pruned

Retraining is a distillation run like any other (every option of `DistillationTrainingArguments`): `--alpha 0
--kd_target target` retrains on the references (no teacher), `--kd_target teacher_target` on the teacher's
translations (the Seq-KD corpus, built or reused from `--seqkd_cache_dir`), `--alpha > 0` adds word-level KD.

Steps, top to bottom: 1. load the student, its tokenizer and the splits (checked before any long work); 2. evaluate
the unpruned student; 3. for every sparsity: prune a fresh copy by weight magnitude (`prune_model`), evaluate it,
retrain it with the pruned weights held at zero (`PruningCallback`), fold the masks, evaluate, save it with a model
card to `<output_dir>/sparsity-XX` (pushed with `--push_to_hub --hub_model_id`); 4. print the table and write
`<output_dir>/results.json`.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, set_seed

from hf_seqkd import DistillationTrainer, DistillationTrainingArguments, load_parallel_data
from hf_seqkd.cli import DataArguments, EvalArguments, parse_args, select_splits
from hf_seqkd.evaluation import evaluate_model, model_disk_size
from hf_seqkd.hub import card_usage, make_model_card, push_student, save_student, write_model_card
from hf_seqkd.languages import resolve_languages
from hf_seqkd.pruning import (
    SCOPES,
    GradualPruningCallback,
    PruningCallback,
    fold_pruning,
    prune_model,
    pruned_sparsity,
    sparsity_name,
    sparsity_report,
)
from hf_seqkd.report import markdown_table


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
        pruning_events (`int`): `1` (default) prunes once, then retrains with the masks held (Kim & Rush 2016,
            Sec. 5.3); `N > 1` prunes gradually during retraining, in N steps over the first `pruning_ramp` of it
            (Zhu & Gupta 2017, eq. 1; `hf_seqkd.pruning.GradualPruningCallback`).
        pruning_ramp (`float`): the fraction of the retraining steps over which gradual pruning's events are spread.
        model_card_license (`str` or `None`): licence id written into the model cards.
    """

    model_name_or_path: str = field(default="", metadata={"help": "The saved student to prune."})
    tokenizer_name_or_path: Optional[str] = field(default=None,
                                                  metadata={"help": "Tokenizer (default: the student's)."})
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9],
                                    metadata={"help": "Target sparsities in [0, 1)."})
    pruning_scope: str = field(default="class_blind", metadata={"help": f"One of {SCOPES}."})
    pruning_include: Optional[list[str]] = field(default=None, metadata={"help": "Weight classes to prune."})
    pruning_events: int = field(default=1, metadata={"help": "1: prune once, then retrain; N > 1: gradual pruning "
                                                             "in N steps during retraining (Zhu & Gupta 2017)."})
    pruning_ramp: float = field(default=0.5, metadata={"help": "Fraction of retraining over which gradual pruning "
                                                               "reaches the target."})
    model_card_license: Optional[str] = field(default=None, metadata={"help": "Licence for the model cards."})

    def __post_init__(self):
        if self.pruning_scope not in SCOPES:
            raise ValueError(f"--pruning_scope {self.pruning_scope!r}: use one of {', '.join(SCOPES)}")
        if self.pruning_events < 1:
            raise ValueError(f"--pruning_events {self.pruning_events}: give 1 (prune once) or more (gradual)")
        if not 0.0 < self.pruning_ramp <= 1.0:
            raise ValueError(f"--pruning_ramp {self.pruning_ramp}: give a fraction of the retraining in (0, 1]")
        if not self.sparsities:
            raise ValueError("--sparsities needs at least one value")
        for s in self.sparsities:
            if not 0.0 <= s < 1.0:
                raise ValueError(f"--sparsities: {s} is outside [0, 1) (the fraction of weights removed)")


TABLE = [("model", "Model"), ("sparsity", "Sparsity"), ("measured_sparsity", "Measured"), ("params", "Parameters"),
         ("nonzero_params", "Non-zero"), ("bleu_pruned", "BLEU before retraining"),
         ("bleu_greedy", "BLEU after retraining"), ("bleu_beam", "BLEU beam, after"), ("chrf", "chrF after"),
         ("sent_per_s_greedy_batched", "Sent/s")]


def parse(argv=None):
    """The recipe's arguments (``--config file.yaml`` supplies defaults): prune, data, evaluation, training."""
    return parse_args((PruneArguments, DataArguments, EvalArguments, DistillationTrainingArguments), argv)


def main(argv=None):
    prune_args, data_args, eval_args, training_args = parse(argv)
    if not prune_args.model_name_or_path or not data_args.dataset or not training_args.output_dir:
        raise ValueError("--model_name_or_path (the saved student), --dataset and --output_dir are required")
    if training_args.needs_teacher_model and not training_args.teacher_model_name_or_path:
        raise ValueError(f"retraining with method {training_args.method.name!r} needs --teacher_model_name_or_path; "
                         "use --alpha 0 --kd_target target to retrain on the references alone")
    names = [sparsity_name(s) for s in prune_args.sparsities]
    if len(set(names)) != len(names):
        raise ValueError(f"--sparsities {prune_args.sparsities}: a value is repeated")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/opus-mt-de-en-student-pruned)")
    push, training_args.push_to_hub = training_args.push_to_hub, False  # the recipe pushes the finished models
    output_dir = training_args.output_dir
    set_seed(training_args.seed)

    # 1. Student, tokenizer, splits (checked before any long work)
    tokenizer = AutoTokenizer.from_pretrained(prune_args.tokenizer_name_or_path or prune_args.model_name_or_path)
    raw = load_parallel_data(data_args.dataset, source_lang=data_args.source_lang, target_lang=data_args.target_lang,
                             config_name=data_args.dataset_config)
    train, validation, test = select_splits(raw, data_args, training_args)
    languages = resolve_languages(tokenizer, AutoModelForSeq2SeqLM.from_pretrained(prune_args.model_name_or_path),
                                  src_lang=training_args.src_lang, tgt_lang=training_args.tgt_lang,
                                  source_lang=data_args.source_lang, target_lang=data_args.target_lang,
                                  source_prefix=training_args.source_prefix)
    languages.apply(tokenizer)  # sources and labels tagged with the codes
    languages.apply_to_arguments(training_args, data_args.source_lang)  # the trainer follows them
    bleu_tokenize = training_args.resolved_bleu_tokenize(languages.target_language)

    def evaluate(model, name, num_beams=1, **extra):
        """The test-split result of ``model`` (greedy, and beam search with ``num_beams`` > 1); None without one."""
        if test is None:
            return None
        result = evaluate_model(model.to(training_args.device), tokenizer, test["source"], test["target"], name=name,
                                num_beams=num_beams, batch_size=eval_args.eval_batch_size, batch1_samples=0,
                                max_new_tokens=training_args.max_new_tokens, source_prefix=languages.source_prefix,
                                bleu_tokenize=bleu_tokenize, generate_kwargs=languages.generate_kwargs())
        result.extra.update(extra)
        return result

    # 2. The unpruned student, for reference
    beams = max(eval_args.eval_num_beams)
    unpruned = AutoModelForSeq2SeqLM.from_pretrained(prune_args.model_name_or_path)
    report = sparsity_report(unpruned)
    results = [evaluate(unpruned, os.path.basename(os.path.normpath(prune_args.model_name_or_path)), beams,
                        sparsity=0.0, measured_sparsity=pruned_sparsity(report, prune_args.pruning_include),
                        bleu_pruned=None)]
    del unpruned

    # 3. Prune, retrain with the masks held, fold, evaluate, save: one model per sparsity
    prepared, teacher = train, None  # the first run tokenizes (and builds the corpus); the others reuse its data
    for sparsity, name in zip(prune_args.sparsities, names):
        out_dir = training_args.output_dir = os.path.join(output_dir, name)
        set_seed(training_args.seed)
        model = AutoModelForSeq2SeqLM.from_pretrained(prune_args.model_name_or_path)
        if prune_args.pruning_events == 1:  # prune once, then retrain with the masks held
            prune_model(model, sparsity=sparsity, scope=prune_args.pruning_scope, include=prune_args.pruning_include)
            before, callback = evaluate(model, f"{name} (pruned)"), PruningCallback()
        else:  # gradually, during retraining
            before, callback = None, GradualPruningCallback(
                sparsity, prune_args.pruning_events, prune_args.pruning_ramp, scope=prune_args.pruning_scope,
                include=prune_args.pruning_include)
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=training_args, train_dataset=prepared,
                                      eval_dataset=validation, processing_class=tokenizer, callbacks=[callback])
        prepared, teacher = trainer.train_dataset, trainer.teacher_model
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        if not trainer.is_world_process_zero():
            continue
        fold_pruning(model)
        save_student(model, tokenizer, out_dir)
        # count what is saved: the reloaded folder (loading can differ from the model in memory, e.g. an embedding
        # row that Transformers re-initialises)
        report = sparsity_report(AutoModelForSeq2SeqLM.from_pretrained(out_dir))
        result = evaluate(model, name, beams, sparsity=sparsity, bleu_pruned=before and before.bleu_greedy,
                          measured_sparsity=pruned_sparsity(report, prune_args.pruning_include))
        if result is not None:
            result.path, result.params, result.nonzero_params = out_dir, report["total"], report["nonzero"]
            result.size_bytes = model_disk_size(out_dir)["size_bytes"]
            results.append(result)
        hub_id = training_args.hub_model_id and (training_args.hub_model_id if len(names) == 1
                                                 else f"{training_args.hub_model_id}-{name}")
        write_card(out_dir, prune_args, data_args, training_args, sparsity, report,
                   [r for r in results[:1] + results[-1:] if r is not None], hub_id, name,
                   card_usage(languages, model, tokenizer))
        if push:
            push_student(out_dir, hub_id, private=bool(training_args.hub_private_repo), token=training_args.hub_token)
        del trainer, model

    # 4. The table
    training_args.output_dir = output_dir
    rows = [r.to_dict() for r in results if r is not None]
    print(markdown_table(rows, TABLE))
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(f"Pruned students (model, tokenizer, README.md) in {output_dir}/sparsity-*; table in "
          f"{os.path.join(output_dir, 'results.json')} (bleu_pruned: before retraining, bleu_greedy: after)")
    return rows


def write_card(out_dir, prune_args, data_args, training_args, sparsity, report, results, hub_id, name, usage):
    """The pruned student's model card, with the unpruned student's and its own results."""

    model_name = hub_id.split("/")[-1] if hub_id else \
        f"{os.path.basename(os.path.normpath(prune_args.model_name_or_path))}-{name}"
    card_results = [dataclasses.replace(result, role=role, model=model_name if role == "student" else result.model,
                                        extra={"BLEU before retraining": result.extra.get("bleu_pruned")})
                    for result, role in zip(results, ("unpruned", "student"))]
    hyper = {"sparsity": sparsity, "pruning_scope": prune_args.pruning_scope,
             "pruning_include": prune_args.pruning_include, "pruning_events": prune_args.pruning_events,
             **({"pruning_ramp": prune_args.pruning_ramp} if prune_args.pruning_events > 1 else {}),
             "nonzero_parameters": report["nonzero"],
             "total_parameters": report["total"], "pruned_from": prune_args.model_name_or_path,
             **training_args.card_hyperparameters()}
    card = make_model_card(
        teacher_name=training_args.teacher_model_name_or_path or prune_args.model_name_or_path,
        method=training_args.method.with_(sparsity=sparsity), hyperparameters=hyper,
        results=card_results if len(card_results) == 2 else None, source_lang=data_args.source_lang or "src",
        target_lang=data_args.target_lang or "tgt", datasets=data_args.dataset, license=prune_args.model_card_license,
        eval_split=data_args.test_split, hub_model_id=hub_id, model_name=model_name,
        usage=usage,
        extra_text=f"Pruned from `{prune_args.model_name_or_path}`: {sparsity:.0%} of its weight matrices "
                   f"({prune_args.pruning_scope}), {report['nonzero']:,} of {report['total']:,} parameters non-zero "
                   "(the weights are stored dense, with zeros).")
    write_model_card(out_dir, card)


if __name__ == "__main__":
    main()
