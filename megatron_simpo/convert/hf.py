"""Import a Hugging Face directory (a family of ``megatron_simpo/families``) as a Megatron-Core
distributed checkpoint.

    megatron-simpo convert hf-to-mcore --hf-dir DIR --save CKPT

The checkpoint is written once at TP=1/PP=1 and loads at any TP/PP layout (dist_checkpointing
reshards at load). It carries the model config (``run_state.json``) so ``--load CKPT`` alone builds
the right model, and a copy of the HF ``config.json`` and tokenizer files under ``CKPT/hf/``.
Weights are read with ``safetensors`` only (never unpickled).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch

from megatron_simpo.config import ModelConfig, RunConfig
from megatron_simpo.convert import keymap
from megatron_simpo.convert.common import HF_SIDE_FILES, checkpoint_names, expert_index
from megatron_simpo.errors import ConfigError
from megatron_simpo.progress import Progress


class SafetensorsDir:
    """Lazy, tensor-by-tensor access to the safetensors weights of an HF directory.

    Each read opens its file and closes it again: a handle kept open keeps every page it mapped
    resident, which for a whole model is the model's size.
    """

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self._dir = hf_dir
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
        self._where: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in files:
            with safe_open(str(hf_dir / f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    self._where[k] = f
                    self._meta[k] = (tuple(sl.get_shape()), sl.get_dtype())

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        dt = self._meta[name][1]
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dt]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConfigError(f"weight '{name}' is missing from the HF checkpoint")
        with self._safe_open(str(self._dir / self._where[name]), framework="pt") as h:
            return h.get_tensor(name).clone()


def _lazy_save_planner(items: dict[tuple[str, tuple[int, ...]], tuple], objects: dict[str, bytes]):
    """A torch DCP save planner whose tensors are produced on demand, one chunk at a time.

    ``items``: (key, chunk offsets) -> (global shape, chunk shape, dtype, producer);
    ``objects``: Megatron ShardedObject unique keys -> their serialized bytes.
    """
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    class LazySavePlanner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            plan = []
            for (key, offsets), (size, chunk, dtype, _) in items.items():
                plan.append(
                    WriteItem(
                        index=MetadataIndex(key, torch.Size(offsets)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(
                                offsets=torch.Size(offsets), sizes=torch.Size(chunk)
                            ),
                            properties=TensorProperties(dtype=dtype),
                            size=torch.Size(size),
                        ),
                    )
                )
            for fqn in objects:
                plan.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
            self.plan = SavePlan(plan, planner_data={})
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return io.BytesIO(objects[write_item.index.fqn])
            key = (write_item.index.fqn, tuple(write_item.index.offset))
            return items[key][3]().contiguous()

    return LazySavePlanner()


def hf_to_mcore(
    hf_dir: str | Path, save: str | Path, make_vocab_size_divisible_by: int = 128
) -> Path:
    """Converts, streaming: each converted tensor (one layer of each weight) is produced only
    when the checkpoint writer asks for it, so memory stays near one tensor group. Returns the
    checkpoint directory. Single process."""
    import os
    import re
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from megatron_simpo import checkpointing, parallel

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
    entries = keymap.entries(model_cfg)
    expected = {h for _, hf, _ in entries for h in hf}
    extra = [
        k
        for k in weights.keys()
        if k not in expected
        and not k.endswith("rotary_emb.inv_freq")
        and not (tied and k == "lm_head.weight")
    ]
    if extra:
        raise ConfigError(
            f"{hf_dir}: unexpected weights {extra[:5]} for a {model_cfg.model_type} model"
        )

    parallel.init_distributed()
    parallel.init_model_parallel(1, 1, None, seed=0)
    names = checkpoint_names(model_cfg)  # read off a 1-layer proxy of this model
    keys = names.keys
    shapes = keymap.Shapes.of(model_cfg)
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    n_layers = model_cfg.num_hidden_layers
    items: dict = {}
    for mc_name, hf_names, transform in entries:
        m = layer_re.search(mc_name)
        key, stacked, _ = keys[layer_re.sub(".layers.0.", mc_name)]

        def produce(hf_names=hf_names, transform=transform):
            return keymap.TRANSFORMS[transform][0]([weights.get(h) for h in hf_names], shapes)

        # Shapes without materialising: convert the metadata through the transform.
        probe = keymap.TRANSFORMS[transform][0](
            [
                torch.empty(weights.shape(h), dtype=weights.dtype(h), device="meta")
                for h in hf_names
            ],
            shapes,
        )
        if stacked:
            # [layers, ...], or [layers, experts, ...] for an expert's tensor.
            e = expert_index(mc_name)
            lead = (int(m.group(1)),) if e is None else (int(m.group(1)), e)
            glob = (n_layers,) if e is None else (n_layers, model_cfg.num_experts)
            ones = (1,) * len(lead)
            items[(key, lead + (0,) * probe.dim())] = (
                (*glob, *probe.shape),
                (*ones, *probe.shape),
                probe.dtype,
                lambda produce=produce, shape=(*ones, *probe.shape): produce().reshape(shape),
            )
        else:
            items[(key, (0,) * probe.dim())] = (
                tuple(probe.shape),
                tuple(probe.shape),
                probe.dtype,
                produce,
            )
    _check_shapes(items, keys)
    # Per-layer module extra state (Megatron ShardedObjects, e.g. of linear layers): stored as
    # Megatron does, torch.save([data]) under "<key>/shard_<layer>_<layers>" (an expert's:
    # "<key>/shard_<layer>.<expert>_<layers>.<experts>").
    objects = {}
    for key, data in names.extra_state.items():
        buf = io.BytesIO()
        torch.save([data], buf)
        for i in range(n_layers):
            if key in names.expert_extra_state:  # [layers, experts]
                n_exp = model_cfg.num_experts
                for e in range(n_exp):
                    objects[f"{key}/shard_{i}.{e}_{n_layers}.{n_exp}"] = buf.getvalue()
            else:
                objects[f"{key}/shard_{i}_{n_layers}"] = buf.getvalue()

    tmp = save / "iter_0000000.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    bar = Progress("convert: writing", total=len(items), unit="tensors")
    items = {k: (*v[:3], bar.wrap(v[3])) for k, v in items.items()}  # counts each tensor made
    with warnings.catch_warnings(), bar:  # "assuming ... a single process": intended
        warnings.simplefilter("ignore")
        dcp.save(
            {},
            storage_writer=FileSystemWriter(str(tmp), single_file_per_rank=True, thread_count=1),
            planner=_lazy_save_planner(items, objects),
            no_dist=True,
        )
    torch.save({}, tmp / "common.pt")
    (tmp / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    cfg = RunConfig()
    cfg.model = model_cfg
    run_state = {
        "config": {"model": cfg.to_dict()["model"]},
        "converted_from": str(hf_dir),
        "iteration": 0,
        "has_optimizer": False,
    }
    (tmp / checkpointing.RUN_STATE).write_text(json.dumps(run_state, indent=1))
    final = save / "iter_0000000"
    os.replace(tmp, final)
    (save / checkpointing.TRACKER).write_text("0\n")
    side = save / checkpointing.HF_SIDE_DIR
    side.mkdir(exist_ok=True)
    for name in HF_SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, side / name)
    parallel.destroy_model_parallel()
    return final


def _check_shapes(items: dict, keys: dict) -> None:
    """Compares the converted shapes with those of a Megatron model of this config."""
    by_key = {key: (name, shape) for name, (key, _, shape) in keys.items()}
    for (key, _), (_, chunk, _, _) in items.items():
        name, want = by_key[key]
        lead = 0 if ".layers." not in name else 1 if expert_index(name) is None else 2
        got = tuple(chunk[lead:])
        if got != want:
            raise ConfigError(
                f"{name}: converted shape {got} does not match the model's "
                f"{want}; check config.json"
            )
