"""Preference metrics of a checkpoint on a preference file, without training.

    torchrun --nproc-per-node 2 -m megatron_simpo evaluate --load CKPT \\
        --data-path pairs.jsonl --beta 2.0 --gamma-beta-ratio 0.5 --output eval.json \\
        --tensor-model-parallel-size 2

Writes JSON with ``loss`` (the ``--loss`` objective over all pairs as one batch: weighted mean,
plus its NLL weight x ``nll_loss``), ``nll_loss`` (NLL of the chosen responses,
``--sft-reduction``), and, over the pairs of positive weight, the objective's metrics of
:mod:`megatron_simpo.metrics` (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` and their ``_sum``/``_mean``
counterpart, ORPO's ``log_odds_ratio``, ``log_odds_chosen``, ``length/chosen``,
``length/rejected``); ``num_pairs``; and ``per_pair`` (a list in file order of objects with
``loss`` (the pair's own unweighted loss), ``nll_loss`` (its chosen per-token mean NLL), the
metrics above, ``weight``, the DPO family's ``ref_logps/chosen``, ``ref_logps/rejected``, and
``row``: the pair's 0-based row in the source, since invalid rows (with --skip-invalid) and ties
are dropped) -- the names and meanings of the objective's TRL trainer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_simpo import checkpointing, defaults, parallel
from megatron_simpo.batch_loss import (
    REFERENCE_KEYS,
    mean_logps,
    objective_per_pair,
    pair_keys,
    scored_keys,
    summarize_totals,
)
from megatron_simpo.config import LossConfig, RunConfig
from megatron_simpo.data import Pair, collate, pairs_for, prepare_for_run
from megatron_simpo.data.packing import collate_packed, pack_rows, row_width
from megatron_simpo.model import build_model
from megatron_simpo.progress import progress
from megatron_simpo.step import run_forward_backward


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate_group(
    chunks: list[list[Pair]], cfg: RunConfig, pad: int
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The micro-batches of one schedule call and their longest length, collated as training
    collates them: padded to the group's longest sequence, or packed / prefix-shared
    (``data/packing.py``) when ``--pack-pairs`` / ``--prefix-sharing`` are on, with the same
    shapes for every micro-batch under pipeline parallelism (stages exchange fixed shapes)."""
    t = cfg.train
    if not (t.pack_pairs or t.prefix_sharing):
        longest = max(
            len(x.prompt_ids) + max(len(x.chosen_ids), len(x.rejected_ids))
            for c in chunks
            for x in c
        )
        seq_len = _pad_to(longest - 1, pad)
        return [collate(c, seq_len) for c in chunks], seq_len
    kw = dict(capacity=t.seq_length, prefix_sharing=bool(t.prefix_sharing), pack=bool(t.pack_pairs))
    width = num_rows = None
    if cfg.parallel.pipeline_model_parallel_size > 1:
        rows = [pack_rows(c, **kw) for c in chunks]
        width, num_rows = max(map(row_width, rows)), max(map(len, rows))
    batches = [
        collate_packed(c, **kw, width=width, num_rows=num_rows, pad_multiple=pad) for c in chunks
    ]
    return batches, max(mb["tokens"].shape[1] for mb in batches)


def score_pairs(
    model: list,
    cfg: RunConfig,
    pairs: Sequence[Pair],
    show_progress: bool = False,
    desc: str = "evaluate",
) -> list[dict] | None:
    """Per-pair results of the ``--loss`` objective (forward only; collective). Returns the rows
    in ``pairs`` order on the writing rank (first rank of the last pipeline stage, after a
    gather over data-parallel ranks), None on the others. ``desc`` names the progress line."""
    p = cfg.parallel
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = -(-len(pairs) // dp)
    lo, hi = dp_rank * per_rank, min((dp_rank + 1) * per_rank, len(pairs))
    mbs = cfg.train.micro_batch_size
    pad = p.tensor_model_parallel_size if p.sequence_parallel else 1
    rows: list[dict[str, float]] = []
    keys = pair_keys(cfg.loss)
    for chunk in model:
        chunk.eval()
    # The interleaved (virtual pipeline) schedule needs at least PP micro-batches per call:
    # group them (padding the last group with repeats whose results are dropped).
    group = p.pipeline_model_parallel_size if len(model) > 1 else 1
    with torch.no_grad():
        starts = list(range(lo, hi, mbs))
        groups = [starts[g : g + group] for g in range(0, len(starts), group)]
        show = show_progress and dist.get_rank() == 0
        for firsts in progress(groups, desc, unit="micro-batches", enabled=show):
            chunks = [[pairs[j] for j in range(i, min(i + mbs, hi))] for i in firsts]
            batches, seq_len = collate_group(chunks, cfg, pad)
            batches += [batches[-1]] * (group - len(batches))
            reports = run_forward_backward(
                model,
                batches,
                seq_len,
                cfg.loss,
                cfg.model.vocab_size,
                forward_only=True,
            )
            for r in reports[: len(chunks)]:
                pp_ = r["per_pair"]
                rows += [{k: float(pp_[k][j]) for k in keys} for j in range(pp_["loss"].shape[0])]
    for chunk in model:
        chunk.train()
    if not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
        return None
    gathered: list = [None] * dp
    dist.all_gather_object(gathered, rows, group=ps.get_data_parallel_group())
    if dp_rank != 0:
        return None
    out = [row for part in gathered for row in part]
    assert len(out) == len(pairs), (len(out), len(pairs))
    return out


def summarize(rows: list[dict], loss_cfg: LossConfig) -> dict:
    """The metrics of the scored pairs as one batch (the training step's definitions):
    ``loss`` and ``nll_loss`` are the objective and its NLL term over all rows (weighted mean,
    ``--sft-reduction``; recomputed in float64 from the per-pair log-probs by the same
    ``batch_loss.objective_per_pair``), the other metrics are means over the pairs of positive
    weight; plus ``num_pairs``."""
    col = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in pair_keys(loss_cfg)}
    suffix = "_sum" if mean_logps(loss_cfg) else ""
    sums = torch.cat([col[f"logps/chosen{suffix}"], col[f"logps/rejected{suffix}"]])
    counts = torch.cat([col["length/chosen"], col["length/rejected"]])
    ref = torch.cat([col[k] for k in REFERENCE_KEYS]) if loss_cfg.needs_reference else None
    out, _ = objective_per_pair(loss_cfg, sums, counts, col["weight"], ref=ref)
    totals = {"loss": out.losses.sum().item(), "nll_loss": out.nll.sum().item()}
    scored = col["weight"] > 0
    totals.update({k: col[k][scored].sum().item() for k in scored_keys(loss_cfg)})
    totals.update(pairs=len(rows), scored_pairs=int(scored.sum()))
    result = summarize_totals(totals)
    result["num_pairs"] = result.pop("pairs")
    return result


def evaluate(cfg: RunConfig, output: str | None = None) -> dict | None:
    """The ``evaluate`` command (collective); returns the result on the writing rank."""
    prepare_for_run(cfg)  # before the process group: tokenising may outlast its timeout
    parallel.init_distributed(cfg.parallel.distributed_timeout_minutes)
    parallel.init_model_parallel_for(cfg)
    cfg = defaults.resolve_for_run(cfg)  # packed scoring and the fused head, as in training
    pairs = pairs_for(cfg, cfg.data.data_path)
    model = build_model(cfg)
    checkpointing.load_checkpoint(cfg.train.load, model)
    rows = score_pairs(model, cfg, pairs, show_progress=True)
    result = None
    if rows is not None:
        for row, src in zip(rows, pairs.source_rows()):
            row["row"] = src
        result = {**summarize(rows, cfg.loss), "per_pair": rows}
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(result, indent=1))
        summary = {k: round(v, 5) for k, v in result.items() if k != "per_pair"}
        print(f"evaluate: {json.dumps(summary)}", flush=True)
    dist.barrier()
    parallel.destroy_model_parallel()
    return result
