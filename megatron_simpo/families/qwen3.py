"""Qwen3 (dense): the Llama architecture with an RMSNorm over each query and key head (before
RoPE), no QKV bias: Megatron-Core's ``qk_layernorm`` (``q_layernorm`` / ``k_layernorm``)."""

from __future__ import annotations

from megatron_simpo.families import llama
from megatron_simpo.families.base import FamilyDescriptor, KeyEntry

_L = "model.layers.{i}."
_M = "decoder.layers.{i}.self_attention."

#: One ``[head_dim]`` weight each, shared by every head (so replicated over TP ranks).
QK_NORM_KEYS: tuple[KeyEntry, ...] = (
    (_M + "q_layernorm.weight", (_L + "self_attn.q_norm.weight",), "copy"),
    (_M + "k_layernorm.weight", (_L + "self_attn.k_norm.weight",), "copy"),
)

FAMILY = FamilyDescriptor(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    summary="Qwen3 dense: per-head QK RMSNorm, no QKV bias, tied or untied (no sliding window)",
    global_keys=llama.GLOBAL_KEYS,
    layer_keys=llama.LAYER_KEYS + QK_NORM_KEYS,
    layer_options={"qk_layernorm": True},
    hf_fixed={"hidden_act": "silu", "attention_bias": False},
)
