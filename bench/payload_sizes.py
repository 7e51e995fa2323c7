"""Uplink bytes of one update of the default experiment's adapter (SmolLM2-135M, rank 8, every linear
layer) under each codec: the safetensors serialisation of the payloads, header included.

The sizes depend on the codec and the adapter's shapes only, not on the values, so random factors are
used and no model weights are loaded. Module keys have the same form as the real peft module names.

Usage:
    python bench/payload_sizes.py
"""

from __future__ import annotations

import argparse

import torch

from _benchpath import host_line  # first: keeps bench/ off sys.path
from fedspine.algorithms.compression import ErrorFeedback, UplinkChannel, make_codec
from fedspine.algorithms.wire import update_payload_bytes
from fedspine.config import load_config
from fedspine.model.load import default_cache_dir, resolve_model_config
from fedspine.types import ClientUpdate

SETTINGS = [("topk", "none"), ("randk", "ef"), ("sign", "ef"), ("qsgd", "none"), ("int8", "none")]
"""Top-k and random-k keep 10%, QSGD has 16 levels: the settings of bench/compression.py."""


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(host_line())
    cfg = load_config(None)
    mc = resolve_model_config("smollm2", None, default_cache_dir(), {})
    h, inter = mc.hidden_size, mc.intermediate_size
    kv = mc.num_key_value_heads * (h // mc.num_attention_heads)
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    rank = cfg.lora.rank
    g = torch.Generator().manual_seed(0)
    start, trained = {}, {}
    for layer in range(mc.num_hidden_layers):
        for name, (out_f, in_f) in shapes.items():
            module = f"base_model.model.model.layers.{layer}.{name}"
            a = torch.randn(rank, in_f, generator=g) * 0.02
            start[module] = {"A": a, "B": torch.zeros(out_f, rank)}
            trained[module] = {
                "A": a + 1e-3 * torch.randn(rank, in_f, generator=g),
                "B": 1e-3 * torch.randn(out_f, rank, generator=g),
            }
    update = ClientUpdate(1, 0, 10, trained, 0, 0.0, 0, 0.0, lora_rank=rank, lora_scaling=2.0)
    dense = update_payload_bytes(update)
    print(f"none: {dense} bytes")
    line = [f"dense_bytes={dense}"]
    for codec, feedback in SETTINGS:
        channel = UplinkChannel(ErrorFeedback(make_codec(codec, 0.1, 16), feedback))  # type: ignore[arg-type]
        sent = update_payload_bytes(channel.transmit(update, start, torch.Generator().manual_seed(1)))
        print(f"{codec}: {sent} bytes, {dense / sent:.2f}x fewer")
        line.append(f"{codec}_reduction={dense / sent:.2f}")
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
