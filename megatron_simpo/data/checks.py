"""Checks of a prepared dataset against the run that reads it (``train``, ``evaluate``).

A prepared directory may come from another machine, an older version or other options, so what
it records (``prepared.json``) and what it holds (its Arrow columns, scanned vectorised) are
compared with the run's ``--seq-length``, tokenizer and model vocabulary before anything is built,
and, for the DPO family, its reference columns with the data and the run (``score-reference``).
Each refusal names the directory (and the pair's source ``file:line``) and the fix.
"""

from __future__ import annotations

import warnings
from typing import Any

from megatron_simpo.data.prepare import (
    PREPARE_VERSION,
    REFERENCE_KEY,
    PreparedPairs,
    tokenisation_of,
)
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
    objective: str = "simpo",
    max_length: int | None = None,
) -> None:
    """Refuses (DataError) a prepared dataset the run cannot use as it is.

    Args:
        pairs: the prepared dataset.
        seq_length: the run's ``--seq-length`` (tokens of prompt + response).
        vocab_size: the model's vocabulary (unpadded); every id must be below it.
        tokenizer: the run's tokenizer directory, if known (named in messages).
        tokenizer_fingerprint: its :func:`~megatron_simpo.data.prepare.tokenizer_fingerprint`.
        objective: the run's ``--loss``; the DPO family needs the reference columns
            (:func:`check_reference`).
        max_length: the run's ``--max-length`` if given explicitly.
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
    prepared_length = opts.get("max_length")
    if prepared_length is not None and prepared_length > seq_length:
        raise DataError(
            f"{where} was prepared with --max-length {prepared_length} but --seq-length is "
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
    from megatron_simpo.loss import NEEDS_REFERENCE

    if objective in NEEDS_REFERENCE:
        check_reference(
            pairs,
            objective=objective,
            tokenizer_fingerprint=tokenizer_fingerprint,
            max_length=max_length,
        )


def first_reference_count_mismatch(pairs: PreparedPairs) -> tuple[int, str, int, int] | None:
    """(pair index, response, scored tokens, tokens now) of the first pair whose reference token
    count (``ref_chosen_tokens`` / ``ref_rejected_tokens``) is not its response's length."""
    import pyarrow.compute as pc

    table = _columns(pairs)
    for side in ("chosen", "rejected"):
        now = pc.list_value_length(table.column(f"{side}_ids"))
        scored = table.column(f"ref_{side}_tokens")
        bad = _first(pc.not_equal(pc.cast(now, "int64"), pc.cast(scored, "int64")))
        if bad is not None:
            return bad, side, scored[bad].as_py(), now[bad].as_py()
    return None


def check_reference(
    pairs: PreparedPairs,
    *,
    objective: str,
    tokenizer_fingerprint: dict[str, Any] | None = None,
    max_length: int | None = None,
) -> None:
    """Refuses (DataError) a dataset without up-to-date reference log-probs (``--loss`` of the
    DPO family): columns missing, scored with another max length than the data or this run's
    ``--max-length``, or stale (another tokenisation than the data's or this run's tokenizer,
    token counts that are not the responses' lengths)."""
    where = pairs.path
    fix = f"`megatron-simpo score-reference --load <reference ckpt> --data {where}`"
    rec = pairs.info.get(REFERENCE_KEY)
    if not pairs.has_reference or not rec:
        raise DataError(
            f"{where} has no reference log-probs (columns ref_chosen_logps, ref_rejected_logps), "
            f"which --loss {objective} needs: run {fix} first"
        )
    scored, now = rec.get("tokenisation", {}), tokenisation_of(pairs.info)
    for length, what in ((now["max_length"], "the data"), (max_length, "this run")):
        if what == "this run" and length is None:
            continue
        if scored.get("max_length") != length:
            raise DataError(
                f"{where}: the reference log-probs were scored with --max-length "
                f"{scored.get('max_length')} but {what} has --max-length {length}: prepare the "
                f"data with the run's --max-length and run {fix} again"
            )
    stale = [k for k in now if scored.get(k) != now[k]]
    if stale:
        raise DataError(
            f"{where}: stale reference log-probs (scored with another tokenisation: "
            f"{', '.join(f'{k} {scored.get(k)!r} != {now[k]!r}' for k in stale)}): "
            f"re-run score-reference ({fix} --force)"
        )
    run_sha = (tokenizer_fingerprint or {}).get("sha256")
    if run_sha and scored.get("tokenizer_sha256") and run_sha != scored["tokenizer_sha256"]:
        raise DataError(
            f"{where}: stale reference log-probs (scored on ids of tokenizer "
            f"{scored['tokenizer_sha256']}, this run's tokenizer is {run_sha}): re-run "
            f"score-reference ({fix} --force) after preparing with this tokenizer"
        )
    bad = first_reference_count_mismatch(pairs)
    if bad is not None:
        i, side, then, n = bad
        raise DataError(
            f"{where_of(pairs, i)}: stale reference log-probs (the {side} response has {n} "
            f"tokens, its reference was scored on {then}): re-run score-reference "
            f"({fix} --force)"
        )
