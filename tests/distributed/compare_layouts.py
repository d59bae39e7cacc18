"""Compares layouts of the integration matrix with their single-process reference.

    python tests/distributed/compare_layouts.py OUT_DIR

Prints JSON: layout -> {"loss": max abs diff over steps, "metrics": max abs diff of the SimPO
metrics, "grad_norm": max relative diff, "grads": max over tensors of max|a-b| / max|a|
(null when the distributed optimizer sharded them), "weights": same for the final weights,
"steps": step count}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from layouts import LAYOUTS  # noqa: E402

from megatron_simpo import parallel  # noqa: E402

parallel.init_distributed()

from megatron_simpo.checkpointing import load_full_tensors  # noqa: E402

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "length/chosen",
    "length/rejected",
    "pairs",
    "tokens",
)


def tensor_diff(ref_dir: Path, dir_: Path) -> float:
    ref, got = load_full_tensors(ref_dir), load_full_tensors(dir_)
    assert set(ref) == set(got), f"{dir_}: tensor names differ: {set(ref) ^ set(got)}"
    worst = 0.0
    for k, a in ref.items():
        b = got[k]
        assert a.shape == b.shape, f"{k}: {a.shape} vs {b.shape}"
        worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item())
    return worst


def main() -> None:
    out = Path(sys.argv[1])
    result = {}
    for name, (_, ref, _) in LAYOUTS.items():
        if ref is None or not (out / name / "metrics.json").exists():
            continue
        a = json.loads((out / ref / "metrics.json").read_text())
        b = json.loads((out / name / "metrics.json").read_text())
        ha, hb = a["history"], b["history"]
        result[name] = {
            "steps": len(hb),
            "loss": max(abs(x["loss"] - y["loss"]) for x, y in zip(ha, hb)),
            "eval_loss": max(abs(x - y) for x, y in zip(a["eval_losses"], b["eval_losses"]))
            if len(a["eval_losses"]) == len(b["eval_losses"])
            else float("inf"),
            "metrics": max(abs(x[k] - y[k]) for x, y in zip(ha, hb) for k in METRICS),
            "grad_norm": max(
                abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] for x, y in zip(ha, hb)
            ),
            "grads": tensor_diff(out / ref / "grads", out / name / "grads")
            if b["grads_saved"]
            else None,
            "weights": tensor_diff(out / ref / "weights", out / name / "weights"),
            "step_times": b["step_times"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
