"""Checkpoint/resume behaviour that a requeued job relies on (part of the fault-tolerance issue):
the same command resumes from --save, resumed losses equal an uninterrupted run bit for bit,
SIGTERM checkpoints at the next iteration and exits 0, --keep-last (--exit-duration-in-mins:
test_slurm.py's test_stop_checkpoint_then_requeue_without_scontrol_exits_0).
On varied data (``tests/data/varied_pretok.jsonl``: lengths 1..16, non-unit weights; 24 pairs, so
global batches of 16 straddle epochs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from conftest import REPO, free_port, torchrun

BASE = [
    "-m",
    "megatron_simpo",
    "train",
    "--config",
    "examples/tiny_pretok.yaml",
    "--data-path",
    "tests/data/varied_pretok.jsonl",
    "--train-iters",
    "6",
    "--lr",
    "3e-3",
    "--precision",
    "fp32",
]


def launch(args, **kw):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "1",
        "--master-port",
        str(free_port()),
        *BASE,
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kw,
    )


def run(args):
    p = launch(args)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return out


def losses(tb):
    return {
        json.loads(x)["iteration"]: json.loads(x)["loss"]
        for x in (tb / "metrics.jsonl").read_text().splitlines()
    }


def test_requeued_run_continues_bit_identically(tmp_path):
    """In bf16 (the GPU default): the checkpoint must hold the fp32 main params, not only the
    bf16 weights, for the resumed updates to be bit-identical."""
    bf16 = ["--precision", "bf16"]
    # The uninterrupted run also checks --keep-last: saved every iteration, the last 2 stay.
    a = [*bf16, "--tensorboard-dir", str(tmp_path / "tb_a"), "--save", str(tmp_path / "a")]
    out = run([*a, "--save-interval", "1", "--keep-last", "2"])
    assert "iter 6/6" in out
    kept = sorted(p.name for p in (tmp_path / "a").glob("iter_*"))
    assert kept == ["iter_0000005", "iter_0000006"]
    b = [*bf16, "--tensorboard-dir", str(tmp_path / "tb_b"), "--save", str(tmp_path / "b")]
    first = run([*b, "--exit-interval", "3"])
    assert "iter 3/6" in first and "iter 4/6" not in first
    second = run(b)  # the same command again, as a requeued job would
    assert "resuming" in second and "iter 4/6" in second and "iter 1/6" not in second
    a, bb = losses(tmp_path / "tb_a"), losses(tmp_path / "tb_b")
    assert sorted(bb) == list(range(1, 7))
    # Same layout, deterministic CPU kernels: the resumed run is bit-identical.
    assert [a[i] for i in range(1, 7)] == [bb[i] for i in range(1, 7)]


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    save = tmp_path / "ckpt"
    p = launch(
        ["--train-iters", "400", "--save", str(save), "--log-interval", "1"], start_new_session=True
    )
    seen = []
    deadline = time.time() + 300
    for line in p.stdout:  # wait until training is under way
        seen.append(line)
        if "iter 2/400" in line or time.time() > deadline:
            break
    os.killpg(p.pid, signal.SIGTERM)  # what Slurm does to the job step
    out, err = p.communicate(timeout=120)
    text = "".join(seen) + out
    assert "stopping at iteration" in text and "stop signal" in text, err[-3000:]
    it = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= it < 400
    state = json.loads((save / f"iter_{it:07d}/run_state.json").read_text())
    assert state["iteration"] == it and state["has_optimizer"]


def test_resume_at_another_layout_with_the_distributed_optimizer(tmp_path):
    """Saved at TP2xPP2, resumed at TP2xDP2 (the optimizer state resharded over DP)."""
    common = [*BASE, "--adam-eps", "1e-3", "--use-distributed-optimizer"]
    common += ["--tensor-model-parallel-size", "2"]
    pp2 = [*common, "--pipeline-model-parallel-size", "2"]
    # The uninterrupted run saves at 3 and 6; rewound to 3 (iteration 6's checkpoint removed:
    # what a job stopped after iteration 3's save leaves; the stop itself, bit-identical to an
    # uninterrupted run, is test_requeued_run_continues_bit_identically's), the same --save
    # resumes at another layout. One 4-rank launch fewer than a separate stopped run.
    ckpt = tmp_path / "ckpt"
    save = ["--save", str(ckpt), "--save-interval", "3"]
    r = torchrun(4, [*pp2, *save, "--tensorboard-dir", str(tmp_path / "tb_a")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (ckpt / "iter_0000003/run_state.json").is_file()
    shutil.rmtree(ckpt / "iter_0000006")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    r = torchrun(4, [*common, *save, "--tensorboard-dir", str(tmp_path / "tb_b")])  # TP2 x DP2
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and "(iteration 3)" in r.stdout and "iter 4/6" in r.stdout
    assert "iter 3/6" not in r.stdout
    a, b = losses(tmp_path / "tb_a"), losses(tmp_path / "tb_b")
    assert sorted(b) == [4, 5, 6]
    # Another layout sums in another order: the layout matrix measures <= 6e-7 on these losses
    # (~1.3) from equal weights; adam_eps 1e-3 keeps the update Lipschitz in the gradient so
    # rounding does not flip lr*sign(g). 1e-4 leaves room for 3 steps of that; a resume that
    # lost the optimizer state would restart the warmup (lr 0 at iteration 4: no update at
    # all) and Adam's moments, a whole update's worth of change in these losses.
    for i in (4, 5, 6):
        assert abs(a[i] - b[i]) < 1e-4, (i, a[i], b[i])


def test_async_fully_parallel_save_resumes_like_a_sync_save(tmp_path):
    """``--async-save --fully-parallel-save`` at DP2 on gloo: the checkpoints hold exactly the
    tensors of synchronous ones, and the run resumed from them continues bit-identically."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def everything(ckpt):  # every saved entry, unsharded, without a process group
        dcp_to_torch_save(ckpt, tmp_path / "plain.pt")
        return torch.load(tmp_path / "plain.pt", weights_only=False)

    common = [*BASE, "--save-interval", "2", "--log-interval", "1"]
    s, a = tmp_path / "sync", tmp_path / "async"
    sync = [*common, "--save", str(s), "--no-async-save", "--no-fully-parallel-save"]
    r = torchrun(2, [*sync, "--tensorboard-dir", str(tmp_path / "tb_s")])
    assert r.returncode == 0, r.stderr[-3000:]
    fast = [*common, "--save", str(a), "--async-save", "--fully-parallel-save"]
    fast += ["--tensorboard-dir", str(tmp_path / "tb_a")]
    r = torchrun(2, [*fast, "--exit-interval", "4"])  # saves at 2 (in the background) and 4
    assert r.returncode == 0, r.stderr[-3000:]
    assert "async_save = True (--async-save given)" in r.stdout
    assert (a / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not list(a.glob("*.tmp"))  # every background write was published at exit
    r = torchrun(2, fast)  # the same command, as a requeued job: resumes from 4
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and "(iteration 4)" in r.stdout
    for it in (2, 4, 6):
        want, got = (everything(d / f"iter_{it:07d}") for d in (s, a))
        assert want.keys() == got.keys() and len(want) > 10
        for k, v in want.items():
            assert torch.equal(v, got[k]) if torch.is_tensor(v) else v == got[k], (it, k)
    ls, la = losses(tmp_path / "tb_s"), losses(tmp_path / "tb_a")
    assert sorted(la) == list(range(1, 7)) and [ls[i] for i in la] == [la[i] for i in la]
