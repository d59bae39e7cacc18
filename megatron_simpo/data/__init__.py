"""Preference data: sources, schemas, tokenisation, preparation, batching.

:func:`load_pairs` is what ``train`` and ``evaluate`` call: a prepared directory is read directly;
anything else is prepared into a fingerprinted cache and read from there. ``train`` and
``evaluate`` call :func:`prepare_for_run` before any process group exists: rank 0 tokenises while
the other ranks wait on the cache directory (shared by all nodes) with no collective timeout.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_simpo.data.batching import Pair, PairBatcher, collate, global_batch_indices
from megatron_simpo.data.prepare import (
    PreparedPairs,
    PrepareOptions,
    cache_key,
    is_prepared,
    prepare,
)
from megatron_simpo.errors import DataError

__all__ = [
    "pairs_for",
    "Pair",
    "PairBatcher",
    "PreparedPairs",
    "collate",
    "global_batch_indices",
    "load_pairs",
    "ensure_prepared",
    "prepare_for_run",
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


def cache_entry(
    data_path: str,
    *,
    tokenizer: str | None,
    opts: PrepareOptions,
    split: str | None = None,
    cache_dir: str | None = None,
) -> Path:
    """Where raw ``data_path`` is prepared (a prepared directory is its own entry)."""
    if is_prepared(data_path):
        return Path(data_path)
    out = Path(cache_dir) if cache_dir else default_cache_dir()
    return out / cache_key(data_path, tokenizer, opts, split)


class _Heartbeat:
    """While preparing: ``<entry>.preparing`` rewritten every ``interval`` seconds (so waiting
    ranks on other nodes see progress without comparing clocks); on failure ``<entry>.failed``
    holds the message."""

    def __init__(self, entry: Path, interval: float = 5.0) -> None:
        self.beat = entry.with_name(entry.name + ".preparing")
        self.failed = entry.with_name(entry.name + ".failed")
        self.interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while True:
            self.beat.write_text(json.dumps({"host": socket.gethostname(), "beat": n}))
            n += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> _Heartbeat:
        self.beat.parent.mkdir(parents=True, exist_ok=True)
        self.failed.unlink(missing_ok=True)
        self._thread.start()
        return self

    def __exit__(self, kind, err, tb) -> None:
        self._stop.set()
        self._thread.join()
        if err is not None:
            note = {"error": str(err), "time": time.time(), "host": socket.gethostname()}
            self.failed.write_text(json.dumps(note))
        self.beat.unlink(missing_ok=True)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def wait_for_entry(
    entry: Path, *, rank: int, stale_s: float = 300.0, poll_s: float = 1.0, say_every_s: float = 60
) -> None:
    """Waits, without any collective and so without its timeout, until rank 0 has prepared
    ``entry``. Raises DataError when rank 0 reports a failure, or when its heartbeat has not
    changed for ``stale_s`` seconds (never seen: the cache is probably not shared)."""
    hb = _Heartbeat(entry)
    failed_before = _read(hb.failed)  # a failure left by an earlier run is not this one's
    last_beat, changed, begun = None, time.monotonic(), time.monotonic()
    said = begun
    while not is_prepared(entry):
        failed = _read(hb.failed)
        if failed is not None and failed != failed_before:
            raise DataError(json.loads(failed)["error"])
        beat = _read(hb.beat)
        now = time.monotonic()
        if beat != last_beat:
            last_beat, changed = beat, now
        if now - changed > stale_s:
            if last_beat is None:
                raise DataError(
                    f"rank {rank}: rank 0 has not begun preparing {entry} after {stale_s:.0f} s; "
                    "--data-cache-dir must be on a filesystem shared by all nodes (or run "
                    "`megatron-simpo prepare` first and pass its output as --data-path)"
                )
            last = f"; its last error: {json.loads(failed)['error']}" if failed else ""
            raise DataError(
                f"rank {rank}: rank 0 stopped preparing {entry} (no heartbeat for "
                f"{stale_s:.0f} s){last}"
            )
        if now - said >= say_every_s:
            print(f"rank {rank}: waiting for rank 0 to prepare {entry} ({now - begun:.0f} s)")
            said = now
        time.sleep(poll_s)


def ensure_prepared(
    data_path: str,
    *,
    tokenizer: str | None,
    opts: PrepareOptions,
    split: str | None = None,
    cache_dir: str | None = None,
    num_workers: int = 1,
    rank: int = 0,
    stale_s: float = 300.0,
) -> Path:
    """The prepared directory of ``data_path``: rank 0 prepares raw data into the cache, the
    other ranks wait for it on the (shared) filesystem. Needs no process group."""
    entry = cache_entry(data_path, tokenizer=tokenizer, opts=opts, split=split, cache_dir=cache_dir)
    if is_prepared(entry):
        return entry
    if rank != 0:
        wait_for_entry(entry, rank=rank, stale_s=stale_s)
        return entry
    with _Heartbeat(entry):
        prepare(
            data_path,
            entry,
            tokenizer=tokenizer,
            opts=opts,
            split=split,
            num_workers=num_workers,
            quiet=False,
        )
    return entry


def load_pairs(data_path: str, **options: Any) -> PreparedPairs:
    """Pairs of ``data_path`` (prepared directory, or raw data prepared into the cache);
    ``options``: the keyword arguments of :func:`ensure_prepared`."""
    return PreparedPairs(ensure_prepared(data_path, **options))


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


def _options(cfg) -> PrepareOptions:
    d = cfg.data
    max_length = d.max_length if d.max_length is not None else cfg.train.seq_length
    return PrepareOptions.from_flags(d, max_length=max_length, vocab_size=cfg.model.vocab_size)


def _rank() -> int:
    """Global rank: from the process group once it exists, from torchrun's RANK before."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _prepare_kwargs(cfg) -> dict[str, Any]:
    """The keyword arguments of :func:`ensure_prepared` (and :func:`load_pairs`) for a run."""
    d = cfg.data
    return dict(
        tokenizer=_default_tokenizer(cfg),
        opts=_options(cfg),
        split=d.data_split,
        cache_dir=d.data_cache_dir,
        num_workers=d.num_workers,
        rank=_rank(),
    )


def prepare_for_run(cfg) -> None:
    """Prepares the run's raw data (``--data-path``, ``--eval-data-path``) before any process
    group exists: rank 0 tokenises, the other ranks wait on the cache without a collective
    timeout. Called by ``train`` and ``evaluate`` before ``init_process_group``. The DPO family
    refuses raw data here, before tokenising: its reference columns live in a prepared dataset."""
    d = cfg.data
    for flag, path in (("--data", d.data_path), ("--eval-data-path", d.eval_data_path)):
        if path and cfg.loss.needs_reference and not is_prepared(path):
            raise DataError(
                f"{flag} {path}: --loss {cfg.loss.objective} reads reference log-probs from a "
                f"prepared dataset: run `megatron-simpo prepare --data-path {path} --output DIR`, "
                "then `megatron-simpo score-reference --load <reference ckpt> --data DIR`, and "
                f"pass {flag} DIR"
            )
        if path:
            ensure_prepared(path, **_prepare_kwargs(cfg))


def pairs_for(cfg, path: str) -> PreparedPairs:
    """``load_pairs`` with a run config's options, checked against the run (no collective):
    ``--seq-length``, the run's tokenizer and the model's vocabulary, the DPO family's reference
    columns (``data/checks.py``)."""
    from megatron_simpo.data.checks import check_for_run
    from megatron_simpo.data.prepare import load_tokenizer, tokenizer_fingerprint

    kwargs = _prepare_kwargs(cfg)
    tokenizer = kwargs["tokenizer"]
    pairs = load_pairs(path, **kwargs)
    fp = None
    if tokenizer and pairs.info.get("tokenizer_fingerprint"):
        fp = tokenizer_fingerprint(load_tokenizer(tokenizer))
    check_for_run(
        pairs,
        seq_length=cfg.train.seq_length,
        vocab_size=cfg.model.vocab_size,
        tokenizer=tokenizer,
        tokenizer_fingerprint=fp,
        objective=cfg.loss.objective,
        max_length=cfg.data.max_length,
    )
    return pairs
