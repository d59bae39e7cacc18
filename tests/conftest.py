"""Shared test helpers: free ports, multi-process gloo worlds, torchrun launches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Prepared-data cache of everything the tests start (subprocesses inherit it): never ~/.cache.
os.environ.setdefault("MEGATRON_SIMPO_CACHE", str(REPO / ".pytest_cache" / "megatron-simpo"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank, world, port, fn, args):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(world: int, fn, *args) -> None:
    """Runs ``fn(rank, world, *args)`` in ``world`` spawned processes joined by gloo; a failed
    assertion in any rank fails the caller."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def torchrun(
    nproc: int, args: list[str], timeout: int = 600, env: dict | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Runs ``torchrun --nproc-per-node nproc ARGS`` with this interpreter."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        *args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``python -m megatron_simpo ARGS`` (one process, no torchrun) from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_simpo", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


#: Llama-3 RoPE scaling with a short original context, so the scaling shows at test lengths.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The --tensorboard-dir of one 3-iteration run of the tiny model with held-out evaluation
    and the generation probe at iterations 2 and 3 (shared by the monitoring tests)."""
    tb = tmp_path_factory.mktemp("tiny_run") / "tb"
    args = ["-m", "megatron_simpo", "train", "--config", "examples/tiny_pretok.yaml"]
    args += ["--train-iters", "3", "--eval-split-ratio", "0.1", "--eval-interval", "2"]
    args += ["--eval-iters", "1", "--gen-interval", "2", "--gen-prompts", "2"]
    args += ["--gen-max-new-tokens", "4", "--tensorboard-dir", str(tb)]
    res = torchrun(1, args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gen @ iter 2" in res.stdout and "eval @ iter 2" in res.stdout, res.stdout[-2000:]
    return tb
