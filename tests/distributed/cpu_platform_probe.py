"""Checks, in a fresh process, that each CPU patch is still needed and that it works.

Prints one JSON object: ``{patch_name: {"needed": bool, "works": bool, "detail": str}}``.
Run by ``tests/test_cpu_platform.py``; needs a machine without CUDA.
"""

from __future__ import annotations

import inspect
import json
import queue

import torch


def fails(fn) -> bool:
    try:
        fn()
    except Exception:
        return True
    return False


def main() -> None:
    assert not torch.cuda.is_available(), "this probe is for CPU-only machines"
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as mp_random

    from megatron_simpo.platform import cpu

    stubs = cpu.triton_only_modules_to_stub()
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
        # Needed exactly when this Megatron-Core has triton-only modules (0.18+) and no triton.
        "triton_only_modules": bool(stubs),
        "dist_ckpt_results_queue": "Manager()"
        in inspect.getsource(filesystem_async._get_write_results_queue),
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

        for name in stubs:
            importlib.import_module(name)
        import megatron.core.pipeline_parallel.schedules  # noqa: F401  (imports them in 0.18+)

        return True

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
        "dist_ckpt_results_queue": isinstance(
            filesystem_async._get_write_results_queue(), queue.Queue
        ),
    }
    print(json.dumps({k: {"needed": needed[k], "works": works[k]} for k in cpu.PATCHES}))


if __name__ == "__main__":
    main()
