"""Which SDPA kernel the project's attention calls get: flash, efficient, cuDNN or math.

    python benchmarks/probe_sdpa_kernels.py                   # Llama-3-8B attention, bf16, seq 4096
    python benchmarks/probe_sdpa_kernels.py --tiny            # CPU-sized smoke run
    python benchmarks/probe_sdpa_kernels.py --json probe.json

Calls ``megatron_simpo.attention.SDPAttention`` itself (the module the SDPA spec builds, so the
mask handling and ``enable_gqa`` are the real ones) on three cases:

* ``causal``: padded rows, no mask (``is_causal``), grouped-query attention;
* ``packed``: packed rows (``--pack-pairs``): the boolean block-diagonal mask that
  ``data.packing.attention_mask_from`` builds from ``collate_packed`` rows of long-tailed pairs;
* ``packed-kv-expanded``: the same mask with K/V repeated to the query heads (no GQA), to show
  whether GQA is what keeps a fused kernel away from the packed mask.

For each case: the backend torch picks by itself (read from the profiler: the ``aten`` kernel
op that ran) and the forward+backward time, then each backend forced alone through
``torch.nn.attention.sdpa_kernel`` (ok and its time, or torch's reason for refusing). Timing: one
warm-up, then the median of ``--iters`` forward+backward calls, synchronised.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: aten op (profiler) -> backend name.
KERNEL_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}
BACKENDS = ("flash", "efficient", "cudnn", "math")


def packed_mask(rows: int, seq: int, vocab: int, seed: int):
    """``[rows, 1, seq, seq]`` bool (True: masked) of packed rows of long-tailed pairs."""
    from synthetic import long_tailed_pairs

    from megatron_simpo.data import Pair
    from megatron_simpo.data.packing import attention_mask_from, collate_packed

    pairs = [
        Pair(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]), 1.0)
        for r in long_tailed_pairs(8 * rows, seq, vocab, seed)
    ]
    mb = collate_packed(pairs, capacity=seq, prefix_sharing=False, pack=True, width=seq)
    segments = int(mb["segment_ids"][:rows].max(dim=1).values.sum())
    return attention_mask_from(mb["segment_ids"][:rows], mb["branch_ids"][:rows]), segments


def _backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def _time(fn, iters: int, cuda: bool) -> float:
    import torch

    fn()  # warm-up
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _kernel_used(fn) -> str:
    """The SDPA backend(s) that ran in ``fn``, from the profiler's aten ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    used = sorted({KERNEL_OPS[e.key] for e in prof.key_averages() if e.key in KERNEL_OPS})
    return "+".join(used) or "?"


def probe(args: argparse.Namespace) -> list[dict]:
    import torch

    from megatron_simpo.attention import SDPAttention
    from megatron_simpo.config import RunConfig
    from megatron_simpo.model import transformer_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    head = args.hidden // args.heads
    cfg = RunConfig.from_dict(
        {
            "model": {
                "vocab_size": args.vocab,
                "hidden_size": args.hidden,
                "intermediate_size": 4 * args.hidden,
                "num_hidden_layers": 1,
                "num_attention_heads": args.heads,
                "num_key_value_heads": args.kv_heads,
                "max_position_embeddings": args.seq,
            },
            "train": {"precision": args.dtype, "seq_length": args.seq},
        }
    )
    from megatron.core.transformer.enums import AttnMaskType

    core = SDPAttention(
        transformer_config(cfg),
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
    )
    g = torch.Generator(device=device).manual_seed(0)
    s, b = args.seq, args.rows

    def qkv(kv_heads: int):
        shape = (s, b, args.heads, head), (s, b, kv_heads, head), (s, b, kv_heads, head)
        return [torch.randn(*sh, generator=g, device=device, dtype=dtype) for sh in shape]

    mask, segments = packed_mask(b, s, args.vocab, seed=0)
    mask = mask.to(device)
    cases = {
        "causal": (qkv(args.kv_heads), None),
        "packed": (qkv(args.kv_heads), mask),
    }
    q, k, v = cases["packed"][0]
    rep = args.heads // args.kv_heads
    expanded = [q, k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)]
    cases["packed-kv-expanded"] = (expanded, mask)

    rows = []
    for case, (tensors, m) in cases.items():
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        upstream = torch.randn(s, b, args.heads * head, generator=g, device=device, dtype=dtype)

        def step(leaves=leaves, m=m, upstream=upstream) -> None:
            out = core(*leaves, m)
            out.backward(upstream)

        row: dict = {"case": case, "shape": f"b{b} s{s} h{args.heads}/{tensors[1].shape[2]}"}
        row["segments"] = segments if m is not None else b
        row["default"] = _kernel_used(step)
        row["default_ms"] = round(_time(step, args.iters, cuda), 3)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            step()
            row["default_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        from torch.nn.attention import sdpa_kernel

        for name in BACKENDS:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([_backend_enum(name)]):
                        row[name] = f"ok {_time(step, args.iters, cuda):.3f} ms"
                except RuntimeError as e:
                    reasons = [str(w.message).split("\n")[0] for w in caught]
                    why = next((r for r in reasons if "not used because" in r), None)
                    if why is None:  # torch names no reason: the backend is not built here
                        row[name] = f"no ({type(e).__name__}: unavailable)"
                    else:
                        row[name] = "no: " + why.split("because:")[-1].strip()[:160]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=2, help="batch rows")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="seq 256, hidden 64, 4/2 heads, fp32")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.tiny:
        args.seq, args.hidden, args.heads, args.kv_heads = 256, 64, 4, 2
        args.vocab, args.dtype = 512, "fp32"
    from megatron_simpo import parallel

    parallel.init_distributed()  # CPU: activates the CPU layer Megatron-Core needs
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, {device}, {args.dtype}", flush=True)
    rows = probe(args)
    print("\n| case | shape | segments | default kernel | ms | " + " | ".join(BACKENDS) + " |")
    print("|---" * (5 + len(BACKENDS)) + "|")
    for r in rows:
        cells = [r["case"], r["shape"], str(r["segments"]), r["default"], f"{r['default_ms']:.2f}"]
        print("| " + " | ".join(cells + [r[b] for b in BACKENDS]) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    parallel.destroy_model_parallel()


if __name__ == "__main__":
    main()
