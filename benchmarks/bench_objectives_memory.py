"""Peak memory and step time: SimPO vs DPO from precomputed reference log-probs vs DPO with a
resident reference model, on the same small CPU job.

    .venv/bin/python benchmarks/bench_objectives_memory.py                 # defaults below
    .venv/bin/python benchmarks/bench_objectives_memory.py --hidden 768 --layers 12 --json out.json

Each variant runs in its own process (so its peak resident set size is its own), builds the same
Llama-shaped Megatron-Core GPT through ``Trainer`` (fp32, SDPA, AdamW, one gloo rank) on the same
long-tailed pairs (``synthetic.py``) and times ``--steps`` optimizer steps after one warm-up:

* ``simpo``: ``--loss simpo`` (no reference anywhere).
* ``dpo-precomputed``: ``--loss dpo`` reading the reference log-probs from the prepared data's
  reference columns, as ``megatron-simpo score-reference`` leaves them; they come from a separate
  one-off scoring process (``score``: the reference model's forward over all pairs, timed and
  reported too).
* ``dpo-resident``: ``--loss dpo`` with the reference model built in the same process (weights
  only: no gradients or optimizer state) and run forward on each step's micro-batches before the
  policy's forward-backward -- the layout of trainers that keep the reference in memory.

The reference is the policy's initial weights plus seeded noise, saved by ``score`` and loaded by
``dpo-resident``, so both DPO variants train on the same reference log-probs; their first-step
losses are checked to agree. Peak memory is the process's peak RSS (``report.peak_memory_gib``,
what ``memory/peak_gib`` logs on CPU), which includes the Python/torch baseline of every variant
alike; the differences between variants are what the reference costs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common as common

VARIANTS = ("simpo", "dpo-precomputed", "dpo-resident")


def run_config(args, data: Path, objective: str):
    from megatron_simpo.config import RunConfig

    return RunConfig.from_dict(
        {
            "model": common.tiny_llama(args),
            "loss": {"objective": objective},
            "optim": {"lr": 1e-6},
            "data": {"data_path": str(data), "data_schema": "pretokenized"},
            "train": common.fp32_train(args),
        }
    )


def param_bytes(chunks) -> int:
    return sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())


def with_reference_columns(cfg, work: Path, variant: str) -> str:
    """``work/pairs.jsonl`` prepared as a run prepares it, with the ``score`` variant's reference
    log-probs (``reference_logps.json``, in the same pair order) as its reference columns, as
    ``megatron-simpo score-reference`` writes them. Returns the prepared directory."""
    from megatron_simpo.data import _options
    from megatron_simpo.data.prepare import (
        PreparedPairs,
        prepare,
        tokenisation_of,
        write_reference_columns,
    )

    dest = work / f"prepared-{variant}"
    prepare(str(work / "pairs.jsonl"), dest, tokenizer=None, opts=_options(cfg), quiet=True)
    refs = json.loads((work / "reference_logps.json").read_text())
    pairs = PreparedPairs(dest)
    columns = {
        "ref_chosen_logps": [c for c, _ in refs],
        "ref_rejected_logps": [r for _, r in refs],
        "ref_chosen_tokens": [len(p.chosen_ids) for p in pairs],
        "ref_rejected_tokens": [len(p.rejected_ids) for p in pairs],
    }
    record = {"checkpoint": str(work / "reference"), "tokenisation": tokenisation_of(pairs.info)}
    write_reference_columns(dest, columns, record)
    return str(dest)


def reference_logps(model, micro_batches, seq_len, cfg) -> None:
    """Attaches ``ref_logps`` [2b] to each micro-batch: the reference model's summed log-probs
    (forward only, the SimPO metrics' ``logps/*_sum``)."""
    import torch

    from megatron_simpo.config import LossConfig
    from megatron_simpo.step import run_forward_backward

    with torch.no_grad():
        reports = run_forward_backward(
            model, micro_batches, seq_len, LossConfig(), cfg.model.vocab_size, forward_only=True
        )
    for mb, r in zip(micro_batches, reports):
        pp = r["per_pair"]
        mb["ref_logps"] = torch.cat([pp["logps/chosen_sum"], pp["logps/rejected_sum"]]).double()


def child(args) -> dict:
    from megatron_simpo import parallel

    parallel.init_distributed()
    import torch

    from megatron_simpo import checkpointing
    from megatron_simpo.evaluate import score_pairs
    from megatron_simpo.model import build_model
    from megatron_simpo.report import peak_memory_gib
    from megatron_simpo.step import train_step
    from megatron_simpo.train import Trainer

    work = Path(args.work)
    variant = args.variant
    objective = "simpo" if variant in ("simpo", "score") else "dpo"
    cfg = run_config(args, work / "pairs.jsonl", objective)
    if objective == "dpo":  # both DPO variants read the columns (the resident one recomputes)
        cfg.data.data_path = with_reference_columns(cfg, work, variant)
    trainer = Trainer(cfg)
    trainer.setup()
    out: dict = {"variant": variant, "policy_param_gib": param_bytes(trainer.model) / 2**30}
    if variant == "score":  # the one-off scoring pass of the reference model
        ref = build_model(cfg)
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for chunk, policy in zip(ref, trainer.model):
                for p, q in zip(chunk.parameters(), policy.parameters()):
                    p.copy_(q + 0.02 * torch.randn(q.shape, generator=g))
        checkpointing.save_checkpoint(work / "reference", 0, ref)
        start = time.perf_counter()
        rows = score_pairs(ref, cfg, trainer.batcher.pairs)
        out["score_seconds"] = time.perf_counter() - start
        refs = [(r["logps/chosen_sum"], r["logps/rejected_sum"]) for r in rows]
        (work / "reference_logps.json").write_text(json.dumps(refs))
        out["peak_gib"] = peak_memory_gib()
        return out
    ref_model = None
    if variant == "dpo-resident":
        ref_model = build_model(cfg)
        checkpointing.load_checkpoint(str(work / "reference"), ref_model)
        for chunk in ref_model:
            chunk.requires_grad_(False)
            chunk.eval()
        out["reference_param_gib"] = param_bytes(ref_model) / 2**30
    out["setup_peak_gib"] = peak_memory_gib()

    def step(it: int) -> float:
        micro_batches, seq_len = trainer.batcher.micro_batches(it)
        if ref_model is not None:
            reference_logps(ref_model, micro_batches, seq_len, cfg)
        m = train_step(
            trainer.model,
            trainer.optimizer,
            trainer.scheduler,
            micro_batches,
            seq_len,
            cfg.loss,
            cfg.model.vocab_size,
        )
        return m["loss"]

    out.update(common.timed_steps(step, args.steps))
    out.update(peak_gib=peak_memory_gib(), threads=torch.get_num_threads())
    parallel.destroy_model_parallel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_job_args(ap)
    common.add_variant_args(ap)
    args = ap.parse_args()
    if args.variant:
        common.print_result(child(args))
        return
    work = Path(tempfile.mkdtemp(prefix="bench_objectives_"))
    n_pairs = args.global_batch_size * (args.steps + 1)
    common.write_pairs(work / "pairs.jsonl", n_pairs, args.seq_length, args.vocab, args.seed)
    results = common.run_variants(__file__, args, ("score", *VARIANTS), work)
    pre, res = results["dpo-precomputed"], results["dpo-resident"]
    # Same weights, same reference log-probs: only the reference's float path differs (scored
    # per micro-batch of the eval layout vs this step's micro-batches).
    drift = abs(pre["losses"][0] - res["losses"][0])
    assert drift < 1e-4, f"DPO first-step losses differ: {pre['losses'][0]} vs {res['losses'][0]}"
    base = results["simpo"]
    print(
        f"{common.job_summary(args, base['threads'])}; policy weights "
        f"{base['policy_param_gib']:.3f} GiB"
    )
    print(f"{'variant':<17}{'peak RSS GiB':>13}{'vs simpo':>10}{'s/step':>9}{'vs simpo':>10}")
    for v in VARIANTS:
        r = results[v]
        sec, speed = r["seconds_per_step"], r["seconds_per_step"] / base["seconds_per_step"]
        print(
            f"{v:<17}{r['peak_gib']:>13.3f}{r['peak_gib'] - base['peak_gib']:>+10.3f}"
            f"{sec:>9.2f}{speed:>9.2f}x"
        )
    sc = results["score"]
    print(
        f"one-off scoring of {n_pairs} pairs by the reference (score-reference's work): "
        f"{sc['score_seconds']:.2f} s; first-step DPO loss precomputed vs resident: "
        f"{pre['losses'][0]:.6f} vs {res['losses'][0]:.6f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
