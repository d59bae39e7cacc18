"""Import a Hugging Face Llama directory as a Megatron-Core distributed checkpoint.

    megatron-simpo convert hf-to-mcore --hf-dir DIR --save CKPT

The checkpoint is written once at TP=1/PP=1 and loads at any TP/PP layout (dist_checkpointing
reshards at load). It carries the model config (``run_state.json``) so ``--load CKPT`` alone builds
the right model, and a copy of the HF ``config.json`` and tokenizer files under ``CKPT/hf/``.
Weights are read with ``safetensors`` only (never unpickled).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_simpo.config import ModelConfig, RunConfig
from megatron_simpo.convert import keymap
from megatron_simpo.errors import ConfigError

#: Files copied next to the checkpoint so that evaluation/export find the tokenizer.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "added_tokens.json",
)


class SafetensorsDir:
    """Lazy, tensor-by-tensor access to the safetensors weights of an HF directory."""

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (hf_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            bins = [p.name for p in hf_dir.glob("*.bin")]
            hint = f" (found {bins}: re-save with safe_serialization=True)" if bins else ""
            raise ConfigError(f"--hf-dir {hf_dir}: no safetensors weights{hint}")
        self._handles = {f: safe_open(str(hf_dir / f), framework="pt") for f in files}
        self._where = {k: f for f, h in self._handles.items() for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConfigError(f"weight '{name}' is missing from the HF checkpoint")
        return self._handles[self._where[name]].get_tensor(name)


def hf_to_mcore(
    hf_dir: str | Path, save: str | Path, make_vocab_size_divisible_by: int = 128
) -> Path:
    """Converts; returns the checkpoint directory. Single process (world of one)."""
    from megatron_simpo import checkpointing, parallel
    from megatron_simpo.model import build_model, unwrap

    hf_dir, save = Path(hf_dir), Path(save)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"--hf-dir {hf_dir}: no config.json there")
    if (save / checkpointing.TRACKER).exists():
        raise ConfigError(f"--save {save} already holds a checkpoint; choose an empty directory")
    model_cfg = ModelConfig.from_hf_config(hf_dir)
    model_cfg.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    weights = SafetensorsDir(hf_dir)
    tied = model_cfg.tie_word_embeddings
    if not tied and "lm_head.weight" not in weights:
        raise ConfigError(f"{hf_dir}: tie_word_embeddings is false but lm_head.weight is missing")
    expected = {h for _, hf, _ in keymap.entries(model_cfg) for h in hf}
    extra = [
        k
        for k in weights.keys()
        if k not in expected
        and not k.endswith("rotary_emb.inv_freq")
        and not (tied and k == "lm_head.weight")
    ]
    if extra:
        raise ConfigError(f"{hf_dir}: unexpected weights {extra[:5]}... for a Llama model")

    cfg = RunConfig()
    cfg.model = model_cfg
    cfg.train.precision = "fp32"
    parallel.init_distributed()
    parallel.init_model_parallel(1, 1, None, seed=0)
    (model,) = build_model(cfg, use_te=False)
    state = keymap.hf_to_megatron(weights.get, model_cfg)
    own = unwrap(model).state_dict()
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ConfigError(
                f"{name}: converted shape {tuple(tensor.shape)} does not match the "
                f"model's {tuple(own[name].shape)}; check config.json"
            )
        own[name].copy_(tensor.to(own[name].dtype))
    missing = [k for k in own if k not in state and not k.endswith("_extra_state")]
    if missing:
        raise ConfigError(f"internal: no conversion rule for {missing[:5]}")
    ckpt = checkpointing.save_checkpoint(
        save,
        0,
        [model],
        run_state={"config": {"model": cfg.to_dict()["model"]}, "converted_from": str(hf_dir)},
    )
    side = save / "hf"
    side.mkdir(exist_ok=True)
    for name in HF_SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, side / name)
    parallel.destroy_model_parallel()
    return ckpt
