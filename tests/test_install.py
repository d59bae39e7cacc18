"""``pip install .`` without extras is enough: convert, train on pre-tokenised data, evaluate text.

Run by ``make test-install`` (part of ``make test``), which builds ``.venv-mcore019`` as a user
would (torch first, then ``pip install .``, no extras) and points
``MEGATRON_SIMPO_BARE_VENV`` at it. The commands run that venv's ``megatron-simpo`` console
script from outside the repository, so they import the installed package, not the checkout.
The unit test at the end runs in any environment.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# Absolute: the commands run with another working directory (outside the repository).
BARE = os.environ.get("MEGATRON_SIMPO_BARE_VENV") and os.path.abspath(
    os.environ["MEGATRON_SIMPO_BARE_VENV"]
)
needs_bare = pytest.mark.skipif(
    not BARE, reason="needs MEGATRON_SIMPO_BARE_VENV (a venv made by `make test-install`)"
)


def _bare(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    # No PYTHONPATH: exactly what `pip install .` put into the venv (megatron-core 0.16.1 here).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MEGATRON_SIMPO_CACHE"] = str(tmp / "cache")
    exe = Path(BARE).resolve() / "bin/megatron-simpo"
    return subprocess.run(
        [str(exe), *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bare")
    res = _bare(
        tmp, "convert", "hf-to-mcore", "--hf-dir", str(REPO / "examples/tiny"), "--save", "ckpt"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp


@needs_bare
def test_bare_install_has_no_extras():
    code = "import importlib.util as u; print(u.find_spec('transformer_engine') is None)"
    out = subprocess.run(
        [str(Path(BARE) / "bin/python"), "-c", code], capture_output=True, text=True, cwd="/"
    )
    assert out.stdout.strip() == "True", out.stderr


@needs_bare
def test_train_on_pretokenised_data(bare_run):
    # The converted checkpoint carries a tokenizer (ckpt/hf): it must not be loaded for ids.
    res = _bare(
        bare_run,
        "train",
        "--load",
        "ckpt",
        "--data-path",
        str(REPO / "examples/tiny_pretok.jsonl"),
        "--train-iters",
        "2",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "8",
        "--seq-length",
        "16",
        "--tensorboard-dir",
        "tb",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (bare_run / "tb/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "grad_norm" in r]
    assert [r["iteration"] for r in train] == [1, 2]
    # Random-ish converted weights: a SimPO loss is positive and finite, gradients too.
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in train)
    assert all(r["pairs"] == 8 for r in train)


@needs_bare
def test_evaluate_text_data_matches_checkout(bare_run):
    heldout = str(REPO / "examples/tiny/heldout.jsonl")
    args = ["evaluate", "--load", "ckpt", "--data-path", heldout, "--output", "e.json"]
    res = _bare(bare_run, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    bare = json.loads((bare_run / "e.json").read_text())
    # The same command from this checkout's environment: installed == source, number by number.
    ref_out = bare_run / "ref.json"
    ref = subprocess.run(
        [sys.executable, "-m", "megatron_simpo", "evaluate", "--load", str(bare_run / "ckpt")]
        + ["--data-path", heldout, "--output", str(ref_out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = json.loads(ref_out.read_text())
    assert bare["num_pairs"] == want["num_pairs"] == 60
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        # Same code, weights and data on one machine; 1e-6 relative allows for a different
        # thread count or BLAS kernel order between the two environments (fp32 sums of ~30 terms).
        assert bare[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key


def test_pretokenised_pairs_never_import_transformers(tmp_path):
    # With a tokenizer directory given (as `train --load ckpt` does: ckpt/hf has one) and text
    # rows absent, preparing pre-tokenised pairs must not import transformers.
    rows = [
        {"prompt_ids": [1, 5, 9], "chosen_ids": [4, 2], "rejected_ids": [7], "weight": 0.5},
        {"prompt_ids": [1, 3], "chosen_ids": [8, 8, 2], "rejected_ids": [6, 2]},
        {"prompt_ids": [1, 9, 13, 7, 14, 3], "chosen_ids": [11], "rejected_ids": [12, 5, 2]},
    ]
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = f"""
import sys
from megatron_simpo.data import load_pairs
from megatron_simpo.data.prepare import PrepareOptions
pairs = load_pairs({str(data)!r}, tokenizer={str(REPO / "examples/tiny")!r},
                   opts=PrepareOptions(max_length=5), cache_dir={str(tmp_path / "c")!r})
print([[list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids), p.weight] for p in pairs])
print("transformers" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    pairs, imported = out.stdout.strip().splitlines()[-2:]
    assert imported == "False"
    got = json.loads(pairs)
    assert [g[3] for g in got] == [0.5, 1.0, 1.0]
    assert got[0][:3] == [[1, 5, 9], [4, 2], [7]]  # fits in 5 tokens: untouched
    # 9 tokens > 5 are truncated; which tokens survive is truncation's business (its own tests),
    # here only that every pair fits and keeps a response.
    assert all(len(p) + max(len(c), len(r)) <= 5 and c and r for p, c, r, _ in got)
