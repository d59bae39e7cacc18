"""CPU compatibility layer for Megatron-Core (used only when CUDA is absent).

Megatron-Core assumes a CUDA device in a few dozen places. On a CPU-only machine (laptops, CI,
this project's test suite) :func:`activate` installs the smallest set of patches that lets the
*real* Megatron-Core run on the CPU with the gloo backend. Nothing here is used when
``torch.cuda.is_available()`` is true: on a GPU cluster Megatron-Core runs untouched.

Each patch is listed in :data:`PATCHES` with a one-line reason, and
``tests/test_cpu_platform.py`` checks, for every patch, that it is still needed (the unpatched
Megatron-Core call fails on CPU) and that it still works — so a Megatron-Core upgrade that
removes or moves a CUDA assumption makes the test fail instead of silently leaving dead code.

Measured facts behind each patch: ``shared/notes/megatron-core-on-cpu.md``.
"""

from __future__ import annotations

import contextlib
import queue
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: name -> why it is needed (kept in sync with ``activate``; the test suite checks each one).
PATCHES: dict[str, str] = {
    "device_mode": "Megatron allocates with device='cuda' / .cuda() / torch.cuda.current_device() "
    "(GlobalMemoryBuffer, RoPE, p2p buffers, DDP grad buffers, optimizer, clip_grads).",
    "tensor_type_names": "the optimizer and clip_grads accept only params whose .type() is "
    "'torch.cuda.*Tensor'.",
    "cuda_current_device": "torch.cuda.current_device() raises without a CUDA driver; Megatron "
    "uses it as an allocation device.",
    "cuda_sync_and_streams": "torch.cuda.synchronize / current_stream / Stream are called by "
    "dist-ckpt save, batched p2p and the DDP grad sync; on CPU they have nothing to wait for.",
    "rng_tracker": "the model-parallel RNG tracker (init, dropout fork) stores CUDA generator "
    "states; on CPU it must fork the CPU generator instead.",
    "triton_only_modules": "Megatron-Core 0.18+ imports MoE paged-stash modules that import triton "
    "unconditionally (from its package import and the pipeline schedules); CPU torch has no "
    "triton and dense models never run them, so inert stand-ins are served. Installed by "
    "`import megatron_simpo` (platform/triton_stand_ins.py), since it must precede any "
    "Megatron-Core import.",
    "alltoall_split_sizes": "the MoE alltoall token dispatcher hands all_to_all_single its split "
    "sizes through moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True), which makes numpy "
    "arrays of CUDA tensors only (token_dispatcher.py, _maybe_dtoh_and_synchronize); the c10d "
    "binding refuses the CPU tensors left, so CPU tensors become numpy arrays too.",
    "dist_ckpt_results_queue": "dist_checkpointing save starts a multiprocessing.Manager per rank "
    "only to hold a results queue (2-4 s per rank, needs a __main__ guard); an in-process queue "
    "is equivalent for synchronous saves.",
}

_ACTIVE = False
_MODE: TorchFunctionMode | None = None


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "CUDA device index" to torch.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps every CUDA device request of a torch call to the CPU.

    Covers ``device=`` keyword arguments (factories, ``.to``), positional devices of
    ``Tensor.to``, ``Tensor.cuda()`` and ``Tensor.type()`` (answered with the CUDA type name,
    which is what Megatron's optimizer checks for).
    """

    _TYPE_NAMES = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return self._TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for a CUDA stream/event: everything on the CPU is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _NullStream:
        return self

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    mp_random.CudaRNGStatesTracker.add = add


#: dist_checkpointing's results-queue factory: ``_get_write_results_queue()`` up to 0.17,
#: ``get_write_results_queue(mp_mode="spawn")`` from 0.18.
RESULTS_QUEUE_FUNCTIONS = ("get_write_results_queue", "_get_write_results_queue")


def results_queue_function_name() -> str:
    """Name of the installed dist_checkpointing's results-queue factory."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    for name in RESULTS_QUEUE_FUNCTIONS:
        if hasattr(filesystem_async, name):
            return name
    raise RuntimeError(
        "megatron.core.dist_checkpointing.strategies.filesystem_async has none of "
        f"{RESULTS_QUEUE_FUNCTIONS}: update platform/cpu.py for this Megatron-Core"
    )


def _patch_dist_ckpt_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def get_queue(*args: Any, **kwargs: Any) -> queue.Queue:
        # The arguments (0.18+: mp_mode) choose a multiprocessing context: none is needed.
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = queue.Queue()
        return filesystem_async._results_queue

    setattr(filesystem_async, results_queue_function_name(), get_queue)


def use_process_results_queue() -> None:
    """Makes dist_checkpointing's results queue one that a forked process can put into: an
    async save (``--async-save``) writes from a child process, whose puts into the in-process
    queue of ``dist_ckpt_results_queue`` would never reach the trainer. A fork-context
    ``Manager`` queue (~0.1 s to start, once per process; no ``__main__`` guard needed, unlike
    the default spawn context) takes results of any size without blocking the writer; its
    server process dies with the trainer (``PR_SET_PDEATHSIG`` on Linux), so a killed rank
    leaves no process behind."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if isinstance(filesystem_async._results_queue, queue.Queue | None):
        manager = SyncManager(ctx=mp.get_context("fork"))
        manager.start(initializer=_die_with_parent)
        filesystem_async._results_queue = manager.Queue()
        _MANAGERS.append(manager)  # alive as long as this process


_MANAGERS: list = []


def _die_with_parent() -> None:
    """In a child process: be killed when the parent dies (Linux ``prctl``; else a no-op)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _patch_moe_split_sizes() -> None:
    """``maybe_move_tensor_to_cpu(t, as_numpy=True)`` returns numpy for CPU tensors as well (see
    ``PATCHES['alltoall_split_sizes']``), in moe_utils and where the dispatcher imported it."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "_cpu_patched", False):
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        out = original(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(out) and out.device.type == "cpu":
            return out.numpy()
        return out

    maybe_move_tensor_to_cpu._cpu_patched = True  # type: ignore[attr-defined]
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def activate() -> bool:
    """Installs the CPU patches if CUDA is unavailable. Idempotent.

    Must run before Megatron-Core builds models or process groups. Returns whether the
    patches are active.
    """
    global _ACTIVE, _MODE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False

    _MODE = _CudaToCpuMode()
    # A process-wide mode: entered once, never exited (Megatron allocates at any time).
    _MODE.__enter__()

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.Stream = _NullStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _NullStream  # type: ignore[assignment,misc]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]

    _patch_rng_tracker()
    _patch_moe_split_sizes()
    _patch_dist_ckpt_queue()
    _ACTIVE = True
    return True


def is_active() -> bool:
    """Whether :func:`activate` installed the CPU patches in this process."""
    return _ACTIVE
