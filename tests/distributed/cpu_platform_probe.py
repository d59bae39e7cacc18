"""Checks, in a fresh process, that each CPU patch is still needed and that it works.

Prints one JSON object: ``{patch_name: {"needed": bool, "works": bool, "detail": str}}``.
Run by ``tests/test_cpu_platform.py``; needs a machine without CUDA.
"""

from __future__ import annotations

import inspect
import json
import queue
import socket
import subprocess
import sys

import torch

# Before any Megatron-Core import, as for every user: installs the triton stand-in finder.
from megatron_simpo.platform import cpu, triton_stand_ins

SCHEDULES = "megatron.core.pipeline_parallel.schedules"


def fails(fn) -> bool:
    try:
        fn()
    except Exception:
        return True
    return False


def imports_without_megatron_simpo(module: str) -> bool:
    """Whether ``module`` imports in a fresh interpreter that never imported megatron_simpo."""
    code = f"import {module}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 or "triton" in out.stderr, out.stderr[-2000:]
    return out.returncode == 0


def alltoall_refuses_tensor_splits() -> bool:
    """Whether a one-rank gloo ``all_to_all_single`` with tensor split sizes fails."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    splits = torch.tensor([3])
    return fails(
        lambda: dist.all_to_all_single(
            torch.empty(3), torch.ones(3), output_split_sizes=splits, input_split_sizes=splits
        )
    )


def moe_splits_work() -> bool:
    """The dispatcher's split sizes, as it gets them, pass a one-rank gloo all_to_all."""
    import torch.distributed as dist
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)
    out = torch.empty(3)
    dist.all_to_all_single(out, torch.ones(3), output_split_sizes=splits, input_split_sizes=splits)
    return bool((out == 1).all())


def main() -> None:
    assert not torch.cuda.is_available(), "this probe is for CPU-only machines"
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe.moe_utils import maybe_move_tensor_to_cpu

    get_queue_name = cpu.results_queue_function_name()
    needed = {
        "device_mode": fails(lambda: torch.empty(2, device="cuda")),
        "tensor_type_names": "'torch.cuda.FloatTensor'" in inspect.getsource(clip_grads)
        and "'torch.cuda.FloatTensor'" in inspect.getsource(optimizer)
        and torch.zeros(1).type() == "torch.FloatTensor",
        "cuda_current_device": fails(torch.cuda.current_device),
        "cuda_sync_and_streams": fails(torch.cuda.synchronize) and fails(torch.cuda.current_stream),
        "rng_tracker": fails(
            lambda: mp_random.model_parallel_cuda_manual_seed(1, tp_rank=0, ep_rank=0, etp_rank=0)
        ),
        # Needed exactly when the schedules (and, in 0.19, megatron.core itself) cannot be
        # imported here without the stand-ins: 0.18+ on a machine without triton.
        "triton_only_modules": not imports_without_megatron_simpo(SCHEDULES),
        # What the dispatcher hands all_to_all_single on a CPU: still a tensor (a numpy array on
        # a GPU), which the c10d binding refuses.
        "alltoall_split_sizes": torch.is_tensor(
            maybe_move_tensor_to_cpu(torch.tensor([1]), as_numpy=True)
        )
        and alltoall_refuses_tensor_splits(),
        "dist_ckpt_results_queue": "Manager()"
        in inspect.getsource(getattr(filesystem_async, get_queue_name)),
    }

    assert cpu.activate() and cpu.is_active()

    def rng_works() -> bool:
        mp_random.model_parallel_cuda_manual_seed(
            3, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True
        )
        tracker = mp_random.get_cuda_rng_tracker()
        outside = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        unchanged = torch.equal(outside, torch.get_rng_state())
        mp_random.model_parallel_cuda_manual_seed(
            3, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True
        )
        with mp_random.get_cuda_rng_tracker().fork():
            b = torch.rand(4)
        return unchanged and torch.equal(a, b)

    def triton_stubs_work() -> bool:
        import importlib

        importlib.import_module(SCHEDULES)  # imports the triton-only modules in 0.18+
        served = [
            name
            for name in triton_stand_ins.TRITON_ONLY_MODULES
            if name in sys.modules and triton_stand_ins.is_stand_in(sys.modules[name])
        ]
        # Served exactly where needed, and inert: attribute chains and calls give falsy values.
        needed_here = needed["triton_only_modules"]
        inert = all(not sys.modules[name].anything(1).attr for name in served)
        return bool(served) == needed_here and inert

    def queue_works(get_queue) -> bool:
        # Called as this Megatron-Core calls it: 0.18+ passes mp_mode; one queue per process.
        kwargs = {"mp_mode": "spawn"} if get_queue_name == "get_write_results_queue" else {}
        q = get_queue(**kwargs)
        return isinstance(q, queue.Queue) and get_queue() is q

    works = {
        "device_mode": torch.empty(2, device="cuda").device.type == "cpu"
        and torch.zeros(2).cuda().device.type == "cpu"
        and torch.zeros(2).to("cuda:0").device.type == "cpu"
        and torch.zeros(2, device=0).device.type == "cpu",
        "tensor_type_names": torch.zeros(1).type() == "torch.cuda.FloatTensor"
        and torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor",
        "cuda_current_device": torch.zeros(1, device=torch.cuda.current_device()).device.type
        == "cpu",
        "cuda_sync_and_streams": torch.cuda.synchronize() is None
        and torch.cuda.current_stream().wait_stream(torch.cuda.Stream()) is None,
        "rng_tracker": rng_works(),
        "triton_only_modules": triton_stubs_work(),
        "alltoall_split_sizes": moe_splits_work(),
        "dist_ckpt_results_queue": queue_works(getattr(filesystem_async, get_queue_name)),
    }
    print(json.dumps({k: {"needed": needed[k], "works": works[k]} for k in cpu.PATCHES}))


if __name__ == "__main__":
    main()
