"""Packed rows as one THD stream: Transformer Engine's packed-sequence path.

Transformer Engine takes no explicit attention mask; packed sequences reach its fused attention
as Megatron-Core's ``PackedSeqParams`` (``qkv_format='thd'``, cumulative sequence lengths
``cu_seqlens``): the micro-batch is one stream of ``t`` tokens (``[1, t]`` inputs, ``[t, 1, h]``
activations), every sequence attends causally to itself only, and RoPE restarts at position 0 in
each sequence (Megatron applies it per ``cu_seqlens`` span, fused or not). Both are exactly what a
padded row per sequence computes, so plain packing (``--pack-pairs``, each of prompt+chosen and
prompt+rejected its own sequence) needs nothing else. Prefix sharing does not fit: its rejected
branch attends to the prompt *before* the chosen branch, which no causal span allows
(``defaults.py`` falls back to plain packing under TE, with the reason logged).

The rows of :func:`megatron_simpo.data.packing.collate_packed` are flattened row after row: each
segment of a row is one sequence, and a row's trailing padding is one more (its tokens are never
scored; a span of its own keeps every softmax row non-empty and ``cu_seqlens[-1] == t``, so no
``cu_seqlens_*_padded`` is needed). ``t = rows * s`` keeps the shapes pipeline stages exchange
(``[s * rows, 1, h]`` instead of ``[s, rows, h]``); ``s`` is already a multiple of the TP size
under sequence parallelism, as the sequence split needs. All of it is computed on the host from
the CPU batch, so ``max_seqlen`` (a Python int TE wants) costs no device synchronisation.
"""

from __future__ import annotations

import torch

from megatron_simpo.errors import ConfigError

#: Keys of a packed micro-batch laid out ``[rows, s]`` (flattened to ``[1, rows * s]``).
ROW_KEYS = (
    "tokens",
    "labels",
    "position_ids",
    "segment_ids",
    "branch_ids",
    "seq_index",
    "loss_mask",
)


def cu_seqlens_from(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths of packed rows read as one stream.

    Args:
        segment_ids: ``[rows, s]`` int, segment number of each token (0: padding), as
            ``collate_packed`` writes them. A sequence is a maximal run of one id within a row.

    Returns:
        ``cu_seqlens`` ``[n + 1]`` int32 (0 first, ``rows * s`` last) and the longest sequence.
    """
    rows, s = segment_ids.shape
    starts = torch.ones(rows, s, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = starts.flatten().nonzero().flatten()
    total = torch.tensor([rows * s], device=segment_ids.device)
    cu = torch.cat([first, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flatten_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with its ``[rows, s]`` tensors as ``[1, rows * s]`` (others unchanged).

    Raises:
        ConfigError: the rows are prefix-shared (a branch attends across a span boundary).
    """
    if bool((batch["branch_ids"] != 0).any()):
        raise ConfigError(
            "--prefix-sharing has no THD (Transformer Engine) path: its mask is not causal per "
            "sequence; use --no-prefix-sharing or --attention-backend sdpa"
        )
    return {k: (v.reshape(1, -1) if k in ROW_KEYS else v) for k, v in batch.items()}


def thd_batch(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], object]:
    """A packed micro-batch (on the host) as one THD stream and its ``PackedSeqParams``.

    Returns:
        The flattened batch (:func:`flatten_rows`) and Megatron-Core's ``PackedSeqParams`` with
        ``cu_seqlens`` on the CPU (the caller moves them with the batch: :func:`to_device`).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = cu_seqlens_from(batch["segment_ids"])
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    return flatten_rows(batch), params


def to_device(params, device: torch.device):
    """``params`` with its ``cu_seqlens`` moved to ``device`` (the other fields are ints)."""
    import dataclasses

    return dataclasses.replace(
        params,
        cu_seqlens_q=params.cu_seqlens_q.to(device, non_blocking=True),
        cu_seqlens_kv=params.cu_seqlens_kv.to(device, non_blocking=True),
    )


def segment_of(cu_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    """``[t]`` index of the ``cu_seqlens`` span each token is in."""
    positions = torch.arange(t, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def thd_allowed(cu_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    """``[t, t]`` bool, True where query ``q`` may attend key ``k``: same span and ``k <= q``.

    The dense reference of what TE computes from ``cu_seqlens`` (``SDPAttention``'s THD path).
    """
    seg = segment_of(cu_seqlens, t)
    causal = torch.ones(t, t, dtype=torch.bool, device=cu_seqlens.device).tril()
    return causal & (seg.unsqueeze(1) == seg.unsqueeze(0))
