"""The integration matrix: every layout of ``distributed/layouts.py`` against its single-process
reference, for losses, SimPO metrics, gradient norms, full gradients and updated weights.

Three ``torchrun`` worlds (1, 2 and 4 ranks) run all layouts of their size in one process group.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, torchrun

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from layouts import LAYOUTS  # noqa: E402

# Tolerances, fp32 throughout. Layouts differ only in the order of floating-point reductions
# (TP splits the matmul/softmax reductions, PP/VPP nothing, DP and micro-batching the sum over
# pairs). One fp32 rounding is 6e-8 relative; sums of a few hundred terms in another order give
# ~1e-6 relative at worst, and three Adam steps (eps=1e-3, see layouts.py) propagate that with a
# factor ~lr/eps = 10 per step. Measured worst cases on this machine are quoted per line.
LOSS_ATOL = 5e-6  # loss ~1.7; measured <= 8.3e-7 (tp2_pp2_tied)
METRIC_ATOL = 1e-5  # rewards ~beta*logps ~ -8; measured <= 1.1e-6
GRAD_NORM_RTOL = 5e-5  # measured <= 6.2e-6
GRADS_RTOL = 5e-6  # max|g_layout - g_ref| / max|g_ref| per tensor; measured <= 6.0e-7
WEIGHTS_RTOL = 5e-5  # after 3 steps; measured <= 5.3e-6

WORLDS = sorted({world for world, _, _ in LAYOUTS.values()})


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("layouts")
    data = str(REPO / "examples/tiny_pretok.jsonl")
    runner = str(REPO / "tests/distributed/layout_runner.py")
    for world in WORLDS:  # references (world 1) first
        names = [n for n, (w, _, _) in LAYOUTS.items() if w == world]
        res = torchrun(world, [runner, "--out", str(out), "--data", data, *names])
        assert res.returncode == 0, f"world {world}: {res.stderr[-4000:]}"
    res = subprocess.run(
        [sys.executable, str(REPO / "tests/distributed/compare_layouts.py"), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    for ref in ("tp1", "tp1_tied"):
        result[ref] = json.loads((out / ref / "metrics.json").read_text())
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    (REPO / ".pytest_cache/layout_matrix.json").write_text(json.dumps(result, indent=1))
    return result


COMPARED = [n for n, (_, ref, _) in LAYOUTS.items() if ref is not None]


@pytest.mark.parametrize("name", COMPARED)
def test_layout_matches_single_process(matrix, name):
    r = matrix[name]
    assert r["steps"] == 3
    assert r["loss"] <= LOSS_ATOL
    assert r["eval_loss"] <= LOSS_ATOL  # forward-only scoring of 12 pairs, same weights
    assert r["metrics"] <= METRIC_ATOL
    assert r["grad_norm"] <= GRAD_NORM_RTOL
    if "distopt" not in name:
        assert r["grads"] is not None and r["grads"] <= GRADS_RTOL
    assert r["weights"] <= WEIGHTS_RTOL


@pytest.mark.parametrize("ref", ["tp1", "tp1_tied"])
def test_reference_gradient_is_the_gradient_of_the_reported_loss(matrix, ref):
    # Central difference along g/|g| with step 1e-3 in fp32: truncation O(eps^2 * curvature)
    # ~1e-6, rounding ~1e-7 * loss / eps ~ 2e-4 absolute on a slope of ~5; 1% relative leaves
    # room and still catches any systematic scale error (a factor 2 is 100%).
    r = matrix[ref]
    assert r["grad_l2"] > 0.1
    assert r["fd_slope"] == pytest.approx(r["grad_l2"], rel=1e-2)


def test_matrix_covers_required_layouts():
    required = {"tp2", "pp2", "tp2_pp2", "tp2_dp2_sp_distopt", "pp2_vpp2", "dp4"}
    assert required <= set(COMPARED)
    sp = LAYOUTS["tp2_dp2_sp_distopt"][2]
    assert sp["sequence_parallel"] and sp["use_distributed_optimizer"]
