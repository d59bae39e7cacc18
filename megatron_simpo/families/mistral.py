"""Mistral: the Llama architecture; a sliding window shorter than the context is refused."""

from __future__ import annotations

from megatron_simpo.families import llama
from megatron_simpo.families.base import FamilyDescriptor, Refusal


def _window_is_shorter(raw: dict) -> bool:
    window = raw.get("sliding_window")
    return window is not None and window < raw.get("max_position_embeddings", 0)


FAMILY = FamilyDescriptor(
    model_type="mistral",
    architecture="MistralForCausalLM",
    summary="Mistral (v0.2+, no sliding window)",
    global_keys=llama.GLOBAL_KEYS,
    layer_keys=llama.LAYER_KEYS,
    hf_fixed=llama.HF_FIXED,
    refusals=(
        Refusal(
            "sliding_window",
            _window_is_shorter,
            "smaller than max_position_embeddings; sliding-window attention is not reproduced "
            "in training (Mistral v0.2+ has none)",
        ),
    ),
)
