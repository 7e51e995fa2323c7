"""A Llama whose decoder layers keep different widths: how a model pruned with dense layers is saved.

transformers' ``LlamaConfig`` holds one intermediate size and one number of KV heads for every layer, so a
model pruned everywhere but a few layers (``strategy.fedspine.dense_layers``) has no stock config. Its
saved directory holds this file beside the weights; the config lists each layer's ``[kv_heads,
intermediate]`` in ``layer_widths`` and names these classes in ``auto_map``, so plain transformers loads
it::

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

This is the mechanism of other models with per-layer widths on the Hugging Face hub (OpenELM,
Nemotron-NAS). The file imports only torch and transformers: it is copied verbatim into every saved
directory, and it must stay loadable there without fedspine.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class LayerwiseLlamaConfig(LlamaConfig):
    """A ``LlamaConfig`` whose ``layer_widths[i] = [kv_heads, intermediate]`` overrides layer ``i``'s widths;
    the scalar fields describe the unpruned model (attention's group size and head size come from them)."""

    model_type = "layerwise_llama"

    def __init__(self, layer_widths: list[list[int]] | None = None, **kwargs: Any) -> None:
        self.layer_widths = [[int(kv), int(channels)] for kv, channels in layer_widths or []]
        super().__init__(**kwargs)


class LayerwiseLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with each decoder layer's projections sized from ``config.layer_widths``.

    Attention reshapes with ``-1`` heads and every layer keeps the model's group size, so only the linear
    layers' shapes change; the forward pass is Llama's.
    """

    config_class = LayerwiseLlamaConfig

    def __init__(self, config: LayerwiseLlamaConfig) -> None:
        super().__init__(config)
        c = config
        if len(c.layer_widths) != c.num_hidden_layers:
            raise ValueError(
                f"layer_widths has {len(c.layer_widths)} entries for {c.num_hidden_layers} layers"
            )
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = c.num_key_value_heads
        if kv_heads is None:  # LlamaConfig sets it (to num_attention_heads when not given)
            raise ValueError("num_key_value_heads is not set")
        group = c.num_attention_heads // kv_heads
        hidden = c.hidden_size
        for layer, (kv, channels) in zip(self.model.layers, c.layer_widths, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            bias = bool(c.attention_bias)
            attn.q_proj = nn.Linear(hidden, kv * group * head_dim, bias=bias)
            attn.k_proj = nn.Linear(hidden, kv * head_dim, bias=bias)
            attn.v_proj = nn.Linear(hidden, kv * head_dim, bias=bias)
            attn.o_proj = nn.Linear(kv * group * head_dim, hidden, bias=bias)
            bias = bool(c.mlp_bias)
            mlp.gate_proj = nn.Linear(hidden, channels, bias=bias)
            mlp.up_proj = nn.Linear(hidden, channels, bias=bias)
            mlp.down_proj = nn.Linear(channels, hidden, bias=bias)
        self.post_init()  # type: ignore[no-untyped-call]


__all__ = ["LayerwiseLlamaConfig", "LayerwiseLlamaForCausalLM"]
