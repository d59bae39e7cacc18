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
import tempfile
from pathlib import Path

import _common as common

VARIANTS = ("full", "lora", "dora")


def run_config(args, data: Path, variant: str):
    from megatron_simpo.config import RunConfig

    lora = {} if variant == "full" else {"lora_rank": args.rank, "dora": variant == "dora"}
    return RunConfig.from_dict(
        {
            "model": common.tiny_llama(args),
            "optim": {"lr": 1e-5},
            "lora": lora,
            "data": {"data_path": str(data), "data_schema": "pretokenized"},
            "train": common.fp32_train(args),
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
    out.update(common.timed_steps(lambda _: trainer.step()["loss"], args.steps))
    out.update(peak_gib=peak_memory_gib(), threads=torch.get_num_threads())
    parallel.destroy_model_parallel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_job_args(ap)
    ap.add_argument("--rank", type=int, default=16)
    common.add_variant_args(ap)
    args = ap.parse_args()
    if args.variant:
        common.print_result(child(args))
        return
    work = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    common.write_pairs(
        work / "pairs.jsonl",
        args.global_batch_size * (args.steps + 1),
        args.seq_length,
        args.vocab,
        args.seed,
    )
    results = common.run_variants(__file__, args, VARIANTS, work)
    base = results["full"]
    print(
        f"{common.job_summary(args, base['threads'])}, LoRA rank {args.rank} on all projections; "
        f"{base['params'] / 1e6:.1f}M parameters"
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
