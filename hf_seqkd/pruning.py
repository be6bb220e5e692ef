"""Magnitude pruning of seq2seq students (Kim & Rush 2016, Sec. 5.3; See, Luong & Manning 2016).

Kim & Rush (2016, Sec. 5.3) prune their sequence-level-distilled student with the magnitude pruning of See,
Luong & Manning (2016, "Compression of Neural Machine Translation Models via Pruning"): remove the weights of
smallest absolute value, then retrain with the pruned weights held at zero. On top of sequence-level KD this
gave them a student with 13x fewer parameters than its teacher for a loss of 0.4 BLEU.

Pruning schemes of See et al. (2016), chosen with ``scope``:

* ``"class_blind"``: all prunable weights are ranked together, one global magnitude threshold (See et al.'s
  best scheme).
* ``"class_uniform"``: every weight class loses the same fraction of its weights.
* ``"class_distribution"``: class ``c`` loses the weights with ``|w| < lambda * sigma_c`` (``sigma_c`` the
  standard deviation of the class's weights), ``lambda`` chosen so that the overall sparsity is the target;
  equivalently, class-blind ranking of ``|w| / sigma_c``.

Weight classes (:func:`weight_class`, from parameter names of Marian, BART/mBART and T5):

* ``"embeddings"``: token embeddings (``shared``, ``embed_tokens``). Marian/BART/T5 tie the input embeddings
  with the output projection (``lm_head``): the shared tensor is one tensor, pruned once and counted once, in
  this class.
* ``"attention"``: query/key/value/output projections of self- and cross-attention (``self_attn``,
  ``encoder_attn``, ``SelfAttention``, ``EncDecAttention``).
* ``"feed_forward"``: ``fc1``/``fc2`` (Marian/BART), ``DenseReluDense`` (T5).
* ``"output"``: an *untied* output projection (``lm_head`` of T5 v1.1 or of untied models).
* ``"other"``: any other weight matrix (pruned like the rest).
* ``"positions"``: learned position embeddings (BART) and T5's relative attention biases. Not pruned unless
  named in ``include`` (they encode positions, not words or features, and are a tiny share of a model).
  Marian's sinusoidal position tables are never pruned (fixed, and not saved: ``_keys_to_ignore_on_save``).

Layer norms and biases (every parameter of fewer than two dimensions) are never pruned, nor are parameters
with ``requires_grad=False`` or left out of the saved model (Marian's sinusoidal position table).

Masks: the pruned weights are set to zero in place and stay plain tensors (checkpoints and ``save_pretrained`` load
as plain models); the keep-masks live on the model (``model.hf_seqkd_pruning_masks``) and are held by a gradient hook,
a training-mode forward pre-hook and :class:`PruningCallback`; :func:`fold_pruning` forgets them. Why this rather
than ``torch.nn.utils.prune``: ``docs/pruning.md``.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from transformers.utils import logging

from .students import count_parameters, unsaved_parameter_names

logger = logging.get_logger(__name__)

__all__ = [
    "prune_model",
    "fold_pruning",
    "remove_pruning",
    "apply_pruning_masks",
    "pruning_masks",
    "sparsity_report",
    "weight_class",
    "PruningCallback",
    "GradualPruningCallback",
    "gradual_sparsity",
    "WEIGHT_CLASSES",
    "DEFAULT_PRUNED_CLASSES",
    "sparsity_name",
    "pruned_sparsity",
]

WEIGHT_CLASSES = ("embeddings", "attention", "feed_forward", "output", "other", "positions")
DEFAULT_PRUNED_CLASSES = ("embeddings", "attention", "feed_forward", "output", "other")
SCOPES = ("class_blind", "class_uniform", "class_distribution")

_MASKS_ATTR = "hf_seqkd_pruning_masks"  # name -> bool keep-mask (True = weight kept)
_HANDLES_ATTR = "_hf_seqkd_pruning_handles"  # name -> (id(param), gradient hook handle)

_POSITIONS = re.compile(r"(embed_positions|relative_attention_bias|position_embeddings)")
_EMBEDDINGS = re.compile(r"(^|\.)(shared|embed_tokens|word_embeddings)\.")
_ATTENTION = re.compile(r"(self_attn|encoder_attn|SelfAttention|EncDecAttention|attention)\.", re.IGNORECASE)
_FEED_FORWARD = re.compile(r"(\.fc1\.|\.fc2\.|DenseReluDense|\.mlp\.|feed_forward|\.ffn\.)")
_OUTPUT = re.compile(r"(^|\.)(lm_head|output_projection)\.")


def weight_class(name: str) -> str:
    """The weight class of a parameter name (see the module docstring); ``"other"`` when nothing matches.

    Args:
        name: a parameter name as in ``model.named_parameters()`` (the first name of a tied tensor, e.g.
            ``model.shared.weight`` for Marian/BART, ``shared.weight`` for T5).
    """
    if _POSITIONS.search(name):
        return "positions"
    if _EMBEDDINGS.search(name):
        return "embeddings"
    if _OUTPUT.search(name):
        return "output"
    if _ATTENTION.search(name):
        return "attention"
    if _FEED_FORWARD.search(name):
        return "feed_forward"
    return "other"


def _prunable(model: nn.Module, classifier: Callable[[str], str]) -> dict[str, tuple[str, nn.Parameter]]:
    """name -> (class, parameter) for every distinct trainable matrix (tied tensors once, first name)."""
    out, unsaved = {}, unsaved_parameter_names(model)
    for name, param in model.named_parameters():  # remove_duplicate=True: a tied tensor appears once
        if param.dim() < 2 or not param.requires_grad or name in unsaved:
            continue  # biases, layer norms, fixed (sinusoidal) position tables (trainable once loaded: Transformers 5)
        out[name] = (classifier(name), param)
    return out


def _select(prunable, include) -> dict[str, tuple[str, nn.Parameter]]:
    if include is None:
        include = DEFAULT_PRUNED_CLASSES
    if callable(include):
        return {n: cp for n, cp in prunable.items() if include(n, cp[1])}
    if isinstance(include, str):
        include = [include]
    include = set(include)
    return {n: cp for n, cp in prunable.items() if cp[0] in include}


def _keep_masks(scores: Mapping[str, torch.Tensor], num_pruned: int) -> dict[str, torch.Tensor]:
    """Keep-masks pruning exactly ``num_pruned`` entries of smallest score over all tensors together.

    Ties at the threshold are broken by order (tensor order, then flattened position).
    """
    names = list(scores)
    masks = {n: torch.ones_like(scores[n], dtype=torch.bool) for n in names}
    if num_pruned <= 0 or not names:
        return masks
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    num_pruned = min(num_pruned, flat.numel())
    threshold = torch.kthvalue(flat, num_pruned).values.item()
    del flat
    remaining_ties = num_pruned - sum(int((scores[n] < threshold).sum()) for n in names)
    for n in names:
        s = scores[n].detach()
        keep = s > threshold
        ties = (s == threshold).reshape(-1).nonzero().reshape(-1)
        if remaining_ties > 0 and ties.numel():
            # the first remaining_ties entries equal to the threshold are pruned, later ones kept
            keep.reshape(-1)[ties[remaining_ties:]] = True
            remaining_ties -= min(remaining_ties, ties.numel())
        else:
            keep |= s == threshold
        masks[n] = keep
    return masks


def _masked_grad_hook(mask: torch.Tensor):
    state = {"pruned": ~mask}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        pruned = state["pruned"]
        if pruned.device != grad.device:
            pruned = state["pruned"] = pruned.to(grad.device)
        return grad.masked_fill(pruned, 0)

    return hook


def _training_pre_hook(module: nn.Module, args):
    if module.training:
        apply_pruning_masks(module)


def _remove_hooks(model: nn.Module) -> None:
    handles = model.__dict__.pop(_HANDLES_ATTR, {})
    params = dict(model.named_parameters())
    for name, (param_id, handle) in handles.items():
        # after copy.deepcopy the copied handles point at the original's tensors: leave those alone
        if name in params and id(params[name]) == param_id:
            handle.remove()
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _training_pre_hook:
            del model._forward_pre_hooks[key]


def _install_hooks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    _remove_hooks(model)
    handles = {}
    for name, mask in masks.items():
        param = model.get_parameter(name)
        handles[name] = (id(param), param.register_hook(_masked_grad_hook(mask)))
    model.__dict__[_HANDLES_ATTR] = handles
    model.register_forward_pre_hook(_training_pre_hook)


@torch.no_grad()
def apply_pruning_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Set the pruned weights to zero again (in place); a no-op for a model without masks.

    Args:
        model: the pruned model.
        masks: name -> boolean keep-mask; default: the masks :func:`prune_model` stored on the model.
    """
    masks = pruning_masks(model) if masks is None else masks
    for name, mask in masks.items():
        param = model.get_parameter(name)
        if mask.device != param.device:
            mask = mask.to(param.device)
            if masks is getattr(model, _MASKS_ATTR, None):
                masks[name] = mask  # cache on the parameter's device
        param.data.masked_fill_(~mask, 0)
    return model


def pruning_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The active keep-masks (name -> bool tensor, True = kept) of a pruned model; ``{}`` if none."""
    return getattr(model, _MASKS_ATTR, None) or {}


@torch.no_grad()
def prune_model(
    model: nn.Module,
    sparsity: float = 0.8,
    scope: str = "class_blind",
    include: Iterable[str] | Callable[[str, nn.Parameter], bool] | None = None,
    *,
    classifier: Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Magnitude-prune ``model`` in place (See, Luong & Manning 2016; Kim & Rush 2016, Sec. 5.3).

    The smallest-magnitude weights are set to zero and masked (see the module docstring for how the masks
    survive retraining and saving). Pruning an already pruned model again keeps its old zeros pruned
    (iterative pruning): the new masks are intersected with the old ones.

    Args:
        model: a ``PreTrainedModel`` (Marian, BART/mBART, T5, ...) or any ``nn.Module``.
        sparsity: the fraction of the selected weights to remove, in [0, 1]. Per class for
            ``"class_uniform"``, over all selected weights otherwise; the count is ``round(sparsity * n)``.
        scope: ``"class_blind"`` (one global threshold), ``"class_uniform"`` (each class pruned by
            ``sparsity``) or ``"class_distribution"`` (threshold ``lambda * std`` per class).
        include: which weights to prune: ``None`` = the classes in ``DEFAULT_PRUNED_CLASSES`` (all but
            ``"positions"``), an iterable of class names from ``WEIGHT_CLASSES``, or a callable
            ``(name, parameter) -> bool``. Biases, layer norms, frozen parameters and parameters the model does not
            save (Marian's sinusoidal position tables) are never pruned.
        classifier: ``name -> class`` replacing :func:`weight_class` (e.g. to split encoder/decoder classes).

    Returns:
        The keep-masks, parameter name -> boolean tensor (True = kept), also stored on the model
        (:func:`pruning_masks`) and needed by :class:`PruningCallback`.
    """
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"prune_model: sparsity must be in [0, 1], got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"prune_model: unknown scope {scope!r}; use one of {SCOPES}")
    classifier = classifier or weight_class
    selected = _select(_prunable(model, classifier), include)
    if not selected:
        raise ValueError("prune_model: no prunable weights selected (check include=)")
    old = dict(pruning_masks(model))
    apply_pruning_masks(model, old)  # old zeros are exact zeros before ranking

    by_class: dict[str, dict[str, torch.Tensor]] = {}
    for name, (cls, param) in selected.items():
        by_class.setdefault(cls, {})[name] = param.detach()

    masks: dict[str, torch.Tensor] = {}
    if scope == "class_blind":
        scores = {n: p.detach().abs() for n, (_, p) in selected.items()}
        total = sum(s.numel() for s in scores.values())
        masks = _keep_masks(scores, int(round(sparsity * total)))
    elif scope == "class_uniform":
        for params in by_class.values():
            scores = {n: p.abs() for n, p in params.items()}
            total = sum(s.numel() for s in scores.values())
            masks.update(_keep_masks(scores, int(round(sparsity * total))))
    else:  # class_distribution: rank |w| / std(class) globally (See et al. 2016)
        scores = {}
        for params in by_class.values():
            std = torch.cat([p.reshape(-1).float() for p in params.values()]).std().item()
            std = std if std > 0 else 1.0
            scores.update({n: p.abs().float() / std for n, p in params.items()})
        total = sum(s.numel() for s in scores.values())
        masks = _keep_masks(scores, int(round(sparsity * total)))

    for name, mask in masks.items():
        if name in old:
            mask &= old[name].to(mask.device)
    for name, mask in old.items():  # weights pruned before but not selected this time stay pruned
        masks.setdefault(name, mask)
    model.__dict__[_MASKS_ATTR] = masks
    apply_pruning_masks(model, masks)
    _install_hooks(model, masks)
    return masks


@torch.no_grad()
def fold_pruning(model: nn.Module) -> nn.Module:
    """Make the pruning permanent: zero the pruned weights, remove the hooks and forget the masks.

    Afterwards the model is a plain model (zeros stay where weights were pruned; nothing keeps them at zero
    in further training). ``save_pretrained`` then writes plain weights, as it does before folding.

    Args:
        model: a model pruned with :func:`prune_model` (a model without masks is returned unchanged).

    Returns:
        The same model.
    """
    apply_pruning_masks(model)
    _remove_hooks(model)
    model.__dict__.pop(_MASKS_ATTR, None)
    return model


remove_pruning = fold_pruning


def sparsity_report(model: nn.Module, *, classifier: Callable[[str], str] | None = None) -> dict:
    """Parameter counts of a (pruned) model, overall and per weight class.

    Tied tensors count once. Returns::

        {"total": int, "nonzero": int, "sparsity": float,      # all distinct parameters (tied ones once)
         "prunable_total": int, "prunable_nonzero": int,       # the trainable weight matrices of every
         "prunable_sparsity": float,                           #   class, "positions" included
         "classes": {cls: {"total", "nonzero", "sparsity", "tensors"}},  # the same, by weight class
         "not_prunable": {"total", "nonzero"},                 # biases, layer norms, frozen tables
         "masked": int}                                        # entries held at zero by active masks

    Args:
        model: any model.
        classifier: ``name -> class`` (default :func:`weight_class`).
    """
    classifier = classifier or weight_class
    total = count_parameters(model)
    nonzero = count_parameters(model, nonzero=True)
    classes: dict[str, dict] = {}
    for cls, param in _prunable(model, classifier).values():
        entry = classes.setdefault(cls, {"total": 0, "nonzero": 0, "tensors": 0})
        entry["total"] += param.numel()
        entry["nonzero"] += int(torch.count_nonzero(param).item())
        entry["tensors"] += 1
    for entry in classes.values():
        entry["sparsity"] = 1.0 - entry["nonzero"] / entry["total"] if entry["total"] else 0.0
    p_total = sum(e["total"] for e in classes.values())
    p_nonzero = sum(e["nonzero"] for e in classes.values())
    return {
        "total": total,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / total if total else 0.0,
        "prunable_total": p_total,
        "prunable_nonzero": p_nonzero,
        "prunable_sparsity": 1.0 - p_nonzero / p_total if p_total else 0.0,
        "classes": classes,
        "not_prunable": {"total": total - p_total, "nonzero": nonzero - p_nonzero},
        "masked": int(sum(int((~m).sum()) for m in pruning_masks(model).values())),
    }


try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # pragma: no cover
    _TrainerCallback = object


class PruningCallback(_TrainerCallback):
    """Keeps pruned weights at zero in a Hugging Face ``Trainer`` loop (retraining after pruning).

    Re-applies the masks when training starts and after every optimizer step (``on_step_end`` runs before
    the Trainer logs, evaluates and writes checkpoints) and when training ends. Re-installs the gradient
    hooks when training starts if the Trainer's model holds other parameter objects than the pruned one
    (e.g. a deep copy).

    Args:
        masks: name -> boolean keep-mask as returned by :func:`prune_model`; ``None`` uses the masks stored
            on the Trainer's model.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None):
        self.masks = dict(masks) if masks is not None else None

    def _masks_for(self, model):
        return self.masks if self.masks is not None else pruning_masks(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        masks = self._masks_for(model)
        if not masks:
            return
        if self.masks is not None and pruning_masks(model) is not self.masks:
            model.__dict__[_MASKS_ATTR] = dict(self.masks)
        handles = model.__dict__.get(_HANDLES_ATTR, {})
        params = dict(model.named_parameters())
        if any(name not in handles or handles[name][0] != id(params.get(name)) for name in masks):
            _install_hooks(model, pruning_masks(model))
        apply_pruning_masks(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            apply_pruning_masks(model, self._masks_for(model))

    on_train_end = on_step_end


def gradual_sparsity(final_sparsity: float, event: int, num_events: int, initial_sparsity: float = 0.0) -> float:
    """The sparsity after pruning event ``event`` of ``num_events`` (1-based) of gradual pruning, Zhu & Gupta (2017,
    "To prune, or not to prune", eq. 1): ``s_f + (s_i - s_f) * (1 - event / num_events) ** 3``, fast at first and
    slowing down as fewer weights are left; the last event reaches ``s_f``."""
    if not 1 <= event <= num_events:
        raise ValueError(f"gradual_sparsity: event {event} is not in 1..{num_events}")
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - event / num_events) ** 3


class GradualPruningCallback(PruningCallback):
    """Gradual magnitude pruning during (re)training (Zhu & Gupta 2017): ``num_events`` pruning steps spaced evenly
    over the first ``ramp`` fraction of the training steps, the sparsity after each given by
    :func:`gradual_sparsity`, the masks held in between as :class:`PruningCallback` holds them (each event prunes
    the current weights further, keeping earlier zeros pruned: :func:`prune_model`). The alternative to pruning once
    and retraining (Kim & Rush 2016, Sec. 5.3; See et al. 2016) when one-shot pruning to a high sparsity does not
    recover.

    Args:
        sparsity: the final sparsity, in [0, 1].
        num_events: pruning steps (>= 1; 1 = one-shot pruning at the first step).
        ramp: the fraction of training over which the events are spread (the rest retrains at the final sparsity).
        scope, include: as for :func:`prune_model`.

    Raises:
        ValueError: ``num_events < 1`` or ``ramp`` outside (0, 1].
    """

    def __init__(self, sparsity: float, num_events: int, ramp: float = 0.5, scope: str = "class_blind",
                 include=None):
        super().__init__()
        if num_events < 1:
            raise ValueError(f"GradualPruningCallback: num_events must be >= 1, got {num_events}")
        if not 0.0 < ramp <= 1.0:
            raise ValueError(f"GradualPruningCallback: ramp must be in (0, 1], got {ramp}")
        self.sparsity, self.num_events, self.ramp = float(sparsity), int(num_events), float(ramp)
        self.scope, self.include = scope, include
        self.event_steps: dict[int, int] = {}  # optimizer step -> event number

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "load_best_model_at_end", False):
            raise ValueError("gradual pruning with load_best_model_at_end (or early stopping) would keep a checkpoint "
                             "from before the last pruning step, below the target sparsity or never retrained at it; "
                             "train to the end (load_best_model_at_end=False, no early_stopping_patience)")
        span = max(1, int(self.ramp * state.max_steps))
        if self.num_events > span:
            logger.warning(f"gradual pruning: {self.num_events} pruning events over {span} optimizer steps; only one "
                           "event per step can happen, so the schedule is coarser than asked (use fewer events or a "
                           "longer ramp)")
        # event k after optimizer step ceil(k * span / n): the first early, the last at the end of the ramp
        self.event_steps = {max(1, -(-k * span // self.num_events)): k for k in range(1, self.num_events + 1)}
        passed = [k for step, k in self.event_steps.items() if step <= state.global_step]
        if passed and model is not None:  # resumed from a checkpoint: its zeros are the masks of the last event
            self._prune(model, max(passed))
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        event = self.event_steps.get(state.global_step)
        if model is not None and event is not None:
            self._prune(model, event)
        super().on_step_end(args, state, control, model=model, **kwargs)

    def _prune(self, model, event: int) -> None:
        prune_model(model, gradual_sparsity(self.sparsity, event, self.num_events), scope=self.scope,
                    include=self.include)


def sparsity_name(sparsity: float) -> str:
    """The output sub-folder of a sparsity: 0.8 -> ``sparsity-80``, 0.05 -> ``sparsity-05``, 0.875 ->
    ``sparsity-87.5``."""
    percent = round(sparsity * 100, 2)
    return f"sparsity-{percent:g}" if percent % 1 else f"sparsity-{int(percent):02d}"


def pruned_sparsity(report: dict, include=None) -> float:
    """Measured sparsity of the weight classes that were pruned (from ``sparsity_report``)."""
    classes = [c for c in (include or DEFAULT_PRUNED_CLASSES) if c in report["classes"]]
    total = sum(report["classes"][c]["total"] for c in classes)
    return 1.0 - sum(report["classes"][c]["nonzero"] for c in classes) / total if total else 0.0
