"""``megatron-simpo prepare``: validate, tokenise and truncate preference data once, ahead of
training, into a memory-mapped Arrow dataset that ``train`` and ``evaluate`` read directly.

    megatron-simpo prepare --data-path pairs.jsonl --tokenizer DIR --output prepared/ \\
        [--max-length 2048] [--max-prompt-length 1024] [--skip-invalid] [--num-workers 8]

Every row is checked (``rows.py``); by default the first invalid row stops preparation with its
file, line, field and fix. ``--skip-invalid`` skips such rows instead; preparation always ends
with a summary: kept, dropped per reason. Ties (identical chosen and rejected) are dropped unless
``--keep-ties``; pairs whose response is empty after truncation are always dropped. ``train`` given
raw data runs the same code into a cache keyed by a fingerprint of the inputs (data bytes,
tokenizer files, options), so the same inputs are never tokenised twice.

Output: ``OUT/pairs`` (``datasets.save_to_disk``: prompt_ids, chosen_ids, rejected_ids, weight,
row, where) and ``OUT/prepared.json`` (summary, options, fingerprint). ``megatron-simpo
score-reference`` later adds the reference columns (:data:`REFERENCE_COLUMNS`).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_simpo.data.batching import Pair
from megatron_simpo.data.rows import (
    ConversationRow,
    IdsRow,
    RowError,
    TextRow,
    detect_schema,
    is_tie,
    parse_row,
)
from megatron_simpo.data.sources import describe, fingerprint, iter_rows
from megatron_simpo.data.tokenize import (
    RULES_VERSION,
    render_conversation,
    texts_to_encode,
    tokenize_text,
    truncate,
)
from megatron_simpo.errors import DataError
from megatron_simpo.progress import progress

#: Layout of a prepared directory: 2 adds the ``where`` column and the tokenizer fingerprint.
PREPARE_VERSION = 2
MARKER = "prepared.json"


@dataclass(frozen=True)
class PrepareOptions:
    """What shapes the prepared result (all of it is part of the fingerprint)."""

    schema: str = "auto"
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"
    truncation_rule: str = "trl"
    skip_invalid: bool = False
    keep_ties: bool = False
    vocab_size: int | None = None

    @classmethod
    def from_flags(
        cls, d: Any, *, max_length: int | None, vocab_size: int | None
    ) -> PrepareOptions:
        """The options of ``d``, a ``DataConfig`` or ``prepare``'s parsed arguments (the same
        field names: ``data_schema``, ``max_prompt_length``, ``truncation_*``, ...)."""
        return cls(
            schema=d.data_schema,
            max_length=max_length,
            max_prompt_length=d.max_prompt_length,
            truncation_mode=d.truncation_mode,
            truncation_rule=d.truncation_rule,
            skip_invalid=d.skip_invalid,
            keep_ties=d.keep_ties,
            vocab_size=vocab_size,
        )


_TOKENIZERS: dict[str, Any] = {}


def load_tokenizer(path: str) -> Any:
    """An HF tokenizer from a local directory (remote code never runs)."""
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        try:
            _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except Exception as e:  # transformers raises OSError/ValueError variants
            raise DataError(f"--tokenizer {path}: cannot load a tokenizer there ({e})") from None
    return _TOKENIZERS[path]


class LazyTokenizer:
    """The tokenizer of ``path``, loaded on first use: pre-tokenised rows never use it, so they
    never import transformers (``pip install .`` on a cluster, pre-tokenised data)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy/pickle probes must not load a tokenizer
            raise AttributeError(name)
        return getattr(load_tokenizer(self.path), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return load_tokenizer(self.path)(*args, **kwargs)

    def __len__(self) -> int:  # special methods bypass __getattr__
        return tokenizer_size(self.path)


def tokenizer_size(path: str) -> int:
    """``len(tokenizer)`` (added tokens included), read from ``tokenizer.json`` when there is
    one so that checking pre-tokenised ids needs no transformers import."""
    f = Path(path) / "tokenizer.json"
    if f.is_file():
        spec = json.loads(f.read_text())
        vocab = (spec.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):  # BPE / WordLevel / WordPiece (Unigram: a list, below)
            ids = list(vocab.values()) + [t["id"] for t in spec.get("added_tokens", [])]
            return max(ids) + 1
    return len(load_tokenizer(path))


def needs_tokenizer(row: Any, schema: str) -> bool:
    """Whether a raw row is text or a conversation (pre-tokenised and invalid rows: False)."""
    if schema != "auto":
        return schema != "pretokenized"
    try:
        return detect_schema(row) != "pretokenized"
    except RowError:
        return False


def tokenizer_fingerprint(tok: Any) -> dict[str, Any]:
    """What identifies a tokenizer's ids: a hash of its vocabulary (added tokens included),
    BOS/EOS/pad ids and chat template, and its size. Read from the loaded tokenizer, not its
    files, so the same tokenizer saved elsewhere (e.g. next to a converted checkpoint) matches."""
    import hashlib

    parts = {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
        "chat_template": getattr(tok, "chat_template", None),
    }
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]
    return {"sha256": digest, "vocab_size": len(tok)}


def parse_and_render(raw: Any, tok: Any, opts: PrepareOptions) -> TextRow | IdsRow:
    """Validates a row and renders conversations to text (raises RowError)."""
    row = parse_row(raw, opts.schema, opts.vocab_size)
    if isinstance(row, IdsRow):
        return row
    if tok is None:
        raise RowError("no_tokenizer", "text rows need --tokenizer DIR")
    return render_conversation(tok, row) if isinstance(row, ConversationRow) else row


def process_row(
    raw: Any,
    tok: Any,
    opts: PrepareOptions,
    encoded: dict[str, list[int]] | None = None,
    parsed: TextRow | IdsRow | RowError | None = None,
) -> dict[str, Any]:
    """One row -> a result record (status ``kept``, ``tie``, ``empty_after_truncation`` or
    ``invalid:<reason>`` with a message). ``parsed``/``encoded``: work already done in a batch."""
    out: dict[str, Any] = {
        "status": "kept",
        "message": "",
        "truncated": False,
        "max_id": -1,
        "prompt_ids": [],
        "chosen_ids": [],
        "rejected_ids": [],
        "weight": 1.0,
    }
    try:
        if isinstance(parsed, RowError):
            raise parsed
        row = parsed if parsed is not None else parse_and_render(raw, tok, opts)
        if is_tie(row) and not opts.keep_ties:
            return {**out, "status": "tie", "message": "chosen and rejected are identical"}
        if isinstance(row, IdsRow):
            p, c, r = list(row.prompt_ids), list(row.chosen_ids), list(row.rejected_ids)
            if tok is not None:
                check_ids_in_tokenizer(row, len(tok))
        else:
            p, c, r = tokenize_text(tok, row, encoded)
            if opts.vocab_size is not None and max(p + c + r) >= opts.vocab_size:
                raise RowError(
                    "id_out_of_vocab",
                    f"the tokenizer produced id {max(p + c + r)} "
                    f">= the model's vocabulary size {opts.vocab_size}; use the "
                    "model's own tokenizer",
                )
        if opts.max_length is not None:
            # Pre-tokenised rows (never a tokenizer) take the first prompt token as BOS:
            # it is never predicted, and pre-tokenised prompts start with BOS by convention.
            bos = p[0] if isinstance(row, IdsRow) else getattr(tok, "bos_token_id", None)
            p, c, r, cut = truncate(
                p,
                c,
                r,
                max_length=opts.max_length,
                max_prompt_length=opts.max_prompt_length,
                mode=opts.truncation_mode,
                bos=bos,
                rule=opts.truncation_rule,
            )
            out["truncated"] = cut
        if not c or not r:
            return {
                **out,
                "status": "empty_after_truncation",
                "message": "a response is empty after truncation",
            }
        if c == r and not opts.keep_ties:
            # Identical responses give zero gradient and a reward margin of exactly 0.
            status = "tie_after_truncation" if out["truncated"] else "tie"
            return {**out, "status": status, "message": "chosen and rejected are identical"}
        return {
            **out,
            "prompt_ids": p,
            "chosen_ids": c,
            "rejected_ids": r,
            "weight": row.weight,
            "max_id": max(p + c + r),
        }
    except RowError as e:
        return {**out, "status": f"invalid:{e.reason}", "message": str(e)}


def check_ids_in_tokenizer(row: IdsRow, n_tokens: int) -> None:
    """Raises RowError for the first id of a pre-tokenised row outside the tokenizer's
    vocabulary (``len(tokenizer)``, added tokens included)."""
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for i, t in enumerate(getattr(row, name)):
            if t >= n_tokens:
                raise RowError(
                    "id_out_of_vocab",
                    f"field '{name}'[{i}] = {t} is outside the tokenizer's vocabulary "
                    f"[0, {n_tokens}); the ids were made with another tokenizer: re-tokenise, "
                    "or pass the tokenizer that made them",
                )


def _map_batch(batch: dict[str, list], tokenizer: str | None, opts: dict) -> dict[str, list]:
    options = PrepareOptions(**opts)
    tok = LazyTokenizer(tokenizer) if tokenizer else None
    # Parse and render every row first, then encode all texts of the batch in one call (the
    # fast tokenizers batch in Rust), then finish row by row.
    parsed: list = []
    for raw, bad_reason in zip(batch["raw"], batch["bad_reason"]):
        if bad_reason:
            parsed.append(None)
            continue
        try:
            parsed.append(parse_and_render(json.loads(raw), tok, options))
        except RowError as e:
            parsed.append(e)
    texts = sorted({t for p in parsed if isinstance(p, TextRow) for t in texts_to_encode(p)})
    encoded = {}
    if texts:
        encoded = dict(zip(texts, tok(texts, add_special_tokens=False)["input_ids"]))
    results = []
    for p, bad_reason, bad_msg in zip(parsed, batch["bad_reason"], batch["bad_message"]):
        if bad_reason:
            results.append(
                process_row(None, None, options)
                | {"status": f"invalid:{bad_reason}", "message": bad_msg}
            )
        else:
            results.append(process_row(None, tok, options, encoded, p))
    return {k: [r[k] for r in results] for k in results[0]}


def prepare(
    data_path: str,
    output: str | Path,
    *,
    tokenizer: str | None,
    opts: PrepareOptions,
    split: str | None = None,
    num_workers: int = 1,
    quiet: bool = False,
) -> dict[str, Any]:
    """Runs the pipeline into ``output``; returns the summary. Raises DataError."""
    import datasets

    if (
        opts.max_length is not None
        and opts.max_prompt_length is not None
        and (opts.max_prompt_length >= opts.max_length)
    ):
        raise DataError(
            f"--max-prompt-length {opts.max_prompt_length} must be smaller than "
            f"--max-length {opts.max_length}"
        )
    wheres, raws, reasons, messages = [], [], [], []
    any_text = False
    reading = f"prepare: reading {Path(data_path).name}"
    rows = progress(iter_rows(data_path, split), reading, unit="rows", enabled=not quiet)
    for where, row in rows:
        wheres.append(where)
        if isinstance(row, tuple):
            raws.append("")
            reasons.append(row[0])
            messages.append(row[1])
        else:
            raws.append(json.dumps(row, default=str))
            any_text = any_text or needs_tokenizer(row, opts.schema)
            reasons.append("")
            messages.append("")
    if not wheres:
        raise DataError(f"--data-path {data_path}: holds no rows")
    if tokenizer and any_text:
        load_tokenizer(tokenizer)  # fail early on a bad --tokenizer
    ds = datasets.Dataset.from_dict(
        {
            "where": wheres,
            "row": list(range(len(wheres))),
            "raw": raws,
            "bad_reason": reasons,
            "bad_message": messages,
        }
    )
    if quiet:
        datasets.disable_progress_bars()
    ds = ds.map(
        _map_batch,
        batched=True,
        batch_size=512,
        num_proc=num_workers if num_workers > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "opts": asdict(opts)},
        remove_columns=["raw", "bad_reason", "bad_message"],
        desc=f"prepare {Path(data_path).name}",
        load_from_cache_file=False,
    )
    statuses = ds["status"]
    for i, s in enumerate(statuses):  # problems of the setup, not of a row: never skipped
        if s in ("invalid:no_chat_template", "invalid:no_tokenizer"):
            raise DataError(
                f"--data-path {data_path} ({ds[i]['where']}): {ds[i]['message']}"
                + (f" (--tokenizer {tokenizer})" if tokenizer else "")
            )
    if not opts.skip_invalid:
        for i, s in enumerate(statuses):
            if s.startswith("invalid:"):
                raise DataError(
                    f"{ds[i]['where']}: {ds[i]['message']}. Fix the row, or pass "
                    "--skip-invalid to skip invalid rows"
                )
    counts = Counter(statuses)
    keep = [i for i, s in enumerate(statuses) if s == "kept"]
    kept = ds.select(keep)
    summary = {
        "source": describe(data_path),
        "rows": len(statuses),
        "kept": counts.pop("kept", 0),
        "dropped": dict(sorted(counts.items())),
        "truncated": int(sum(kept["truncated"])),
        "max_id": max(kept["max_id"], default=-1),
    }
    if not summary["kept"]:
        raise DataError(
            f"--data-path {data_path}: no pairs left after validation ({summary['dropped']})"
        )
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    columns = ["row", "where", "prompt_ids", "chosen_ids", "rejected_ids", "weight"]
    kept.select_columns(columns).save_to_disk(str(tmp / "pairs"))
    info = {
        "version": PREPARE_VERSION,
        "summary": summary,
        "options": asdict(opts),
        "tokenizer": tokenizer,
        # Only a tokenizer that tokenised text is loaded (pre-tokenised rows never import
        # transformers); their ids were checked against its size.
        "tokenizer_fingerprint": tokenizer_fingerprint(load_tokenizer(tokenizer))
        if tokenizer and any_text
        else None,
        "data_path": data_path,
        "split": split,
    }
    (tmp / MARKER).write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if not quiet:
        print(format_summary(summary), flush=True)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"prepare: {s['source']}",
        f"  {'rows read':<32}{s['rows']:>10,}",
        f"  {'kept':<32}{s['kept']:>10,}",
    ]
    for reason, n in s["dropped"].items():
        label = ("skipped " if reason.startswith("invalid:") else "dropped ") + reason
        lines.append(f"  {label:<32}{n:>10,}")
    lines.append(f"  {'truncated (kept)':<32}{s['truncated']:>10,}")
    return "\n".join(lines)


#: Columns that ``megatron-simpo score-reference`` adds to ``OUT/pairs``: the reference
#: model's summed log-prob of each response's tokens (float64: it holds the scored fp32-or-wider
#: sum exactly, and the DPO family subtracts it from the policy's in float64) and their count.
REFERENCE_COLUMNS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_chosen_tokens",
    "ref_rejected_tokens",
)
#: Key of ``prepared.json`` describing them (reference checkpoint, tokenisation fingerprints).
REFERENCE_KEY = "reference"


def pairs_dir(info: dict[str, Any]) -> str:
    """The subdirectory holding the Arrow columns (``score-reference`` writes a new one and then
    switches ``prepared.json`` to it, so that a crash never leaves a half-written dataset)."""
    return info.get("pairs_dir", "pairs")


def write_reference_columns(
    path: str | Path, columns: dict[str, Sequence[float] | Sequence[int]], record: dict[str, Any]
) -> None:
    """Adds (or replaces) :data:`REFERENCE_COLUMNS` of the prepared dataset at ``path``, one value
    per pair in dataset order, and records ``record`` under :data:`REFERENCE_KEY`.

    Atomic: the dataset with the new columns is saved to a fresh subdirectory, then
    ``prepared.json`` is replaced (tmp file + rename) to point at it, then the old subdirectory is
    removed. A crash before the rename leaves the dataset as it was (the leftover is removed by
    the next call); after it, the new dataset is complete.
    """
    import datasets

    path = Path(path)
    info = json.loads((path / MARKER).read_text())
    old = pairs_dir(info)
    new = "pairs.1" if old == "pairs" else "pairs"
    ds = datasets.load_from_disk(str(path / old))
    if set(columns) != set(REFERENCE_COLUMNS):
        raise ValueError(f"expected the columns {REFERENCE_COLUMNS}, got {sorted(columns)}")
    if any(len(v) != len(ds) for v in columns.values()):
        raise ValueError(f"{path}: {len(ds)} pairs but {[len(v) for v in columns.values()]} values")
    ds = ds.remove_columns([c for c in REFERENCE_COLUMNS if c in ds.column_names])
    for name in REFERENCE_COLUMNS:
        kind = "float64" if name.endswith("_logps") else "int32"
        ds = ds.add_column(name, list(columns[name]), feature=datasets.Value(kind))
    if (path / new).exists():
        shutil.rmtree(path / new)  # a leftover of an interrupted earlier call
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a bar per save clutters the job's log
    try:
        ds.save_to_disk(str(path / new))
    finally:
        if bars:
            datasets.utils.enable_progress_bars()
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps({**info, "pairs_dir": new, REFERENCE_KEY: record}, indent=1))
    tmp.replace(path / MARKER)
    shutil.rmtree(path / old)


def tokenisation_of(info: dict[str, Any]) -> dict[str, Any]:
    """The tokenisation a prepared dataset's ids come from (its ``prepared.json``): the tokenizer
    fingerprint and the options that shape the ids (max length, truncation)."""
    opts = info.get("options", {})
    keys = ("schema", "max_length", "max_prompt_length", "truncation_mode", "truncation_rule")
    fp = info.get("tokenizer_fingerprint") or {}
    return {
        "tokenizer_sha256": fp.get("sha256"),
        "version": info.get("version"),
        **{k: opts.get(k) for k in keys},
    }


class PreparedPairs(Sequence[Pair]):
    """A prepared dataset as a sequence of :class:`Pair` (memory-mapped, rows read on demand);
    with :data:`REFERENCE_COLUMNS` each pair carries its reference log-probs."""

    def __init__(self, path: str | Path) -> None:
        import datasets

        self.path = Path(path)
        self.info = json.loads((self.path / MARKER).read_text())
        self._ds = datasets.load_from_disk(str(self.path / pairs_dir(self.info)))
        self.has_reference = set(REFERENCE_COLUMNS) <= set(self._ds.column_names)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i):  # type: ignore[override]
        r = self._ds[int(i)]
        return Pair(
            tuple(r["prompt_ids"]),
            tuple(r["chosen_ids"]),
            tuple(r["rejected_ids"]),
            float(r["weight"]),
            float(r["ref_chosen_logps"]) if self.has_reference else None,
            float(r["ref_rejected_logps"]) if self.has_reference else None,
        )

    def source_rows(self) -> list[int]:
        """Row number (0-based, in the source) of each pair."""
        return list(self._ds["row"])


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def cache_key(
    data_path: str, tokenizer: str | None, opts: PrepareOptions, split: str | None
) -> str:
    paths = [data_path] + (
        [str(p) for p in sorted(Path(tokenizer).glob("*")) if p.is_file()] if tokenizer else []
    )
    return fingerprint(
        {
            "version": PREPARE_VERSION,
            "rules": RULES_VERSION,
            "opts": asdict(opts),
            "split": split,
            "source": data_path,
        },
        paths,
    )
