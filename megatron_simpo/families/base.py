"""What a model family is, as data: :class:`FamilyDescriptor`.

A family is one Hugging Face ``model_type``. Its descriptor says which ``config.json`` it reads
(architecture class, the fields it fixes, what it refuses and why), which layer options of the
shared Llama-architecture ``GPTModel`` it turns on (``ModelConfig`` fields such as ``qkv_bias``,
``qk_layernorm``, which ``model.py`` maps to Megatron-Core's ``TransformerConfig`` and layer
spec), and its weight key map. Transforms are named here and implemented in
``megatron_simpo/convert/keymap.py``; Megatron names are those of a TP=1, PP=1 model built with
the local spec, ``{i}`` standing for the layer.

Nothing here imports torch or the rest of the package: ``config.py`` reads descriptors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: ``(megatron_name, (hf_names...), transform)``.
KeyEntry = tuple[str, tuple[str, ...], str]


@dataclass(frozen=True)
class Refusal:
    """A ``config.json`` field whose value the family cannot reproduce exactly."""

    field: str
    """The HF config field named in the error."""
    refuses: Callable[[dict[str, Any]], bool]
    """True when the raw config holds a value that cannot be reproduced."""
    reason: str
    """Why, in a few words (ends up in the error and in the README's family table)."""


def only(name: str, value: Any, reason: str, default: Any = None) -> Refusal:
    """Refuses ``name`` unless it equals ``value`` (absent: ``default``, or ``value``)."""
    fallback = value if default is None else default
    return Refusal(name, lambda raw: raw.get(name, fallback) != value, reason)


def unset(name: str, reason: str) -> Refusal:
    """Refuses ``name`` when it is present with a value (not null, 0 or false)."""
    return Refusal(name, lambda raw: raw.get(name) not in (None, 0, False), reason)


#: The ``ModelConfig`` layer options a family fixes (False unless its ``layer_options`` say).
LAYER_OPTIONS = ("qkv_bias", "qk_layernorm", "shared_expert_gate")

#: What no family here reproduces; checked for every family (and named in the error).
COMMON_REFUSALS: tuple[Refusal, ...] = (
    only("use_sliding_window", False, "sliding-window attention is not reproduced in training"),
    Refusal(
        "layer_types",
        lambda raw: any(t != "full_attention" for t in raw.get("layer_types") or ()),
        "only full-attention layers are reproduced (no sliding-window or linear attention)",
    ),
    unset("attn_logit_softcapping", "attention-logit soft-capping is not implemented"),
    unset("final_logit_softcapping", "final-logit soft-capping is not implemented"),
    unset("kv_lora_rank", "multi-head latent attention (MLA) is not supported"),
    unset("q_lora_rank", "multi-head latent attention (MLA) is not supported"),
)

#: Refused for dense families (an MoE config under a dense ``model_type`` is not one of them).
DENSE_REFUSALS: tuple[Refusal, ...] = (
    unset("num_local_experts", "mixture-of-experts fields in a dense family's config"),
    unset("num_experts", "mixture-of-experts fields in a dense family's config"),
)


@dataclass(frozen=True)
class FamilyDescriptor:
    """One HF model family on the shared Llama-architecture ``GPTModel``."""

    model_type: str
    """HF ``model_type`` (``config.json``)."""
    architecture: str
    """HF architecture class (``config.json``'s ``architectures``), e.g. ``LlamaForCausalLM``."""
    summary: str
    """One line for the README's family table (what differs from Llama)."""
    global_keys: tuple[KeyEntry, ...]
    """Key map of the embedding, final norm and output layer (the output layer is skipped
    when the embeddings are tied)."""
    layer_keys: tuple[KeyEntry, ...]
    """Key map of one decoder layer; ``{e}`` in a name stands for an expert (expanded over
    ``ModelConfig.num_experts``)."""
    layer_options: Mapping[str, Any] = field(default_factory=dict)
    """``ModelConfig`` fields this family fixes (``qkv_bias``, ``qk_layernorm``,
    ``shared_expert_gate``): set at import, mapped by ``model.py`` / ``moe.py`` to
    ``TransformerConfig`` (``add_qkv_bias``, ``qk_layernorm``, ``moe_shared_expert_gate``) and
    the layer spec."""
    hf_fixed: Mapping[str, Any] = field(default_factory=dict)
    """HF config fields supported with one value only: refused otherwise (absent counts as that
    value), and written so into an exported ``config.json``."""
    renames: Mapping[str, str] = field(default_factory=dict)
    """HF config field -> ``ModelConfig`` field, where the names differ."""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """Other spellings of HF config fields that are read (as the ``ModelConfig`` field named)
    but never written: e.g. transformers 5 saves Qwen3-MoE's ``num_experts`` as
    ``num_local_experts``."""
    refusals: tuple[Refusal, ...] = ()
    """Family-specific refusals (checked after :data:`COMMON_REFUSALS` and ``hf_fixed``)."""
    moe: bool = False
    """Mixture-of-experts layers (Megatron-Core's ``MoELayer``); dense families refuse MoE
    fields (:data:`DENSE_REFUSALS`)."""
    moe_fixed: Mapping[str, Any] = field(default_factory=dict)
    """``ModelConfig`` MoE fields the family fixes (e.g. Mixtral's ``norm_topk_prob=True``):
    set at import, not written into an exported ``config.json``."""

    def options(self) -> dict[str, bool]:
        """Every layer option (:data:`LAYER_OPTIONS`) as this family sets it."""
        return {n: bool(self.layer_options.get(n, False)) for n in LAYER_OPTIONS}

    def all_refusals(self) -> tuple[Refusal, ...]:
        fixed = tuple(
            only(k, v, f"{self.model_type} is converted with {k}={v!r} only")
            for k, v in self.hf_fixed.items()
        )
        dense = () if self.moe else DENSE_REFUSALS
        return fixed + COMMON_REFUSALS + dense + self.refusals
