"""Model cards, saving and publishing distilled students on the Hugging Face Hub.

* :func:`make_model_card`: the ``README.md`` of a student, rendered from ``templates/model_card.md`` with
  ``huggingface_hub.ModelCard.from_template`` (YAML front matter with a ``model-index`` of BLEU/chrF results), from
  the run's :class:`~hf_seqkd.config.DistillationMethod` and :class:`~hf_seqkd.evaluation.EvaluationResult`.
* :func:`save_student` writes model, tokenizer and card into one folder; :func:`push_student` uploads it.
* :func:`translation_pipeline`: the ``"translation"`` pipeline Transformers 5 removed, with languages and prefixes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import OfflineModeIsEnabled
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from .config import DistillationMethod
from .evaluation import EvaluationResult, add_speedup
from .export import ctranslate2_decoding_options
from .generation import cap_max_new_tokens, max_source_positions
from .languages import resolve_languages
from .pruning import apply_pruning_masks, pruning_masks
from .report import markdown_table, signature_line

__all__ = [
    "make_model_card",
    "method_components",
    "save_student",
    "write_model_card",
    "push_student",
    "translation_pipeline",
    "TranslationPipeline",
]

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"

_KIM_RUSH_BIBTEX = """@inproceedings{kim-rush-2016-sequence,
  title = {Sequence-Level Knowledge Distillation},
  author = {Kim, Yoon and Rush, Alexander M.},
  booktitle = {Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing},
  year = {2016},
  pages = {1317--1327},
  url = {https://aclanthology.org/D16-1139},
}"""

# the results table of a card: these columns, where any result has them, then any extra ones
_CARD_COLUMNS = ["model", "params", "nonzero_params", "bleu_greedy", "bleu_beam", "chrf", "sent_per_s_greedy_batched",
                 "speedup"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(name) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def method_components(method: DistillationMethod) -> list[tuple[str, str, str]]:
    """``(tag, title, description)`` of each part of ``method``, as the card and its tags describe them."""
    parts = []
    if method.word_kd:
        parts.append(("word-level-kd", "Word-level knowledge distillation",
                      "The student is trained to match the teacher's per-token output distributions (cross-entropy "
                      "to the teacher's softmax, mixed with the usual loss on the references; Kim & Rush 2016, "
                      "Sec. 3.1)."))
    if method.target == "seq_inter_target":
        parts.append(("sequence-level-interpolation", "Sequence-level interpolation",
                      "The student is trained on the hypothesis of the teacher's beam closest to the reference (by "
                      "sentence-level BLEU) instead of the reference (Kim & Rush 2016, Sec. 3.3)."))
    elif method.target == "teacher_target":
        parts.append(("sequence-level-kd", "Sequence-level knowledge distillation",
                      "The training targets are the teacher's beam-search translations of the training sources "
                      "instead of the references; the student is trained on them with ordinary cross-entropy "
                      "(Kim & Rush 2016, Sec. 3.2)."))
    if method.ckd:
        parts.append(("combinatorial-kd", "Combinatorial intermediate-layer distillation (CKD)",
                      "Each student layer also learns from a combination of teacher layers, concatenated, projected "
                      "and compared after L2 normalisation (Wu et al. 2020)."))
    if method.hybrid:
        parts.append(("hybrid-kd", "Hybrid token/sentence distillation",
                      "A gate mixes word-level distillation with training on the teacher's output sequences "
                      "(Wei et al. 2024)."))
    if method.sparsity is not None:
        parts.append(("pruning", "Magnitude pruning",
                      "After distillation the smallest-magnitude weights were removed and the student retrained "
                      "with them held at zero (See, Luong & Manning 2016; Kim & Rush 2016, Sec. 5.3)."))
    return parts


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value)
    return str(value)


def _roles(results: Sequence[EvaluationResult], teacher_name: str, model_name: str) -> tuple[int | None, int | None]:
    """The student's and the teacher's index among ``results`` (``role`` first, then the names)."""
    teacher = next((i for i, r in enumerate(results) if r.role == "teacher"), None)
    if teacher is None:
        teacher = next((i for i, r in enumerate(results) if r.model == teacher_name), None)
    student = next((i for i, r in enumerate(results) if r.role == "student"), None)
    if student is None:
        student = next((i for i, r in enumerate(results) if r.model == model_name), None)
    if student is None:
        student = next((i for i in range(len(results) - 1, -1, -1) if i != teacher), None)
    return student, teacher


_EXAMPLES = {"de": "Ein Satz, der übersetzt werden soll.", "fr": "Une phrase à traduire.",
             "es": "Una frase para traducir.", "en": "A sentence to translate."}


# the card's generate examples set the length (a saved student has no max_length: generate would stop at 20 tokens),
# as the pipeline's default does, capped at the student's position table
CARD_MAX_NEW_TOKENS = 256


def card_usage(languages, model, tokenizer) -> dict:
    """What a student's model card shows of how to call it (the ``usage`` of :func:`make_model_card`): the
    direction's codes, prefix and forced token (:meth:`~hf_seqkd.languages.Languages.usage`), the CTranslate2
    options that decode as ``model.generation_config`` says
    (:func:`~hf_seqkd.export.ctranslate2_decoding_options`) and ``max_new_tokens`` (``CARD_MAX_NEW_TOKENS`` capped
    at the student's position table)."""
    options = ctranslate2_decoding_options(model.generation_config, tokenizer, languages.forced_bos_token)
    return {**languages.usage(), "ctranslate2_options": options,
            "max_new_tokens": cap_max_new_tokens(model, CARD_MAX_NEW_TOKENS)}


def _usage_strings(usage: Mapping[str, Any]) -> dict[str, str]:
    """The keyword arguments the card's code examples need for the languages, the prefix and the decoding."""
    src, tgt, bos = usage.get("src_lang"), usage.get("tgt_lang"), usage.get("forced_bos_token")
    options = dict(usage.get("ctranslate2_options") or ({"target_token": bos} if bos else {}))
    target = options.pop("target_token", None)
    if target is not None:
        options["target_prefix"] = [[target]]
    languages = (f', src_lang="{src}"' if src else "") + (f', tgt_lang="{tgt}"' if tgt else "")
    return {
        "source_prefix": usage.get("source_prefix") or "",
        "tokenizer_kwargs": languages,
        "generate_kwargs": f', forced_bos_token_id=tokenizer.convert_tokens_to_ids("{bos}")' if bos else "",
        "pipeline_kwargs": languages,
        "ctranslate2_kwargs": "".join(f", {key}={value!r}" for key, value in options.items()),
        "max_new_tokens": str(usage.get("max_new_tokens") or CARD_MAX_NEW_TOKENS),
    }


def make_model_card(
    *,
    teacher_name: str,
    method: DistillationMethod,
    hyperparameters: Mapping[str, Any],
    results: Sequence[EvaluationResult] | None,
    source_lang: str,
    target_lang: str,
    datasets: str | Sequence[str] | None = None,
    license: str | None = None,
    model_name: str | None = None,
    extra_text: str = "",
    eval_dataset: str | None = None,
    eval_split: str = "test",
    hub_model_id: str | None = None,
    usage: Mapping[str, Any] | None = None,
) -> str:
    """The text of a ``README.md`` model card for a distilled student.

    The YAML front matter has ``language``, ``license`` (when given), ``tags`` (``translation``,
    ``knowledge-distillation``, ``hf_seqkd`` and one per method component), ``base_model`` (the teacher, when it is a
    Hub id), ``datasets``, ``pipeline_tag: translation`` and a ``model-index`` with the student's BLEU and chrF. The
    body describes the method, lists the hyper-parameters, tabulates the results against the teacher (with the
    sacrebleu signatures) and shows how to call the model.

    Args:
        teacher_name: the teacher's Hub id or path.
        method: the run's :class:`~hf_seqkd.config.DistillationMethod` (``args.method``).
        hyperparameters: name -> value.
        results: the evaluation; the teacher's result is the one with ``role="teacher"`` or ``model ==
            teacher_name``, the student's the one with ``role="student"`` or ``model == model_name``, else the last
            other one. Speed-ups over the teacher are filled in when missing.
        source_lang, target_lang: the language pair (front matter, title).
        datasets: training data set id(s); license: a licence id, left out when ``None``.
        model_name: the student's name (default ``<teacher>-<method>-student``).
        extra_text: Markdown added before the citation.
        eval_dataset, eval_split: what the results are on (default: the first of ``datasets``, else ``"custom"``).
        hub_model_id: the id used in the usage examples (default ``model_name``).
        usage: how the student is called: ``source_prefix``, ``src_lang`` / ``tgt_lang`` (tokenizer language codes),
            ``forced_bos_token`` (the target-language token ``generate`` must force), ``ctranslate2_options`` and
            ``max_new_tokens`` (see :func:`card_usage`).
    """

    hyperparameters = dict(hyperparameters or {})
    teacher_short = teacher_name.rstrip("/").split("/")[-1]
    model_name = model_name or f"{teacher_short}-{_slug(method.name) or 'distilled'}-student"
    hub_model_id = hub_model_id or model_name
    datasets = [datasets] if isinstance(datasets, str) else (list(datasets) if datasets else None)
    eval_dataset = eval_dataset or (datasets[0] if datasets else "custom")
    parts = method_components(method)
    tags = list(dict.fromkeys(["translation", "knowledge-distillation", "hf_seqkd", _slug(method.name)]
                              + [p[0] for p in parts]))

    results = [r for r in (results or [])]
    student, teacher = _roles(results, teacher_name, model_name)
    if teacher is not None and all(r.speedup is None for r in results):
        add_speedup(results, reference=teacher)
    eval_results = []
    if student is not None:
        row = results[student]
        for value, metric_type, metric_name in ((row.bleu_greedy, "bleu", "BLEU (greedy)"),
                                                (row.bleu_beam, "bleu", "BLEU (beam search)"),
                                                (row.chrf, "chrf", "chrF")):
            if value is not None:
                eval_results.append(EvalResult(
                    task_type="translation", task_name=f"Translation {source_lang}-{target_lang}",
                    dataset_type=eval_dataset, dataset_name=eval_dataset, dataset_split=eval_split,
                    metric_type=metric_type, metric_name=metric_name, metric_value=round(float(value), 4)))
    data = ModelCardData(language=[source_lang, target_lang], license=license, tags=tags,
                         base_model=teacher_name if _looks_like_hub_id(teacher_name) else None, datasets=datasets,
                         model_name=model_name, eval_results=eval_results or None, pipeline_tag="translation",
                         library_name="transformers")
    extra_columns = list(dict.fromkeys(k for r in results for k in r.extra))
    teacher_ref = (f"[{teacher_name}](https://huggingface.co/{teacher_name})" if _looks_like_hub_id(teacher_name)
                   else f"`{teacher_name}`")
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE), model_name=model_name, source_lang=source_lang, target_lang=target_lang,
        teacher_ref=teacher_ref, method_name=method.name, components=[(t, d) for _, t, d in parts],
        hyperparameters=[(k, _fmt_value(v)) for k, v in hyperparameters.items() if v is not None],
        results_table=markdown_table(results, _CARD_COLUMNS + extra_columns, human=True) if results else "",
        signatures=signature_line(results), eval_dataset=eval_dataset, eval_split=eval_split,
        hub_model_id=hub_model_id, example=_EXAMPLES.get(str(source_lang).split("_")[0], _EXAMPLES["en"]),
        ct2_folder=f"{hub_model_id.split('/')[-1]}-ct2", extra_text=extra_text.strip(),
        bibtex=_KIM_RUSH_BIBTEX, **_usage_strings(usage or {}))
    text = str(card)
    ModelCard(text)  # parses the front matter: fails early on malformed metadata
    return text


def save_student(model, tokenizer, out_dir: str | os.PathLike, card_text: str | None = None) -> Path:
    """Write the model, its tokenizer and the model card (``README.md``) into ``out_dir``.

    A model pruned with :mod:`hf_seqkd.pruning` is saved with its pruned weights as exact zeros (the masks are
    applied once more first; they stay active on the model).

    Args:
        model: the student (``PreTrainedModel``).
        tokenizer: its tokenizer (saved beside it: ``from_pretrained(out_dir)`` and the CTranslate2 converter
            need both).
        out_dir: the folder (created if needed).
        card_text: the ``README.md`` text (e.g. from :func:`make_model_card`); ``None`` writes none.

    Returns:
        ``out_dir`` as a ``Path``.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pruning_masks(model):
        apply_pruning_masks(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if card_text is not None:
        write_model_card(out, card_text)
    return out


def write_model_card(out_dir: str | os.PathLike, card_text: str) -> Path:
    """Write ``card_text`` as the model card (``README.md``) of the saved model in ``out_dir``; returns its path
    (for a card that needs the saved folder first, e.g. the counts of a reloaded pruned model)."""
    path = Path(out_dir) / "README.md"
    path.write_text(card_text, encoding="utf-8")
    return path


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except Exception:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def push_student(
    out_dir: str | os.PathLike,
    hub_model_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload distilled student (hf_seqkd)",
):
    """Create (or reuse) the Hub model repository ``hub_model_id`` and upload the folder ``out_dir`` to it.

    Args:
        out_dir: a folder written by :func:`save_student` (``config.json`` required, ``README.md`` advised).
        hub_model_id: ``"user-or-org/name"``.
        private: create the repository as private (an existing repository keeps its visibility).
        token: a Hub token with write access (default: the saved login / ``HF_TOKEN``).
        commit_message: the commit message of the upload.

    Returns:
        The ``CommitInfo`` of the upload (``.commit_url``, ``.oid``).

    Raises:
        FileNotFoundError: ``out_dir`` is not a saved model folder.
        huggingface_hub.errors.OfflineModeIsEnabled: ``HF_HUB_OFFLINE`` is set (raised before any request).
    """

    folder = Path(out_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"push_student: {folder} has no config.json; write it with save_student first")
    if _hub_offline():
        raise OfflineModeIsEnabled(
            f"push_student: cannot upload {folder} to {hub_model_id!r}: HF_HUB_OFFLINE is set (offline mode). "
            "Unset HF_HUB_OFFLINE and log in (huggingface-cli login or token=...) to push.")
    api = HfApi(token=token)
    api.create_repo(repo_id=hub_model_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(repo_id=hub_model_id, folder_path=str(folder), repo_type="model",
                             commit_message=commit_message)


try:
    from transformers import GenerationConfig as _GenerationConfig
    from transformers import Pipeline as _Pipeline
except ImportError:  # pragma: no cover
    _Pipeline, _GenerationConfig = object, None


class TranslationPipeline(_Pipeline):
    """Seq2seq translation pipeline (the one Transformers 5 removed): text(s) in, ``translation_text`` out.

    Built by :func:`translation_pipeline`. Calling it with a string returns ``[{"translation_text": str}]``,
    with a list of strings a list of such dicts (one per input; several per input with
    ``num_return_sequences``). Keyword arguments of the call or of the constructor that are generation
    parameters (``num_beams``, ``max_new_tokens``, ...) go to ``model.generate`` (the length capped at the model's
    position table); ``truncation`` (default True) to the tokenizer. The translation direction
    (``self.languages``, :class:`~hf_seqkd.languages.Languages`) adds the prefix and the forced target token.
    """

    _pipeline_calls_generate = True
    # used for what neither the call nor the model's generation config sets (else generate's max_length=20)
    _default_generation_config = _GenerationConfig(max_new_tokens=CARD_MAX_NEW_TOKENS) if _GenerationConfig else None
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, truncation=None, **generate_kwargs):
        preprocess_params = {} if truncation is None else {"truncation": truncation}
        return preprocess_params, generate_kwargs, {}

    def __call__(self, inputs, **kwargs):
        result = super().__call__(inputs, **kwargs)
        if (isinstance(inputs, list) and all(isinstance(x, str) for x in inputs)
                and all(isinstance(r, list) and len(r) == 1 for r in result)):
            return [r[0] for r in result]
        return result

    languages = None  # set by translation_pipeline

    def preprocess(self, text, truncation=True):
        prefix = self.languages.source_prefix if self.languages is not None else ""
        limit = max_source_positions(self.model, self.tokenizer)
        return self.tokenizer(prefix + text, return_tensors="pt", truncation=truncation and limit is not None,
                              max_length=limit)

    def _forward(self, model_inputs, **generate_kwargs):
        if self.languages is not None:
            generate_kwargs = {**self.languages.generate_kwargs(), **generate_kwargs}
        if generate_kwargs.get("max_new_tokens") is not None:
            generate_kwargs["max_new_tokens"] = cap_max_new_tokens(self.model, generate_kwargs["max_new_tokens"])
        if hasattr(self, "_prepare_generate_kwargs"):
            generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        in_b = model_inputs["input_ids"].shape[0]
        output_ids = self.model.generate(**model_inputs, **generate_kwargs)
        output_ids = output_ids.reshape(in_b, output_ids.shape[0] // in_b, *output_ids.shape[1:])
        return {"output_ids": output_ids}

    def postprocess(self, model_outputs):
        return [{"translation_text": self.tokenizer.decode(ids, skip_special_tokens=True)}
                for ids in model_outputs["output_ids"][0]]


def translation_pipeline(model, tokenizer=None, device=None, *, src_lang: str | None = None,
                         tgt_lang: str | None = None, prefix: str | None = None, **kwargs) -> TranslationPipeline:
    """A translation pipeline for a seq2seq model, in any Transformers version (5.x removed the task).

    Args:
        model: a ``PreTrainedModel`` or a folder/Hub id for ``AutoModelForSeq2SeqLM.from_pretrained``.
        tokenizer: a tokenizer or a folder/Hub id (default: the model's folder/id).
        device: ``-1``/``"cpu"``, a CUDA index or a ``torch.device`` (default: the model's device for a model
            object, otherwise GPU 0 when available, else CPU).
        src_lang, tgt_lang: language codes of a multilingual tokenizer (NLLB ``"deu_Latn"``, mBART-50 ``"de_DE"``,
            M2M100 ``"de"``); default: what the tokenizer was saved with (a student saved by hf_seqkd has them).
        prefix: text put before every source (default: the model's ``config.prefix``, which hf_seqkd records for a
            T5 student).
        **kwargs: pipeline arguments (``batch_size``) and generation defaults (``num_beams``,
            ``max_new_tokens``, ...).

    Raises:
        ValueError: a multilingual tokenizer without a target language, or an unknown code (codes listed).
    """

    if isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            tokenizer = str(model)
        model = AutoModelForSeq2SeqLM.from_pretrained(str(model))
    elif device is None:
        device = model.device
    if tokenizer is None:
        raise ValueError("translation_pipeline: pass the tokenizer with a model object")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    prefix = prefix if prefix is not None else (getattr(model.config, "prefix", None) or "")
    languages = resolve_languages(tokenizer, model, src_lang=src_lang, tgt_lang=tgt_lang, source_prefix=prefix)
    languages.apply(tokenizer)
    pipe = TranslationPipeline(model=model, tokenizer=tokenizer, task="translation", device=device, **kwargs)
    pipe.languages = languages
    return pipe
