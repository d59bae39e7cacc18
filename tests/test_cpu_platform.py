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
        "alltoall_split_sizes",
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


def test_package_import_installs_the_triton_finder_only():
    # `import megatron_simpo` must precede Megatron-Core (0.18+ imports triton from its own
    # package import), yet stay cheap: the finder is installed, nothing is imported for it.
    code = (
        "import sys, megatron_simpo; "
        "from megatron_simpo.platform import triton_stand_ins as t; "
        "print(t._FINDER in sys.meta_path, 'torch' in sys.modules, 'megatron.core' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.stdout.split() == ["True", "False", "False"], out.stderr[-2000:]


def test_megatron_core_imports_after_megatron_simpo():
    # What `convert` and the demo do first; on 0.18+ without triton this needs the stand-ins.
    code = (
        "import sys, megatron_simpo, megatron.core, megatron.core.pipeline_parallel.schedules; "
        "from megatron_simpo.platform import triton_stand_ins as t; "
        "print(sorted(n for n in t.TRITON_ONLY_MODULES "
        "if n in sys.modules and t.is_stand_in(sys.modules[n])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    major_minor = tuple(int(x) for x in version("megatron-core").split(".")[:2])
    # Only the module that imports triton unguarded is replaced: 0.19's ops/paged_stash.py
    # (0.19's moe/paged_stash.py is real code over it); none before 0.18.
    expected = {(0, 19): ["megatron.core.transformer.moe.ops.paged_stash"]}
    if major_minor < (0, 18):
        assert out.stdout.strip() == "[]"
    elif major_minor in expected:
        assert eval(out.stdout.strip()) == expected[major_minor]
