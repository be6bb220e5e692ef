"""Export a (distilled, possibly pruned) student to CTranslate2 for fast CPU/GPU inference, and translate with it.

* :func:`to_ctranslate2` converts a saved model folder with CTranslate2's own converter, with adapters where its
  loaders assume a Hub checkpoint: Marian students trained with Transformers keep their ``<pad>`` row (the
  decoder's start embedding; the stock loader drops it) and never generate it, vocabularies padded beyond the
  tokenizer get placeholder tokens that are never generated, BART/mBART/Pegasus get the ``normalize_before`` that
  Transformers 5 dropped. Why, with the measurements: ``docs/ctranslate2.md``.
* :class:`CTranslate2Translator` / :func:`translate_ctranslate2` translate text with the converted model and the
  model's Hugging Face tokenizer, and time it; :meth:`CTranslate2Translator.translate_kbest` is the Seq-KD corpus's
  CTranslate2 back-end.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
from transformers import AutoTokenizer

from .generation import SEQKD_LENGTH_PENALTY
from .languages import target_token_id

__all__ = ["to_ctranslate2", "translate_ctranslate2", "CTranslate2Translator", "TimedTranslations",
           "ctranslate2_decoding_options"]

_INSTALL_HINT = (
    'CTranslate2 export needs the optional dependency ctranslate2: pip install "hf_seqkd[ct2]" '
    '(or pip install ctranslate2)'
)
# The output bias that keeps a converted Marian model from generating <pad>. Large enough to make its
# probability exactly 0 after softmax in float32, small enough for float16 compute types (max 65504).
_PAD_LOGIT_BIAS = -1.0e4
_REGISTRY_LOCK = threading.Lock()


def _import_ctranslate2():
    try:
        import ctranslate2  # noqa: F401
        import ctranslate2.converters  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(_INSTALL_HINT) from err
    return ctranslate2


def _hf_marian_loader_class():
    """Build the adapter loader lazily (it subclasses a class of the optional ctranslate2 package)."""
    from ctranslate2.converters.transformers import BartLoader, MarianMTLoader

    class _HFMarianLoader(MarianMTLoader):
        """MarianMTLoader that computes what Transformers' MarianMTModel computes (see the module docstring)."""

        def get_model_spec(self, model):
            model.config.normalize_before = False
            model.config.normalize_embedding = False
            spec = BartLoader.get_model_spec(self, model)  # keeps the <pad> rows (no _remove_pad_weights)
            pad_id = model.config.pad_token_id
            if pad_id is not None:
                projection = spec.decoder.projection
                vocab = projection.weight.shape[0]
                bias = getattr(projection, "bias", None)
                if isinstance(bias, torch.Tensor) and bias.numel() == vocab:
                    bias = bias.detach().clone().float().reshape(vocab)
                else:
                    bias = torch.zeros(vocab, dtype=torch.float32)
                bias[pad_id] = _PAD_LOGIT_BIAS
                projection.bias = bias
            return spec

        def set_decoder(self, spec, decoder):
            BartLoader.set_decoder(self, spec, decoder)
            spec.start_from_zero_embedding = False  # Transformers starts from the real <pad> embedding

        def get_vocabulary(self, model, tokenizer):
            return BartLoader.get_vocabulary(self, model, tokenizer)  # <pad> kept: ids as in the tokenizer

        def set_config(self, config, model, tokenizer):
            config.eos_token = tokenizer.eos_token
            config.unk_token = tokenizer.unk_token
            start_id = model.config.decoder_start_token_id
            if start_id is None:
                start_id = model.config.pad_token_id
            config.decoder_start_token = tokenizer.convert_ids_to_tokens(start_id)

    return _HFMarianLoader


# Transformers 5 dropped ``normalize_before`` from these configs; CTranslate2's BartLoader still reads it.
# BART is post-norm, mBART and Pegasus pre-norm (their Transformers implementations).
_NORMALIZE_BEFORE = {"BartConfig": False, "MBartConfig": True, "PegasusConfig": True}


def _with_normalize_before(loader_class, pre_norm: bool):
    """``loader_class`` whose ``get_model_spec`` supplies a missing ``config.normalize_before`` and whose
    ``set_config`` supplies a missing ``bos_token`` (tokenizers from :func:`hf_seqkd.train_tokenizer` have none;
    CTranslate2 cannot load a config with ``"bos_token": null``)."""

    def get_model_spec(self, model):
        if not hasattr(model.config, "normalize_before"):
            model.config.normalize_before = pre_norm
        return loader_class.get_model_spec(self, model)

    def set_config(self, config, model, tokenizer):
        loader_class.set_config(self, config, model, tokenizer)
        if getattr(config, "bos_token", "") is None:
            bos_id = getattr(model.config, "bos_token_id", None)
            config.bos_token = (tokenizer.convert_ids_to_tokens(bos_id) if bos_id is not None
                                else tokenizer.eos_token)

    return type(f"_HFSeqKD{loader_class.__name__}", (loader_class,),
                {"get_model_spec": get_model_spec, "set_config": set_config})


_UNUSED_TOKEN = "<hf_seqkd_unused_{}>"


def _with_padded_vocabulary(loader_class):
    """``loader_class`` that accepts a model with more vocabulary rows than its tokenizer has tokens (a vocabulary
    padded to a multiple of 8, say): the missing entries become placeholder tokens (``<hf_seqkd_unused_N>``) whose
    output bias bans them, so the converted model never generates a token the tokenizer cannot decode, which is what
    the original model, trained without such targets, should do too."""

    def get_vocabulary(self, model, tokenizer):
        tokens = list(loader_class.get_vocabulary(self, model, tokenizer))
        rows = model.get_output_embeddings().weight.shape[0]
        self._unused_rows = list(range(len(tokens), rows))
        return tokens + [_UNUSED_TOKEN.format(i) for i in range(len(self._unused_rows))]

    def __call__(self, model, tokenizer):
        spec = loader_class.__call__(self, model, tokenizer)
        unused = getattr(self, "_unused_rows", [])
        if unused:
            projection = spec.decoder.projection
            vocab = projection.weight.shape[0]
            bias = getattr(projection, "bias", None)
            bias = bias.detach().clone().float().reshape(vocab) if isinstance(bias, torch.Tensor) and \
                bias.numel() == vocab else torch.zeros(vocab, dtype=torch.float32)
            bias[unused] = _PAD_LOGIT_BIAS
            projection.bias = bias
        return spec

    return type(f"_HFSeqKDPadded{loader_class.__name__}", (loader_class,),
                {"get_vocabulary": get_vocabulary, "__call__": __call__})


def to_ctranslate2(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    quantization: str | None = "int8",
    force: bool = False,
) -> str:
    """Convert a saved Transformers seq2seq model to a CTranslate2 model folder.

    Args:
        model_dir: a Hub id (downloaded with ``huggingface_hub.snapshot_download``) or a folder written by
            ``model.save_pretrained`` *and* ``tokenizer.save_pretrained`` (the
            converter reads the vocabulary with ``AutoTokenizer``). A pruned model must be folded first
            (:func:`hf_seqkd.pruning.fold_pruning`; the pruning module's ``save_pretrained`` handling does
            this) so that the folder holds plain weights.
        out_dir: the CTranslate2 output folder (``model.bin``, ``shared_vocabulary.json``, ``config.json``).
        quantization: the weight type: ``"int8"`` (default; CPU-friendly), ``"int8_float32"``,
            ``"int8_float16"``, ``"int8_bfloat16"``, ``"int16"``, ``"float16"``, ``"bfloat16"``, ``"float32"``
            or ``None`` (keep the checkpoint's type).
        force: overwrite ``out_dir`` if it exists (CTranslate2 refuses otherwise).

    Returns:
        ``out_dir`` as a string.

    Raises:
        ImportError: ctranslate2 is not installed (``pip install "hf_seqkd[ct2]"``).
        FileNotFoundError: ``model_dir`` has no ``config.json`` or no tokenizer files.
    """
    _import_ctranslate2()
    from ctranslate2.converters import TransformersConverter
    from ctranslate2.converters import transformers as ct2_transformers

    name = str(model_dir)
    if not os.path.exists(name) and not os.path.isabs(name) and not name.startswith(".") and name.count("/") <= 1:
        from huggingface_hub import snapshot_download  # a Hub id: its snapshot in the Hugging Face cache

        model_dir = snapshot_download(name)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"to_ctranslate2: {model_dir} has no config.json; save the model there first")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "source.spm", "spiece.model")
    if not any((model_dir / name).is_file() for name in tokenizer_files):
        raise FileNotFoundError(
            f"to_ctranslate2: {model_dir} has no tokenizer files; the CTranslate2 converter reads the vocabulary "
            "with AutoTokenizer, so call tokenizer.save_pretrained(model_dir) too"
        )

    converter = TransformersConverter(str(model_dir))
    # Swap in the adapters for the duration of this conversion only (the registry is module state).
    with _REGISTRY_LOCK:
        registry = ct2_transformers._MODEL_LOADERS
        originals = dict(registry)
        registry["MarianConfig"] = _hf_marian_loader_class()()
        for config_name, pre_norm in _NORMALIZE_BEFORE.items():
            if config_name in registry:
                registry[config_name] = _with_normalize_before(type(registry[config_name]), pre_norm)()
        for config_name, loader in list(registry.items()):
            registry[config_name] = _with_padded_vocabulary(type(loader))()
        try:
            out = converter.convert(str(out_dir), quantization=quantization, force=force)
        finally:
            registry.clear()
            registry.update(originals)
    if (model_dir / "generation_config.json").is_file():  # how the model decodes: CTranslate2Translator follows it
        shutil.copyfile(model_dir / "generation_config.json", Path(out) / "generation_config.json")
    return str(out)


class TimedTranslations(list):
    """A list of hypotheses (``str``) that also carries its timing.

    Attributes:
        seconds: wall-clock seconds of the whole call (tokenization, translation, detokenization).
        num_sentences: number of source sentences.
        num_tokens: number of generated target tokens (``</s>`` excluded).
        sentences_per_second: ``num_sentences / seconds``.
    """

    def __init__(self, hypotheses: Iterable[str] = (), seconds: float = 0.0, num_tokens: int = 0):
        super().__init__(hypotheses)
        self.seconds = float(seconds)
        self.num_sentences = len(self)
        self.num_tokens = int(num_tokens)

    @property
    def sentences_per_second(self) -> float:
        return self.num_sentences / self.seconds if self.seconds > 0 else float("inf")

    @property
    def timing(self) -> dict:
        """``seconds``, ``num_sentences``, ``num_tokens`` and ``sentences_per_second`` as a dict."""
        return {"seconds": self.seconds, "num_sentences": self.num_sentences, "num_tokens": self.num_tokens,
                "sentences_per_second": self.sentences_per_second}


def ctranslate2_decoding_options(generation_config, tokenizer, target_token: str | None = None,
                                  **overrides) -> dict:
    """CTranslate2 ``translate_batch`` options that decode as a Transformers generation config says.

    ``no_repeat_ngram_size``, ``repetition_penalty``, ``length_penalty``, ``bad_words_ids`` (as
    ``suppress_sequences``), ``min_new_tokens`` (``min_decoding_length``), ``max_length`` (``max_decoding_length``,
    which ``overrides`` may give as a number of new tokens), ``forced_eos_token_id`` (the limit is one shorter:
    Transformers spends the last token on the forced ``</s>``, which CTranslate2 never shows) and the first forced
    token as
    ``target_token`` (turned into ``target_prefix`` per sentence): ``target_token`` when given, else the tokenizer's
    ``tgt_lang`` (a multilingual tokenizer), else the config's ``forced_bos_token_id`` (e.g. BART's ``<s>``).

    Args:
        generation_config: a ``GenerationConfig`` or its dict (``generation_config.json``).
        tokenizer: the model's tokenizer (ids -> tokens).
        target_token: the token forced first.
        **overrides: options that win (``None`` values are ignored).
    """
    config = generation_config if isinstance(generation_config, dict) else generation_config.to_diff_dict()
    tok = tokenizer
    options = {}
    if config.get("no_repeat_ngram_size"):
        options["no_repeat_ngram_size"] = int(config["no_repeat_ngram_size"])
    if config.get("repetition_penalty") not in (None, 1.0):
        options["repetition_penalty"] = float(config["repetition_penalty"])
    if config.get("length_penalty") is not None:
        options["length_penalty"] = float(config["length_penalty"])
    if config.get("bad_words_ids"):
        options["suppress_sequences"] = [tok.convert_ids_to_tokens(ids) for ids in config["bad_words_ids"]]
    if config.get("min_new_tokens"):
        options["min_decoding_length"] = int(config["min_new_tokens"])
    limit = overrides.pop("max_decoding_length", None)
    if limit is None and config.get("max_length"):  # Transformers counts the decoder start token
        limit = int(config["max_length"]) - 1
    if limit is not None:  # Transformers' forced EOS takes the last of max_new_tokens; CTranslate2 leaves it out
        forced_eos = config.get("forced_eos_token_id")
        options["max_decoding_length"] = max(1, int(limit) - 1) if forced_eos is not None else int(limit)
    if target_token is None:
        bos = target_token_id(tok)
        bos = bos if bos is not None else config.get("forced_bos_token_id")
        target_token = None if bos is None else tok.convert_ids_to_tokens(bos)
    if target_token is not None:
        options["target_token"] = target_token
    options.update({k: v for k, v in overrides.items() if v is not None})
    return options


class CTranslate2Translator:
    """A converted model plus its Hugging Face tokenizer: text in, text out, decoded as the original model's generation
    config says.

    The generation config that :func:`to_ctranslate2` copies into the folder (``generation_config.json``) is
    followed: ``no_repeat_ngram_size``, ``repetition_penalty``, ``length_penalty`` (for :meth:`translate`; the Seq-KD
    corpus fixes 1.0), ``bad_words_ids`` (suppressed sequences), ``min_new_tokens`` and ``forced_bos_token_id`` (the
    target prefix, e.g. BART's ``<s>``; the tokenizer's ``tgt_lang`` comes first), unless a call says otherwise
    (``target_token``: a multilingual model's target language).
    One difference remains: Transformers' ``repetition_penalty`` also penalises the decoder start token, which is
    ``</s>`` for BART, mBART, M2M100 and NLLB (so it lengthens their outputs); CTranslate2's does not.

    Args:
        ct2_dir: a folder written by :func:`to_ctranslate2`.
        tokenizer: the model's tokenizer (an object, or a folder/name for ``AutoTokenizer.from_pretrained``); its
            source language (``src_lang``) tags the sources.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        device_index: the GPU (or GPUs: one replica on each, batches spread over them) to run on; default 0. Under
            ``torchrun`` / ``accelerate launch`` each process passes its own (the trainer does).
        compute_type: CTranslate2 compute type (``"default"`` = the saved weight type where supported).
        intra_threads: threads per translation (0 = CTranslate2's default).
        inter_threads: parallel translations.
    """

    def __init__(self, ct2_dir, tokenizer, device: str = "cpu", compute_type: str = "default",
                 intra_threads: int = 0, inter_threads: int = 1, device_index: int | list[int] = 0):
        ctranslate2 = _import_ctranslate2()
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.ct2_dir = str(ct2_dir)
        self.intra_threads = int(intra_threads)
        self.translator = ctranslate2.Translator(self.ct2_dir, device=device, device_index=device_index,
                                                 compute_type=compute_type, intra_threads=intra_threads,
                                                 inter_threads=inter_threads)
        config = Path(self.ct2_dir) / "generation_config.json"
        self.generation_config = json.loads(config.read_text()) if config.is_file() else {}
        self.last_timing: dict | None = None

    def decoding_options(self, target_token: str | None = None, **overrides) -> dict:
        """``translate_batch`` options that reproduce the generation config (see the class docstring)."""
        return ctranslate2_decoding_options(self.generation_config, self.tokenizer, target_token, **overrides)

    def _translate_batch(self, ids: list[list[int]], **options):
        target = options.pop("target_token", None)
        tokens = [self.tokenizer.convert_ids_to_tokens(x) for x in ids]
        if target is not None:
            options["target_prefix"] = [[target] for _ in tokens]
        return self.translator.translate_batch(tokens, **options) if tokens else []

    def translate(
        self,
        sources: Sequence[str],
        num_beams: int = 1,
        batch_size: int = 32,
        max_new_tokens: int = 128,
        length_penalty: float | None = None,
        max_input_length: int = 1024,
        target_token: str | None = None,
    ) -> TimedTranslations:
        """Translate ``sources``; returns the detokenized hypotheses with timing (also in ``last_timing``).

        Args:
            sources: source sentences (already carrying any task prefix the model expects).
            num_beams: beam size (1 = greedy).
            batch_size: sentences per batch (CTranslate2 sorts by length within the call).
            max_new_tokens: the most target tokens generated (``max_decoding_length``).
            length_penalty: CTranslate2's exponential length penalty for beam search (default: the generation
                config's, else 1.0).
            max_input_length: source tokens kept (0 = no truncation).
            target_token: the token forced first (a multilingual model's target language; default: the generation
                config's ``forced_bos_token_id``).
        """
        tok = self.tokenizer
        start = time.perf_counter()
        sources = list(sources)
        ids = tok(sources, add_special_tokens=True)["input_ids"] if sources else []
        results = self._translate_batch(
            ids, max_batch_size=max(1, int(batch_size)), beam_size=max(1, int(num_beams)),
            max_input_length=max_input_length, **self.decoding_options(
                target_token, length_penalty=length_penalty, max_decoding_length=max_new_tokens))
        hyp_ids = [tok.convert_tokens_to_ids(r.hypotheses[0]) for r in results]
        hypotheses = tok.batch_decode(hyp_ids, skip_special_tokens=True) if hyp_ids else []
        seconds = time.perf_counter() - start
        out = TimedTranslations(hypotheses, seconds=seconds, num_tokens=sum(len(h) for h in hyp_ids))
        self.last_timing = out.timing
        return out

    __call__ = translate

    def translate_kbest(self, texts: Sequence[str], generation, max_source_length: int | None = None):
        """Per text, the ``generation.num_return_sequences``-best translations (best first) and their scores, as
        :func:`hf_seqkd.generation.generate_kbest` returns them for a Transformers model.

        The scores are CTranslate2's with ``length_penalty=1.0``: the summed log-probabilities of the generated
        tokens (``</s>`` included) over their number, the same definition as Transformers' (a hypothesis cut at the
        limit of a model with a forced ``</s>`` counts that ``</s>`` as Transformers does); CTranslate2's arithmetic
        differs, so they agree to about 1e-5, not to float precision (``bench/RESULTS.md``).
        """
        tok = self.tokenizer
        ids = tok(list(texts), truncation=max_source_length is not None, max_length=max_source_length)["input_ids"]
        target = None if generation.forced_bos_token_id is None else tok.convert_ids_to_tokens(
            generation.forced_bos_token_id)
        options = self.decoding_options(target, length_penalty=SEQKD_LENGTH_PENALTY,
                                        max_decoding_length=generation.max_new_tokens)
        results = self._translate_batch(
            ids, max_batch_size=len(ids), beam_size=generation.num_beams,
            num_hypotheses=generation.num_return_sequences, return_scores=True, max_input_length=0, **options)
        nbest = [tok.batch_decode([tok.convert_tokens_to_ids(h) for h in r.hypotheses], skip_special_tokens=True)
                 for r in results]
        # a hypothesis cut at the limit under a forced </s>: Transformers counts that </s> (log-probability 0, forced)
        # in the length; CTranslate2 stopped one token earlier and divided by one less
        limit, full = options["max_decoding_length"], generation.max_new_tokens
        cut = limit < full
        return nbest, [[float(x) * (limit / full if cut and len(h) == limit else 1.0)
                        for h, x in zip(r.hypotheses, r.scores)] for r in results]


def translate_ctranslate2(
    ct2_dir,
    tokenizer,
    sources: Sequence[str],
    num_beams: int = 1,
    batch_size: int = 32,
    max_new_tokens: int = 128,
    device: str = "cpu",
    compute_type: str = "default",
    intra_threads: int = 0,
    target_token: str | None = None,
    device_index: int | list[int] = 0,
) -> TimedTranslations:
    """Translate ``sources`` with a CTranslate2 model folder and the model's Hugging Face tokenizer.

    Sources are tokenized with the tokenizer (its ``</s>`` included, as ``generate`` sees them), turned into
    token strings with ``convert_ids_to_tokens``, translated with ``Translator.translate_batch`` and
    detokenized with ``batch_decode(..., skip_special_tokens=True)``, as Transformers outputs usually are.

    Args:
        ct2_dir: a folder written by :func:`to_ctranslate2` (or a ready ``CTranslate2Translator``).
        tokenizer: the model's tokenizer, or a folder to load it from.
        sources: source sentences.
        num_beams: beam size (1 = greedy).
        batch_size: sentences per batch.
        max_new_tokens: the most target tokens generated.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        compute_type: CTranslate2 compute type (``"default"``, ``"int8"``, ``"float32"``, ...).
        intra_threads: CPU threads per translation (0 = CTranslate2's default; when timing against
            Transformers, use the same number of threads as ``torch.get_num_threads()``).
        target_token: the token forced first (a multilingual model's target language).
        device_index: the GPU(s) to run on (:class:`CTranslate2Translator`).

    Returns:
        :class:`TimedTranslations`: a list of hypotheses with ``seconds`` and ``sentences_per_second``
        (the timing covers tokenization, translation and detokenization, not loading the model).
    """
    translator = ct2_dir if isinstance(ct2_dir, CTranslate2Translator) else CTranslate2Translator(
        ct2_dir, tokenizer, device=device, compute_type=compute_type, intra_threads=intra_threads,
        device_index=device_index)
    return translator.translate(sources, num_beams=num_beams, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                target_token=target_token)
