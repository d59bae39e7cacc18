"""Export a Megatron-Core checkpoint (any TP/PP/VPP/DP layout, distributed optimizer included) as a
Hugging Face directory that ``transformers``, vLLM and the Hub accept.

    megatron-simpo convert mcore-to-hf --load CKPT [--iteration N] --hf-dir OUT \\
        [--dtype bf16|fp16|fp32] [--tokenizer DIR] [--max-shard-size 5GB] [--adapter-only]

An adapter-only (LoRA/DoRA) checkpoint exports merged into its base (``lora_base`` in its run
state): a full HF model. With ``--adapter-only`` it exports as a peft adapter instead
(``adapter_config.json`` + ``adapter_model.safetensors``, ``megatron_simpo/convert/lora.py``).

Streaming: the checkpoint is read one tensor (one layer of a layer-stacked tensor) at a time
with partial reads of its torch distributed-checkpoint files, converted through the family's key
map and written to safetensors shards as they fill, so peak memory stays near one shard plus one
tensor group, not the model. Only model weights are read (optimizer state is skipped).
Output: ``model*.safetensors``
with ``model.safetensors.index.json``, ``config.json`` (the one recorded at import, updated),
``generation_config.json`` and tokenizer files (from ``--tokenizer`` or recorded at import).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_simpo.config import ModelConfig
from megatron_simpo.convert import keymap
from megatron_simpo.convert.common import HF_SIDE_FILES, checkpoint_names, expert_index
from megatron_simpo.errors import CheckpointError, ConfigError
from megatron_simpo.progress import progress

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise ConfigError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def _slice_planner(chunks: dict):
    """A torch DCP load planner that reads only the given chunk of each tensor (e.g. one layer
    of a layer-stacked tensor) into a buffer of that chunk's shape."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for fqn, chunk in chunks.items():
                md = self.metadata.state_dict_metadata[fqn]
                items += create_read_items_for_chunk_list(fqn, md, [chunk])
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            t = self.state_dict[read_item.dest_index.fqn]
            for dim, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                t = t.narrow(dim, off, n)
            return t

    return SlicePlanner()


class _Reader:
    """Reads one tensor, or one layer of a layer-stacked tensor, from a dist checkpoint (a torch
    distributed-checkpoint directory) — never the whole model."""

    def __init__(self, ckpt: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.ckpt = ckpt
        self.meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata

    def get(self, key: str, layer: int | None, expert: int | None = None) -> torch.Tensor:
        """The tensor ``key``: one layer of a layer-stacked one, one expert of that layer's
        expert-stacked one (``[layers, experts, ...]``)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        if key not in self.meta or not hasattr(self.meta[key], "size"):
            raise CheckpointError(
                f"{self.ckpt}: tensor '{key}' is missing; is this a "
                "megatron-simpo checkpoint of this model?"
            )
        m = self.meta[key]
        shape = tuple(m.size)
        lead = [] if layer is None else [layer] if expert is None else [layer, expert]
        shape = (*(1,) * len(lead), *shape[len(lead) :])
        buf = torch.empty(shape, dtype=m.properties.dtype)
        offsets = torch.Size(lead + [0] * (len(shape) - len(lead)))
        planner = _slice_planner({key: ChunkStorageMetadata(offsets=offsets, sizes=buf.shape)})
        with warnings.catch_warnings():  # "assuming ... a single process": intended
            warnings.simplefilter("ignore")
            dcp.load(
                {key: buf},
                storage_reader=FileSystemReader(str(self.ckpt)),
                planner=planner,
                no_dist=True,
            )
        return buf.reshape(shape[len(lead) :])


class _ShardWriter:
    """Writes tensors to numbered safetensors files of at most ``limit`` bytes, plus the index."""

    def __init__(self, out: Path, limit: int) -> None:
        self.out, self.limit = out, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.size + n > self.limit:
            self.flush()
        self.pending[name] = t.contiguous()
        self.size += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(
            self.pending,
            str(self.out / f"part-{len(self.files):05d}.safetensors"),
            metadata={"format": "pt"},
        )
        self.files.append(list(self.pending))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, names in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f"part-{i:05d}.safetensors").rename(self.out / final)
            weight_map.update({k: final for k in names})
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _hf_tensors(
    reader: _Reader, model_cfg: ModelConfig, keys: dict[str, tuple[str, bool]]
) -> Iterator[tuple[str, torch.Tensor]]:
    shapes = keymap.Shapes.of(model_cfg)
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    for mc_name, hf_names, transform in keymap.entries(model_cfg):
        m = layer_re.search(mc_name)
        layer = int(m.group(1)) if m else None
        proxy_name = layer_re.sub(".layers.0.", mc_name)
        if proxy_name not in keys:
            raise CheckpointError(f"no checkpoint key for {mc_name}")
        key, stacked, _ = keys[proxy_name]
        tensor = reader.get(key, layer if stacked else None, expert_index(mc_name))
        if not stacked and layer is not None:
            raise CheckpointError(f"{key}: expected a layer-stacked tensor")
        yield from zip(hf_names, keymap.TRANSFORMS[transform][1](tensor, shapes), strict=True)


def _merged(
    tensors: Iterator[tuple[str, torch.Tensor]], reader: _Reader, model_cfg, lora_cfg
) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's HF tensors with each adapted projection's adapter merged in."""
    from megatron_simpo.convert.lora import adapter_names, checkpoint_location, merge

    by_hf: dict[str, dict[str, str]] = {}
    for n in adapter_names(model_cfg, lora_cfg):
        by_hf.setdefault(n.hf, {})[n.mc.rsplit(".", 1)[1]] = n.mc
    scaling = lora_cfg.lora_alpha / lora_cfg.lora_rank
    for name, t in tensors:
        parts = by_hf.get(name)
        if parts is not None:
            a, b, mag = (
                reader.get(*checkpoint_location(parts[k])) if k in parts else None
                for k in ("lora_A", "lora_B", "lora_magnitude")
            )
            t = merge(t, a, b, scaling, mag)
        yield name, t


def mcore_to_hf(
    load: str | Path,
    hf_dir: str | Path,
    *,
    iteration: int | None = None,
    dtype: str | None = None,
    tokenizer: str | None = None,
    max_shard_size: str = "5GB",
    adapter_only: bool = False,
) -> Path:
    """Exports; returns the HF directory. Single process."""
    from megatron_simpo import checkpointing, parallel

    load, out = Path(load), Path(hf_dir)
    if iteration is not None:
        ckpt = load / f"iter_{iteration:07d}"
        if not ckpt.is_dir():
            raise CheckpointError(f"--iteration {iteration}: {ckpt} does not exist")
    else:
        ckpt = checkpointing.checkpoint_dir(load)
        if ckpt is None:
            raise CheckpointError(f"--load {load}: no checkpoint there")
    saved = checkpointing.read_run_state(ckpt).get("config", {}).get("model")
    if not saved:
        raise CheckpointError(
            f"{ckpt}: no model config recorded (run_state.json); was it written by megatron-simpo?"
        )
    model_cfg = ModelConfig(**saved)
    state = checkpointing.read_run_state(ckpt)
    lora_cfg = None
    if state.get("adapter_only"):
        from megatron_simpo.config import LoraConfig

        lora_cfg = LoraConfig(**state["config"]["lora"])
    if adapter_only:
        if lora_cfg is None:
            raise CheckpointError(
                f"--adapter-only: {ckpt} is not an adapter checkpoint (train with --lora-rank)"
            )
        from megatron_simpo.convert.lora import checkpoint_location, write_peft

        reader = _Reader(ckpt)
        return write_peft(
            out,
            model_cfg,
            lora_cfg,
            lambda mc, i: reader.get(*checkpoint_location(mc)).contiguous(),
        )
    adapters_reader = None
    if lora_cfg is not None:  # merged into the base the adapters were trained on
        base = state.get("lora_base")
        base_ckpt = checkpointing.checkpoint_dir(base) if base else None
        if base_ckpt is None:
            raise CheckpointError(
                f"{ckpt}: its base checkpoint {base!r} is not there; export with --adapter-only"
            )
        adapters_reader = _Reader(ckpt)
        ckpt = base_ckpt
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--hf-dir {out} is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    target = DTYPES[dtype] if dtype else None
    if dtype and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}")

    parallel.init_distributed()
    parallel.init_model_parallel(1, 1, None, seed=0)
    keys = checkpoint_names(model_cfg).keys
    reader = _Reader(ckpt)
    writer = _ShardWriter(out, limit)
    stored_dtype = None
    tensors = _hf_tensors(reader, model_cfg, keys)
    if adapters_reader is not None:
        tensors = _merged(tensors, adapters_reader, model_cfg, lora_cfg)
    for name, t in progress(tensors, "convert", unit="tensors"):
        stored_dtype = stored_dtype or t.dtype
        writer.add(name, t.to(target) if target is not None else t)
    writer.close()
    parallel.destroy_model_parallel()

    side = checkpointing.hf_side_dir(load)
    if side is None and adapters_reader is not None:  # the base's, recorded at its import
        side = checkpointing.hf_side_dir(ckpt)
    side_config = side / "config.json" if side is not None else None
    base = json.loads(side_config.read_text()) if side_config and side_config.is_file() else None
    config = model_cfg.to_hf_config(base)
    torch_dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[
        target or stored_dtype
    ]
    config["torch_dtype"] = torch_dtype
    config["dtype"] = torch_dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok_src = Path(tokenizer) if tokenizer else side
    for name in HF_SIDE_FILES if tok_src is not None else ():
        if name != "config.json" and (tok_src / name).is_file():
            shutil.copy2(tok_src / name, out / name)
    return out
