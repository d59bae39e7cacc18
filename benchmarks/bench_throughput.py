"""SimPO training throughput of a Llama-3-8B-shaped slice: tokens/s, TFLOP/s and MFU.

    python benchmarks/bench_throughput.py                       # GPU: 4 layers, seq 4096, bf16
    python benchmarks/bench_throughput.py --layers 2 --hidden 256 --ffn 512 --heads 4 \\
        --kv-heads 2 --vocab 4096 --seq-length 256 --steps 3     # a CPU-sized smoke run

Runs the real trainer (``megatron_simpo.train.Trainer``: Megatron-Core GPT model, SimPO loss,
Adam, on one device) on synthetic pre-tokenised pairs, times ``--steps`` optimizer steps after
``--warmup`` and prints one JSON line with tokens/s, model TFLOP/s per device (``flops.py``),
MFU (peak detected or ``--peak-tflops``), peak memory, and the attention backend used. Pairs
either fill the sequence length (``--lengths full``: prompt seq/4, responses the rest) or have
long-tailed lengths (``--lengths long-tailed``, ``synthetic.py``: what packing is for). Tokens
and FLOPs count real tokens only (no padding). Extra trainer flags (``--pack-pairs``,
``--fused-loss-head``, ...) go after ``--``. ``benchmarks/bench_gpu_slice.py`` runs it per mode
and layer count.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def synthetic_pairs(path: Path, n: int, seq_length: int, vocab: int, seed: int) -> None:
    """Pairs of full length: prompt seq/4 tokens, responses filling the rest (one less for the
    label shift)."""
    rng = random.Random(seed)
    prompt = seq_length // 4
    resp = seq_length - prompt

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    with path.open("w") as f:
        for _ in range(n):
            row = {"prompt_ids": ids(prompt), "chosen_ids": ids(resp), "rejected_ids": ids(resp)}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch")
    ap.add_argument("--global-batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--lengths", default="full", choices=["full", "long-tailed"])
    ap.add_argument("--seed", type=int, default=0)
    args, extra = ap.parse_known_args()
    extra = [x for x in extra if x != "--"]

    import torch
    import torch.distributed as dist

    from megatron_simpo import flops, parallel
    from megatron_simpo.cli import build_parser, config_from_args
    from megatron_simpo.model import attention_label
    from megatron_simpo.report import peak_memory_gib
    from megatron_simpo.train import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench_throughput_"))
    n_pairs = args.global_batch_size * (args.steps + args.warmup)
    if args.lengths == "full":
        synthetic_pairs(tmp / "pairs.jsonl", n_pairs, args.seq_length, args.vocab, args.seed)
    else:
        from synthetic import long_tailed_pairs

        with (tmp / "pairs.jsonl").open("w") as f:
            for row in long_tailed_pairs(n_pairs, args.seq_length, args.vocab, args.seed):
                f.write(json.dumps(row) + "\n")
    argv = ["train", "--data-path", str(tmp / "pairs.jsonl"), "--data-schema", "pretokenized"]
    argv += ["--num-hidden-layers", str(args.layers), "--hidden-size", str(args.hidden)]
    argv += ["--intermediate-size", str(args.ffn), "--num-attention-heads", str(args.heads)]
    argv += ["--num-key-value-heads", str(args.kv_heads), "--vocab-size", str(args.vocab)]
    argv += [
        "--max-position-embeddings",
        str(args.seq_length),
        "--seq-length",
        str(args.seq_length),
    ]
    argv += ["--micro-batch-size", str(args.micro_batch_size)]
    argv += ["--global-batch-size", str(args.global_batch_size)]
    argv += ["--train-iters", str(args.steps + args.warmup), "--precision", args.precision]
    argv += ["--lr", "1e-6", "--data-cache-dir", str(tmp / "cache")]
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    cfg = config_from_args(build_parser().parse_args(argv + extra))
    parallel.init_distributed(cfg.parallel.distributed_timeout_minutes)
    trainer = Trainer(cfg)
    trainer.setup()
    for _ in range(args.warmup):
        trainer.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = model_flops = 0.0
    for _ in range(args.steps):
        m = trainer.step()
        tokens += m["tokens"]
        model_flops += m["model_flops"]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    world = dist.get_world_size()
    tflops = flops.tflops_per_gpu(model_flops, seconds, world)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "ffn", "heads", "kv_heads")},
        "vocab": args.vocab,
        "seq_length": args.seq_length,
        "pairs_per_step": args.global_batch_size,
        "lengths": args.lengths,
        "extra_flags": extra,
        "tokens_per_step": tokens / args.steps,
        "model_flops_per_step": model_flops / args.steps,
        "precision": str(trainer.model[0].config.params_dtype),
        "attention_backend": attention_label(trainer.cfg),
        "steps": args.steps,
        "seconds_per_step": seconds / args.steps,
        "tokens_per_sec": tokens / seconds,
        "tflops_per_gpu": tflops,
        "peak_tflops": trainer.peak_tflops,
        "mfu": tflops / trainer.peak_tflops if trainer.peak_tflops else None,
        "peak_memory_gib": peak_memory_gib(),
    }
    if dist.get_rank() == 0:
        print(json.dumps(result))
    parallel.destroy_model_parallel()


if __name__ == "__main__":
    main()
