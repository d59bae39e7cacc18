"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (QKV biases) with a
mixture-of-experts MLP in every layer that also has a gated shared expert.

Routing as ``Qwen2MoeTopKRouter``: softmax over the router logits, top-k, renormalised only when
``norm_topk_prob`` (false in the released models and transformers' default: the k probabilities
of the full softmax, as they are -- Megatron-Core's ``moe_router_pre_softmax`` True). Routed
experts are SwiGLU MLPs of width ``moe_intermediate_size``. Every token also goes through the
shared expert, a SwiGLU MLP of width ``shared_expert_intermediate_size`` whose output is scaled
by ``sigmoid(x @ shared_expert_gate.weight^T)``: Megatron-Core's ``SharedExpertMLP`` with
``moe_shared_expert_gate`` (its ``gate_weight``, ``[1, hidden]``, computes exactly that). Dense
layers (``mlp_only_layers``, ``decoder_sparse_step`` > 1) are refused: no released model has
them. ``router_aux_loss_coef`` is not read: the load-balancing loss is the trainer's
``--moe-aux-loss-coeff``. MoE fields absent from ``config.json`` are refused rather than
defaulted (transformers' defaults are Qwen1.5-MoE-A2.7B's, not this trainer's).
"""

from __future__ import annotations

from megatron_simpo.families import qwen2, qwen3_moe
from megatron_simpo.families.base import FamilyDescriptor, KeyEntry, Refusal, only

_L = "model.layers.{i}.mlp."
_M = "decoder.layers.{i}.mlp."

#: The shared expert and its gate (``SharedExpertMLP`` in Megatron's ``MoELayer``).
SHARED_EXPERT_KEYS: tuple[KeyEntry, ...] = (
    (
        _M + "shared_experts.linear_fc1.weight",
        (_L + "shared_expert.gate_proj.weight", _L + "shared_expert.up_proj.weight"),
        "gate_up_fuse",
    ),
    (_M + "shared_experts.linear_fc2.weight", (_L + "shared_expert.down_proj.weight",), "copy"),
    (_M + "shared_experts.gate_weight", (_L + "shared_expert_gate.weight",), "copy"),
)


def _absent(name: str) -> Refusal:
    return Refusal(
        name,
        lambda raw: raw.get(name) is None,
        "missing from config.json; write it there (transformers would assume Qwen1.5-MoE's)",
    )


FAMILY = FamilyDescriptor(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    summary="Qwen2-MoE: QKV biases, top-k softmax routing (norm_topk_prob), a gated shared expert",
    global_keys=qwen2.FAMILY.global_keys,
    layer_keys=tuple(e for e in qwen2.FAMILY.layer_keys if ".mlp." not in e[0])
    + qwen3_moe.MOE_KEYS
    + SHARED_EXPERT_KEYS,
    layer_options={"qkv_bias": True, "shared_expert_gate": True},
    # qkv_bias is a Qwen2-MoE config field (Qwen2's is implied): written on export.
    hf_fixed={"hidden_act": "silu", "qkv_bias": True},
    refusals=(
        *(
            _absent(n)
            for n in (
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "shared_expert_intermediate_size",
                "norm_topk_prob",
            )
        ),
        Refusal(
            "num_experts",
            lambda raw: raw["num_experts"] < 1,
            "no experts: every layer dense (convert it as a qwen2 model)",
        ),
        Refusal(
            "shared_expert_intermediate_size",
            lambda raw: raw["shared_expert_intermediate_size"] < 1,
            "a shared expert of width 0 is not built (Megatron-Core needs a positive width)",
        ),
        only("decoder_sparse_step", 1, "every layer must be a mixture-of-experts layer"),
        Refusal(
            "mlp_only_layers",
            lambda raw: bool(raw.get("mlp_only_layers")),
            "dense-MLP layers between MoE layers are not supported",
        ),
    ),
    moe=True,
)
