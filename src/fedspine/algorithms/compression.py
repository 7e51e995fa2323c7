"""Uplink compression: codecs, and error feedback with state kept on each device across rounds.

Specification: algorithms.md §6. A device compresses, per LoRA factor, the *change* its training made
to the adapter it started from (``x = trained - start``: for FedIT the warm-started factors' delta, for
FLoRA and FedSpine the fresh adapter's delta from its initialisation, which the server generated and
knows). The server decodes and reconstructs ``start + estimate``; the strategies aggregate that as
usual.

Codecs (each turns one tensor into a small dict of tensors, its *payload*; what travels is the
safetensors serialisation of every payload, so byte counts are those of real bytes, header included):

===========  ===================================================  ===================================
codec        payload                                              error bound (tested)
===========  ===================================================  ===================================
``topk``     shape, indices (int16 when ``d <= 2^15``, else int32)   ``|C(x) - x|^2 <= (1 - k/d) |x|^2``
             and fp32 values of the ``k = ceil(ratio d)`` largest
             magnitudes
``randk``    shape, an int64 seed (the indices are regenerated    kept entries exact; in expectation
             from it), fp32 values of ``k`` random coordinates    ``(1 - k/d) |x|^2``
``sign``     shape, ``|x|_1 / d`` (fp32), sign bits packed 8 per  ``|C(x) - x|^2 = |x|^2 - |x|_1^2 / d``
             byte
``qsgd``     shape, ``|x|_2`` (fp32), per coordinate a sign bit   unbiased; per coordinate
             and a level in ``0..s`` packed in                    ``|C(x)_j - x_j| < |x|_2 / s``
             ``ceil(log2(s + 1))`` bits
``int8``     shape, absmax scale (fp32), int8 values              ``|C(x)_j - x_j| <= absmax / 254``
===========  ===================================================  ===================================

Error feedback (``x`` the device's change this round; ``C`` encode then decode):

* ``none``: send ``m = C(x)``; the server uses ``m``.
* ``ef`` (EF14/EF-SGD): ``p = x + e``, send ``m = C(p)``, keep ``e = p - m``; the server uses ``m``.
* ``ef21``: send ``m = C(x - h)``, ``h += m`` on the device and in the server's copy of ``h``; the
  server uses ``h``.
* ``econtrol`` (Gao, Islamov, Stich, 2024): send ``m = C(eta e + x - h)``, ``e += x - h - m``,
  ``h += m`` (both sides); the server uses ``h``. ``eta = 0`` is EF21; a test on a heterogeneous
  least-squares problem checks that this form converges where plain top-k does not.

State is per device and per tensor; when a tensor's shape changes (a HetLoRA rank shrink, a FedSpine
device on a different mask) its state starts again from zero on both sides, which both can tell from
the shape in the payload.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from fedspine.algorithms.lora_math import cut_to
from fedspine.types import ClientUpdate, LoraState

Payload = dict[str, torch.Tensor]
CodecName = Literal["none", "topk", "randk", "sign", "qsgd", "int8"]
FeedbackName = Literal["none", "ef", "ef21", "econtrol"]


def _shape(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(x.shape), dtype=torch.int32)


def pack_bits(values: np.ndarray, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` into a uint8 tensor, ``bits`` per value."""
    values = values.astype(np.uint32)
    matrix = (values[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return torch.from_numpy(np.packbits(matrix.astype(np.uint8).ravel()))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` for ``count`` values."""
    flat = np.unpackbits(packed.numpy(), count=count * bits).reshape(count, bits).astype(np.int64)
    return (flat << np.arange(bits)).sum(axis=1)


class Codec(ABC):
    """Turns a tensor into a payload of tensors and back."""

    name = ""

    @abstractmethod
    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        """Compress ``x`` (any shape, float)."""

    @abstractmethod
    def decode(self, payload: Payload) -> torch.Tensor:
        """The fp32 tensor the server reconstructs."""

    def roundtrip(self, x: torch.Tensor, generator: torch.Generator) -> tuple[Payload, torch.Tensor]:
        """Encode and decode (what the device must know of what the server will see)."""
        payload = self.encode(x, generator)
        return payload, self.decode(payload)


class Identity(Codec):
    """No compression: the fp32 tensor itself."""

    name = "none"

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        return {"values": x.detach().to(torch.float32).contiguous()}

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload["values"]


@dataclass
class TopK(Codec):
    """The ``ceil(ratio * d)`` largest-magnitude coordinates."""

    ratio: float
    name = "topk"

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        flat = x.detach().reshape(-1).to(torch.float32)
        k = max(1, math.ceil(self.ratio * flat.numel()))
        index = flat.abs().topk(k, sorted=False).indices.sort().values
        dtype = torch.int16 if flat.numel() <= 2**15 else torch.int32  # 2 bytes per index when they fit
        return {"shape": _shape(x), "index": index.to(dtype), "values": flat[index].contiguous()}

    def decode(self, payload: Payload) -> torch.Tensor:
        shape = [int(s) for s in payload["shape"]]
        out = torch.zeros(math.prod(shape), dtype=torch.float32)
        out[payload["index"].long()] = payload["values"]
        return out.reshape(shape)


@dataclass
class RandK(Codec):
    """``ceil(ratio * d)`` coordinates drawn at random; only the seed and the values travel."""

    ratio: float
    name = "randk"

    @staticmethod
    def _index(seed: int, d: int, k: int) -> torch.Tensor:
        return torch.randperm(d, generator=torch.Generator().manual_seed(seed))[:k].sort().values

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        flat = x.detach().reshape(-1).to(torch.float32)
        k = max(1, math.ceil(self.ratio * flat.numel()))
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        index = self._index(seed, flat.numel(), k)
        return {"shape": _shape(x), "seed": torch.tensor([seed]), "values": flat[index].contiguous()}

    def decode(self, payload: Payload) -> torch.Tensor:
        shape = [int(s) for s in payload["shape"]]
        d, k = math.prod(shape), payload["values"].numel()
        out = torch.zeros(d, dtype=torch.float32)
        out[self._index(int(payload["seed"][0]), d, k)] = payload["values"]
        return out.reshape(shape)


class ScaledSign(Codec):
    """``(|x|_1 / d) sign(x)``: one bit per coordinate and one scale."""

    name = "sign"

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        flat = x.detach().reshape(-1).to(torch.float32)
        scale = flat.abs().mean().reshape(1)
        return {"shape": _shape(x), "scale": scale, "signs": pack_bits((flat >= 0).numpy(), 1)}

    def decode(self, payload: Payload) -> torch.Tensor:
        shape = [int(s) for s in payload["shape"]]
        positive = unpack_bits(payload["signs"], 1, math.prod(shape))
        signs = torch.from_numpy(positive * 2.0 - 1.0).to(torch.float32)
        return (signs * payload["scale"]).reshape(shape)


@dataclass
class QSGD(Codec):
    """QSGD with ``s`` levels: ``|x|_2 sign(x_j) xi_j / s``, ``xi_j`` rounded stochastically (unbiased)."""

    levels: int
    name = "qsgd"

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.levels + 1)))

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        flat = x.detach().reshape(-1).to(torch.float32)
        norm = flat.norm().reshape(1)
        scaled = flat.abs() / norm.clamp_min(1e-30) * self.levels
        lower = scaled.floor()
        level = lower + (torch.rand(flat.shape, generator=generator) < (scaled - lower)).float()
        return {
            "shape": _shape(x),
            "norm": norm,
            "signs": pack_bits((flat >= 0).numpy(), 1),
            "levels": pack_bits(level.to(torch.int64).numpy(), self.bits),
        }

    def decode(self, payload: Payload) -> torch.Tensor:
        shape = [int(s) for s in payload["shape"]]
        d = math.prod(shape)
        signs = unpack_bits(payload["signs"], 1, d) * 2.0 - 1.0
        levels = unpack_bits(payload["levels"], self.bits, d)
        values = torch.from_numpy(signs * levels).to(torch.float32) * payload["norm"] / self.levels
        return values.reshape(shape)


class Int8(Codec):
    """Symmetric int8 quantisation with one absmax scale per tensor (round to nearest)."""

    name = "int8"

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        flat = x.detach().reshape(-1).to(torch.float32)
        scale = (flat.abs().max() / 127).clamp_min(1e-30).reshape(1)
        values = (flat / scale).round().clamp(-127, 127).to(torch.int8)
        return {"shape": _shape(x), "scale": scale, "values": values}

    def decode(self, payload: Payload) -> torch.Tensor:
        shape = [int(s) for s in payload["shape"]]
        return (payload["values"].to(torch.float32) * payload["scale"]).reshape(shape)


def make_codec(name: str, ratio: float = 0.1, levels: int = 16) -> Codec:
    """The codec called ``name``."""
    if name == "none":
        return Identity()
    if name == "topk":
        return TopK(ratio)
    if name == "randk":
        return RandK(ratio)
    if name == "sign":
        return ScaledSign()
    if name == "qsgd":
        return QSGD(levels)
    if name == "int8":
        return Int8()
    raise ValueError(f"unknown codec {name!r}; allowed: none, topk, randk, sign, qsgd, int8")


@dataclass
class FeedbackState:
    """One side's error-feedback memory, per tensor key: the error ``e`` and the estimate ``h``."""

    error: dict[str, torch.Tensor] = field(default_factory=dict)
    estimate: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, table: dict[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
        """The stored tensor, or zeros when absent or shaped differently (the state restarts)."""
        value = table.get(key)
        return value if value is not None and value.shape == like.shape else torch.zeros_like(like)


@dataclass
class ErrorFeedback:
    """A codec with an error-feedback rule; ``device`` and ``server`` states live across rounds."""

    codec: Codec
    rule: FeedbackName = "none"
    eta: float = 0.2

    def send(self, state: FeedbackState, key: str, x: torch.Tensor, generator: torch.Generator) -> Payload:
        """Device side: the payload for change ``x`` of tensor ``key``; updates the device's state."""
        x = x.detach().to(torch.float32)
        if self.rule == "none":
            return self.codec.encode(x, generator)
        if self.rule == "ef":
            p = x + state.get(state.error, key, x)
            payload, m = self.codec.roundtrip(p, generator)
            state.error[key] = p - m
            return payload
        h = state.get(state.estimate, key, x)
        if self.rule == "ef21":
            payload, m = self.codec.roundtrip(x - h, generator)
        else:  # econtrol
            e = state.get(state.error, key, x)
            payload, m = self.codec.roundtrip(self.eta * e + x - h, generator)
            state.error[key] = e + x - h - m
        state.estimate[key] = h + m
        return payload

    def receive(self, state: FeedbackState, key: str, payload: Payload) -> torch.Tensor:
        """Server side: the estimate of the device's change; updates the server's copy of ``h``."""
        m = self.codec.decode(payload)
        if self.rule in ("none", "ef"):
            return m
        h = state.get(state.estimate, key, m) + m
        state.estimate[key] = h
        return h


class UplinkChannel:
    """Compressed uploads of every device, with both sides' error-feedback states.

    ``transmit`` plays the device (compress the change of each factor, keep its state) and the server
    (decode, keep its copy of the estimates, reconstruct ``start + estimate``) for one update.
    """

    def __init__(self, feedback: ErrorFeedback) -> None:
        self.feedback = feedback
        self.device_states: dict[int, FeedbackState] = {}
        self.server_states: dict[int, FeedbackState] = {}

    def transmit(self, update: ClientUpdate, start: LoraState, generator: torch.Generator) -> ClientUpdate:
        """The update as the server receives it: ``wire`` holds the payload, ``lora_state`` the estimate."""
        device = self.device_states.setdefault(update.device_id, FeedbackState())
        return self.receive(
            dataclasses.replace(update, wire=self.send(device, update, start, generator)), start
        )

    def send(
        self, device: FeedbackState, update: ClientUpdate, start: LoraState, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Device side: the payload of every factor's change against ``start``; updates ``device``."""
        wire: dict[str, torch.Tensor] = {}
        for module, factors in update.lora_state.items():
            for name, value in factors.items():
                key = f"{module}/{name}"
                payload = self.feedback.send(
                    device, key, value.float() - cut_to(start[module][name], value), generator
                )
                wire.update({f"{key}/{part}": tensor for part, tensor in payload.items()})
        return wire

    def receive(self, update: ClientUpdate, start: LoraState) -> ClientUpdate:
        """Server side: decode ``update.wire`` into ``start + estimate`` (keeps the server's estimates)."""
        assert update.wire is not None, "receive needs a compressed update"
        server = self.server_states.setdefault(update.device_id, FeedbackState())
        payloads: dict[str, dict[str, torch.Tensor]] = {}
        for wire_key, tensor in update.wire.items():
            key, _, part = wire_key.rpartition("/")
            payloads.setdefault(key, {})[part] = tensor
        received: LoraState = {}
        for key, payload in payloads.items():
            module, _, name = key.rpartition("/")
            estimate = self.feedback.receive(server, key, payload)
            received.setdefault(module, {})[name] = cut_to(start[module][name], estimate) + estimate
        return dataclasses.replace(update, lora_state=received)
