"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head QK RMSNorm, no QKV
bias) with a mixture-of-experts MLP in every layer and no shared experts.

Routing as ``Qwen3MoeTopKRouter``: softmax over the router logits, top-k, renormalised to sum to
1 when ``norm_topk_prob`` (both released models) -- Megatron-Core's ``moe_router_pre_softmax``
False -- and kept as they are otherwise (``pre_softmax`` True). Experts are SwiGLU MLPs of width
``moe_intermediate_size``. Layers with a dense MLP (``mlp_only_layers``,
``decoder_sparse_step`` > 1) are refused: no released Qwen3-MoE has them.
"""

from __future__ import annotations

from megatron_simpo.families import qwen3
from megatron_simpo.families.base import FamilyDescriptor, KeyEntry, Refusal, only

_L = "model.layers.{i}.mlp."
_M = "decoder.layers.{i}.mlp."

#: The router and one expert (``{e}``) of Megatron's ``MoELayer`` over a ``SequentialMLP``.
MOE_KEYS: tuple[KeyEntry, ...] = (
    (_M + "router.weight", (_L + "gate.weight",), "copy"),
    (
        _M + "experts.local_experts.{e}.linear_fc1.weight",
        (_L + "experts.{e}.gate_proj.weight", _L + "experts.{e}.up_proj.weight"),
        "gate_up_fuse",
    ),
    (
        _M + "experts.local_experts.{e}.linear_fc2.weight",
        (_L + "experts.{e}.down_proj.weight",),
        "copy",
    ),
)

FAMILY = FamilyDescriptor(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    summary="Qwen3-MoE: Qwen3 attention, top-k softmax routing (norm_topk_prob), no shared experts",
    global_keys=qwen3.FAMILY.global_keys,
    layer_keys=tuple(e for e in qwen3.FAMILY.layer_keys if ".mlp." not in e[0]) + MOE_KEYS,
    layer_options={"qk_layernorm": True},
    aliases={"num_local_experts": "num_experts"},
    hf_fixed={"hidden_act": "silu", "attention_bias": False},
    refusals=(
        only("decoder_sparse_step", 1, "every layer must be a mixture-of-experts layer"),
        Refusal(
            "mlp_only_layers",
            lambda raw: bool(raw.get("mlp_only_layers")),
            "dense-MLP layers between MoE layers are not supported",
        ),
    ),
    moe=True,
)
