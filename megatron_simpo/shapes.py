"""Model shapes for arithmetic: presets, expert dimensions, parameter and adapter counts.

Pure arithmetic on ``ModelConfig`` (no torch): the planner (``plan.py``) and the FLOP count
(``flops.py``) read it. A mixture-of-experts model is a :class:`MoeModelConfig` (the Llama-
architecture ``ModelConfig`` plus the expert fields, in Hugging Face ``config.json`` names);
:func:`moe_dims` also reads those fields from any config object that has them, so a
``ModelConfig`` that gains them reads the same.

Parameter counts (padded vocabulary ``V``, hidden ``h``, ``L`` layers, ``a`` query / ``g`` KV
heads of width ``d``, SwiGLU width ``f``)::

    attention per layer  h (a + 2g) d + a d h           (QKV, output projection; + QKV bias)
    dense MLP per layer  3 h f                          (gate, up, down)
    MoE per layer        E x 3 h f_e  routed experts    (E experts of width f_e)
                         + h E        router
                         + 3 h f_s (+ h) shared expert (+ its sigmoid gate, Qwen2-MoE)
    active per token     the same with k = num_experts_per_tok of the E routed experts

LoRA adapters (rank ``r``) sit on the projections q, k, v (the fused QKV gets one adapter per
projection), o (``proj``), gate and up (``fc1``: two adapters) and down (``fc2``); an adapter of
a linear ``in -> out`` has ``r (in + out)`` parameters, ``A [r, in]`` and ``B [out, r]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_simpo.config import ModelConfig, RunConfig
from megatron_simpo.errors import ConfigError

#: config.json values the Meta-Llama-3 checkpoints share (8B and 70B).
_LLAMA3: dict[str, Any] = dict(
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0
)
#: config.json values the Qwen3-MoE checkpoints share (30B-A3B and 235B-A22B): 128 experts,
#: 8 routed per token, no shared expert, QK RMSNorm, every layer MoE (decoder_sparse_step 1,
#: mlp_only_layers []); their intermediate_size is the unused dense width.
_QWEN3_MOE: dict[str, Any] = dict(
    model_type="qwen3_moe",
    qk_layernorm=True,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)

#: Model presets: the Hugging Face ``config.json`` values of the published checkpoints.
PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B, meta-llama/Meta-Llama-3-70B config.json.
    "llama3-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=14336,
    ),
    "llama3-70b": dict(
        _LLAMA3,
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        intermediate_size=28672,
    ),
    # Qwen/Qwen3-30B-A3B config.json (model card: 30.5B total, 3.3B activated).
    "qwen3-30b-a3b": dict(
        _QWEN3_MOE,
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        intermediate_size=6144,
        moe_intermediate_size=768,
    ),
    # Qwen/Qwen3-235B-A22B config.json (model card: 235B total, 22B activated).
    "qwen3-235b-a22b": dict(
        _QWEN3_MOE,
        hidden_size=4096,
        num_hidden_layers=94,
        num_attention_heads=64,
        intermediate_size=12288,
        moe_intermediate_size=1536,
    ),
    # mistralai/Mixtral-8x22B-v0.1 config.json (Mistral's announcement: 141B total, 39B
    # active): 8 experts (num_local_experts), 2 per token, expert width = intermediate_size.
    "mixtral-8x22b": dict(
        model_type="mixtral",
        hidden_size=6144,
        num_hidden_layers=56,
        num_attention_heads=48,
        num_key_value_heads=8,
        intermediate_size=16384,
        moe_intermediate_size=16384,
        num_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
        max_position_embeddings=65536,
        rope_theta=1000000.0,
    ),
}


@dataclass
class MoeModelConfig(ModelConfig):
    """A mixture-of-experts model for the planner: the shared layers of ``ModelConfig`` plus
    the routed experts (every layer is an MoE layer)."""

    num_experts: int = 0
    """Routed experts per layer (HF ``num_experts``; Mixtral's ``num_local_experts``)."""
    num_experts_per_tok: int = 1
    """Experts each token is routed to (top-k)."""
    moe_intermediate_size: int | None = None
    """SwiGLU width of one expert; None: ``intermediate_size`` (Mixtral)."""
    shared_expert_intermediate_size: int = 0
    """SwiGLU width of the shared expert every token goes through (Qwen2-MoE); 0: none."""
    shared_expert_gate: bool = False
    """A sigmoid gate ``h -> 1`` on the shared expert's output (Qwen2-MoE)."""


@dataclass(frozen=True)
class MoeDims:
    """The expert dimensions of one MoE layer."""

    num_experts: int
    top_k: int
    expert_ffn: int
    shared_ffn: int
    shared_gate: bool


def moe_dims(m: Any) -> MoeDims | None:
    """The expert dimensions of ``m``, None for a dense model."""
    experts = getattr(m, "num_experts", 0) or getattr(m, "num_local_experts", 0) or 0
    if not experts:
        return None
    ffn = getattr(m, "moe_intermediate_size", None) or m.intermediate_size
    return MoeDims(
        num_experts=int(experts),
        top_k=int(getattr(m, "num_experts_per_tok", 1) or 1),
        expert_ffn=int(ffn),
        shared_ffn=int(getattr(m, "shared_expert_intermediate_size", 0) or 0),
        shared_gate=bool(getattr(m, "shared_expert_gate", False)),
    )


#: HF ``model_type`` of MoE families -> the layer options of their shared layers.
_MOE_FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {},
    "qwen3_moe": {"qk_layernorm": True},
    "qwen2_moe": {"qkv_bias": True, "shared_expert_gate": True},
}


def _moe_from_hf(raw: dict[str, Any], source: str) -> MoeModelConfig:
    """An HF MoE ``config.json`` (parsed) as a :class:`MoeModelConfig`."""
    model_type = raw.get("model_type", "?")
    if model_type not in _MOE_FAMILIES:
        raise ConfigError(
            f"--model {source}: model_type {model_type!r} with experts is not planned; the "
            f"planner knows the MoE families {', '.join(_MOE_FAMILIES)}"
        )
    dense = raw.get("mlp_only_layers") or []
    step = raw.get("decoder_sparse_step", 1)
    if dense or step not in (1, None):
        raise ConfigError(
            f"--model {source}: mlp_only_layers={dense!r}, decoder_sparse_step={step!r}: the "
            "planner counts every layer as an MoE layer; plan a config without dense layers"
        )
    out: dict[str, Any] = dict(_MOE_FAMILIES[model_type], model_type=model_type)
    out["num_experts"] = raw.get("num_experts") or raw.get("num_local_experts")
    params = raw.get("rope_parameters") or {}
    if "rope_theta" not in raw and "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    names = {
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "moe_intermediate_size",
        "num_experts_per_tok",
        "shared_expert_intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
        "tie_word_embeddings",
    }
    out.update({k: raw[k] for k in names if raw.get(k) is not None})
    missing = [
        k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in out
    ]
    if missing:
        raise ConfigError(f"--model {source}: the config has no {', '.join(missing)}")
    return MoeModelConfig(**out)


def load_model(spec: str) -> ModelConfig:
    """A preset name, a Hugging Face ``config.json`` (or its directory) or our YAML config."""
    if spec in PRESETS:
        raw = PRESETS[spec]
        return MoeModelConfig(**raw) if "num_experts" in raw else ModelConfig(**raw)
    path = Path(spec)
    if not path.exists():
        raise ConfigError(
            f"--model {spec}: not a preset ({', '.join(PRESETS)}) and no such file; give a "
            "preset, a Hugging Face config.json or a megatron-simpo YAML config"
        )
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--model {spec}: cannot read it: {e}") from None
        if not isinstance(raw, dict) or not raw.get("model"):
            raise ConfigError(f"--model {spec}: the YAML file has no 'model' section")
        return RunConfig.from_dict({"model": raw["model"]}, source=spec).model
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--model {spec}: cannot read it: {e}") from None
    if isinstance(raw, dict) and (raw.get("num_experts") or raw.get("num_local_experts")):
        return _moe_from_hf(raw, spec)
    return ModelConfig.from_hf_config(path)


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a Llama-architecture model, dense or MoE (padded vocabulary)."""

    embedding: int
    """Input embedding ``V_pad x h``."""
    layer_sharded: int
    """Per layer, the weights split over TP (QKV, attention output, the dense MLP or the shared
    expert; QKV bias)."""
    layer_replicated: int
    """Per layer, the weights every TP rank holds (the RMSNorm weights; the router)."""
    final_norm: int
    output: int
    """Output layer ``V_pad x h`` (0 when tied to the embedding)."""
    num_layers: int
    layer_experts: int = 0
    """Per layer, all routed experts (split over EP x ETP); 0 for a dense model."""
    layer_experts_active: int = 0
    """Per layer, the routed experts one token goes through (top-k of them)."""

    @property
    def total(self) -> int:
        per_layer = self.layer_sharded + self.layer_replicated + self.layer_experts
        return self.embedding + self.num_layers * per_layer + self.final_norm + self.output

    @property
    def active(self) -> int:
        """Parameters one token uses (= total for a dense model)."""
        return self.total - self.num_layers * (self.layer_experts - self.layer_experts_active)


def attention_params(m: ModelConfig) -> int:
    """QKV (+ bias) and output projection of one layer."""
    h, d = m.hidden_size, m.head_size
    q, kv = m.num_attention_heads * d, m.kv_heads * d
    return h * (q + 2 * kv) + ((q + 2 * kv) if m.qkv_bias else 0) + q * h


def count_params(m: ModelConfig) -> ParamCount:
    h, d = m.hidden_size, m.head_size
    moe = moe_dims(m)
    sharded = attention_params(m)
    replicated = 2 * h + (2 * d if m.qk_layernorm else 0)  # norms (+ QK norms)
    experts = active = 0
    if moe is None:
        sharded += 3 * h * m.intermediate_size  # gate + up (2hf), down (fh)
    else:
        sharded += 3 * h * moe.shared_ffn
        replicated += h * moe.num_experts + (h if moe.shared_gate else 0)  # router, shared gate
        experts = moe.num_experts * 3 * h * moe.expert_ffn
        active = moe.top_k * 3 * h * moe.expert_ffn
    v = m.padded_vocab_size()
    return ParamCount(
        embedding=v * h,
        layer_sharded=sharded,
        layer_replicated=replicated,
        final_norm=h,
        output=0 if m.tie_word_embeddings else v * h,
        num_layers=m.num_hidden_layers,
        layer_experts=experts,
        layer_experts_active=active,
    )


#: LoRA projections (HF names), their Megatron ``--lora-target`` group, and whether the base
#: linear is column-parallel (output split over TP) or row-parallel (input split).
LORA_PROJECTIONS: dict[str, tuple[str, str]] = {
    "q_proj": ("qkv", "column"),
    "k_proj": ("qkv", "column"),
    "v_proj": ("qkv", "column"),
    "o_proj": ("proj", "row"),
    "gate_proj": ("fc1", "column"),
    "up_proj": ("fc1", "column"),
    "down_proj": ("fc2", "row"),
}
LORA_GROUPS = ("qkv", "proj", "fc1", "fc2")


def lora_projections(spec: str) -> tuple[str, ...]:
    """The HF projections a ``--lora-target`` value adapts (``qkv,proj,fc1,fc2``, ``all`` or
    HF names ``q_proj,...``), in a fixed order; ConfigError naming the flag otherwise."""
    picked: set[str] = set()
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name == "all":
            picked.update(LORA_PROJECTIONS)
        elif name in LORA_GROUPS:
            picked.update(p for p, (g, _) in LORA_PROJECTIONS.items() if g == name)
        elif name in LORA_PROJECTIONS:
            picked.add(name)
        else:
            raise ConfigError(
                f"--lora-target {spec}: {name!r} is not a target; give some of "
                f"{', '.join(LORA_GROUPS)}, all, or HF names {', '.join(LORA_PROJECTIONS)}"
            )
    if not picked:
        raise ConfigError(f"--lora-target {spec!r}: no target given; e.g. --lora-target all")
    return tuple(p for p in LORA_PROJECTIONS if p in picked)


def projection_dims(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each HF projection of one (dense) layer."""
    h, d, f = m.hidden_size, m.head_size, m.intermediate_size
    q, kv = m.num_attention_heads * d, m.kv_heads * d
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, f),
        "up_proj": (h, f),
        "down_proj": (f, h),
    }


@dataclass(frozen=True)
class AdapterCount:
    """LoRA parameters of one layer: split over TP (B of a column-parallel linear, A of a
    row-parallel one) and replicated on every TP rank (the other factor)."""

    sharded: int
    replicated: int
    rank_per_token: int
    """Elements of the ``x A^T`` intermediates one token keeps for backward (r per adapter)."""

    @property
    def total(self) -> int:
        return self.sharded + self.replicated


def lora_params(m: ModelConfig, rank: int, projections: tuple[str, ...]) -> AdapterCount:
    """Adapter parameters per layer for LoRA rank ``rank`` on ``projections``."""
    if moe_dims(m) is not None:
        raise ConfigError("--lora-rank: the planner sizes LoRA for dense models only")
    dims = projection_dims(m)
    sharded = replicated = 0
    for p in projections:
        n_in, n_out = dims[p]
        if LORA_PROJECTIONS[p][1] == "column":  # A [r, in] replicated, B [out, r] sharded
            replicated += rank * n_in
            sharded += rank * n_out
        else:  # row-parallel: A [r, in] sharded like the input, B [out, r] replicated
            sharded += rank * n_in
            replicated += rank * n_out
    return AdapterCount(sharded, replicated, rank * len(projections))
