"""Step time and peak memory: LoRA and DoRA vs full-parameter SimPO on the same small CPU job.

    .venv/bin/python benchmarks/bench_lora.py                      # defaults below
    .venv/bin/python benchmarks/bench_lora.py --hidden 768 --layers 12 --rank 16 --json out.json

Each variant runs in its own process (its peak resident set size is its own) and builds the same
Llama-shaped Megatron-Core GPT through ``Trainer`` (fp32, SDPA, AdamW, one gloo rank, seeded
random base) on the same long-tailed pairs (``synthetic.py``), then times ``--steps`` optimizer
steps after one warm-up: ``full`` trains every weight; ``lora`` / ``dora`` train rank-``--rank``
adapters on all seven projections over the frozen base (no gradient buffer or Adam state for
it). Peak memory is the peak RSS, which includes the Python/torch baseline of every variant
alike; the differences between variants are what gradients and optimizer state cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import long_tailed_pairs

VARIANTS = ("full", "lora", "dora")


def run_config(args, data: Path, variant: str):
    from megatron_simpo.config import RunConfig

    lora = {} if variant == "full" else {"lora_rank": args.rank, "dora": variant == "dora"}
    return RunConfig.from_dict(
        {
            "model": {
                "vocab_size": args.vocab,
                "hidden_size": args.hidden,
                "intermediate_size": args.hidden * 8 // 3,
                "num_hidden_layers": args.layers,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "max_position_embeddings": args.seq_length,
            },
            "optim": {"lr": 1e-5},
            "lora": lora,
            "data": {"data_path": str(data), "data_schema": "pretokenized"},
            "train": {
                "seq_length": args.seq_length,
                "micro_batch_size": args.micro_batch_size,
                "global_batch_size": args.global_batch_size,
                "train_iters": args.steps + 1,
                "precision": "fp32",
                "attention_backend": "sdpa",
                "seed": args.seed,
            },
        }
    )


def child(args) -> dict:
    from megatron_simpo import parallel

    parallel.init_distributed()
    import torch

    from megatron_simpo.report import peak_memory_gib
    from megatron_simpo.train import Trainer

    cfg = run_config(args, Path(args.work) / "pairs.jsonl", args.variant)
    trainer = Trainer(cfg)
    trainer.setup()
    params = [p for c in trainer.model for p in c.parameters()]
    out = {
        "variant": args.variant,
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }
    times, losses = [], []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        losses.append(trainer.step()["loss"])
        times.append(time.perf_counter() - start)
    out.update(
        seconds_per_step=statistics.median(times[1:]),
        losses=losses,
        peak_gib=peak_memory_gib(),
        threads=torch.get_num_threads(),
    )
    parallel.destroy_model_parallel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one variant's process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    n_pairs = args.global_batch_size * (args.steps + 1)
    with (work / "pairs.jsonl").open("w") as f:
        for row in long_tailed_pairs(n_pairs, args.seq_length, args.vocab, args.seed):
            f.write(json.dumps(row) + "\n")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None]
    results = {}
    for variant in VARIANTS:
        r = subprocess.run(
            [sys.executable, __file__, *flags, "--variant", variant, "--work", str(work)],
            capture_output=True,
            text=True,
        )
        lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not lines:
            sys.exit(f"{variant} failed:\n{r.stderr[-3000:]}")
        results[variant] = json.loads(lines[-1].removeprefix("RESULT "))
    base = results["full"]
    print(
        f"hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, seq_length "
        f"{args.seq_length}, {args.global_batch_size} pairs/step (micro-batch "
        f"{args.micro_batch_size}), fp32, {base['threads']} threads, {args.steps} timed steps, "
        f"LoRA rank {args.rank} on all projections; {base['params'] / 1e6:.1f}M parameters"
    )
    print(
        f"{'variant':<9}{'trainable':>11}{'peak RSS GiB':>13}{'vs full':>9}"
        f"{'s/step':>8}{'vs full':>9}"
    )
    for v in VARIANTS:
        r = results[v]
        speed = r["seconds_per_step"] / base["seconds_per_step"]
        print(
            f"{v:<9}{r['trainable'] / 1e6:>10.2f}M{r['peak_gib']:>13.3f}"
            f"{r['peak_gib'] - base['peak_gib']:>+9.3f}{r['seconds_per_step']:>8.2f}{speed:>8.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
