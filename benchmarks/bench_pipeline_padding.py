"""Padding under pipeline parallelism: fixed shapes (every micro-batch padded to the longest pair
of the data-parallel slice) vs variable shapes (``--variable-seq-lengths``: each micro-batch
padded to its own longest row, rounded up to ``--pipeline-pad-multiple``).

    .venv/bin/python benchmarks/bench_pipeline_padding.py              # token shares, 8B layout
    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 \\
        benchmarks/bench_pipeline_padding.py --time --seq-length 512 --global-batch-size 16 \\
        --dp 1                                                         # + step time, PP=2, CPU

Token shares (no model; the 8B sbatch's batching by default: --seq-length 2048, global batch 128,
micro-batch 1, DP 4 as TP1xPP2 on 8 GPUs): over ``--iters`` global batches of
``synthetic.long_tailed_pairs``, the share of the input tokens fed to the model that are not
padding, for each layout, over all DP ranks.

``--time`` (under torchrun, 2 ranks: PP=2, a small Llama-shaped Megatron-Core GPT in fp32 on
gloo): Megatron's forward-backward schedule over the same global batches with both paddings,
round-robin per step (so background load hits both alike), median seconds per step after one
untimed warm-up, and the SimPO losses of the two, which must agree (only padding differs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from synthetic import long_tailed_pairs


def _non_padding(mb: dict) -> int:
    """Input tokens of a micro-batch that are not padding."""
    if "segment_ids" in mb:  # packed rows: padding is segment 0
        return int((mb["segment_ids"] > 0).sum())
    return int((mb["seq_tokens"] - 1).sum())  # padded rows: inputs s[:-1] of each sequence


def _batchers(pairs, args, dp_size: int, dp_rank: int) -> dict:
    from megatron_simpo.config import ParallelConfig
    from megatron_simpo.data import PairBatcher
    from megatron_simpo.data.batching import padding_for

    p = ParallelConfig(pipeline_model_parallel_size=2, pipeline_pad_multiple=args.pad_multiple)
    kw = dict(
        global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=args.seed,
        capacity=args.seq_length,
    )
    return {
        "fixed": PairBatcher(pairs, **kw, **padding_for(p, variable_seq_lengths=False)),
        "variable": PairBatcher(pairs, **kw, **padding_for(p, variable_seq_lengths=True)),
    }


def token_shares(args) -> dict[str, float]:
    """Useful share of the computed tokens per layout, over all DP ranks and ``--iters``."""
    from megatron_simpo.data import Pair

    rows = long_tailed_pairs(args.global_batch_size * args.iters, args.seq_length, 1000, args.seed)
    pairs = [
        Pair(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"])) for r in rows
    ]
    real = {"fixed": 0, "variable": 0}
    fed = {"fixed": 0, "variable": 0}
    for rank in range(args.dp):
        for name, batcher in _batchers(pairs, args, args.dp, rank).items():
            for it in range(args.iters):
                for mb in batcher.micro_batches(it)[0]:
                    real[name] += _non_padding(mb)
                    fed[name] += mb["tokens"].numel()
    return {name: real[name] / fed[name] for name in real}


def step_times(args) -> dict:
    """Forward-backward seconds per step with both paddings, PP=2 (run under torchrun -n 2)."""
    from megatron_simpo import parallel

    parallel.init_distributed()
    import torch.distributed as dist

    from megatron_simpo.batch_loss import reduce_reports
    from megatron_simpo.config import RunConfig
    from megatron_simpo.step import run_forward_backward
    from megatron_simpo.train import Trainer

    assert dist.get_world_size() == 2, "--time runs PP=2: torchrun --nproc-per-node 2"
    tmp = Path(tempfile.mkdtemp(prefix="bench_pp_padding_"))
    data = tmp / "pairs.jsonl"
    rows = long_tailed_pairs(
        args.global_batch_size * (args.steps + 1), args.seq_length, args.vocab, args.seed
    )
    if dist.get_rank() == 0:
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    obj = [str(data)]
    dist.broadcast_object_list(obj)  # rank 0's file
    cfg = RunConfig.from_dict(
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
            "parallel": {"pipeline_model_parallel_size": 2},
            "data": {"data_path": obj[0], "data_schema": "pretokenized"},
            "train": {
                "seq_length": args.seq_length,
                "micro_batch_size": args.micro_batch_size,
                "global_batch_size": args.global_batch_size,
                "precision": "fp32",
                "attention_backend": "sdpa",
                "seed": args.seed,
            },
        }
    )
    trainer = Trainer(cfg)  # variable_seq_lengths on: fixed-shape batches go through it too
    trainer.setup()
    batchers = _batchers(trainer.batcher.pairs, args, dp_size=1, dp_rank=0)
    stats = {name: {"times": [], "loss": []} for name in batchers}
    for it in range(args.steps + 1):
        for name, batcher in batchers.items():
            dist.barrier()
            start = time.perf_counter()
            mbs, seq_len = batcher.micro_batches(it)
            reports = run_forward_backward(
                trainer.model, mbs, seq_len, cfg.loss, cfg.model.vocab_size
            )
            dist.barrier()
            if it:
                stats[name]["times"].append(time.perf_counter() - start)
            for chunk in trainer.model:
                chunk.zero_grad_buffer()
            if reports:
                stats[name]["loss"].append(reduce_reports(reports)["loss"])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, stats)
    losses = next(s for s in everyone if s["fixed"]["loss"])  # the last stage's
    for a, b in zip(losses["fixed"]["loss"], losses["variable"]["loss"]):
        # Only padding differs: fp32 rounding of other GEMM shapes, ~1e-7 relative.
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (a, b)
    return {
        name: {"s_per_step": statistics.median(s["times"]), "loss": losses[name]["loss"]}
        for name, s in stats.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--global-batch-size", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--dp", type=int, default=4, help="data-parallel ranks (token shares)")
    ap.add_argument("--pad-multiple", type=int, default=64, help="--pipeline-pad-multiple")
    ap.add_argument("--iters", type=int, default=20, help="global batches (token shares)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", action="store_true", help="also time PP=2 steps (torchrun -n 2)")
    ap.add_argument("--steps", type=int, default=3, help="--time: timed steps after 1 warm-up")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    result = {"useful_token_share": token_shares(args)}
    if args.time:
        result["pp2_cpu"] = step_times(args)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    print(
        f"useful-token share (seq {args.seq_length}, global batch {args.global_batch_size}, "
        f"micro-batch {args.micro_batch_size}, DP {args.dp}, pad multiple {args.pad_multiple}):"
    )
    for name, share in result["useful_token_share"].items():
        print(f"  {name:9s} {share:6.1%}")
    if args.time:
        t = result["pp2_cpu"]
        for name, r in t.items():
            print(f"  PP=2 CPU {name:9s} {r['s_per_step']:.3f} s/step")
        print(f"  speed-up {t['fixed']['s_per_step'] / t['variable']['s_per_step']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
