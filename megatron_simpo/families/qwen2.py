"""Qwen2 / Qwen2.5: the Llama architecture with biases on the query/key/value projections."""

from __future__ import annotations

from megatron_simpo.families import llama
from megatron_simpo.families.base import FamilyDescriptor, KeyEntry, only

_L = "model.layers.{i}."

#: The q/k/v biases, packed like the weights.
QKV_BIAS_KEYS: tuple[KeyEntry, ...] = (
    (
        "decoder.layers.{i}.self_attention.linear_qkv.bias",
        (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
        "qkv_pack",
    ),
)

FAMILY = FamilyDescriptor(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    summary="Qwen2 / Qwen2.5: QKV biases (no sliding window)",
    global_keys=llama.GLOBAL_KEYS,
    layer_keys=llama.LAYER_KEYS + QKV_BIAS_KEYS,
    layer_options={"qkv_bias": True},
    hf_fixed={"hidden_act": "silu"},
    refusals=(
        only("attention_bias", True, "Qwen2 has biases on q/k/v"),
        only("mlp_bias", False, "no MLP biases in this architecture"),
    ),
)
