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

The "modelled" column is ``megatron_simpo/defaults.py``'s peak model, which decides the
``--fused-loss-head`` default (it leaves out the ``[tokens, h]`` hidden gradient both paths
return and the allocator's own overhead, hence the few MiB measured above it). ``--dtype bf16``
runs both heads in bf16 (the fused one then holds bf16/fp32 weight-gradient temporaries).

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


def child(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, dtype: str) -> dict:
    import torch

    from megatron_simpo.fused_logprobs import fused_vocab_parallel_logprobs
    from megatron_simpo.logprobs import vocab_parallel_logprobs

    g = torch.Generator().manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    h = torch.randn(tokens, hidden, generator=g).to(dt).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(dt).requires_grad_()
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
        "dtype": dtype,
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
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--skip-materialised", action="store_true")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        v, *nums, dtype = args.child
        print(json.dumps(child(v, *map(int, nums), dtype)))
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
            cmd += [str(args.hidden), str(args.vocab), str(args.chunk), args.dtype]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    from megatron_simpo import defaults

    nbytes = 2 if args.dtype == "bf16" else 4
    threshold = defaults.fused_head_threshold(args.hidden, nbytes, args.chunk)
    print(f"\n{args.dtype}: modelled threshold {threshold} tokens (megatron_simpo/defaults.py)")
    print("| tokens | hidden | vocab | path | chunk | peak MiB | modelled MiB | time s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = (r["tokens"], r["vocab"], r["hidden"], nbytes)
        if r["variant"] == "fused":
            model = defaults.fused_head_bytes(*shape, r["chunk"])
        else:
            model = defaults.unfused_head_bytes(*shape)
        print(
            f"| {r['tokens']} | {r['hidden']} | {r['vocab']} | {r['variant']} | "
            f"{r['chunk'] or '-'} | {r['peak_mib']:.0f} | {model / 2**20:.0f} | "
            f"{r['seconds']:.2f} |"
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
