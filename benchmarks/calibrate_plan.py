"""Calibrate the memory planner against measured peaks of real CPU training runs.

Runs ``megatron-simpo train`` (torchrun, fp32, gloo) on a small Llama with fixed-length synthetic
pairs, in a few layouts, measures the memory of each rank's process and prints it next to
``megatron_simpo.plan``'s prediction for the same model, layout and sequence length::

    .venv/bin/python benchmarks/calibrate_plan.py            # all cases, about 2-4 min on 2 cores
    .venv/bin/python benchmarks/calibrate_plan.py --cases tp1,tp1-full --json out.json

How memory is measured (CPU has no allocator statistics): resident set size (RSS, psutil) at phase
boundaries and the kernel's high-water mark ``ru_maxrss``, with ``MALLOC_MMAP_THRESHOLD_=65536``
so glibc serves every tensor larger than 64 KiB by mmap and unmaps it on free: RSS then follows
the live tensors instead of keeping freed heap. Everything is relative to the RSS just before the
model is built (Python, torch, Megatron-Core, gloo and the data already loaded), so the import
baseline is excluded:

* weights     = RSS after ``build_model`` - before
* gradients   = RSS after the DDP wrap (the fp32 grad buffer) - after ``build_model``
* optimizer   = RSS after the first step - after the DDP wrap: Adam state (and, with local
                attention, the persistent score buffer; the prediction adds it here too)
* peak        = max ``ru_maxrss`` over the run - before (a step with Adam state allocated)
* dynamic     = peak - static (RSS after the last step): activations + loss head + transients

The planner is run with ``--precision fp32 --kernels torch`` (plain torch RMSNorm/SwiGLU on CPU),
``--attention flash`` for SDPA (the CPU default) or ``unfused`` for ``--attention-backend local``,
and no fragmentation/overhead margin, so the numbers compare one to one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1e6

#: The calibration model: Llama-shaped (GQA, SwiGLU), big enough that the model's memory dwarfs
#: RSS noise (a few MB), small enough for a 2-core machine.
MODEL = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    make_vocab_size_divisible_by=128,
)
SEQ = 512  # tokens per sequence (prompt + response); the padded input length is SEQ - 1

#: name -> (processes, extra train flags, planner layout overrides; "attention" is the planner's
#: --attention: SDPA, the default on CPU, keeps no score matrix like flash attention)
CASES: dict[str, tuple[int, list[str], dict]] = {
    # A 1-layer, width-16 model: its static memory is ~4 MB, so what the RSS adds beyond the
    # prediction is the fixed per-process cost of training (code pages of the backward and
    # optimizer kernels touched for the first time, allocator state): the CPU analogue of
    # --overhead-gb, subtracted from the other cases in the "+overhead" columns.
    "overhead": (
        1,
        [],
        {
            "model": dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
            )
        },
    ),
    "tp1": (1, [], {}),
    "tp1-local": (1, ["--attention-backend", "local"], {"attention": "unfused"}),
    "tp1-full": (
        1,
        ["--recompute-granularity", "full", "--recompute-method", "uniform"]
        + ["--recompute-num-layers", "1"],
        {"recompute": "full"},
    ),
    "tp2-sp": (
        2,
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        {"tp": 2, "sequence_parallel": True},
    ),
    "dp2-distopt": (2, ["--use-distributed-optimizer"], {"dp": 2, "distributed_optimizer": True}),
}


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    """Fixed-length pretokenised pairs: every sequence is exactly SEQ tokens."""
    rng = random.Random(seed)
    vocab = MODEL["vocab_size"]
    with open(path, "w") as f:
        for _ in range(n):
            prompt = [1] + [rng.randrange(3, vocab) for _ in range(SEQ // 4 - 1)]
            resp = [[rng.randrange(3, vocab) for _ in range(SEQ - len(prompt))] for _ in range(2)]
            row = {"prompt_ids": prompt, "chosen_ids": resp[0], "rejected_ids": resp[1]}
            f.write(json.dumps(row) + "\n")


def train_flags(
    data: Path, micro_batch: int, global_batch: int, iters: int, model: dict
) -> list[str]:
    flags = ["--config", str(REPO / "examples/tiny_pretok.yaml"), "--data-path", str(data)]
    for k, v in model.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    flags += ["--seq-length", str(SEQ), "--micro-batch-size", str(micro_batch)]
    flags += ["--global-batch-size", str(global_batch), "--train-iters", str(iters)]
    return flags + ["--precision", "fp32", "--log-interval", str(iters)]


def worker(out: str, argv: list[str]) -> None:
    """Inside torchrun: trains with RSS probes around the phases; writes OUT.rank<r>.json."""
    import psutil

    from megatron_simpo import cli
    from megatron_simpo import train as train_mod

    proc = psutil.Process()
    rec: dict[str, list[float] | float] = {"after_step": [], "peak_after_step": []}

    def rss() -> float:
        gc.collect()
        return float(proc.memory_info().rss)

    def peak() -> float:
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def probe(fn, before: str | None, after: str):
        def wrapped(*a, **k):
            if before:
                rec[before] = rss()
                rec["peak_" + before] = peak()
            result = fn(*a, **k)
            rec[after] = rss()
            return result

        return wrapped

    train_mod.build_model = probe(train_mod.build_model, "before_model", "after_model")
    train_mod.wrap_ddp = probe(train_mod.wrap_ddp, None, "after_ddp")
    step = train_mod.Trainer.step

    def probed_step(self, *a, **k):
        result = step(self, *a, **k)
        rec["after_step"].append(rss())  # type: ignore[union-attr]
        rec["peak_after_step"].append(peak())  # type: ignore[union-attr]
        return result

    train_mod.Trainer.step = probed_step
    args = cli.build_parser().parse_args(["train", *argv])
    cfg = cli.config_from_args(args)
    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    train_mod.run(cfg)
    Path(f"{out}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(rec))


def measured(rec: dict) -> dict[str, float]:
    base = rec["before_model"]
    static = rec["after_step"][-1] - base
    peak = max(rec["peak_after_step"]) - base
    return {
        "weights": rec["after_model"] - base,
        "gradients": rec["after_ddp"] - rec["after_model"],
        "optimizer": rec["after_step"][0] - rec["after_ddp"],
        "static": static,
        "dynamic": peak - static,
        "peak": peak,
        "import_peak_above_base": rec["peak_before_model"] - base,
    }


def predicted(nproc: int, overrides: dict, micro_batch: int, global_batch: int) -> dict:
    from megatron_simpo import plan
    from megatron_simpo.config import ModelConfig

    overrides = dict(overrides)
    attention = overrides.pop("attention", "flash")
    m = ModelConfig(**{**MODEL, **overrides.pop("model", {})})
    job = plan.Job(
        nodes=1,
        gpus_per_node=nproc,
        gpu_memory_gb=1e9,
        seq_length=SEQ - 1,
        global_batch_size=global_batch,
        precision="fp32",
        attention=attention,
        kernels="torch",
        fragmentation=0.0,
        overhead_gb=0.0,
    )
    lay = dict(
        tp=1,
        pp=1,
        dp=1,
        micro_batch_size=micro_batch,
        distributed_optimizer=False,
        recompute="none",
        sequence_parallel=False,
    )
    lay.update(overrides)
    lay["num_microbatches"] = global_batch // (micro_batch * lay["dp"])
    b = plan.breakdown(m, plan.Layout(**lay), job)
    # The unfused-attention score buffer is persistent (allocated at the first forward), so the
    # RSS after a step holds it: compare it with the static part.
    heads = m.num_attention_heads / lay["tp"]
    workspace = 2 * micro_batch * heads * (SEQ - 1) ** 2 * 4 if attention == "unfused" else 0.0
    static = b["weights"] + b["gradients"] + b["optimizer"] + workspace
    return {
        "weights": b["weights"],
        "gradients": b["gradients"],
        "optimizer": b["optimizer"] + workspace,
        "static": static,
        "dynamic": b["activations"] - workspace + b["loss_head"],
        "peak": b["total"],
        "activations": b["activations"],
        "loss_head": b["loss_head"],
        "workspace": workspace,
    }


def run_case(name: str, tmp: Path, micro_batch: int, global_batch: int, iters: int) -> dict:
    nproc, extra, overrides = CASES[name]
    data = tmp / "pairs.jsonl"
    if not data.exists():
        write_pairs(data, 64)
    out = tmp / name
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(max(1, 2 // nproc)),
        "MEGATRON_SIMPO_CACHE": str(tmp / "cache"),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-port", str(29000 + random.randrange(2000)), __file__, "--worker", str(out)]
    model = {**MODEL, **overrides.get("model", {})}
    cmd += ["--", *train_flags(data, micro_batch, global_batch, iters, model), *extra]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{name}: training failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.rank{i}.json").read_text()) for i in range(nproc)]
    meas = [measured(rec) for rec in ranks]
    worst = max(meas, key=lambda x: x["peak"])
    return {
        "case": name,
        "processes": nproc,
        "measured": worst,
        "predicted": predicted(nproc, overrides, micro_batch, global_batch),
    }


def report(results: list[dict]) -> str:
    """Measured / predicted / error of each case; "+overhead" adds the fixed per-process cost
    measured by the "overhead" case (when it ran) to the prediction."""
    over = next((r for r in results if r["case"] == "overhead"), None)
    fixed = over["measured"]["static"] - over["predicted"]["static"] if over else 0.0
    keys = ["weights", "gradients", "optimizer", "static", "dynamic", "peak"]
    lines = [
        f"model {MODEL}, {SEQ} tokens/sequence, fp32; MB per rank (worst rank): "
        "measured (RSS) / predicted (plan) / error of the prediction",
        f"fixed per-process overhead (case 'overhead': measured - predicted static): "
        f"{fixed / MB:.1f} MB",
        f"{'case':<12} " + " ".join(f"{k:>22}" for k in keys) + f" {'peak+overhead':>22}",
    ]

    def cell(me: float, pr: float) -> str:
        return f"{me / MB:>6.1f}/{pr / MB:>6.1f} {(pr - me) / me:>+7.1%}"

    for r in results:
        me, pr = r["measured"], r["predicted"]
        cells = [cell(me[k], pr[k]) for k in keys] + [cell(me["peak"], pr["peak"] + fixed)]
        lines.append(f"{r['case']:<12} " + " ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch")
    ap.add_argument("--global-batch-size", type=int, default=2, help="pairs per step")
    ap.add_argument("--train-iters", type=int, default=3, help="steps (peak taken over all)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--report", help="print the table of a --json file written before (same batch flags)"
    )
    args, rest = ap.parse_known_args()
    if args.report:  # re-predict with the current planner, against the stored measurements
        results = json.loads(Path(args.report).read_text())
        for r in results:
            nproc, _, overrides = CASES[r["case"]]
            r["predicted"] = predicted(
                nproc, overrides, args.micro_batch_size, args.global_batch_size
            )
        print(report(results))
        return
    if args.worker:
        worker(args.worker, [a for a in rest if a != "--"])
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            results.append(
                run_case(
                    name, Path(tmp), args.micro_batch_size, args.global_batch_size, args.train_iters
                )
            )
            print(report(results[-1:]).splitlines()[-1], flush=True)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
