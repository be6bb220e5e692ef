"""Model cards, saving and publishing distilled students on the Hugging Face Hub.

* :func:`make_model_card` writes a ``README.md`` (YAML front matter with ``model-index`` BLEU/chrF results,
  built with ``huggingface_hub.ModelCardData``, which works offline) describing the student, the distillation
  method (Kim & Rush 2016) and its results against the teacher.
* :func:`save_student` writes model, tokenizer and card into one folder (:func:`write_model_card` the card alone);
  :func:`push_student` uploads it.
* :func:`translation_pipeline` / :class:`TranslationPipeline`: Transformers 5 removed the ``"translation"``
  (and ``"text2text-generation"``) pipeline task (``pipeline("translation", ...)`` raises ``KeyError`` in
  5.x); this is a drop-in replacement with the same output format, ``[{"translation_text": ...}]``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "make_model_card",
    "save_student",
    "write_model_card",
    "push_student",
    "translation_pipeline",
    "TranslationPipeline",
]

_KIM_RUSH_BIBTEX = """@inproceedings{kim-rush-2016-sequence,
  title = {Sequence-Level Knowledge Distillation},
  author = {Kim, Yoon and Rush, Alexander M.},
  booktitle = {Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing},
  year = {2016},
  pages = {1317--1327},
  url = {https://aclanthology.org/D16-1139},
}"""

# canonical key, column header, accepted spellings (compared after lower-casing, spaces/dashes -> "_")
_COLUMNS = (
    ("model", "Model", ("model", "name", "model_name")),
    ("params", "Parameters", ("params", "parameters", "num_parameters", "n_params", "num_params")),
    ("nonzero_params", "Non-zero parameters", ("nonzero_params", "nonzero_parameters", "num_nonzero_parameters")),
    ("bleu_greedy", "BLEU (greedy)", ("bleu_greedy", "bleu", "greedy_bleu", "bleu_greedy_search")),
    ("bleu_beam", "BLEU (beam)", ("bleu_beam", "beam_bleu", "bleu_beam_search")),
    ("chrf", "chrF", ("chrf", "chrf_greedy", "chrf++", "chrf_beam")),
    ("sentences_per_second", "Sentences/s", ("sentences_per_second", "sent_per_s", "sents_per_sec",
                                             "sentences_per_sec", "speed")),
    ("speedup", "Speed-up", ("speedup", "speed_up")),
)
_ALIASES = {alias: key for key, _, aliases in _COLUMNS for alias in aliases}
_HEADERS = {key: header for key, header, _ in _COLUMNS}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _canonical(key: str) -> str:
    norm = re.sub(r"[\s\-]+", "_", str(key).strip().lower())
    return _ALIASES.get(norm, key)


def _looks_like_hub_id(name: str) -> bool:
    return bool(name) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def _method_parts(method: str, hyperparameters: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(tag, title, description) for each component of ``method``."""
    m = method.lower()
    parts = []
    if "word" in m:
        parts.append(("word-level-kd", "Word-level knowledge distillation",
                      "The student is trained to match the teacher's per-token output distributions "
                      "(cross-entropy to the teacher's softmax, mixed with the usual loss on the references; "
                      "Kim & Rush 2016, Sec. 3.1)."))
    if "inter" in m:
        parts.append(("sequence-level-interpolation", "Sequence-level interpolation",
                      "The student is trained on the hypothesis of the teacher's beam closest to the reference "
                      "(by sentence-level BLEU) instead of the reference (Kim & Rush 2016, Sec. 3.3)."))
    elif "seq" in m:
        parts.append(("sequence-level-kd", "Sequence-level knowledge distillation",
                      "The training targets are the teacher's beam-search translations of the training sources "
                      "instead of the references; the student is trained on them with ordinary cross-entropy "
                      "(Kim & Rush 2016, Sec. 3.2)."))
    if "prun" in m or "sparsity" in hyperparameters:
        parts.append(("pruning", "Magnitude pruning",
                      "After distillation the smallest-magnitude weights were removed and the student retrained "
                      "with them held at zero (See, Luong & Manning 2016; Kim & Rush 2016, Sec. 5.3)."))
    if "shrink" in m or "sft" in m.split("+"):
        parts.append(("shrink-and-fine-tune", "Shrink and fine-tune",
                      "The student was initialised with a subset of the teacher's layers (Shleifer & Rush 2020)."))
    return parts


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value)
    return str(value)


def _human(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    for bound, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= bound:
            return f"{n / bound:.1f}{suffix}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def _fmt_cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return "–"
    if key in ("params", "nonzero_params"):
        return _human(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value).replace("|", "\\|")
    if key in ("bleu_greedy", "bleu_beam", "chrf"):
        return f"{value:.2f}"
    if key == "sentences_per_second":
        return f"{value:.1f}"
    if key == "speedup":
        return f"{value:.2f}×"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _normalise_results(results, teacher_name: str, model_name: str) -> tuple[list[dict], int | None, int | None]:
    """Rows with canonical keys, the student's row index and the teacher's row index."""
    if results is None:
        rows = []
    elif isinstance(results, Mapping):
        if results and all(isinstance(v, Mapping) for v in results.values()):
            rows = [{"model": name, **dict(values)} for name, values in results.items()]
        else:
            rows = [{"model": model_name, "role": "student", **dict(results)}]
    else:
        rows = [dict(r) for r in results]
    rows = [{_canonical(k): v for k, v in row.items()} for row in rows]

    def role(row):
        return str(row.get("role", "")).lower()

    teacher = next((i for i, r in enumerate(rows) if role(r) == "teacher"), None)
    if teacher is None:
        teacher = next((i for i, r in enumerate(rows) if r.get("model") == teacher_name), None)
    student = next((i for i, r in enumerate(rows) if role(r) == "student"), None)
    if student is None:
        student = next((i for i, r in enumerate(rows) if r.get("model") == model_name), None)
    if student is None:
        student = next((i for i in range(len(rows) - 1, -1, -1) if i != teacher), None)
    # speed-up against the teacher when not given
    if teacher is not None and all(r.get("speedup") is None for r in rows):
        base = rows[teacher].get("sentences_per_second")
        if isinstance(base, (int, float)) and base > 0:
            for r in rows:
                if isinstance(r.get("sentences_per_second"), (int, float)):
                    r["speedup"] = r["sentences_per_second"] / base
    return rows, student, teacher


def _results_table(rows: list[dict]) -> str:
    keys = [key for key, _, _ in _COLUMNS if any(r.get(key) is not None for r in rows)]
    extra = []
    for r in rows:
        for k in r:
            if k not in _HEADERS and k not in ("role",) and k not in extra:
                extra.append(k)
    keys += extra
    lines = ["| " + " | ".join(_HEADERS.get(k, str(k)) for k in keys) + " |",
             "|" + "|".join("---" if k == "model" else "---:" for k in keys) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt_cell(k, r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def make_model_card(
    *,
    teacher_name: str,
    method: str,
    hyperparameters: Mapping[str, Any],
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    source_lang: str,
    target_lang: str,
    datasets: str | Sequence[str] | None = None,
    license: str | None = None,
    model_name: str | None = None,
    extra_text: str = "",
    eval_dataset: str | None = None,
    eval_split: str = "test",
    hub_model_id: str | None = None,
) -> str:
    """The text of a ``README.md`` model card for a distilled student.

    The YAML front matter has ``language: [source_lang, target_lang]``, ``license`` (when given), ``tags``
    (``translation``, ``knowledge-distillation``, ``hf_seqkd`` and one per method component), ``base_model``
    (the teacher, when it is a Hub id rather than a local path), ``datasets``, ``pipeline_tag: translation``
    and a ``model-index`` with the student's BLEU (``type: bleu``) and chrF (``type: chrf``) results. The body
    describes the model and method, lists the hyper-parameters, tabulates the results against the teacher and
    shows how to use the model.

    Args:
        teacher_name: the teacher's Hub id or path (e.g. ``"Helsinki-NLP/opus-mt-de-en"``).
        method: the distillation method, e.g. ``"seq-kd"``, ``"word-kd"``, ``"seq-inter"``, ``"word+seq-kd"``,
            ``"seq-kd+pruning"`` (components are recognised by the words word/seq/inter/prun/shrink).
        hyperparameters: name -> value (beam size of the teacher, learning rate, steps, sparsity, ...).
        results: the evaluation, either a list of rows (dicts with ``model`` and any of ``params``,
            ``nonzero_params``, ``bleu_greedy``, ``bleu_beam``, ``chrf``, ``sentences_per_second``,
            ``speedup``, optionally ``role`` = ``"teacher"``/``"student"``; other keys become extra columns),
            a mapping ``model name -> metrics``, or a flat metrics mapping for the student alone. The teacher's
            row is the one with ``role="teacher"`` or ``model == teacher_name``; the student's the one with
            ``role="student"`` or ``model == model_name``, else the last other row. The speed-up against the
            teacher is computed from ``sentences_per_second`` when not given.
        source_lang: source language code (e.g. ``"de"``).
        target_lang: target language code.
        datasets: training data set id(s) for the front matter.
        license: licence id (e.g. ``"apache-2.0"``, ``"cc-by-4.0"``); left out when ``None``.
        model_name: the student's name (default ``<teacher>-<method>-student``).
        extra_text: Markdown appended to the body (limitations, training details, ...).
        eval_dataset: the data set the results are on (default: the first of ``datasets``, else ``"custom"``).
        eval_split: its split.
        hub_model_id: the id used in the usage example (default ``model_name``).

    Returns:
        The card text (front matter + Markdown body).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    hyperparameters = dict(hyperparameters or {})
    teacher_short = teacher_name.rstrip("/").split("/")[-1]
    model_name = model_name or f"{teacher_short}-{_slug(method) or 'distilled'}-student"
    hub_model_id = hub_model_id or model_name
    if isinstance(datasets, str):
        datasets = [datasets]
    datasets = list(datasets) if datasets else None
    eval_dataset = eval_dataset or (datasets[0] if datasets else "custom")

    parts = _method_parts(method, hyperparameters)
    tags = ["translation", "knowledge-distillation", "hf_seqkd"]
    for tag in [_slug(method)] + [p[0] for p in parts]:
        if tag and tag not in tags:
            tags.append(tag)

    rows, student, teacher = _normalise_results(results, teacher_name, model_name)
    eval_results = []
    if student is not None:
        row = rows[student]
        for key, metric_type, metric_name in (("bleu_greedy", "bleu", "BLEU (greedy)"),
                                              ("bleu_beam", "bleu", "BLEU (beam search)"),
                                              ("chrf", "chrf", "chrF")):
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                eval_results.append(EvalResult(
                    task_type="translation", task_name=f"Translation {source_lang}-{target_lang}",
                    dataset_type=eval_dataset, dataset_name=eval_dataset, dataset_split=eval_split,
                    metric_type=metric_type, metric_name=metric_name, metric_value=round(float(value), 4)))

    data = ModelCardData(
        language=[source_lang, target_lang],
        license=license,
        tags=tags,
        base_model=teacher_name if _looks_like_hub_id(teacher_name) else None,
        datasets=datasets,
        model_name=model_name,
        eval_results=eval_results or None,
        pipeline_tag="translation",
        library_name="transformers",
    )

    teacher_ref = (f"[{teacher_name}](https://huggingface.co/{teacher_name})" if _looks_like_hub_id(teacher_name)
                   else f"`{teacher_name}`")
    body = [f"# {model_name}", ""]
    body.append(f"A {source_lang}→{target_lang} translation model distilled from the teacher {teacher_ref} with "
                "hf_seqkd, an implementation of *Sequence-Level Knowledge Distillation* "
                "(Kim & Rush, EMNLP 2016) for Hugging Face Transformers.")
    body += ["", "## Method", "", f"Method: `{method}`.", ""]
    for _, title, text in parts:
        body.append(f"- **{title}.** {text}")
    if parts:
        body.append("")
    if hyperparameters:
        body += ["### Hyper-parameters", "", "| Hyper-parameter | Value |", "|---|---|"]
        body += [f"| {k} | {_fmt_value(v)} |" for k, v in hyperparameters.items()]
        body.append("")
    if rows:
        body += ["## Results", "",
                 f"Scores on {eval_dataset} ({eval_split}); speed in sentences per second, speed-up relative to the "
                 "teacher.",
                 "", _results_table(rows), ""]
    body += [
        "## How to use", "",
        "```python",
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{hub_model_id}")',
        f'model = AutoModelForSeq2SeqLM.from_pretrained("{hub_model_id}")',
        'batch = tokenizer(["A sentence to translate."], return_tensors="pt", padding=True)',
        "print(tokenizer.batch_decode(model.generate(**batch, num_beams=5), skip_special_tokens=True))",
        "```", "",
        "With Transformers 4.x the translation pipeline works too:", "",
        "```python",
        "from transformers import pipeline",
        "",
        f'translator = pipeline("translation", model="{hub_model_id}")',
        'print(translator("A sentence to translate.")[0]["translation_text"])',
        "```", "",
        "Transformers 5 removed the `translation` pipeline task; hf_seqkd provides a drop-in replacement:", "",
        "```python",
        "from hf_seqkd.hub import translation_pipeline",
        "",
        f'translator = translation_pipeline("{hub_model_id}")',
        'print(translator("A sentence to translate.")[0]["translation_text"])',
        "```", "",
    ]
    if extra_text:
        body += [extra_text.strip(), ""]
    body += ["## Citation", "", "```bibtex", _KIM_RUSH_BIBTEX, "```", ""]
    text = "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body)
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
    from .pruning import apply_pruning_masks, pruning_masks

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
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

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
    parameters (``num_beams``, ``max_new_tokens``, ...) go to ``model.generate``; ``truncation`` (default
    True) to the tokenizer.
    """

    _pipeline_calls_generate = True
    # used for what neither the call nor the model's generation config sets (else generate's max_length=20)
    _default_generation_config = _GenerationConfig(max_new_tokens=256) if _GenerationConfig else None
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

    def preprocess(self, text, truncation=True):
        prefix = getattr(self, "prefix", None) or ""
        return self.tokenizer(prefix + text, return_tensors="pt", truncation=truncation)

    def _forward(self, model_inputs, **generate_kwargs):
        if hasattr(self, "_prepare_generate_kwargs"):
            generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        in_b = model_inputs["input_ids"].shape[0]
        output_ids = self.model.generate(**model_inputs, **generate_kwargs)
        output_ids = output_ids.reshape(in_b, output_ids.shape[0] // in_b, *output_ids.shape[1:])
        return {"output_ids": output_ids}

    def postprocess(self, model_outputs):
        return [{"translation_text": self.tokenizer.decode(ids, skip_special_tokens=True)}
                for ids in model_outputs["output_ids"][0]]


def translation_pipeline(model, tokenizer=None, device=None, **kwargs) -> TranslationPipeline:
    """A translation pipeline for a seq2seq model, in any Transformers version (5.x removed the task).

    Args:
        model: a ``PreTrainedModel`` or a folder/Hub id for ``AutoModelForSeq2SeqLM.from_pretrained``.
        tokenizer: a tokenizer or a folder/Hub id (default: the model's folder/id).
        device: ``-1``/``"cpu"``, a CUDA index or a ``torch.device`` (default: the model's device for a model
            object, otherwise GPU 0 when available, else CPU).
        **kwargs: pipeline arguments (``batch_size``) and generation defaults (``num_beams``,
            ``max_new_tokens``, ...).
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

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
    return TranslationPipeline(model=model, tokenizer=tokenizer, task="translation", device=device, **kwargs)
