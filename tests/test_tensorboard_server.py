"""A real ``tensorboard`` server over a real run's log directory: its HTTP API serves the scalars
of ``metrics.jsonl``, and headless Chromium can screenshot the page with the charts drawn.

Chromium draws TensorBoard's charts only with ``?forceSVG=true`` when headless (the WebGL
renderer stays blank without a GPU); the screenshot test is skipped where no Chromium is
installed (``apt-get install chromium`` on Debian).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

# TensorBoard's colour for the first run (its default palette); the run selector shows it as a
# small dot, every chart draws that run's line in it.
RUN_COLOR = np.array([0x42, 0x50, 0x66]) / 255


@pytest.fixture(scope="module")
def tb_run(tiny_run) -> Path:
    """The tensorboard directory of a 3-iteration run of the tiny model (shared)."""
    return tiny_run


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tb_run, tmp_path_factory):
    """``tensorboard --logdir RUN --host 127.0.0.1 --port P``; killed at teardown."""
    port = free_port()
    log = (tmp_path_factory.mktemp("tblog") / "tensorboard.log").open("w")
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(tb_run)]
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def expected_scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (tb / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        it = rec.pop("iteration")
        for k, v in rec.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out.setdefault(k, []).append((it, v))
    return out


def test_server_serves_the_runs_scalars(server, tb_run):
    url, proc = server
    expected = expected_scalars(tb_run)
    tags: dict = {}
    # The server loads event files in the background after it starts listening: poll until
    # every tag is there with all its points (or the server died / 120 s passed).
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            tags = get_json(url + "/data/plugin/scalars/tags").get(".", {})
            points = len(get_json(url + "/data/plugin/scalars/scalars?tag=loss&run=."))
            if set(tags) >= set(expected) and points == len(expected["loss"]):
                break
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(1)
    assert proc.poll() is None, "tensorboard exited"
    assert set(tags) == set(expected)
    for tag, series in expected.items():
        query = urllib.parse.urlencode({"tag": tag, "run": "."})
        served = get_json(f"{url}/data/plugin/scalars/scalars?{query}")  # [[wall, step, value]]
        assert [s[1] for s in served] == [it for it, _ in series], tag
        # Event files store float32: equal to the float64 jsonl value rounded to float32.
        assert [s[2] for s in served] == [float(np.float32(v)) for _, v in series], tag


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(find_chromium() is None, reason="no chromium (apt-get install chromium)")
def test_headless_chromium_screenshot_draws_the_charts(server, tmp_path):
    import matplotlib.image as mpimg

    url, _ = server
    # The server must have loaded the run before the page asks for it.
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if get_json(url + "/data/plugin/scalars/tags").get(".", {}).get("loss"):
                break
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(1)
    shot = tmp_path / "tensorboard.png"
    cmd = [
        find_chromium(),
        "--headless",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--virtual-time-budget=15000",  # let the page's timers and fetches finish
        f"--screenshot={shot}",
        "--window-size=1400,1000",
        f"{url}/?forceSVG=true#timeseries",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), res.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]  # [height, width, rgb] in [0, 1]
    assert img.shape == (1000, 1400, 3)
    assert img.std() > 0.05  # a blank (uniform) page has 0
    # Charts drawn: the run's colour covers far more than its dots in the run selector and the
    # data table (about 220 pixels at this size). Measured with Chromium 156 / TensorBoard 2.21:
    # 898 with the charts drawn, 0 on the page of an empty log directory.
    run_pixels = int((np.abs(img - RUN_COLOR).max(axis=-1) < 0.04).sum())
    assert run_pixels > 400, f"only {run_pixels} pixels in the run's colour: charts not drawn?"
