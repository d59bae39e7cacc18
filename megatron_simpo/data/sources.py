"""Where rows come from: JSONL / JSON / Parquet files, ``datasets.save_to_disk`` directories, or a
Hugging Face Hub dataset name. Each row is yielded with its location (``file:line`` or
``file:row N``) so errors can name it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_simpo.errors import DataError

#: A row that could not even be decoded: (reason, message).
Undecodable = tuple[str, str]


def describe(path: str) -> str:
    p = Path(path)
    if p.is_file():
        return f"file {p}"
    if p.is_dir():
        return f"directory {p}"
    return f"Hub dataset {path}"


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any | Undecodable]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, ("undecodable", f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, ("malformed_json", f"malformed JSON ({e.msg} at column {e.colno})")


def _iter_dataset(ds: Any, label: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(ds):
        yield f"{label}:row {i + 1}", row


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def iter_rows(path: str, split: str | None = None) -> Iterator[tuple[str, Any | Undecodable]]:
    """Yields ``(location, row)``; ``row`` is an :data:`Undecodable` tuple for a bad line."""
    p = Path(path)
    if p.is_file():
        if p.stat().st_size == 0:
            raise DataError(f"--data-path {p}: the file is empty")
        suffix = "".join(p.suffixes[-1:]).lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from _iter_jsonl(p)
        elif suffix == ".json":
            try:
                data = json.loads(p.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(
                    f"--data-path {p}: not a valid JSON file ({e}); for one object "
                    "per line use the .jsonl extension"
                ) from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(
                    f'--data-path {p}: expected a JSON list of rows (or {{"data": [...]}})'
                )
            yield from ((f"{p}:row {i + 1}", r) for i, r in enumerate(data))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(p)
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise DataError(f"--data-path {p}: cannot read Parquet ({e})") from None
            yield from _iter_dataset(table.to_pylist(), str(p))
        else:
            raise DataError(
                f"--data-path {p}: unknown extension '{suffix}'; use .jsonl, .json, "
                ".parquet or a datasets.save_to_disk directory"
            )
        return
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # datasets raises FileNotFoundError or its own errors
            raise DataError(
                f"--data-path {p}: not a datasets.save_to_disk directory ({e})"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            name = split or "train"
            if name not in ds:
                raise DataError(
                    f"--data-path {p}: no split '{name}' (has {list(ds)}); "
                    "choose one with --data-split"
                )
            ds = ds[name]
        yield from _iter_dataset(ds, str(p))
        return
    if "/" not in path or path.startswith((".", "/")):
        raise DataError(f"--data-path {path}: no such file or directory")
    if not _hub_reachable():
        raise DataError(
            f"--data-path {path}: not a local file or directory, and the Hugging "
            "Face Hub is unreachable (offline); download the dataset where the "
            "network allows and pass its local path"
        )
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split or "train")
    except Exception as e:  # network, auth, missing dataset: all end the same way
        raise DataError(f"--data-path {path}: cannot load it from the Hub ({e})") from None
    yield from _iter_dataset(ds, path)


def fingerprint_path(path: str, h: Any) -> None:
    """Feeds what identifies a source's content into hash ``h``."""
    p = Path(path)
    if p.is_file():
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(f"hub:{path}".encode())


def fingerprint(parts: dict[str, Any], paths: list[str]) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in paths:
        fingerprint_path(path, h)
    return h.hexdigest()[:20]
