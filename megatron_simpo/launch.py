"""``torchrun`` that survives Slurm's stop signals: ``python -m megatron_simpo.launch ARGS``.

    srun python -m megatron_simpo.launch --nnodes 2 --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint HEAD:29500 -m megatron_simpo train ...

takes exactly ``torchrun``'s arguments. Why it exists: Slurm signals every process of a job step
(``#SBATCH --signal=USR1@300``, ``scancel --signal=USR1``, the SIGTERM at a time limit or on
preemption), the torchrun *agent* included. Observed under a real Slurm 22.05
(proctrack/linuxproc, ``tests/test_slurm.py``):

* SIGUSR1: the agent has no handler, so the default action kills it; ``srun`` reports the task
  "User defined signal 1" and exits 138 (the batch script fails under ``set -e``). The workers,
  started in their own sessions, got the signal too and are re-parented to init: they go on
  checkpointing unsupervised. Where the step is tracked by cgroup (not tested here) the end of
  the step would kill them, possibly mid-checkpoint.
* SIGTERM: the agent turns it into an exception and tears the workers down (SIGTERM, then SIGKILL
  after 30 s), and exits 1, whatever state their checkpoint is in.

This launcher gives the agent a handler for both that forwards the signal to its workers (the
trainer's own handler then finishes the iteration, checkpoints and exits 0; a second copy of a
signal the worker also got from Slurm is harmless) and otherwise lets the agent wait for them as
usual, so the step ends with the workers' exit status: 0 after a clean stop. SIGINT, SIGHUP and
SIGQUIT keep torchrun's behaviour (tear down).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

#: Signals the agent forwards to its workers instead of dying or tearing them down.
FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def child_pids(parent: int) -> list[int]:
    """Pids of ``parent``'s direct children, read from ``/proc/*/stat`` (Linux)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited while we looked
        if int(fields[1]) == parent:  # fields: state, ppid, ...
            pids.append(int(stat.parent.name))
    return pids


def _forward(signum: int, frame) -> None:
    workers = child_pids(os.getpid())
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    name = signal.Signals(signum).name
    print(f"launch: {name} forwarded to worker pids {workers}", file=sys.stderr, flush=True)


def _install() -> None:
    """Forwarding handlers now (agent start-up, rendezvous) and in place of torchrun's tear-down
    handler for the same signals once it starts the workers."""
    from torch.distributed.elastic.multiprocessing import api

    # torchrun (every version since 1.9) installs ``api._terminate_process_handler``, looked up
    # by name when the workers start, for SIGTERM/SIGINT/SIGHUP/SIGQUIT (2.x: the list in
    # --signals-to-handle); wrap it so the forwarded signals never reach it.
    teardown = api._terminate_process_handler

    def handler(signum: int, frame) -> None:
        if signum in FORWARDED:
            _forward(signum, frame)
        else:
            teardown(signum, frame)

    api._terminate_process_handler = handler
    for sig in FORWARDED:
        signal.signal(sig, _forward)


def main(argv: list[str] | None = None) -> None:
    """Installs the forwarding handlers, then runs ``torch.distributed.run.main(argv)``."""
    from torch.distributed.run import main as torchrun_main

    _install()
    torchrun_main(argv)


if __name__ == "__main__":
    main()
