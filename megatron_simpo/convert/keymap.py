"""Hugging Face <-> Megatron-Core weights: the named transforms, applied through each family's
key map (data, in its descriptor: ``megatron_simpo/families``).

Megatron names are those of a TP=1, PP=1, EP=1 ``GPTModel`` built with the local layer spec
(module ``state_dict`` keys, with ``{i}`` the layer and ``{e}`` the expert). A map entry is
``(megatron_name, (hf_names...), transform)``; each transform has a forward (HF -> Megatron) and
an inverse (Megatron -> HF) so the round trip is lossless:

- ``copy``: same tensor.
- ``pad_vocab``: rows ``[vocab, padded_vocab)`` appended as zeros (never scored; see
  ``logprobs.py``); the inverse drops them.
- ``qkv_pack``: q/k/v projections packed per query group, as Megatron's fused QKV expects:
  ``[g0: q heads of group 0, k0, v0 | g1: ... ]`` (grouped-query attention).
- ``gate_up_fuse``: SwiGLU ``gate_proj`` and ``up_proj`` stacked (gate first) into ``linear_fc1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from megatron_simpo import families
from megatron_simpo.config import ModelConfig
from megatron_simpo.errors import ConfigError


@dataclass(frozen=True)
class Shapes:
    """What the transforms need to know about the model."""

    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    padded_vocab: int

    @classmethod
    def of(cls, m: ModelConfig) -> Shapes:
        return cls(
            m.num_attention_heads, m.kv_heads, m.head_size, m.vocab_size, m.padded_vocab_size()
        )


def _pad_vocab(ts: list[torch.Tensor], s: Shapes) -> torch.Tensor:
    (w,) = ts
    if w.shape[0] != s.vocab:
        raise ConfigError(f"vocabulary tensor has {w.shape[0]} rows, config says {s.vocab}")
    pad = w.new_zeros((s.padded_vocab - s.vocab, *w.shape[1:]))
    return torch.cat([w, pad])


def _unpad_vocab(t: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
    return [t[: s.vocab].clone()]


def _qkv_pack(ts: list[torch.Tensor], s: Shapes) -> torch.Tensor:
    q, k, v = ts
    per_group = s.heads // s.kv_heads
    rest = q.shape[1:]  # (hidden,) for weights, () for biases
    q = q.reshape(s.kv_heads, per_group * s.head_dim, *rest)
    k = k.reshape(s.kv_heads, s.head_dim, *rest)
    v = v.reshape(s.kv_heads, s.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_unpack(t: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
    per_group = s.heads // s.kv_heads
    rest = t.shape[1:]
    g = t.reshape(s.kv_heads, (per_group + 2) * s.head_dim, *rest)
    q, k, v = torch.split(g, [per_group * s.head_dim, s.head_dim, s.head_dim], dim=1)
    return [x.reshape(-1, *rest).clone() for x in (q, k, v)]


def _gate_up_fuse(ts: list[torch.Tensor], s: Shapes) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _gate_up_split(t: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
    return [x.clone() for x in torch.chunk(t, 2, dim=0)]


Forward = Callable[[list[torch.Tensor], Shapes], torch.Tensor]
Inverse = Callable[[torch.Tensor, Shapes], list[torch.Tensor]]

TRANSFORMS: dict[str, tuple[Forward, Inverse]] = {
    "copy": (lambda ts, s: ts[0], lambda t, s: [t]),
    "pad_vocab": (_pad_vocab, _unpad_vocab),
    "qkv_pack": (_qkv_pack, _qkv_unpack),
    "gate_up_fuse": (_gate_up_fuse, _gate_up_split),
}


def entries(m: ModelConfig) -> list[tuple[str, list[str], str]]:
    """The concrete map for a model (layers expanded; no output layer when tied)."""
    family = families.get(m.model_type)
    for name, value in family.options().items():
        if getattr(m, name) != value:
            raise ConfigError(
                f"model.{name}={getattr(m, name)!r} but the {m.model_type} family has {value!r}"
            )
    if family.moe != (m.num_experts is not None):
        raise ConfigError(
            f"model.num_experts={m.num_experts!r} but the {m.model_type} family is "
            f"{'mixture-of-experts' if family.moe else 'dense'}"
        )
    shared = any(".shared_experts." in mc for mc, _, _ in family.layer_keys)
    if shared != (m.shared_expert_intermediate_size is not None):
        raise ConfigError(
            f"model.shared_expert_intermediate_size={m.shared_expert_intermediate_size!r} but "
            f"the {m.model_type} family has {'a' if shared else 'no'} shared expert"
        )
    global_, layer = family.global_keys, family.layer_keys
    # Per-expert entries ({e}) expanded over the experts, then everything over the layers.
    layer = [
        (mc.replace("{e}", str(e)), tuple(h.replace("{e}", str(e)) for h in hf), t)
        for mc, hf, t in layer
        for e in (range(m.num_experts or 0) if "{e}" in mc else (None,))
    ]
    out = [
        (mc, list(hf), t)
        for mc, hf, t in global_
        if not (m.tie_word_embeddings and mc == "output_layer.weight")
    ]
    for i in range(m.num_hidden_layers):
        out += [(mc.format(i=i), [h.format(i=i) for h in hf], t) for mc, hf, t in layer]
    return out


def hf_to_megatron(get: Callable[[str], torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Megatron TP1 state dict from a function that returns an HF tensor by name."""
    s = Shapes.of(m)
    return {mc: TRANSFORMS[t][0]([get(h) for h in hf], s) for mc, hf, t in entries(m)}


def megatron_to_hf(state: Mapping[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict from a Megatron TP1 state dict (the inverse of :func:`hf_to_megatron`)."""
    s = Shapes.of(m)
    out: dict[str, torch.Tensor] = {}
    for mc, hf, t in entries(m):
        for name, tensor in zip(hf, TRANSFORMS[t][1](state[mc], s), strict=True):
            out[name] = tensor
    return out
