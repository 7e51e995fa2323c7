"""Per-(round, device) random factors, drawn deterministically from (seed, round, device_id).

Every draw builds its own ``random.Random`` from a string key such as ``"slowdown:7:3:12"``. Python seeds
a ``Random`` from a ``str`` through SHA-512 of its bytes, which is stable across processes (unlike
``hash``, which is salted for ``str``), so a factor depends on nothing but its key: no global RNG state,
no dependence on the order in which devices or rounds are visited. Each kind of draw has its own stream
name, so slowdown, uplink and downlink rates and availability are independent of each other.
"""

from __future__ import annotations

import random

from fedspine.fleet.cost import Direction
from fedspine.types import Device


def _rng(stream: str, seed: int, round: int, device_id: int) -> random.Random:
    """A generator private to one (stream, seed, round, device) draw."""
    return random.Random(f"{stream}:{seed}:{round}:{device_id}")


def _check_scale(jitter_scale: float) -> None:
    if jitter_scale < 0:
        raise ValueError(f"jitter_scale must be >= 0, got {jitter_scale}")


def compute_slowdown(device: Device, seed: int, round: int, jitter_scale: float = 1.0) -> float:
    """Per-round compute slowdown of a device (thermal throttling, background load).

    Lognormal with ``s = device_class.slowdown_sigma * jitter_scale``, normalised to **mean one**:
    ``exp(s * z - s**2 / 2)`` with ``z ~ N(0, 1)``. Mean one keeps the expected training time equal to the
    cost model's nominal time, so the catalog's MFU stays the average a device reaches; the median is
    slightly below one. ``jitter_scale = 0`` gives exactly 1.0.

    Args:
        device: the fleet member.
        seed: run seed.
        round: round (or task) index the draw belongs to.
        jitter_scale: global multiplier of every class's sigma; 0 disables compute jitter.

    Returns:
        A positive multiplier for :meth:`CostModel.train_seconds`.
    """
    _check_scale(jitter_scale)
    sigma = device.device_class.slowdown_sigma * jitter_scale
    rng = _rng("slowdown", seed, round, device.device_id)
    return rng.lognormvariate(-0.5 * sigma * sigma, sigma)


def link_rate_factor(
    device: Device, seed: int, round: int, direction: Direction, jitter_scale: float = 1.0
) -> float:
    """Per-round multiplier of a device's link rate, uniform in ``[1 - j, 1 + j]``.

    ``j = network.rate_jitter * jitter_scale``; up- and downlink draws are independent.

    Args:
        device: the fleet member.
        seed: run seed.
        round: round (or task) index the draw belongs to.
        direction: ``"up"`` or ``"down"``.
        jitter_scale: global multiplier of every link's jitter; 0 disables link jitter.

    Raises:
        ValueError: ``j >= 1`` (the rate could reach zero) or a negative ``jitter_scale``.
    """
    _check_scale(jitter_scale)
    half_width = device.network.rate_jitter * jitter_scale
    if half_width >= 1:
        raise ValueError(f"rate jitter {half_width} must be < 1 (rate would reach zero)")
    rng = _rng(f"link_{direction}", seed, round, device.device_id)
    return rng.uniform(1.0 - half_width, 1.0 + half_width)


def is_available(device: Device, seed: int, round: int) -> bool:
    """Whether a device is online in a round: Bernoulli(``device.availability``)."""
    return _rng("available", seed, round, device.device_id).random() < device.availability
