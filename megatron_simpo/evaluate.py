"""SimPO metrics of a checkpoint on a preference file, without training.

    torchrun --nproc-per-node 2 -m megatron_simpo evaluate --load CKPT \\
        --data-path pairs.jsonl --beta 2.0 --gamma-beta-ratio 0.5 --output eval.json \\
        --tensor-model-parallel-size 2

Writes JSON with ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen
minus rejected reward, without gamma), ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected`` (mean log-prob per response token), ``num_pairs`` and ``per_pair`` (a list in
file order of objects with the same keys, plus ``row``: the pair's 0-based row in the source,
since invalid rows (with --skip-invalid) and ties are dropped) — TRL's CPO trainer's names and
meanings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_simpo import checkpointing, parallel
from megatron_simpo.config import RunConfig
from megatron_simpo.data import Pair, collate, pairs_for, prepare_for_run
from megatron_simpo.model import build_model
from megatron_simpo.progress import progress
from megatron_simpo.step import PAIR_KEYS as PER_PAIR_KEYS
from megatron_simpo.step import run_forward_backward


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def score_pairs(
    model: list, cfg: RunConfig, pairs: Sequence[Pair], show_progress: bool = False
) -> list[dict] | None:
    """Per-pair SimPO results (forward only; collective). Returns the rows in ``pairs`` order on
    the writing rank (first rank of the last pipeline stage), None on the others."""
    p = cfg.parallel
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = -(-len(pairs) // dp)
    lo, hi = dp_rank * per_rank, min((dp_rank + 1) * per_rank, len(pairs))
    mbs = cfg.train.micro_batch_size
    pad = p.tensor_model_parallel_size if p.sequence_parallel else 1
    rows: list[dict[str, float]] = []
    for chunk in model:
        chunk.eval()
    # The interleaved (virtual pipeline) schedule needs at least PP micro-batches per call:
    # group them (padding the last group with repeats whose results are dropped).
    group = p.pipeline_model_parallel_size if len(model) > 1 else 1
    with torch.no_grad():
        starts = list(range(lo, hi, mbs))
        groups = [starts[g : g + group] for g in range(0, len(starts), group)]
        show = show_progress and dist.get_rank() == 0
        for firsts in progress(groups, "evaluate", unit="micro-batches", enabled=show):
            chunks = [[pairs[j] for j in range(i, min(i + mbs, hi))] for i in firsts]
            longest = max(
                len(x.prompt_ids) + max(len(x.chosen_ids), len(x.rejected_ids))
                for c in chunks
                for x in c
            )
            seq_len = _pad_to(longest - 1, pad)
            batches = [collate(c, seq_len) for c in chunks]
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
                rows += [
                    {k: float(pp_[k][j]) for k in PER_PAIR_KEYS}
                    for j in range(pp_["loss"].shape[0])
                ]
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


def summarize(rows: list[dict]) -> dict:
    """Means over pairs of the per-pair metrics, plus ``num_pairs``."""
    result = {k: sum(r[k] for r in rows) / len(rows) for k in PER_PAIR_KEYS}
    result["num_pairs"] = len(rows)
    return result


def evaluate(cfg: RunConfig, output: str | None = None) -> dict | None:
    """The ``evaluate`` command (collective); returns the result on the writing rank."""
    prepare_for_run(cfg)  # before the process group: tokenising may outlast its timeout
    parallel.init_distributed(cfg.parallel.distributed_timeout_minutes)
    parallel.init_model_parallel_for(cfg)
    pairs = pairs_for(cfg, cfg.data.data_path)
    model = build_model(cfg)
    checkpointing.load_checkpoint(cfg.train.load, model)
    rows = score_pairs(model, cfg, pairs, show_progress=True)
    result = None
    if rows is not None:
        for row, src in zip(rows, pairs.source_rows()):
            row["row"] = src
        result = {**summarize(rows), "per_pair": rows}
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(result, indent=1))
        summary = {k: round(v, 5) for k, v in result.items() if k != "per_pair"}
        print(f"evaluate: {json.dumps(summary)}", flush=True)
    dist.barrier()
    parallel.destroy_model_parallel()
    return result
