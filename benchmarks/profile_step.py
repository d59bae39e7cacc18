"""Where the time of one training step goes, on ``bench_vs_trl.py``'s workload (torch profiler).

The job of ``bench_vs_trl.py`` (its 7.4M-parameter Llama, random weights, 256 long-tailed pairs
from ``synthetic.py``, 4 pairs per step in micro-batches of 2, fp32, 2 threads), one process,
``megatron-simpo train``'s own code path (the CLI's parser, ``Trainer.setup``, ``Trainer.step``
and the loop's per-iteration stop check). After ``--warmup`` untimed steps, ``--steps`` steps run
under ``torch.profiler``; each operator's self time is attributed to the innermost of the groups
below that encloses it (so the rows add up to the step), and the table prints ms per step::

    .venv/bin/python benchmarks/profile_step.py                    # current defaults
    .venv/bin/python benchmarks/profile_step.py --pack-pairs --prefix-sharing --fused-loss-head

Groups: ``matmul`` (aten mm/addmm/bmm/baddbmm/matmul/linear and SDPA kernels, forward and
backward), ``collectives`` (gloo all-reduce/broadcast/...), ``host syncs`` (``.item()``,
``.tolist()``, ``.cpu()``; on CPU they cost only their own time, on a GPU each is a stall),
and the ranges wrapped here without touching the project's code: ``collation`` (the batcher's
Python packing and tensor building), ``mask building`` (the packing mask and SDPA's per-layer
mask preparation), ``non-finite check``, ``optimizer step`` (grad norm, clip, Adam), ``loss``
(log-probs and the objective, ``batch_loss.loss_func``), ``reports`` (metric reduction,
throughput, stop check). Everything else (elementwise ops, norms, RoPE, autograd bookkeeping,
the schedule's Python) is ``other``. Extra flags go to ``megatron-simpo train``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import BETA, GAMMA, LR, MODEL, make_pairs  # noqa: E402

MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::addmm_",
    "aten::addbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_backward",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_efficient_attention_backward",
    "aten::_flash_attention_forward",
    "aten::_flash_attention_backward",
}
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense"}
GROUPS = (
    "matmul",
    "collectives",
    "host syncs",
    "collation",
    "mask building",
    "non-finite check",
    "optimizer step",
    "loss",
    "reports",
    "other",
)
PREFIX = "prof::"


def _wrap(obj, name: str, group: str) -> None:
    """Replaces ``obj.name`` by the same callable inside ``record_function(PREFIX + group)``."""
    import torch

    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        with torch.profiler.record_function(PREFIX + group):
            return fn(*a, **k)

    setattr(obj, name, wrapped)


def instrument(trainer) -> dict[str, int]:
    """Wraps the groups' entry points; returns the host-sync call counters."""
    import torch

    from megatron_simpo import attention, batch_loss, report, run_control, step
    from megatron_simpo.data import batching, packing

    _wrap(trainer.batcher, "micro_batches", "collation")
    _wrap(packing, "attention_mask_from", "mask building")
    _wrap(step, "attention_mask_from", "mask building")
    if hasattr(step, "grads_are_finite"):
        _wrap(step, "grads_are_finite", "non-finite check")
    _wrap(trainer.optimizer, "step", "optimizer step")
    _wrap(batch_loss, "loss_func", "loss")
    _wrap(step.batch_loss, "loss_func", "loss")
    _wrap(step, "reduce_reports", "reports")
    import megatron_simpo.trainer as trainer_mod

    _wrap(trainer_mod.report, "throughput_and_memory", "reports")
    _wrap(run_control.StopControl, "should_stop", "reports")
    for fname in ("prepare_mask", "_allowed"):
        if hasattr(attention, fname):
            _wrap(attention, fname, "mask building")
    del batching, report
    counts: dict[str, int] = defaultdict(int)
    for meth in ("tolist", "cpu", "item"):
        orig = getattr(torch.Tensor, meth)

        def synced(self, *a, _orig=orig, _meth=meth, **k):
            counts[_meth] += 1
            with torch.profiler.record_function(PREFIX + "host syncs"):
                return _orig(self, *a, **k)

        setattr(torch.Tensor, meth, synced)
    return counts


def group_of(ev) -> str | None:
    """The group an event starts (None: it belongs to its parent's)."""
    if ev.name in MATMUL_OPS:
        return "matmul"
    if ev.name in SYNC_OPS:
        return "host syncs"
    low = ev.name.lower()
    if "gloo" in low or "c10d::" in low or "all_reduce" in low or "broadcast" in low:
        return "collectives"
    if ev.name.startswith(PREFIX):
        return ev.name[len(PREFIX) :]
    return None


def breakdown(events, step_name: str, top: dict | None = None) -> tuple[dict[str, float], float]:
    """Self CPU time (us) per group over the events under ``step_name`` ranges, and their total
    (``top``, if given, gets the self time per ``(group, operator)``)."""
    totals: dict[str, float] = defaultdict(float)
    whole = 0.0
    for ev in events:
        chain, e, inside = [], ev, False
        while e is not None:
            chain.append(e)
            if e.name == step_name:
                inside = True
                break
            e = e.cpu_parent
        if not inside:
            continue
        if ev.name == step_name:
            whole += ev.cpu_time_total
        group = next((g for g in map(group_of, chain) if g is not None), "other")
        totals[group] += ev.self_cpu_time_total
        if top is not None:
            top[(group, ev.name)] += ev.self_cpu_time_total
    return totals, whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--num-pairs", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", help="write the breakdown here")
    ap.add_argument("--trace", help="write a Chrome trace here")
    ap.add_argument("--top", type=int, default=0, help="also list the N costliest operators")
    args, extra = ap.parse_known_args()

    import torch

    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile, record_function

    from megatron_simpo import cli, parallel
    from megatron_simpo.data import prepare_for_run
    from megatron_simpo.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("MEGATRON_SIMPO_CACHE", str(work / "cache"))
        hf = {
            **MODEL,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
        }
        (work / "config.json").write_text(json.dumps(hf))
        with open(work / "pairs.jsonl", "w") as f:
            for p in make_pairs(args.num_pairs, args.seq_length, args.seed):
                f.write(json.dumps(p) + "\n")
        argv = [
            "train",
            "--model-config",
            str(work / "config.json"),
            "--data-path",
            str(work / "pairs.jsonl"),
            "--data-schema",
            "pretokenized",
            "--truncation-rule",
            "trl-1",
            "--seq-length",
            str(args.seq_length),
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "4",
            "--train-iters",
            str(args.warmup + args.steps),
            "--lr",
            str(LR),
            "--lr-decay-style",
            "constant",
            "--clip-grad",
            "1.0",
            "--beta",
            str(BETA),
            "--simpo-gamma",
            str(GAMMA),
            "--precision",
            "fp32",
            "--seed",
            str(args.seed),
            *extra,
        ]
        cfg = cli.config_from_args(cli.build_parser().parse_args(argv))
        cfg.validate(world_size=1)
        prepare_for_run(cfg)
        parallel.init_distributed(cfg.parallel.distributed_timeout_minutes)
        trainer = Trainer(cfg)
        trainer.setup()
        start = time.time()
        for _ in range(args.warmup):
            trainer.step()
            trainer.stops.should_stop(start)
        counts = instrument(trainer)
        counts.clear()
        wall = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                t = time.perf_counter()
                with record_function("profile_step"):
                    trainer.step()
                    trainer.stops.should_stop(start)
                wall.append(time.perf_counter() - t)
        parallel.destroy_model_parallel()
    top: dict = defaultdict(float)
    totals, whole = breakdown(prof.events(), "profile_step", top)
    n = args.steps
    flags = " ".join(extra) or "(defaults)"
    print(f"\nprofile of {n} steps after {args.warmup}, flags: {flags}")
    print(f"wall {1e3 * sum(wall) / n:.1f} ms/step (unprofiled runs are ~5-10% faster)")
    print(f"{'group':<18} {'ms/step':>9} {'share':>7}")
    rows = {g: totals.get(g, 0.0) / n / 1e3 for g in GROUPS}
    for g, ms in rows.items():
        print(f"{g:<18} {ms:>9.2f} {ms / (whole / n / 1e3):>7.1%}")
    print(f"{'step (profiled)':<18} {whole / n / 1e3:>9.2f}")
    syncs = ", ".join(f"{k} {v / n:.1f}" for k, v in sorted(counts.items()))
    print(f"host-sync calls per step: {syncs or 'none'}")
    for (g, name), us in sorted(top.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {us / n / 1e3:>8.2f} ms  {g:<16} {name}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"flags": extra, "ms_per_step": rows, "syncs": dict(counts)}, indent=1)
        )


if __name__ == "__main__":
    main()
