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
    tp: int,
    pp: int,
    vpp: int | None,
    seed: int,
    timeout_minutes: int = 10,
    ep: int = 1,
    etp: int | None = None,
) -> None:
    """Creates Megatron-Core's TP/PP/DP groups (and its expert groups: EP, expert TP, expert DP)
    and seeds the model-parallel RNG tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_simpo import compat

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    compat.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
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
        ep=p.expert_model_parallel_size,
        etp=p.expert_tensor_parallel_size,
    )


_EXPLAINED: set[str] = set()


def variable_seq_lengths(cfg) -> bool:
    """Whether pipeline stages exchange each micro-batch's shape before its activations
    (Megatron-Core's ``variable_seq_lengths``), so micro-batches need not share one width.

    ``--variable-seq-lengths`` under pipeline parallelism, except the interleaved schedule on
    gloo, which keeps fixed shapes (said once on rank 0): at PP=2 a stage sends its activation
    and its gradient to the same peer in one exchange, and Megatron-Core's shape exchange (always
    batched) posts them in an order that crosses the two shapes on gloo (measured: "Received data
    size doesn't match expected size"), while its data exchange, unbatched on gloo, orders them by
    rank parity. On NCCL the shapes go in the same batched order as the data, so they are exactly
    as right as Megatron's own data path.
    """
    p = cfg.parallel
    if p.pipeline_model_parallel_size == 1 or not p.variable_seq_lengths:
        return False
    if cfg.virtual_pipeline_size and not torch.cuda.is_available():
        reason = (
            "fixed pipeline shapes: the interleaved schedule on gloo crosses Megatron-Core's "
            "shape exchange (megatron_simpo/parallel.py); every micro-batch is padded to the "
            "longest of the slice"
        )
        if reason not in _EXPLAINED and (not dist.is_initialized() or dist.get_rank() == 0):
            print(reason, flush=True)
        _EXPLAINED.add(reason)
        return False
    return True
