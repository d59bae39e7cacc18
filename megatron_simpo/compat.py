"""Megatron-Core version differences, in one place.

Supported: megatron-core 0.16.1 (newest for Python 3.11; tested in CI) up to 0.19.x (Python 3.12,
NVIDIA's containers). Differences that matter to this package:

- ``initialize_model_parallel`` gained keyword arguments over time (``rank_offset``,
  ``local_world_size`` in 0.19): only the ones the installed version accepts are passed.
- ``DistributedOptimizer.sharded_state_dict`` defaults to a format that 0.19 cannot save on some
  layouts; the ``fully_reshardable`` sharding type works from 0.15 on and is always requested.
- 0.18+ import triton in MoE modules reached from the pipeline schedules; handled on CPU by
  :mod:`megatron_simpo.platform.cpu`.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from typing import Any

from megatron.core import parallel_state

MCORE_VERSION: str = version("megatron-core")
SUPPORTED = ">=0.16.1,<0.20"

#: Passed to ``optimizer.sharded_state_dict(..., metadata=...)`` when saving/loading.
OPTIMIZER_CKPT_METADATA: dict[str, Any] = {"distrib_optim_sharding_type": "fully_reshardable"}


def mcore_version_tuple() -> tuple[int, ...]:
    return tuple(int(x) for x in MCORE_VERSION.split(".")[:2] if x.isdigit())


def initialize_model_parallel(**kwargs: Any) -> None:
    """``parallel_state.initialize_model_parallel`` with the kwargs this version accepts."""
    accepted = inspect.signature(parallel_state.initialize_model_parallel).parameters
    parallel_state.initialize_model_parallel(**{k: v for k, v in kwargs.items() if k in accepted})
