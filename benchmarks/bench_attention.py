"""CPU benchmark of core attention: SDPA (``--attention-backend sdpa``) vs Megatron's local spec.

    .venv/bin/python benchmarks/bench_attention.py                 # seq 1024 and 2048
    .venv/bin/python benchmarks/bench_attention.py --seq 4096 --layers 2

Each (backend, sequence length) runs in a fresh single-process subprocess that builds the same
Megatron-Core GPT model (Llama-shaped: GQA, SwiGLU, RMSNorm, RoPE; fp32; sizes below) with the
chosen core attention, then times forward + backward of one sequence (``batch 1``).

Method: one untimed warm-up iteration (first-call dispatch, gradient allocation), then ``--iters``
timed iterations; the time reported is their median. Memory: the kernel's peak-RSS counter is
reset right before the timed iterations (``echo 5 > /proc/self/clear_refs``) and the reported
peak is ``VmHWM - VmRSS(before)`` from ``/proc/self/status``: activations saved for backward and
temporaries, not weights or (already allocated) gradients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _status(key: str) -> float:
    """A ``/proc/self/status`` entry in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(args: argparse.Namespace) -> dict:
    from megatron_simpo import parallel

    parallel.init_distributed()
    import torch

    from megatron_simpo.config import RunConfig
    from megatron_simpo.model import build_model

    parallel.init_model_parallel(1, 1, None, seed=0)
    cfg = RunConfig.from_dict(
        {
            "model": {
                "vocab_size": 256,
                "hidden_size": args.hidden,
                "intermediate_size": args.hidden * 8 // 3,
                "num_hidden_layers": args.layers,
                "num_attention_heads": args.heads,
                "num_key_value_heads": args.kv_heads,
                "max_position_embeddings": args.seq,
            },
            "train": {"attention_backend": args.backend, "precision": "fp32"},
        }
    )
    (model,) = build_model(cfg)
    tokens = torch.randint(0, 256, (1, args.seq))
    pos = torch.arange(args.seq).unsqueeze(0)

    def step() -> None:
        model.zero_grad(set_to_none=False)
        model(tokens, pos, None).sum().backward()

    step()  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "backend": args.backend,
        "seq": args.seq,
        "layers": args.layers,
        "hidden": args.hidden,
        "heads": f"{args.heads}/{args.kv_heads}",
        "peak_mib": round(_status("VmHWM") - before, 1),
        "seconds": round(statistics.median(times), 3),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", default="1024,2048", help="comma-separated sequence lengths")
    ap.add_argument("--backends", default="local,sdpa")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend:  # child
        args.seq = int(args.seq)
        print(json.dumps(child(args)))
        return
    rows = []
    for seq in args.seq.split(","):
        for backend in args.backends.split(","):
            cmd = [sys.executable, __file__, "--backend", backend, "--seq", seq]
            for k in ("layers", "hidden", "heads", "kv_heads", "iters"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                sys.exit(res.stderr[-3000:])
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| seq | layers | hidden | heads/kv | backend | fwd+bwd s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seq']} | {r['layers']} | {r['hidden']} | {r['heads']} | {r['backend']} | "
            f"{r['seconds']:.2f} | {r['peak_mib']:.0f} |"
        )
    by = {(r["backend"], r["seq"]): r for r in rows}
    for seq in sorted({r["seq"] for r in rows}):
        a, b = by.get(("sdpa", seq)), by.get(("local", seq))
        if a and b:
            print(
                f"seq {seq}: sdpa/local time {a['seconds'] / b['seconds']:.2f}x, "
                f"peak memory {a['peak_mib'] / b['peak_mib']:.2f}x"
            )


if __name__ == "__main__":
    main()
