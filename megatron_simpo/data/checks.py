"""Checks of a prepared dataset against the run that reads it (``train``, ``evaluate``).

A prepared directory may come from another machine, an older version or other options, so what
it records (``prepared.json``) and what it holds (its Arrow columns, scanned vectorised) are
compared with the run's ``--seq-length``, tokenizer and model vocabulary before anything is built.
Each refusal names the directory (and the pair's source ``file:line``) and the fix.
"""

from __future__ import annotations

import warnings
from typing import Any

from megatron_simpo.data.prepare import PREPARE_VERSION, PreparedPairs
from megatron_simpo.errors import DataError

_ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _columns(pairs: PreparedPairs) -> Any:
    """The pyarrow table behind a prepared dataset (``save_to_disk`` wrote it flat)."""
    return pairs._ds.data.table


def where_of(pairs: PreparedPairs, i: int) -> str:
    """Source location of pair ``i``: ``file:line`` where recorded (version 2), else the pair
    and source row numbers in the prepared directory."""
    table = _columns(pairs)
    if "where" in table.column_names:
        return f"{table.column('where')[i].as_py()} (in {pairs.path})"
    row = table.column("row")[i].as_py()
    return f"{pairs.path}: pair {i} (source row {row + 1})"


def _first(mask: Any) -> int | None:
    """Index of the first true value of a boolean pyarrow array, or None."""
    import pyarrow.compute as pc

    idx = pc.index(mask, True).as_py()
    return None if idx is None or idx < 0 else idx


def first_id_outside(pairs: PreparedPairs, vocab_size: int) -> tuple[int, str, int] | None:
    """(pair index, column, id) of the first id < 0 or >= ``vocab_size``, or None."""
    import pyarrow.compute as pc

    table = _columns(pairs)
    found = []
    for name in _ID_COLUMNS:
        start = 0  # chunk by chunk: parent indices are relative to a chunk
        for chunk in table.column(name).chunks:
            flat = pc.list_flatten(chunk)
            bad = _first(pc.or_(pc.less(flat, 0), pc.greater_equal(flat, vocab_size)))
            if bad is not None:
                pair = start + pc.list_parent_indices(chunk)[bad].as_py()
                found.append((pair, name, flat[bad].as_py()))
                break
            start += len(chunk)
    return min(found) if found else None


def longest_pair(pairs: PreparedPairs) -> tuple[int, int]:
    """(pair index, tokens) of the longest sequence, prompt + the longer response."""
    import pyarrow.compute as pc

    table = _columns(pairs)
    p, c, r = (pc.list_value_length(table.column(n)) for n in _ID_COLUMNS)
    total = pc.add(p, pc.max_element_wise(c, r))
    i = pc.index(total, pc.max(total)).as_py()
    return i, total[i].as_py()


def first_bad_weight(pairs: PreparedPairs) -> tuple[int, float] | None:
    """(pair index, weight) of the first negative or non-finite weight, or None."""
    import pyarrow.compute as pc

    w = _columns(pairs).column("weight")
    bad = _first(pc.or_(pc.invert(pc.is_finite(w)), pc.less(w, 0)))
    return None if bad is None else (bad, w[bad].as_py())


def check_for_run(
    pairs: PreparedPairs,
    *,
    seq_length: int,
    vocab_size: int,
    tokenizer: str | None = None,
    tokenizer_fingerprint: dict[str, Any] | None = None,
) -> None:
    """Refuses (DataError) a prepared dataset the run cannot use as it is.

    Args:
        pairs: the prepared dataset.
        seq_length: the run's ``--seq-length`` (tokens of prompt + response).
        vocab_size: the model's vocabulary (unpadded); every id must be below it.
        tokenizer: the run's tokenizer directory, if known (named in messages).
        tokenizer_fingerprint: its :func:`~megatron_simpo.data.prepare.tokenizer_fingerprint`.
    """
    info, where = pairs.info, pairs.path
    opts = info.get("options", {})
    if info.get("version", 1) < PREPARE_VERSION:
        warnings.warn(
            f"{where} was prepared by an older megatron-simpo (layout {info.get('version', 1)}, "
            f"now {PREPARE_VERSION}): its tokenizer cannot be checked against this run; "
            "re-run `megatron-simpo prepare` to record it",
            stacklevel=2,
        )
    max_length = opts.get("max_length")
    if max_length is not None and max_length > seq_length:
        raise DataError(
            f"{where} was prepared with --max-length {max_length} but --seq-length is "
            f"{seq_length}: re-run prepare with --max-length {seq_length} or raise --seq-length"
        )
    i, n = longest_pair(pairs)
    if n > seq_length:
        raise DataError(
            f"{where_of(pairs, i)}: a pair of {n} tokens does not fit --seq-length {seq_length} "
            f"(prepared without --max-length): re-run prepare with --max-length {seq_length} "
            "or raise --seq-length"
        )
    recorded = info.get("tokenizer_fingerprint")
    if recorded and tokenizer_fingerprint and recorded["sha256"] != tokenizer_fingerprint["sha256"]:
        raise DataError(
            f"{where} was prepared with tokenizer {info.get('tokenizer')} (vocabulary "
            f"{recorded['vocab_size']}, fingerprint {recorded['sha256']}) but this run's "
            f"tokenizer {tokenizer} differs (vocabulary {tokenizer_fingerprint['vocab_size']}, "
            f"fingerprint {tokenizer_fingerprint['sha256']}): re-run prepare with "
            f"--tokenizer {tokenizer}, or pass the tokenizer it was prepared with"
        )
    bad = first_id_outside(pairs, vocab_size)
    if bad is not None:
        i, name, t = bad
        raise DataError(
            f"{where_of(pairs, i)}: field '{name}' holds id {t}, outside the model's vocabulary "
            f"[0, {vocab_size}); prepare the data with the model's tokenizer"
        )
    w = first_bad_weight(pairs)
    if w is not None:
        raise DataError(
            f"{where_of(pairs, w[0])}: weight {w[1]} is not a finite number >= 0; fix the row "
            "and re-run prepare"
        )
