"""THD-packed vs padded SimPO steps on Transformer Engine, and packing with SDPA's dense mask.

    python benchmarks/bench_thd.py                 # GPU with TE: 1B-ish slice, seq 4096, bf16
    python benchmarks/bench_thd.py --tiny          # CPU-sized smoke run (TE modes skipped)

The same long-tailed pairs (``synthetic.py``), 8 pairs per step, 2 per micro-batch, each mode one
``bench_throughput.py`` run in its own process (fresh device memory):

* ``te-padded``: TE's fused attention, one padded row per sequence;
* ``te-thd``: TE with ``--pack-pairs``: packed rows as THD sequences (``PackedSeqParams``,
  ``megatron_simpo/packed_seq.py``), what the defaults pick where TE is installed;
* ``sdpa-mask``: SDPA with ``--pack-pairs``: the dense ``[rows, 1, s, s]`` block mask (no flash
  kernel takes an explicit mask), what packing meant on a GPU before THD.

Prints one table row per mode (seconds per step, real tokens/s, peak memory, the backend the run
reported) and the speed-up of each over ``te-padded``. Without TE (or CUDA) the TE modes are
reported as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OFF = ["--no-prefix-sharing", "--no-fused-loss-head"]
#: mode -> (needs TE, trainer flags).
MODES = {
    "te-padded": (True, ["--attention-backend", "te", "--no-pack-pairs", *OFF]),
    "te-thd": (True, ["--attention-backend", "te", "--pack-pairs", *OFF]),
    "sdpa-mask": (False, ["--attention-backend", "sdpa", "--pack-pairs", *OFF]),
}
SHAPE = {"layers": 4, "hidden": 2048, "ffn": 5632, "heads": 16, "kv_heads": 8, "vocab": 32000}
SHAPE_TINY = {"layers": 2, "hidden": 128, "ffn": 256, "heads": 4, "kv_heads": 2, "vocab": 1024}


def run_mode(mode: str, shape: dict, seq: int, args) -> dict:
    """One bench_throughput.py run: its JSON row, or a row with ``error``."""
    cmd = [sys.executable, str(HERE / "bench_throughput.py"), "--lengths", "long-tailed"]
    for key, value in shape.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    cmd += ["--seq-length", str(seq), "--micro-batch-size", "2", "--global-batch-size", "8"]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision]
    cmd += ["--", *MODES[mode][1]]
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"timed out after {args.timeout} s"}
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not lines:
        return {"mode": mode, "error": f"exit {r.returncode}: {r.stderr[-1500:]}"}
    return {"mode": mode, "wall_s": round(time.perf_counter() - start, 1), **json.loads(lines[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU-sized shapes")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per mode")
    args = ap.parse_args()

    import torch

    te = importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()
    shape, seq = (SHAPE_TINY, 256) if args.tiny else (SHAPE, 4096)
    rows = []
    for mode, (needs_te, _) in MODES.items():
        if needs_te and not te:
            rows.append({"mode": mode, "error": "skipped: needs Transformer Engine and CUDA"})
            continue
        rows.append(run_mode(mode, shape, seq, args))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["mode"] == "te-padded" and "error" not in r), None)
    print(f"THD packing, {shape} seq {seq}, long-tailed pairs, 8 per step ({args.precision})")
    print("| mode | s/step | real tokens/s | peak GiB | backend | vs te-padded |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['error'][:80]} | | | | |")
            continue
        speed = f"{base['seconds_per_step'] / r['seconds_per_step']:.2f}x" if base else "-"
        print(
            f"| {r['mode']} | {r['seconds_per_step']:.3f} | {r['tokens_per_sec']:.0f} | "
            f"{r['peak_memory_gib']:.1f} | {r['attention_backend']} | {speed} |"
        )


if __name__ == "__main__":
    main()
