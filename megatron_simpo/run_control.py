"""Run control: stop signals and time limits, skipped (non-finite) updates, Slurm requeue, and
the translation of a failed collective into one actionable error."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import torch
import torch.distributed as dist

from megatron_simpo.errors import TrainingError
from megatron_simpo.optim import is_loss_scale_search


class StopControl:
    """SIGTERM / SIGUSR1 (Slurm before a time limit or preemption) and ``--exit-duration-in-mins``:
    the loop finishes the iteration, checkpoints and exits 0.

    Installed from the start of a run: a signal during setup (data, model, checkpoint load) is
    honoured after the first iteration instead of killing the process.
    """

    def __init__(self, exit_duration_in_mins: float | None) -> None:
        self.limit = exit_duration_in_mins
        self.signal: int | None = None
        self.reason = ""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def should_stop(self, start: float) -> bool:
        """Whether any rank got a stop signal or the time limit passed (collective, so every
        rank stops at the same iteration); sets :attr:`reason`."""
        flags = torch.tensor(
            [
                float(self.signal is not None),
                float(self.limit is not None and time.time() - start > self.limit * 60),
            ]
        )
        if torch.cuda.is_available():
            flags = flags.cuda()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            self.reason = "stop signal received (SIGTERM/SIGUSR1)"
        elif flags[1]:
            self.reason = f"--exit-duration-in-mins {self.limit} reached"
        return bool(flags.any())

    @property
    def stopped_early(self) -> bool:
        """Stopped by a signal or the time limit (the cases ``--slurm-requeue`` requeues)."""
        return self.reason.startswith("stop signal") or "exit-duration" in self.reason


class SkipCounter:
    """Counts updates skipped for a non-finite loss or gradient; ``--max-skipped-iters`` of them
    in a row end the run. fp16's loss-scale search (a finite loss, overflowing scaled gradients,
    a scale still above its minimum) is counted but never ends it."""

    def __init__(self, max_in_a_row: int) -> None:
        self.limit = max_in_a_row
        self.total = 0
        self.in_a_row = 0

    def record(self, iteration: int, metrics: dict[str, float]) -> None:
        """Accounts for ``iteration``'s update (1-based); raises TrainingError at the limit."""
        if metrics["update_ok"]:
            self.in_a_row = 0
            return
        self.total += 1
        if is_loss_scale_search(metrics):
            _say(
                f"iteration {iteration}: update skipped, fp16 gradients overflowed; loss scale "
                f"now {metrics['loss_scale']:g} ({self.total} skipped in total)"
            )
            return
        self.in_a_row += 1
        _say(
            f"iteration {iteration}: update skipped, non-finite loss or gradients "
            f"(loss {metrics['loss']:.4g}; {self.in_a_row} in a row, {self.total} in total)"
        )
        if self.in_a_row >= self.limit:
            raise TrainingError(
                f"{self.limit} consecutive iterations (up to {iteration}) had a non-finite "
                "loss or gradient norm, so their updates were skipped (--max-skipped-iters "
                f"{self.limit}). The weights are still those of iteration "
                f"{iteration - self.limit}; lower --lr, check the data of these "
                "iterations, or resume from the last checkpoint"
            )


def _say(line: str) -> None:
    if dist.get_rank() == 0:
        print(line, flush=True)


def is_communication_failure(e: BaseException) -> bool:
    """Whether an exception raised inside a step is a failed collective (a dead or stalled
    peer) rather than a bug: torch's distributed error types, or gloo/NCCL's messages."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(
        s in text
        for s in ("connection closed by peer", "connection reset", "timed out", "timeout", "nccl")
    )


def collective_failure(
    e: BaseException, phase: str, seconds: float, save: str | None, saved_at: int
) -> TrainingError:
    """The one-line error for a collective that failed ``phase`` (e.g. "in iteration 7"):
    where to look, and whether the run can resume from ``--save``."""
    return TrainingError(
        f"rank {dist.get_rank()}: a collective failed {phase} "
        f"after {seconds:.0f} s ({type(e).__name__}: {str(e)[:300]}). "
        "Another rank probably died or stalled: see the first failure in its log. "
        + (
            f"The checkpoint of iteration {saved_at} under --save {save} is intact; "
            "rerun the same command to resume."
            if save and saved_at
            else "No checkpoint was written by this run."
        )
    )


def requeue() -> None:
    """``scontrol requeue $SLURM_JOB_ID`` from rank 0, once the stop checkpoint is written.

    Never fails the (already checkpointed) run: inside a container (pyxis/enroot) the job
    step usually has no ``scontrol``, or it may be refused. Then one message says so, the
    process exits 0, and the job id is written to ``$MEGATRON_SIMPO_REQUEUE_FILE`` when set:
    the batch script, which runs outside the container, requeues the job after the step
    (``slurm/common.sh``). Without it, Slurm's own ``--requeue`` (preemption) or a
    resubmission of the same command continues the run.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if dist.get_rank() != 0:
        return
    if not job:
        print("--slurm-requeue: no SLURM_JOB_ID (not under Slurm); not requeued", flush=True)
        return
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError:
        problem = "scontrol not found in this environment (inside a container?)"
    except (OSError, subprocess.SubprocessError) as e:
        problem = f"scontrol requeue {job} could not run ({type(e).__name__}: {e})"
    else:
        if done.returncode == 0:
            print(
                f"requeued Slurm job {job}: it resumes from --save when it starts again",
                flush=True,
            )
            return
        problem = f"scontrol requeue {job} failed: {done.stderr.strip()}"
    marker = os.environ.get("MEGATRON_SIMPO_REQUEUE_FILE")
    if marker:
        with open(marker, "w") as f:
            f.write(job)
        then = f"the batch script requeues job {job} after this step ({marker})"
    else:
        then = (
            "relying on Slurm's own --requeue (preemption) or a resubmission of the same "
            "command, which resumes from --save"
        )
    print(f"megatron-simpo: --slurm-requeue: {problem}; {then}", flush=True)
