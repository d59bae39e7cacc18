"""Process groups: torch.distributed (NCCL on CUDA, gloo on CPU) and Megatron-Core's groups."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron_simpo.platform import cpu


def init_distributed(timeout_minutes: int = 10) -> None:
    """Initialises torch.distributed from torchrun's environment (a single process without it).

    On a machine without CUDA, the CPU compatibility layer is activated first.
    """
    if not torch.cuda.is_available():
        cpu.activate()
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def init_model_parallel(
    tp: int, pp: int, vpp: int | None, seed: int, timeout_minutes: int = 10
) -> None:
    """Creates Megatron-Core's TP/PP/DP groups and seeds the model-parallel RNG tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_simpo import compat

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    compat.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_model_parallel() -> None:
    """Tears down Megatron-Core's groups (the torch.distributed world stays)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def init_model_parallel_for(cfg) -> None:
    """:func:`init_model_parallel` with a run config's sizes, seed and timeout."""
    p = cfg.parallel
    init_model_parallel(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        cfg.virtual_pipeline_size,
        seed=cfg.train.seed,
        timeout_minutes=p.distributed_timeout_minutes,
    )
