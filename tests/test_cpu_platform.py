"""Each CPU patch is still needed by the installed Megatron-Core, and still works.

A Megatron-Core upgrade that drops a CUDA assumption makes "needed" false here (remove the
patch); one that moves it elsewhere makes "works" false or breaks the layout matrix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def probe() -> dict:
    out = subprocess.run(
        [sys.executable, str(REPO / "tests/distributed/cpu_platform_probe.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_documented_patch_is_probed(probe):
    from megatron_simpo.platform import cpu

    assert set(probe) == set(cpu.PATCHES)
    assert all(reason.strip() for reason in cpu.PATCHES.values())


@pytest.mark.parametrize(
    "patch",
    [
        "device_mode",
        "tensor_type_names",
        "cuda_current_device",
        "cuda_sync_and_streams",
        "rng_tracker",
        "dist_ckpt_results_queue",
    ],
)
def test_patch_is_needed_and_works(probe, patch):
    assert probe[patch]["needed"], f"{patch} is no longer needed: remove it from platform/cpu.py"
    assert probe[patch]["works"], f"{patch} no longer works with this Megatron-Core"


def test_triton_stub_matches_version(probe):
    major_minor = tuple(int(x) for x in version("megatron-core").split(".")[:2])
    # 0.18 and later import triton from the pipeline schedules; 0.16/0.17 do not.
    assert probe["triton_only_modules"]["needed"] == (major_minor >= (0, 18))
    assert probe["triton_only_modules"]["works"]


def test_inactive_when_imported_only():
    # Importing the package must not patch anything: activation is explicit and CPU-only.
    code = (
        "import torch, megatron_simpo.platform.cpu as c; "
        "print(c.is_active(), torch.zeros(1).type())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.stdout.split() == ["False", "torch.FloatTensor"]
