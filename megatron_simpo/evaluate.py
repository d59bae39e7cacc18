"""SimPO metrics of a checkpoint on a preference file, without training.

    torchrun --nproc-per-node 2 -m megatron_simpo evaluate --load CKPT \\
        --data-path pairs.jsonl --beta 2.0 --gamma-beta-ratio 0.5 --output eval.json \\
        --tensor-model-parallel-size 2

Writes JSON with ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen
minus rejected reward, without gamma), ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected`` (mean log-prob per response token), ``num_pairs`` and ``per_pair`` (a list in
file order of objects with the same keys) — TRL's CPO trainer's names and meanings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_simpo import checkpointing, parallel
from megatron_simpo.config import RunConfig
from megatron_simpo.data import collate, read_pretokenized_jsonl
from megatron_simpo.model import build_model
from megatron_simpo.step import run_forward_backward

PER_PAIR_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def evaluate(cfg: RunConfig, output: str | None = None) -> dict | None:
    """Runs the evaluation (collective); returns the result on the writing rank, else None."""
    parallel.init_distributed(cfg.parallel.distributed_timeout_minutes)
    p = cfg.parallel
    vpp = None
    if p.num_layers_per_virtual_pipeline_stage is not None:
        vpp = (
            cfg.model.num_hidden_layers // p.pipeline_model_parallel_size
        ) // p.num_layers_per_virtual_pipeline_stage
    parallel.init_model_parallel(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        vpp,
        seed=cfg.train.seed,
        timeout_minutes=p.distributed_timeout_minutes,
    )
    pairs = read_pretokenized_jsonl(cfg.data.data_path, cfg.model.vocab_size, cfg.train.seq_length)
    model = build_model(cfg)
    checkpointing.load_checkpoint(cfg.train.load, model)
    for chunk in model:
        chunk.eval()

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = -(-len(pairs) // dp)
    mine = pairs[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    mbs = cfg.train.micro_batch_size
    pad = p.tensor_model_parallel_size if p.sequence_parallel else 1
    rows: list[dict[str, float]] = []
    with torch.no_grad():
        for i in range(0, len(mine), mbs):
            chunk_pairs = mine[i : i + mbs]
            longest = (
                max(
                    len(x.prompt_ids) + max(len(x.chosen_ids), len(x.rejected_ids))
                    for x in chunk_pairs
                )
                - 1
            )
            seq_len = _pad_to(longest, pad)
            batch = collate(chunk_pairs, seq_len)
            reports = run_forward_backward(
                model, [batch], seq_len, cfg.loss, cfg.model.vocab_size, forward_only=True
            )
            for r in reports:
                pp_ = r["per_pair"]
                n = pp_["loss"].shape[0]
                rows += [{k: float(pp_[k][j]) for k in PER_PAIR_KEYS} for j in range(n)]

    result = None
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        gathered: list = [None] * dp
        dist.all_gather_object(gathered, rows, group=ps.get_data_parallel_group())
        if dp_rank == 0:
            per_pair = [row for part in gathered for row in part]
            assert len(per_pair) == len(pairs)
            result = {k: sum(r[k] for r in per_pair) / len(per_pair) for k in PER_PAIR_KEYS}
            result["num_pairs"] = len(per_pair)
            result["per_pair"] = per_pair
            if output:
                Path(output).parent.mkdir(parents=True, exist_ok=True)
                Path(output).write_text(json.dumps(result, indent=1))
            summary = {k: round(v, 5) for k, v in result.items() if k != "per_pair"}
            print(f"evaluate: {json.dumps(summary)}", flush=True)
    dist.barrier()
    parallel.destroy_model_parallel()
    return result
