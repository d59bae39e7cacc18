"""Peak memory and time of the loss head: fused chunked (``--fused-loss-head``) vs materialised.

    .venv/bin/python benchmarks/bench_loss_head.py                       # defaults below
    .venv/bin/python benchmarks/bench_loss_head.py --hidden 4096 --tokens 16384 --skip-materialised

The loss head is ``hidden [tokens, h] -> logits [tokens, vocab] -> log-prob of the target``,
forward and backward (gradients of hidden and weight), fp32 on CPU at TP1. "Materialised" is
the unfused path (``hidden @ W^T`` then ``megatron_simpo.logprobs.vocab_parallel_logprobs``, the
logits released after the loss as Megatron's schedule does); "fused" is
``megatron_simpo.fused_logprobs.fused_vocab_parallel_logprobs``.

Method: each measurement runs in a fresh subprocess. Inputs (hidden, weight, targets) are
allocated and touched first; then the kernel's peak-RSS counter is reset
(``echo 5 > /proc/self/clear_refs``) and the resident set recorded; after forward+backward,
peak memory = ``VmHWM - VmRSS(before)`` from ``/proc/self/status``. It therefore counts every
byte the head touched, including the gradients it returns (``[vocab, h]`` and ``[tokens, h]``),
which both paths produce. Time is the wall time of that same first forward+backward (the matmuls
dominate; a second iteration would change little) on ``torch.get_num_threads()`` threads.

The materialised path needs ~3 x tokens x vocab x 4 bytes (logits, shifted logits, softmax): at
16 x 1024 tokens and vocab 128256 that is ~25 GB, more than this 23 GB machine, so by default it
runs at fewer tokens and the table shows the per-token slope; its peak is linear in tokens.
"""

from __future__ import annotations

import argparse
import json
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


def child(variant: str, tokens: int, hidden: int, vocab: int, chunk: int) -> dict:
    import torch

    from megatron_simpo.fused_logprobs import fused_vocab_parallel_logprobs
    from megatron_simpo.logprobs import vocab_parallel_logprobs

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    if variant == "fused":
        logp = fused_vocab_parallel_logprobs(h, w, targets, vocab_size=vocab, chunk_size=chunk)
    else:
        logits = h @ w.t()
        logp = vocab_parallel_logprobs(logits, targets, vocab_size=vocab)
        del logits
    logp.sum().backward()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    return {
        "variant": variant,
        "tokens": tokens,
        "hidden": hidden,
        "vocab": vocab,
        "chunk": chunk if variant == "fused" else None,
        "peak_mib": round(peak, 1),
        "seconds": round(seconds, 2),
        "logp_sum": float(logp.detach().double().sum()),
        "threads": torch.get_num_threads(),
    }


def _mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="2048,4096,16384", help="comma-separated token counts")
    ap.add_argument(
        "--hidden", type=int, default=256, help="hidden size (4096 in Llama-3-8B; scaled down)"
    )
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunk", type=int, default=1024, help="fused: tokens per chunk")
    ap.add_argument("--skip-materialised", action="store_true")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        v, *nums = args.child
        print(json.dumps(child(v, *map(int, nums))))
        return
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        for variant in ("materialised", "fused"):
            if variant == "materialised":
                need = 3.2 * tokens * args.vocab * 4 / 2**20
                if args.skip_materialised or need > 0.8 * _mem_available_mib():
                    print(f"# materialised at {tokens} tokens skipped (needs ~{need:.0f} MiB)")
                    continue
            cmd = [sys.executable, __file__, "--child", variant, str(tokens)]
            cmd += [str(args.hidden), str(args.vocab), str(args.chunk)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| tokens | hidden | vocab | path | chunk | peak MiB | MiB/token | time s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['hidden']} | {r['vocab']} | {r['variant']} | "
            f"{r['chunk'] or '-'} | {r['peak_mib']:.0f} | {r['peak_mib'] / r['tokens']:.3f} | "
            f"{r['seconds']:.1f} |"
        )
    by = {(r["variant"], r["tokens"]): r for r in rows}
    for tokens in sorted({r["tokens"] for r in rows}):
        m, f = by.get(("materialised", tokens)), by.get(("fused", tokens))
        if m and f:
            print(
                f"tokens {tokens}: fused/materialised peak {f['peak_mib'] / m['peak_mib']:.3f}, "
                f"time {f['seconds'] / m['seconds']:.2f}x, "
                f"|logp sum diff| {abs(f['logp_sum'] - m['logp_sum']):.2e}"
            )


if __name__ == "__main__":
    main()
