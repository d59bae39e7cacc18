"""LoRA/DoRA adapters <-> Hugging Face PEFT adapters, and merging them into the base weights.

The adapters' tensors are peft's own (``megatron_simpo/adapters.py``): the map is names only.
``adapter_config.json`` + ``adapter_model.safetensors`` is what ``peft.PeftModel.from_pretrained``
reads.

Mixture of experts: the adapters of the attention, the shared expert and every routed expert
merge into their HF weights (one per expert, as the Hub format stores them). A peft adapter holds
attention adapters only: transformers keeps the routed experts as fused 3D parameters
(``experts.gate_up_proj [E, 2I, H]``) that peft's ``target_modules`` cannot name, so adapters on
them are refused in peft form either way (:func:`check_peft_form`), with the merged export named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from megatron_simpo.config import LoraConfig, ModelConfig, RunConfig
from megatron_simpo.convert import keymap
from megatron_simpo.errors import CheckpointError, ConfigError

#: peft's prefix of a causal LM's keys (``PeftModelForCausalLM.base_model.model``).
PEFT_PREFIX = "base_model.model."
#: Megatron linear (last part of its name) -> its HF projections in fused order; as
#: ``adapters.LINEARS``, kept here so that export needs no Megatron import.
LINEARS = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
_ATTENTION = ("self_attention.linear_qkv", "self_attention.linear_proj")
_MLP = ("linear_fc1", "linear_fc2")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")


class AdapterName(NamedTuple):
    """One adapter tensor: its names and where the dist checkpoint holds it."""

    mc: str
    """Megatron TP1/EP1 state-dict name (``decoder.layers.0.[...].lora.parts.q_proj.lora_A``)."""
    peft: str | None
    """peft's key (None: a routed expert's, which has no peft form)."""
    hf: str
    """The HF weight it adapts."""
    layer: int
    expert: int | None
    """The routed expert (None: not one)."""


def layer_modules(m: ModelConfig) -> list[str]:
    """The adaptable linears of one layer (names in the layer, TP1/EP1): attention and the
    dense MLP, or attention, the shared expert and every routed expert of an MoE layer."""
    if m.num_experts is None:
        return [*_ATTENTION, *(f"mlp.{leaf}" for leaf in _MLP)]
    out = list(_ATTENTION)
    if m.shared_expert_intermediate_size is not None:
        out += [f"mlp.shared_experts.{leaf}" for leaf in _MLP]
    out += [f"mlp.experts.local_experts.{e}.{leaf}" for e in range(m.num_experts) for leaf in _MLP]
    return out


def checkpoint_location(mc: str) -> tuple[str, int | None, int | None]:
    """(dist-checkpoint key, layer, expert) of a TP1 name: decoder-layer tensors are stacked
    along a layer axis, a routed expert's along an expert axis after it (Megatron's
    ``SequentialMLP`` names them ``experts.experts.``)."""
    layer = _LAYER.search(mc)
    if layer is None:
        return mc, None, None
    key = mc.replace(layer.group(0), ".layers.")
    expert = _EXPERT.search(key)
    if expert is None:
        return key, int(layer.group(1)), None
    return (
        key.replace(expert.group(0), ".experts.experts."),
        int(layer.group(1)),
        int(expert.group(1)),
    )


def adapter_names(m: ModelConfig, lora: LoraConfig) -> list[AdapterName]:
    """Every adapter tensor of the model, layer by layer."""
    hf_of = {mc: hf for mc, hf, _ in keymap.entries(m)}
    targets = lora.hf_targets()
    out = []
    for i in range(m.num_hidden_layers):
        for module in layer_modules(m):
            hf_names = hf_of[f"decoder.layers.{i}.{module}.weight"]
            expert = _EXPERT.search(f".{module}.")
            e = int(expert.group(1)) if expert else None
            projections = LINEARS[module.rsplit(".", 1)[1]]
            for proj, hf in zip(projections, hf_names, strict=True):
                if proj not in targets:
                    continue
                hf_mod = PEFT_PREFIX + hf.removesuffix(".weight")
                mc = f"decoder.layers.{i}.{module}.lora.parts.{proj}."
                tensors = [("lora_A", ".lora_A.weight"), ("lora_B", ".lora_B.weight")]
                if lora.dora:
                    tensors.append(("lora_magnitude", ".lora_magnitude_vector"))
                for name, suffix in tensors:
                    peft = None if e is not None else hf_mod + suffix
                    out.append(AdapterName(mc + name, peft, hf, i, e))
    return out


def check_peft_form(m: ModelConfig, lora: LoraConfig, flag: str) -> None:
    """Refuses adapters on routed experts as a peft adapter (one line naming ``flag``)."""
    if m.num_experts is None or not any(n.expert is not None for n in adapter_names(m, lora)):
        return
    raise ConfigError(
        f"{flag}: adapters on the routed experts of this {m.model_type} model have no peft form "
        "(transformers stores the experts as fused 3D parameters, which peft's target_modules "
        "cannot name); export them merged (mcore-to-hf without --adapter-only), or train with "
        "--lora-target qkv,o_proj for a peft adapter"
    )


def peft_config(lora: LoraConfig) -> dict:
    """``adapter_config.json`` of the adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.lora_rank,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "target_modules": list(lora.hf_targets()),
        "use_dora": lora.dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }


def lora_config_of_peft(peft_dir: str | Path) -> LoraConfig:
    """The LoraConfig of a peft adapter directory (``adapter_config.json``)."""
    path = Path(peft_dir) / "adapter_config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None
    if raw.get("use_rslora") or raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise ConfigError(f"{path}: rsLoRA and per-module rank/alpha patterns are not supported")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        raise ConfigError(f"{path}: target_modules as a regex is not supported; list the names")
    cfg = LoraConfig(
        lora_rank=int(raw["r"]),
        lora_alpha=float(raw["lora_alpha"]),
        lora_dropout=float(raw.get("lora_dropout", 0.0)),
        lora_target=",".join(targets),
        dora=bool(raw.get("use_dora", False)),
    )
    cfg.validate()
    return cfg


def write_peft(
    out: Path, m: ModelConfig, lora: LoraConfig, get: Callable[[str, int], torch.Tensor]
) -> Path:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors``; ``get(mc_name, layer)``
    returns a TP1 adapter tensor."""
    from safetensors.torch import save_file

    check_peft_form(m, lora, "--adapter-only")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--hf-dir {out} is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n.peft: get(n.mc, n.layer).contiguous() for n in adapter_names(m, lora)}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_config(lora), indent=2))
    return out


def merge(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None,
) -> torch.Tensor:
    """The merged HF weight ``[out, in]``: LoRA ``W + s B A``; DoRA
    ``m / ||W + s B A||_row * (W + s B A)`` (computed in fp32)."""
    merged = weight.float() + scaling * (b.float() @ a.float())
    if magnitude is not None:
        norm = torch.linalg.vector_norm(merged, dim=1, keepdim=True)
        merged = merged * (magnitude.float().unsqueeze(1) / norm)
    return merged.to(weight.dtype)


def peft_to_mcore(peft_dir: str | Path, base: str | Path, save: str | Path) -> Path:
    """Imports a peft adapter for the converted base checkpoint ``base`` as an adapter-only
    checkpoint under ``save`` (iteration 0). Single process (initialises TP1 itself)."""
    from safetensors.torch import load_file

    from megatron_simpo import checkpointing, parallel
    from megatron_simpo.model import build_model

    cfg = RunConfig()
    ckpt = checkpointing.checkpoint_dir(base)
    saved = checkpointing.read_run_state(ckpt).get("config", {}).get("model") if ckpt else None
    if not saved:
        raise CheckpointError(f"{base}: no converted base checkpoint (with its model config) there")
    cfg.model = ModelConfig(**saved)
    cfg.lora = lora_config_of_peft(peft_dir)
    check_peft_form(cfg.model, cfg.lora, f"{peft_dir}: target_modules")
    cfg.train.precision = "fp32"
    cfg.train.load = str(base)
    tensors = load_file(str(Path(peft_dir) / "adapter_model.safetensors"))
    parallel.init_distributed()
    parallel.init_model_parallel(1, 1, None, seed=0)
    (model,) = build_model(cfg)
    checkpointing.load_checkpoint(base, [model], may_lack=checkpointing.is_adapter_key)
    params = dict(model.named_parameters())
    names = adapter_names(cfg.model, cfg.lora)
    with torch.no_grad():
        for mc, peft, *_ in names:
            if peft not in tensors:
                raise CheckpointError(f"{peft_dir}: no tensor {peft} (is it for this model?)")
            if params[mc].shape != tensors[peft].shape:
                raise CheckpointError(
                    f"{peft_dir}: {peft} has shape {tuple(tensors[peft].shape)}, this model "
                    f"needs {tuple(params[mc].shape)}; the adapter is for another model"
                )
            params[mc].copy_(tensors[peft])
    out = checkpointing.save_checkpoint(
        save,
        0,
        [model],
        run_state={"config": cfg.to_dict(), "lora_base": str(base)},
        adapter_only=True,
    )
    parallel.destroy_model_parallel()
    return out
