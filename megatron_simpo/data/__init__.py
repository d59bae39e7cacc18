"""Preference data: sources, schemas, tokenisation, preparation, batching.

:func:`load_pairs` is what ``train`` and ``evaluate`` call: a prepared directory is read directly;
anything else is prepared on the fly (on the first rank, into a fingerprinted cache) and read
from there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from megatron_simpo.data.batching import Pair, PairBatcher, collate, global_batch_indices
from megatron_simpo.data.prepare import (
    PreparedPairs,
    PrepareOptions,
    cache_key,
    is_prepared,
    prepare,
)

__all__ = [
    "pairs_for",
    "Pair",
    "PairBatcher",
    "PreparedPairs",
    "collate",
    "global_batch_indices",
    "load_pairs",
    "default_cache_dir",
    "Subset",
    "split_heldout",
]


def default_cache_dir() -> Path:
    return (
        Path(os.environ.get("MEGATRON_SIMPO_CACHE", Path.home() / ".cache" / "megatron-simpo"))
        / "prepared"
    )


class Subset(Sequence[Pair]):
    """A view of some pairs of another sequence."""

    def __init__(self, base: Sequence[Pair], indices: list[int]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        return self.base[self.indices[i]]


def split_heldout(
    pairs: Sequence[Pair], ratio: float, seed: int
) -> tuple[Sequence[Pair], Sequence[Pair]]:
    """(train, held-out) with a seeded, layout-independent choice of ``ratio`` of the pairs."""
    import torch

    n_eval = int(round(len(pairs) * ratio))
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(perm[:n_eval])
    train = sorted(perm[n_eval:])
    return Subset(pairs, train), Subset(pairs, held)


def load_pairs(
    data_path: str,
    *,
    tokenizer: str | None,
    opts: PrepareOptions,
    split: str | None = None,
    cache_dir: str | None = None,
    num_workers: int = 1,
    is_first_rank: bool = True,
    barrier=None,
) -> PreparedPairs:
    """Pairs of ``data_path`` (prepared directory, or raw data prepared into the cache)."""
    if is_prepared(data_path):
        return PreparedPairs(data_path)
    out = Path(cache_dir) if cache_dir else default_cache_dir()
    out = out / cache_key(data_path, tokenizer, opts, split)
    if is_first_rank and not is_prepared(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        prepare(
            data_path,
            out,
            tokenizer=tokenizer,
            opts=opts,
            split=split,
            num_workers=num_workers,
            quiet=False,
        )
    if barrier is not None:
        barrier()
    return PreparedPairs(out)


def _default_tokenizer(cfg) -> str | None:
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.train.load:
        from megatron_simpo.checkpointing import hf_side_dir

        side = hf_side_dir(cfg.train.load)
        if side is not None and any(
            (side / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")
        ):
            return str(side)
    return None


def pairs_for(cfg, path: str) -> PreparedPairs:
    """``load_pairs`` with a run config's options (collective under torch.distributed)."""
    import torch.distributed as dist

    d = cfg.data
    opts = PrepareOptions(
        schema=d.data_schema,
        max_length=d.max_length if d.max_length is not None else cfg.train.seq_length,
        max_prompt_length=d.max_prompt_length,
        truncation_mode=d.truncation_mode,
        skip_invalid=d.skip_invalid,
        keep_ties=d.keep_ties,
        vocab_size=cfg.model.vocab_size,
    )
    first = not dist.is_initialized() or dist.get_rank() == 0
    barrier = dist.barrier if dist.is_initialized() else None
    pairs = load_pairs(
        path,
        tokenizer=_default_tokenizer(cfg),
        opts=opts,
        split=d.data_split,
        cache_dir=d.data_cache_dir,
        num_workers=d.num_workers,
        is_first_rank=first,
        barrier=barrier,
    )
    max_id = pairs.info["summary"].get("max_id", -1)
    if max_id >= cfg.model.vocab_size:
        from megatron_simpo.errors import DataError

        raise DataError(
            f"{path}: token id {max_id} >= the model's vocabulary size "
            f"{cfg.model.vocab_size}; prepare it with the model's tokenizer"
        )
    return pairs
