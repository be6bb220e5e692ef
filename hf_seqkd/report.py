"""Compare saved models on a test set, and the views of the results: Markdown tables, JSON, the BLEU-vs-speed plot.

* :func:`load_for_evaluation`: a saved folder -> a ready model and its tokenizer (a Transformers folder or Hub id in
  the local cache; a CTranslate2 folder with ``model.bin`` becomes a :class:`~hf_seqkd.export.CTranslate2Translator`).
* :func:`compare_models`: :class:`~hf_seqkd.evaluation.EvaluationResult` of several folders, one at a time in
  memory, with the speed-up over the first.
* :func:`markdown_table` (the one table writer; cards use it too), :func:`plot_bleu_vs_speed`, :func:`write_report`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from .evaluation import (
    EvaluationResult,
    add_speedup,
    ctranslate2_parameter_counts,
    describe_machine,
    evaluate_model,
    local_folder,
    model_disk_size,
    timed_decode,
)
from .export import CTranslate2Translator
from .languages import resolve_languages

__all__ = [
    "is_ctranslate2_dir",
    "load_for_evaluation",
    "check_tokenizer",
    "compare_models",
    "parse_model_specs",
    "COLUMNS",
    "markdown_table",
    "report_table",
    "plot_bleu_vs_speed",
    "write_report",
    # the evaluator and its helpers, re-exported from hf_seqkd.evaluation
    "EvaluationResult",
    "evaluate_model",
    "timed_decode",
    "add_speedup",
    "model_disk_size",
    "ctranslate2_parameter_counts",
    "describe_machine",
]

_HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
_CT2_VOCABULARIES = ("shared_vocabulary", "target_vocabulary")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "source.spm", "spiece.model",
                    "sentencepiece.bpe.model")


# ------------------------------------------------------------------------------------------------ loading
def is_ctranslate2_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a CTranslate2 model folder (it holds ``model.bin``)."""
    return (Path(path) / "model.bin").is_file()


def _is_transformers_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(any(path.glob(p)) for p in _HF_WEIGHTS)


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def _ct2_vocabulary(path: Path) -> list[str]:
    for stem in _CT2_VOCABULARIES:
        if (path / f"{stem}.json").is_file():
            return json.loads((path / f"{stem}.json").read_text(encoding="utf-8"))
        if (path / f"{stem}.txt").is_file():
            return (path / f"{stem}.txt").read_text(encoding="utf-8").splitlines()
    raise ValueError(f"{path}: CTranslate2 folder without a target vocabulary ({', '.join(_CT2_VOCABULARIES)})")


def check_tokenizer(model, tokenizer, name: str = "model") -> None:
    """Raise ``ValueError`` when ``tokenizer`` does not belong to ``model``.

    Transformers models: the tokenizer may not have more tokens than the model has embeddings, and its pad and
    end-of-sentence ids must be the model's. CTranslate2 folders (a path or translator): at least 99% of the
    tokens of the larger of the two vocabularies must be shared (CTranslate2 works on token strings).
    """

    if isinstance(model, CTranslate2Translator) or isinstance(model, (str, os.PathLike)):
        folder = Path(model.ct2_dir if isinstance(model, CTranslate2Translator) else model)
        vocab = _ct2_vocabulary(folder)
        shared = len(set(vocab) & set(tokenizer.get_vocab()))
        if shared < 0.99 * max(len(vocab), len(tokenizer)):
            raise ValueError(
                f"{name}: the tokenizer ({len(tokenizer)} tokens, {type(tokenizer).__name__}) does not match the "
                f"CTranslate2 vocabulary of {folder} ({len(vocab)} tokens, {shared} shared); pass the tokenizer "
                "of the model it was converted from")
        return
    embeddings = model.get_input_embeddings().num_embeddings
    problems = []
    if len(tokenizer) > embeddings:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens, the model only {embeddings} embeddings")
    for attr in ("pad_token_id", "eos_token_id"):
        want, got = getattr(model.config, attr, None), getattr(tokenizer, attr, None)
        if isinstance(want, int) and isinstance(got, int) and want != got:
            problems.append(f"{attr} is {got} in the tokenizer but {want} in the model's config")
    if problems:
        raise ValueError(f"{name}: mismatched tokenizer: " + "; ".join(problems))


def load_for_evaluation(path: str | os.PathLike, tokenizer=None, *, device: str = "cpu",
                        compute_type: str = "default", threads: int | None = None, name: str | None = None):
    """Load a saved model for :func:`evaluate_model`.

    Args:
        path: a Transformers model folder (``config.json`` + weights), a Hub id in the local cache, or a
            CTranslate2 folder (``model.bin``).
        tokenizer: a tokenizer object or a folder/id; default: the one saved in ``path`` (a CTranslate2 folder
            usually has none: pass the tokenizer of the model it was converted from).
        device: ``"cpu"`` or ``"cuda"`` (for CTranslate2 also ``"auto"``).
        compute_type: CTranslate2 compute type (``"default"``: the saved weight type).
        threads: CTranslate2 ``intra_threads`` (default: ``torch.get_num_threads()``, what Transformers uses).
        name: the model's name in error messages.

    Returns:
        ``(model, tokenizer, kind)``: a ``PreTrainedModel`` in eval mode on ``device`` or a
        :class:`~hf_seqkd.export.CTranslate2Translator`; ``kind`` is ``"transformers"`` or ``"ctranslate2"``.

    Raises:
        ValueError: ``path`` is neither kind of folder, the tokenizer is missing or does not match.
    """

    folder = Path(path)
    name = name or folder.name
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if is_ctranslate2_dir(folder):

        if tokenizer is None:
            if not _has_tokenizer(folder):
                raise ValueError(f"{name}: the CTranslate2 folder {folder} has no tokenizer files; pass the tokenizer "
                                 "of the Transformers model it was converted from (--tokenizer)")
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        check_tokenizer(folder, tokenizer, name)
        threads = torch.get_num_threads() if threads is None else int(threads)
        if device == "cuda":
            import ctranslate2

            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"  # a CPU-only build: the row says so
        translator = CTranslate2Translator(folder, tokenizer, device=device, compute_type=compute_type,
                                           intra_threads=threads)
        return translator, tokenizer, "ctranslate2"
    if folder.exists() and not _is_transformers_dir(folder):
        raise ValueError(f"{name}: {folder} is neither a Transformers model folder (config.json and *.safetensors "
                         "or pytorch_model.bin) nor a CTranslate2 folder (model.bin)")
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(str(path))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"{name}: cannot load {path} as a Transformers seq2seq model with its tokenizer, nor is it a "
                         f"CTranslate2 folder (model.bin): {err}") from err
    check_tokenizer(model, tokenizer, name)
    return model.to(device).eval(), tokenizer, "transformers"


def parse_model_specs(specs: Iterable[str]) -> list[tuple[str, str]]:
    """``["teacher=path/a", "path/b"]`` -> ``[("teacher", "path/a"), ("b", "path/b")]`` (a bare path is named
    after its folder). Raises ``ValueError`` on repeated names or an empty spec."""
    out, seen = [], set()
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep or os.sep in name or "/" in name or not name:
            name, path = Path(str(spec).rstrip("/")).name, str(spec)
        if not path or not name:
            raise ValueError(f"--models {spec!r}: expected NAME=PATH or PATH")
        if name in seen:
            raise ValueError(f"--models: the name {name!r} is given twice; name models with NAME=PATH")
        seen.add(name)
        out.append((name, path))
    return out


def compare_models(models: Mapping[str, str] | Sequence[tuple[str, str]], sources: Sequence[str],
                   references: Sequence[str], *, tokenizer=None, device: str = "cpu", compute_type: str = "default",
                   threads: int | None = None, batch1_beam: str = "all", show_progress: bool = False,
                   languages: Mapping[str, str | None] | None = None, **evaluate_kwargs) -> list[EvaluationResult]:
    """:func:`~hf_seqkd.evaluation.evaluate_model` results of several saved models (one at a time in memory),
    speed-ups over the first included.

    Args:
        models: name -> path (or ``(name, path)`` pairs), Transformers or CTranslate2 folders; the first is the
            reference of the speed-up (:func:`add_speedup`).
        sources, references: the test set.
        tokenizer: the tokenizer (object or folder) of models whose folder has none, typically CTranslate2
            folders; a folder's own tokenizer files take precedence. Without it, a CTranslate2 folder without
            tokenizer files gets the tokenizer of the first Transformers model in ``models`` whose vocabulary
            matches (the one it was converted from).
        device: ``"cpu"`` or ``"cuda"``.
        compute_type: CTranslate2 compute type.
        threads: threads for both back-ends (``torch.set_num_threads``; CTranslate2 ``intra_threads``); default:
            torch's current number.
        batch1_beam: which models get the batch-1 beam-search timing: ``"all"``, ``"first"`` (the reference
            model only, e.g. the teacher whose beam search the students' greedy decoding is compared with) or
            ``"none"``.
        show_progress: progress bars.
        languages: ``src_lang``, ``tgt_lang``, ``source_lang``, ``target_lang`` for
            :func:`~hf_seqkd.languages.resolve_languages`, resolved for each model's tokenizer (its forced target
            token, its T5 prefix when ``source_prefix`` is empty); a tokenizer saved with its languages needs none.
        **evaluate_kwargs: :func:`evaluate_model` options (``num_beams``, ``batch_size``, ``batch1_samples``,
            ``max_new_tokens``, ``source_prefix``, ``bleu_tokenize``).
    """

    items = list(models.items()) if isinstance(models, Mapping) else [tuple(m) for m in models]
    if not items:
        raise ValueError("compare_models: no models given")
    if batch1_beam not in ("all", "first", "none"):
        raise ValueError(f"compare_models: batch1_beam={batch1_beam!r}; use 'all', 'first' or 'none'")
    if threads:
        torch.set_num_threads(int(threads))
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    candidates = [p for _, p in items if not is_ctranslate2_dir(p) and local_folder(p) is not None
                  and _has_tokenizer(local_folder(p))]
    rows = []
    for index, (name, path) in enumerate(tqdm(items, desc="models", unit="model", disable=not show_progress)):
        folder, tok = local_folder(path), None
        if folder is None or not _has_tokenizer(folder):  # a folder's own tokenizer comes first
            tok = tokenizer
            if tok is None and is_ctranslate2_dir(path):
                tok = _matching_tokenizer(path, candidates, name)
        model, tok, kind = load_for_evaluation(path, tok, device=device, compute_type=compute_type,
                                               threads=torch.get_num_threads(), name=name)
        direction = resolve_languages(tok, model if kind == "transformers" else None, **dict(languages or {}),
                                      source_prefix=evaluate_kwargs.get("source_prefix", ""))
        direction.apply(tok)
        settings = {**evaluate_kwargs, "source_prefix": direction.source_prefix,
                    "generate_kwargs": direction.generate_kwargs()}
        rows.append(evaluate_model(model, tok, sources, references, name=name, path=path,
                                   batch1_beam=batch1_beam == "all" or (batch1_beam == "first" and index == 0),
                                   show_progress=show_progress, **settings))
        del model
    return add_speedup(rows)


def _matching_tokenizer(ct2_dir, candidates: Sequence[str], name: str):

    for candidate in candidates:
        tok = AutoTokenizer.from_pretrained(str(local_folder(candidate)))
        try:
            check_tokenizer(ct2_dir, tok, name)
        except ValueError:
            continue
        return tok
    raise ValueError(f"{name}: the CTranslate2 folder {ct2_dir} has no tokenizer files and no Transformers model "
                     "given has a matching vocabulary; pass the tokenizer of the model it was converted from "
                     "(--tokenizer)")


# -------------------------------------------------------------------------------------------------- tables
# The header of every column a table may show (result fields, properties, common ``extra`` entries).
COLUMNS = {
    "model": "Model", "role": "Role", "kind": "Back-end", "params": "Parameters", "nonzero_params": "Non-zero",
    "sparsity": "Sparsity", "size_mb": "Size (MB)", "bleu_greedy": "BLEU (greedy)", "bleu_beam": "BLEU (beam)",
    "chrf": "chrF", "chrf_greedy": "chrF (greedy)", "chrf_beam": "chrF (beam)",
    "sent_per_s_greedy_batched": "Sentences/s (greedy)", "tok_per_s_greedy_batched": "Tokens/s (greedy)",
    "sent_per_s_beam_batched": "Sentences/s (beam)", "tok_per_s_beam_batched": "Tokens/s (beam)",
    "sent_per_s_greedy_batch1": "Sentences/s (greedy, batch 1)",
    "tok_per_s_greedy_batch1": "Tokens/s (greedy, batch 1)",
    "sent_per_s_beam_batch1": "Sentences/s (beam, batch 1)", "tok_per_s_beam_batch1": "Tokens/s (beam, batch 1)",
    "speedup": "Speed-up", "speedup_batch1": "Speed-up (batch 1)", "speedup_over_beam": "Speed-up over beam",
    "bleu_greedy_p_value": "p (BLEU greedy)", "bleu_beam_p_value": "p (BLEU beam)",
    "chrf_greedy_p_value": "p (chrF greedy)", "chrf_beam_p_value": "p (chrF beam)",
}
# what write_report and recipes/evaluate.py show
COMPARISON_COLUMNS = ["model", "kind", "params", "nonzero_params", "size_mb", "bleu_greedy",
                      "bleu_greedy_p_value", "bleu_beam", "bleu_beam_p_value", "chrf_greedy", "chrf_beam",
                      "sent_per_s_greedy_batched", "tok_per_s_greedy_batched",
                      "sent_per_s_beam_batched", "tok_per_s_beam_batched", "sent_per_s_greedy_batch1",
                      "tok_per_s_greedy_batch1", "sent_per_s_beam_batch1", "tok_per_s_beam_batch1", "speedup",
                      "speedup_batch1"]


def _value(row, key):
    return row.get(key) if isinstance(row, (EvaluationResult, Mapping)) else getattr(row, key, None)


def _human_count(n) -> str:
    for bound, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= bound:
            return f"{n / bound:.1f}{suffix}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def _cell(key: str, value, human: bool, ci: float | None = None) -> str:
    if value is None or value == "":
        return "–" if human else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")
    if ci is not None:  # a score with its 95% confidence interval
        return f"{value:.2f} ± {ci:.2f}"
    if key.endswith("_p_value"):
        return f"{value:.3f}" if value >= 0.001 else "< 0.001"
    if key in ("params", "nonzero_params") and human:
        return _human_count(value)
    if key.startswith("speedup") and human:
        return f"{value:.2f}×"
    if key.startswith(("sent_per_s", "tok_per_s")) and human:
        return f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return f"{value:.2f}"


def markdown_table(rows: Sequence, columns: Sequence[str | tuple[str, str]] | None = None, *,
                   human: bool = False, drop_empty: bool = True) -> str:
    """The one Markdown table writer: a row per result (:class:`~hf_seqkd.evaluation.EvaluationResult` or a
    mapping), a column per key (or ``(key, header)``; headers from :data:`COLUMNS`, else the key).

    Args:
        rows: the results.
        columns: keys to show, in order (default: every key of the first mapping, or :data:`COMPARISON_COLUMNS`).
        human: parameters as ``49.0M``, speed-ups as ``3.50×`` (model cards); otherwise numbers as they are, floats
            with two decimals, large integers with thousands separators. A score whose row has a confidence
            interval (``<key>_ci``) reads ``31.16 ± 0.95``; p-values have three decimals.
        drop_empty: leave out columns that are empty in every row.
    """
    if not rows:
        return ""
    if columns is None:
        columns = list(rows[0]) if isinstance(rows[0], Mapping) else COMPARISON_COLUMNS
    pairs = [(c, COLUMNS.get(c, c)) if isinstance(c, str) else tuple(c) for c in columns]
    if drop_empty:
        pairs = [(k, h) for k, h in pairs if any(_value(r, k) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h in pairs) + " |", "|" + "|".join(" --- " for _ in pairs) + "|"]
    lines += ["| " + " | ".join(_cell(k, _value(r, k), human, _value(r, f"{k}_ci")) for k, _ in pairs) + " |"
              for r in rows]
    return "\n".join(lines)


def report_table(rows: Sequence, columns: Sequence[str | tuple[str, str]] | None = None) -> str:
    """The comparison table (:data:`COMPARISON_COLUMNS` by default), as :func:`markdown_table` writes it."""
    return markdown_table(rows, columns or COMPARISON_COLUMNS)


def signature_line(rows: Sequence) -> str:
    """The sacrebleu signatures of the scores in ``rows`` (so that the numbers can be compared elsewhere)."""
    bleu = sorted({s for r in rows if (s := _value(r, "bleu_signature"))})
    chrf = sorted({s for r in rows if (s := _value(r, "chrf_signature"))})
    if not bleu and not chrf:
        return ""
    line = f"sacrebleu signatures: BLEU {'; '.join(bleu) or '-'}; chrF {'; '.join(chrf) or '-'}"
    tests = sorted({(b, t) for r in rows if (b := _value(r, "significance_baseline")) and
                    (t := _value(r, "significance_test"))})
    for baseline, test in tests:
        line += (f". ± is the 95% confidence interval; p is the p-value of the difference from {baseline} "
                 f"(sacrebleu {test})")
    return line


def _settings_line(rows: Sequence) -> str:
    first = rows[0]
    beams = _value(first, "num_beams")
    parts = [f"{_value(first, 'test_sentences')} test sentences",
             f"greedy and beam search ({beams} beams)" if beams and beams > 1 else "greedy search",
             f"batched: {_value(first, 'batch_size')} sentences per batch"]
    if _value(first, "batch1_sentences"):
        parts.append(f"batch 1: timed on the first {_value(first, 'batch1_sentences')} sentences")
    parts.append(f"device {_value(first, 'device')}, threads: {_value(first, 'threads')}")
    line = "; ".join(parts) + ". Speed-up: sentences/s (greedy) over the first model's."
    signatures = signature_line(rows)
    return line + (f" {signatures}." if signatures else "")


# Label positions tried in turn (offset from the point, in points; horizontal alignment): right, left, above, below.
_LABEL_SLOTS = [((dx, dy), "left" if dx > 0 else "right" if dx < 0 else "center")
                for dy in (4, -11, 14, -21, 24, -31, 34, -41) for dx in (5, -5, 0)]


def _place_labels(fig, ax, annotations) -> None:
    """Move each label to the first slot of ``_LABEL_SLOTS`` (offset in points, alignment) where its text overlaps
    no point and no label placed before it and stays inside the axes: crowded plots of many same-size students are
    otherwise unreadable. Labels are placed from the top of the plot down; one with no free slot gets the first."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform(a.xy) for a in annotations]
    placed = []
    for ann in sorted(annotations, key=lambda a: -a.xy[1]):
        for offset, align in _LABEL_SLOTS + [_LABEL_SLOTS[0]]:
            ann.set_position(offset)
            ann.set_horizontalalignment(align)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)  # the text alone, not its leader line
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            on_dot = any(box.x0 - 3 <= x <= box.x1 + 3 and box.y0 - 3 <= y <= box.y1 + 3 for x, y in dots)
            if inside and not on_dot and not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)


def plot_bleu_vs_speed(rows: Sequence[Mapping], path: str | os.PathLike | None = None, *,
                       x: str = "sent_per_s_greedy_batched", y: str = "bleu_greedy", log_x: bool = True,
                       beam_models: Sequence[str] | None = None):
    """BLEU against decoding speed, one labelled point per model (rows without both values are skipped), and a
    second point ``"<model>, beam N"`` (its beam-search BLEU and speed: ``x`` and ``y`` with ``greedy`` read as
    ``beam``) for the ``beam_models`` (default: the teachers, by ``role`` or a name starting with ``teacher``:
    Kim & Rush compare the student's greedy decoding with the teacher's beam search).

    Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no global backend change).

    Returns:
        ``(figure, annotations)``: the figure and the list of ``matplotlib.text.Annotation`` labels (one per
        plotted model, in row order). Saved as PNG to ``path`` when given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = [(str(_value(r, "model")), _value(r, x), _value(r, y)) for r in rows]
    for r in rows:
        name = str(_value(r, "model"))
        wanted = (name in beam_models if beam_models is not None
                  else _value(r, "role") == "teacher" or name.startswith("teacher"))
        if wanted and "greedy" in x and "greedy" in y:
            values.append((f"{name}, beam {_value(r, 'num_beams') or ''}".rstrip(), _value(r, x.replace("greedy",
                           "beam")), _value(r, y.replace("greedy", "beam"))))
    points = [(name, float(vx), float(vy)) for name, vx, vy in values
              if isinstance(vx, (int, float)) and isinstance(vy, (int, float))
              and math.isfinite(vx) and math.isfinite(vy) and vx > 0]
    fig = Figure(figsize=(8.0, 5.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    annotations = []
    if points:
        ax.scatter([p[1] for p in points], [p[2] for p in points], zorder=3)
        for label, px, py in points:
            annotations.append(ax.annotate(label, (px, py), xytext=(5, 4), textcoords="offset points", fontsize=8,
                                           arrowprops=dict(arrowstyle="-", lw=0.5, color="0.6", shrinkA=0,
                                                           shrinkB=3)))  # a thin leader line
        if log_x:
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(0.2)
    x_label = "sentences/s" + (" (greedy, batched)" if x == "sent_per_s_greedy_batched" else f" ({x})")
    ax.set_xlabel(x_label + (", log scale" if log_x and points else ""))
    ax.set_ylabel("BLEU" + (" (greedy)" if y == "bleu_greedy" else f" ({y})"))
    ax.set_title("Translation quality against decoding speed")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _place_labels(fig, ax, annotations)
    if path is not None:
        fig.savefig(path, format="png")
    return fig, annotations


def write_report(rows: Sequence[Mapping], out_dir: str | os.PathLike, *, title: str = "Model comparison",
                 notes: str = "") -> dict[str, Path]:
    """Write ``results.md`` (settings, table, plot), ``results.json`` (the rows) and ``bleu_vs_speed.png``.

    Args:
        rows: :class:`~hf_seqkd.evaluation.EvaluationResult` (or JSON-ready mappings with ``model``); the table
            shows the comparison columns, the JSON everything.
        out_dir: the folder (created if needed).
        title: the Markdown heading.
        notes: Markdown added under the table.

    Returns:
        ``{"markdown": path, "json": path, "plot": path}``.
    """
    if not rows:
        raise ValueError("write_report: no rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json", "plot": out / "bleu_vs_speed.png"}
    plot_bleu_vs_speed(rows, paths["plot"])
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump([r.to_dict() if isinstance(r, EvaluationResult) else dict(r) for r in rows], f, indent=2)
    text = [f"# {title}", "", _settings_line(rows), "", report_table(rows), ""]
    if notes:
        text += [notes.strip(), ""]
    text += [f"![BLEU against decoding speed]({paths['plot'].name})", ""]
    paths["markdown"].write_text("\n".join(text), encoding="utf-8")
    return paths
