"""Tokens and time per step: padded vs packed (``--pack-pairs``) vs prefix-shared
(``--prefix-sharing``) vs both, on a long-tailed length spread, CPU.

    .venv/bin/python benchmarks/bench_packing.py                       # defaults below
    .venv/bin/python benchmarks/bench_packing.py --seq-length 1024 --hidden 512 --steps 4

One process (gloo world of 1) builds a Llama-shaped Megatron-Core GPT (fp32, SDPA attention,
sizes below) through ``Trainer`` and runs, for each step and each layout in turn (round-robin,
so background load hits all layouts alike), Megatron's forward-backward schedule over the same
global batch of pairs (collation included; the optimizer step, identical in all layouts, is not
timed). Reported per layout: rows and tokens fed to the model per step (padding included), the
fraction of them that are not padding, the median seconds per step after one untimed warm-up
step, and the speed-up over padded. The SimPO loss of each step is checked to agree with the
padded layout's.

Lengths: prompt ~ lognormal(median 0.12 S, sigma 0.8), each response ~ lognormal(median 0.21 S,
sigma 0.7), clipped so prompt + response <= S = --seq-length (UltraFeedback's shape, scaled).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import _common as common
from synthetic import long_tailed_pairs

MODES = {
    # Explicit on/off: unset, both default to on with SDPA (megatron_simpo/defaults.py).
    "padded": {"pack_pairs": False, "prefix_sharing": False},
    "packed": {"pack_pairs": True, "prefix_sharing": False},
    "prefix-shared": {"pack_pairs": False, "prefix_sharing": True},
    "packed+prefix": {"pack_pairs": True, "prefix_sharing": True},
}


def make_pairs(n: int, max_len: int, vocab: int, seed: int) -> list[dict]:
    """Pretokenized pairs with long-tailed lengths (``synthetic.py``)."""
    return long_tailed_pairs(n, max_len, vocab, seed)


def _non_padding(mb: dict) -> int:
    """Input tokens of a micro-batch that are not padding."""
    if "segment_ids" in mb:  # packed rows: padding is segment 0
        return int((mb["segment_ids"] > 0).sum())
    return int((mb["seq_tokens"] - 1).sum())  # padded rows: inputs s[:-1] of each sequence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_job_args(
        ap,
        seq_length=512,
        global_batch_size=16,
        micro_batch_size=8,
        hidden=256,
        layers=4,
        vocab=2048,
        json_help="also write the rows here",
    )
    args = ap.parse_args()

    from megatron_simpo import parallel

    parallel.init_distributed()
    import torch

    from megatron_simpo.batch_loss import reduce_reports
    from megatron_simpo.config import RunConfig
    from megatron_simpo.data import PairBatcher
    from megatron_simpo.step import run_forward_backward
    from megatron_simpo.train import Trainer

    n_pairs = args.global_batch_size * (args.steps + 1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_packing_"))
    data = tmp / "pairs.jsonl"
    with data.open("w") as f:
        for row in make_pairs(n_pairs, args.seq_length, args.vocab, args.seed):
            f.write(json.dumps(row) + "\n")
    cfg = RunConfig.from_dict(
        {
            "model": common.tiny_llama(args),
            "data": {"data_path": str(data), "data_schema": "pretokenized"},
            "train": common.fp32_train(args, train_iters=False),
        }
    )
    trainer = Trainer(cfg)
    trainer.setup()
    pairs = trainer.batcher.pairs
    batchers = {
        name: PairBatcher(
            pairs,
            global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            dp_rank=0,
            dp_size=1,
            seed=args.seed,
            capacity=args.seq_length,
            **flags,
        )
        for name, flags in MODES.items()
    }
    stats = {
        name: {"times": [], "rows": [], "tokens": [], "real": [], "loss": []} for name in MODES
    }
    for it in range(args.steps + 1):
        for name, batcher in batchers.items():
            for chunk in trainer.model:
                chunk.zero_grad_buffer()
            start = time.perf_counter()
            micro_batches, seq_len = batcher.micro_batches(it)
            reports = run_forward_backward(
                trainer.model, micro_batches, seq_len, cfg.loss, cfg.model.vocab_size
            )
            seconds = time.perf_counter() - start
            if it == 0:
                continue  # warm-up
            s = stats[name]
            s["times"].append(seconds)
            s["rows"].append(sum(mb["tokens"].shape[0] for mb in micro_batches))
            s["tokens"].append(sum(mb["tokens"].numel() for mb in micro_batches))
            s["real"].append(sum(_non_padding(mb) for mb in micro_batches))
            s["loss"].append(reduce_reports(reports)["loss"])
    ref = stats["padded"]
    rows = []
    for name, s in stats.items():
        # fp32, same weights: only summation order differs (tests/test_packing.py bounds it).
        drift = max(abs(a - b) for a, b in zip(s["loss"], ref["loss"]))
        assert drift < 1e-4, f"{name}: loss differs from padded by {drift}"
        sec = statistics.median(s["times"])
        rows.append(
            {
                "layout": name,
                "rows/step": statistics.mean(s["rows"]),
                "tokens/step": statistics.mean(s["tokens"]),
                "real": sum(s["real"]) / sum(s["tokens"]),
                "s/step": sec,
                "speed-up": statistics.median(ref["times"]) / sec,
                "max|dloss|": drift,
            }
        )
    print(
        f"seq_length {args.seq_length}, {args.global_batch_size} pairs/step, micro-batch "
        f"{args.micro_batch_size} pairs, hidden {args.hidden} x {args.layers} layers, vocab "
        f"{args.vocab}, fp32, {torch.get_num_threads()} threads, {args.steps} timed steps"
    )
    print(
        f"{'layout':<15}{'rows/step':>10}{'tokens/step':>13}{'real':>8}{'s/step':>9}"
        f"{'speed-up':>10}{'max|dloss|':>12}"
    )
    for r in rows:
        print(
            f"{r['layout']:<15}{r['rows/step']:>10.1f}{r['tokens/step']:>13.0f}"
            f"{r['real']:>8.1%}{r['s/step']:>9.3f}{r['speed-up']:>9.2f}x{r['max|dloss|']:>12.1e}"
        )
    print("(real: non-padding share of the tokens fed; prefix sharing also feeds fewer of them)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    parallel.destroy_model_parallel()


if __name__ == "__main__":
    main()
