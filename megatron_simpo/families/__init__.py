"""The model families, one descriptor per file (see ``base.py``), and the registry.

Adding a family is a file here (its descriptor) listed in :data:`FAMILIES`, plus its tests.
Families that are known and refused are listed in :data:`REFUSED` with the field that makes them
unreproducible, so their error names it.
"""

from __future__ import annotations

from typing import Any

from megatron_simpo.errors import ConfigError
from megatron_simpo.families import llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe
from megatron_simpo.families.base import FamilyDescriptor, KeyEntry, Refusal

__all__ = ["FAMILIES", "REFUSED", "FamilyDescriptor", "KeyEntry", "Refusal", "check_hf_config"]

#: HF ``model_type`` -> descriptor: the families whose checkpoints convert both ways.
FAMILIES: dict[str, FamilyDescriptor] = {
    d.model_type: d
    for d in (
        llama.FAMILY,
        mistral.FAMILY,
        qwen2.FAMILY,
        qwen3.FAMILY,
        mixtral.FAMILY,
        qwen3_moe.FAMILY,
        qwen2_moe.FAMILY,
    )
}

#: Known families this trainer refuses: ``model_type`` -> (config field, why).
REFUSED: dict[str, tuple[str, str]] = {
    "gemma": ("hidden_activation", "GeGLU MLP, (1 + weight) RMSNorm and scaled embeddings"),
    "gemma2": ("attn_logit_softcapping", "attention-logit soft-capping is not implemented"),
    "gemma3": ("sliding_window", "interleaved sliding-window attention is not reproduced"),
    "deepseek_v2": ("kv_lora_rank", "multi-head latent attention (MLA) is not supported"),
    "deepseek_v3": ("kv_lora_rank", "multi-head latent attention (MLA) is not supported"),
}


def get(model_type: str) -> FamilyDescriptor:
    """The descriptor of ``model_type``, or a ConfigError listing the supported ones."""
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported families: {supported()}"
        )
    return FAMILIES[model_type]


def supported() -> str:
    return ", ".join(f"{k} ({d.architecture})" for k, d in FAMILIES.items())


def check_hf_config(raw: dict[str, Any], source: str) -> FamilyDescriptor:
    """The family of an HF ``config.json`` (parsed), or a one-line ConfigError naming
    ``source`` and the field that cannot be reproduced."""
    model_type = raw.get("model_type", "llama")
    if model_type in REFUSED:
        name, why = REFUSED[model_type]
        raise ConfigError(
            f"{source}: model_type={model_type!r} is refused: {name}={raw.get(name)!r}: {why}; "
            f"supported families are {supported()}"
        )
    family = FAMILIES.get(model_type)
    archs = raw.get("architectures") or [family.architecture if family else "?"]
    if family is None or any(a != family.architecture for a in archs):
        raise ConfigError(
            f"{source}: model_type={model_type!r}, architectures={archs}: supported families "
            f"are {supported()}"
        )
    for r in family.all_refusals():
        if r.refuses(raw):
            raise ConfigError(
                f"{source}: {r.field}={raw.get(r.field)!r} is not supported for {model_type} "
                f"({r.reason})"
            )
    return family
