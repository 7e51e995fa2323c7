"""Structured width pruning: plans, physical slicing, equivalence with masking, LoRA scatter."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from fedspine.errors import ModelError
from fedspine.model.load import build_tiny_llama
from fedspine.model.pruning import (
    LayerKeep,
    decoder_layers,
    gather_kept,
    index_maps,
    kept_count,
    magnitude_scores,
    masked_model,
    plan_from_scores,
    prune_model,
    scatter_to_full,
    shape_of,
)

LAYERS, INTERMEDIATE = 3, 128
GQA_HIDDEN = 96  # transformers requires hidden % heads == 0, so 6 heads need a width other than 64


def tiny(heads: int = 4, kv_heads: int = 2, hidden: int = 64) -> Any:
    model, _ = build_tiny_llama(
        hidden=hidden, layers=LAYERS, heads=heads, kv_heads=kv_heads, intermediate=INTERMEDIATE, seed=0
    )
    return model


def gqa() -> Any:
    """Six query heads over two KV heads (groups of 3, head_dim 16), as in SmolLM2's 9/3 layout."""
    return tiny(6, 2, GQA_HIDDEN)


@pytest.fixture(params=[(4, 2, 64), (6, 2, GQA_HIDDEN)], ids=["groups-of-2", "gqa-groups-of-3"])
def model(request: pytest.FixtureRequest) -> Any:
    return tiny(*request.param)


def block(model: Any, layer: int) -> Any:
    """Decoder block ``layer`` (typed ``Any``: torch types submodules as ``Tensor | Module``)."""
    return decoder_layers(model)[layer]


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 384, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding on the second row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**batch()).logits
    return out


def num_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def test_ratio_zero_keeps_logits(model: Any) -> None:
    plan = plan_from_scores(*magnitude_scores(model), ratio=0.0)

    pruned = prune_model(model, plan)

    assert all(len(k.kv_groups) == model.config.num_key_value_heads for k in plan.values())
    assert torch.equal(logits(pruned), logits(model))
    assert num_params(pruned) == num_params(model)


def test_pruned_shapes(model: Any) -> None:
    shape = shape_of(model)
    hidden = shape.hidden
    group_size = shape.heads // shape.kv_heads
    plan = plan_from_scores(*magnitude_scores(model), ratio=0.5, dense_layers=[0])

    pruned = prune_model(model, plan)

    for layer, keep in plan.items():
        attn, mlp = block(pruned, layer).self_attn, block(pruned, layer).mlp
        q_rows = len(keep.kv_groups) * group_size * shape.head_dim
        kv_rows = len(keep.kv_groups) * shape.head_dim
        assert attn.q_proj.weight.shape == (q_rows, hidden) and attn.q_proj.out_features == q_rows
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (kv_rows, hidden)
        assert attn.o_proj.weight.shape == (hidden, q_rows) and attn.o_proj.in_features == q_rows
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (len(keep.channels), hidden)
        assert mlp.down_proj.weight.shape == (hidden, len(keep.channels))
    assert len(plan[1].kv_groups) == 1 and len(plan[1].channels) == INTERMEDIATE // 2


def test_pruned_equals_masked_dense(model: Any) -> None:
    plan = plan_from_scores(*magnitude_scores(model), ratio=0.5, dense_layers=[0])

    pruned, masked = prune_model(model, plan), masked_model(model, plan)

    assert num_params(pruned) < num_params(model)
    torch.testing.assert_close(logits(pruned), logits(masked), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(masked), logits(model), atol=1e-3)  # pruning does change the function


def test_equivalence_with_random_keeps_and_biases() -> None:
    model = gqa()
    model.config.attention_bias = True
    for layer in decoder_layers(model):  # give attention a bias, so the bias slicing is exercised too
        for name in ("q_proj", "k_proj", "v_proj"):
            linear = getattr(layer.self_attn, name)
            linear.bias = torch.nn.Parameter(torch.randn(linear.out_features), requires_grad=False)
    plan = {1: LayerKeep(kv_groups=(1,), channels=(3, 17, 64, 100)), 2: LayerKeep((0,), (0,))}

    torch.testing.assert_close(
        logits(prune_model(model, plan)), logits(masked_model(model, plan)), atol=1e-5, rtol=0
    )


def test_dense_layers_stay_dense(model: Any) -> None:
    plan = plan_from_scores(*magnitude_scores(model), ratio=0.5, dense_layers=[0, -1])

    pruned = prune_model(model, plan)

    assert set(plan) == {1}
    for layer in (0, LAYERS - 1):
        for name, param in decoder_layers(model)[layer].named_parameters():
            assert torch.equal(param, decoder_layers(pruned)[layer].get_parameter(name)), name


def test_original_model_unchanged(model: Any) -> None:
    before = {name: param.clone() for name, param in model.state_dict().items()}
    plan = plan_from_scores(*magnitude_scores(model), ratio=0.5)

    prune_model(model, plan)
    masked_model(model, plan)

    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize(
    ("full", "ratio", "multiple", "expected"),
    [
        (128, 0.5, 1, 64),
        (128, 0.3, 1, 90),  # 89.6 rounds to nearest
        (128, 0.3, 32, 96),  # 89.6 -> nearest multiple of 32
        (128, 0.6, 32, 64),  # 51.2 -> 64
        (128, 0.99, 32, 32),  # never below one multiple
        (130, 0.0, 64, 130),  # ratio 0 keeps everything, even off-multiple
        (130, 0.01, 64, 128),
        (20, 0.5, 32, 20),  # never above the full width
        (2, 1.0, 1, 1),  # at least one unit survives
    ],
)
def test_kept_count_rounding(full: int, ratio: float, multiple: int, expected: int) -> None:
    assert kept_count(full, ratio, multiple) == expected


def test_plan_channels_round_to_multiple() -> None:
    scores = [torch.rand(2)], [torch.rand(INTERMEDIATE)]

    plan = plan_from_scores(*scores, ratio=0.3, multiple=32)

    assert len(plan[0].channels) == 96 and len(plan[0].kv_groups) == 1


def test_plans_are_nested() -> None:
    generator = torch.Generator().manual_seed(3)
    heads = [torch.rand(6, generator=generator) for _ in range(LAYERS)]
    channels = [torch.randint(0, 5, (INTERMEDIATE,), generator=generator).float() for _ in range(LAYERS)]
    ratios = [0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 0.9, 1.0]  # integer channel scores: many ties

    plans = [plan_from_scores(heads, channels, ratio, multiple=8) for ratio in ratios]

    for looser, tighter in itertools.pairwise(plans):
        for layer in range(LAYERS):
            assert set(tighter[layer].kv_groups) <= set(looser[layer].kv_groups)
            assert set(tighter[layer].channels) <= set(looser[layer].channels)


def test_plan_keeps_highest_scores() -> None:
    plan = plan_from_scores([torch.tensor([0.1, 0.9, 0.5])], [torch.tensor([3.0, 1.0, 2.0, 0.0])], 0.5)

    assert plan[0] == LayerKeep(kv_groups=(1, 2), channels=(0, 2))


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(ModelError):
        plan_from_scores([torch.rand(2)], [], ratio=0.5)
    with pytest.raises(ModelError):
        plan_from_scores([torch.rand(2)], [torch.rand(4)], ratio=1.5)
    with pytest.raises(ModelError):
        LayerKeep(kv_groups=(1, 0), channels=(0,))


def test_magnitude_scores_shapes_and_zeroed_group() -> None:
    model = gqa()
    masked = masked_model(model, {0: LayerKeep(kv_groups=(1,), channels=tuple(range(1, INTERMEDIATE)))})

    heads, channels = magnitude_scores(masked)

    assert [h.shape for h in heads] == [torch.Size([2])] * LAYERS
    assert [c.shape for c in channels] == [torch.Size([INTERMEDIATE])] * LAYERS
    assert heads[0][0] == 0 and heads[0][1] > 0 and channels[0][0] == 0 and channels[0][1] > 0


def test_index_maps_cover_gqa_groups() -> None:
    shape = shape_of(gqa())  # group size 3, head_dim 96 // 6 = 16
    maps = index_maps({1: LayerKeep(kv_groups=(1,), channels=(5, 7))}, shape)

    assert torch.equal(maps[1]["q_proj"], torch.arange(48, 96))  # query heads 3, 4, 5
    assert torch.equal(maps[1]["k_proj"], torch.arange(16, 32))
    assert torch.equal(maps[1]["o_proj"], maps[1]["q_proj"])
    assert maps[1]["down_proj"].tolist() == [5, 7]
    assert torch.equal(maps[0]["q_proj"], torch.arange(96))  # dense layer: every index


def test_scatter_places_lora_factors() -> None:
    model = gqa()
    plan = {1: LayerKeep(kv_groups=(1,), channels=(5, 7, 9))}
    pruned = block(prune_model(model, plan), 1)
    maps = index_maps(plan, shape_of(model))[1]
    rank = 4
    lora_b = torch.randn(pruned.self_attn.q_proj.out_features, rank)  # (kept_out, r)
    lora_a = torch.randn(rank, pruned.mlp.down_proj.in_features)  # (r, kept_in)

    full_b = scatter_to_full(lora_b, maps["q_proj"], GQA_HIDDEN, dim=0)  # (full_out, r)
    full_a = scatter_to_full(lora_a, maps["down_proj"], INTERMEDIATE, dim=1)  # (r, full_in)

    assert torch.equal(full_b[48:], lora_b) and not full_b[:48].any()
    assert torch.equal(full_a[:, [5, 7, 9]], lora_a)
    assert full_a.count_nonzero() == lora_a.count_nonzero()
    assert torch.equal(gather_kept(full_b, maps["q_proj"], dim=0), lora_b)
    # The scattered product acts on the dense weight exactly where the pruned one acted.
    dense_q = block(model, 1).self_attn.q_proj.weight
    assert torch.equal(gather_kept(dense_q, maps["q_proj"], dim=0), pruned.self_attn.q_proj.weight)
    with pytest.raises(ModelError):
        scatter_to_full(lora_b, maps["k_proj"], 32, dim=0)


def test_pruned_model_trains() -> None:
    model = gqa()
    pruned = prune_model(model, plan_from_scores(*magnitude_scores(model), ratio=0.5))
    pruned.requires_grad_(True)

    loss = pruned(**batch(), labels=batch()["input_ids"]).loss
    loss.backward()

    grad = block(pruned, 1).self_attn.q_proj.weight.grad
    assert grad is not None and grad.shape == (48, GQA_HIDDEN)


def test_auto_dense_layers_keep_the_first_tenth_and_the_last_layer_of_larger_models() -> None:
    from fedspine.model.pruning import dense_layer_indices

    assert dense_layer_indices("auto", 30) == (0, 1, 2, 29)  # SmolLM2-135M
    assert dense_layer_indices("auto", 32) == (0, 1, 2, 31)
    assert dense_layer_indices("auto", 9) == ()  # small models: nothing measured, nothing kept
    assert dense_layer_indices([0, -1], 4) == (0, 3)
