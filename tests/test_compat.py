"""The start-up check of the installed Megatron-Core against the supported range."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import tomllib
from conftest import REPO

from megatron_simpo import compat


def test_supported_range_is_the_declared_dependency():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"megatron-core{compat.SUPPORTED}" in deps
    # The tested versions (the CI lanes) lie inside it, and the installed one passes.
    for v in compat.TESTED:
        assert compat.check_mcore_version(v) == v
    assert compat.check_mcore_version() == compat.installed_mcore_version()


@pytest.mark.parametrize("installed", ["0.19.2", "0.16.1", "0.19.0rc1", "0.18.2"])
def test_supported_versions_pass(installed, monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNSUPPORTED_ENV, raising=False)
    assert compat.check_mcore_version(installed) == installed


@pytest.mark.parametrize("installed", ["0.16.0", "0.15.3", "0.20.0", "0.20.0rc0", "1.0.0"])
def test_unsupported_versions_stop_with_the_fix(installed, monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNSUPPORTED_ENV, raising=False)
    with pytest.raises(compat.UnsupportedMegatronCore) as e:
        compat.check_mcore_version(installed)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"megatron-core {installed} is installed" in msg
    assert ">=0.16.1,<0.20" in msg and "pip install 'megatron-core>=0.16.1,<0.20'" in msg
    assert "MEGATRON_SIMPO_ALLOW_UNSUPPORTED_MCORE=1" in msg


def test_escape_hatch_warns_and_goes_on(monkeypatch):
    monkeypatch.setenv(compat.ALLOW_UNSUPPORTED_ENV, "1")
    with pytest.warns(UserWarning, match=r"megatron-core 0\.21\.0 is installed"):
        assert compat.check_mcore_version("0.21.0") == "0.21.0"


def test_missing_megatron_core(monkeypatch):
    monkeypatch.setattr(compat, "installed_mcore_version", lambda: None)
    with pytest.raises(compat.UnsupportedMegatronCore, match="megatron-core is not installed"):
        compat.check_mcore_version()


def test_cli_says_it_in_one_line_before_importing_megatron(tmp_path):
    # The installed version is faked in the child process: the CLI must stop with exit code 2
    # and one line on stderr, without a traceback, before Megatron-Core is imported.
    code = (
        "import sys, megatron_simpo.compat as c; c.installed_mcore_version = lambda: '0.15.0'; "
        "from megatron_simpo.cli import main; rc = main(['convert', 'hf-to-mcore', '--hf-dir', "
        f"{str(REPO / 'examples/tiny')!r}, '--save', {str(tmp_path / 'ck')!r}]); "
        "print(rc, 'megatron.core' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, compat.ALLOW_UNSUPPORTED_ENV: ""},
    )
    assert out.stdout.split() == ["2", "False"], out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.match(
        r"megatron-simpo: error: megatron-core 0\.15\.0 is installed, but megatron-simpo "
        r"supports >=0\.16\.1,<0\.20 .*pip install 'megatron-core>=0\.16\.1,<0\.20'",
        lines[0],
    ), out.stderr
    assert not (tmp_path / "ck").exists()
