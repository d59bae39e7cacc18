"""What import (``hf.py``) and export (``export.py``) share: the HF files kept with a checkpoint
and the checkpoint names of a model, read off a one-layer proxy of it.

Megatron-Core's distributed checkpoint stores every decoder-layer tensor stacked along a leading
layer axis under one key, so a model with one layer has all the names (and per-layer shapes) of
a model with any number of layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from megatron_simpo.config import ModelConfig, RunConfig
from megatron_simpo.errors import CheckpointError

#: Files copied next to the checkpoint (``CKPT/hf/``) so that evaluation/export find the
#: tokenizer and the original ``config.json``.
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


_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """The expert of a module state-dict name (``...mlp.experts.local_experts.{e}...``), or
    None. Megatron-Core stores expert tensors stacked along an expert axis after the layer axis
    (``[layers, experts, ...]``, one key for all experts), which expert parallelism shards."""
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CheckpointNames:
    """The dist-checkpoint layout of a model.

    Attributes:
        keys: module state-dict name (layer 0) -> (dist-checkpoint key, layer-stacked?, shape
            of one layer's tensor).
        extra_state: layer-stacked ShardedObject keys (module extra state) -> their data.
        expert_extra_state: those of them stacked over experts too (``[layers, experts]``).
    """

    keys: dict[str, tuple[str, bool, tuple[int, ...]]]
    extra_state: dict[str, object]
    expert_extra_state: frozenset[str] = frozenset()


def checkpoint_names(model_cfg: ModelConfig) -> CheckpointNames:
    """Builds a one-layer proxy of ``model_cfg`` (fp32, local spec) and reads its
    ``sharded_state_dict``, so the names follow whatever the installed Megatron-Core writes
    (e.g. its TE-compatible norm keys). Needs model parallelism initialised (TP=1, PP=1)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_simpo.model import build_model, unwrap

    cfg = RunConfig()
    cfg.model = replace(model_cfg, num_hidden_layers=1)
    cfg.train.precision = "fp32"
    (model,) = build_model(cfg, use_te=False)
    keys: dict[str, tuple[str, bool, tuple[int, ...]]] = {}
    extra: dict[str, object] = {}
    expert_extra: set[str] = set()
    for name, sh in unwrap(model).sharded_state_dict().items():
        if isinstance(sh, ShardedObject):
            if ".layers." not in name:
                raise CheckpointError(f"unexpected non-layer extra state {name}")
            extra[sh.key] = sh.data
            if expert_index(name) is not None:
                expert_extra.add(sh.key)
        elif not name.endswith("_extra_state"):
            # Megatron stacks every decoder-layer tensor along a leading layer axis.
            keys[name] = (sh.key, ".layers." in name, tuple(sh.data.shape))
    return CheckpointNames(keys, extra, frozenset(expert_extra))
