"""Runs named layouts of the integration matrix inside ONE torch.distributed world.

    torchrun --nproc-per-node N tests/distributed/layout_runner.py --out DIR --data FILE L1 L2 ...

Megatron-Core is imported once per process; between layouts only its model-parallel groups are
rebuilt. A reference layout (no reference of its own) initialises fresh weights and writes them to
``DIR/<name>/init`` for the layouts compared with it (directly or through another layout, as the
bf16 layouts through ``tp1_bf16``); every layout writes ``metrics.json``, its step-1 fp32 main
gradients (``grads/``, unless the distributed optimizer shards them) and its weights after the
last step (``weights/``) as dist checkpoints, which ``tests/test_layouts.py`` compares.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from layouts import (  # noqa: E402
    LAYOUTS,
    SWEEP,
    SWEEP_LAYOUTS,
    config_dict,
    init_of,
    synthetic_reference,
)

from megatron_simpo import parallel  # noqa: E402

parallel.init_distributed()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_simpo import batch_loss, checkpointing, moe  # noqa: E402
from megatron_simpo.batch_loss import reduce_reports  # noqa: E402
from megatron_simpo.config import LossConfig, RunConfig  # noqa: E402
from megatron_simpo.data import Subset, _options  # noqa: E402
from megatron_simpo.data.prepare import (  # noqa: E402
    PreparedPairs,
    prepare,
    tokenisation_of,
    write_reference_columns,
)
from megatron_simpo.evaluate import score_pairs  # noqa: E402
from megatron_simpo.step import run_forward_backward  # noqa: E402
from megatron_simpo.train import Trainer  # noqa: E402


def directional_derivative(trainer: Trainer, eps: float = 1e-3) -> dict[str, float]:
    """Central difference of the step-1 loss along d = g/|g|, to compare with |g|.

    Cross-layout equality cannot see an error that scales every layout's gradient alike (say,
    dividing by the pair count twice); this pins the reference's gradient to the loss it
    reports. Single-process only (the reference layouts).
    """
    # Trainable ones (LoRA: the adapters; the frozen base has no gradient).
    params = [p for chunk in trainer.model for p in chunk.parameters() if p.requires_grad]
    grads = [p.main_grad.clone() for p in params]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    micro_batches, seq_len = trainer.batcher.micro_batches(0)

    def loss_at(scale: float) -> float:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=scale / norm)
        moe.reset_aux_loss()
        reports = run_forward_backward(
            trainer.model,
            micro_batches,
            seq_len,
            trainer.cfg.loss,
            trainer.cfg.model.vocab_size,
            forward_only=True,
        )
        # MoE: the objective also holds coeff x the load-balancing loss (megatron_simpo/moe.py).
        config = trainer.model[0].config
        aux = moe.aux_loss_metrics(config, len(micro_batches)).get("moe/aux_loss", 0.0)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=scale / norm)
        return reduce_reports(reports)["loss"] + trainer.cfg.train.moe_aux_loss_coeff * aux

    slope = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    return {"grad_l2": norm, "fd_slope": slope}


def with_reference_columns(cfg: RunConfig, data: str, dest: Path) -> str:
    """``data`` prepared into ``dest`` as a run prepares raw data, with the
    :func:`layouts.synthetic_reference` log-probs as its reference columns, written as
    ``megatron-simpo score-reference`` writes them (rank 0; the others wait). Returns ``dest``."""
    if dist.get_rank() == 0:
        dest.parent.mkdir(parents=True, exist_ok=True)
        prepare(data, dest, tokenizer=None, opts=_options(cfg), quiet=True)
        pairs = [synthetic_reference(p) for p in PreparedPairs(dest)]
        columns = {
            "ref_chosen_logps": [p.ref_chosen_logp for p in pairs],
            "ref_rejected_logps": [p.ref_rejected_logp for p in pairs],
            "ref_chosen_tokens": [len(p.chosen_ids) for p in pairs],
            "ref_rejected_tokens": [len(p.rejected_ids) for p in pairs],
        }
        tokenisation = tokenisation_of(PreparedPairs(dest).info)
        record = {"checkpoint": "layouts.synthetic_reference", "tokenisation": tokenisation}
        write_reference_columns(dest, columns, record)
    dist.barrier()
    return str(dest)


def objective_sweep(trainer: Trainer, out: Path) -> dict[str, dict[str, float]]:
    """Forward and backward of every :data:`layouts.SWEEP` objective on the first global batch
    (with :func:`layouts.synthetic_reference` log-probs) at the current weights, no update: the
    reduced metrics per objective; the gradients go to ``out/<objective>/grads``."""
    batcher = copy.copy(trainer.batcher)
    batcher.pairs = [synthetic_reference(p) for p in trainer.batcher.pairs]
    micro_batches, seq_len = batcher.micro_batches(0)
    results = {}
    for key, fields in SWEEP.items():
        loss_cfg = LossConfig(**fields)
        loss_cfg.validate()
        for chunk in trainer.model:
            chunk.zero_grad_buffer()
        reports = run_forward_backward(
            trainer.model, micro_batches, seq_len, loss_cfg, trainer.cfg.model.vocab_size
        )
        with checkpointing.grads_as_params(trainer.model):
            checkpointing.save_tensors(out / key / "grads", trainer.model)
        results[key] = reduce_reports(reports, loss_cfg)
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    moe.reset_aux_loss()  # nothing of the sweep reaches step 1's metrics
    return results


def _names(tensors) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})


def dtypes_of(trainer: Trainer) -> dict[str, list[str]]:
    """Dtypes of what must stay fp32 under bf16 params: the DDP gradient buffers, each
    parameter's ``main_grad`` and the optimizer's main (master) parameters."""
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    buffers = [b.grad_data for chunk in trainer.model for b in chunk.buffers]
    inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    main = [p for o in inner for g in o.optimizer.param_groups for p in g["params"]]
    return {
        "params": _names(params),
        "main_grad": _names(p.main_grad for p in params if p.requires_grad),
        "grad_buffers": _names(buffers),
        "main_params": _names(main),
    }


def record_loss_dtypes(seen: dict[str, set]) -> None:
    """Wraps the loss function to record the dtypes of what it hands the schedule (the loss
    that backward starts from) and of the per-pair log-probs."""
    original = batch_loss.loss_func

    def recording(*args, **kwargs):
        loss, count, report = original(*args, **kwargs)
        seen.setdefault("loss", set()).add(str(loss.dtype).removeprefix("torch."))
        logps = report["per_pair"]["logps/chosen"]
        seen.setdefault("logps", set()).add(str(logps.dtype).removeprefix("torch."))
        return loss, count, report

    batch_loss.loss_func = recording


LOSS_DTYPES: dict[str, set] = {}
record_loss_dtypes(LOSS_DTYPES)


def randomize_adapters(trainer: Trainer) -> None:
    """Non-zero B (it starts at zero) and DoRA magnitudes off ``||W||``, so that step 1 already
    has gradients for every adapter tensor (fp32 single process: the optimizer's params are the
    model's)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in trainer.model[0].named_parameters():
            if n.endswith("lora_B"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif n.endswith("lora_magnitude"):
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


def counts_of(trainer: Trainer) -> dict[str, int]:
    """This rank's element counts: all parameters, trainable ones, those with a gradient buffer,
    and the optimizer's main parameters (the distributed optimizer's: this DP rank's shard)."""
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "adapters": sum(
            p.numel() for c in trainer.model for n, p in c.named_parameters() if ".lora." in n
        ),
        "buffered": sum(  # dense and expert-parallel (reduced over expert-DP) buffers
            p.numel()
            for chunk in trainer.model
            for b in (*chunk.buffers, *getattr(chunk, "expert_parallel_buffers", ()))
            for p in b.params
        ),
        "optimizer": sum(
            p.numel() for o in inner for grp in o.optimizer.param_groups for p in grp["params"]
        ),
        "dp": dist.get_world_size() // (cfg_tp_pp(trainer.cfg)),
    }


def cfg_tp_pp(cfg: RunConfig) -> int:
    return cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size


def run_layout(name: str, out: Path, data: str) -> None:
    world, ref = LAYOUTS[name].world, LAYOUTS[name].ref
    assert dist.get_world_size() == world, f"{name} needs {world} ranks"
    load = str(out / init_of(name) / "init") if ref else None
    cfg = RunConfig.from_dict(config_dict(name, data, load))
    if cfg.loss.needs_reference:  # read from the columns, as after `score-reference`
        cfg.data.data_path = with_reference_columns(cfg, data, out / name / "data")
    trainer = Trainer(cfg)
    start = time.perf_counter()
    trainer.setup()
    if ref is None:
        if cfg.lora.lora_rank is not None:
            randomize_adapters(trainer)
        checkpointing.save_checkpoint(out / name / "init", 0, trainer.model)
    distopt = cfg.parallel.use_distributed_optimizer
    # Forward-only scoring (``evaluate`` / held-out eval) from the same initial weights.
    rows = score_pairs(trainer.model, cfg, Subset(trainer.batcher.pairs, list(range(12))))
    scored: list = [None] * dist.get_world_size()
    dist.all_gather_object(scored, rows)
    eval_rows = next(r for r in scored if r is not None)

    checks: dict = {}
    if name in SWEEP_LAYOUTS:
        checks["sweep"] = objective_sweep(trainer, out / name / "sweep")
    LOSS_DTYPES.clear()

    def export_grads() -> None:
        with checkpointing.grads_as_params(trainer.model):
            checkpointing.save_tensors(out / name / "grads", trainer.model)
        if ref is None:
            checks.update(directional_derivative(trainer))

    history = []
    step_times = []
    for i in range(cfg.train.train_iters):
        t0 = time.perf_counter()
        history.append(trainer.step(export_grads if i == 0 and not distopt else None))
        step_times.append(time.perf_counter() - t0)
    checkpointing.save_tensors(out / name / "weights", trainer.model)
    # The loss lives on the last pipeline stage, rank 0 writes: union over the world.
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {**dtypes_of(trainer), **LOSS_DTYPES})
    merged: dict[str, set] = {}
    for g in gathered:
        for k, v in g.items():
            merged.setdefault(k, set()).update(v)
    dtypes = {k: sorted(v) for k, v in merged.items()}
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, counts_of(trainer))
    if dist.get_rank() == 0:
        (out / name / "metrics.json").write_text(
            json.dumps(
                {
                    "history": history,
                    "eval_losses": [r["loss"] for r in eval_rows],
                    "step_times": step_times,
                    "grads_saved": not distopt,
                    "dtypes": dtypes,
                    "counts": counts,
                    **checks,
                    "wall": time.perf_counter() - start,
                }
            )
        )
    parallel.destroy_model_parallel()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("layouts", nargs="+")
    args = ap.parse_args()
    for name in args.layouts:
        run_layout(name, Path(args.out), args.data)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
