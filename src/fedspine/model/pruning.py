"""Structured width pruning of Llama-family models: whole KV groups and MLP channels (algorithms.md §1.4, §9).

A **KV group** is one key/value head together with the ``heads // kv_heads`` query heads that read it; groups
are pruned whole, so every pruned layer keeps the model's group size and grouped-query attention stays valid.
An **MLP channel** is one row of ``gate_proj`` and ``up_proj`` plus the matching column of ``down_proj``.

Pipeline: scores (one float per group / channel; :func:`magnitude_scores` here, Taylor or FLAP-WIFV later)
-> :func:`plan_from_scores` (uniform top-(1-ratio) per layer, nested across ratios) -> :func:`prune_model`
(physical slicing) or :func:`masked_model` (same function, dense shapes). :func:`index_maps` and
:func:`scatter_to_full` move LoRA factors trained on a pruned model back to full coordinates.

The pruned model is a plain ``LlamaForCausalLM`` whose attention reshapes with ``-1`` heads, so no
module attribute changes are needed; its config still describes the dense model (see :func:`prune_model`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from fedspine.errors import ModelError
from fedspine.model.footprint import ModelShape, combine_workloads, model_shape, train_workload
from fedspine.model.layerwise_llama import LayerwiseLlamaConfig, LayerwiseLlamaForCausalLM
from fedspine.types import LoraState, TrainWorkload

ROW_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
"""Modules pruned along their output rows (``weight`` dim 0)."""
COLUMN_MODULES = ("o_proj", "down_proj")
"""Modules pruned along their input columns (``weight`` dim 1)."""
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")

ModuleT = TypeVar("ModuleT", bound=nn.Module)
"""A model type that pruning keeps (a pruned Hugging Face model is still one)."""


@dataclass(frozen=True)
class LayerKeep:
    """What one decoder layer keeps.

    Attributes:
        kv_groups: kept KV-head indices, sorted; each brings its ``heads // kv_heads`` query heads.
        channels: kept MLP intermediate channels, sorted.
    """

    kv_groups: tuple[int, ...]
    channels: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("kv_groups", "channels"):
            kept = getattr(self, name)
            if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0:
                raise ModelError(f"LayerKeep.{name} must be non-empty, sorted, unique and >= 0, got {kept}")


PruningPlan = dict[int, LayerKeep]
"""Layer index -> what it keeps; layers absent from the plan stay dense."""


# --------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------


def kept_count(full: int, ratio: float, multiple: int = 1) -> int:
    """How many of ``full`` units survive pruning ``ratio`` of them.

    Rounds ``(1 - ratio) * full`` to the nearest multiple of ``multiple`` (halves up), then clamps to
    ``[min(multiple, full), full]``. Ratio 0 keeps ``full`` even when it is not a multiple.
    """
    if ratio == 0.0:
        return full
    rounded = multiple * math.floor((1.0 - ratio) * full / multiple + 0.5)
    return min(max(rounded, multiple, 1), full)


def top_indices(scores: Tensor, count: int) -> tuple[int, ...]:
    """The ``count`` highest-scoring indices of a 1-D ``scores``, sorted ascending.

    Ties break by index (a stable sort), so the result for a smaller ``count`` is always a subset of the
    result for a larger one: this is what makes masks nested.
    """
    order = torch.argsort(-scores.detach().float().cpu(), stable=True)
    return tuple(sorted(int(i) for i in order[:count]))


AUTO_DENSE_MIN_LAYERS = 10
"""Models with fewer layers get no automatic dense layers (nothing was measured there)."""


def plan_like(
    plan: PruningPlan, head_scores: Sequence[Tensor], channel_scores: Sequence[Tensor]
) -> PruningPlan:
    """A plan that keeps as many KV groups and MLP channels in every layer as ``plan`` does (the same
    widths, the same dense layers), chosen by other scores: a device's own units at its budget."""
    return {
        layer: LayerKeep(
            kv_groups=top_indices(head_scores[layer], len(keep.kv_groups)),
            channels=top_indices(channel_scores[layer], len(keep.channels)),
        )
        for layer, keep in plan.items()
    }


def dense_layer_indices(setting: Sequence[int] | str, layers: int) -> tuple[int, ...]:
    """The layers ``strategy.fedspine.dense_layers`` leaves dense in a model of ``layers`` layers.

    ``"auto"``: the first ``layers // 10`` layers and the last one, for models of at least
    :data:`AUTO_DENSE_MIN_LAYERS` layers (SmolLM2-135M's 30: 0, 1, 2 and 29), none below. Pruning them
    costs a small model most (LLM-Pruner keeps LLaMA's first and last layers for the same reason); on
    SmolLM2 keeping them takes the held-out LM loss of 30% channel pruning from 8.45 to 7.09 with bias
    compensation (``bench/pruning_recovery.py``). A list is taken as it is (negative: from the end).
    """
    if isinstance(setting, str):
        if layers < AUTO_DENSE_MIN_LAYERS:
            return ()
        return (*range(layers // 10), layers - 1)
    return tuple(index % layers for index in setting)


def plan_from_scores(
    head_scores: Sequence[Tensor],
    channel_scores: Sequence[Tensor],
    ratio: float,
    dense_layers: Sequence[int] = (),
    multiple: int = 1,
) -> PruningPlan:
    """Keeps the top ``1 - ratio`` KV groups and MLP channels of every prunable layer (uniform per layer).

    Args:
        head_scores: per layer, a ``(kv_heads,)`` importance per KV group (higher = keep).
        channel_scores: per layer, an ``(intermediate,)`` importance per MLP channel.
        ratio: fraction of groups and channels to remove, in ``[0, 1]``; at least one of each survives.
        dense_layers: layers left out of the plan (dense); negative indices count from the end.
        multiple: kept channel counts are rounded to a multiple of this (hardware-friendly widths).

    Returns:
        A plan with one entry per layer not in ``dense_layers``. For the same scores, a smaller ratio's
        kept sets contain a larger ratio's kept sets.

    Raises:
        ModelError: inconsistent lengths, ratio outside [0, 1], or multiple < 1.
    """
    layers = len(head_scores)
    if len(channel_scores) != layers:
        raise ModelError(f"{layers} layers of head scores but {len(channel_scores)} of channel scores")
    if not 0.0 <= ratio <= 1.0 or multiple < 1:
        raise ModelError(f"need 0 <= ratio <= 1 and multiple >= 1, got ratio={ratio}, multiple={multiple}")
    dense = {index % layers for index in dense_layers} if layers else set()
    plan: PruningPlan = {}
    for layer in range(layers):
        if layer in dense:
            continue
        heads, channels = head_scores[layer], channel_scores[layer]
        plan[layer] = LayerKeep(
            kv_groups=top_indices(heads, kept_count(heads.numel(), ratio)),
            channels=top_indices(channels, kept_count(channels.numel(), ratio, multiple)),
        )
    return plan


# --------------------------------------------------------------------------------------------------
# Importance scores
# --------------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{type(model).__name__} has no model.layers; expected a Llama-family causal LM")
    return layers


def shape_of(model: nn.Module) -> ModelShape:
    """The :class:`ModelShape` of a Hugging Face model, read from its config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__} has no Hugging Face config")
    return model_shape(config)


def magnitude_scores(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Weight-magnitude importance: the L2 norm of all weights a KV group / MLP channel owns.

    A KV group owns its q rows (``group_size * head_dim``), k and v rows (``head_dim``) and the matching
    o_proj columns; a channel owns a gate and an up row and a down column. Data-free; a placeholder for the
    Taylor / FLAP-WIFV scores of §9 that share this output format.

    Returns:
        ``(head_scores, channel_scores)``: per layer, ``(kv_heads,)`` and ``(intermediate,)`` float32.
    """
    shape = shape_of(model)
    head_scores, channel_scores = [], []
    layer: Any  # a decoder block; its submodules are typed Tensor | Module by torch
    for layer in decoder_layers(model):
        head_scores.append(_group_sq_norms(layer.self_attn, shape).sqrt())
        channel_scores.append(_channel_sq_norms(layer.mlp).sqrt())
    return head_scores, channel_scores


def _group_sq_norms(attn: nn.Module, shape: ModelShape) -> Tensor:
    """Squared L2 norm per KV group of q/k/v rows and o columns, ``(kv_heads,)``."""
    total = torch.zeros(shape.kv_heads)
    for name in ATTENTION_MODULES:
        weight = _weight(attn, name).detach().float()
        rows = weight.T if name == "o_proj" else weight  # (out_features_of_group_axis, hidden)
        total += rows.reshape(shape.kv_heads, -1).pow(2).sum(dim=1)
    return total


def _channel_sq_norms(mlp: nn.Module) -> Tensor:
    """Squared L2 norm per MLP channel of gate/up rows and the down column, ``(intermediate,)``."""
    gate, up, down = (_weight(mlp, name).detach().float() for name in MLP_MODULES)
    return gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)


def _weight(parent: nn.Module, name: str) -> Tensor:
    weight = getattr(parent, name).weight
    assert isinstance(weight, Tensor)
    return weight


# --------------------------------------------------------------------------------------------------
# Index maps
# --------------------------------------------------------------------------------------------------


def layer_index_map(keep: LayerKeep | None, shape: ModelShape) -> dict[str, Tensor]:
    """Kept output rows (q/k/v/gate/up) or input columns (o/down) of one layer, as int64 index tensors.

    ``keep=None`` means a dense layer: every index.
    """
    group_size = shape.heads // shape.kv_heads
    groups = range(shape.kv_heads) if keep is None else keep.kv_groups
    channels = torch.arange(shape.intermediate) if keep is None else torch.tensor(keep.channels)
    kv_rows = _units_to_rows(list(groups), shape.head_dim)  # (kept_kv * head_dim,)
    query_heads = [g * group_size + j for g in groups for j in range(group_size)]
    q_rows = _units_to_rows(query_heads, shape.head_dim)  # (kept_kv * group_size * head_dim,)
    maps = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows, "o_proj": q_rows}
    return maps | {"gate_proj": channels, "up_proj": channels, "down_proj": channels}


def _units_to_rows(units: list[int], width: int) -> Tensor:
    """Rows ``[u * width, (u + 1) * width)`` of every unit ``u``, concatenated in order."""
    base = torch.tensor(units, dtype=torch.long).unsqueeze(1) * width
    return (base + torch.arange(width)).flatten()


def index_maps(plan: PruningPlan, shape: ModelShape) -> dict[int, dict[str, Tensor]]:
    """Per layer (all of them; dense ones map every index), per module name, the kept indices.

    Rows of ``q_proj/k_proj/v_proj/gate_proj/up_proj`` weights, columns of ``o_proj/down_proj`` weights.
    """
    return {layer: layer_index_map(plan.get(layer), shape) for layer in range(shape.layers)}


MODULE_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
"""A decoder module's name: its layer and projection (``model.layers.3.mlp.down_proj``)."""


def lora_between(
    state: LoraState, plan: PruningPlan, shape: ModelShape, to: Literal["full", "kept"]
) -> LoraState:
    """LoRA factors trained on the submodel ``plan`` describes, moved to the dense model's coordinates
    (``"full"``: zero on removed units) or back (``"kept"``). Only A and B are carried."""
    moved: LoraState = {}
    sizes = {proj: index.numel() for proj, index in layer_index_map(None, shape).items()}
    for name, entry in state.items():
        a, b = entry["A"], entry["B"]
        match = MODULE_NAME.search(name)
        keep = plan.get(int(match.group(1))) if match else None
        if keep is not None and match is not None:
            proj = match.group(2)
            index = layer_index_map(keep, shape)[proj]
            dim = 1 if proj in COLUMN_MODULES else 0
            factor = a if dim == 1 else b
            if to == "full":
                factor = scatter_to_full(factor, index, sizes[proj], dim)
            else:
                factor = gather_kept(factor, index, dim)
            a, b = (factor, b) if dim == 1 else (a, factor)
        moved[name] = {"A": a, "B": b}
    return moved


def lora_in_full(
    state: LoraState, plan: PruningPlan | None, shape: ModelShape
) -> tuple[LoraState, LoraState]:
    """``state`` (trained on ``plan``'s submodel; None: the dense model) in the dense model's
    coordinates, and beside it 1 where an entry was trained, 0 where the plan removed it."""
    if plan is None:
        return state, {m: {k: torch.ones_like(t) for k, t in e.items()} for m, e in state.items()}
    ones = {m: {"A": torch.ones_like(e["A"]), "B": torch.ones_like(e["B"])} for m, e in state.items()}
    return lora_between(state, plan, shape, "full"), lora_between(ones, plan, shape, "full")


def scatter_to_full(pruned: Tensor, index: Tensor, full_size: int, dim: int = 0) -> Tensor:
    """Places ``pruned`` at ``index`` along ``dim`` of a new zero tensor with ``full_size`` entries there.

    E.g. a LoRA B ``(kept_out, r)`` with ``dim=0`` -> ``(full_out, r)``; a LoRA A ``(r, kept_in)`` with
    ``dim=1`` -> ``(r, full_in)``.
    """
    if pruned.shape[dim] != index.numel():
        raise ModelError(f"tensor has {pruned.shape[dim]} entries along dim {dim}, index has {index.numel()}")
    size = list(pruned.shape)
    size[dim] = full_size
    full = pruned.new_zeros(size)
    return full.index_copy(dim, index.to(pruned.device), pruned)


def gather_kept(full: Tensor, index: Tensor, dim: int = 0) -> Tensor:
    """The inverse of :func:`scatter_to_full`: the entries of ``full`` at ``index`` along ``dim``."""
    return full.index_select(dim, index.to(full.device))


# --------------------------------------------------------------------------------------------------
# Pruned and masked models
# --------------------------------------------------------------------------------------------------


def prune_model(
    model: ModuleT,
    plan: PruningPlan,
    inplace: bool = False,
    channel_means: Sequence[Tensor] | None = None,
) -> ModuleT:
    """``model`` (a deep copy unless ``inplace``) with the pruned KV groups and MLP channels removed.

    Slices q/k/v/gate/up output rows (and biases) and o/down input columns; ``in_features`` and
    ``out_features`` follow. Attention reshapes to ``(..., -1, head_dim)`` and the group size is unchanged,
    so no attention attribute needs updating. Each pruned attention module gets informational
    ``num_attention_heads`` / ``num_key_value_heads`` attributes. ``model.config`` still describes the dense
    model, so ``save_pretrained`` output does not reload with plain ``from_pretrained``.

    Args:
        model: a Llama-family causal LM (untouched unless ``inplace``).
        plan: what each layer keeps.
        inplace: slice ``model`` itself instead of a copy.
        channel_means: per layer, the mean input of every ``down_proj`` channel (full coordinates);
            given, each removed channel's mean output is added to ``down_proj``'s bias (FLAP's bias
            compensation, :func:`compensate_removed_channels`).

    Returns:
        The pruned model.
    """
    shape = shape_of(model)
    model = model if inplace else copy.deepcopy(model)
    if channel_means is not None:
        compensate_removed_channels(model, plan, channel_means)
    pruned = _apply_to_linears(model, plan, _slice_linear, inplace=True)
    layers = decoder_layers(pruned)
    for layer, keep in plan.items():
        attn: Any = layers[layer].self_attn
        attn.num_key_value_heads = len(keep.kv_groups)
        attn.num_attention_heads = len(keep.kv_groups) * (shape.heads // shape.kv_heads)
    return pruned


def compensation_bias(down_weight: Tensor, channels: Sequence[int], means: Tensor) -> Tensor:
    """``W_down[:, removed] @ mean[removed]`` in float32, for a layer that keeps ``channels``."""
    removed = torch.ones(down_weight.shape[1], dtype=torch.bool)
    removed[list(channels)] = False
    removed = removed.to(down_weight.device)
    with torch.no_grad():
        return down_weight[:, removed].float() @ means.to(down_weight.device)[removed].float()


def compensate_removed_channels(model: nn.Module, plan: PruningPlan, channel_means: Sequence[Tensor]) -> None:
    """Add ``W_down[:, removed] @ mean[removed]`` to ``down_proj``'s bias in each layer of ``plan``, in place.

    Over the tokens the means came from, the MLP's mean output is then unchanged by removing the
    channels (FLAP's baseline bias compensation); what is lost is only their variation around the mean,
    which FLAP's score (variance times the column's squared norm) ranks.

    Raises:
        ModelError: a layer's means do not have one entry per MLP channel.
    """
    layers = decoder_layers(model)
    for layer, keep in plan.items():
        block: Any = layers[layer]
        down: Any = block.mlp.down_proj
        means = channel_means[layer]
        if means.shape != (down.weight.shape[1],):
            raise ModelError(
                f"layer {layer}: {tuple(means.shape)} channel means for {down.weight.shape[1]} channels"
            )
        bias = compensation_bias(down.weight, keep.channels, means)
        with torch.no_grad():
            if down.bias is not None:
                bias += down.bias.float()
        down.bias = nn.Parameter(bias.to(down.weight.dtype), requires_grad=False)


def _apply_to_linears(
    model: ModuleT, plan: PruningPlan, edit: Callable[[nn.Linear, Tensor, int], None], inplace: bool = False
) -> ModuleT:
    """``model`` (or a deep copy) with ``edit(linear, kept_index, dim)`` applied to each planned linear."""
    shape = shape_of(model)
    edited = model if inplace else copy.deepcopy(model)
    layers = decoder_layers(edited)
    for layer, keep in plan.items():
        block: Any = layers[layer]
        for name, index in layer_index_map(keep, shape).items():
            parent = block.self_attn if name in ATTENTION_MODULES else block.mlp
            edit(getattr(parent, name), index, 1 if name in COLUMN_MODULES else 0)
    return edited


def _slice_linear(linear: nn.Linear, index: Tensor, dim: int) -> None:
    """Keeps ``index`` rows (``dim=0``, with the bias) or columns (``dim=1``) of ``linear`` in place."""
    weight = linear.weight
    index = index.to(weight.device)
    linear.weight = nn.Parameter(weight.detach().index_select(dim, index).clone(), weight.requires_grad)
    if dim == 0:
        linear.out_features = index.numel()
        if linear.bias is not None:
            bias = linear.bias
            linear.bias = nn.Parameter(bias.detach().index_select(0, index).clone(), bias.requires_grad)
    else:
        linear.in_features = index.numel()


def masked_model(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """A deep copy of ``model`` with pruned rows/columns (and biases) zeroed instead of removed.

    Same function as :func:`prune_model`: a zeroed KV group has zero values (its heads output zero whatever
    their now-uniform attention) and zero o_proj columns; a zeroed channel has ``silu(0) * 0 = 0``
    activation and a zero down column.
    """
    return _apply_to_linears(model, plan, _zero_outside)


@torch.no_grad()
def _zero_outside(linear: nn.Linear, index: Tensor, dim: int) -> None:
    """Zeroes every row (``dim=0``, and bias entry) or column (``dim=1``) of ``linear`` not in ``index``."""
    drop = torch.ones(linear.weight.shape[dim], dtype=torch.bool)
    drop[index] = False
    dropped = drop.nonzero().flatten().to(linear.weight.device)
    linear.weight.index_fill_(dim, dropped, 0.0)
    if dim == 0 and linear.bias is not None:
        linear.bias.index_fill_(0, dropped, 0.0)


# --------------------------------------------------------------------------------------------------
# Widths, shapes and export
# --------------------------------------------------------------------------------------------------


def layer_widths(plan: PruningPlan, shape: ModelShape) -> list[tuple[int, int]]:
    """Per layer, ``(kept KV groups, kept MLP channels)``; dense layers keep everything."""
    widths = []
    for layer in range(shape.layers):
        keep = plan.get(layer)
        widths.append(
            (shape.kv_heads, shape.intermediate)
            if keep is None
            else (len(keep.kv_groups), len(keep.channels))
        )
    return widths


def pruned_shapes(plan: PruningPlan, shape: ModelShape) -> list[tuple[ModelShape, float]]:
    """The pruned model as ``(uniform shape, fraction of layers)`` parts.

    Every cost in :mod:`fedspine.model.footprint` is a per-layer sum plus per-model terms (embeddings, LM
    head), so the cost of a model whose layers differ is the fraction-weighted sum of the costs of uniform
    models, one per distinct layer width: exact, not an approximation.
    """
    group_size = shape.heads // shape.kv_heads
    counts: dict[tuple[int, int], int] = {}
    for widths in layer_widths(plan, shape):
        counts[widths] = counts.get(widths, 0) + 1
    return [
        (
            dataclasses.replace(shape, kv_heads=kv, heads=kv * group_size, intermediate=channels),
            count / shape.layers,
        )
        for (kv, channels), count in sorted(counts.items())
    ]


def pruned_workload(plan: PruningPlan | None, shape: ModelShape, **workload: Any) -> TrainWorkload:
    """``footprint.train_workload`` of the submodel ``plan`` describes (the dense model for None)."""
    parts = [(shape, 1.0)] if plan is None else pruned_shapes(plan, shape)
    return combine_workloads([(train_workload(part, **workload), fraction) for part, fraction in parts])


LAYERWISE_MODULE = "layerwise_llama"
"""Module name of a saved model's own code when its layers differ in width."""
_NOT_CARRIED = ("model_type", "architectures", "auto_map", "transformers_version")
"""Config fields a :class:`LayerwiseLlamaConfig` sets itself (or ``save_pretrained`` writes)."""


def pruned_hf_config(
    hf_config: PretrainedConfig, plan: PruningPlan, mlp_bias: bool = False
) -> PretrainedConfig:
    """A config describing the pruned model, for ``save_pretrained``; ``mlp_bias`` for a model whose MLPs
    carry biases (bias compensation: see :func:`add_zero_mlp_biases`).

    A plan that keeps every layer at one width gets a copy of ``hf_config`` (a stock Llama config). A plan
    with dense layers gets a :class:`~fedspine.model.layerwise_llama.LayerwiseLlamaConfig` listing each
    layer's widths, whose ``auto_map`` names the classes that load it; the saved directory then needs
    their source beside the weights (:func:`write_model_code`) and loads with ``trust_remote_code=True``.
    """
    shape = model_shape(hf_config)
    widths = layer_widths(plan, shape)
    mlp_bias = mlp_bias or bool(getattr(hf_config, "mlp_bias", False))
    if len(set(widths)) > 1:
        fields = {k: v for k, v in hf_config.to_dict().items() if k not in _NOT_CARRIED}
        config = LayerwiseLlamaConfig(layer_widths=[list(w) for w in widths], **fields)
        config.head_dim = shape.head_dim
        config.mlp_bias = mlp_bias
        config.auto_map = {
            "AutoConfig": f"{LAYERWISE_MODULE}.{LayerwiseLlamaConfig.__name__}",
            "AutoModelForCausalLM": f"{LAYERWISE_MODULE}.{LayerwiseLlamaForCausalLM.__name__}",
        }
        return config
    ((kv, channels),) = set(widths)
    same = copy.deepcopy(hf_config)
    same.num_key_value_heads = kv
    same.num_attention_heads = kv * (shape.heads // shape.kv_heads)
    same.intermediate_size = channels
    same.head_dim = shape.head_dim
    same.mlp_bias = mlp_bias
    return same


def write_model_code(config: PretrainedConfig, directory: Path) -> None:
    """Put the source a config's ``auto_map`` names into ``directory`` (nothing for a stock config)."""
    if isinstance(config, LayerwiseLlamaConfig):
        shutil.copyfile(inspect.getfile(LayerwiseLlamaConfig), directory / f"{LAYERWISE_MODULE}.py")


def add_zero_mlp_biases(model: nn.Module) -> None:
    """Give every MLP projection without a bias a zero one, in place: a Llama config with ``mlp_bias``
    expects biases on gate, up and down alike, and would initialise missing ones at random."""
    for layer in decoder_layers(model):
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear: Any = getattr(layer.mlp, name)
            if linear.bias is None:
                linear.bias = nn.Parameter(
                    torch.zeros(linear.out_features, dtype=linear.weight.dtype), requires_grad=False
                )


def plan_to_json(plan: PruningPlan) -> dict[str, dict[str, list[int]]]:
    """A JSON-ready form of ``plan`` (layer keys as strings)."""
    return {
        str(layer): {"kv_groups": list(k.kv_groups), "channels": list(k.channels)}
        for layer, k in plan.items()
    }


__all__ = [
    "AUTO_DENSE_MIN_LAYERS",
    "COLUMN_MODULES",
    "LAYERWISE_MODULE",
    "MODULE_NAME",
    "ROW_MODULES",
    "LayerKeep",
    "PruningPlan",
    "add_zero_mlp_biases",
    "compensate_removed_channels",
    "compensation_bias",
    "decoder_layers",
    "dense_layer_indices",
    "gather_kept",
    "index_maps",
    "kept_count",
    "layer_index_map",
    "layer_widths",
    "lora_between",
    "magnitude_scores",
    "masked_model",
    "plan_from_scores",
    "plan_to_json",
    "prune_model",
    "pruned_hf_config",
    "pruned_shapes",
    "pruned_workload",
    "scatter_to_full",
    "shape_of",
    "top_indices",
    "write_model_code",
]
