"""Evaluation: translate a test set, score it with sacrebleu (offline), time it; the one result type.

* :func:`resolve_bleu_tokenize` / :func:`corpus_scores`: BLEU with the tokenizer the target language needs, chrF, and
  their sacrebleu signatures (``evaluate.load("sacrebleu")`` would fetch its script from the Hub).
* :func:`evaluate_translation`: one decoding of a test set by a Transformers model (BLEU, chrF, speed).
* :class:`EvaluationResult` / :func:`evaluate_model`: the result of every comparison (greedy and beam BLEU/chrF,
  sentences/s and tokens/s batched and at batch size 1, parameters, size), for Transformers and CTranslate2 models
  alike; tables, JSON, plots and model cards read it. :func:`add_speedup`: the one speed-up computation.

Definitions: BLEU/chrF are corpus scores of the batched runs over the whole test set; speed is the wall-clock time
of translating (tokenization, decoding, detokenization; loading not), after an untimed warm-up; batch-1 runs
translate the first ``batch1_samples`` sentences one at a time; tokens/s counts the hypotheses' target tokens
re-tokenized with the model's tokenizer (special tokens left out: one definition for both back-ends); parameters
are distinct tensors (tied ones once) and their non-zero entries (CTranslate2: the values stored in ``model.bin``,
quantization scales left out); ``size_bytes`` is the weight files, ``folder_bytes`` every file of the folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from huggingface_hub import snapshot_download
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.bleu import _TOKENIZERS, _get_tokenizer
from sacrebleu.utils import SACREBLEU_DIR
from tqdm.auto import tqdm

from .export import CTranslate2Translator, translate_ctranslate2
from .generation import translate
from .students import count_parameters

__all__ = ["corpus_scores", "resolve_bleu_tokenize", "evaluate_translation", "make_compute_metrics",
           "EvaluationResult", "evaluate_model", "evaluate_models", "timed_decode", "add_speedup", "model_disk_size",
           "ctranslate2_parameter_counts", "beam_output_probability", "describe_machine"]

# Target languages written without spaces between words, and sacrebleu's tokenizer for them. Keys are the first
# part of a language code ("zh" of "zh_CN", "zho" of NLLB's "zho_Hans"), two- and three-letter ISO 639 codes.
_NO_SPACE_TOKENIZERS = {
    "zh": "zh", "zho": "zh", "cmn": "zh", "yue": "zh", "wuu": "zh",
    "ja": "ja-mecab", "jpn": "ja-mecab",
    "ko": "ko-mecab", "kor": "ko-mecab",
    # Thai, Lao, Khmer, Burmese, Tibetan, Dzongkha: flores200's SentencePiece model when it is at hand, else characters
    **{code: "flores200" for code in ("th", "tha", "lo", "lao", "km", "khm", "my", "mya", "bo", "bod", "dz", "dzo")},
}
_MECAB_EXTRAS = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]"}


def _mecab_available(name: str) -> bool:
    try:

        _get_tokenizer(name)()
        return True
    except Exception:  # noqa: BLE001 - missing mecab / dictionary: any import or runtime error
        return False


def _flores_available() -> bool:
    """flores200's SentencePiece model is in sacrebleu's local cache (it is downloaded on first use otherwise)."""


    return os.path.isfile(os.path.join(SACREBLEU_DIR, "models", "flores200sacrebleuspm"))


def resolve_bleu_tokenize(language: str | None = None, tokenize: str | None = None) -> str:
    """The sacrebleu tokenizer for BLEU: ``tokenize`` when given, otherwise chosen from the target ``language``.

    Languages written without spaces need their own tokenizer, or BLEU counts whole sentences as words (three
    Chinese sentence pairs: 0.00 with ``13a``, 49.07 with ``zh``). sacrebleu's choices: ``zh`` for Chinese,
    ``ja-mecab`` / ``ko-mecab`` for Japanese / Korean (``pip install "sacrebleu[ja]"`` / ``"sacrebleu[ko]"``; without
    them ``char``, with a warning), ``flores200`` for Thai, Lao, Khmer, Burmese, Tibetan and Dzongkha when its model
    is in sacrebleu's cache (``char`` otherwise: the machines here cannot download it), ``13a`` (sacrebleu's default)
    for every other language and when the language is unknown.

    Args:
        language: a language code as the data, a tokenizer or a model card names it (``"zh"``, ``"zh_CN"``,
            ``"zho_Hans"``, ``"ja_XX"``, ``"de"``); ``None``: unknown.
        tokenize: an explicit sacrebleu tokenizer name (``"13a"``, ``"intl"``, ``"zh"``, ``"char"``, ...).

    Raises:
        ValueError: ``tokenize`` is not one of sacrebleu's tokenizers.
    """


    if tokenize is not None:
        if tokenize not in _TOKENIZERS:
            raise ValueError(f"bleu_tokenize={tokenize!r} is not a sacrebleu tokenizer; choose one of "
                             f"{', '.join(_TOKENIZERS)} (13a is sacrebleu's default)")
        return tokenize
    key = str(language or "").replace("-", "_").split("_")[0].lower()
    choice = _NO_SPACE_TOKENIZERS.get(key, "13a")
    if choice in _MECAB_EXTRAS and not _mecab_available(choice):
        warnings.warn(f"BLEU for {language!r} wants sacrebleu's {choice} tokenizer, which needs "
                      f'pip install "{_MECAB_EXTRAS[choice]}"; scoring on characters (char) instead', stacklevel=2)
        return "char"
    if choice == "flores200" and not _flores_available():
        return "char"
    return choice


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = "13a") -> dict:
    """Corpus BLEU (sacrebleu, tokenizer ``tokenize``) and chrF (character order 6, beta 2) with their signatures.

    Returns ``{"bleu", "chrf", "bleu_signature", "chrf_signature"}``; the signatures (e.g.
    ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``) say how the numbers were computed.
    """

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    refs = [list(references)]
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    return {"bleu": bleu.corpus_score(list(hypotheses), refs).score,
            "chrf": chrf.corpus_score(list(hypotheses), refs).score,
            "bleu_signature": bleu.get_signature().format(), "chrf_signature": chrf.get_signature().format()}


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def evaluate_translation(model, tokenizer, sources: Sequence[str], references: Sequence[str], *, num_beams: int = 1,
                         batch_size: int = 32, max_new_tokens: int = 128, source_prefix: str = "",
                         bleu_tokenize: str = "13a", show_progress: bool = False, return_hypotheses: bool = False,
                         **generate_kwargs) -> dict:
    """BLEU, chrF, speed and size of ``model`` on a test set.

    Args:
        model: a seq2seq model (any device; it is used where it is).
        tokenizer: its tokenizer.
        sources, references: the test set (detokenized text).
        num_beams: 1 = greedy, else beam search.
        batch_size: sentences per ``generate`` call (length-sorted batches).
        max_new_tokens: generation length limit.
        source_prefix: T5-style task prefix.
        bleu_tokenize: sacrebleu's tokenizer for BLEU (:func:`resolve_bleu_tokenize`).
        show_progress: show a progress bar.
        return_hypotheses: include the translations under ``"hypotheses"``.

    Returns a dict with ``bleu``, ``chrf``, ``bleu_signature``, ``chrf_signature``, ``sentences_per_second``,
    ``tokens_per_second`` (generated), ``seconds``, ``num_parameters``, ``num_nonzero_parameters``, ``num_beams``,
    ``batch_size``.
    """
    if len(sources) != len(references):
        raise ValueError(f"{len(sources)} sources but {len(references)} references")
    if len(sources) == 0:
        raise ValueError("evaluate_translation needs at least one sentence")
    if _device_of(model).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    hypotheses, generated = translate(model, tokenizer, sources, num_beams=num_beams, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, source_prefix=source_prefix,
                                      show_progress=show_progress, **generate_kwargs)
    if _device_of(model).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        **corpus_scores(hypotheses, references, tokenize=bleu_tokenize),
        "sentences_per_second": len(sources) / seconds,
        "tokens_per_second": generated / seconds,
        "seconds": seconds,
        "num_parameters": count_parameters(model),
        "num_nonzero_parameters": count_parameters(model, nonzero=True),
        "num_beams": num_beams,
        "batch_size": batch_size,
    }
    if return_hypotheses:
        result["hypotheses"] = hypotheses
    return result


@torch.no_grad()
def beam_output_probability(model, tokenizer, sources: Sequence[str], *, num_beams: int = 5, batch_size: int = 32,
                            max_new_tokens: int = 128, source_prefix: str = "", show_progress: bool = False,
                            **generate_kwargs) -> list[float]:
    """The probability a model gives its own beam-search output, per sentence: p(y_hat | x), y_hat = its beam search's
    translation of x (Kim & Rush 2016, Table 1, column p(t = y_hat); Sec. 5.1: Seq-KD students put far more mass on
    it than baselines, 16.9% against 0.9% on WMT14 En-De, which is why they decode greedily almost as well).

    The product of the model's (unprocessed) next-token probabilities over y_hat's tokens, its end token included;
    a token forced by ``forced_bos_token_id`` is left out (generation forces it, the model does not choose it).

    Args:
        model: a Transformers seq2seq model, used on its device, in eval mode for the call.
        tokenizer: its tokenizer (target language codes already set).
        sources: source sentences.
        num_beams: the beam size of y_hat (1: greedy decoding's output).
        batch_size: sentences per ``generate`` call; max_new_tokens: its length limit.
        source_prefix: T5-style task prefix; show_progress: a progress bar.
        generate_kwargs: more ``generate`` options (e.g. ``forced_bos_token_id``).

    Returns:
        One probability in [0, 1] per source, in order (average them for the paper's number).
    """
    was_training = model.training
    model.eval()
    device, config = _device_of(model), model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=device)
    forced = generate_kwargs.get("forced_bos_token_id", config.forced_bos_token_id) is not None
    out: list[float] = []
    try:
        for start in tqdm(range(0, len(sources), batch_size), disable=not show_progress, desc="p(beam output)"):
            batch = [source_prefix + s for s in sources[start:start + batch_size]]
            encoded = tokenizer(batch, return_tensors="pt", padding=True, truncation=True).to(device)
            generated = model.generate(**encoded, num_beams=num_beams, do_sample=False, num_return_sequences=1,
                                       max_new_tokens=max_new_tokens, **generate_kwargs)
            inputs, targets = generated[:, :-1], generated[:, 1:]  # generated[:, 0] is the decoder start token
            is_eos = torch.isin(targets, eos)
            counted = (is_eos.cumsum(1) - is_eos.long()) == 0  # up to and including the first end token
            if forced:
                counted[:, 0] = False
            logits = model(**encoded, decoder_input_ids=inputs).logits.float()
            log_probs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            out += torch.where(counted, log_probs, 0.0).sum(1).exp().tolist()
    finally:
        model.train(was_training)
    return out


def make_compute_metrics(tokenizer, references: Sequence[str] | None = None, *, tokenize: str = "13a"):
    """A ``compute_metrics`` for ``Seq2SeqTrainer(predict_with_generate=True)``: BLEU, chrF and mean output length.

    Args:
        tokenizer: decodes the predictions.
        references: the raw reference texts of the evaluation set, in its order (what the final evaluation scores
            against). ``None`` rebuilds them from the label ids, which loses what the tokenizer cannot represent and
            what truncation cut (a warning says so).
        tokenize: the sacrebleu tokenizer of BLEU (:func:`resolve_bleu_tokenize`).

    Raises (when called):
        ValueError: the number of predictions is not the number of references.
    """

    if references is None:
        logging.getLogger(__name__).warning(
            "make_compute_metrics without references: validation BLEU is computed against references decoded from "
            "the label ids (unknown characters and truncated words are lost); pass the raw references")
    references = None if references is None else [str(r).strip() for r in references]

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        pad = tokenizer.pad_token_id
        predictions = np.where(predictions < 0, pad, predictions)
        hyps = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        refs = references
        if refs is None:
            labels = np.where(labels < 0, pad, labels)
            refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        if len(refs) != len(hyps):
            raise ValueError(f"compute_metrics: {len(refs)} references but {len(hyps)} predictions; the references "
                             "must be those of the evaluation set, in its order")
        scores = corpus_scores(hyps, refs, tokenize=tokenize)
        scores = {k: v for k, v in scores.items() if not k.endswith("_signature")}  # logged metrics are numbers
        scores["gen_len"] = float(np.mean([np.count_nonzero(p != pad) for p in predictions]))
        return scores

    return compute_metrics


# ------------------------------------------------------------------------------------------ the result type
@dataclass
class EvaluationResult:
    """One model evaluated on one test set: the result type of every comparison hf_seqkd reports.

    ``None`` marks what was not measured (no beam-search run, no batch-1 timing, a model not on disk). Speed is in
    sentences (``sent_per_s_*``) and target tokens (``tok_per_s_*``) per second, ``*_batched`` with ``batch_size``
    sentences per call, ``*_batch1`` one sentence at a time. The speed-ups (:func:`add_speedup`) are over a
    reference model (the first of a comparison): ``speedup`` greedy over its greedy, batched; ``speedup_batch1`` the
    same at batch size 1; ``speedup_over_beam`` greedy over its beam search, batched (Kim & Rush's comparison of a
    greedy student with its teacher's beam search). ``extra`` holds what a recipe adds (e.g. the target sparsity,
    the BLEU before retraining); :meth:`to_dict` writes it at the top level. ``hypotheses_greedy`` /
    ``hypotheses_beam`` are the batched runs' translations of the test set, in its order. The confidence intervals
    (``*_ci``: the half-width of the 95% interval, ``score ± ci``) and the p-values of the difference from
    ``significance_baseline`` (``*_p_value``; ``None`` for the baseline) come from sacrebleu's paired test
    (:func:`hf_seqkd.significance.add_significance`; ``significance_test`` names it, with its signature).
    """

    model: str
    role: str | None = None
    kind: str = "transformers"
    path: str | None = None
    params: int | None = None
    nonzero_params: int | None = None
    size_bytes: int | None = None
    folder_bytes: int | None = None
    bleu_greedy: float | None = None
    chrf_greedy: float | None = None
    bleu_beam: float | None = None
    chrf_beam: float | None = None
    bleu_signature: str | None = None
    chrf_signature: str | None = None
    sent_per_s_greedy_batched: float | None = None
    tok_per_s_greedy_batched: float | None = None
    sent_per_s_beam_batched: float | None = None
    tok_per_s_beam_batched: float | None = None
    sent_per_s_greedy_batch1: float | None = None
    tok_per_s_greedy_batch1: float | None = None
    sent_per_s_beam_batch1: float | None = None
    tok_per_s_beam_batch1: float | None = None
    bleu_greedy_ci: float | None = None
    chrf_greedy_ci: float | None = None
    bleu_beam_ci: float | None = None
    chrf_beam_ci: float | None = None
    bleu_greedy_p_value: float | None = None
    chrf_greedy_p_value: float | None = None
    bleu_beam_p_value: float | None = None
    chrf_beam_p_value: float | None = None
    significance_baseline: str | None = None
    significance_test: str | None = None
    speedup: float | None = None
    speedup_batch1: float | None = None
    speedup_over_beam: float | None = None
    num_beams: int | None = None
    batch_size: int | None = None
    batch1_sentences: int = 0
    test_sentences: int = 0
    threads: int | None = None
    device: str | None = None
    dataset: str | None = None
    split: str | None = None
    # left out of repr(): printing a result would print every translation of the test set
    hypotheses_greedy: list[str] | None = field(default=None, repr=False)
    hypotheses_beam: list[str] | None = field(default=None, repr=False)
    extra: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float | None:
        """The fraction of parameters that are zero."""
        return 1.0 - self.nonzero_params / self.params if self.params and self.nonzero_params is not None else None

    @property
    def size_mb(self) -> float | None:
        return None if self.size_bytes is None else self.size_bytes / 2**20

    @property
    def chrf(self) -> float | None:
        """chrF of greedy decoding (of beam search when there is no greedy run)."""
        return self.chrf_greedy if self.chrf_greedy is not None else self.chrf_beam

    def get(self, key: str, default=None):
        """A field, a property or an ``extra`` entry by name (what tables read)."""
        if key in self.extra:
            return self.extra[key]
        value = getattr(self, key, default) if not key.startswith("_") else default
        return default if callable(value) else value

    def __getitem__(self, key: str):
        """``result["bleu_greedy"]``: the same as :meth:`get`, but an unknown name is a ``KeyError``."""
        if key not in self.extra and not hasattr(self, key):
            raise KeyError(key)
        return self.get(key)

    def to_dict(self) -> dict:
        """Every field, ``sparsity`` and ``size_mb``, and ``extra`` at the top level (JSON-ready)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update({"sparsity": self.sparsity, "size_mb": self.size_mb, "chrf": self.chrf})
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "EvaluationResult":
        """The inverse of :meth:`to_dict`: unknown keys go to ``extra``, derived ones are dropped."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in ("sparsity", "size_mb", "chrf")}
        return cls(**known, extra={**data.get("extra", {}), **extra} if isinstance(data.get("extra"), dict)
                   else extra)


def evaluate_models(models: Sequence[tuple[str, str | None, object]], tokenizer, sources: Sequence[str],
                    references: Sequence[str], **evaluate_kwargs) -> list[EvaluationResult]:
    """:func:`evaluate_model` of several loaded models, ``(name, role, model)`` each, with the speed-ups over the
    first (:func:`add_speedup`)."""
    return list(add_speedup([evaluate_model(model, tokenizer, sources, references, name=name, role=role,
                                            **evaluate_kwargs) for name, role, model in models]))


def add_speedup(results: Sequence[EvaluationResult], reference: int = 0) -> Sequence[EvaluationResult]:
    """Fill ``speedup``, ``speedup_batch1`` and ``speedup_over_beam`` of every result over ``results[reference]``
    (``None`` where a speed is missing). Returns ``results``."""
    if not results:
        return results
    base = results[reference]
    pairs = (("speedup", "sent_per_s_greedy_batched", base.sent_per_s_greedy_batched),
             ("speedup_batch1", "sent_per_s_greedy_batch1", base.sent_per_s_greedy_batch1),
             ("speedup_over_beam", "sent_per_s_greedy_batched", base.sent_per_s_beam_batched))
    for result in results:
        for out, key, reference_speed in pairs:
            value = getattr(result, key)
            setattr(result, out, value / reference_speed if value is not None and reference_speed else None)
    return results


# ------------------------------------------------------------------------------------------ size, parameters
_HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
# CTranslate2's model.bin data types (include/ctranslate2/types.h): id -> (bytes, unsigned view, value mask)
_CT2_TYPES = {0: (4, "<u4", 0x7FFFFFFF), 1: (1, "<u1", 0xFF), 2: (2, "<u2", 0xFFFF), 3: (4, "<u4", 0xFFFFFFFF),
              4: (2, "<u2", 0x7FFF), 5: (2, "<u2", 0x7FFF)}  # float32, int8, int16, int32, float16, bfloat16


def local_folder(path: str | os.PathLike) -> Path | None:
    """The folder of a saved model or of a cached Hub model; ``None`` if there is none."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    try:

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or not a Hub id): no size
        return None


def model_disk_size(path: str | os.PathLike) -> dict[str, int | None]:
    """``{"size_bytes": weight files, "folder_bytes": all files}`` of a saved model folder (Trainer checkpoints and
    other sub-folders left out); ``None`` values for a model that is not on disk."""
    folder = local_folder(path)
    if folder is None:
        return {"size_bytes": None, "folder_bytes": None}
    files = [f for f in folder.iterdir() if f.is_file()]
    if (folder / "model.bin").is_file():  # CTranslate2
        weights = [folder / "model.bin"]
    else:
        weights = next(([f for f in files if f.match(p)] for p in _HF_WEIGHTS if any(f.match(p) for f in files)), [])
    return {"size_bytes": sum(f.stat().st_size for f in weights), "folder_bytes": sum(f.stat().st_size for f in files)}


def ctranslate2_parameter_counts(ct2_dir: str | os.PathLike) -> tuple[int, int] | tuple[None, None]:
    """``(total, nonzero)`` values stored in a CTranslate2 ``model.bin``.

    Reads the binary layout written by CTranslate2 4.x (``ModelSpec._serialize``, binary version 5 or 6): every
    variable once, aliases (tied or identical tensors) not again; scalars and quantization scales (``*_scale``) are
    left out. int8 quantization rounds the smallest weights to zero, so ``nonzero`` can be below the source model's.
    Returns ``(None, None)`` for another version.
    """
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
            _, view, mask = _CT2_TYPES[type_id]
            values = np.frombuffer(data, dtype=view)
            total += values.size
            nonzero += int(np.count_nonzero(values & np.array(mask, dtype=view)))
    return total, nonzero


def _is_ctranslate2(model) -> bool:

    return isinstance(model, CTranslate2Translator)


def _parameter_counts(model) -> tuple[int | None, int | None]:
    if _is_ctranslate2(model):
        return ctranslate2_parameter_counts(model.ct2_dir)
    return count_parameters(model), count_parameters(model, nonzero=True)


# ---------------------------------------------------------------------------------------------- the evaluator
def describe_machine(threads: int | None = None) -> str:
    """The machine a speed is measured on, for a results record: host and architecture, the CPU's model and the
    vector instructions PyTorch uses on it (``torch.backends.cpu.get_cpu_capability()``), the CPU count, the GPU,
    the torch version and its threads, e.g. ``"vm x86_64, AMD EPYC (AVX512), 2 CPUs, no GPU, torch 2.13.0+cpu
    (1 threads)"``. Speed-ups between models differ from one CPU model to another (``bench/RESULTS.md``), not only
    their sentences/s. ``threads``: the threads the measured work used where not this process's
    (default: ``torch.get_num_threads()``)."""
    import platform

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:  # Linux; platform.processor() there says only "x86_64" or nothing
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()} {platform.machine()}, {cpu or 'CPU'} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{os.cpu_count()} CPUs, {gpu}, torch {torch.__version__} ({threads or torch.get_num_threads()} threads)")


def timed_decode(model, tokenizer, sources, references, *, num_beams: int = 1, batch_size: int = 32,
                 max_new_tokens: int = 128, source_prefix: str = "", bleu_tokenize: str = "13a",
                 show_progress: bool = False, **generate_kwargs) -> dict:
    """One timed translation of ``sources`` (Transformers model or :class:`~hf_seqkd.export.CTranslate2Translator`):
    a dict with ``bleu``, ``chrf`` and their signatures (against ``references``), ``seconds`` (translation wall
    time), ``hypotheses``, ``target_lengths`` (each hypothesis's target tokens, special tokens left out) and
    ``target_tokens`` (their sum). ``generate_kwargs`` go to ``generate`` (e.g. ``forced_bos_token_id``)."""

    if _is_ctranslate2(model):
        bos = generate_kwargs.get("forced_bos_token_id")
        out = translate_ctranslate2(model, tokenizer, [source_prefix + s for s in sources], num_beams=num_beams,
                                    batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    target_token=None if bos is None else tokenizer.convert_ids_to_tokens(bos))
        hypotheses = [h.strip() for h in out]
        out = {**corpus_scores(hypotheses, references, tokenize=bleu_tokenize), "seconds": out.seconds,
               "hypotheses": hypotheses}
    else:
        out = evaluate_translation(model, tokenizer, sources, references, num_beams=num_beams,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, source_prefix=source_prefix,
                                   bleu_tokenize=bleu_tokenize, show_progress=show_progress, return_hypotheses=True,
                                   **generate_kwargs)
    lengths = _target_lengths(tokenizer, out["hypotheses"])
    return {**{k: out[k] for k in ("bleu", "chrf", "bleu_signature", "chrf_signature", "seconds", "hypotheses")},
            "target_lengths": lengths, "target_tokens": sum(lengths)}


def _target_lengths(tokenizer, hypotheses: Sequence[str]) -> list[int]:
    if not hypotheses:
        return []
    return [len(ids) for ids in tokenizer(text_target=list(hypotheses), add_special_tokens=False)["input_ids"]]


def evaluate_model(model, tokenizer, sources: Sequence[str], references: Sequence[str], *, name: str = "model",
                   role: str | None = None, path: str | os.PathLike | None = None, num_beams: int = 5,
                   batch_size: int = 32, batch1_samples: int = 200, batch1_beam: bool = True,
                   max_new_tokens: int = 128,
                   source_prefix: str = "", bleu_tokenize: str = "13a", show_progress: bool = False,
                   generate_kwargs: dict | None = None) -> EvaluationResult:
    """Evaluate a loaded model on a test set (definitions in the module docstring).

    Args:
        model: a ``PreTrainedModel`` (used on its device) or a :class:`~hf_seqkd.export.CTranslate2Translator`.
        tokenizer: its tokenizer.
        sources, references: the test set.
        name: the result's ``model`` label; role: e.g. ``"teacher"`` / ``"student"``.
        path: the saved folder, for the size on disk (``None``: no size).
        num_beams: beam size of the beam-search columns (1 or less: no beam-search runs).
        batch_size: sentences per call in the batched runs.
        batch1_samples: time batch size 1 on the first this many sentences (0: no batch-1 runs).
        batch1_beam: time beam search at batch size 1 too (the slowest run; ``False``: greedy only).
        max_new_tokens: generation length limit (capped at the model's position table).
        source_prefix: T5-style task prefix.
        bleu_tokenize: sacrebleu's tokenizer for BLEU (:func:`resolve_bleu_tokenize`).
        show_progress: progress bars.
        generate_kwargs: further ``generate`` arguments (``forced_bos_token_id``: for a CTranslate2 model, the target
            prefix).

    Raises:
        ValueError: different numbers of sources and references, or an empty test set.
    """

    sources, references = list(sources), list(references)
    if len(sources) != len(references):
        raise ValueError(f"{name}: {len(sources)} sources but {len(references)} references")
    if not sources:
        raise ValueError(f"{name}: the test set is empty")
    is_ct2 = _is_ctranslate2(model)
    params, nonzero = _parameter_counts(model)
    size = model_disk_size(path) if path is not None else {"size_bytes": None, "folder_bytes": None}
    batch1 = min(max(int(batch1_samples), 0), len(sources))
    decoders = [("greedy", 1)] + ([("beam", int(num_beams))] if num_beams and num_beams > 1 else [])
    result = EvaluationResult(
        model=name, role=role, kind="ctranslate2" if is_ct2 else "transformers",
        path=None if path is None else str(path), params=params, nonzero_params=nonzero, **size,
        num_beams=decoders[-1][1], batch_size=int(batch_size), batch1_sentences=batch1, test_sentences=len(sources),
        threads=(model.intra_threads or None) if is_ct2 else torch.get_num_threads(),
        device=model.translator.device if is_ct2 else str(next(model.parameters()).device))
    common = dict(max_new_tokens=max_new_tokens, source_prefix=source_prefix, bleu_tokenize=bleu_tokenize,
                  **dict(generate_kwargs or {}))
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
        setattr(result, f"sent_per_s_{key}", n / seconds)
        setattr(result, f"tok_per_s_{key}", out["target_tokens"] / seconds)
        if key.endswith("_batched"):
            decoder = key.split("_")[0]
            setattr(result, f"bleu_{decoder}", out["bleu"])
            setattr(result, f"chrf_{decoder}", out["chrf"])
            setattr(result, f"hypotheses_{decoder}", out["hypotheses"])
            result.bleu_signature, result.chrf_signature = out["bleu_signature"], out["chrf_signature"]
    return result
