"""benchmarks/gpu_check.sh as a dry run on a machine without CUDA (CUDA hidden): it installs
carried wheels with pip (no index) into a target directory on PYTHONPATH, reports the
environment, stops at the first stage that needs CUDA, writes its logs and summary under the
output directory, and says by its exit status what happened (0 ok, 1 a stage failed, 2 no CUDA).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def make_wheel(directory: Path, requires: list[str]) -> Path:
    """A minimal pure-Python wheel ``gpucheck_dummy 1.2.3`` (one module) declaring ``requires``."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "gpucheck_dummy-1.2.3-py3-none-any.whl"
    info = "gpucheck_dummy-1.2.3.dist-info"
    meta = "Metadata-Version: 2.1\nName: gpucheck_dummy\nVersion: 1.2.3\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        "gpucheck_dummy/__init__.py": '__version__ = "1.2.3"\n',
        f"{info}/METADATA": meta,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def run_check(tmp_path: Path, **env: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    full = {
        **os.environ,
        "PY": sys.executable,
        "WHEELS": str(tmp_path / "wheels"),
        "GPU_CHECK_SITE": str(tmp_path / "site"),
        "CUDA_VISIBLE_DEVICES": "",  # a dry run even where a GPU is present
        **env,
    }
    for name in ("GPU_CHECK_ALLOW_CPU", "GPU_CHECK_STAGES"):
        if name not in env:
            full.pop(name, None)
    r = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=full, capture_output=True, text=True, timeout=300
    )
    assert (out / "summary.txt").read_text() in r.stdout, r.stdout + r.stderr
    return r.returncode, out


def _results(out: Path) -> dict[str, str]:
    """stage -> result, from summary.txt's table (up to the first blank line)."""
    lines = (out / "summary.txt").read_text().split("\n\n")[0].splitlines()[2:]
    return {line.split()[0]: " ".join(line.split()[1:-1]) for line in lines}


def test_dry_run_installs_wheels_and_stops_where_cuda_is_needed(tmp_path):
    make_wheel(tmp_path / "wheels", ["torch>=99", "packaging"])
    rc, out = run_check(tmp_path, GPU_CHECK_REQUIRE="torch gpucheck_dummy")
    assert rc == 2
    assert _results(out) == {
        "setup": "ok",
        "cuda_tests": "skipped (no CUDA)",
        "moe_tests": "skipped (no CUDA)",
        "sdpa_probe": "skipped (no CUDA)",
        "thd": "skipped (no CUDA)",
        "slice": "skipped (no CUDA)",
    }
    setup = (out / "setup.log").read_text()
    # Installed by pip into the target and imported from there (PYTHONPATH), version and all.
    assert f"gpucheck_dummy 1.2.3          {tmp_path}/site/gpucheck_dummy" in setup, setup
    # --no-deps: requirements are checked against the environment instead of pip.
    torch_version = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    want = f"gpucheck_dummy-1.2.3-py3-none-any.whl: torch {torch_version} installed, torch>=99"
    assert want in setup, setup
    assert "CUDA required from stage cuda_tests on: stop" in (out / "cuda_tests.log").read_text()
    # What comes back from a lent machine: at most 8 files, none in subfolders.
    assert sorted(p.name for p in out.iterdir()) == ["cuda_tests.log", "setup.log", "summary.txt"]


def test_selected_stages_run_on_cpu_where_allowed(tmp_path):
    """The MoE stage's command (GPU_CHECK_ALLOW_CPU: CUDA stages run anyway): its ``-k moe``
    selects exactly test_cuda.py's MoE tests (skipped without CUDA), and its results reach the
    summary; the stages not selected are skipped."""
    stages = {"GPU_CHECK_STAGES": "moe_tests", "GPU_CHECK_ALLOW_CPU": "1"}
    rc, out = run_check(tmp_path, **stages)
    assert rc == 0, (out / "summary.txt").read_text()
    results = _results(out)
    assert results.pop("moe_tests") == "ok"
    assert set(results.values()) == {"skipped (not selected)"}, results
    log = (out / "moe_tests.log").read_text()
    selected = [x.split()[0] for x in log.splitlines() if x.startswith("tests/test_cuda.py::")]
    assert len(selected) == 5 and all("moe" in t for t in selected), log
    assert " 5 skipped" in log and "deselected" in log, log
    summary = (out / "summary.txt").read_text()
    assert "-- moe_tests" in summary and "SKIPPED" in summary.split("-- moe_tests")[1]


def test_missing_module_fails_setup_and_names_the_wheel(tmp_path):
    rc, out = run_check(tmp_path, GPU_CHECK_REQUIRE="torch no_such_module_xyz")
    assert rc == 1
    assert _results(out) == {
        "setup": "failed (exit 1)",
        "cuda_tests": "skipped (setup failed)",
        "moe_tests": "skipped (setup failed)",
        "sdpa_probe": "skipped (setup failed)",
        "thd": "skipped (setup failed)",
        "slice": "skipped (setup failed)",
    }
    setup = (out / "setup.log").read_text()
    assert "no wheels in WHEELS=" in setup
    assert "no_such_module_xyz MISSING (ModuleNotFoundError" in setup, setup
    assert 'make gpu-wheels GPU_WHEELS_EXTRA="no_such_module_xyz"' in setup, setup


def test_a_stage_past_its_timeout_fails(tmp_path):
    make_wheel(tmp_path / "wheels", [])
    rc, out = run_check(tmp_path, T_SETUP="1")  # importing torch alone takes longer
    assert rc == 1
    assert _results(out)["setup"] == "failed (timeout after 1 s)"


def test_grouped_gemm_expert_names_map_to_sequential_mlp_ones():
    """test_cuda.py loads one set of weights into TEGroupedMLP (``linear_fc1.weight{i}``) and a
    SequentialMLP (``local_experts.{i}.linear_fc1.weight``); at EP2 local index i on a rank is
    global expert offset + i."""
    from test_cuda import canonical_name

    pre = "module.decoder.layers.1.mlp.experts."
    assert canonical_name(pre + "linear_fc1.weight3") == pre + "local_experts.3.linear_fc1.weight"
    want = pre + "local_experts.3.linear_fc2.weight"
    assert canonical_name(pre + "linear_fc2.weight1", 2) == want
    assert canonical_name(pre + "local_experts.1.linear_fc2.weight", 2) == (
        pre + "local_experts.3.linear_fc2.weight"
    )
    qkv = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    assert canonical_name(qkv) == "decoder.layers.0.input_layernorm.weight"
