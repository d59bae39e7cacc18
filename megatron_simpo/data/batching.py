"""Layout-independent global batches and micro-batch collation of tokenised pairs.

Batching contract: global batch ``i`` is the same set of pairs whatever the parallel layout
(positions ``[i*G, (i+1)*G)`` of a stream of per-epoch permutations seeded by ``--seed``);
data-parallel rank ``d`` of ``D`` takes the ``d``-th contiguous ``G/D`` slice and splits it into
micro-batches. Each micro-batch holds whole pairs: chosen rows first, then rejected rows, padded on
the right to its longest sequence, rounded up to the TP size under sequence parallelism. Under
pipeline parallelism the stages send each micro-batch's shape first (Megatron-Core's
``variable_seq_lengths``) and widths are also rounded up to ``--pipeline-pad-multiple`` (64: few
distinct shapes), capped at ``--seq-length``; with ``--no-variable-seq-lengths`` the stages
exchange one fixed shape, every micro-batch padded to the longest of the rank's slice.
With ``--pack-pairs`` / ``--prefix-sharing`` a micro-batch holds the same pairs in packed rows
instead (``megatron_simpo/data/packing.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_simpo.config import ParallelConfig
from megatron_simpo.data.packing import collate_packed, pack_rows, row_width
from megatron_simpo.data.reference import with_reference
from megatron_simpo.loss import batch_totals


@dataclass(frozen=True)
class Pair:
    """One preference pair of token ids."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    weight: float = 1.0
    ref_chosen_logp: float | None = None
    """Summed log-prob of the chosen response tokens under the reference model (DPO family;
    written by ``megatron-simpo score-reference``), None when the dataset has none."""
    ref_rejected_logp: float | None = None
    """The same for the rejected response."""


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


def padding_for(parallel: ParallelConfig, variable_seq_lengths: bool) -> dict[str, int | bool]:
    """:class:`PairBatcher`'s padding arguments for a layout.

    Sequence parallelism splits the sequence over the TP ranks (widths a multiple of TP). Pipeline
    stages either exchange each micro-batch's shape (``variable_seq_lengths``, from
    ``megatron_simpo.parallel.variable_seq_lengths``: widths rounded to ``pipeline_pad_multiple``)
    or one shape for the whole slice (``uniform_length``).
    """
    p = parallel
    pp = p.pipeline_model_parallel_size > 1
    return {
        "pad_multiple": p.tensor_model_parallel_size if p.sequence_parallel else 1,
        "uniform_length": pp and not variable_seq_lengths,
        "bucket": p.pipeline_pad_multiple if pp and variable_seq_lengths else 1,
    }


def collate(pairs: list[Pair], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Builds one micro-batch of whole pairs (rows: chosen of each pair, then rejected).

    Sequence ``s = prompt + response`` becomes input ``s[:-1]`` and targets ``s[1:]``; a target
    is scored iff it is a response token.

    Returns:
        ``tokens`` ``[2b, seq_len]`` int64, ``labels`` ``[2b, seq_len]`` int64, ``loss_mask``
        ``[2b, seq_len]`` float, ``position_ids`` ``[2b, seq_len]`` int64, ``weights`` ``[b]``,
        ``lengths`` ``[2b]`` response lengths, ``seq_tokens`` ``[2b]`` prompt+response lengths;
        with reference log-probs also ``ref_logps`` ``[2b]`` float64 (:func:`with_reference`).
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
    batch = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq_len).unsqueeze(0).expand(n, -1).contiguous(),
        "weights": torch.tensor([p.weight for p in pairs], dtype=torch.float32),
        "lengths": lengths,
        "seq_tokens": seq_tokens,
    }
    return with_reference(batch, pairs)


class PairBatcher:
    """Serves this data-parallel rank's micro-batches of each global batch."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        pad_multiple: int = 1,
        uniform_length: bool = False,
        bucket: int = 1,
        pack_pairs: bool = False,
        prefix_sharing: bool = False,
        capacity: int | None = None,
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
        self.uniform_length = uniform_length
        # Widths rounded up to lcm(pad_multiple, bucket), but never beyond the capacity (rounded
        # to pad_multiple): bucketing must not pad more than the fixed-shape layout would.
        self.bucket = math.lcm(pad_multiple, bucket)
        # Packed rows (megatron_simpo/data/packing.py); capacity: --seq-length.
        self.pack_pairs = pack_pairs
        self.prefix_sharing = prefix_sharing
        self.capacity = capacity
        if pack_pairs and not capacity:
            raise ValueError("--pack-pairs needs the row capacity (--seq-length)")

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def seq_len(self, batch: list[Pair]) -> int:
        """Padded input length of some pairs (their longest sequence, rounded up)."""
        longest = (
            max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in batch) - 1
        )
        return self._width(longest)

    def _width(self, longest: int) -> int:
        """``longest`` input positions rounded up to the bucket, capped at the capacity."""
        width = _round_up(longest, self.bucket)
        if self.capacity:
            width = min(width, _round_up(max(self.capacity, longest), self.pad_multiple))
        return width

    def micro_batches(self, iteration: int) -> tuple[list[dict[str, torch.Tensor]], int]:
        """This rank's micro-batches of global batch ``iteration`` and the longest padded length.

        Each micro-batch is padded to its own longest sequence (rounded up to the bucket), or,
        with ``uniform_length`` (pipeline parallelism with fixed shapes), all to the longest of
        this rank's slice — the same on every stage of its pipeline, which holds the same slice.
        """
        idx = global_batch_indices(len(self.pairs), self.global_batch_size, iteration, self.seed)
        per_rank = self.global_batch_size // self.dp_size
        mine = [self.pairs[i] for i in idx[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]]
        mbs = self.micro_batch_size
        groups = [mine[i : i + mbs] for i in range(0, per_rank, mbs)]
        if self.pack_pairs or self.prefix_sharing:
            batches, seq_len = self._packed(groups)
        elif self.uniform_length:
            seq_len = self.seq_len(mine)
            batches = [collate(g, seq_len) for g in groups]
        else:
            lengths = [self.seq_len(g) for g in groups]
            batches, seq_len = [collate(g, n) for g, n in zip(groups, lengths)], max(lengths)
        # The loss is a weighted mean over the *global* batch (megatron_simpo/loss.py): every
        # micro-batch carries its totals, the same on every rank.
        everyone = [self.pairs[i] for i in idx]
        totals = batch_totals([p.weight for p in everyone], [len(p.chosen_ids) for p in everyone])
        for mb in batches:
            mb["batch_totals"] = totals
        return batches, seq_len

    def _packed(self, groups: list[list[Pair]]) -> tuple[list[dict[str, torch.Tensor]], int]:
        """Packed micro-batches (``--pack-pairs`` / ``--prefix-sharing``): same pairs per
        micro-batch as the padded layout, in fewer, fuller rows. Under ``uniform_length`` every
        micro-batch gets the same row count and width (extra rows are all padding)."""
        kw = dict(
            capacity=self.capacity or 0,
            prefix_sharing=self.prefix_sharing,
            pack=self.pack_pairs,
            pad_multiple=self.pad_multiple,
        )
        widths: list[int | None] = [None] * len(groups)
        num_rows = None
        if self.uniform_length or self.bucket > self.pad_multiple:
            rows = [
                pack_rows(g, kw["capacity"], prefix_sharing=kw["prefix_sharing"], pack=kw["pack"])
                for g in groups
            ]
            if self.uniform_length:
                widths = [max(map(row_width, rows))] * len(groups)
                num_rows = max(map(len, rows))
            else:
                widths = [self._width(row_width(r)) for r in rows]
        batches = [
            collate_packed(g, width=w, num_rows=num_rows, **kw) for g, w in zip(groups, widths)
        ]
        return batches, max(mb["tokens"].shape[1] for mb in batches)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
