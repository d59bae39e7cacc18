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
    # Measured: 0.300 -> 0.867 (faithful quoting generalises to questions SimPO never saw).
    assert after["rewards/accuracies"] >= before["rewards/accuracies"] + 0.1
    assert after["rewards/margins"] > before["rewards/margins"] + 0.5
    # Evaluation scores with simpo.yaml's loss (gamma/beta 0.5), not the default ratio (0.25
    # gives 0.770 here). Measured 1.033; 0.02 covers float differences, not the 0.26 gap.
    assert abs(before["loss"] - 1.033) < 0.02, before["loss"]
    assert "held-out preference accuracy" in res.stdout
    assert (out / "ckpt/latest_checkpointed_iteration.txt").read_text().strip() == "120"
    assert "loaded by transformers (LlamaForCausalLM" in res.stdout
    # The greedy answers change for the better: per distinct held-out question, the base's
    # (examples/tiny) and the exported aligned model's, both decoded by transformers.
    answers = json.loads((out / "answers.json").read_text())
    assert len(answers) == 20
    base = sum(r["base_correct"] for r in answers)
    aligned = sum(r["aligned_correct"] for r in answers)
    faithful = [sum(r[f"{m}_faithful"] for r in answers) for m in ("base", "aligned")]
    # Measured: preferred 0/20 -> 8/20, faithful restatements 0/20 -> 20/20. The base answers
    # with its annotator's habit (a misread operand). Deterministic given the seeds; the margins
    # leave room for float differences across CPUs and thread counts.
    assert base <= 2 and aligned >= base + 5, (base, aligned)
    assert faithful[0] <= 2 and faithful[1] >= 15, faithful
    assert "preferred answers" in res.stdout
    assert (out / "hf/model.safetensors.index.json").is_file()
    rows = (out / "tb/metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["iteration"] == 120
