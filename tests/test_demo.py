"""The embedded demo end to end: convert, evaluate, train (TP2), evaluate — through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_demo_raises_heldout_accuracy(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "tools/demo.py", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    assert before["num_pairs"] == after["num_pairs"] == 60
    # Measured: 0.417 -> 0.650 (faithful quoting generalises to unseen operands).
    assert after["rewards/accuracies"] >= before["rewards/accuracies"] + 0.1
    assert after["rewards/margins"] > before["rewards/margins"] + 0.5
    assert "held-out preference accuracy" in res.stdout
    assert (out / "ckpt/latest_checkpointed_iteration.txt").read_text().strip() == "120"
    assert "loaded by transformers (LlamaForCausalLM" in res.stdout
    assert (out / "hf/model.safetensors.index.json").is_file()
    rows = (out / "tb/metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["iteration"] == 120
