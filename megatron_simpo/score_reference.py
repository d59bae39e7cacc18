"""``megatron-simpo score-reference``: a reference model's log-probs, once, into prepared data.

    megatron-simpo prepare --data-path pairs.jsonl --tokenizer SFT_HF --max-length 2048 \\
        --output prepared/
    torchrun --nproc-per-node 8 -m megatron_simpo score-reference --load SFT_CKPT \\
        --data prepared/ --seq-length 2048 --tensor-model-parallel-size 2
    torchrun --nproc-per-node 8 -m megatron_simpo train --loss dpo --load SFT_CKPT \\
        --data prepared/ --seq-length 2048 ...

A forward-only pass of ``--load`` over the pairs (``evaluate.score_pairs``: the training
collation, packing and prefix sharing included) at any TP/PP/DP layout. Per pair it writes the
summed log-prob of each response's tokens and their count as the columns
``ref_chosen_logps``, ``ref_rejected_logps`` (float64), ``ref_chosen_tokens``,
``ref_rejected_tokens`` (int32) of the prepared dataset (``data.prepare.write_reference_columns``,
atomic), and records in its ``prepared.json`` where they came from: the reference checkpoint's
fingerprint (:func:`checkpoint_fingerprint`) and the tokenisation's (:func:`tokenisation_of`),
which ``train --loss dpo`` checks (``data/checks.py``). Rerunning with the same checkpoint is a
no-op unless ``--force``. The DPO family then trains with one model in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

from megatron_simpo.config import LossConfig, RunConfig
from megatron_simpo.data.prepare import (
    REFERENCE_COLUMNS,
    REFERENCE_KEY,
    PreparedPairs,
    is_prepared,
    tokenisation_of,
    write_reference_columns,
)
from megatron_simpo.errors import CheckpointError, DataError

#: Small files of a checkpoint directory hashed into its fingerprint (never the tensor shards).
_FINGERPRINT_FILES = ("metadata.json", "common.pt", "run_state.json")


def checkpoint_fingerprint(load: str) -> dict[str, Any]:
    """What identifies the reference checkpoint cheaply: its resolved directory, iteration and a
    hash of its small metadata files (``metadata.json``, ``common.pt``, ``run_state.json``)."""
    from megatron_simpo.checkpointing import checkpoint_dir, read_run_state

    ckpt = checkpoint_dir(load)
    if ckpt is None:
        raise CheckpointError(f"--load {load}: no checkpoint there (no tracker or metadata.json)")
    digest = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        f = ckpt / name
        if f.is_file():
            digest.update(name.encode() + b"\0" + f.read_bytes())
    return {
        "path": str(ckpt.resolve()),
        "iteration": read_run_state(ckpt).get("iteration"),
        "sha256": digest.hexdigest()[:20],
    }


def up_to_date(pairs: PreparedPairs, ckpt_fp: dict[str, Any]) -> bool:
    """Whether ``pairs`` already holds reference columns of this checkpoint and tokenisation."""
    rec = pairs.info.get(REFERENCE_KEY)
    return bool(
        pairs.has_reference
        and rec
        and rec.get("checkpoint") == ckpt_fp
        and rec.get("tokenisation") == tokenisation_of(pairs.info)
    )


def _scoring_config(cfg: RunConfig) -> RunConfig:
    """The run config with the default objective: the summed log-probs do not depend on it, and
    a DPO objective would refuse the batches that have no reference yet."""
    return dataclasses.replace(cfg, loss=LossConfig())


def score_reference(cfg: RunConfig, force: bool = False) -> dict[str, Any] | None:
    """The ``score-reference`` command (collective). Returns the record written to
    ``prepared.json`` (on the writing rank: the first rank of the last pipeline stage, after the
    data-parallel gather), or the existing one when it is up to date; None on other ranks."""
    import torch.distributed as dist

    from megatron_simpo import checkpointing, defaults, parallel
    from megatron_simpo.data import pairs_for
    from megatron_simpo.evaluate import score_pairs
    from megatron_simpo.model import build_model, model_dtype

    data, load = cfg.data.data_path, cfg.train.load
    if not load:
        raise CheckpointError("score-reference needs --load CKPT (the reference model)")
    if not data or not is_prepared(data):
        raise DataError(
            f"--data {data}: score-reference writes into a prepared dataset; run "
            f"`megatron-simpo prepare --data-path {data} --output DIR` and pass --data DIR"
        )
    ckpt_fp = checkpoint_fingerprint(load)
    existing = PreparedPairs(data)
    if up_to_date(existing, ckpt_fp) and not force:
        print(
            f"score-reference: {data} already holds reference log-probs of {ckpt_fp['path']} "
            f"(iteration {ckpt_fp['iteration']}, fingerprint {ckpt_fp['sha256']}); nothing to "
            "do (--force scores again)",
            flush=True,
        )
        return existing.info[REFERENCE_KEY]
    cfg = _scoring_config(cfg)
    parallel.init_distributed(cfg.parallel.distributed_timeout_minutes)
    parallel.init_model_parallel_for(cfg)
    cfg = defaults.resolve_for_run(cfg)  # packed scoring and the fused head, as in training
    pairs = pairs_for(cfg, data)
    model = build_model(cfg)
    checkpointing.load_checkpoint(load, model)
    start = time.monotonic()
    rows = score_pairs(model, cfg, pairs, show_progress=True, desc="score-reference")
    seconds = time.monotonic() - start
    record = None
    if rows is not None:
        columns = {
            "ref_chosen_logps": [r["logps/chosen_sum"] for r in rows],
            "ref_rejected_logps": [r["logps/rejected_sum"] for r in rows],
            "ref_chosen_tokens": [round(r["length/chosen"]) for r in rows],
            "ref_rejected_tokens": [round(r["length/rejected"]) for r in rows],
        }
        assert tuple(columns) == REFERENCE_COLUMNS
        record = {
            "checkpoint": ckpt_fp,
            "tokenisation": tokenisation_of(pairs.info),
            "precision": str(model_dtype(cfg)).removeprefix("torch."),
            "layout": {
                "tp": cfg.parallel.tensor_model_parallel_size,
                "pp": cfg.parallel.pipeline_model_parallel_size,
                "dp": dist.get_world_size()
                // (
                    cfg.parallel.tensor_model_parallel_size
                    * cfg.parallel.pipeline_model_parallel_size
                ),
            },
            "pairs": len(rows),
        }
        del pairs  # its memory map points at the subdirectory that the write replaces
        write_reference_columns(data, columns, record)
        print(
            f"score-reference: wrote {', '.join(REFERENCE_COLUMNS)} of {len(rows)} pairs "
            f"to {data} in {seconds:.1f} s "
            f"({len(rows) / max(seconds, 1e-9):.1f} pairs/s); reference {ckpt_fp['path']} "
            f"(iteration {ckpt_fp['iteration']})",
            flush=True,
        )
    dist.barrier()
    parallel.destroy_model_parallel()
    return record
