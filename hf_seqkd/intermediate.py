"""Combinatorial intermediate-layer distillation (CKD; Wu, Passban, Rezagholizadeh & Liu 2020, "Why Skip If You
Can Combine: A Simple Knowledge Distillation Technique for Intermediate Layers", EMNLP).

The loss (Wu et al. 2020, the CKD method)
------------------------------------------
Student layer ``i`` is paired with a *group* ``M(i)`` of teacher layers. At every non-padding position ``t``, the
outputs of the teacher layers in the group are concatenated along the hidden axis,
``c_t = [h^T_{j_1,t}; ...; h^T_{j_k,t}]`` (size ``k * d_t``), a trainable linear map ``W_i`` (``d_s -> k * d_t``,
with bias) lifts the student's state to the same size, both are L2-normalised, and

    L_ckd = sum_i  sum_t  || W_i h^S_{i,t} / ||W_i h^S_{i,t}||  -  c_t / ||c_t|| ||^2     (squares summed over units)

is averaged over the non-padding tokens (source tokens for the encoder, target tokens for the decoder) and summed
over the mapped layers and stacks. Each per-token term equals ``2 - 2 cos(W_i h^S, c)`` and lies in ``[0, 4]``.
The paper applies it to the encoder (``intermediate_layers="encoder"``); ``"decoder"`` and ``"both"`` are offered
too. The student and teacher widths may differ (``W_i`` takes care of it).

In the trainer the full objective is (Wu et al. 2020's overall loss)

    L = (1 - alpha - w) * CE + alpha * T^2 * KD + w * L_ckd,     w = ``intermediate_loss_weight`` (the paper's beta).

There each term is a sum over tokens divided by the token count of the whole accumulated (and, with
``average_tokens_across_devices``, all-process) batch, so gradient accumulation is exact: the encoder CKD sum by
the number of source tokens, the decoder CKD sum by the number of target tokens; i.e. exactly the per-token
average above, taken over the optimizer step's batch.

Which hidden states
-------------------
Models are run with ``output_hidden_states=True``: ``hidden_states[0]`` is the embedding output and
``hidden_states[l]`` the output of layer ``l`` (1-based), which is what a teacher layer number ``l`` refers to.
Note that for models with a final layer norm (T5, mBART, M2M100/NLLB: pre-LN stacks) transformers returns the
*last* entry after that norm (T5: and after dropout), while every other entry is a raw layer output; post-LN
models (Marian, BART) return raw layer outputs throughout. We use the entries as returned; since both sides are
L2-normalised only the direction matters.

Mapping strategies for any depth pair
-------------------------------------
A teacher with ``n`` layers and a student with ``m <= n`` layers. All layer numbers are 1-based. The basis is
the *regular partition* of the teacher into ``m`` contiguous, nearly equal groups:

    G_i = [e_{i-1} + 1, ..., e_i],    e_i = floor(i * n / m)     (i = 1..m;  e_0 = 0, e_m = n)

(when ``m`` does not divide ``n`` the later groups are the larger ones). The strategies:

``regular_comb``  ``M(i) = G_i``: every teacher layer is used exactly once.
``skip``          ``M(i) = [last layer of G_i] = [e_i]``: PKD-skip (Sun et al. 2019), one teacher layer per student
                  layer, the teacher's last layer always included.
``overlap_comb``  ``G_i`` extended by one layer into each neighbouring group: ``[e_{i-1}] + G_i + [e_i + 1]``,
                  dropping what lies outside ``1..n`` (the first group has no lower, the last no upper neighbour).
``skip_middle``   ``G_i`` without its layer that faces the middle of the teacher stack: groups of the lower half
                  of the student (``i <= m / 2``) drop their last layer, groups of the upper half
                  (``i > (m + 1) / 2``) drop their first layer; the middle student layer of an odd ``m`` and
                  groups of a single layer keep their whole group. So the teacher's middle layers are skipped.
``cross_comb``    every other layer of ``G_i``, starting with its first: ``G_i[::2]``.
``skip_comb``     every ``m``-th teacher layer, interleaved: ``M(i) = [j in 1..n : j = i (mod m)]``
                  (``[i, i + m, i + 2m, ...]``), so each student layer combines layers from the whole stack.

Tables (student layer -> teacher layers):

============  ===================  =====================================  ============================================
strategy      6 -> 2               6 -> 3                                 12 -> 6
============  ===================  =====================================  ============================================
skip          [3] [6]              [2] [4] [6]                            [2] [4] [6] [8] [10] [12]
regular_comb  [1,2,3] [4,5,6]      [1,2] [3,4] [5,6]                      [1,2] [3,4] [5,6] [7,8] [9,10] [11,12]
overlap_comb  [1,2,3,4] [3,4,5,6]  [1,2,3] [2,3,4,5] [4,5,6]              [1,2,3] [2,3,4,5] [4,5,6,7] [6,7,8,9]
                                                                          [8,9,10,11] [10,11,12]
skip_middle   [1,2] [5,6]          [1] [3,4] [6]                          [1] [3] [5] [8] [10] [12]
cross_comb    [1,3] [4,6]          [1] [3] [5]                            [1] [3] [5] [7] [9] [11]
skip_comb     [1,3,5] [2,4,6]      [1,4] [2,5] [3,6]                      [1,7] [2,8] [3,9] [4,10] [5,11] [6,12]
============  ===================  =====================================  ============================================

The 6 -> 2 column is the paper's (Wu et al. 2020, their 6-layer teacher and 2-layer student). Note that when the
groups have two layers (``n = 2m``) ``cross_comb`` and ``skip_middle`` keep one layer per group, i.e. they become
one-to-one maps.

Explicit mappings: a dict or JSON object ``{"student layer": [teacher layers], ...}`` (1-based), e.g.
``'{"1": [1, 2, 3], "2": [4, 5, 6]}'``; student layers left out are not distilled. For ``"both"`` stacks the
same mapping applies to the encoder and the decoder, or give ``{"encoder": {...}, "decoder": {...}}``.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LAYER_MAPPING_STRATEGIES",
    "regular_groups",
    "layer_mapping",
    "resolve_layer_mapping",
    "num_stack_layers",
    "hidden_size",
    "concat_teacher_layers",
    "normalized_squared_error",
    "CombinatorialLayerLoss",
    "build_ckd_modules",
]

LAYER_MAPPING_STRATEGIES = ("skip", "regular_comb", "overlap_comb", "skip_middle", "cross_comb", "skip_comb")
_STACKS = ("encoder", "decoder")


# --------------------------------------------------------------------------------------------------- mappings
def regular_groups(num_teacher_layers: int, num_student_layers: int) -> list[list[int]]:
    """The regular partition of teacher layers ``1..n`` into ``m`` contiguous, nearly equal groups.

    Args:
        num_teacher_layers: ``n``, the teacher's depth.
        num_student_layers: ``m``, the student's depth, ``1 <= m <= n``.

    Returns:
        ``[G_1, ..., G_m]`` with ``G_i = [e_{i-1} + 1, ..., e_i]``, ``e_i = floor(i * n / m)`` (1-based layers).
    """
    n, m = int(num_teacher_layers), int(num_student_layers)
    if n < 1 or m < 1:
        raise ValueError(f"layer counts must be positive, got teacher {n}, student {m}")
    if m > n:
        raise ValueError(f"a named layer mapping needs a student no deeper than the teacher, got teacher {n} layers "
                         f"and student {m}: give an explicit mapping (e.g. '{{\"1\": [1], ...}}') instead")
    ends = [i * n // m for i in range(m + 1)]
    return [list(range(ends[i] + 1, ends[i + 1] + 1)) for i in range(m)]


def layer_mapping(strategy: str, num_teacher_layers: int, num_student_layers: int) -> dict[int, list[int]]:
    """The teacher layers each student layer is distilled from, by strategy name (rules in the module docstring).

    Args:
        strategy: one of :data:`LAYER_MAPPING_STRATEGIES`.
        num_teacher_layers: the teacher stack's depth ``n``.
        num_student_layers: the student stack's depth ``m <= n``.

    Returns:
        ``{student layer: [teacher layers]}``, all 1-based, for every student layer ``1..m``.
    """
    n, m = int(num_teacher_layers), int(num_student_layers)
    groups = regular_groups(n, m)
    if strategy == "regular_comb":
        out = groups
    elif strategy == "skip":
        out = [[g[-1]] for g in groups]
    elif strategy == "overlap_comb":
        out = [([g[0] - 1] if g[0] > 1 else []) + g + ([g[-1] + 1] if g[-1] < n else []) for g in groups]
    elif strategy == "skip_middle":
        out = []
        for i, g in enumerate(groups, start=1):
            if len(g) > 1 and 2 * i <= m:  # lower half: drop the layer facing the middle (the group's last)
                g = g[:-1]
            elif len(g) > 1 and 2 * i > m + 1:  # upper half: drop the group's first
                g = g[1:]
            out.append(g)
    elif strategy == "cross_comb":
        out = [g[::2] for g in groups]
    elif strategy == "skip_comb":
        out = [list(range(i, n + 1, m)) for i in range(1, m + 1)]
    else:
        raise ValueError(f"unknown layer mapping strategy {strategy!r}; choose one of {LAYER_MAPPING_STRATEGIES} "
                         "or give an explicit mapping such as '{\"1\": [1, 2, 3], \"2\": [4, 5, 6]}'")
    return {i: list(g) for i, g in enumerate(out, start=1)}


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{what} must be an integer, got {value!r}")


def _validate_explicit(mapping, num_teacher_layers: int, num_student_layers: int, where: str) -> dict[int, list[int]]:
    n, m = int(num_teacher_layers), int(num_student_layers)
    if isinstance(mapping, Sequence) and not isinstance(mapping, str):
        if len(mapping) != m:
            raise ValueError(f"{where}: a list mapping needs one group per student layer ({m}), got {len(mapping)}")
        mapping = {i: g for i, g in enumerate(mapping, start=1)}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected an object {{student layer: [teacher layers]}}, got "
                         f"{type(mapping).__name__}")
    if not mapping:
        raise ValueError(f"{where}: the mapping is empty; map at least one student layer")
    out: dict[int, list[int]] = {}
    for key, group in mapping.items():
        s = _as_int(key, f"{where}: student layer {key!r}")
        if not 1 <= s <= m:
            raise ValueError(f"{where}: student layer {s} does not exist; layers are numbered 1..{m} (1-based)")
        if s in out:
            raise ValueError(f"{where}: student layer {s} is mapped twice")
        if isinstance(group, (int, str)) or not isinstance(group, Sequence) or len(group) == 0:
            raise ValueError(f"{where}: student layer {s} needs a non-empty list of teacher layers, got {group!r}")
        layers = [_as_int(t, f"{where}: teacher layer {t!r} of student layer {s}") for t in group]
        bad = [t for t in layers if not 1 <= t <= n]
        if bad:
            raise ValueError(f"{where}: teacher layer(s) {bad} of student layer {s} do not exist; the teacher has "
                             f"layers 1..{n} (1-based)")
        if len(set(layers)) != len(layers):
            raise ValueError(f"{where}: student layer {s} lists a teacher layer twice: {layers}")
        out[s] = layers
    return dict(sorted(out.items()))


def resolve_layer_mapping(spec, num_teacher_layers: int, num_student_layers: int,
                          stack: str = "encoder") -> dict[int, list[int]]:
    """Turn a strategy name or an explicit mapping into ``{student layer: [teacher layers]}`` (1-based), validated.

    Args:
        spec: a name from :data:`LAYER_MAPPING_STRATEGIES`; a JSON string or a dict ``{"1": [1, 2, 3], ...}``; a
            list of groups (one per student layer); or a per-stack object ``{"encoder": ..., "decoder": ...}``
            whose entry for ``stack`` is used.
        num_teacher_layers: depth of the teacher's ``stack``.
        num_student_layers: depth of the student's ``stack``.
        stack: ``"encoder"`` or ``"decoder"`` (which entry of a per-stack object applies; named in errors).

    Raises:
        ValueError: naming the problem (unknown strategy, invalid JSON, layers out of range, ...).
    """
    where = f"layer_mapping ({stack})"
    if isinstance(spec, str):
        text = spec.strip()
        if text in LAYER_MAPPING_STRATEGIES:
            return layer_mapping(text, num_teacher_layers, num_student_layers)
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"layer_mapping={text!r} is neither a strategy ({', '.join(LAYER_MAPPING_STRATEGIES)}) "
                             f"nor valid JSON ({e.msg} at character {e.pos})") from None
        if isinstance(spec, str):
            return resolve_layer_mapping(spec, num_teacher_layers, num_student_layers, stack)
    if isinstance(spec, Mapping) and set(spec) & set(_STACKS):
        unknown = set(spec) - set(_STACKS)
        if unknown:
            raise ValueError(f"layer_mapping: a per-stack mapping may only have the keys 'encoder' and 'decoder', "
                             f"got {sorted(map(str, unknown))}")
        if stack not in spec:
            raise ValueError(f"layer_mapping: the per-stack mapping has no entry for the {stack}")
        return resolve_layer_mapping(spec[stack], num_teacher_layers, num_student_layers, stack)
    return _validate_explicit(spec, num_teacher_layers, num_student_layers, where)


# --------------------------------------------------------------------------------------------- model helpers
_DEPTH_ATTRIBUTES = {"encoder": ("encoder_layers", "num_layers"), "decoder": ("decoder_layers", "num_decoder_layers")}


def num_stack_layers(config, stack: str) -> int:
    """Number of layers of a seq2seq model's ``stack`` (``"encoder"``/``"decoder"``) from its config.

    Args:
        config: a transformers config (Marian/BART/mBART/M2M100: ``encoder_layers``/``decoder_layers``;
            T5: ``num_layers``/``num_decoder_layers``).
        stack: ``"encoder"`` or ``"decoder"``.
    """
    for name in _DEPTH_ATTRIBUTES[stack]:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"cannot tell the {stack} depth of {type(config).__name__} (looked for "
                     f"{_DEPTH_ATTRIBUTES[stack]})")


def hidden_size(config) -> int:
    """The model width (``d_model`` or ``hidden_size``) of a transformers config."""
    for name in ("d_model", "hidden_size"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"cannot tell the hidden size of {type(config).__name__}")


# ------------------------------------------------------------------------------------------------------ loss
def concat_teacher_layers(teacher_hidden_states: Sequence[torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """Concatenate the outputs of the given (1-based) teacher layers along the hidden axis.

    Args:
        teacher_hidden_states: the model's ``*_hidden_states`` tuple: entry 0 is the embedding output, entry ``l``
            layer ``l``'s output, each ``(batch, length, d_t)``.
        layers: 1-based teacher layers, in order.

    Returns:
        ``(batch, length, len(layers) * d_t)``.
    """
    return torch.cat([teacher_hidden_states[j] for j in layers], dim=-1)


def normalized_squared_error(projected_student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                             reduction: str = "sum", eps: float = 1e-8) -> torch.Tensor:
    """``|| s / ||s|| - t / ||t|| ||^2`` per position (Wu et al. 2020's CKD distance), in float32.

    Args:
        projected_student: ``(batch, length, D)``, the student's states after the projection.
        teacher: ``(batch, length, D)``, the concatenated teacher states (no gradient needed).
        mask: ``(batch, length)``, true/1 at positions that count; ``None``: all positions.
        reduction: ``"none"`` (``(batch, length)``, zero at masked positions), ``"sum"`` or ``"mean"`` (over the
            positions that count).
        eps: added to the norms (all-zero vectors).
    """
    if projected_student.shape != teacher.shape:
        raise ValueError(f"shape mismatch: projected student {tuple(projected_student.shape)} vs concatenated "
                         f"teacher {tuple(teacher.shape)}")
    s = F.normalize(projected_student.float(), dim=-1, eps=eps)
    t = F.normalize(teacher.detach().float(), dim=-1, eps=eps)
    per_token = (s - t).pow(2).sum(-1)
    if mask is not None:
        per_token = per_token.masked_fill(~mask.bool(), 0.0)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        count = mask.sum() if mask is not None else torch.tensor(per_token.numel(), device=per_token.device)
        return per_token.sum() / count.clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; use 'none', 'sum' or 'mean'")


class CombinatorialLayerLoss(nn.Module):
    """CKD for one stack (encoder or decoder): the projections ``W_i`` and the loss.

    Args:
        mapping: ``{student layer: [teacher layers]}``, 1-based (from :func:`resolve_layer_mapping`).
        student_hidden_size: the student's width ``d_s``.
        teacher_hidden_size: the teacher's width ``d_t``.

    Attributes:
        projections: ``nn.ModuleDict`` ``{"<student layer>": nn.Linear(d_s, k * d_t)}``, ``k`` the group's size.
    """

    def __init__(self, mapping: Mapping[int, Sequence[int]], student_hidden_size: int, teacher_hidden_size: int):
        super().__init__()
        self.mapping = {int(s): [int(t) for t in g] for s, g in mapping.items()}
        self.student_hidden_size = int(student_hidden_size)
        self.teacher_hidden_size = int(teacher_hidden_size)
        self.projections = nn.ModuleDict({
            str(s): nn.Linear(self.student_hidden_size, len(g) * self.teacher_hidden_size)
            for s, g in self.mapping.items()
        })

    def extra_repr(self) -> str:
        return f"mapping={self.mapping}"

    def forward(self, student_hidden_states: Sequence[torch.Tensor], teacher_hidden_states: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
        """The CKD loss summed over mapped layers.

        Args:
            student_hidden_states: the student's ``*_hidden_states`` (entry ``i`` = layer ``i``'s output).
            teacher_hidden_states: the teacher's, on the same inputs.
            mask: ``(batch, length)`` non-padding positions (source mask for the encoder, ``labels != -100`` for
                the decoder).
            reduction: ``"sum"`` over positions (the trainer divides by a token count), ``"mean"`` over the
                positions that count, or ``"none"`` (``(batch, length)``, summed over layers).
        """
        need_s, need_t = max(self.mapping) + 1, max(max(g) for g in self.mapping.values()) + 1
        if len(student_hidden_states) < need_s or len(teacher_hidden_states) < need_t:
            raise ValueError(f"CKD mapping {self.mapping} needs {need_s - 1} student and {need_t - 1} teacher layers, "
                             f"got hidden states for {len(student_hidden_states) - 1} and "
                             f"{len(teacher_hidden_states) - 1}")
        total = None
        for s, group in self.mapping.items():
            projection = self.projections[str(s)]
            student = student_hidden_states[s].to(projection.weight.dtype)
            loss = normalized_squared_error(projection(student), concat_teacher_layers(teacher_hidden_states, group),
                                            mask, reduction="none" if reduction == "mean" else reduction)
            total = loss if total is None else total + loss
        if reduction == "mean":
            count = mask.sum() if mask is not None else torch.tensor(total.numel(), device=total.device)
            return total.sum() / count.clamp(min=1)
        return total


def build_ckd_modules(student_config, teacher_config, layer_mapping_spec="regular_comb",
                      stacks: str = "encoder") -> nn.ModuleDict:
    """One :class:`CombinatorialLayerLoss` per distilled stack, sized from the two models' configs.

    Args:
        student_config: the student's transformers config.
        teacher_config: the teacher's.
        layer_mapping_spec: a strategy name or explicit mapping (see :func:`resolve_layer_mapping`).
        stacks: ``"encoder"``, ``"decoder"`` or ``"both"``.

    Returns:
        ``nn.ModuleDict`` with keys among ``"encoder"``, ``"decoder"``.
    """
    if stacks not in ("encoder", "decoder", "both"):
        raise ValueError(f"intermediate_layers={stacks!r}: use 'encoder', 'decoder' or 'both'")
    names = _STACKS if stacks == "both" else (stacks,)
    d_s, d_t = hidden_size(student_config), hidden_size(teacher_config)
    modules = {}
    for stack in names:
        mapping = resolve_layer_mapping(layer_mapping_spec, num_stack_layers(teacher_config, stack),
                                        num_stack_layers(student_config, stack), stack)
        modules[stack] = CombinatorialLayerLoss(mapping, d_s, d_t)
    return nn.ModuleDict(modules)
