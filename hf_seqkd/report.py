"""Compare saved models on a test set: quality, speed and size, as a Markdown table, a JSON file and a plot.

What ``recipes/evaluate.py`` (and ``recipes/prune.py``) are built on:

* :func:`load_for_evaluation`: a saved model folder -> a ready model and its tokenizer. A Transformers folder
  (``config.json`` + weights, or a Hub id in the local cache) loads with ``AutoModelForSeq2SeqLM``; a
  CTranslate2 folder (``model.bin``, written by :func:`hf_seqkd.export.to_ctranslate2`) becomes a
  :class:`~hf_seqkd.export.CTranslate2Translator` with the Hugging Face tokenizer it was converted with.
* :func:`evaluate_model`: one row of the comparison: BLEU and chrF with greedy and beam search, sentences/s and
  tokens/s batched and at batch size 1, parameters (total and non-zero), size on disk.
* :func:`compare_models`: rows for several folders; :func:`add_speedup`: speed-up over the first model;
  :func:`write_report`: ``results.md``, ``results.json`` and ``bleu_vs_speed.png``.

How things are measured (so that rows of different models and back-ends compare):

* Quality: corpus BLEU and chrF (:func:`hf_seqkd.evaluation.corpus_scores`, sacrebleu defaults) of the
  batched runs over the whole test set.
* Speed: wall-clock time of translating (tokenization, decoding and detokenization included, loading not),
  after one untimed warm-up batch. Batched runs use ``batch_size`` sentences per call over the whole test set
  (Transformers batches of length-sorted sentences; CTranslate2 sorts by length itself); batch-1 runs translate
  the first ``batch1_samples`` sentences one at a time (batch-1 decoding of a whole test set is slow on CPU),
  the count is in each row (``batch1_sentences``). Transformers runs on ``torch.get_num_threads()`` threads and
  CTranslate2 gets the same number (``intra_threads``).
* Tokens/s: target tokens of the translations (re-tokenized with the model's tokenizer, special tokens left
  out) per second: one definition for every back-end (Transformers counts ``</s>``, CTranslate2 does not).
* Parameters: Transformers models: distinct parameters (tied ones once) and their non-zero entries
  (:func:`hf_seqkd.count_parameters`). CTranslate2 models: the values stored in ``model.bin`` (rank >= 1,
  quantization scales left out; CTranslate2 stores tied and identical tensors once); non-zero counts the stored
  values, so int8 quantization, which rounds the smallest weights to zero, can make it lower than the source
  model's.
* Size: ``size_bytes`` is the weight files (``*.safetensors``, else ``*.bin``; CTranslate2: ``model.bin``),
  ``folder_bytes`` every file in the folder (tokenizer and configuration included; sub-folders such as
  Trainer checkpoints left out).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .evaluation import corpus_scores, evaluate_translation
from .students import count_parameters

__all__ = [
    "is_ctranslate2_dir",
    "load_for_evaluation",
    "check_tokenizer",
    "ctranslate2_parameter_counts",
    "model_disk_size",
    "timed_decode",
    "evaluate_model",
    "compare_models",
    "parse_model_specs",
    "add_speedup",
    "report_table",
    "plot_bleu_vs_speed",
    "write_report",
]

_HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
_CT2_VOCABULARIES = ("shared_vocabulary", "target_vocabulary")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "source.spm", "spiece.model",
                    "sentencepiece.bpe.model")
# CTranslate2's model.bin data types (include/ctranslate2/types.h): id -> (bytes, unsigned view, value mask)
_CT2_TYPES = {0: (4, "<u4", 0x7FFFFFFF), 1: (1, "<u1", 0xFF), 2: (2, "<u2", 0xFFFF), 3: (4, "<u4", 0xFFFFFFFF),
              4: (2, "<u2", 0x7FFF), 5: (2, "<u2", 0x7FFF)}  # float32, int8, int16, int32, float16, bfloat16


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
    from .export import CTranslate2Translator

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
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = Path(path)
    name = name or folder.name
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if is_ctranslate2_dir(folder):
        from .export import CTranslate2Translator

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


# ------------------------------------------------------------------------------------------ size, parameters
def _local_folder(path: str | os.PathLike) -> Path | None:
    """The folder of a saved model or of a cached Hub model; ``None`` if there is none."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or not a Hub id): no size
        return None


def model_disk_size(path: str | os.PathLike) -> dict[str, int | None]:
    """``{"size_bytes": weight files, "folder_bytes": all files}`` of a saved model folder (see the module
    docstring); ``None`` values for a model that is not on disk."""
    folder = _local_folder(path)
    if folder is None:
        return {"size_bytes": None, "folder_bytes": None}
    files = [f for f in folder.iterdir() if f.is_file()]
    if is_ctranslate2_dir(folder):
        weights = [folder / "model.bin"]
    else:
        weights = next(([f for f in files if f.match(p)] for p in _HF_WEIGHTS if any(f.match(p) for f in files)), [])
    return {"size_bytes": sum(f.stat().st_size for f in weights), "folder_bytes": sum(f.stat().st_size for f in files)}


def ctranslate2_parameter_counts(ct2_dir: str | os.PathLike) -> tuple[int, int] | tuple[None, None]:
    """``(total, nonzero)`` values stored in a CTranslate2 ``model.bin`` (see the module docstring).

    Reads the binary layout written by CTranslate2 4.x (``ModelSpec._serialize``, binary version 5 or 6):
    every variable once, aliases (tied or identical tensors) not again; scalars and quantization scales
    (``*_scale``) are left out. Returns ``(None, None)`` for another version.
    """
    import numpy as np

    def read(f, fmt):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def read_string(f):
        return f.read(read(f, "<H"))[:-1].decode("utf-8")

    total = nonzero = 0
    with open(Path(ct2_dir) / "model.bin", "rb") as f:
        if read(f, "<I") not in (5, 6):
            return None, None
        read_string(f)  # spec name
        read(f, "<I")  # spec revision
        for _ in range(read(f, "<I")):
            name = read_string(f)
            shape = [read(f, "<I") for _ in range(read(f, "<B"))]
            type_id = read(f, "<B")
            data = f.read(read(f, "<I"))
            if not shape or name.endswith("_scale") or type_id not in _CT2_TYPES:
                continue
            width, view, mask = _CT2_TYPES[type_id]
            values = np.frombuffer(data, dtype=view)
            total += values.size
            nonzero += int(np.count_nonzero(values & np.array(mask, dtype=view)))
    return total, nonzero


def _parameter_counts(model) -> tuple[int | None, int | None]:
    from .export import CTranslate2Translator

    if isinstance(model, CTranslate2Translator):
        return ctranslate2_parameter_counts(model.ct2_dir)
    return count_parameters(model), count_parameters(model, nonzero=True)


# ---------------------------------------------------------------------------------------------- evaluation
def timed_decode(model, tokenizer, sources, references, *, num_beams: int = 1, batch_size: int = 32,
                 max_new_tokens: int = 128, source_prefix: str = "", bleu_tokenize: str = "13a",
                 show_progress: bool = False) -> dict:
    """One timed translation of ``sources`` (Transformers model or :class:`~hf_seqkd.export.CTranslate2Translator`):
    a dict with ``bleu``, ``chrf`` (against ``references``), ``seconds`` (translation wall time),
    ``hypotheses``, ``target_lengths`` (each hypothesis's tokens, as the module docstring defines them for
    tokens/s) and ``target_tokens`` (their sum)."""
    from .export import CTranslate2Translator, translate_ctranslate2

    if isinstance(model, CTranslate2Translator):
        out = translate_ctranslate2(model, tokenizer, [source_prefix + s for s in sources], num_beams=num_beams,
                                    batch_size=batch_size, max_new_tokens=max_new_tokens)
        hypotheses = [h.strip() for h in out]
        out = {**corpus_scores(hypotheses, references, tokenize=bleu_tokenize), "seconds": out.seconds,
               "hypotheses": hypotheses}
    else:
        out = evaluate_translation(model, tokenizer, sources, references, num_beams=num_beams,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, source_prefix=source_prefix,
                                   bleu_tokenize=bleu_tokenize, show_progress=show_progress, return_hypotheses=True)
    lengths = _target_lengths(tokenizer, out["hypotheses"])
    return {**{k: out[k] for k in ("bleu", "chrf", "bleu_signature", "chrf_signature", "seconds", "hypotheses")},
            "target_lengths": lengths, "target_tokens": sum(lengths)}


def _target_lengths(tokenizer, hypotheses: Sequence[str]) -> list[int]:
    if not hypotheses:
        return []
    return [len(ids) for ids in tokenizer(text_target=list(hypotheses), add_special_tokens=False)["input_ids"]]


def evaluate_model(model, tokenizer, sources: Sequence[str], references: Sequence[str], *, name: str = "model",
                   path: str | os.PathLike | None = None, num_beams: int = 5, batch_size: int = 32,
                   batch1_samples: int = 200, batch1_beam: bool = True, max_new_tokens: int = 128,
                   source_prefix: str = "", bleu_tokenize: str = "13a", show_progress: bool = False) -> dict:
    """One row of the comparison table for a loaded model (see the module docstring for the definitions).

    Args:
        model: a ``PreTrainedModel`` (used on its device) or a :class:`~hf_seqkd.export.CTranslate2Translator`
            (e.g. from :func:`load_for_evaluation`).
        tokenizer: its tokenizer.
        sources, references: the test set.
        name: the row's ``model`` label.
        path: the saved folder, for the size on disk (``None``: no size).
        num_beams: beam size of the ``*_beam`` columns (1 or less: no beam-search runs).
        batch_size: sentences per call in the batched runs.
        batch1_samples: time batch size 1 on the first this many sentences (0: no batch-1 runs).
        batch1_beam: time beam search at batch size 1 too (the slowest run; ``False``: greedy only).
        max_new_tokens: generation length limit.
        source_prefix: T5-style task prefix.
        show_progress: progress bars.

    Returns:
        A dict: ``model``, ``kind``, ``path``, ``params``, ``nonzero_params``, ``sparsity``, ``size_bytes``,
        ``size_mb``, ``folder_bytes``, ``bleu_greedy``, ``chrf_greedy``, ``bleu_beam``, ``chrf_beam``,
        ``sent_per_s_{greedy,beam}_{batched,batch1}``, ``tok_per_s_{greedy,beam}_{batched,batch1}``,
        ``num_beams``, ``batch_size``, ``batch1_sentences``, ``test_sentences``, ``threads``, ``device``
        (beam and batch-1 entries are ``None`` when those runs are switched off).
    """
    from .export import CTranslate2Translator

    sources, references = list(sources), list(references)
    if len(sources) != len(references):
        raise ValueError(f"{name}: {len(sources)} sources but {len(references)} references")
    if not sources:
        raise ValueError(f"{name}: the test set is empty")
    is_ct2 = isinstance(model, CTranslate2Translator)
    params, nonzero = _parameter_counts(model)
    size = model_disk_size(path) if path is not None else {"size_bytes": None, "folder_bytes": None}
    batch1 = min(max(int(batch1_samples), 0), len(sources))
    decoders = [("greedy", 1)] + ([("beam", int(num_beams))] if num_beams and num_beams > 1 else [])
    row = {
        "model": name, "kind": "ctranslate2" if is_ct2 else "transformers",
        "path": None if path is None else str(path),
        "params": params, "nonzero_params": nonzero,
        "sparsity": 1.0 - nonzero / params if params else None,
        "size_bytes": size["size_bytes"],
        "size_mb": None if size["size_bytes"] is None else size["size_bytes"] / 2**20,
        "folder_bytes": size["folder_bytes"],
        "bleu_greedy": None, "chrf_greedy": None, "bleu_beam": None, "chrf_beam": None,
        "num_beams": decoders[-1][1], "batch_size": int(batch_size), "batch1_sentences": batch1,
        "test_sentences": len(sources),
        "threads": (model.intra_threads or None) if is_ct2 else torch.get_num_threads(),
        "device": model.translator.device if is_ct2 else str(next(model.parameters()).device),
    }
    common = dict(max_new_tokens=max_new_tokens, source_prefix=source_prefix, bleu_tokenize=bleu_tokenize)
    # warm-up (untimed): first calls allocate caches, pick kernels, ...
    timed_decode(model, tokenizer, sources[:2], references[:2], num_beams=1, batch_size=2, **common)
    runs = [(f"{dec}_batched", beams, batch_size, len(sources)) for dec, beams in decoders]
    runs += [(f"{dec}_batch1", beams, 1, batch1) for dec, beams in decoders
             if batch1 > 0 and (dec == "greedy" or batch1_beam)]
    stages = tqdm(runs, desc=f"{name}", unit="run", disable=not show_progress, leave=False)
    for key, beams, bsz, n in stages:
        stages.set_postfix_str(key)
        out = timed_decode(model, tokenizer, sources[:n], references[:n], num_beams=beams, batch_size=bsz,
                           show_progress=show_progress, **common)
        seconds = max(out["seconds"], 1e-9)
        row[f"sent_per_s_{key}"] = n / seconds
        row[f"tok_per_s_{key}"] = out["target_tokens"] / seconds
        if key.endswith("_batched"):
            dec = key.split("_")[0]
            row[f"bleu_{dec}"], row[f"chrf_{dec}"] = out["bleu"], out["chrf"]
            row["bleu_signature"], row["chrf_signature"] = out["bleu_signature"], out["chrf_signature"]
    for key in ("greedy_batched", "beam_batched", "greedy_batch1", "beam_batch1"):
        row.setdefault(f"sent_per_s_{key}", None)
        row.setdefault(f"tok_per_s_{key}", None)
    return row


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
                   **evaluate_kwargs) -> list[dict]:
    """:func:`evaluate_model` rows for several saved models (one at a time in memory), speed-up included.

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
        **evaluate_kwargs: :func:`evaluate_model` options (``num_beams``, ``batch_size``, ``batch1_samples``,
            ``max_new_tokens``, ``source_prefix``).
    """
    from transformers import AutoTokenizer

    items = list(models.items()) if isinstance(models, Mapping) else [tuple(m) for m in models]
    if not items:
        raise ValueError("compare_models: no models given")
    if batch1_beam not in ("all", "first", "none"):
        raise ValueError(f"compare_models: batch1_beam={batch1_beam!r}; use 'all', 'first' or 'none'")
    if threads:
        torch.set_num_threads(int(threads))
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    candidates = [p for _, p in items if not is_ctranslate2_dir(p) and _local_folder(p) is not None
                  and _has_tokenizer(_local_folder(p))]
    rows = []
    for index, (name, path) in enumerate(tqdm(items, desc="models", unit="model", disable=not show_progress)):
        folder, tok = _local_folder(path), None
        if folder is None or not _has_tokenizer(folder):  # a folder's own tokenizer comes first
            tok = tokenizer
            if tok is None and is_ctranslate2_dir(path):
                tok = _matching_tokenizer(path, candidates, name)
        model, tok, _ = load_for_evaluation(path, tok, device=device, compute_type=compute_type,
                                            threads=torch.get_num_threads(), name=name)
        rows.append(evaluate_model(model, tok, sources, references, name=name, path=path,
                                   batch1_beam=batch1_beam == "all" or (batch1_beam == "first" and index == 0),
                                   show_progress=show_progress, **evaluate_kwargs))
        del model
    return add_speedup(rows)


def _matching_tokenizer(ct2_dir, candidates: Sequence[str], name: str):
    from transformers import AutoTokenizer

    for candidate in candidates:
        tok = AutoTokenizer.from_pretrained(str(_local_folder(candidate)))
        try:
            check_tokenizer(ct2_dir, tok, name)
        except ValueError:
            continue
        return tok
    raise ValueError(f"{name}: the CTranslate2 folder {ct2_dir} has no tokenizer files and no Transformers model "
                     "given has a matching vocabulary; pass the tokenizer of the model it was converted from "
                     "(--tokenizer)")


def add_speedup(rows: list[dict], key: str = "sent_per_s_greedy_batched", out_key: str = "speedup") -> list[dict]:
    """Set ``row[out_key] = row[key] / rows[0][key]`` (speed-up over the first model) in every row.

    Also ``speedup_batch1`` from ``sent_per_s_greedy_batch1`` when the default ``key`` is used. Rows without
    the speed (or a first row without it) get ``None``. Returns ``rows``.
    """
    pairs = [(key, out_key)] + ([("sent_per_s_greedy_batch1", "speedup_batch1")]
                                if key == "sent_per_s_greedy_batched" else [])
    for speed_key, result_key in pairs:
        base = rows[0].get(speed_key) if rows else None
        for row in rows:
            value = row.get(speed_key)
            row[result_key] = value / base if isinstance(value, (int, float)) and base else None
    return rows


# -------------------------------------------------------------------------------------------------- report
_TABLE_COLUMNS = (  # key, header
    ("model", "Model"), ("kind", "Back-end"), ("params", "Parameters"), ("nonzero_params", "Non-zero"),
    ("size_mb", "Size (MB)"), ("bleu_greedy", "BLEU greedy"), ("bleu_beam", "BLEU beam"),
    ("chrf_greedy", "chrF greedy"), ("chrf_beam", "chrF beam"),
    ("sent_per_s_greedy_batched", "Sent/s greedy"), ("tok_per_s_greedy_batched", "Tok/s greedy"),
    ("sent_per_s_beam_batched", "Sent/s beam"), ("tok_per_s_beam_batched", "Tok/s beam"),
    ("sent_per_s_greedy_batch1", "Sent/s greedy, batch 1"), ("tok_per_s_greedy_batch1", "Tok/s greedy, batch 1"),
    ("sent_per_s_beam_batch1", "Sent/s beam, batch 1"), ("tok_per_s_beam_batch1", "Tok/s beam, batch 1"),
    ("speedup", "Speed-up"), ("speedup_batch1", "Speed-up, batch 1"),
)


def report_table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]] | None = None) -> str:
    """The Markdown table of :func:`write_report` (columns that are empty in every row left out).

    Args:
        rows: the rows.
        columns: ``(key, header)`` pairs (default: those of :func:`evaluate_model` rows and the speed-up).
    """
    from .cli import markdown_table

    columns = [(k, h) for k, h in (columns or _TABLE_COLUMNS) if any(r.get(k) is not None for r in rows)]
    display = [{h: row.get(k) for k, h in columns} for row in rows]
    return markdown_table(display, [h for _, h in columns])


def _settings_line(rows: Sequence[Mapping]) -> str:
    first = rows[0]
    beams = first.get("num_beams")
    parts = [f"{first.get('test_sentences')} test sentences",
             f"greedy and beam search ({beams} beams)" if beams and beams > 1 else "greedy search",
             f"batched: {first.get('batch_size')} sentences per batch"]
    if first.get("batch1_sentences"):
        parts.append(f"batch 1: timed on the first {first.get('batch1_sentences')} sentences")
    parts.append(f"device {first.get('device')}, threads: {first.get('threads')}")
    return "; ".join(parts) + ". Speed-up: sentences/s (greedy) over the first model's."


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
                       x: str = "sent_per_s_greedy_batched", y: str = "bleu_greedy", log_x: bool = True):
    """BLEU against decoding speed, one labelled point per model (rows without both values are skipped).

    Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no global backend change).

    Returns:
        ``(figure, annotations)``: the figure and the list of ``matplotlib.text.Annotation`` labels (one per
        plotted model, in row order). Saved as PNG to ``path`` when given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [(str(r["model"]), float(r[x]), float(r[y])) for r in rows
              if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))
              and math.isfinite(r[x]) and math.isfinite(r[y]) and r[x] > 0]
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
        rows: rows of :func:`evaluate_model` / :func:`compare_models` (any JSON-serialisable dicts with
            ``model``; the table shows the known columns, the JSON everything).
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
        json.dump([dict(r) for r in rows], f, indent=2)
    text = [f"# {title}", "", _settings_line(rows), "", report_table(rows), ""]
    if notes:
        text += [notes.strip(), ""]
    text += [f"![BLEU against decoding speed]({paths['plot'].name})", ""]
    paths["markdown"].write_text("\n".join(text), encoding="utf-8")
    return paths
