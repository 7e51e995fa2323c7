"""FedIT's aggregation math, hierarchical aggregation, and the payload byte counts."""

from __future__ import annotations

import pytest
import torch

from fedspine.algorithms.aggregate import aggregate
from fedspine.algorithms.strategies import FedIT
from fedspine.algorithms.wire import decode_state, encode_state, payload_bytes
from fedspine.types import ClientUpdate, LoraState


def _state(gen: torch.Generator, rank: int = 4) -> LoraState:
    return {
        "layers.0.q_proj": {
            "A": torch.randn(rank, 16, generator=gen),
            "B": torch.randn(12, rank, generator=gen),
        },
        "layers.0.v_proj": {
            "A": torch.randn(rank, 16, generator=gen),
            "B": torch.randn(8, rank, generator=gen),
        },
    }


def _update(state: LoraState, samples: int, device: int = 0) -> ClientUpdate:
    return ClientUpdate(1, device, samples, state, 0, 0.0, 0, 0.0)


def _updates(n: int, seed: int = 0) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    return [_update(_state(gen), samples=10 * (i + 1), device=i) for i in range(n)]


def test_fedit_is_the_sample_weighted_mean_of_a_and_b() -> None:
    updates = _updates(3)
    strategy = FedIT()
    strategy.init_global(updates[0].lora_state)
    aggregate(strategy, updates)
    weights = torch.tensor([10.0, 20.0, 30.0]) / 60.0
    for module in ("layers.0.q_proj", "layers.0.v_proj"):
        for factor in ("A", "B"):
            expected = sum(w * u.lora_state[module][factor] for w, u in zip(weights, updates, strict=True))
            torch.testing.assert_close(strategy.global_lora()[module][factor], expected)


def test_uniform_weighting_ignores_sample_counts() -> None:
    updates = _updates(2)
    strategy = FedIT(weighting="uniform")
    strategy.init_global(updates[0].lora_state)
    aggregate(strategy, updates)
    expected = (
        updates[0].lora_state["layers.0.q_proj"]["A"] + updates[1].lora_state["layers.0.q_proj"]["A"]
    ) / 2
    torch.testing.assert_close(strategy.global_lora()["layers.0.q_proj"]["A"], expected)


def test_fedit_product_differs_from_the_mean_of_products() -> None:
    """(sum p B)(sum p A) != sum p B A: the aggregation error exact methods (FLoRA) remove."""
    updates = _updates(2)
    strategy = FedIT(weighting="uniform")
    strategy.init_global(updates[0].lora_state)
    aggregate(strategy, updates)
    g = strategy.global_lora()["layers.0.q_proj"]
    mean_of_products = (
        sum(u.lora_state["layers.0.q_proj"]["B"] @ u.lora_state["layers.0.q_proj"]["A"] for u in updates) / 2
    )
    gap = (g["B"] @ g["A"] - mean_of_products).norm() / mean_of_products.norm()
    assert gap > 0.1


@pytest.mark.parametrize("fan_in", [2, 3, 4])
def test_aggregation_tree_equals_flat(fan_in: int) -> None:
    updates = _updates(9, seed=1)
    flat, tree = FedIT(), FedIT()
    for s in (flat, tree):
        s.init_global(updates[0].lora_state)
    aggregate(flat, updates)
    aggregate(tree, updates, fan_in=fan_in)
    for module, factors in flat.global_lora().items():
        for name, tensor in factors.items():
            torch.testing.assert_close(tree.global_lora()[module][name], tensor, rtol=1e-6, atol=1e-6)


def test_no_updates_leaves_the_global_state_unchanged() -> None:
    (update,) = _updates(1)
    strategy = FedIT()
    strategy.init_global(update.lora_state)
    before = {m: {k: t.clone() for k, t in f.items()} for m, f in strategy.global_lora().items()}
    aggregate(strategy, [])
    torch.testing.assert_close(strategy.global_lora(), before)


def test_payload_bytes_is_the_serialised_length_and_round_trips() -> None:
    (update,) = _updates(1)
    payload = encode_state(update.lora_state)
    assert payload_bytes(update.lora_state) == len(payload)
    numel = sum(t.numel() for f in update.lora_state.values() for t in f.values())
    assert numel * 4 < len(payload) < numel * 4 + 1024  # fp32 data plus a small header
    torch.testing.assert_close(decode_state(payload), update.lora_state)
