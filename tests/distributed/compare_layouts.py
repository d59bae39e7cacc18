"""Compares layouts of the integration matrix with their single-process reference.

    python tests/distributed/compare_layouts.py OUT_DIR

Prints JSON: layout -> {"loss": max abs diff over steps, "metrics": max abs diff of the SimPO
metrics, "grad_norm": max relative diff, "grads": max over tensors of max|a-b| / max|a|
(null when the distributed optimizer sharded them), "grads_l2": |a-b| / |a| over all gradients,
"weights" / "weights_l2": the same two for the final weights, "steps": step count,
"dtypes": the layout's recorded dtypes}; a bf16 layout also has "vs_fp32": the same comparison
with the fp32 layout its weights came from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from layouts import LAYOUTS, fp32_of  # noqa: E402

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


def tensor_diff(ref_dir: Path, dir_: Path) -> tuple[float, float]:
    """``(max over tensors of max|a-b| / max|a|, |a-b| / |a| over all tensors together)``."""
    ref, got = load_full_tensors(ref_dir), load_full_tensors(dir_)
    assert set(ref) == set(got), f"{dir_}: tensor names differ: {set(ref) ^ set(got)}"
    worst, diff_sq, ref_sq = 0.0, 0.0, 0.0
    for k, a in ref.items():
        a, b = a.double(), got[k].double()
        assert a.shape == b.shape, f"{k}: {a.shape} vs {b.shape}"
        worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item())
        diff_sq += ((a - b) ** 2).sum().item()
        ref_sq += (a**2).sum().item()
    return worst, (diff_sq / max(ref_sq, 1e-300)) ** 0.5


def compare(out: Path, ref: str, name: str) -> dict:
    """Layout ``name`` against layout ``ref`` (both finished: ``metrics.json`` and tensors)."""
    a = json.loads((out / ref / "metrics.json").read_text())
    b = json.loads((out / name / "metrics.json").read_text())
    ha, hb = a["history"], b["history"]
    grads = tensor_diff(out / ref / "grads", out / name / "grads") if b["grads_saved"] else None
    weights = tensor_diff(out / ref / "weights", out / name / "weights")
    return {
        "steps": len(hb),
        "loss": max(abs(x["loss"] - y["loss"]) for x, y in zip(ha, hb)),
        "eval_loss": max(abs(x - y) for x, y in zip(a["eval_losses"], b["eval_losses"]))
        if len(a["eval_losses"]) == len(b["eval_losses"])
        else float("inf"),
        "metrics": max(abs(x[k] - y[k]) for x, y in zip(ha, hb) for k in METRICS),
        # Mixture of experts: the router's load-balancing loss (absent: 0 on both sides).
        "aux_loss": max(
            abs(x.get("moe/aux_loss", 0.0) - y.get("moe/aux_loss", 0.0)) for x, y in zip(ha, hb)
        ),
        "grad_norm": max(
            abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] for x, y in zip(ha, hb)
        ),
        "grads": grads[0] if grads else None,
        "grads_l2": grads[1] if grads else None,
        "weights": weights[0],
        "weights_l2": weights[1],
        "step_times": b["step_times"],
        "dtypes": b["dtypes"],
    }


def main() -> None:
    out = Path(sys.argv[1])
    result = {}
    for name, layout in LAYOUTS.items():
        if layout.ref is None or not (out / name / "metrics.json").exists():
            continue
        result[name] = compare(out, layout.ref, name)
        fp32 = fp32_of(name)
        if fp32 is not None and fp32 != layout.ref:
            result[name]["vs_fp32"] = compare(out, fp32, name)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
