"""SimPO training throughput of Llama-3-8B-shaped slices (4 and 8 layers) on one GPU, per mode,
with the per-layer cost and a 32-layer projection.

    python benchmarks/bench_gpu_slice.py                          # GPU: layers 4,8, all modes
    python benchmarks/bench_gpu_slice.py --budget-s 150 --json slice.json
    python benchmarks/bench_gpu_slice.py --tiny                   # CPU-sized smoke run

Each (mode, layer count) is one run of ``bench_throughput.py`` in its own process (fresh device
memory; a crash or OOM costs only that row): the real trainer, bf16, hidden 4096, FFN 14336, GQA
32/8, vocab 128256, seq 4096. Modes:

* ``padded``: pairs that fill the sequence (no padding to speak of), materialised loss head;
* ``fused``: the same with ``--fused-loss-head``;
* ``packed``: long-tailed pair lengths (``synthetic.py``) with ``--pack-pairs``;
* ``padded-lt``: the same long-tailed pairs padded: the baseline packing is measured against.

Runs go in priority order (every mode at 4 layers, then at 8) and stop when ``--budget-s`` is
spent (the rest are reported as skipped). Tokens and FLOPs count real tokens (no padding); MFU
is model FLOPs (``flops.py``: full attention square, Megatron's convention) over the detected
peak. Per layer: ``(t8 - t4) / 4`` seconds per step; the 32-layer projection is
``t4 + 7 (t8 - t4)`` seconds and ``f4 + 7 (f8 - f4)`` FLOPs per step (a compute projection: an
8B model with Adam needs ~145 GB, more than one GPU holds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: mode -> (pair lengths, extra trainer flags, micro-batch pairs, pairs per step).
MODES: dict[str, tuple[str, list[str], int, int]] = {
    # Explicit on/off: unset, these default per backend and shape (megatron_simpo/defaults.py).
    "padded": ("full", ["--no-fused-loss-head", "--no-pack-pairs", "--no-prefix-sharing"], 1, 2),
    "fused": ("full", ["--fused-loss-head", "--no-pack-pairs", "--no-prefix-sharing"], 1, 2),
    "packed": ("long-tailed", ["--pack-pairs", "--no-prefix-sharing"], 2, 4),
    "padded-lt": ("long-tailed", ["--no-pack-pairs", "--no-prefix-sharing"], 2, 4),
}
SHAPE_8B = {"hidden": 4096, "ffn": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256, "seq": 4096}
SHAPE_TINY = {"hidden": 128, "ffn": 256, "heads": 4, "kv_heads": 2, "vocab": 1024, "seq": 256}


def run_one(mode: str, layers: int, shape: dict, args, timeout: float) -> dict:
    """One bench_throughput.py run; its JSON row, or a row with ``error``."""
    lengths, flags, mbs, gbs = MODES[mode]
    cmd = [sys.executable, str(HERE / "bench_throughput.py"), "--layers", str(layers)]
    cmd += ["--hidden", str(shape["hidden"]), "--ffn", str(shape["ffn"])]
    cmd += ["--heads", str(shape["heads"]), "--kv-heads", str(shape["kv_heads"])]
    cmd += ["--vocab", str(shape["vocab"]), "--seq-length", str(shape["seq"])]
    cmd += ["--micro-batch-size", str(mbs), "--global-batch-size", str(gbs)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--precision", args.precision, "--lengths", lengths, "--", *flags]
    row = {"mode": mode, "layers": layers}
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {**row, "error": f"timed out after {timeout:.0f} s", "stderr_tail": tail}
    row["wall_s"] = round(time.perf_counter() - start, 1)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not lines:
        return {**row, "error": f"exit {r.returncode}", "stderr_tail": r.stderr[-3000:]}
    return {**row, **json.loads(lines[-1])}


def per_layer(rows: list[dict], lo: int, hi: int) -> list[dict]:
    """Per mode with both layer counts: seconds per layer and the 32-layer projection."""
    out = []
    by = {(r["mode"], r["layers"]): r for r in rows if "error" not in r and "skipped" not in r}
    for mode in MODES:
        a, b = by.get((mode, lo)), by.get((mode, hi))
        if not (a and b):
            continue
        k = (32 - lo) / (hi - lo)
        t_layer = (b["seconds_per_step"] - a["seconds_per_step"]) / (hi - lo)
        t32 = a["seconds_per_step"] + k * (b["seconds_per_step"] - a["seconds_per_step"])
        f32 = a["model_flops_per_step"] + k * (
            b["model_flops_per_step"] - a["model_flops_per_step"]
        )
        tflops = f32 / t32 / 1e12
        peak = a.get("peak_tflops")
        out.append(
            {
                "mode": mode,
                "s_per_layer_step": t_layer,
                "s_per_step_32_layers": t32,
                "tokens_per_sec_32_layers": a["tokens_per_step"] / t32,
                "tflops_32_layers": tflops,
                "mfu_32_layers": tflops / peak if peak else None,
            }
        )
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="4,8", help="two layer counts, comma-separated")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget, all runs")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized shapes, fp32, layers 1,2")
    ap.add_argument("--json", help="also write all rows here")
    args = ap.parse_args()
    shape = SHAPE_8B
    if args.tiny:
        shape, args.precision = SHAPE_TINY, "fp32"
        args.layers = "1,2" if args.layers == "4,8" else args.layers
    layer_counts = [int(x) for x in args.layers.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown or len(layer_counts) != 2:
        sys.exit(f"--modes must be among {list(MODES)} and --layers two counts (got {args})")
    deadline = time.monotonic() + args.budget_s
    rows, slowest = [], 0.0
    for layers in layer_counts:
        for mode in modes:
            left = deadline - time.monotonic()
            if left < max(slowest, 10.0):  # the next run would likely not finish
                rows.append(
                    {"mode": mode, "layers": layers, "skipped": f"budget ({left:.0f} s left)"}
                )
                print(json.dumps(rows[-1]), flush=True)
                continue
            row = run_one(mode, layers, shape, args, timeout=left)
            slowest = max(slowest, row.get("wall_s", 0.0))
            rows.append(row)
            print(json.dumps(row), flush=True)
    lo, hi = layer_counts
    proj = per_layer(rows, lo, hi)
    print(
        f"\nLlama-3-8B slice: hidden {shape['hidden']}, FFN {shape['ffn']}, GQA "
        f"{shape['heads']}/{shape['kv_heads']}, vocab {shape['vocab']}, seq {shape['seq']}, "
        f"{args.precision}, {args.steps} timed steps after {args.warmup}"
    )
    print(
        "| mode | layers | pairs/step | tokens/s | TFLOP/s | MFU | s/step | peak GiB | attention |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r or "skipped" in r:
            why = r.get("error") or "skipped: " + r["skipped"]
            print(f"| {r['mode']} | {r['layers']} | {why} | | | | | | |")
            continue
        print(
            f"| {r['mode']} | {r['layers']} | {r['pairs_per_step']} | {r['tokens_per_sec']:,.0f} | "
            f"{r['tflops_per_gpu']:.4g} | {_fmt(r['mfu'], '.1%')} | {r['seconds_per_step']:.3f} | "
            f"{r['peak_memory_gib']:.1f} | {r['attention_backend']} |"
        )
    if proj:
        print(f"\nPer layer ((t{hi} - t{lo}) / {hi - lo}) and projected to 32 layers:")
        print("| mode | s/step per layer | 32 layers: s/step | tokens/s | TFLOP/s | MFU |")
        print("|---|---|---|---|---|---|")
        for p in proj:
            print(
                f"| {p['mode']} | {p['s_per_layer_step']:.4f} | {p['s_per_step_32_layers']:.3f} | "
                f"{p['tokens_per_sec_32_layers']:,.0f} | {p['tflops_32_layers']:.4g} | "
                f"{_fmt(p['mfu_32_layers'], '.1%')} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "per_layer": proj}, indent=1))
    for r in rows:
        if "error" in r:
            print(
                f"\n{r['mode']} x {r['layers']} layers failed ({r['error']}):\n{r['stderr_tail']}"
            )
    sys.exit(1 if any("error" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
