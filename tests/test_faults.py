"""Faults a multi-day run meets (fault-tolerance issue): a non-finite update is skipped and
counted (and the run aborts after --max-skipped-iters in a row), a rank killed mid-iteration
makes the others exit non-zero fast with a message, a rank killed mid-save leaves the previous
checkpoint published (and the same command resumes from it), and a checkpoint of another model
is refused with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, run_cli, run_gloo, torchrun

DATA = str(REPO / "examples/tiny_pretok.jsonl")
TINY = ["--config", "examples/tiny_pretok.yaml", "--precision", "fp32"]


def _nonfinite_worker(rank: int, world: int, distopt: bool) -> None:
    from layouts import config_dict

    from megatron_simpo import parallel
    from megatron_simpo.config import RunConfig
    from megatron_simpo.errors import TrainingError
    from megatron_simpo.train import Trainer

    parallel.init_distributed()  # the CPU compatibility layer (the group already exists)
    raw = config_dict("tp1", DATA, None)
    raw["parallel"] = {"use_distributed_optimizer": distopt}
    if distopt:  # the check is the gradient norm's reduction, computed without clipping too
        raw["optim"]["clip_grad"] = 0.0
    raw["train"]["max_skipped_iters"] = 3
    raw["train"]["train_iters"] = 20
    trainer = Trainer(RunConfig.from_dict(raw))
    trainer.setup()
    params = [p for chunk in trainer.model for p in chunk.parameters()]

    def poison() -> None:  # what an overflow or a bad batch does to one gradient element
        params[3].main_grad.view(-1)[0] = float("nan")

    def weights() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    good = trainer.step()
    assert good["update_ok"] == 1.0 and good["skipped_iters"] == 0.0
    before, lr_before = weights(), trainer.optimizer.param_groups[0]["lr"]
    for n in (1, 2):
        bad = trainer.step(poison)
        assert bad["update_ok"] == 0.0 and bad["skipped_iters"] == float(n)
        # Skipped means untouched: weights (and so Adam's moments, which step with them), and
        # the LR schedule (not advanced); data moved on (the bad batch is not retried).
        assert all(torch.equal(a, b) for a, b in zip(before, weights()))
        assert trainer.optimizer.param_groups[0]["lr"] == lr_before
    assert trainer.consumed_pairs == 3 * raw["train"]["global_batch_size"]
    ok = trainer.step()  # a good step resets the consecutive count, not the total
    assert ok["update_ok"] == 1.0 and ok["skipped_iters"] == 2.0
    assert not all(torch.equal(a, b) for a, b in zip(before, weights()))
    trainer.step(poison)
    trainer.step(poison)
    with pytest.raises(TrainingError, match=r"3 consecutive iterations \(up to 7\).*--max-skip"):
        trainer.step(poison)
    parallel.destroy_model_parallel()


def _nonfinite_workers(rank: int, world: int) -> None:
    for distopt in (False, True):  # one spawned process pays the import once for both
        _nonfinite_worker(rank, world, distopt)


def test_nonfinite_updates_are_skipped_counted_and_abort():
    """With Adam (clipped) and with the distributed optimizer (no clipping)."""
    sys.path.insert(0, str(REPO / "tests/distributed"))
    run_gloo(1, _nonfinite_workers)


def _agents(port: int, args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Two torchrun agents joined by static rendezvous: two 'nodes' of one rank each."""
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
               str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
               str(port), *args]  # fmt: skip
        log = open(logs / f"node{node}.log", "w")
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        )
    return procs


def test_killed_rank_fails_the_other_node_fast(tmp_path):
    runner = "tests/distributed/fault_runner.py"
    args = [runner, "kill-in-step", "1", "3", "--", "train", *TINY, "--train-iters", "8"]
    args += ["--save", str(tmp_path / "ckpt"), "--save-interval", "2"]
    procs = _agents(free_port(), args, tmp_path)
    codes = [p.wait(timeout=600) for p in procs]
    killed_at = (tmp_path / "node1.log").stat().st_mtime
    survivor = (tmp_path / "node0.log").read_text()
    assert codes[0] != 0 and codes[1] != 0, survivor[-3000:]
    assert "(SIGKILL)" in (tmp_path / "node1.log").read_text()
    # The survivor names the failure instead of hanging or dumping a bare traceback.
    assert "a collective failed in iteration 3" in survivor, survivor[-3000:]
    assert "Another rank probably died" in survivor
    assert "checkpoint of iteration 2" in survivor and "rerun the same command" in survivor
    # Bounded: gloo sees the closed connection at once (a stalled peer would take
    # --distributed-timeout-minutes); allow generous slack for 2 loaded cores.
    assert (tmp_path / "node0.log").stat().st_mtime - killed_at < 120


def test_rank_killed_during_save_keeps_previous_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    train = ["train", *TINY, "--train-iters", "6", "--save", str(save), "--save-interval", "2"]
    # Rank 1 dies during the second save (iteration 4), after writing its share of the files.
    r = torchrun(2, ["tests/distributed/fault_runner.py", "kill-in-save", "1", "2", "--", *train])
    assert r.returncode != 0
    assert "a collective failed while saving the checkpoint of iteration 4" in r.stderr, r.stderr[
        -3000:
    ]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (save / "iter_0000004").exists()  # the half-written one was never published
    # The same command (a requeued job) resumes from the intact checkpoint and finishes.
    r = torchrun(2, ["-m", "megatron_simpo", *train])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and "(iteration 2)" in r.stdout and "iter 3/6" in r.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert not list(save.glob("*.tmp"))

    # Mismatched resume: a checkpoint of another model is refused before any work starts.
    other = run_cli(*train, "--vocab-size", "64")
    assert other.returncode == 2
    assert "--save" in other.stderr and "vocab_size: checkpoint 32 vs given 64" in other.stderr
    assert "use a new --save directory" in other.stderr and "Traceback" not in other.stderr
    other = run_cli("train", *TINY, "--load", str(save), "--hidden-size", "32")
    assert other.returncode == 2 and "hidden_size: checkpoint 64 vs given 32" in other.stderr


def test_rank_killed_during_async_save_keeps_previous_checkpoint(tmp_path):
    """``--async-save``: a rank dies between starting the background write of iteration 4 and
    its publication; iteration 2 stays the published checkpoint and the same command resumes."""
    save = tmp_path / "ckpt"
    train = ["train", *TINY, "--train-iters", "6", "--save", str(save), "--save-interval", "2"]
    train += ["--async-save"]
    fault = ["tests/distributed/fault_runner.py", "kill-in-async-save", "1", "2", "--"]
    r = torchrun(2, [*fault, *train])
    assert r.returncode != 0
    assert "a collective failed" in r.stderr and "checkpoint of iteration 2" in r.stderr, r.stderr[
        -3000:
    ]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (save / "iter_0000004").exists()  # started, never published
    r = torchrun(2, ["-m", "megatron_simpo", *train])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and "(iteration 2)" in r.stdout and "iter 3/6" in r.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert not list(save.glob("*.tmp"))
