"""slurm/simpo_tiny_cpu.sbatch under a real Slurm: two slurmd on this host (tools/slurm_local.sh).

One job covers the whole life of a preempted run: it starts on 2 nodes (one rank per node, TP2
over gloo), is sent SIGUSR1 with ``scancel --signal=USR1`` after its first checkpoint, checkpoints
and requeues itself (``--slurm-requeue``), starts again, resumes from the checkpoint and finishes.
Skipped (with the reason) where Slurm is not installed or we are not root, unless
``MEGATRON_SIMPO_REQUIRE_SLURM`` or ``CI`` is set: CI (``.ci/run``) installs Slurm and must run it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port

SCRIPT = REPO / "slurm" / "simpo_tiny_cpu.sbatch"
HELPER = REPO / "tools" / "slurm_local.sh"
TRAIN_ITERS = 16
SAVE_INTERVAL = 4
#: Wall-clock limit for the whole job (two start-ups of torch + Megatron-Core on 2 loaded cores).
JOB_TIMEOUT = 900


#: A torchrun worker that waits for the stop signals named in argv[2] (no torch: starts fast).
WORKER = """
import os, signal, sys, time
want = set(sys.argv[2].split(","))
got = []
for name in want:
    signal.signal(getattr(signal, name), lambda s, f: got.append(signal.Signals(s).name))
open(sys.argv[1], "w").write(str(os.getpid()))
deadline = time.time() + 120
while set(got) != want and time.time() < deadline:
    time.sleep(0.05)
print("worker got", sorted(got), flush=True)
sys.exit(0 if set(got) == want else 3)
"""


def _start_agent(tmp_path: Path, launcher: str, signals: list[signal.Signals]):
    """``python -m LAUNCHER --nproc-per-node 1 worker.py``; returns (agent, worker pid)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    ready = tmp_path / "ready"
    names = ",".join(s.name for s in signals)
    cmd = [sys.executable, "-m", launcher, "--nproc-per-node", "1"]
    cmd += ["--master-port", str(free_port()), str(worker), str(ready), names]
    agent = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 180
    while not ready.exists() or not ready.read_text():
        if agent.poll() is not None or time.time() > deadline:
            agent.kill()
            pytest.fail(f"the worker did not start: {agent.communicate()[0]}")
        time.sleep(0.1)
    return agent, int(ready.read_text())


def test_launcher_forwards_stop_signals(tmp_path):
    """SIGUSR1 then SIGTERM sent to the agent alone: megatron_simpo.launch passes each to the
    worker, keeps supervising it and exits with its status (0)."""
    agent, pid = _start_agent(tmp_path, "megatron_simpo.launch", [signal.SIGUSR1, signal.SIGTERM])
    try:
        agent.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        agent.send_signal(signal.SIGTERM)
        out = agent.communicate(timeout=120)[0]
    finally:
        agent.kill()
    assert agent.returncode == 0, out
    assert "worker got ['SIGTERM', 'SIGUSR1']" in out, out
    for name in ("SIGUSR1", "SIGTERM"):
        assert f"launch: {name} forwarded to worker pids [{pid}]" in out, out


def test_plain_torchrun_dies_of_sigusr1(tmp_path):
    """The pitfall the launcher exists for (and the control of the test above): plain
    torchrun's agent is killed by SIGUSR1 and leaves its worker orphaned, unsignalled."""
    agent, pid = _start_agent(tmp_path, "torch.distributed.run", [signal.SIGUSR1])
    try:
        agent.send_signal(signal.SIGUSR1)
        agent.wait(timeout=60)
        assert agent.returncode == -signal.SIGUSR1  # the default action: terminate
        os.kill(pid, 0)  # the worker (own session) is still alive, never told to stop
    finally:
        agent.kill()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ports_free(first: int, count: int) -> bool:
    for port in range(first, first + count):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def _cluster_ports() -> int:
    """A port p with p, p+1, p+2 free (slurmctld, slurmd node1, slurmd node2)."""
    for _ in range(50):
        p = free_port()
        if p < 65000 and _ports_free(p, 3):
            return p
    raise RuntimeError("no three consecutive free ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """Starts a local two-node Slurm; yields the environment for sbatch/squeue/scontrol."""
    required = bool(os.environ.get("MEGATRON_SIMPO_REQUIRE_SLURM") or os.environ.get("CI"))
    missing = [c for c in ("sbatch", "slurmctld", "slurmd", "munged") if not shutil.which(c)]
    if not missing and os.geteuid() != 0:
        missing = ["root (slurmd runs jobs as the submitting user)"]
    if missing:
        reason = f"needs {', '.join(missing)}: run tools/slurm_local.sh install as root"
        if required:
            pytest.fail(reason)
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "SLURM_LOCAL_DIR": str(state),
        "SLURM_LOCAL_PORT": str(_cluster_ports()),
    }
    env["SLURM_CONF"] = str(state / "slurm.conf")
    started = subprocess.run(
        ["bash", str(HELPER), "start"], env=env, capture_output=True, text=True
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield env
    finally:
        subprocess.run(["bash", str(HELPER), "stop"], env=env, capture_output=True, text=True)


def _job(env: dict[str, str], job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, NodeList, ...)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _tracker(ckpt: Path) -> int | None:
    f = ckpt / "latest_checkpointed_iteration.txt"
    return int(f.read_text()) if f.is_file() else None


def _logs(run_dir: Path) -> str:
    parts = [f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.rglob("*.log"))]
    parts += [f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(run_dir.glob("*.out"))]
    return "\n".join(parts)


def _attempt_log(run_dir: Path, job: str, attempt: int) -> str:
    """Both nodes' logs of one start of the job (``$RUN_DIR/logs/JOB.ATTEMPT.NODE_INDEX.log``)."""
    return "".join(p.read_text() for p in sorted((run_dir / "logs").glob(f"{job}.{attempt}.*.log")))


@pytest.fixture(scope="module")
def preempted_run(slurm, tmp_path_factory) -> dict:
    """Submits the tiny CPU script, preempts it with SIGUSR1 after its first checkpoint, waits
    until the requeued job has finished; returns the job's record and run directory."""
    run_dir = tmp_path_factory.mktemp("run")
    env = {
        **slurm,
        "RUN_DIR": str(run_dir),
        "TRAIN_ITERS": str(TRAIN_ITERS),
        "SAVE_INTERVAL": str(SAVE_INTERVAL),
        "MASTER_PORT": str(free_port()),
        "EXTRA_ARGS": "--log-interval 1",
    }
    sub = subprocess.run(
        ["sbatch", "--parsable", "--output", f"{run_dir}/slurm-%j.out", str(SCRIPT)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    deadline = time.time() + JOB_TIMEOUT
    signalled_at = None
    while time.time() < deadline:
        info = _job(slurm, job)
        state = info.get("JobState")
        if signalled_at is None and _tracker(run_dir / "ckpt") is not None:
            # The first periodic checkpoint is published, so the trainer is in its loop.
            signalled_at = _tracker(run_dir / "ckpt")
            subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
        elif state == "PENDING" and info.get("Reason") == "BeginTime":
            # Slurm holds a requeued job for 120 s (BeginTime); start it now.
            subprocess.run(
                ["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True
            )
        elif state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break  # rank 0 requeues before it exits: a requeued job is never seen COMPLETED
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job], env=slurm)
        pytest.fail(f"job {job} not finished after {JOB_TIMEOUT} s: {info}\n{_logs(run_dir)}")
    return {"job": job, "info": info, "run_dir": run_dir, "signalled_at": signalled_at}


def test_tiny_cpu_job_runs_on_two_nodes(preempted_run):
    """Both attempts ran one rank on each of the 2 nodes, and the job ended with a checkpoint at
    --train-iters and metrics for every iteration under RUN_DIR."""
    info, run_dir = preempted_run["info"], preempted_run["run_dir"]
    logs = _logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs}"
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2", info
    job = preempted_run["job"]
    for attempt in (0, 1):
        # srun --output .../JOB.ATTEMPT.NODE_INDEX.log: one torchrun agent per node; with
        # --nnodes 2 the c10d rendezvous admits the workers only once both agents joined.
        names = {p.name for p in (run_dir / "logs").glob(f"{job}.{attempt}.*.log")}
        assert names == {f"{job}.{attempt}.0.log", f"{job}.{attempt}.1.log"}, names
    assert _tracker(run_dir / "ckpt") == TRAIN_ITERS, logs
    assert (run_dir / "ckpt" / f"iter_{TRAIN_ITERS:07d}" / "metadata.json").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    rows = [json.loads(x) for x in (run_dir / "tb" / "metrics.jsonl").read_text().splitlines()]
    its = [r["iteration"] for r in rows]
    # --log-interval 1: every iteration once, none lost and none repeated across the requeue.
    assert its == list(range(1, TRAIN_ITERS + 1)), its
    assert all(isinstance(r["loss"], float) for r in rows)


def test_data_is_prepared_once_in_its_own_step(preempted_run):
    """The prepare step wrote RUN_DIR/data/{train,heldout} in the first start (before the
    training step), and the requeued start reused them instead of preparing again."""
    run_dir, job = preempted_run["run_dir"], preempted_run["job"]
    out = (run_dir / f"slurm-{job}.out").read_text()
    for name, source in (("train", "train.jsonl"), ("heldout", "heldout.jsonl")):
        info = json.loads((run_dir / "data" / name / "prepared.json").read_text())
        assert info["data_path"].endswith(f"examples/tiny/{source}"), info
        assert info["options"]["max_length"] == 32 and info["summary"]["kept"] > 0, info
        assert out.count(f"preparing {info['data_path']} into {run_dir}/data/{name}") == 1, out
        assert out.count(f"data already prepared: {run_dir}/data/{name}") == 1, out
    first = out.index("preparing ")
    assert first < out.index("logs: "), out  # before the training step starts


def test_preempted_job_checkpoints_requeues_and_resumes(preempted_run):
    """SIGUSR1 (scancel --signal=USR1): the agents survive (megatron_simpo.launch), every rank
    stops at an iteration boundary after checkpointing, rank 0 requeues the job, and the second
    start of the same script resumes from that checkpoint instead of starting over."""
    info, run_dir, job = preempted_run["info"], preempted_run["run_dir"], preempted_run["job"]
    logs = _logs(run_dir)
    assert preempted_run["signalled_at"] is not None, logs
    assert info["Restarts"] == "1", f"{info}\n{logs}"
    # The c10d rendezvous, not the node order, decides which node holds rank 0: read both.
    first = _attempt_log(run_dir, job, 0)
    stop = re.search(r"stopping at iteration (\d+): stop signal received", first)
    assert stop, logs
    stopped_at = int(stop.group(1))
    assert SAVE_INTERVAL <= stopped_at < TRAIN_ITERS, stopped_at
    assert f"requeued Slurm job {job}" in first, logs
    # The agent forwarded the signal instead of dying from it (exit 138 = 128 + SIGUSR1).
    assert "launch: SIGUSR1 forwarded" in first, logs
    assert "User defined signal" not in logs, logs
    second = _attempt_log(run_dir, job, 1)
    assert f"resuming {run_dir}/ckpt (iteration {stopped_at})" in second, logs
    assert "starting from" not in second, logs
    assert re.search(rf"iter {TRAIN_ITERS}/{TRAIN_ITERS} ", second), logs


IMAGE = "nvcr.io#nvidia/pytorch:25.09-py3"


def _fake_cluster(tmp_path: Path) -> tuple[Path, Path]:
    """Stand-ins for ``srun`` (each call's arguments, one per line, and whether the venv was
    active, into ``calls/NNN``; the training step asks for a requeue when ``FAKE_ASK_REQUEUE``
    is set, as a trainer without scontrol does) and ``scontrol`` (four hostnames; ``requeue``
    recorded), and a venv whose ``activate`` marks itself active. Returns (bin, calls)."""
    bin_dir, calls, venv = tmp_path / "bin", tmp_path / "calls", tmp_path / "venv" / "bin"
    for d in (bin_dir, calls, venv):
        d.mkdir(parents=True)
    (venv / "activate").write_text("export FAKE_VENV_ACTIVE=1\n")
    srun = f"""n=$(ls {calls} | wc -l)
{{ echo "venv=${{FAKE_VENV_ACTIVE:-0}}"; printf "%s\\n" "$@"; }} > {calls}/$(printf %03d "$n")
if [[ -n ${{FAKE_ASK_REQUEUE:-}} && " $* " == *" megatron_simpo.launch "* ]]; then
    echo -n "$SLURM_JOB_ID" > "$MEGATRON_SIMPO_REQUEUE_FILE"
fi"""
    _stand_in(bin_dir, "srun", srun)
    scontrol = f"""[[ "$1 $2" == "show hostnames" ]] && printf "gpu%s\\n" 1 2 3 4
[[ "$1" == requeue ]] && echo "$@" > {tmp_path}/requeued
exit 0"""
    _stand_in(bin_dir, "scontrol", scontrol)
    return bin_dir, calls


def _srun_calls(calls: Path) -> list[tuple[bool, list[str]]]:
    """(venv active, srun arguments) of each call, in order."""
    out = []
    for f in sorted(calls.iterdir()):
        first, *argv = f.read_text().splitlines()
        out.append((first == "venv=1", argv))
    return out


def _job_inputs(
    tmp_path: Path, model: object, nodes: int, nodelist: str
) -> tuple[Path, Path, dict[str, str]]:
    """What a GPU script is given: an imported checkpoint as far as the config is concerned (the
    ``model``'s ModelConfig in its run state), an HF directory (``tmp_path/hf``), empty pairs,
    and the job's environment. Returns (checkpoint, hf dir, env)."""
    from dataclasses import asdict

    init = tmp_path / "init"
    (init / "iter_0000000").mkdir(parents=True)
    (init / "latest_checkpointed_iteration.txt").write_text("0")
    run_state = {"config": {"model": asdict(model)}}
    (init / "iter_0000000" / "run_state.json").write_text(json.dumps(run_state))
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (tmp_path / "pairs.jsonl").write_text("")
    env = {
        "HF_MODEL": str(hf),
        "INIT_CKPT": str(init),
        "DATA": str(tmp_path / "pairs.jsonl"),
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": nodelist,
    }
    return init, hf, env


def _run_script(tmp_path: Path, script: str, env: dict[str, str], container: bool):
    bin_dir, calls = _fake_cluster(tmp_path)
    env_overrides = env
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "REPO": str(REPO),
        "VENV": str(tmp_path / ("no-venv" if container else "venv")),
        "RUN_DIR": str(tmp_path / "run"),
        "SLURM_JOB_ID": "42",
        "SLURM_CPUS_PER_TASK": "7",
        **env,
    }
    env.pop("FAKE_VENV_ACTIVE", None)
    # An in-process Megatron test earlier in the session may have left these in os.environ
    # (parallel.py sets MASTER_PORT for single-process runs): the scripts' defaults are checked.
    for leaked in ("MASTER_ADDR", "MASTER_PORT"):
        if leaked not in env_overrides:
            env.pop(leaked, None)
    if container:
        env["CONTAINER_IMAGE"] = IMAGE
    else:
        env.pop("CONTAINER_IMAGE", None)
    done = subprocess.run(
        ["bash", str(REPO / "slurm" / script)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return _srun_calls(calls), done.stdout


def _check_step_environment(steps, container: bool, mounted: list[Path]) -> None:
    """Every step: --cpus-per-task given explicitly (Slurm 22.05-23.02 do not pass it on), and
    either the venv active or the container flags (and no venv)."""
    assert steps
    for venv_active, argv in steps:
        opts = argv[: argv.index("python")]
        assert "--cpus-per-task=7" in opts, argv
        flags = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in opts if "=" in o}
        if container:
            assert not venv_active, argv
            assert flags["--container-image"] == IMAGE, argv
            assert flags["--container-workdir"] == str(REPO), argv
            assert flags["--container-name"] == "megatron-simpo-42", argv
            mounts = flags["--container-mounts"].split(",")
            for path in mounted:
                real = str(path.resolve())
                assert any(real == m or real.startswith(m + "/") for m in mounts), (path, mounts)
        else:
            assert venv_active and not any(o.startswith("--container") for o in opts), argv


@pytest.mark.parametrize("container", [False, True], ids=["venv", "container"])
@pytest.mark.parametrize(
    "script, preset, nodes, layout",
    [
        ("simpo_llama3_8b.sbatch", "llama3-8b", 1, (1, 2, 4)),
        ("simpo_llama3_70b.sbatch", "llama3-70b", 4, (4, 8, 1)),
    ],
)
def test_gpu_scripts_give_a_valid_run(tmp_path, script, preset, nodes, layout, container):
    """The 8B and 70B scripts, run by bash with stand-ins for srun/scontrol (no GPUs here), in a
    venv or in a container (CONTAINER_IMAGE): a prepare step, then a training command that
    parses and validates at their world size with the real model config, in the documented
    TP x PP x DP layout, on the prepared data with the same truncation; rendezvous on the first
    node; every step in the chosen environment."""

    from megatron_simpo.cli import build_parser, config_from_args
    from megatron_simpo.plan import load_model

    text = (REPO / "slurm" / script).read_text()
    assert "#SBATCH --signal=USR1@300" in text and "#SBATCH --requeue" in text
    assert f"#SBATCH --nodes={nodes}" in text
    init, hf, env = _job_inputs(tmp_path, load_model(preset), nodes, f"gpu[1-{nodes}]")
    steps, _ = _run_script(tmp_path, script, env, container)
    _check_step_environment(steps, container, [REPO, tmp_path / "run", hf, init, tmp_path])
    # The import is skipped (INIT_CKPT holds a checkpoint): prepare, then train.
    (_, prep_argv), (_, argv) = steps
    prep_argv = prep_argv[prep_argv.index("python") + 3 :]
    assert prep_argv[0] == "prepare", prep_argv
    prep = build_parser().parse_args(prep_argv)
    assert prep.data_path == env["DATA"] and prep.tokenizer == str(hf)
    assert prep.output == f"{tmp_path}/run/data/train"
    cut = argv.index("megatron_simpo")
    launch, train = argv[:cut], argv[cut + 1 :]
    start = launch.index("python")
    assert launch[start : start + 3] == ["python", "-m", "megatron_simpo.launch"], launch
    assert "--kill-on-bad-exit=1" in launch[:start]
    assert launch[launch.index("--rdzv-endpoint") + 1] == "gpu1:29500"
    assert launch[launch.index("--nnodes") + 1] == str(nodes)
    args = build_parser().parse_args(train)
    cfg = config_from_args(args)
    world = nodes * int(launch[launch.index("--nproc-per-node") + 1])
    cfg.validate(world_size=world, training=True)
    p = cfg.parallel
    tp, pp, dp = layout
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (tp, pp)
    assert world // (tp * pp) == dp
    assert p.use_distributed_optimizer and cfg.train.slurm_requeue
    assert cfg.train.save == f"{tmp_path}/run/ckpt"
    assert cfg.logging.tensorboard_dir == f"{tmp_path}/run/tb"
    assert cfg.model.hidden_size == load_model(preset).hidden_size  # taken from --load
    # Trained on what the prepare step wrote, truncated alike.
    assert cfg.data.data_path == prep.output
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (2048, 1800)
    assert (prep.max_length, prep.max_prompt_length) == (2048, 1800)


def test_tiny_script_in_a_container_requeues_from_the_batch_script(tmp_path):
    """The tiny script with CONTAINER_IMAGE: all four steps (import, prepare train and held-out
    data, train) run in the container; the training step, which has no scontrol there, leaves
    the job id in MEGATRON_SIMPO_REQUEUE_FILE and the batch script (outside the container)
    requeues the job."""
    env = {
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[1-2]",
        "FAKE_ASK_REQUEUE": "1",
    }
    steps, out = _run_script(tmp_path, "simpo_tiny_cpu.sbatch", env, container=True)
    tiny = REPO / "examples" / "tiny"
    _check_step_environment(steps, True, [REPO, tmp_path / "run", tiny])
    commands = [argv[argv.index("python") + 1 : argv.index("python") + 4] for _, argv in steps]
    assert commands == [
        ["-m", "megatron_simpo", "convert"],
        ["-m", "megatron_simpo", "prepare"],
        ["-m", "megatron_simpo", "prepare"],
        ["-m", "megatron_simpo.launch", "--nnodes"],
    ], commands
    for _, argv in steps[:3]:  # single-node steps before training
        assert argv[:2] == ["--cpus-per-task=7", f"--container-image={IMAGE}"], argv
        assert "--nodes=1" in argv and "--ntasks=1" in argv, argv
    train = steps[3][1]
    for flag, want in (("--data-path", "data/train"), ("--eval-data-path", "data/heldout")):
        assert train[train.index(flag) + 1] == f"{tmp_path}/run/{want}", train
    assert (tmp_path / "requeued").read_text() == "requeue 42\n", out
    assert not (tmp_path / "run" / "requeue.42").exists()
    assert "the training step asked for a requeue" in out, out


# ---------------------------------------------------------------------------------------------
# --slurm-requeue where `scontrol` is missing (a job step inside a pyxis/enroot container).


def _requeue(monkeypatch, tmp_path, path: str, marker: bool) -> str:
    """Runs ``Trainer.requeue`` as rank 0 of job 42 with ``PATH=path``; returns what it printed
    (the marker file's path is ``tmp_path/requeue``)."""
    import contextlib
    import io

    from megatron_simpo import run_control

    monkeypatch.setattr(run_control.dist, "get_rank", lambda: 0)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("PATH", path)
    if marker:
        monkeypatch.setenv("MEGATRON_SIMPO_REQUEUE_FILE", str(tmp_path / "requeue"))
    else:
        monkeypatch.delenv("MEGATRON_SIMPO_REQUEUE_FILE", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_control.requeue()
    return out.getvalue()


def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / name).chmod(0o755)


def test_requeue_without_scontrol_falls_back(monkeypatch, tmp_path):
    """No ``scontrol`` on PATH: one message naming the cause, no exception; with
    ``MEGATRON_SIMPO_REQUEUE_FILE`` the job id is left there for the batch script."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _requeue(monkeypatch, tmp_path, str(empty), marker=False)
    assert "--slurm-requeue: scontrol not found in this environment (inside a container?)" in out
    assert "Slurm's own --requeue" in out and not (tmp_path / "requeue").exists()
    out = _requeue(monkeypatch, tmp_path, str(empty), marker=True)
    assert (tmp_path / "requeue").read_text() == "42"
    assert "the batch script requeues job 42" in out, out


def test_requeue_reports_a_failing_scontrol(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "scontrol", 'echo "scontrol: error: Access/permission denied" >&2; exit 1')
    out = _requeue(monkeypatch, tmp_path, f"{bin_dir}:/usr/bin:/bin", marker=True)
    assert "scontrol requeue 42 failed: scontrol: error: Access/permission denied" in out, out
    assert (tmp_path / "requeue").read_text() == "42"


def test_requeue_with_scontrol(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "scontrol", f'echo "$@" > {tmp_path}/argv')
    out = _requeue(monkeypatch, tmp_path, f"{bin_dir}:/usr/bin:/bin", marker=True)
    assert (tmp_path / "argv").read_text() == "requeue 42\n"
    assert "requeued Slurm job 42" in out and not (tmp_path / "requeue").exists()


def test_stop_checkpoint_then_requeue_without_scontrol_exits_0(tmp_path):
    """The real entry point inside a 'container' (no scontrol on PATH): the time limit stops the
    run after iteration 1, the stop checkpoint is written, and the process exits 0 with the
    fallback message instead of a FileNotFoundError traceback."""
    from conftest import torchrun

    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["-m", "megatron_simpo", "train", "--config", "examples/tiny_pretok.yaml"]
    args += ["--train-iters", "5", "--save", str(tmp_path / "ckpt"), "--slurm-requeue"]
    args += ["--exit-duration-in-mins", "0"]
    env = {"PATH": str(empty), "SLURM_JOB_ID": "42"}
    env["MEGATRON_SIMPO_REQUEUE_FILE"] = str(tmp_path / "requeue")
    r = torchrun(1, args, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert re.search(r"stopping at iteration 1: --exit-duration-in-mins 0(\.0)? reached", r.stdout)
    assert _tracker(tmp_path / "ckpt") == 1
    assert "scontrol not found in this environment" in r.stdout, r.stdout
    assert (tmp_path / "requeue").read_text() == "42"


@pytest.mark.parametrize("container", [False, True], ids=["venv", "container"])
def test_dpo_script_scores_the_reference_then_trains(tmp_path, container):
    """slurm/dpo_llama3_8b.sbatch, run by bash with stand-ins for srun/scontrol: prepare, then a
    score-reference step of the reference checkpoint over the prepared directory, then
    ``train --loss dpo`` on that directory; both commands parse and validate at the job's world
    size, at the same precision, each with its own rendezvous port."""

    from megatron_simpo.cli import build_parser, config_from_args
    from megatron_simpo.plan import load_model

    init, hf, env = _job_inputs(tmp_path, load_model("llama3-8b"), 1, "gpu1")
    steps, _ = _run_script(tmp_path, "dpo_llama3_8b.sbatch", env, container)
    _check_step_environment(steps, container, [REPO, tmp_path / "run", hf, init, tmp_path])
    (_, prep_argv), (_, score_argv), (_, train_argv) = steps
    prep = build_parser().parse_args(prep_argv[prep_argv.index("python") + 3 :])
    assert prep.command == "prepare" and prep.max_length == 2048
    cfgs, ports = {}, set()
    for argv in (score_argv, train_argv):
        cut = argv.index("megatron_simpo")
        launch, cmd = argv[:cut], argv[cut + 1 :]
        assert "megatron_simpo.launch" in launch and "--kill-on-bad-exit=1" in launch
        ports.add(launch[launch.index("--rdzv-endpoint") + 1])
        args = build_parser().parse_args(cmd)
        cfg = config_from_args(args)
        cfg.validate(world_size=8, training=args.command == "train")
        cfgs[args.command] = cfg
    assert set(cfgs) == {"score-reference", "train"} and len(ports) == 2
    score, train = cfgs["score-reference"], cfgs["train"]
    assert score.data.data_path == train.data.data_path == prep.output  # scored in place
    assert score.train.load == train.train.load == str(init)  # reference = starting model
    assert score.train.precision == train.train.precision == "bf16"
    assert (
        score.parallel.tensor_model_parallel_size,
        score.parallel.pipeline_model_parallel_size,
    ) == (1, 1)
    assert train.loss.objective == "dpo" and train.loss.resolved_beta == 0.01
    assert (
        train.parallel.tensor_model_parallel_size,
        train.parallel.pipeline_model_parallel_size,
    ) == (1, 2)
    assert score.train.seq_length == train.train.seq_length == 2048


#: Qwen3-30B-A3B's config.json (the fields that matter).
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
}


def test_moe_script_gives_a_valid_ep8_run(tmp_path):
    """slurm/simpo_qwen3_30b_a3b.sbatch, run by bash with stand-ins for srun/scontrol: a training
    command that validates at 8 ranks with Qwen3-30B-A3B's config in the documented EP8 TP1
    layout (dense layers DP8), with the router aux loss at Qwen3-MoE's coefficient."""

    from megatron_simpo.cli import build_parser, config_from_args
    from megatron_simpo.config import ModelConfig

    text = (REPO / "slurm" / "simpo_qwen3_30b_a3b.sbatch").read_text()
    assert "#SBATCH --nodes=1" in text and '"EP8 TP1"' in text
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    model = ModelConfig.from_hf_config(tmp_path / "hf")
    _, _, env = _job_inputs(tmp_path, model, 1, "gpu1")
    steps, _ = _run_script(tmp_path, "simpo_qwen3_30b_a3b.sbatch", env, container=False)
    (_, _), (_, argv) = steps
    launch, train = argv[: argv.index("megatron_simpo")], argv[argv.index("megatron_simpo") + 1 :]
    cfg = config_from_args(build_parser().parse_args(train))
    world = int(launch[launch.index("--nproc-per-node") + 1])
    cfg.validate(world_size=world, training=True)
    p = cfg.parallel
    assert world == 8 and (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (1, 1)
    assert (p.expert_model_parallel_size, p.expert_tensor_parallel_size) == (8, 1)
    assert p.use_distributed_optimizer and cfg.train.moe_aux_loss_coeff == 0.001
    assert cfg.model.num_experts == 128 and cfg.model.model_type == "qwen3_moe"
    assert cfg.model.num_experts // p.expert_model_parallel_size == 16  # experts per GPU
    # Without DATA the script stops with a message instead of training on someone else's pairs.
    env.pop("DATA")
    bin_dir, _ = _fake_cluster(tmp_path / "nodata")
    done = subprocess.run(
        ["bash", str(REPO / "slurm" / "simpo_qwen3_30b_a3b.sbatch")],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REPO": str(REPO), **env},
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "set DATA" in done.stderr
