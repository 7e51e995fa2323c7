"""Uplink compression: codec error bounds, exact bytes, and error feedback on a convex problem."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedspine.algorithms.compression import (
    QSGD,
    ErrorFeedback,
    FeedbackState,
    Int8,
    RandK,
    ScaledSign,
    TopK,
    UplinkChannel,
    make_codec,
    pack_bits,
    unpack_bits,
)
from fedspine.algorithms.wire import update_payload_bytes
from fedspine.config import load_config
from fedspine.errors import ConfigError
from fedspine.types import ClientUpdate
from tests.conftest import CONFIGS

SHAPES = [(37,), (8, 64), (64, 8), (3, 5, 7)]


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.01


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", SHAPES)
def test_bits_pack_and_unpack(shape: tuple[int, ...]) -> None:
    import numpy as np

    values = np.random.default_rng(0).integers(0, 32, size=math.prod(shape))
    assert (unpack_bits(pack_bits(values, 5), 5, values.size) == values).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_topk_keeps_the_largest_exactly_within_its_contraction(shape: tuple[int, ...]) -> None:
    x = _x(shape)
    _, y = TopK(0.2).roundtrip(x, _gen())
    k = math.ceil(0.2 * x.numel())
    assert y.shape == x.shape and int((y != 0).sum()) == k
    kept = y != 0
    assert torch.equal(y[kept], x[kept])
    assert x.abs()[~kept].max() <= x.abs()[kept].min()
    assert (y - x).norm() ** 2 <= (1 - k / x.numel()) * x.norm() ** 2 + 1e-12


def test_randk_keeps_random_coordinates_exactly_and_contracts_in_expectation() -> None:
    x = _x((40, 25))
    codec = RandK(0.1)
    errors = []
    for seed in range(200):
        _, y = codec.roundtrip(x, _gen(seed))
        kept = y != 0
        assert torch.equal(y[kept], x[kept]) and int(kept.sum()) == 100
        errors.append(float((y - x).norm() ** 2 / x.norm() ** 2))
    assert sum(errors) / len(errors) == pytest.approx(0.9, abs=0.01)


@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_sign_error_is_exactly_its_stated_value(shape: tuple[int, ...]) -> None:
    x = _x(shape)
    _, y = ScaledSign().roundtrip(x, _gen())
    d = x.numel()
    assert torch.equal(torch.sign(y), torch.sign(x))
    want = x.norm() ** 2 - x.abs().sum() ** 2 / d
    assert float((y - x).norm() ** 2) == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize("levels", [1, 4, 16, 255])
def test_qsgd_is_unbiased_and_each_coordinate_within_norm_over_s(levels: int) -> None:
    x = _x((30, 20))
    codec = QSGD(levels)
    mean = torch.zeros_like(x)
    draws = 400
    for seed in range(draws):
        _, y = codec.roundtrip(x, _gen(seed))
        assert (y - x).abs().max() < x.norm() / levels + 1e-6
        mean += y / draws
    assert (mean - x).norm() / x.norm() < 0.6 / math.sqrt(levels) + 0.02  # shrinks with the number of draws


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_is_within_half_a_step(shape: tuple[int, ...]) -> None:
    x = _x(shape)
    _, y = Int8().roundtrip(x, _gen())
    assert (y - x).abs().max() <= x.abs().max() / 254 + 1e-9


def _update(seed: int = 0) -> tuple[ClientUpdate, dict]:
    g = _gen(seed)
    start = {
        f"layer{i}": {"A": torch.randn(8, 1024, generator=g), "B": torch.zeros(768, 8)} for i in range(3)
    }
    trained = {
        m: {
            "A": f["A"] + 0.01 * torch.randn(8, 1024, generator=g),
            "B": 0.01 * torch.randn(768, 8, generator=g),
        }
        for m, f in start.items()
    }
    update = ClientUpdate(1, 3, 10, trained, 0, 0.0, 0, 0.0, lora_rank=8, lora_scaling=2.0)
    return update, start


@pytest.mark.parametrize("codec", ["topk", "randk", "sign", "qsgd", "int8"])
def test_reported_bytes_are_the_serialised_payload_and_it_suffices_to_decode(codec: str) -> None:
    update, start = _update()
    channel = UplinkChannel(ErrorFeedback(make_codec(codec, 0.1, 16), "ef21"))
    sent = channel.transmit(update, start, _gen())
    assert sent.wire is not None
    data = st_save(sent.wire)
    assert update_payload_bytes(sent) == len(data)
    # a server that has received nothing yet decodes the bytes alone to the same estimate
    received = st_load(data)
    state = FeedbackState()
    for module, factors in sent.lora_state.items():
        for name, value in factors.items():
            key = f"{module}/{name}"
            payload = {k.rsplit("/", 1)[1]: v for k, v in received.items() if k.rsplit("/", 1)[0] == key}
            estimate = channel.feedback.receive(state, key, payload)
            assert torch.allclose(start[module][name] + estimate, value)
    dense = update_payload_bytes(update)
    assert (
        update_payload_bytes(sent)
        < {"topk": 0.2, "randk": 0.12, "sign": 0.05, "qsgd": 0.22, "int8": 0.27}[codec] * dense
    )


def test_error_feedback_state_lives_on_across_rounds_and_restarts_on_a_new_shape() -> None:
    update, start = _update()
    channel = UplinkChannel(ErrorFeedback(TopK(0.05), "ef"))
    channel.transmit(update, start, _gen())
    error = channel.device_states[3].error["layer0/A"].clone()
    assert error.abs().sum() > 0
    channel.transmit(update, start, _gen())
    assert not torch.equal(channel.device_states[3].error["layer0/A"], error)
    state = FeedbackState()
    state.error["k"] = torch.ones(3)
    assert torch.equal(state.get(state.error, "k", torch.zeros(4)), torch.zeros(4))


# --- error feedback on a heterogeneous least-squares problem ------------------------------------


def _least_squares(rule: str, steps: int, gamma: float = 0.02) -> tuple[float, float]:
    """Distributed gradient descent with compressed gradients: ||grad f(x_T)|| and ||grad f(x_0)||.

    Ten clients, each with its own optimum (f_i = |A_i x - b_i|^2 / 2), top-10% compression. Top-k
    without feedback settles where the *compressed* gradients cancel, not at the optimum.
    """
    g = torch.Generator().manual_seed(0)
    d, m = 40, 30
    problems = []
    for i in range(10):
        a = torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(m)
        problems.append((a, a @ (torch.randn(d, generator=g, dtype=torch.float64) * 3 + i)))

    def grad(x: torch.Tensor) -> torch.Tensor:
        return sum((a.T @ (a @ x - b) for a, b in problems), torch.zeros(d, dtype=torch.float64)) / 10

    feedback = ErrorFeedback(TopK(0.1), rule, eta=0.2)  # type: ignore[arg-type]
    devices = [FeedbackState() for _ in problems]
    servers = [FeedbackState() for _ in problems]
    x = torch.zeros(d, dtype=torch.float64)
    for _ in range(steps):
        estimates = []
        for i, (a, b) in enumerate(problems):
            payload = feedback.send(devices[i], "x", (a.T @ (a @ x - b)).float(), _gen())
            estimates.append(feedback.receive(servers[i], "x", payload).double())
        x = x - gamma * torch.stack(estimates).mean(0)
    return float(grad(x).norm()), float(grad(torch.zeros(d, dtype=torch.float64)).norm())


@pytest.mark.slow  # thousands of compressed gradient steps (about 45 s)
def test_topk_without_feedback_stalls_while_ef_ef21_and_econtrol_converge() -> None:
    stalled, start = _least_squares("none", 3000)
    assert stalled > 0.3 * start
    for rule, bound in (("ef", 0.05), ("ef21", 1e-5), ("econtrol", 1e-5)):
        final, _ = _least_squares(rule, 3000)
        assert final < bound * start, rule
    assert _least_squares("ef", 3000)[0] < _least_squares("ef", 1000)[0]  # still descending


def test_compression_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"compression\.codec.*allowed values"):
        load_config(CONFIGS / "tiny.toml", ["compression.codec=zip"])
    with pytest.raises(ConfigError, match=r"compression\.ratio"):
        load_config(CONFIGS / "tiny.toml", ["compression.ratio=0"])


@pytest.mark.parametrize("strategy", ["fedit", "flora", "fedspine", "hetlora"])
def test_compressed_runs_work_with_each_strategy_and_send_fewer_bytes(tmp_path: Path, strategy: str) -> None:
    from fedspine.api import run_experiment

    base = [f"strategy.name={strategy}", "data.max_examples=600", "data.test_size=60", "train.local_steps=2"]
    base += ["scheduler.rounds=2", "export.save=false", "export.speed=false"]
    if strategy == "hetlora":
        base += ["lora.class_ranks.raspberry_pi_4=4"]
    plain = run_experiment(load_config(CONFIGS / "tiny.toml", base), tmp_path / "plain").summary
    compressed = run_experiment(
        load_config(CONFIGS / "tiny.toml", [*base, "compression.codec=sign", "compression.feedback=ef"]),
        tmp_path / "sign",
    ).summary
    assert compressed.tasks["ok"] == plain.tasks["ok"] > 0
    assert compressed.uplink_bytes < 0.5 * plain.uplink_bytes
