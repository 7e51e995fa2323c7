"""FedSpine's prune-and-tune is exact: what a pruned device trains is what the dense model would have.

Each test compares FedSpine's real path (the executor trains the physically pruned submodel, the
strategy scatters the update to full coordinates and merges it) with a reference computed another way
on a tiny float32 model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedspine.algorithms.lora_math import fresh_factors
from fedspine.algorithms.strategies import STRATEGIES, FedSpine
from fedspine.client.train import make_optimizer, train_local
from fedspine.config import load_config
from fedspine.model.lora import apply_lora, get_lora_state, plain_copy, set_lora_state
from fedspine.model.pruning import LayerKeep, PruningPlan, masked_model, scatter_to_full
from fedspine.runtime.executor import task_seed
from fedspine.runtime.experiment import Experiment, build_experiment
from fedspine.types import ClientTask, ClientUpdate, DeviceLora, LoraState

ROOT = Path(__file__).resolve().parents[1]
ALL_LINEARS = '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'
TOL = {"rtol": 1e-4, "atol": 1e-6}


CONFIG = load_config(
    ROOT / "configs" / "tiny.toml",
    [
        "strategy.name=fedspine",
        "strategy.fedspine.global_rank=0",
        f"lora.target_modules={ALL_LINEARS}",
        "data.max_examples=600",
        "data.test_size=60",
        "train.local_steps=3",
        "export.speed=false",
    ],
)
"""A tiny FedSpine experiment: 2 layers, 2 KV groups of 2 heads, 128 channels, LoRA everywhere; the
base carries the exact aggregate (the bounded adapter's tests set their own rank)."""


@pytest.fixture(scope="module")
def exp() -> Experiment:
    """The experiment of :data:`CONFIG`."""
    experiment = build_experiment(CONFIG)
    experiment.strategy.init_global(experiment.trainer.module_shapes, 4, torch.Generator().manual_seed(0))
    return experiment


PLAN: PruningPlan = {
    0: LayerKeep(kv_groups=(1,), channels=tuple(range(0, 128, 3))),
    1: LayerKeep(kv_groups=(0, 1), channels=tuple(range(7, 100))),
}


def _fresh_payload(strategy: FedSpine, plan: PruningPlan, rank: int, seed: int) -> LoraState:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out_f, in_f) in strategy.masks.kept_shapes(plan).items():
        a, b = fresh_factors(out_f, in_f, rank, generator)
        state[module] = {"A": a, "B": b}
    return state


def _train_pruned(exp: Experiment, plan: PruningPlan, device: int, round_no: int, rank: int) -> ClientUpdate:
    """FedSpine's device path: the executor trains a fresh adapter on the physically pruned submodel."""
    lora = DeviceLora(rank, CONFIG.lora.alpha / rank)
    strategy = exp.strategy
    assert isinstance(strategy, FedSpine)
    payload = _fresh_payload(strategy, plan, rank, seed=device)
    prepared = exp.trainer.executor.prepare(
        round_no, exp.devices[device], lora, CONFIG.train.local_steps, plan
    )
    task = ClientTask(round_no, device, len(prepared.batches), lora, payload, 0, plan=plan)
    return exp.trainer.executor.run(task, prepared)


def _kept_index(strategy: FedSpine, plan: PruningPlan, module: str) -> tuple[int, torch.Tensor] | None:
    return strategy.masks.module_index(plan, module)


def _merged_delta(strategy: Any, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """The base-weight delta a strategy that merges (FedSpine, FLoRA) makes of ``updates``."""
    partial = strategy.init_partial()
    for update in updates:
        partial = strategy.accumulate(partial, update)
    strategy.finalize(partial)
    deltas = strategy.take_base_delta()
    assert deltas is not None
    return dict(deltas)


def test_a_pruned_devices_merged_update_equals_masked_dense_training(exp: Experiment) -> None:
    """Train the pruned submodel (the real path) and, separately, the dense model with the plan applied
    as a mask on its weights and on its adapter's factors and gradients; the merged weight changes
    agree in every coordinate of every adapted module."""
    strategy = exp.strategy
    assert isinstance(strategy, FedSpine)
    rank, device, round_no = 4, 1, 7
    update = _train_pruned(exp, PLAN, device, round_no, rank)
    delta = _merged_delta(strategy, [update])

    # The reference: the dense model with the plan as a mask, its adapter scattered to full coordinates.
    lora = DeviceLora(rank, CONFIG.lora.alpha / rank)
    payload = _fresh_payload(strategy, PLAN, rank, seed=device)
    dense = apply_lora(
        masked_model(plain_copy(exp.trainer.executor.model), PLAN),
        rank,
        CONFIG.lora.alpha,
        0.0,
        list(CONFIG.lora.target_modules),
    )
    full: LoraState = {}
    masks: dict[str, tuple[int, torch.Tensor]] = {}
    for module, factors in payload.items():
        a, b = factors["A"], factors["B"]
        out_f, in_f = strategy.masks.module_shapes[module]
        index = _kept_index(strategy, PLAN, module)
        if index is not None:
            dim, kept = index
            if dim == 0:
                b = scatter_to_full(b, kept, out_f)
            else:
                a = scatter_to_full(a, kept, in_f, dim=1)
            masks[module] = (dim, kept)
        full[module] = {"A": a, "B": b}
    set_lora_state(dense, full)
    factors = {m: (dense.get_submodule(f"base_model.model.{m}")) for m in full}

    def mask_gradients() -> None:  # the plan, applied to the adapter: pruned rows/columns never move
        for module, (dim, kept) in masks.items():
            layer = factors[module]
            factor = layer.lora_B["default"].weight if dim == 0 else layer.lora_A["default"].weight
            dropped = torch.ones(factor.shape[dim], dtype=torch.bool)
            dropped[kept] = False
            assert factor.grad is not None
            factor.grad.index_fill_(dim, dropped.nonzero().flatten(), 0.0)

    prepared = exp.trainer.executor.prepare(
        round_no, exp.devices[device], lora, CONFIG.train.local_steps, PLAN
    )
    torch.manual_seed(task_seed(CONFIG.run.seed, round_no, device, 1))
    t = exp.trainer.executor.training
    params = [p for p in dense.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    train_local(
        dense,
        exp.trainer.objective,
        prepared.batches,
        optimizer,
        t.max_grad_norm,
        after_backward=mask_gradients,
    )
    trained = get_lora_state(dense)
    scaling = CONFIG.lora.alpha / rank
    weight = strategy.update_weight(update)
    assert weight > 0
    for module, factors_ in trained.items():
        expected = scaling * factors_["B"] @ factors_["A"]
        torch.testing.assert_close(delta[module], expected, **TOL)
    assert any(delta[m].abs().sum() > 0 for m in delta)


def _flora_reference(
    exp: Experiment, plan: PruningPlan, updates: list[ClientUpdate]
) -> dict[str, torch.Tensor]:
    """FLoRA's exact stacking over the pruned sub-network's shapes, scattered to full coordinates."""
    strategy = exp.strategy
    assert isinstance(strategy, FedSpine)
    flora = STRATEGIES.get("flora", "strategy.name")(weighting="samples")
    flora.init_global(strategy.masks.kept_shapes(plan), 4, torch.Generator().manual_seed(0))
    sub = _merged_delta(flora, updates)
    return {module: _in_full(strategy, plan, module, value) for module, value in sub.items()}


def _in_full(strategy: FedSpine, plan: PruningPlan, module: str, value: torch.Tensor) -> torch.Tensor:
    """A weight change of ``module`` in ``plan``'s pruned coordinates, scattered to full coordinates."""
    index = _kept_index(strategy, plan, module)
    if index is None:
        return value
    out_f, in_f = strategy.masks.module_shapes[module]
    dim, kept = index
    return scatter_to_full(value, kept, out_f) if dim == 0 else scatter_to_full(value, kept, in_f, dim=1)


def test_with_every_device_on_one_mask_fedspine_aggregates_like_flora_on_the_subnetwork(
    exp: Experiment,
) -> None:
    """Three devices on the same mask, different ranks and sample counts: the coverage-normalised merge
    is FLoRA's exact weighted mean of the products, trained on the pruned sub-network."""
    strategy = exp.strategy
    assert isinstance(strategy, FedSpine)
    updates = [_train_pruned(exp, PLAN, device, 3, rank) for device, rank in ((0, 2), (2, 4), (4, 8))]
    assert len({u.num_samples for u in updates}) > 1  # unequal weights
    delta = _merged_delta(strategy, updates)
    reference = _flora_reference(exp, PLAN, updates)
    for module, value in reference.items():
        torch.testing.assert_close(delta[module], value, **TOL)


def test_with_one_device_fedspine_merges_exactly_what_fedit_would_apply(exp: Experiment) -> None:
    """FedIT averages factors, which equals the product's average only for one update: then the base
    change FedSpine merges is FedIT's global adapter product."""
    strategy = exp.strategy
    assert isinstance(strategy, FedSpine)
    update = _train_pruned(exp, PLAN, 5, 4, 4)
    delta = _merged_delta(strategy, [update])
    fedit = STRATEGIES.get("fedit", "strategy.name")(weighting="samples")
    fedit.init_global(strategy.masks.kept_shapes(PLAN), 4, torch.Generator().manual_seed(0))
    partial = fedit.accumulate(fedit.init_partial(), update)
    fedit.finalize(partial)
    for module, factors in fedit.global_lora().items():
        product = _in_full(strategy, PLAN, module, factors["B"] @ factors["A"])
        torch.testing.assert_close(delta[module], product, **TOL)


@pytest.mark.parametrize("policy", ["pooled", "swucb", "random"])
def test_the_evaluated_and_deployed_models_hold_only_units_devices_trained(
    tmp_path: Path, policy: str
) -> None:
    """After calibration every accepted update trained a mask; the model evaluated at the target sparsity
    and every device's deployed model keep no unit that no accepted update trained."""
    from fedspine.metrics.records import RunRecorder
    from fedspine.runtime.engine import Engine

    config = load_config(
        ROOT / "configs" / "tiny.toml",
        [
            "strategy.name=fedspine",
            f"strategy.fedspine.policy={policy}",
            "scheduler.rounds=5",
            "data.max_examples=600",
            "data.test_size=60",
            "train.local_steps=2",
        ],
    )
    experiment = build_experiment(config)
    recorder = RunRecorder(tmp_path / "run")
    Engine(experiment, recorder).run()
    recorder.close()
    strategy = experiment.strategy
    assert isinstance(strategy, FedSpine)
    eval_plan = strategy.eval_plan()
    assert eval_plan is not None and strategy.untrained_units(eval_plan) == 0
    for device, arm in strategy.deployment([d.device_id for d in experiment.devices]).items():
        assert strategy.untrained_units(strategy.plan_for(arm.ratio)) == 0, f"device {device} at {arm}"
    assert sum(int(c.sum()) for c in strategy.coverage.values()) > 0


def test_a_device_that_syncs_holds_the_servers_base_on_every_unit_it_keeps(tmp_path: Path) -> None:
    """Replay every dispatch's :class:`BaseSync` on a replica of the device: starting from the pretrained
    weights, it adds the merges it missed on units it kept at its last task and copies the server's
    current rows of units it keeps anew. Its base must then equal the server's on what it keeps.
    Moving masks and random arms make devices gain and lose units between their tasks."""
    from fedspine.metrics.records import RunRecorder
    from fedspine.runtime.engine import Engine

    config = load_config(
        ROOT / "configs" / "tiny.toml",
        [
            "strategy.name=fedspine",
            "strategy.fedspine.policy=random",
            "strategy.fedspine.importance=taylor",
            "strategy.fedspine.freeze_mask=false",
            "strategy.fedspine.global_rank=0",
            f"lora.target_modules={ALL_LINEARS}",
            "scheduler.rounds=6",
            "scheduler.clients_per_round=3",
            "data.max_examples=600",
            "data.test_size=60",
            "train.local_steps=2",
            "eval.every=100",
            "run.checkpoint_every=0",  # the recording wrapper below is not picklable
        ],
    )
    experiment = build_experiment(config)
    strategy = experiment.strategy
    assert isinstance(strategy, FedSpine)
    modules = sorted(experiment.trainer.module_shapes)
    pretrained = experiment.trainer.executor.base_weights(modules)
    merges: list[dict[str, torch.Tensor]] = []
    take = strategy.take_base_delta

    def recording() -> dict[str, torch.Tensor] | None:
        delta = take()
        if delta is not None:
            merges.append({k: v.clone() for k, v in delta.items()})
        return delta

    strategy.take_base_delta = recording  # type: ignore[method-assign]
    recorder = RunRecorder(tmp_path / "run")
    Engine(experiment, recorder).run()
    recorder.close()

    def server(version: int) -> dict[str, torch.Tensor]:
        return {
            m: pretrained[m] + sum((d[m] for d in merges[:version]), torch.zeros_like(pretrained[m]))
            for m in modules
        }

    replicas: dict[int, dict[str, torch.Tensor]] = {}
    gained = 0
    for sync in strategy.sync_log:
        base = replicas.setdefault(sync.device_id, {m: w.clone() for m, w in pretrained.items()})
        current = server(sync.until)
        for module in modules:
            column = strategy.masks.is_column(module)
            fresh = strategy.fresh_units(sync, module)
            gained += fresh.numel()
            kept_now = _kept_index(strategy, sync.plan, module)
            size = base[module].shape[1 if column else 0]
            units = torch.arange(size) if kept_now is None else kept_now[1]
            carried = units[~torch.isin(units, fresh)]
            missed = sum((d[module] for d in merges[sync.since : sync.until]), torch.zeros_like(base[module]))
            dim = 1 if column else 0
            base[module].index_add_(dim, carried, missed.index_select(dim, carried))
            base[module].index_copy_(dim, fresh, current[module].index_select(dim, fresh))
            torch.testing.assert_close(
                base[module].index_select(dim, units), current[module].index_select(dim, units), **TOL
            )
    assert len(strategy.sync_log) >= 12 and len(merges) >= 5
    assert gained > 0  # devices did gain units between their tasks


def test_a_bounded_base_is_the_best_rank_r_approximation_of_the_exact_sum(exp: Experiment) -> None:
    """With ``global_rank = R`` the base carries, after every round, the best rank-R approximation of
    the sum of every round's exact aggregate: what the truncation left out of the first round counts in
    the second's (error feedback), so it is closer to the sum than re-truncating the truncated base."""
    exact = exp.strategy
    assert isinstance(exact, FedSpine) and exact.global_rank == 0
    bounded = FedSpine(
        exact.weighting,
        exact.masks,
        exact.policy,
        measure_importance=exact.measure_importance,
        freeze_mask=exact.freeze_mask,
        score_momentum=exact.score_momentum,
        compensate=exact.compensate,
    )
    bounded.global_rank = 2
    rounds = [
        [_train_pruned(exp, PLAN, device, 3, rank) for device, rank in ((0, 2), (2, 4))],
        [_train_pruned(exp, PLAN, 4, 4, 4)],
    ]
    total: dict[str, torch.Tensor] = {}
    carried: dict[str, torch.Tensor] = {}
    naive: dict[str, torch.Tensor] = {}
    for updates in rounds:
        step = _merged_delta(exact, updates)
        for module, value in _merged_delta(bounded, updates).items():
            carried[module] = carried.get(module, torch.zeros_like(value)) + value
        for module, value in step.items():
            total[module] = total.get(module, torch.zeros_like(value)) + value
            u, s, vh = torch.linalg.svd(total[module].double(), full_matrices=False)
            best = (u[:, :2] * s[:2]) @ vh[:2]
            torch.testing.assert_close(carried[module].double(), best, rtol=1e-4, atol=1e-6)
            assert int(torch.linalg.matrix_rank(carried[module].double(), rtol=1e-6)) <= 2
            u, s, vh = torch.linalg.svd((naive.get(module, 0) + value).double(), full_matrices=False)
            naive[module] = ((u[:, :2] * s[:2]) @ vh[:2]).float()
    assert any(int(torch.linalg.matrix_rank(v.double(), rtol=1e-6)) > 2 for v in total.values())
    feedback = sum(float((carried[m] - total[m]).norm() ** 2) for m in total)
    without = sum(float((naive[m] - total[m]).norm() ** 2) for m in total)
    assert feedback < without


def test_a_bounded_run_trains_every_device_on_the_servers_base(tmp_path: Path) -> None:
    """End to end with a bounded adapter: after the run the base minus the pretrained weights is the
    strategy's adapter (so a device that downloads the adapter's factors on its kept units holds the
    server's base there), of rank at most ``global_rank``, and the best rank-R approximation of the
    exact sum of aggregates the server keeps."""
    from fedspine.metrics.records import RunRecorder
    from fedspine.runtime.engine import Engine

    config = load_config(
        ROOT / "configs" / "tiny.toml",
        [
            "strategy.name=fedspine",
            "strategy.fedspine.policy=random",
            "strategy.fedspine.global_rank=3",
            f"lora.target_modules={ALL_LINEARS}",
            "scheduler.rounds=4",
            "data.max_examples=600",
            "data.test_size=60",
            "train.local_steps=2",
            "eval.every=100",
        ],
    )
    experiment = build_experiment(config)
    strategy = experiment.strategy
    assert isinstance(strategy, FedSpine)
    modules = sorted(experiment.trainer.module_shapes)
    pretrained = experiment.trainer.executor.base_weights(modules)
    recorder = RunRecorder(tmp_path / "run")
    Engine(experiment, recorder).run()
    recorder.close()
    assert strategy.global_rank == 3 and set(strategy.adapter) == set(modules)
    now = experiment.trainer.executor.base_weights(modules)
    for module in modules:
        a, b = strategy.adapter[module]
        assert a.shape[0] <= 3
        torch.testing.assert_close(now[module] - pretrained[module], b @ a, rtol=1e-4, atol=1e-5)
        u, s, vh = torch.linalg.svd(strategy.exact_sum[module].double(), full_matrices=False)
        torch.testing.assert_close((b @ a).double(), (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-6)
