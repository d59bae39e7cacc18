"""Megatron-Core version differences, in one place.

Supported: megatron-core 0.16.1 (newest for Python 3.11) up to 0.19.x (Python 3.12, NVIDIA's
containers); CI runs the correctness tests on 0.16.1 and 0.19.2. Differences that matter here:

- ``initialize_model_parallel`` gained keyword arguments over time (``rank_offset``,
  ``local_world_size`` in 0.19): only the ones the installed version accepts are passed.
- ``DistributedOptimizer.sharded_state_dict`` defaults to a format that 0.19 cannot save on some
  layouts; the ``fully_reshardable`` sharding type works from 0.15 on and is always requested.
- Positional signatures drift (``dist_checkpointing.save/load`` dropped ``common_strategy`` in
  0.19; ``GPTModel`` gains ``logit_dtype`` after 0.19): Megatron objects are built by keyword.
- 0.18+ import triton-only MoE modules from ``megatron.core`` itself; on CPU they are served by
  :mod:`megatron_simpo.platform.triton_stand_ins`; dist_checkpointing's results-queue factory
  was renamed (``get_write_results_queue(mp_mode=...)``): :mod:`megatron_simpo.platform.cpu`.

This module imports no Megatron-Core at import time, so :func:`check_mcore_version` can speak
before an unsupported version fails to import.
"""

from __future__ import annotations

import inspect
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_simpo.errors import SimPOError

#: The installable range (pyproject.toml declares the same); CI tests both ends of it.
SUPPORTED = ">=0.16.1,<0.20"
#: Versions the CI runs the correctness tests on.
TESTED = ("0.16.1", "0.19.2")
#: Set to 1 to run with a Megatron-Core outside :data:`SUPPORTED` (a warning instead of an error).
ALLOW_UNSUPPORTED_ENV = "MEGATRON_SIMPO_ALLOW_UNSUPPORTED_MCORE"

#: Passed to ``optimizer.sharded_state_dict(..., metadata=...)`` when saving/loading.
OPTIMIZER_CKPT_METADATA: dict[str, Any] = {"distrib_optim_sharding_type": "fully_reshardable"}


class UnsupportedMegatronCore(SimPOError):
    """The installed Megatron-Core is missing or outside :data:`SUPPORTED`."""


def installed_mcore_version() -> str | None:
    """The installed megatron-core's version string, or None when it is not installed."""
    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return None


def check_mcore_version(installed: str | None = None) -> str:
    """Checks the installed Megatron-Core against :data:`SUPPORTED`.

    Args:
        installed: the version to check (default: the installed one).

    Returns:
        The version checked.

    Raises:
        UnsupportedMegatronCore: missing, or outside the range and the escape hatch
            (:data:`ALLOW_UNSUPPORTED_ENV` ``=1``) is not set; the message says how to fix it.
    """
    installed = installed if installed is not None else installed_mcore_version()
    fix = f"pip install 'megatron-core{SUPPORTED}'"
    if installed is None:
        raise UnsupportedMegatronCore(f"megatron-core is not installed; install it with: {fix}")
    # Pre-releases of a supported version (0.19.0rc1) count as supported.
    if SpecifierSet(SUPPORTED, prereleases=True).contains(Version(installed)):
        return installed
    message = (
        f"megatron-core {installed} is installed, but megatron-simpo supports {SUPPORTED} "
        f"(CI tests {' and '.join(TESTED)}); fix: {fix}"
    )
    if os.environ.get(ALLOW_UNSUPPORTED_ENV) == "1":
        warnings.warn(f"{message} ({ALLOW_UNSUPPORTED_ENV}=1: going on anyway)", stacklevel=2)
        return installed
    raise UnsupportedMegatronCore(f"{message}, or set {ALLOW_UNSUPPORTED_ENV}=1 to try it anyway")


def initialize_model_parallel(**kwargs: Any) -> None:
    """``parallel_state.initialize_model_parallel`` with the kwargs this version accepts."""
    from megatron.core import parallel_state

    accepted = inspect.signature(parallel_state.initialize_model_parallel).parameters
    parallel_state.initialize_model_parallel(**{k: v for k, v in kwargs.items() if k in accepted})


def async_save_kwargs() -> dict[str, Any]:
    """Extra ``dist_checkpointing.save`` kwargs of an async save: 0.19 defaults to NVIDIA
    Resiliency Extension's writer (``async_strategy="nvrx"``) and keeps Megatron-Core's own as
    ``"mcore"``; the latter is used unless ``nvidia_resiliency_ext`` is installed (0.16-0.18
    have only Megatron-Core's, and no such argument)."""
    from importlib.util import find_spec

    from megatron.core import dist_checkpointing

    if "async_strategy" not in inspect.signature(dist_checkpointing.save).parameters:
        return {}
    return {"async_strategy": "nvrx" if find_spec("nvidia_resiliency_ext") else "mcore"}


#: Names megatron-core 0.16's ``transformer/moe/moe_utils.py`` imports from Transformer Engine
#: only when TE is installed, yet reads unconditionally (``RouterGatingLinearFunction``, line
#: 1192: ``if te_general_gemm is not None``): without TE every MoE forward dies with a
#: NameError. 0.19 binds them to None itself.
_MOE_TE_NAMES = (
    "fused_compute_score_for_moe_aux_loss",
    "fused_moe_aux_loss",
    "fused_permute",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_topk_with_score_function",
    "fused_unpermute",
    "te_general_gemm",
)


def define_missing_moe_te_names() -> None:
    """Binds the TE names of :data:`_MOE_TE_NAMES` that ``moe_utils`` lacks to None (its own
    "not available" value), as 0.19 does; a no-op where TE is installed."""
    from megatron.core.transformer.moe import moe_utils

    for name in _MOE_TE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)
