"""FedSpine: importance meters, coverage-normalised aggregation, schedule, policies, pruned workloads."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from fedspine.algorithms.policies import (
    Arm,
    FixedPolicy,
    OraclePolicy,
    Outcome,
    PacedPolicy,
    PooledUCB,
    RandomPolicy,
    SlidingWindowUCB,
)
from fedspine.algorithms.strategies import FedSpine
from fedspine.algorithms.strategies.masks import PruningMasks
from fedspine.algorithms.wire import payload_bytes, update_payload_bytes
from fedspine.api import run_experiment
from fedspine.config import FedSpineSection
from fedspine.model.footprint import combine_workloads, train_workload
from fedspine.model.importance import FlapMeter, TaylorMeter
from fedspine.model.load import build_tiny_llama
from fedspine.model.lora import add_to_base_weights, apply_lora, get_lora_state, module_shapes, plain_copy
from fedspine.model.pruning import (
    LayerKeep,
    PruningPlan,
    decoder_layers,
    magnitude_scores,
    plan_from_scores,
    prune_model,
    pruned_hf_config,
    pruned_shapes,
    shape_of,
    write_model_code,
)
from fedspine.runtime.experiment.algorithms import pruning_masks, pruning_strategy
from fedspine.types import ClientUpdate, DeviceLora, TaskResult, TaskStatus

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HIDDEN, LAYERS, HEADS, KV, INTER = 64, 2, 4, 2, 16
HEAD_DIM = HIDDEN // HEADS


def tiny() -> Any:
    model, _ = build_tiny_llama(
        hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV, intermediate=INTER, seed=0
    )
    return model


def tokens(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 200, (2, 10), generator=g)}


ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(model: Any, targets: list[str] = ALL_LINEARS) -> Any:
    """``model`` wrapped with rank-2, alpha-4 LoRA adapters."""
    return apply_lora(model, 2, 4.0, 0.0, targets)


def random_lora(peft: Any, seed: int) -> None:
    """Non-zero A and B everywhere, so every factor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def strategy_for(model: Any, **settings: Any) -> FedSpine:
    """A FedSpine whose devices play the schedule's floor at rank 2 (KV groups pruned too, by default)."""
    section = FedSpineSection(**{"granularity": "heads_and_channels", **settings})
    return pruning_strategy(
        "fedspine", "samples", section, masks_for(model, section), SlidingWindowUCB([0.0], [2])
    )


def masks_for(model: Any, section: FedSpineSection, rounds: int = 4) -> PruningMasks:
    """The masks of ``model`` with LoRA on every projection, from its magnitude scores."""
    shapes = module_shapes(adapted(copy.deepcopy(model)))
    return pruning_masks(section, shape_of(model), shapes, magnitude_scores(model), rounds)


def update_from(peft: Any, plan: PruningPlan, samples: int, scaling: float, device: int = 0) -> ClientUpdate:
    return ClientUpdate(
        1, device, samples, get_lora_state(peft), 0, 0.0, 0, 0.0, lora_rank=2, lora_scaling=scaling, plan=plan
    )


# --- aggregation ---------------------------------------------------------------------------------


def test_a_pruned_update_lands_on_the_kept_rows_and_columns() -> None:
    """Merging one device's scattered update into the dense base, then pruning it, gives that device's
    own pruned model with its adapter merged: every factor landed on the rows/columns it trained."""
    model = tiny()
    plan = {0: LayerKeep((1,), (2, 3, 5, 8, 13)), 1: LayerKeep((0,), tuple(range(0, 16, 2)))}
    device_peft = adapted(prune_model(model, plan))
    random_lora(device_peft, 1)
    expected = device_peft(**tokens()).logits

    strategy = strategy_for(model)
    partial = strategy.accumulate(strategy.init_partial(), update_from(device_peft, plan, 10, 2.0))
    strategy.finalize(partial)
    deltas = strategy.take_base_delta()
    assert deltas is not None
    q = deltas["model.layers.0.self_attn.q_proj"]  # kept KV group 1 -> query heads 2, 3 -> rows 32..63
    assert not q[:32].any() and q[32:].abs().sum() > 0
    down = deltas["model.layers.1.mlp.down_proj"]  # kept even channels -> even input columns
    assert not down[:, 1::2].any() and down[:, 0::2].abs().sum() > 0

    server = adapted(copy.deepcopy(model), ["q_proj"])
    add_to_base_weights(server, {k: v for k, v in deltas.items() if k.endswith("q_proj")})
    merged = plain_copy(server)
    with torch.no_grad():
        for name, delta in deltas.items():
            if not name.endswith("q_proj"):
                merged.get_submodule(name).weight.add_(delta)
    actual = prune_model(merged, plan)(**tokens()).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_coverage_normalised_aggregation_matches_a_hand_computed_example() -> None:
    model = tiny()
    strategy = strategy_for(model)
    gate, down = "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"
    g = torch.Generator().manual_seed(3)
    half = {0: LayerKeep((0, 1), tuple(range(8))), 1: LayerKeep((0, 1), tuple(range(16)))}
    full = {0: LayerKeep((0, 1), tuple(range(16))), 1: LayerKeep((0, 1), tuple(range(16)))}

    def factors(kept: int) -> dict[str, dict[str, torch.Tensor]]:
        return {
            gate: {"A": torch.randn(2, HIDDEN, generator=g), "B": torch.randn(kept, 2, generator=g)},
            down: {"A": torch.randn(2, kept, generator=g), "B": torch.randn(HIDDEN, 2, generator=g)},
        }

    s1, s2 = factors(8), factors(16)
    u1 = ClientUpdate(1, 0, 30, s1, 0, 0.0, 0, 0.0, lora_rank=2, lora_scaling=2.0, plan=half)
    u2 = ClientUpdate(1, 1, 10, s2, 0, 0.0, 0, 0.0, lora_rank=2, lora_scaling=0.5, plan=full)
    partial = strategy.init_partial()
    strategy.accumulate(partial, u1)
    strategy.accumulate(partial, u2)
    strategy.finalize(partial)
    deltas = strategy.take_base_delta()
    assert deltas is not None

    d1_gate, d2_gate = 2.0 * s1[gate]["B"] @ s1[gate]["A"], 0.5 * s2[gate]["B"] @ s2[gate]["A"]
    d1_down, d2_down = 2.0 * s1[down]["B"] @ s1[down]["A"], 0.5 * s2[down]["B"] @ s2[down]["A"]
    for j in range(16):  # gate rows: channels 0-7 kept by both (weights 30, 10), 8-15 by device 1 only
        want = (30 * d1_gate[j] + 10 * d2_gate[j]) / 40 if j < 8 else d2_gate[j]
        torch.testing.assert_close(deltas[gate][j], want, rtol=1e-4, atol=1e-5)
    for j in range(16):  # down columns, same coverage
        want = (30 * d1_down[:, j] + 10 * d2_down[:, j]) / 40 if j < 8 else d2_down[:, j]
        torch.testing.assert_close(deltas[down][:, j], want, rtol=1e-4, atol=1e-5)


def test_an_empty_round_changes_nothing() -> None:
    strategy = strategy_for(tiny())
    strategy.finalize(strategy.init_partial())
    assert strategy.take_base_delta() is None and strategy.eval_plan() is None


def test_tree_aggregation_equals_flat() -> None:
    model = tiny()
    updates = []
    for device, ratio in enumerate([0.0, 0.5, 0.5]):
        plan = plan_from_scores(*magnitude_scores(model), ratio=ratio)
        peft = adapted(prune_model(model, plan), ["q_proj", "o_proj", "gate_proj", "down_proj"])
        random_lora(peft, device)
        updates.append(update_from(peft, plan, 5 + device, 2.0, device))
    flat, tree = strategy_for(model), strategy_for(model)
    flat.finalize(
        flat.accumulate(
            flat.accumulate(flat.accumulate(flat.init_partial(), updates[0]), updates[1]), updates[2]
        )
    )
    left = tree.accumulate(tree.accumulate(tree.init_partial(), updates[0]), updates[1])
    tree.finalize(tree.merge(left, tree.accumulate(tree.init_partial(), updates[2])))
    a, b = flat.take_base_delta(), tree.take_base_delta()
    assert a is not None and b is not None
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_importance_moves_the_global_score_on_covered_units_only() -> None:
    model = tiny()
    strategy = strategy_for(model, score_momentum=0.5)
    before = [c.clone() for c in strategy.masks.channel_scores]
    plan = {0: LayerKeep((0, 1), tuple(range(8))), 1: LayerKeep((0, 1), tuple(range(16)))}
    channels = [torch.zeros(INTER), torch.ones(INTER)]
    channels[0][:8] = torch.arange(8, dtype=torch.float32)  # reversed order on layer 0's kept units
    importance = {"heads": [torch.ones(KV), torch.ones(KV)], "channels": channels}
    update = ClientUpdate(1, 0, 1, {}, 0, 0.0, 0, 0.0, plan=plan, importance=importance)
    strategy.finalize(strategy.accumulate(strategy.init_partial(), update))
    assert torch.equal(strategy.masks.channel_scores[0][8:], before[0][8:])  # not kept: not observed
    assert not torch.equal(strategy.masks.channel_scores[0][:8], before[0][:8])
    # the observed scores were rescaled to the current mean on the kept units before mixing
    torch.testing.assert_close(strategy.masks.channel_scores[0][:8].mean(), before[0][:8].mean())


def test_uploaded_importance_is_charged_for_the_kept_units() -> None:
    plan = {0: LayerKeep((1,), tuple(range(8))), 1: LayerKeep((0, 1), tuple(range(16)))}
    state = {"m": {"A": torch.zeros(2, 4), "B": torch.zeros(4, 2)}}
    importance = {"heads": [torch.ones(KV)] * 2, "channels": [torch.ones(INTER)] * 2}
    bare = ClientUpdate(1, 0, 1, state, 0, 0.0, 0, 0.0)
    scored = ClientUpdate(1, 0, 1, state, 0, 0.0, 0, 0.0, plan=plan, importance=importance)
    assert update_payload_bytes(bare) == payload_bytes(state)
    extra = update_payload_bytes(scored) - payload_bytes(state)
    assert extra >= 4 * (1 + 8 + 2 + 16)  # one float32 per kept unit, plus header entries
    assert extra < 4 * (1 + 8 + 2 + 16) + 400


# --- schedule, assignment, downlink ----------------------------------------------------------------


def test_cubic_schedule_rises_to_the_target_and_oneshot_starts_there() -> None:
    model = tiny()
    cubic = strategy_for(model, target_sparsity=0.4, prune_rounds=4, importance="magnitude")
    values = [cubic.masks.sparsity(t) for t in range(1, 7)]
    assert all(a < b for a, b in itertools.pairwise(values[:4]))
    assert values[3] == pytest.approx(0.4) and values[5] == pytest.approx(0.4)
    assert values[0] == pytest.approx(0.4 * (1 - 0.75**3))
    assert strategy_for(model, target_sparsity=0.4, schedule="oneshot").masks.sparsity(1) == pytest.approx(
        0.4
    )


def test_devices_train_densely_until_importance_is_observed() -> None:
    model = tiny()
    strategy = strategy_for(model, target_sparsity=0.5, schedule="oneshot")
    assert strategy.assign(1, 0, DeviceLora(8, 2.0)).ratio == 0.0 and strategy.eval_plan() is None
    importance = {"heads": [torch.ones(KV)] * 2, "channels": [torch.rand(INTER)] * 2}
    update = ClientUpdate(1, 0, 1, {}, 0, 0.0, 0, 0.0, plan={}, importance=importance)
    strategy.finalize(strategy.accumulate(strategy.init_partial(), update))
    assert strategy.assign(2, 0, DeviceLora(8, 2.0)).ratio == 0.5 and strategy.eval_plan() is not None


def test_a_frozen_mask_stops_importance_uploads_once_observed() -> None:
    model = tiny()
    importance = {"heads": [torch.ones(KV)] * 2, "channels": [torch.rand(INTER)] * 2}
    update = ClientUpdate(1, 0, 1, {}, 0, 0.0, 0, 0.0, plan={}, importance=importance)
    for freeze, measures_later in ((True, False), (False, True)):
        strategy = strategy_for(model, freeze_mask=freeze)
        assert strategy.assign(1, 0, DeviceLora(2, 2.0)).measure_importance
        strategy.finalize(strategy.accumulate(strategy.init_partial(), update))
        assert strategy.assign(2, 0, DeviceLora(2, 2.0)).measure_importance is measures_later
    assert not strategy_for(model, importance="magnitude").assign(1, 0, DeviceLora(2, 2.0)).measure_importance


def test_assignment_respects_the_floor_and_dispatches_pruned_factors() -> None:
    model = tiny()
    strategy = strategy_for(model, target_sparsity=0.5, schedule="oneshot", importance="magnitude")
    assignment = strategy.assign(1, 0, DeviceLora(8, 2.0))
    # rank 2 at the device's alpha 16: the scale alpha / r does not shrink with the rank
    assert assignment.ratio == 0.5 and assignment.lora == DeviceLora(2, 8.0)
    dispatch = strategy.configure(1, 0, assignment.lora, torch.Generator().manual_seed(0))
    q = dispatch.lora_state["model.layers.0.self_attn.q_proj"]
    assert q["B"].shape == (32, 2) and q["A"].shape == (2, HIDDEN)  # one of two KV groups kept
    down = dispatch.lora_state["model.layers.1.mlp.down_proj"]
    assert down["A"].shape == (2, 8) and down["B"].shape == (HIDDEN, 2)
    # nothing merged yet, so the device's pretrained rows are current: it only needs the kept indices
    assert dispatch.downlink_bytes == 4 * 2 * (1 + 8)


def test_downlink_charges_missed_merges_on_kept_coordinates() -> None:
    model = tiny()
    strategy = strategy_for(model, target_sparsity=0.5, schedule="oneshot", importance="magnitude")
    plan = strategy.plan_for(0.5)
    peft = adapted(prune_model(model, plan))
    random_lora(peft, 0)
    strategy.assign(1, 0, DeviceLora(2, 2.0))
    strategy.configure(1, 0, DeviceLora(2, 2.0), torch.Generator())
    strategy.finalize(strategy.accumulate(strategy.init_partial(), update_from(peft, plan, 1, 2.0)))
    strategy.take_base_delta()
    strategy.assign(2, 0, DeviceLora(2, 2.0))
    again = strategy.configure(2, 0, DeviceLora(2, 2.0), torch.Generator())
    kept = strategy.masks.kept_shapes(plan)
    assert again.downlink_bytes == sum(4 * 2 * (o + i) for o, i in kept.values())  # one merge, rank 2
    strategy.assign(2, 1, DeviceLora(2, 2.0))
    newcomer = strategy.configure(2, 1, DeviceLora(2, 2.0), torch.Generator())
    assert newcomer.downlink_bytes > again.downlink_bytes  # it also gets the plan's indices


def test_few_kv_groups_prune_channels_only_by_default() -> None:
    model = tiny()  # 2 KV groups: one is half of the attention
    auto = strategy_for(
        model, granularity="auto", target_sparsity=0.5, schedule="oneshot", importance="magnitude"
    )
    plan = auto.plan_for(0.5)
    assert all(keep.kv_groups == (0, 1) and len(keep.channels) == INTER // 2 for keep in plan.values())
    both = strategy_for(model, target_sparsity=0.5, schedule="oneshot", importance="magnitude")
    assert all(len(keep.kv_groups) == 1 for keep in both.plan_for(0.5).values())


def test_arms_prune_beyond_the_schedules_floor() -> None:
    model = tiny()
    section = FedSpineSection(target_sparsity=0.3, importance="magnitude", prune_rounds=2)
    policy = FixedPolicy([0.0, 0.2], [2], {0: 0.2}, {0: 2})
    strategy = pruning_strategy("fedspine", "samples", section, masks_for(model, section), policy)
    first = strategy.assign(1, 0, DeviceLora(4, 4.0))
    assert first.ratio == pytest.approx(strategy.masks.sparsity(1) + 0.2)
    assert strategy.masks.sparsity(1) < 0.3 and strategy.masks.sparsity(2) == pytest.approx(0.3)
    assert strategy.assign(2, 0, DeviceLora(4, 4.0)).ratio == pytest.approx(0.5)
    assert strategy.deployment([0]) == {0: Arm(0.5, 2)}
    assert strategy.eval_plan() == strategy.plan_for(0.3)


def test_a_device_back_on_the_dense_model_gets_the_units_it_had_pruned() -> None:
    """A device that pruned half the channels at its last task and keeps every unit now must receive the
    server's rows of the half it had dropped (they were merged into while it did not hold them)."""
    model = tiny()
    strategy = strategy_for(model, target_sparsity=0.5, schedule="oneshot", importance="magnitude")
    half = strategy.plan_for(0.5)
    strategy._assigned[0] = (Arm(0.0, 2), half)
    strategy.configure(1, 0, DeviceLora(2, 2.0), torch.Generator())
    strategy._version = 1  # a merge happened since
    sync = strategy.base_sync(0, {})
    gate = "model.layers.0.mlp.gate_proj"
    fresh = strategy.fresh_units(sync, gate)
    assert sorted(fresh.tolist()) == sorted(set(range(INTER)) - set(half[0].channels))


# --- importance meters ---------------------------------------------------------------------------


def test_taylor_meter_equals_the_explicit_gradient_formula() -> None:
    model = tiny()
    plan = {0: LayerKeep((1,), tuple(range(0, 16, 2)))}
    peft = adapted(prune_model(model, plan))
    random_lora(peft, 0)
    meter = TaylorMeter(peft, HEAD_DIM)
    loss = peft(**tokens(), labels=tokens()["input_ids"]).loss
    loss.backward()
    meter.after_backward()
    heads, channels = meter.result()
    assert [h.numel() for h in heads] == [1, 2] and [c.numel() for c in channels] == [8, 16]

    def explicit(module: Any) -> torch.Tensor:
        a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
        grad = s * (b.grad @ a + b @ a.grad)
        return (module.get_base_layer().weight + s * b @ a).detach() * grad

    mlp = decoder_layers(peft.get_base_model())[0].mlp
    want = explicit(mlp.gate_proj).sum(1) + explicit(mlp.up_proj).sum(1) + explicit(mlp.down_proj).sum(0)
    torch.testing.assert_close(channels[0], want.abs(), rtol=1e-4, atol=1e-7)
    attn = decoder_layers(peft.get_base_model())[1].self_attn
    group0 = sum(
        explicit(getattr(attn, n))[rows].sum()
        for n, rows in (("q_proj", slice(0, 32)), ("k_proj", slice(0, 16)), ("v_proj", slice(0, 16)))
    )
    group0 = group0 + explicit(attn.o_proj)[:, :32].sum()
    torch.testing.assert_close(heads[1][0], group0.abs(), rtol=1e-4, atol=1e-7)


def test_flap_meter_is_input_variance_times_column_norm() -> None:
    model = tiny()
    peft = adapted(copy.deepcopy(model), ["down_proj"])
    seen: list[torch.Tensor] = []
    down = decoder_layers(peft.get_base_model())[1].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().reshape(-1, INTER)))
    with FlapMeter(peft, HEAD_DIM) as meter:
        peft(**tokens())
    handle.remove()
    _, channels = meter.result()
    x = seen[0].double()
    weight = (
        down.get_base_layer().weight
        + down.scaling["default"] * down.lora_B["default"].weight @ down.lora_A["default"].weight
    )
    want = x.var(0, unbiased=False).float() * weight.detach().pow(2).sum(0)
    torch.testing.assert_close(channels[1], want, rtol=1e-4, atol=1e-8)


# --- policies ------------------------------------------------------------------------------------


def test_the_bandit_finds_the_best_arm_on_a_synthetic_reward() -> None:
    bandit = SlidingWindowUCB([0.0, 0.2, 0.4], [4, 8], window=200, c=0.5)
    means = {a: 0.2 + 0.1 * i for i, a in enumerate(bandit.arms)}
    best = Arm(0.2, 8)
    means[best] = 0.9
    rng = random.Random(0)
    chosen = []
    for _ in range(300):
        arm = bandit.choose(0, floor=0.0)
        chosen.append(arm)
        bandit.observe(0, arm, Outcome(means[arm] + rng.gauss(0, 0.1)))
    assert bandit.best(0, 0.0) == best
    late = chosen[-100:]
    assert max(set(late), key=late.count) == best and late.count(best) > 50
    assert chosen[0] == Arm(0.4, 4)  # safest arm first


def test_the_bandit_adapts_when_the_best_arm_changes() -> None:
    bandit = SlidingWindowUCB([0.0, 0.4], [4], window=20, c=0.3)
    for step in range(200):
        arm = bandit.choose(0, 0.0)
        good = Arm(0.0, 4) if step < 100 else Arm(0.4, 4)
        bandit.observe(0, arm, Outcome(0.8 if arm == good else 0.2))
    assert bandit.best(0, 0.0) == Arm(0.4, 4)


def test_the_pooled_bandit_learns_from_the_whole_fleet() -> None:
    """Twenty devices, each taking part only three times: quality is learned across the fleet, and a
    slow device prunes to meet the deadline while fast ones keep the arm that trains the best model."""
    ratios, ranks = [0.0, 0.25, 0.5], [4, 16]
    work = lambda a: (1 - a.ratio) * (1 + a.rank / 64)  # noqa: E731
    quality = lambda a: (1 - 0.3 * a.ratio) * (1 + a.rank / 64)  # noqa: E731  more model, better model
    speed = {d: 1.0 if d < 19 else 3.0 for d in range(20)}  # device 19 is three times slower
    pooled = PooledUCB(ratios, ranks, work, window=50, c=0.05)
    rng = random.Random(0)
    played = []
    for _ in range(3):
        for device in range(20):
            arm = pooled.choose(device, 0.0)
            played.append(arm)
            seconds = speed[device] * work(arm)
            deadline = 1.3
            pooled.observe(device, arm, Outcome(0.0, seconds, quality(arm) + rng.gauss(0, 0.02), deadline))
    assert set(played) == set(pooled.arms)  # every arm was tried, once the fleet had measured speeds
    assert pooled.best(0, 0.0) == Arm(0.0, 16)
    slow = pooled.best(19, 0.0)
    assert slow.ratio == 0.5


def test_the_pooled_bandit_tries_every_arm_before_repeating_one() -> None:
    """An untried arm outranks any tried one, whatever the exploration bonus of the tried ones (a
    window-capped bonus once kept a policy on its first arm for a whole run)."""
    pooled = PooledUCB([0.0, 0.2], [4, 8], lambda a: 1.0 - a.ratio, window=20, c=1.0)
    seen = []
    for step in range(8):
        arm = pooled.choose(step % 2, 0.0)
        seen.append(arm)
        pooled.observe(step % 2, arm, Outcome(1.0, 1.0, 1.0, 1.0))
    assert set(seen[:6]) == set(pooled.arms)


def test_the_pooled_bandit_avoids_arms_heavier_than_one_that_ran_out_of_memory() -> None:
    pooled = PooledUCB([0.0, 0.5], [4], lambda a: 1 - a.ratio)
    pooled.observe(0, Arm(0.0, 4), Outcome(-1.0, 0.0, None, 1.0, failed=True))
    assert pooled.choose(0, 0.0) == Arm(0.5, 4) and pooled.best(0, 0.0) == Arm(0.5, 4)


def test_bandits_explore_from_the_most_pruned_arm_or_from_the_floor() -> None:
    for policy in (
        SlidingWindowUCB([0.0, 0.3, 0.5], [4, 8]),
        PooledUCB([0.0, 0.3, 0.5], [4, 8], lambda a: 1.0),
    ):
        assert policy.choose(0, 0.3) == Arm(0.5, 4)
        policy.explore = "floor"
        assert policy.choose(0, 0.3) == Arm(0.3, 4)


def test_policies_respect_the_floor() -> None:
    bandit = SlidingWindowUCB([0.0, 0.2, 0.4], [4])
    assert all(bandit.choose(0, 0.3).ratio >= 0.3 for _ in range(5))
    assert RandomPolicy([0.0, 0.2, 0.4], [4], seed=0).choose(0, 0.3).ratio == 0.4
    fixed = FixedPolicy([0.0], [4], {0: 0.1}, {0: 16})
    assert fixed.choose(0, 0.0) == Arm(0.1, 16) and fixed.choose(0, 0.3) == Arm(0.3, 16)
    assert SlidingWindowUCB([0.0, 0.1], [4]).choose(0, 0.5) == Arm(0.5, 4)  # raised to the floor


def test_oracle_prunes_slow_devices_more() -> None:
    speed = {0: 1.0, 1: 1.0, 2: 4.0}  # device 2 is four times slower
    oracle = OraclePolicy([0.0, 0.25, 0.5], [4], [0, 1, 2], lambda d, a: speed[d] * (1 - a.ratio))
    assert oracle.choose(0, 0.0).ratio == 0.0
    assert oracle.choose(2, 0.0).ratio == 0.5


def test_the_paced_policy_prunes_the_devices_it_measured_slow_as_the_oracle_would() -> None:
    """Speeds learned from the devices' own tasks, no profile: once every device has run a task, each
    plays what the oracle reading their profiles plays; a device never measured plays its first arm."""
    ratios, ranks = [0.0, 0.25, 0.5], [4, 8]
    work = lambda a: (1 - a.ratio) * (0.5 + a.rank / 16)  # noqa: E731
    speed = {0: 0.9, 1: 1.1, 2: 1.5, 3: 4.0}  # device 2 is a little slow, device 3 much slower
    oracle = OraclePolicy(ratios, ranks, list(speed), lambda d, a: speed[d] * work(a))
    paced = PacedPolicy(ratios, ranks, work)
    assert paced.choose(0, 0.0) == Arm(0.5, 4)  # nothing measured: the safest arm first
    for device in speed:
        arm = paced.choose(device, 0.0)
        paced.observe(device, arm, Outcome(0.0, speed[device] * work(arm), 1.0, 0.0))
    for device in speed:
        assert paced.choose(device, 0.0) == oracle.choose(device, 0.0) == paced.best(device, 0.0)
    assert paced.choose(0, 0.0) == Arm(0.0, 8) and paced.choose(3, 0.0) == Arm(0.5, 4)
    assert paced.choose(2, 0.0).ratio == 0.25  # pruned just enough to keep the median device's pace
    assert paced.choose(9, 0.0) == Arm(0.5, 4)  # never measured
    assert paced.choose(0, 0.3).ratio == 0.5  # the schedule's floor rules out the less pruned arms


def test_the_paced_policy_keeps_a_deadline_with_the_least_pruning_that_meets_it() -> None:
    work = lambda a: 1 - a.ratio  # noqa: E731
    paced = PacedPolicy([0.0, 0.2, 0.4], [4], work, deadline=10.0)
    for device, seconds_per_work in ((0, 5.0), (1, 12.0), (2, 16.0), (3, 30.0)):
        paced.observe(device, Arm(0.0, 4), Outcome(0.0, seconds_per_work, 1.0, 10.0))
    chosen = [paced.choose(d, 0.0).ratio for d in range(4)]
    assert chosen == [0.0, 0.2, 0.4, 0.4]  # 12 * 0.8 <= 10; 16 * 0.6 <= 10; 30: its fastest arm
    paced.observe(0, Arm(0.0, 4), Outcome(-1.0, 0.0, None, 10.0, failed=True))  # out of memory
    assert paced.choose(0, 0.0).ratio == 0.2


def test_rewards_penalise_late_and_out_of_memory_tasks() -> None:
    model = tiny()
    strategy = strategy_for(model, importance="magnitude")  # no calibration round
    for device in (0, 1, 2, 3):
        strategy.assign(1, device, DeviceLora(2, 2.0))
    good = ClientUpdate(1, 0, 1, {}, 0, 0.0, 0, 0.0, probe_loss=1.0)
    worse = ClientUpdate(1, 3, 1, {}, 0, 0.0, 0, 0.0, probe_loss=2.0)
    strategy.end_round(
        1,
        [
            TaskResult(0, TaskStatus.OK, 10.0, good),
            TaskResult(1, TaskStatus.LATE, 50.0, None),
            TaskResult(2, TaskStatus.OOM, 0.0, None),
            TaskResult(3, TaskStatus.OK, 20.0, worse),
        ],
        0.0,
    )
    rewards = {r["device_id"]: r["reward"] for r in strategy.rewards}
    assert rewards[1] == rewards[2] == -1.0
    mean = (math.exp(-1.0) + math.exp(-2.0)) / 2  # quality exp(-loss), relative to the round's mean
    cap = 15.0  # the median time of the two tasks that arrived
    assert rewards[0] == pytest.approx(math.exp(-1.0) / mean)  # on time: its quality
    assert rewards[3] == pytest.approx(math.exp(-2.0) / mean * cap / 20.0)  # late: scaled by D / T


# --- pruned workloads ----------------------------------------------------------------------------


def test_pruned_workload_is_the_layer_weighted_sum() -> None:
    model = tiny()
    shape = shape_of(model)
    scores = magnitude_scores(model)
    work = lambda s: train_workload(s, [10] * 4, 4, 7, "last", 2, 4, 1)  # noqa: E731
    uniform = plan_from_scores(*scores, ratio=0.5)
    ((part, fraction),) = pruned_shapes(uniform, shape)
    assert fraction == 1.0 and (part.kv_heads, part.heads, part.intermediate) == (1, 2, 8)
    mixed = plan_from_scores(*scores, ratio=0.5, dense_layers=[0])
    combined = combine_workloads([(work(s), f) for s, f in pruned_shapes(mixed, shape)])
    dense, pruned = work(shape), work(part)
    assert pruned.flops < combined.flops < dense.flops
    assert combined.flops == pytest.approx((dense.flops + pruned.flops) / 2)


def test_runs_record_each_tasks_pruning_ratio_and_rank(tmp_path: Path, tiny_config: Any) -> None:
    tiny_config = replace(
        tiny_config,
        strategy=replace(tiny_config.strategy, name="fedspine"),
        scheduler=replace(tiny_config.scheduler, rounds=3),
    )
    result = run_experiment(tiny_config, tmp_path / "run")
    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    tasks = [e for e in events if e["event"] == "task" and e["status"] == "ok"]
    target = tiny_config.strategy.fedspine.target_sparsity
    allowed = {round(target + e, 6) for e in tiny_config.strategy.fedspine.extra_ratios}
    pruned = [round(t["pruning_ratio"], 6) for t in tasks if t["pruning_ratio"] > 0]
    assert pruned and all(r <= max(allowed) for r in pruned)
    assert {t["lora_rank"] for t in tasks} <= set(tiny_config.strategy.fedspine.ranks)


# --- export --------------------------------------------------------------------------------------


def test_an_exported_pruned_model_loads_with_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny()
    plan = plan_from_scores(*magnitude_scores(model), ratio=0.5)
    pruned = prune_model(model, plan)
    pruned.config = pruned_hf_config(pruned.config, plan)
    pruned.save_pretrained(tmp_path / "m")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(loaded(**tokens()).logits, pruned(**tokens()).logits)
    out = loaded.generate(tokens()["input_ids"][:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 15)


def test_a_model_with_dense_layers_saves_with_its_code_and_loads_with_plain_transformers(
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny()
    plan = plan_from_scores(*magnitude_scores(model), ratio=0.5, dense_layers=[0])
    pruned = prune_model(model, plan)
    pruned.config = pruned_hf_config(pruned.config, plan)
    pruned.save_pretrained(tmp_path / "m")
    write_model_code(pruned.config, tmp_path / "m")

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # custom code runs only when asked
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    widths = [
        (layer.self_attn.k_proj.out_features, layer.mlp.gate_proj.out_features)
        for layer in loaded.model.layers
    ]
    assert widths[0] != widths[1] and widths == [
        (layer.self_attn.k_proj.out_features, layer.mlp.gate_proj.out_features)
        for layer in pruned.model.layers
    ]
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())
    torch.testing.assert_close(loaded(**tokens()).logits, pruned(**tokens()).logits)
    out = loaded.generate(tokens()["input_ids"][:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 15)


def test_fedspine_run_exports_a_model_per_device(tmp_path: Path, tiny_config: Any) -> None:
    from transformers import AutoModelForCausalLM

    from fedspine.cli import app

    tiny_config = replace(tiny_config, strategy=replace(tiny_config.strategy, name="fedspine"))
    result = run_experiment(tiny_config, tmp_path / "run")
    manifest = json.loads((result.run_dir / "models" / "manifest.json").read_text())
    assert set(manifest["devices"]) == {str(i) for i in range(6)}
    for entry in manifest["models"]:
        assert entry["parameters"] < manifest["dense_base"]["parameters"]
        assert entry["tokens_per_second"] > 0 and entry["saved"]
    assert result.summary.device_models == manifest
    report = (result.run_dir / "report.html").read_text()
    assert "Device models" in report and report.count("sparsity-") >= 6  # a row per device
    assert "plots/arms_by_class.png" in report and (result.run_dir / "plots" / "arms_by_class.png").is_file()
    pruning = result.summary.pruning
    assert pruning["untrained_units_evaluated"] == 0 and pruning["untrained_units_deployed"] == 0
    assert pruning["units"] == "channels" and pruning["global_sparsity"] == 0.3

    out = tmp_path / "device-3"
    cli = CliRunner().invoke(app, ["export", str(result.run_dir), "--device", "3", "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = manifest["models"][
        [m["dir"] for m in manifest["models"]].index(manifest["devices"]["3"]["model"])
    ]
    assert sum(p.numel() for p in model.parameters()) == expected["parameters"]
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, min_new_tokens=3).shape == (1, 6)

    missing = CliRunner().invoke(
        app, ["export", str(result.run_dir), "--device", "99", "--out", str(tmp_path / "x")]
    )
    assert missing.exit_code == 2 and "no device 99" in missing.output


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy.name=prune_then_tune"],
        ["strategy.name=fedmp"],
        ["strategy.name=fedspine", "strategy.fedspine.policy=pooled"],
        ["strategy.name=fedspine", "strategy.fedspine.policy=paced", "scheduler.deadline_seconds=5"],
        ["strategy.name=fedspine", "strategy.fedspine.policy=oracle", "strategy.fedspine.importance=flap"],
        [
            "strategy.name=fedspine",
            "strategy.fedspine.policy=random",
            "strategy.fedspine.importance=magnitude",
        ],
    ],
    ids=["prune_then_tune", "fedmp", "pooled", "paced-deadline", "oracle-flap", "random-magnitude"],
)
def test_every_pruning_strategy_and_policy_runs_from_the_cli(tmp_path: Path, overrides: list[str]) -> None:
    from fedspine.cli import app

    args = [
        "run",
        "-c",
        str(CONFIGS / "tiny.toml"),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "scheduler.rounds=3",
    ]
    args += ["--set", "data.max_examples=600", "--set", "data.test_size=60", "--set", "export.speed=false"]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tasks"]["ok"] > 0 and summary["device_models"]["models"]


def test_a_bad_policy_names_the_key_and_the_choices(tmp_path: Path) -> None:
    from fedspine.cli import app

    result = CliRunner().invoke(
        app, ["run", "--set", "strategy.fedspine.policy=greedy", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "strategy.fedspine.policy" in result.output and "swucb" in result.output
    assert not (tmp_path / "r").exists()


def test_a_bounded_downlink_does_not_grow_with_the_merges_a_device_missed() -> None:
    """With a bounded adapter a device back after five merges downloads the adapter's factors on its
    kept coordinates (rank at most ``global_rank``), as after one; with exact merges it gets all five."""
    model = tiny()
    sent = {}
    for rank in (0, 2):
        strategy = strategy_for(model, target_sparsity=0.5, schedule="oneshot", importance="magnitude")
        strategy.global_rank = rank
        plan = strategy.plan_for(0.5)
        lora = DeviceLora(2, 2.0)
        strategy.assign(1, 0, lora)
        strategy.configure(1, 0, lora, torch.Generator())
        for round_no in range(2, 7):
            peft = adapted(prune_model(model, plan))
            random_lora(peft, round_no)
            strategy.assign(round_no, 1, lora)
            strategy.configure(round_no, 1, lora, torch.Generator())
            update = update_from(peft, plan, 1, 2.0, device=1)
            strategy.finalize(strategy.accumulate(strategy.init_partial(), update))
            strategy.take_base_delta()
        strategy.assign(7, 0, lora)
        sent[rank] = strategy.configure(7, 0, lora, torch.Generator()).downlink_bytes
        kept = strategy.masks.kept_shapes(plan)
        if rank:
            assert all(a.shape[0] == rank for a, _ in strategy.adapter.values())
            assert sent[rank] == sum(4 * rank * (o + i) for o, i in kept.values())  # same plan: no indices
        else:
            assert sent[rank] == min(
                sum(4 * 5 * 2 * (o + i) for o, i in kept.values()), sum(4 * o * i for o, i in kept.values())
            )
    assert sent[2] < sent[0]


def test_fedspines_downlink_costs_at_most_one_and_a_half_fedits(tiny_config: Any, tmp_path: Path) -> None:
    """End to end on the tiny fleet: FedSpine's devices download at most 1.5x FedIT's bytes (the
    bounded adapter at FedIT's rank, plus channel means and plan indices); with exact merges more."""
    sent = {}
    for name, rank in (("fedit", "auto"), ("fedspine", "auto"), ("fedspine-exact", 0)):
        cfg = replace(
            tiny_config,
            strategy=replace(
                tiny_config.strategy,
                name=name.split("-")[0],
                fedspine=replace(tiny_config.strategy.fedspine, global_rank=rank),
            ),
            scheduler=replace(tiny_config.scheduler, rounds=5, clients_per_round=2),
        )
        sent[name] = run_experiment(cfg, tmp_path / name).summary.downlink_bytes
    assert sent["fedspine"] <= 1.5 * sent["fedit"] < sent["fedspine-exact"]


def test_the_paced_policy_deploys_the_smallest_models_on_the_slowest_class(
    tiny_config: Any, tmp_path: Path
) -> None:
    """End to end on the paper's three Jetson classes (TX2, Xavier NX, AGX Xavier, on Ethernet so that
    compute sets the pace), every device in every round: the paced policy learns who is slow from the
    tasks alone, the TX2s deploy the most pruned models and the AGX Xaviers the least; the summary
    counts each class's tasks by status."""
    from fedspine.config import FleetGroup

    groups = [FleetGroup(c, 2, "ethernet") for c in ("jetson_tx2", "jetson_xavier_nx", "jetson_agx_xavier")]
    cfg = replace(
        tiny_config,
        fleet=replace(tiny_config.fleet, groups=groups, jitter_scale=0.0),
        strategy=replace(tiny_config.strategy, name="fedspine"),
        scheduler=replace(tiny_config.scheduler, rounds=4, clients_per_round=6),
        train=replace(tiny_config.train, local_steps=12),  # the tiny model's compute outweighs the link's
    )
    summary = run_experiment(cfg, tmp_path / "run").summary
    assert summary.pruning is not None and summary.pruning["policy"] == "paced"
    assert summary.device_models is not None
    classes = {d["device_id"]: d["device_class"] for d in summary.devices}
    ratios: dict[str, list[float]] = {}
    for device, model in summary.device_models["devices"].items():
        ratios.setdefault(classes[int(device)], []).append(model["ratio"])
    mean = {c: sum(r) / len(r) for c, r in ratios.items()}
    assert mean["jetson_tx2"] > mean["jetson_xavier_nx"] >= mean["jetson_agx_xavier"], mean
    totals = summary.device_classes
    assert totals is not None and set(totals) == set(classes.values())
    assert all(row["devices"] == 2 and row["tasks"] == 8 for row in totals.values())
    assert sum(row["ok"] for row in totals.values()) == summary.tasks["ok"]
