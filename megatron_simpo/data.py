"""Pre-tokenised preference pairs, layout-independent global batches, and micro-batch collation.

File format (JSONL, one pair per line; kept for good — Megatron users pre-tokenise)::

    {"prompt_ids": [1, 415, 2936], "chosen_ids": [9062, 2], "rejected_ids": [1048, 2]}

Response ids exclude the prompt and are used as given (no BOS/EOS added). An optional ``weight``
(float) scales the pair's loss. The model input of each sequence is ``prompt + response``; only
response tokens are scored.

Batching contract: global batch ``i`` is the same set of pairs whatever the parallel layout
(positions ``[i*G, (i+1)*G)`` of a stream of per-epoch permutations seeded by ``--seed``);
data-parallel rank ``d`` of ``D`` takes the ``d``-th contiguous ``G/D`` slice and splits it into
micro-batches. Each micro-batch holds whole pairs: chosen rows first, then rejected rows, padded on
the right to one length for the whole global batch (pipeline stages exchange fixed shapes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_simpo.errors import DataError


@dataclass(frozen=True)
class Pair:
    """One preference pair of token ids."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    weight: float = 1.0


_ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _check_ids(value: object, where: str, name: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise DataError(
            f"{where}: field '{name}' must be a list of token ids, got {type(value).__name__}"
        )
    for i, tok in enumerate(value):
        if not isinstance(tok, int) or isinstance(tok, bool):
            raise DataError(f"{where}: field '{name}'[{i}] = {tok!r} is not an integer token id")
        if tok < 0 or tok >= vocab_size:
            raise DataError(
                f"{where}: field '{name}'[{i}] = {tok} is outside the vocabulary "
                f"[0, {vocab_size}); "
                "re-tokenise with the model's tokenizer or fix model.vocab_size"
            )
    return tuple(value)


def parse_pair(row: object, where: str, vocab_size: int, seq_length: int) -> Pair:
    """Validates one decoded JSON row; ``where`` is ``file:line`` for messages."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object with fields {_ID_FIELDS}")
    missing = [f for f in _ID_FIELDS if f not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; each pair needs {_ID_FIELDS}")
    prompt, chosen, rejected = (_check_ids(row[f], where, f, vocab_size) for f in _ID_FIELDS)
    if not prompt:
        raise DataError(
            f"{where}: field 'prompt_ids' is empty; the first token is never "
            "predicted, so start the prompt with at least BOS"
        )
    for name, resp in (("chosen_ids", chosen), ("rejected_ids", rejected)):
        if not resp:
            raise DataError(
                f"{where}: field '{name}' is empty; a response needs at least one "
                "token (SimPO's length-normalised reward of an empty response is 0/0)"
            )
        if len(prompt) + len(resp) > seq_length:
            raise DataError(
                f"{where}: prompt + {name} is {len(prompt) + len(resp)} tokens, longer than "
                f"--seq-length {seq_length}; raise --seq-length or truncate the data"
            )
    weight = row.get("weight", 1.0)
    if (
        not isinstance(weight, int | float)
        or isinstance(weight, bool)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise DataError(f"{where}: field 'weight' must be a finite number >= 0, got {weight!r}")
    return Pair(prompt, chosen, rejected, float(weight))


def read_pretokenized_jsonl(path: str | Path, vocab_size: int, seq_length: int) -> list[Pair]:
    """Reads and validates every line; the first bad line raises :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data-path {path}: no such file")
    pairs = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})"
                ) from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            pairs.append(parse_pair(row, where, vocab_size, seq_length))
    if not pairs:
        raise DataError(f"--data-path {path}: the file holds no pairs")
    return pairs


def global_batch_indices(
    num_pairs: int, global_batch_size: int, iteration: int, seed: int
) -> list[int]:
    """Pair indices of global batch ``iteration`` (0-based): layout-independent.

    The stream is epoch 0's permutation, then epoch 1's, ...; each epoch is reshuffled with
    ``seed + epoch``. A batch may straddle two epochs.
    """
    start = iteration * global_batch_size
    out: list[int] = []
    while len(out) < global_batch_size:
        epoch, offset = divmod(start + len(out), num_pairs)
        gen = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(num_pairs, generator=gen).tolist()
        out.extend(perm[offset : offset + global_batch_size - len(out)])
    return out


def collate(pairs: list[Pair], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Builds one micro-batch of whole pairs (rows: chosen of each pair, then rejected).

    Sequence ``s = prompt + response`` becomes input ``s[:-1]`` and targets ``s[1:]``; a target
    is scored iff it is a response token.

    Returns:
        ``tokens`` ``[2b, seq_len]`` int64, ``labels`` ``[2b, seq_len]`` int64, ``loss_mask``
        ``[2b, seq_len]`` float, ``position_ids`` ``[2b, seq_len]`` int64, ``weights`` ``[b]``,
        ``lengths`` ``[2b]`` response lengths, ``seq_tokens`` ``[2b]`` prompt+response lengths.
    """
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
        (p.prompt_ids, p.rejected_ids) for p in pairs
    ]
    n = len(rows)
    tokens = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, seq_len), dtype=torch.float32)
    lengths = torch.zeros(n, dtype=torch.long)
    seq_tokens = torch.zeros(n, dtype=torch.long)
    for r, (prompt, resp) in enumerate(rows):
        seq = torch.tensor(prompt + resp, dtype=torch.long)
        m = len(seq) - 1
        if m > seq_len:
            raise ValueError(f"sequence of {m + 1} tokens does not fit seq_len {seq_len}")
        tokens[r, :m] = seq[:-1]
        labels[r, :m] = seq[1:]
        loss_mask[r, len(prompt) - 1 : m] = 1.0
        lengths[r] = len(resp)
        seq_tokens[r] = len(seq)
    if bool((loss_mask.sum(-1) == 0).any()):
        raise ValueError("a pair without response tokens reached collation; validate the data")
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq_len).unsqueeze(0).expand(n, -1).contiguous(),
        "weights": torch.tensor([p.weight for p in pairs], dtype=torch.float32),
        "lengths": lengths,
        "seq_tokens": seq_tokens,
    }


class PairBatcher:
    """Serves this data-parallel rank's micro-batches of each global batch."""

    def __init__(
        self,
        pairs: list[Pair],
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        pad_multiple: int = 1,
    ) -> None:
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch must be divisible by micro batch x data-parallel size")
        self.pairs = pairs
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.pad_multiple = pad_multiple

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def seq_len(self, batch: list[Pair]) -> int:
        """Padded input length for a global batch (same on every rank of the layout)."""
        longest = (
            max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in batch) - 1
        )
        return -(-longest // self.pad_multiple) * self.pad_multiple

    def micro_batches(self, iteration: int) -> tuple[list[dict[str, torch.Tensor]], int]:
        """This rank's micro-batches of global batch ``iteration`` and their padded length."""
        idx = global_batch_indices(len(self.pairs), self.global_batch_size, iteration, self.seed)
        batch = [self.pairs[i] for i in idx]
        seq_len = self.seq_len(batch)
        per_rank = self.global_batch_size // self.dp_size
        mine = batch[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        mbs = self.micro_batch_size
        return [collate(mine[i : i + mbs], seq_len) for i in range(0, per_rank, mbs)], seq_len
