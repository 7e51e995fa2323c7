"""Importance of KV groups and MLP channels, measured on a device while it trains its (pruned) submodel.

Two scorers share one output format: per decoder layer, one float per KV group and one per MLP channel
of the model being trained (its kept units), higher meaning more important.

* :class:`TaylorMeter`, LoRA-guided first-order Taylor importance (LoRAPrune; LLM-Pruner's
  ``vectorize`` group form). The full-weight gradient is approximated from the adapter's gradients,
  ``G ~ s (dL/dB) A + s B (dL/dA)``, and a unit's score is ``|sum over its weights of (W + s B A) * G|``:
  the first-order change of the loss when the whole unit is removed. The sum over a row (or column)
  never materialises ``G``: for an output row ``j``,
  ``sum_i W'_ji G_ji = s * rowsum(gB * (W' A^T) + B * (W' gA^T))`` with ``W' = W + s B A``, which costs
  ``O(r * out * in)``, about ``r / tokens`` of a training step. Scores are averaged over the local steps.
* :class:`FlapMeter`, FLAP's forward-only WIFV score: for an input channel ``j`` of ``o_proj`` or
  ``down_proj``, ``Var(X_j) * ||W'_{:,j}||^2``. A KV group sums its heads' channels. The variance is
  over the batch's real tokens when :meth:`FlapMeter.set_mask` names them (padding would add the
  activations of pad tokens), else over every position.
* :class:`ActivationTaylorMeter`, the first-order Taylor importance of a unit's output for the loss,
  on a model with no adapter: for an input channel ``j`` of ``o_proj`` or ``down_proj``,
  ``|sum over tokens of X_j * dL/dX_j|`` per batch (the loss change when the channel is zeroed),
  summed over batches; a KV group sums its heads' channels. With bias compensation (a removed MLP
  channel replaced by its mean ``m_j``) the change is ``|sum (X_j - m_j) * dL/dX_j|``. Unlike FLAP it
  sees the labels: it is how a device tells which units matter for *its* task
  (``personalize.method = "mask"``).

Modules without a LoRA adapter contribute nothing to the Taylor score (they have no gradient to read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fedspine.errors import ModelError
from fedspine.model.lora import ADAPTER
from fedspine.model.pruning import ATTENTION_MODULES, COLUMN_MODULES, decoder_layers

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

Scores = tuple[list[Tensor], list[Tensor]]
"""``(head_scores, channel_scores)``: per layer, ``(kept_kv,)`` and ``(kept_channels,)`` float32."""

PreHook = Callable[[nn.Module, tuple[Tensor, ...]], None]
"""A forward pre-hook that watches a module's inputs (it changes nothing)."""


def _layer_widths(block: nn.Module, head_dim: int) -> tuple[int, int]:
    """``(kv groups, channels)`` a (possibly pruned) decoder block holds."""
    k_rows = _base_weight(block.get_submodule("self_attn.k_proj")).shape[0]
    return k_rows // head_dim, _base_weight(block.get_submodule("mlp.gate_proj")).shape[0]


def _base_weight(module: nn.Module) -> Tensor:
    """The weight of the frozen linear under a peft LoRA layer (or of the module itself)."""
    get = getattr(module, "get_base_layer", None)
    base = get() if callable(get) else module
    weight = base.weight
    if not isinstance(weight, Tensor):
        raise ModelError(f"{type(base).__name__} has no weight tensor")
    return weight


def _lora_parts(module: nn.Module, adapter: str) -> tuple[Tensor, Tensor, float] | None:
    """``(A, B, scaling)`` of the module's adapter, or None when it has none."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or adapter not in lora_a:
        return None
    return lora_a[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter])  # type: ignore[index,union-attr]


def _group(vector: Tensor, groups: int) -> Tensor:
    """Sums ``vector`` in ``groups`` equal consecutive blocks."""
    return vector.reshape(groups, -1).sum(dim=1)


class _Meter:
    """Shared walk over the blocks of the model being trained."""

    def __init__(self, model: nn.Module, head_dim: int, adapter: str = ADAPTER) -> None:
        self.blocks: list[nn.Module] = list(decoder_layers(_unwrap(model)))
        self.head_dim = head_dim
        self.adapter = adapter
        self.widths = [_layer_widths(block, head_dim) for block in self.blocks]
        self.head_sums = [torch.zeros(kv) for kv, _ in self.widths]
        self.channel_sums = [torch.zeros(ch) for _, ch in self.widths]
        self.steps = 0

    def _modules(self, block: nn.Module) -> dict[str, nn.Module]:
        attn, mlp = block.get_submodule("self_attn"), block.get_submodule("mlp")
        return {name: getattr(attn if name in ATTENTION_MODULES else mlp, name) for name in _ALL}

    def result(self) -> Scores:
        """Mean score per unit over the steps seen (zeros if none)."""
        n = max(self.steps, 1)
        return [h / n for h in self.head_sums], [c / n for c in self.channel_sums]


_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _unwrap(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class TaylorMeter(_Meter):
    """Call :meth:`after_backward` after each ``loss.backward()``; read :meth:`result` at the end."""

    @torch.no_grad()
    def after_backward(self) -> None:
        for index, block in enumerate(self.blocks):
            kv, _ = self.widths[index]
            sums = {name: self._signed_sum(name, module) for name, module in self._modules(block).items()}
            head = torch.zeros(kv)
            channel = torch.zeros_like(self.channel_sums[index])
            for name, value in sums.items():
                if value is None:
                    continue
                if name in ATTENTION_MODULES:
                    head += _group(value, kv)
                else:
                    channel += value
            self.head_sums[index] += head.abs()
            self.channel_sums[index] += channel.abs()
        self.steps += 1

    def _signed_sum(self, name: str, module: nn.Module) -> Tensor | None:
        """``sum (W + sBA) * G`` over each output row (row modules) or input column (o/down)."""
        parts = _lora_parts(module, self.adapter)
        if parts is None:
            return None
        a, b, s = parts
        if a.grad is None or b.grad is None:
            return None
        w = _base_weight(module).detach().float()
        ga, gb = a.grad.float(), b.grad.float()
        a, b = a.detach().float(), b.detach().float()
        if name in COLUMN_MODULES:
            # column i: s * sum_k [A_ki (gB^T W')_ki + gA_ki (B^T W')_ki],  W' = W + s B A
            gbt_w = gb.T @ w + s * (gb.T @ b) @ a  # (r, in)
            bt_w = b.T @ w + s * (b.T @ b) @ a  # (r, in)
            return (s * (a * gbt_w + ga * bt_w).sum(dim=0)).cpu()
        # row j: s * sum_k [gB_jk (W' A^T)_jk + B_jk (W' gA^T)_jk]
        w_at = w @ a.T + s * b @ (a @ a.T)  # (out, r)
        w_gat = w @ ga.T + s * b @ (a @ ga.T)  # (out, r)
        return (s * (gb * w_at + b * w_gat).sum(dim=1)).cpu()


class _InputHooks(_Meter):
    """A meter that watches the inputs of every block's ``o_proj`` and ``down_proj`` while it is entered
    (its ``_hook(layer, name)`` makes each forward pre-hook); the hooks are removed on exit."""

    def __init__(self, model: nn.Module, head_dim: int, adapter: str = ADAPTER) -> None:
        super().__init__(model, head_dim, adapter)
        self._handles: list[RemovableHandle] = []

    def _hook(self, index: int, name: str) -> PreHook:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for index, block in enumerate(self.blocks):
            for name in COLUMN_MODULES:
                module = self._modules(block)[name]
                self._handles.append(module.register_forward_pre_hook(self._hook(index, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class ActivationTaylorMeter(_InputHooks):
    """Use as a context manager around forward and backward passes of a plain model (its input
    embeddings are made to require gradients, so activations carry them with frozen weights); read
    :meth:`result` at the end."""

    def __init__(self, model: nn.Module, head_dim: int) -> None:
        super().__init__(model, head_dim)
        self._model = model
        self._sums: dict[tuple[int, str], list[tuple[Tensor, Tensor]]] = {}
        """Per (layer, module), per backward pass: the sums over tokens of ``X * dL/dX`` and of ``dL/dX``."""

    def __enter__(self) -> Self:
        self._model.enable_input_require_grads()  # type: ignore[operator]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        self._model.disable_input_require_grads()  # type: ignore[operator]
        super().__exit__(*exc)

    def _hook(self, index: int, name: str) -> PreHook:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            if not x.requires_grad:
                return
            kept = x.detach()

            def on_grad(grad: Tensor) -> None:
                width = kept.shape[-1]
                g = grad.float().reshape(-1, width)
                xg = (kept.float().reshape(-1, width) * g).sum(0).cpu()
                self._sums.setdefault((index, name), []).append((xg, g.sum(0).cpu()))

            x.register_hook(on_grad)

        return hook

    def result(self, channel_means: list[Tensor] | None = None) -> Scores:
        """Scores summed over the backward passes seen (zeros if none); with ``channel_means`` (per
        layer, each MLP channel's mean input) a channel's removal is scored as its replacement by that
        mean (bias compensation)."""
        heads, channels = [h.clone() for h in self.head_sums], [c.clone() for c in self.channel_sums]
        for (index, name), passes in self._sums.items():
            for xg, g in passes:
                if name == "down_proj":
                    mean = channel_means[index].float() if channel_means is not None else 0.0
                    channels[index] += (xg - mean * g).abs()
                else:
                    heads[index] += _group(xg.abs(), self.widths[index][0])
        return heads, channels


@dataclass
class _Moments:
    """What :class:`FlapMeter` sums of one module's inputs: the tokens counted, and per channel the
    sum and the sum of squares of the inputs (float64)."""

    count: int
    total: Tensor
    squares: Tensor


class FlapMeter(_InputHooks):
    """FLAP's WIFV: forward hooks collect input statistics of ``o_proj`` / ``down_proj``.

    Use as a context manager around training (hooks are removed on exit), then read :meth:`result`.
    """

    def __init__(self, model: nn.Module, head_dim: int, adapter: str = ADAPTER) -> None:
        super().__init__(model, head_dim, adapter)
        self._stats: dict[tuple[int, str], _Moments] = {}
        self._mask: Tensor | None = None

    def set_mask(self, attention_mask: Tensor | None) -> None:
        """The next forward pass's ``(B, T)`` attention mask: only positions where it is 1 are counted."""
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def before_forward(self, batch: object) -> None:
        """For :func:`~fedspine.client.train.train_local`: count the real tokens of ``batch`` only."""
        self.set_mask(getattr(batch, "attention_mask", None))

    def _hook(self, index: int, name: str) -> PreHook:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()  # (B*T, C)
            if self._mask is not None and self._mask.numel() == x.shape[0]:
                x = x[self._mask.to(x.device)]
            stats = self._stats.setdefault(
                (index, name), _Moments(0, torch.zeros(x.shape[1]), torch.zeros(x.shape[1]))
            )
            stats.count += x.shape[0]
            stats.total += x.sum(0).cpu().to(stats.total.dtype)
            stats.squares += x.pow(2).sum(0).cpu().to(stats.squares.dtype)

        return hook

    @torch.no_grad()
    def result(self) -> Scores:
        heads, channels = [], []
        for index, block in enumerate(self.blocks):
            kv, width = self.widths[index]
            modules = self._modules(block)
            scores = {}
            for name in COLUMN_MODULES:
                if (index, name) not in self._stats:
                    raise ModelError("FlapMeter saw no forward pass; wrap training in 'with meter:'")
                stats = self._stats[(index, name)]
                count, total, squares = stats.count, stats.total, stats.squares
                mean = total / count
                variance = (squares / count - mean.pow(2)).clamp_min(0.0)
                scores[name] = variance.float() * _effective_weight(modules[name], self.adapter).pow(2).sum(0)
            heads.append(_group(scores["o_proj"], kv))
            channels.append(scores["down_proj"].reshape(width))
        return heads, channels

    def channel_means(self) -> list[Tensor]:
        """Per layer, the mean input of every kept ``down_proj`` channel over the tokens counted (what
        bias compensation replaces a removed channel with)."""
        means = []
        for index in range(len(self.blocks)):
            if (index, "down_proj") not in self._stats:
                raise ModelError("FlapMeter saw no forward pass; wrap training in 'with meter:'")
            stats = self._stats[(index, "down_proj")]
            means.append((stats.total / stats.count).float())
        return means


def _effective_weight(module: nn.Module, adapter: str) -> Tensor:
    """``W + s B A`` of a (possibly adapted) linear, fp32 on the CPU."""
    w = _base_weight(module).detach().float()
    parts = _lora_parts(module, adapter)
    if parts is not None:
        a, b, s = parts
        w = w + s * b.detach().float() @ a.detach().float()
    return w.cpu()


def make_meter(kind: str, model: nn.Module, head_dim: int) -> TaylorMeter | FlapMeter | None:
    """The device-side meter for an importance ``kind`` (``magnitude`` needs none: the server computes it)."""
    if kind == "taylor":
        return TaylorMeter(model, head_dim)
    if kind == "flap":
        return FlapMeter(model, head_dim)
    if kind == "magnitude":
        return None
    raise ModelError(f"unknown importance '{kind}'; expected taylor, flap or magnitude")


__all__ = ["FlapMeter", "Scores", "TaylorMeter", "make_meter"]
