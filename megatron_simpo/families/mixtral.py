"""Mixtral (8x7B, 8x22B): the Mistral architecture with a mixture-of-experts MLP in every layer.

Routing as ``MixtralTopKRouter`` does it: softmax over the router logits, top-k, the k kept
probabilities renormalised to sum to 1 -- Megatron-Core's default ``softmax`` top-k with
``moe_router_pre_softmax=False`` (softmax over the k largest logits, the same numbers). Each
expert is a SwiGLU MLP (``w1`` gate, ``w3`` up, ``w2`` down) of width ``intermediate_size``; no
shared experts, no token dropping. The Hub format keeps one tensor per expert
(``block_sparse_moe.experts.{e}.w1``); Megatron's ``SequentialMLP`` names them
``mlp.experts.local_experts.{e}`` (EP=1 names; the dist checkpoint stacks them along an expert
axis that expert parallelism shards, ``megatron_simpo/convert``).
"""

from __future__ import annotations

from megatron_simpo.families import llama, mistral
from megatron_simpo.families.base import FamilyDescriptor, KeyEntry, unset

_L = "model.layers.{i}.block_sparse_moe."
_M = "decoder.layers.{i}.mlp."

#: The router and one expert (``{e}``): Megatron's ``MoELayer`` over a ``SequentialMLP``.
MOE_KEYS: tuple[KeyEntry, ...] = (
    (_M + "router.weight", (_L + "gate.weight",), "copy"),
    (
        _M + "experts.local_experts.{e}.linear_fc1.weight",
        (_L + "experts.{e}.w1.weight", _L + "experts.{e}.w3.weight"),
        "gate_up_fuse",
    ),
    (_M + "experts.local_experts.{e}.linear_fc2.weight", (_L + "experts.{e}.w2.weight",), "copy"),
)

#: Llama's layer keys without the dense MLP.
ATTENTION_KEYS: tuple[KeyEntry, ...] = tuple(e for e in llama.LAYER_KEYS if ".mlp." not in e[0])

FAMILY = FamilyDescriptor(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    summary="Mixtral: top-k softmax routing (renormalised), SwiGLU experts, no sliding window",
    global_keys=llama.GLOBAL_KEYS,
    layer_keys=ATTENTION_KEYS + MOE_KEYS,
    hf_fixed={"hidden_act": "silu"},
    renames={"num_local_experts": "num_experts"},
    refusals=(
        *mistral.FAMILY.refusals,
        unset("router_jitter_noise", "router jitter noise is not reproduced in training"),
    ),
    moe=True,
    moe_fixed={"norm_topk_prob": True, "moe_intermediate_size": None},
)
