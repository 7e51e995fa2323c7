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

The server reads a payload only after :meth:`Codec.check` has passed: the claimed shape fits the
factor the device was sent (so decoding never allocates more than that factor), and every part has the
dtype and count that shape implies (top-k indices inside it, packed bits of the right length, finite
scales). A payload that fails is rejected before any state changes.

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


FLOATS = (torch.float32,)
INDICES = (torch.int16, torch.int32)


def _shape(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(x.shape), dtype=torch.int32)


def _dims(payload: Payload) -> list[int]:
    return [int(s) for s in payload["shape"]]


def _sparse_values(payload: Payload, d: int) -> int:
    """How many fp32 values a sparse payload of ``d`` entries carries (1..d), or ValueError."""
    k = payload["values"].numel()
    if not 1 <= k <= d:
        raise ValueError(f"{k} values for {d} entries")
    _expect(payload, "values", FLOATS, k)
    return k


def _expect(payload: Payload, part: str, dtypes: tuple[torch.dtype, ...], count: int) -> torch.Tensor:
    """``payload[part]`` if it is a vector (or, for the fp32 factors, any shape) of ``count`` entries of
    one of ``dtypes``, with finite values when floating point."""
    tensor = payload[part]
    if tensor.dtype not in dtypes:
        raise ValueError(f"{part} is {tensor.dtype}, expected {' or '.join(map(str, dtypes))}")
    if tensor.numel() != count:
        raise ValueError(f"{part} has {tensor.numel()} entries, expected {count}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{part} has NaN or Inf entries")
    return tensor


def pack_bits(values: np.ndarray, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` into a uint8 tensor, ``bits`` per value."""
    values = values.astype(np.uint32)
    matrix = (values[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return torch.from_numpy(np.packbits(matrix.astype(np.uint8).ravel()))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` for ``count`` values."""
    flat = np.unpackbits(packed.numpy(), count=count * bits).reshape(count, bits).astype(np.int64)
    values: np.ndarray = (flat << np.arange(bits)).sum(axis=1)
    return values


class Codec(ABC):
    """Turns a tensor into a payload of tensors and back."""

    name = ""
    parts: tuple[str, ...] = ("shape",)
    """The payload's keys."""

    def dims(self, payload: Payload) -> list[int]:
        """The shape the payload claims (two positive numbers for a LoRA factor), or ValueError."""
        shape = payload.get("shape")
        if shape is None or shape.dtype != torch.int32 or tuple(shape.shape) != (2,):
            raise ValueError("the shape must be two int32 numbers")
        return _dims(payload)

    def check(self, payload: Payload, d: int) -> None:
        """Raise ValueError unless ``payload`` is one this codec could have made of ``d`` entries."""
        if set(payload) != set(self.parts):
            raise ValueError(f"payload parts {sorted(payload)}, expected {sorted(self.parts)}")

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
    parts = ("values",)

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        return {"values": x.detach().to(torch.float32).contiguous()}

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload["values"]

    def dims(self, payload: Payload) -> list[int]:
        values = payload.get("values")
        if values is None or values.dim() != 2:
            raise ValueError("the values must be a matrix")
        return list(values.shape)

    def check(self, payload: Payload, d: int) -> None:
        super().check(payload, d)
        _expect(payload, "values", FLOATS, d)


@dataclass
class TopK(Codec):
    """The ``ceil(ratio * d)`` largest-magnitude coordinates."""

    ratio: float
    name = "topk"
    parts = ("shape", "index", "values")

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        flat = x.detach().reshape(-1).to(torch.float32)
        k = max(1, math.ceil(self.ratio * flat.numel()))
        index = flat.abs().topk(k, sorted=False).indices.sort().values
        dtype = torch.int16 if flat.numel() <= 2**15 else torch.int32  # 2 bytes per index when they fit
        return {"shape": _shape(x), "index": index.to(dtype), "values": flat[index].contiguous()}

    def decode(self, payload: Payload) -> torch.Tensor:
        shape = _dims(payload)
        out = torch.zeros(math.prod(shape), dtype=torch.float32)
        out[payload["index"].long()] = payload["values"]
        return out.reshape(shape)

    def check(self, payload: Payload, d: int) -> None:
        super().check(payload, d)
        k = _sparse_values(payload, d)
        index = _expect(payload, "index", INDICES, k)
        if bool((index < 0).any()) or bool((index >= d).any()):
            raise ValueError(f"index outside 0..{d - 1}")


@dataclass
class RandK(Codec):
    """``ceil(ratio * d)`` coordinates drawn at random; only the seed and the values travel."""

    ratio: float
    name = "randk"
    parts = ("shape", "seed", "values")

    @staticmethod
    def _index(seed: int, d: int, k: int) -> torch.Tensor:
        return torch.randperm(d, generator=torch.Generator().manual_seed(seed))[:k].sort().values

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        flat = x.detach().reshape(-1).to(torch.float32)
        k = max(1, math.ceil(self.ratio * flat.numel()))
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        index = self._index(seed, flat.numel(), k)
        return {"shape": _shape(x), "seed": torch.tensor([seed]), "values": flat[index].contiguous()}

    def check(self, payload: Payload, d: int) -> None:
        super().check(payload, d)
        _sparse_values(payload, d)
        _expect(payload, "seed", (torch.int64,), 1)

    def decode(self, payload: Payload) -> torch.Tensor:
        shape = _dims(payload)
        d, k = math.prod(shape), payload["values"].numel()
        out = torch.zeros(d, dtype=torch.float32)
        out[self._index(int(payload["seed"][0]), d, k)] = payload["values"]
        return out.reshape(shape)


class ScaledSign(Codec):
    """``(|x|_1 / d) sign(x)``: one bit per coordinate and one scale."""

    name = "sign"
    parts = ("shape", "scale", "signs")

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        flat = x.detach().reshape(-1).to(torch.float32)
        scale = flat.abs().mean().reshape(1)
        return {"shape": _shape(x), "scale": scale, "signs": pack_bits((flat >= 0).numpy(), 1)}

    def check(self, payload: Payload, d: int) -> None:
        super().check(payload, d)
        _expect(payload, "scale", FLOATS, 1)
        _expect(payload, "signs", (torch.uint8,), math.ceil(d / 8))

    def decode(self, payload: Payload) -> torch.Tensor:
        shape = _dims(payload)
        positive = unpack_bits(payload["signs"], 1, math.prod(shape))
        signs = torch.from_numpy(positive * 2.0 - 1.0).to(torch.float32)
        return (signs * payload["scale"]).reshape(shape)


@dataclass
class QSGD(Codec):
    """QSGD with ``s`` levels: ``|x|_2 sign(x_j) xi_j / s``, ``xi_j`` rounded stochastically (unbiased)."""

    levels: int
    name = "qsgd"
    parts = ("shape", "norm", "signs", "levels")

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

    def check(self, payload: Payload, d: int) -> None:
        super().check(payload, d)
        _expect(payload, "norm", FLOATS, 1)
        _expect(payload, "signs", (torch.uint8,), math.ceil(d / 8))
        _expect(payload, "levels", (torch.uint8,), math.ceil(d * self.bits / 8))

    def decode(self, payload: Payload) -> torch.Tensor:
        shape = _dims(payload)
        d = math.prod(shape)
        signs = unpack_bits(payload["signs"], 1, d) * 2.0 - 1.0
        levels = unpack_bits(payload["levels"], self.bits, d).clip(0, self.levels)
        values = torch.from_numpy(signs * levels).to(torch.float32) * payload["norm"] / self.levels
        return values.reshape(shape)


class Int8(Codec):
    """Symmetric int8 quantisation with one absmax scale per tensor (round to nearest)."""

    name = "int8"
    parts = ("shape", "scale", "values")

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Payload:
        flat = x.detach().reshape(-1).to(torch.float32)
        scale = (flat.abs().max() / 127).clamp_min(1e-30).reshape(1)
        values = (flat / scale).round().clamp(-127, 127).to(torch.int8)
        return {"shape": _shape(x), "scale": scale, "values": values}

    def check(self, payload: Payload, d: int) -> None:
        super().check(payload, d)
        _expect(payload, "scale", FLOATS, 1)
        _expect(payload, "values", (torch.int8,), d)

    def decode(self, payload: Payload) -> torch.Tensor:
        shape = _dims(payload)
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
        """Server side: decode ``update.wire`` into ``start + estimate`` (keeps the server's estimates).

        Raises:
            ValueError: the payload is not one the codec could have made of the factors in ``start``
                (see :meth:`check`); the server's estimates are unchanged.
        """
        assert update.wire is not None, "receive needs a compressed update"
        payloads = self.check(update.wire, start)
        server = self.server_states.setdefault(update.device_id, FeedbackState())
        received: LoraState = {}
        for key, payload in payloads.items():
            module, _, name = key.rpartition("/")
            estimate = self.feedback.receive(server, key, payload)
            received.setdefault(module, {})[name] = cut_to(start[module][name], estimate) + estimate
        return dataclasses.replace(update, lora_state=received)

    def check(self, wire: dict[str, torch.Tensor], start: LoraState) -> dict[str, Payload]:
        """``wire`` split into one payload per factor of ``start``, each checked by the codec.

        Every factor of ``start`` has exactly one payload, and its claimed shape is 2-D and no larger
        than the factor the device was sent in either dimension (a device may lower its rank).
        """
        payloads: dict[str, Payload] = {}
        for wire_key, tensor in wire.items():
            key, _, part = wire_key.rpartition("/")
            payloads.setdefault(key, {})[part] = tensor
        expected = {f"{module}/{name}": f[name] for module, f in start.items() for name in ("A", "B")}
        if payloads.keys() != expected.keys():
            unknown = sorted(set(payloads) - set(expected))[:3]
            missing = sorted(set(expected) - set(payloads))[:3]
            raise ValueError(
                f"compressed factors differ from the task's (unexpected {unknown}, missing {missing})"
            )
        for key, payload in payloads.items():
            sent = expected[key].shape
            codec = self.feedback.codec
            try:
                dims = codec.dims(payload)
                if not all(1 <= n <= limit for n, limit in zip(dims, sent, strict=True)):
                    raise ValueError(f"shape {dims} does not fit the factor sent, {list(sent)}")
                codec.check(payload, math.prod(dims))
            except ValueError as error:
                raise ValueError(f"{key}: {error}") from error
        return payloads
