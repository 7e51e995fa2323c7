"""FLAP bias compensation: a removed MLP channel's mean output kept as a bias of down_proj."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedspine.algorithms.policies import SlidingWindowUCB
from fedspine.algorithms.validation import check_update
from fedspine.algorithms.wire import update_payload_bytes
from fedspine.api import run_experiment
from fedspine.config import FedSpineSection, load_config
from fedspine.deploy.records import Timing, read_task, read_update, task_record, update_record
from fedspine.errors import ConfigError, DeployError
from fedspine.model.importance import FlapMeter
from fedspine.model.pruning import (
    LayerKeep,
    add_zero_mlp_biases,
    decoder_layers,
    magnitude_scores,
    plan_from_scores,
    prune_model,
    pruned_hf_config,
    shape_of,
)
from fedspine.runtime.experiment.algorithms import pruning_strategy
from fedspine.types import ClientTask, ClientUpdate, DeviceLora
from tests.test_fedspine import HEAD_DIM, INTER, LAYERS, adapted, masks_for, tiny, tokens


def mlp_inputs(model: Any, seed: int = 0) -> list[torch.Tensor]:
    """Per layer, the ``down_proj`` inputs (tokens x channels) of a forward pass of ``tokens(seed)``."""
    seen: list[torch.Tensor] = []
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, inp: seen.append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
        )
        for layer in decoder_layers(model)
    ]
    with torch.no_grad():
        model(**tokens(seed))
    for handle in handles:
        handle.remove()
    return seen


def test_compensation_keeps_each_mlps_mean_output_over_the_calibration_tokens() -> None:
    model = tiny()
    means = [x.mean(0) for x in mlp_inputs(model)]
    plan = plan_from_scores(*magnitude_scores(model), ratio=0.5)
    plain = prune_model(model, plan)
    kept = prune_model(model, plan, channel_means=means)
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for layer in range(LAYERS):
        mlp = decoder_layers(model)[layer].mlp
        inputs = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        with torch.no_grad():
            dense = mlp.down_proj(inputs)
            # Over inputs whose channel activations average to `means`, the compensated MLP's mean
            # output equals the dense one's: compare against the dense MLP with the removed channels
            # replaced by those means.
            removed = torch.ones(INTER, dtype=torch.bool)
            removed[list(plan[layer].channels)] = False
            replaced = inputs.clone()
            replaced[:, removed] = means[layer][removed]
            want = mlp.down_proj(replaced)
            got = decoder_layers(kept)[layer].mlp(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(decoder_layers(plain)[layer].mlp(x), want, atol=1e-4)
            assert not torch.allclose(got, dense, atol=1e-6)  # the removed channels' variation is gone


def test_the_flap_meter_reports_the_mean_input_of_every_kept_channel() -> None:
    model = tiny()
    peft = adapted(copy.deepcopy(model), ["down_proj"])
    with FlapMeter(peft, HEAD_DIM) as meter:
        peft(**tokens())
    want = mlp_inputs(peft.get_base_model())  # the same module objects, hooked through the wrapper
    for layer, means in enumerate(meter.channel_means()):
        torch.testing.assert_close(means, want[layer].double().mean(0).float(), rtol=1e-5, atol=1e-7)


STATE = {"m.q_proj": {"A": torch.zeros(2, 8), "B": torch.zeros(6, 2)}}


def _update(
    importance: dict[str, list[torch.Tensor]], plan: Any, samples: int = 10, state: Any = None
) -> ClientUpdate:
    return ClientUpdate(1, 0, samples, state or {}, 0, 0.0, 0, 0.0, 2, 1.0, plan=plan, importance=importance)


def _scores(means: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    return {
        "heads": [torch.ones(2) for _ in means],
        "channels": [torch.ones(INTER) for _ in means],
        "means": means,
    }


def test_channel_means_may_be_negative_but_must_be_finite_and_one_per_channel() -> None:
    shape = shape_of(tiny())
    task = ClientTask(1, 0, 2, DeviceLora(2, 1.0), STATE, 0)
    good = _update(_scores([-torch.rand(INTER) for _ in range(LAYERS)]), None, state=STATE)
    assert check_update(good, task, shape=shape) is None
    nan = _scores([torch.full((INTER,), float("nan")) for _ in range(LAYERS)])
    assert "finite" in (check_update(_update(nan, None, state=STATE), task, shape=shape) or "")
    short = _scores([torch.zeros(INTER - 1) for _ in range(LAYERS)])
    assert "units" in (check_update(_update(short, None, state=STATE), task, shape=shape) or "")
    extra = {**_scores([torch.zeros(INTER) for _ in range(LAYERS)]), "biases": [torch.zeros(INTER)]}
    assert "unknown" in (check_update(_update(extra, None, state=STATE), task, shape=shape) or "")
    one_layer = _scores([torch.zeros(INTER)])
    assert "layers" in (check_update(_update(one_layer, None, state=STATE), task, shape=shape) or "")


def test_fedspine_averages_channel_means_over_the_devices_that_kept_each_channel() -> None:
    model = tiny()
    section = FedSpineSection(importance="flap", compensate=True, granularity="channels")
    half: Any = {layer: LayerKeep((0, 1), tuple(range(INTER // 2))) for layer in range(LAYERS)}
    ones = [torch.ones(INTER) for _ in range(LAYERS)]
    threes = [torch.full((INTER,), 3.0) for _ in range(LAYERS)]
    strategies = {}
    for compensate in (True, False):
        settings = replace(section, compensate=compensate)
        strategy = pruning_strategy(
            "fedspine", "samples", settings, masks_for(model, settings), SlidingWindowUCB([0.0], [2])
        )
        partial = strategy.init_partial()
        partial = strategy.accumulate(partial, _update(_scores(ones), None, samples=10))
        partial = strategy.accumulate(partial, _update(_scores(threes), half, samples=30))
        strategy.finalize(partial)
        strategies[compensate] = strategy
    means = strategies[True].channel_means()
    assert means is not None and strategies[False].channel_means() is None
    torch.testing.assert_close(means[0][: INTER // 2], torch.full((INTER // 2,), 2.5))  # (10*1 + 30*3) / 40
    torch.testing.assert_close(means[0][INTER // 2 :], torch.ones(INTER // 2))  # only the dense device

    sent = {}
    for compensate, strategy in strategies.items():
        lora = strategy.assign(2, 0, DeviceLora(2, 1.0)).lora
        sent[compensate] = strategy.configure(2, 0, lora, torch.Generator().manual_seed(0)).downlink_bytes
    assert sent[True] - sent[False] == 4 * INTER * LAYERS  # every layer's means travel with the task


def test_compensation_needs_flap_importance() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.fedspine\.compensate"):
        load_config(None, ["strategy.fedspine.compensate=true", "strategy.fedspine.importance=taylor"])


def test_channel_means_travel_to_and_from_a_device_and_are_charged_on_the_uplink() -> None:
    means = [torch.randn(INTER) for _ in range(LAYERS)]
    task = ClientTask(
        1, 0, 2, DeviceLora(2, 1.0), {}, 0, plan={0: LayerKeep((0,), (1, 2))}, channel_means=means
    )
    back, _, _ = read_task(task_record(task, {}, 0.0))
    assert back.channel_means is not None
    for a, b in zip(back.channel_means, means, strict=True):
        assert torch.equal(a, b)
    update = _update(_scores(means), None)
    returned, _ = read_update(update_record(update, Timing(0, 1, 0)), task)
    assert returned.importance is not None and torch.equal(returned.importance["means"][1], means[1])
    bad = ClientTask(
        1, 0, 2, DeviceLora(2, 1.0), {}, 0, plan=task.plan, channel_means=[torch.tensor([float("inf")])]
    )
    with pytest.raises(DeployError, match="finite"):
        read_task(task_record(bad, {}, 0.0))
    without = _update({k: v for k, v in _scores(means).items() if k != "means"}, None)
    assert update_payload_bytes(update) >= update_payload_bytes(without) + 4 * INTER * LAYERS


def test_a_compensated_model_saves_and_loads_with_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny()
    means = [x.mean(0) for x in mlp_inputs(model)]
    plan = plan_from_scores(*magnitude_scores(model), ratio=0.5)
    pruned = prune_model(model, plan, channel_means=means)
    add_zero_mlp_biases(pruned)
    pruned.config = pruned_hf_config(pruned.config, plan, mlp_bias=True)
    pruned.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.mlp_bias
    torch.testing.assert_close(loaded(**tokens()).logits, pruned(**tokens()).logits)


def test_a_fedspine_run_with_compensation_evaluates_and_deploys_compensated_models(
    tmp_path: Path, tiny_config: Any
) -> None:
    from transformers import AutoModelForCausalLM

    fedspine = replace(tiny_config.strategy.fedspine, compensate=True, dense_layers=[0])
    config = replace(tiny_config, strategy=replace(tiny_config.strategy, name="fedspine", fedspine=fedspine))
    result = run_experiment(config, tmp_path / "run")
    manifest = json.loads((result.run_dir / "models" / "manifest.json").read_text())
    entry = manifest["models"][0]
    assert entry["saved"] and entry["format"] == "layerwise_llama"  # layer 0 dense: widths differ
    loaded = AutoModelForCausalLM.from_pretrained(
        result.run_dir / "models" / entry["dir"], trust_remote_code=True
    )
    assert sum(p.numel() for p in loaded.parameters()) == entry["parameters"]
    assert loaded.config.mlp_bias
    biases = [layer.mlp.down_proj.bias for layer in decoder_layers(loaded)]
    assert all(b is not None for b in biases) and any(float(b.detach().abs().sum()) > 0 for b in biases)
    gate_biases = [layer.mlp.gate_proj.bias for layer in decoder_layers(loaded)]
    assert all(b is not None and float(b.detach().abs().sum()) == 0 for b in gate_biases)


@pytest.mark.parametrize(
    ("overrides", "compensates"),
    [
        ([], True),  # auto, with the default FLAP importance
        (["strategy.fedspine.importance=magnitude"], False),  # auto: no means measured, none used
        (["strategy.fedspine.compensate=false"], False),
        (["strategy.fedspine.compensate=true"], True),
    ],
)
def test_compensation_is_on_with_flap_unless_turned_off(overrides: list[str], compensates: bool) -> None:
    assert load_config(None, overrides).strategy.fedspine.compensates is compensates
