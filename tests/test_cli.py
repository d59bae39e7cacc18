"""End to end through the real entry points: torchrun + ``python -m megatron_simpo train``."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import REPO, run_cli, torchrun

REQUIRED_KEYS = {
    "iteration",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "length/chosen",
    "length/rejected",
    "lr",
    "grad_norm",
    "pairs",
    "tokens",
    "iteration_time",
}


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    # 32 pairs (2 global batches): 12 steps are 6 epochs, enough for the loss to fall clearly.
    lines = (REPO / "examples/tiny_pretok.jsonl").read_text().splitlines()[:32]
    (out / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    args = [
        "-m",
        "megatron_simpo",
        "train",
        "--config",
        "examples/tiny_pretok.yaml",
        "--data-path",
        str(out / "pairs.jsonl"),
        "--lr",
        "3e-3",
        "--tensor-model-parallel-size",
        "2",
        "--train-iters",
        "12",
        "--tensorboard-dir",
        str(out / "tb"),
        "--save",
        str(out / "ckpt"),
        "--save-interval",
        "6",
        "--exit-interval",
        "6",
    ]
    first = torchrun(2, args)
    assert first.returncode == 0, first.stderr[-4000:]
    snapshot = out / "ckpt_at_6"
    shutil.copytree(out / "ckpt", snapshot)
    # Same command again: --load the checkpoint and continue to 12.
    second = torchrun(2, [*args[:-2], "--load", str(out / "ckpt")])
    assert second.returncode == 0, second.stderr[-4000:]
    return out, first, second


def test_metrics_jsonl_and_tensorboard(tp2_run):
    out, first, _ = tp2_run
    rows = [json.loads(x) for x in (out / "tb/metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert REQUIRED_KEYS <= set(r)
        assert r["pairs"] == 16  # global batch
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
        assert r["rewards/margins"] == pytest.approx(
            r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5
        )
        assert r["rewards/chosen"] == pytest.approx(2.0 * r["logps/chosen"], rel=1e-5)
        # Each pair contributes two sequences of prompt (5) + response (2-3 tokens); prefix
        # sharing (on by default here) computes each prompt once, less its last token.
        assert 16 * 2 * (5 + 2) <= r["tokens_effective"] <= 16 * 2 * (5 + 3)
        assert r["tokens"] < r["tokens_effective"]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "iter 1/12 | loss" in first.stdout
    # The loop learns: 6 epochs over 32 pairs take the loss well below its start (measured
    # ~1.3 -> ~0.3) and the training accuracy up, across the save/resume boundary.
    early = sum(r["loss"] for r in rows[:2]) / 2
    late = sum(r["loss"] for r in rows[-2:]) / 2
    assert late < 0.7 * early
    assert rows[-1]["rewards/accuracies"] >= 0.8


def test_save_exit_and_resume(tp2_run):
    out, first, second = tp2_run
    assert "iter 6/12" in first.stdout and "iter 7/12" not in first.stdout
    assert (out / "ckpt_at_6/latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert "iter 7/12" in second.stdout and "iter 1/12" not in second.stdout
    assert (out / "ckpt/latest_checkpointed_iteration.txt").read_text().strip() == "12"
    state = json.loads((out / "ckpt/iter_0000012/run_state.json").read_text())
    assert state["iteration"] == 12 and state["consumed_pairs"] == 12 * 16
    assert state["config"]["parallel"]["tensor_model_parallel_size"] == 2
    assert not list((out / "ckpt").glob("*.tmp"))


def test_config_error_is_one_line_without_traceback():
    res = run_cli(
        "train",
        "--config",
        "examples/tiny_pretok.yaml",
        "--gamma-beta-ratio",
        "0.5",
        "--simpo-gamma",
        "1.0",
    )
    assert res.returncode == 2
    assert "megatron-simpo: error: --gamma-beta-ratio and --simpo-gamma" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_data_row_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (REPO / "examples/tiny_pretok.jsonl").read_text().splitlines()[:3]
    bad.write_text(
        "\n".join([*good, '{"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [3]}']) + "\n"
    )
    res = run_cli(
        "train",
        "--config",
        "examples/tiny_pretok.yaml",
        "--data-path",
        str(bad),
        "--train-iters",
        "1",
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"{bad}:4: field 'chosen_ids' is empty" in res.stderr
    assert "Traceback" not in res.stderr


def test_help_lists_megatron_flags():
    res = run_cli("train", "--help")
    assert res.returncode == 0
    for flag in (
        "--tensor-model-parallel-size",
        "--use-distributed-optimizer",
        "--gamma-beta-ratio",
        "--simpo-gamma",
        "--loss-type",
    ):
        assert flag in res.stdout
    script = shutil.which("megatron-simpo", path=str(REPO / ".venv/bin"))
    if script:  # installed console script behaves the same
        assert subprocess.run([script, "--help"], capture_output=True).returncode == 0
