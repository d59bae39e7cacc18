"""``megatron-simpo train`` with one injected fault (tests of the fault-tolerance issue).

    torchrun ... tests/distributed/fault_runner.py FAULT RANK N -- train ARGS...

FAULT ``kill-in-step``: rank RANK SIGKILLs itself inside the forward-backward of its N-th step.
FAULT ``kill-in-save``: rank RANK SIGKILLs itself during its N-th checkpoint save, after writing
its share of the files and before the save is published.
FAULT ``kill-in-async-save``: rank RANK SIGKILLs itself right after starting its N-th background
save (``--async-save``: the writer process is forked, nothing is published yet).
"""

from __future__ import annotations

import os
import signal
import sys

import torch.distributed as dist

from megatron_simpo import checkpointing, step
from megatron_simpo.cli import main


def _kill_on_call(module, name: str, rank: int, nth: int, before: bool) -> None:
    original = getattr(module, name)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        fire = dist.get_rank() == rank and calls == nth
        if fire and before:
            os.kill(os.getpid(), signal.SIGKILL)
        out = original(*args, **kwargs)
        if fire:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(module, name, wrapper)


if __name__ == "__main__":
    fault, rank, nth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    if fault == "kill-in-step":
        _kill_on_call(step, "run_forward_backward", rank, nth, before=True)
    elif fault == "kill-in-save":
        _kill_on_call(checkpointing.dist_checkpointing, "save", rank, nth, before=False)
    elif fault == "kill-in-async-save":
        from megatron.core.dist_checkpointing.strategies import async_utils

        _kill_on_call(async_utils.AsyncCallsQueue, "schedule_async_request", rank, nth, False)
    else:
        raise SystemExit(f"unknown fault {fault}")
    raise SystemExit(main(argv))
