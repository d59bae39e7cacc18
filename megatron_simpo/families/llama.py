"""Llama 2/3/3.1/3.2 (Llama-3 RoPE scaling included): the base architecture of every family here.

Its key map is the one the other families extend: RMSNorm, fused QKV packed per query group,
SwiGLU gate/up fused into ``linear_fc1``, vocabulary padded for tensor parallelism.
"""

from __future__ import annotations

from megatron_simpo.families.base import FamilyDescriptor, KeyEntry

_L = "model.layers.{i}."
_M = "decoder.layers.{i}."

GLOBAL_KEYS: tuple[KeyEntry, ...] = (
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "pad_vocab"),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    ("output_layer.weight", ("lm_head.weight",), "pad_vocab"),
)
LAYER_KEYS: tuple[KeyEntry, ...] = (
    (_M + "input_layernorm.weight", (_L + "input_layernorm.weight",), "copy"),
    (
        _M + "self_attention.linear_qkv.weight",
        tuple(_L + f"self_attn.{x}_proj.weight" for x in "qkv"),
        "qkv_pack",
    ),
    (_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), "copy"),
    (_M + "pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",), "copy"),
    (
        _M + "mlp.linear_fc1.weight",
        (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
        "gate_up_fuse",
    ),
    (_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), "copy"),
)
#: What every Llama-architecture family without biases writes into an exported config.
HF_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}

FAMILY = FamilyDescriptor(
    model_type="llama",
    architecture="LlamaForCausalLM",
    summary="Llama 2/3/3.1/3.2: GQA or MHA, tied or untied, Llama-3 RoPE scaling",
    global_keys=GLOBAL_KEYS,
    layer_keys=LAYER_KEYS,
    hf_fixed=HF_FIXED,
)
