"""Reference log-probs in a micro-batch (the DPO family): the values of each pair, written by
``megatron-simpo score-reference`` into ``Pair.ref_chosen_logp`` / ``ref_rejected_logp``, travel
with the pair into every collation (padded ``batching.collate``, packed and prefix-shared
``packing.collate_packed``) as ``ref_logps`` ``[2b]`` in the micro-batch's sequence order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class Pair(Protocol):
    """What this module reads of ``data.batching.Pair`` (a protocol, so that ``batching`` and
    ``packing`` can import this module without an import cycle)."""

    @property
    def ref_chosen_logp(self) -> float | None: ...
    @property
    def ref_rejected_logp(self) -> float | None: ...


def reference_logps(pairs: Sequence[Pair]) -> torch.Tensor | None:
    """The reference model's summed log-probs of some pairs' responses, ``[2b]`` float64 in the
    micro-batch's sequence order (chosen of each pair, then rejected; also packing's
    ``seq_index``), or None when the pairs have none. A mix is refused: the reference columns
    are all or nothing (``megatron-simpo score-reference`` writes them for every row)."""
    refs = [(p.ref_chosen_logp, p.ref_rejected_logp) for p in pairs]
    missing = sum(c is None or r is None for c, r in refs)
    if missing == len(refs):
        return None
    if missing:
        raise ValueError(
            f"{missing} of {len(refs)} pairs lack reference log-probs; rerun "
            "`megatron-simpo score-reference` on the whole dataset"
        )
    return torch.tensor([c for c, _ in refs] + [r for _, r in refs], dtype=torch.float64)


def with_reference(batch: dict[str, torch.Tensor], pairs: Sequence[Pair]) -> dict:
    """``batch`` (a micro-batch of ``pairs``, padded or packed) with ``ref_logps`` ``[2b]``
    (:func:`reference_logps`) when the pairs have reference log-probs; returns ``batch``."""
    ref = reference_logps(pairs)
    if ref is not None:
        batch["ref_logps"] = ref
    return batch
