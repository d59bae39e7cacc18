"""Scaffolding the CPU benchmarks share: the small Llama-shaped job, its flags, the synthetic
pairs file, timed steps and the one-process-per-variant driver (each variant's peak RSS is its
own). Imported as ``from _common import ...`` (the benchmarks run as scripts from this folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from synthetic import long_tailed_pairs


def add_job_args(
    ap: argparse.ArgumentParser,
    *,
    seq_length: int = 256,
    global_batch_size: int = 8,
    micro_batch_size: int = 4,
    hidden: int = 512,
    layers: int = 8,
    vocab: int = 8192,
    steps: int = 3,
    json_help: str = "also write the results here",
) -> None:
    """The flags of the benchmark job: ``--seq-length``, ``--global-batch-size``,
    ``--micro-batch-size``, ``--steps`` (timed, after one warm-up), ``--hidden``, ``--layers``,
    ``--vocab``, ``--seed``, ``--json``, with this benchmark's defaults."""
    ap.add_argument("--seq-length", type=int, default=seq_length)
    ap.add_argument("--global-batch-size", type=int, default=global_batch_size)
    ap.add_argument("--micro-batch-size", type=int, default=micro_batch_size)
    ap.add_argument("--steps", type=int, default=steps, help="timed steps (after 1 warm-up)")
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help=json_help)


def add_variant_args(ap: argparse.ArgumentParser) -> None:
    """The internal flags of one variant's process (:func:`run_variants`)."""
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)


def tiny_llama(args: argparse.Namespace) -> dict[str, Any]:
    """The ``model`` section of the job: Llama-shaped, 8 heads (2 KV heads), SwiGLU width
    ``8/3 hidden``."""
    return {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 8 // 3,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": args.seq_length,
    }


def fp32_train(args: argparse.Namespace, *, train_iters: bool = True) -> dict[str, Any]:
    """The ``train`` section of the job: fp32, SDPA, ``--steps`` + 1 iterations (without
    ``train_iters``: the config's default, for benchmarks that time forward-backward only)."""
    train = {
        "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "train_iters": args.steps + 1,
        "precision": "fp32",
        "attention_backend": "sdpa",
        "seed": args.seed,
    }
    if not train_iters:
        del train["train_iters"]
    return train


def write_pairs(path: Path, n: int, seq_length: int, vocab: int, seed: int) -> Path:
    """``n`` long-tailed synthetic pairs (``synthetic.py``) as a pre-tokenised JSONL file."""
    with path.open("w") as f:
        for row in long_tailed_pairs(n, seq_length, vocab, seed):
            f.write(json.dumps(row) + "\n")
    return path


def timed_steps(step: Callable[[int], float], steps: int) -> dict[str, Any]:
    """Runs ``step(it)`` (returning the step's loss) ``steps + 1`` times: the median time of
    all but the warm-up, and every loss."""
    times, losses = [], []
    for it in range(steps + 1):
        start = time.perf_counter()
        losses.append(step(it))
        times.append(time.perf_counter() - start)
    return {"seconds_per_step": statistics.median(times[1:]), "losses": losses}


def run_variants(
    script: str, args: argparse.Namespace, variants: Sequence[str], work: Path
) -> dict[str, dict]:
    """Runs ``script`` once per variant, in its own process, with ``args`` as flags plus
    ``--variant V --work DIR``; each prints ``RESULT {json}`` (:func:`print_result`). Exits with
    the variant's stderr tail if one fails."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None]
    results = {}
    for variant in variants:
        r = subprocess.run(
            [sys.executable, script, *flags, "--variant", variant, "--work", str(work)],
            capture_output=True,
            text=True,
        )
        lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not lines:
            sys.exit(f"{variant} failed:\n{r.stderr[-3000:]}")
        results[variant] = json.loads(lines[-1].removeprefix("RESULT "))
    return results


def print_result(result: dict) -> None:
    """What a variant's process prints for :func:`run_variants`."""
    print("RESULT " + json.dumps(result), flush=True)


def job_summary(args: argparse.Namespace, threads: int) -> str:
    """The first line of a report: the job's shape."""
    return (
        f"hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, seq_length "
        f"{args.seq_length}, {args.global_batch_size} pairs/step (micro-batch "
        f"{args.micro_batch_size}), fp32, {threads} threads, {args.steps} timed steps"
    )
