"""Aggregation math of every strategy: exactness of stacking, the zero-padding gap, trees equal flat
aggregation, HetLoRA's self-pruning, FlexLoRA's SVD redistribution, and payload byte counts."""

from __future__ import annotations

import pytest
import torch

from fedspine.algorithms.aggregate import aggregate
from fedspine.algorithms.lora_math import lowrank_svd, pad_rank, self_pruned_rank, stack_factors
from fedspine.algorithms.strategies import STRATEGIES, FedIT, FlexLoRA, FLoRA, HetLoRA, Strategy, ZeroPad
from fedspine.algorithms.wire import decode_state, encode_state, payload_bytes
from fedspine.types import ClientUpdate, DeviceLora

SHAPES = {"layers.0.q_proj": (12, 16), "layers.0.v_proj": (8, 16)}


def _update(gen: torch.Generator, rank: int, alpha: float, samples: int, device: int) -> ClientUpdate:
    state = {
        m: {"A": torch.randn(rank, i, generator=gen), "B": torch.randn(o, rank, generator=gen)}
        for m, (o, i) in SHAPES.items()
    }
    return ClientUpdate(1, device, samples, state, 0, 0.0, 0, 0.0, lora_rank=rank, lora_scaling=alpha / rank)


def _updates(ranks: list[int], alphas: list[float], seed: int = 0) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    return [
        _update(gen, r, a, samples=10 * (i + 1), device=i)
        for i, (r, a) in enumerate(zip(ranks, alphas, strict=True))
    ]


def _exact(updates: list[ClientUpdate], module: str) -> torch.Tensor:
    total = sum(u.num_samples for u in updates)
    return sum(
        u.num_samples / total * u.lora_scaling * u.lora_state[module]["B"] @ u.lora_state[module]["A"]
        for u in updates
    )


def _start(strategy: Strategy, rank: int) -> Strategy:
    strategy.init_global(SHAPES, rank, torch.Generator().manual_seed(0))
    return strategy


def _global_deltas(strategy: Strategy) -> dict[str, torch.Tensor]:
    """The aggregated weight update per module: merged into the base (FLoRA) or the global adapter."""
    delta = strategy.take_base_delta()
    if delta is not None:
        return delta
    return {m: g["B"] @ g["A"] for m, g in strategy.global_lora().items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flora_merged_update_equals_the_weighted_sum_of_products(seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    ranks = torch.randint(1, 33, (6,), generator=gen).tolist()
    alphas = (torch.rand(6, generator=gen) * 64 + 1).tolist()
    updates = _updates(ranks, alphas, seed)
    strategy = _start(FLoRA(), max(ranks))
    aggregate(strategy, updates)
    delta = strategy.take_base_delta()
    assert delta is not None
    for module in SHAPES:
        exact = _exact(updates, module)
        assert (delta[module] - exact).norm() / exact.norm() < 1e-5
    assert strategy.take_base_delta() is None  # merged once


def test_zero_padding_differs_from_the_exact_update() -> None:
    updates = _updates([16, 8, 4, 4], [32.0, 16.0, 8.0, 8.0])
    strategy = _start(ZeroPad(), 16)
    aggregate(strategy, updates)
    for module in SHAPES:
        exact = _exact(updates, module)
        gap = (_global_deltas(strategy)[module] - exact).norm() / exact.norm()
        assert gap > 0.3  # cross terms: (sum p B)(sum p A) != sum p B A


def test_fedit_is_the_sample_weighted_mean_of_a_and_scaled_b() -> None:
    updates = _updates([4, 4, 4], [8.0, 8.0, 8.0])
    strategy = _start(FedIT(), 4)
    aggregate(strategy, updates)
    weights = [10 / 60, 20 / 60, 30 / 60]
    for module in SHAPES:
        g = strategy.global_lora()[module]
        a = sum(w * u.lora_state[module]["A"] for w, u in zip(weights, updates, strict=True))
        b = sum(w * 2.0 * u.lora_state[module]["B"] for w, u in zip(weights, updates, strict=True))
        torch.testing.assert_close(g["A"], a)
        torch.testing.assert_close(g["B"], b)


@pytest.mark.parametrize("fan_in", [0, 2])
def test_zero_padding_averages_the_padded_factors_without_touching_the_updates(fan_in: int) -> None:
    updates = _updates([8, 2, 4, 8, 1], [16.0, 2.0, 8.0, 4.0, 3.0])
    before = [{m: {k: t.clone() for k, t in f.items()} for m, f in u.lora_state.items()} for u in updates]
    strategy = _start(ZeroPad(), 8)
    aggregate(strategy, updates, fan_in=fan_in)
    total = sum(u.num_samples for u in updates)
    for module in SHAPES:
        padded = [pad_rank(u.lora_state[module]["A"], u.lora_state[module]["B"], 8) for u in updates]
        a = sum(u.num_samples / total * pa for u, (pa, _) in zip(updates, padded, strict=True))
        b = sum(
            u.num_samples / total * u.lora_scaling * pb for u, (_, pb) in zip(updates, padded, strict=True)
        )
        torch.testing.assert_close(strategy.global_lora()[module]["A"], a)
        torch.testing.assert_close(strategy.global_lora()[module]["B"], b)
    for u, state in zip(updates, before, strict=True):  # sums are accumulated in place, never in an update
        torch.testing.assert_close(u.lora_state, state, rtol=0, atol=0)


def test_an_update_above_the_global_rank_is_rejected() -> None:
    strategy = _start(ZeroPad(), 4)
    with pytest.raises(ValueError, match="cannot pad rank 8 down to 4"):
        aggregate(strategy, _updates([4, 8], [4.0, 8.0]))


def test_uniform_weighting_ignores_sample_counts() -> None:
    updates = _updates([4, 4], [4.0, 4.0])
    strategy = _start(FedIT(weighting="uniform"), 4)
    aggregate(strategy, updates)
    expected = (
        updates[0].lora_state["layers.0.q_proj"]["A"] + updates[1].lora_state["layers.0.q_proj"]["A"]
    ) / 2
    torch.testing.assert_close(strategy.global_lora()["layers.0.q_proj"]["A"], expected)


@pytest.mark.parametrize("name", ["fedit", "zeropad", "hetlora", "flexlora", "flora"])
@pytest.mark.parametrize("fan_in", [2, 3])
def test_a_two_level_tree_equals_flat_aggregation(name: str, fan_in: int) -> None:
    ranks = [8] * 7 if name == "fedit" else [8, 4, 4, 2, 8, 2, 4]
    updates = _updates(ranks, [2.0 * r for r in ranks], seed=3)
    flat, tree = (_start(STRATEGIES.get(name, "strategy.name")(), 8) for _ in range(2))
    aggregate(flat, updates)
    aggregate(tree, updates, fan_in=fan_in)
    flat_deltas, tree_deltas = _global_deltas(flat), _global_deltas(tree)
    for module in SHAPES:
        a, b = flat_deltas[module], tree_deltas[module]
        assert (a - b).norm() / a.norm() < 1e-5


def test_an_empty_round_keeps_the_global_state() -> None:
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name, "strategy.name")
        if cls.prunes:
            continue  # built from a Llama model's masks; tested in test_fedspine.py
        strategy = _start(cls(), 4)
        before = {m: {k: t.clone() for k, t in f.items()} for m, f in strategy.global_lora().items()}
        aggregate(strategy, [])
        torch.testing.assert_close(strategy.global_lora(), before)
        assert strategy.take_base_delta() is None


def test_devices_receive_their_rank_in_their_own_scaling() -> None:
    updates = _updates([8, 4], [16.0, 4.0])
    strategy = _start(ZeroPad(), 8)
    aggregate(strategy, updates)
    lora = DeviceLora(rank=4, scaling=0.5)
    dispatch = strategy.configure(2, 1, lora, torch.Generator().manual_seed(0))
    g = strategy.global_lora()["layers.0.q_proj"]
    got = dispatch.lora_state["layers.0.q_proj"]
    torch.testing.assert_close(lora.scaling * got["B"] @ got["A"], g["B"][:, :4] @ g["A"][:4])
    assert dispatch.downlink_bytes == payload_bytes(dispatch.lora_state)


def test_flexlora_keeps_the_best_rank_r_factorisation_and_slices_it() -> None:
    updates = _updates([4, 4, 2], [8.0, 8.0, 4.0])
    strategy = _start(FlexLoRA(), 10)  # >= sum of ranks: the global adapter is exact
    aggregate(strategy, updates)
    for module in SHAPES:
        exact = _exact(updates, module)
        assert (_global_deltas(strategy)[module] - exact).norm() / exact.norm() < 1e-5
    dispatch = strategy.configure(2, 0, DeviceLora(rank=3, scaling=1.0), torch.Generator())
    got = dispatch.lora_state["layers.0.q_proj"]
    u, s, vh = torch.linalg.svd(_exact(updates, "layers.0.q_proj").double())
    best3 = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close((got["B"] @ got["A"]).double(), best3, rtol=1e-4, atol=1e-4)


def test_lowrank_svd_equals_the_dense_svd() -> None:
    gen = torch.Generator().manual_seed(7)
    a_s, b_s = stack_factors(
        [
            (torch.randn(5, 30, generator=gen), torch.randn(20, 5, generator=gen), 0.7),
            (torch.randn(3, 30, generator=gen), torch.randn(20, 3, generator=gen), 1.3),
        ]
    )
    a, b = lowrank_svd(a_s, b_s, 4)
    u, s, vh = torch.linalg.svd((b_s @ a_s).double())
    torch.testing.assert_close((b @ a).double(), (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-4)


def test_flora_downlink_carries_every_merge_the_device_missed() -> None:
    strategy = _start(FLoRA(), 4)
    gen = torch.Generator()
    lora = DeviceLora(rank=4, scaling=2.0)
    assert strategy.configure(1, 0, lora, gen).downlink_bytes == 0  # nothing merged yet
    strategy.configure(1, 1, lora, gen)
    for round_no in (1, 2):
        aggregate(strategy, _updates([4, 4], [8.0, 8.0], seed=round_no))
        strategy.take_base_delta()
        assert strategy.configure(round_no + 1, 1, lora, gen).downlink_bytes > 0
    two_merges = strategy.configure(3, 0, lora, gen).downlink_bytes  # device 0 missed both merges
    one_merge = strategy.configure(3, 1, lora, gen).downlink_bytes  # device 1 synced after the first
    assert one_merge == 0
    assert two_merges > strategy.configure(3, 2, lora, gen).downlink_bytes / 2 > 0


def test_hetlora_self_pruning_shrinks_a_rank_whose_tail_is_small() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 16, generator=gen), torch.randn(12, 10, generator=gen)
    assert self_pruned_rank(a, b, gamma=0.8, threshold=0.05) == 10  # a full-size tail stays
    a[8:] *= 1e-3
    assert self_pruned_rank(a, b, gamma=0.8, threshold=0.05) == 8
    strategy = HetLoRA(gamma=0.8, prune_threshold=0.05)
    state = {m: {"A": a.clone(), "B": b.clone()} for m in ("x", "y")}
    pruned = strategy.device_side.finish(state, DeviceLora(rank=10, scaling=1.0))
    assert all(f["A"].shape == (8, 16) and f["B"].shape == (12, 8) for f in pruned.values())


def test_hetlora_penalises_the_tail_and_weights_by_update_norm() -> None:
    strategy = HetLoRA(gamma=0.5, penalty=0.1)
    a = torch.ones(4, 3, requires_grad=True)
    b = torch.ones(2, 4, requires_grad=True)
    penalty = strategy.device_side.penalty([(a, b)])
    assert penalty is not None
    penalty.backward()
    assert a.grad is not None and a.grad[:2].abs().sum() == 0 and a.grad[2:].abs().sum() > 0
    small, large = _updates([4, 4], [4.0, 4.0])
    for f in small.lora_state.values():
        f["B"] *= 0.1
    assert strategy.weight_of(large) > 5 * strategy.weight_of(small)


def test_payload_bytes_is_the_serialised_length_and_round_trips() -> None:
    (update,) = _updates([4], [8.0])
    payload = encode_state(update.lora_state)
    assert payload_bytes(update.lora_state) == len(payload)
    numel = sum(t.numel() for f in update.lora_state.values() for t in f.values())
    assert numel * 4 < len(payload) < numel * 4 + 1024  # fp32 data plus a small header
    torch.testing.assert_close(decode_state(payload), update.lora_state)
