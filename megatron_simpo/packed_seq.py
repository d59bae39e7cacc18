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
``cu_seqlens_*_padded`` is needed). Under pipeline parallelism ``t = rows * s`` keeps the shapes
pipeline stages exchange (``[s * rows, 1, h]`` instead of ``[s, rows, h]``); ``s`` is already a
multiple of the TP size under sequence parallelism, as the sequence split needs. Without it
(PP1, :func:`thd_batch` with ``pad_multiple``) the rows' trailing padding is dropped: the stream
holds the real tokens, then one padding span up to a multiple of ``pad_multiple`` (64 and the
TP size: :func:`stream_multiple`), never longer than ``rows * s``. All of it is computed on the
host from the CPU batch, so ``max_seqlen`` (a Python int TE wants) costs no device
synchronisation.
"""

from __future__ import annotations

import math

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


#: What the dropped padding's tail is filled with (never scored; its own causal span).
_TAIL = {"seq_index": -1}


def stream_multiple(tensor_parallel: int) -> int:
    """What the THD stream's length is rounded up to without pipeline parallelism: 64 (tile
    sizes of the fused kernels and the GEMMs) and the TP size (sequence parallelism splits the
    stream over the TP ranks)."""
    return math.lcm(64, tensor_parallel)


def trimmed_stream(
    segment_ids: torch.Tensor, pad_multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' real tokens as one stream, their trailing padding dropped.

    Args:
        segment_ids: ``[rows, s]`` (0: padding, at the end of a row).
        pad_multiple: the stream is padded (one span of its own) to a multiple of this, capped
            at ``rows * s``.

    Returns:
        ``index`` ``[n]`` of the real tokens in the flattened rows, and ``cu_seqlens``
        ``[sequences + 1]`` int32 of the stream of ``t >= n`` tokens (``cu_seqlens[-1] == t``).
    """
    rows, s = segment_ids.shape
    starts = torch.ones(rows, s, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # a row start starts a sequence
    keep = (segment_ids != 0).flatten()
    index = keep.nonzero().flatten()
    n = index.numel()
    t = min(-(-n // pad_multiple) * pad_multiple, rows * s)
    first = starts.flatten()[index].nonzero().flatten()
    ends = [n, t] if t > n else [n]
    return index, torch.cat([first, torch.tensor(ends)]).to(torch.int32)


def _trim(flat: dict[str, torch.Tensor], index: torch.Tensor, t: int) -> dict:
    """The flattened ``[1, rows * s]`` tensors at ``index``, then a padding tail to ``t``."""
    out = {}
    for k, v in flat.items():
        if k not in ROW_KEYS:
            out[k] = v
            continue
        pad = t - index.numel()
        tail = torch.arange(pad) if k == "position_ids" else torch.full((pad,), _TAIL.get(k, 0))
        out[k] = torch.cat([v[0, index], tail.to(v.dtype)]).unsqueeze(0)
    return out


def thd_batch(
    batch: dict[str, torch.Tensor], pad_multiple: int | None = None
) -> tuple[dict[str, torch.Tensor], object]:
    """A packed micro-batch (on the host) as one THD stream and its ``PackedSeqParams``.

    Args:
        pad_multiple: None: the stream is the ``rows * s`` flattened rows (the fixed shapes
            pipeline stages exchange); else the rows' trailing padding is dropped and the stream
            padded to a multiple of it (:func:`trimmed_stream`).

    Returns:
        The flattened batch (:func:`flatten_rows`, ``[1, t]``) and Megatron-Core's
        ``PackedSeqParams`` with ``cu_seqlens`` on the CPU (the caller moves them with the
        batch: :func:`to_device`).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if pad_multiple is None:
        cu, longest = cu_seqlens_from(batch["segment_ids"])
        flat = flatten_rows(batch)
    else:
        index, cu = trimmed_stream(batch["segment_ids"], pad_multiple)
        longest = int((cu[1:] - cu[:-1]).max())
        flat = _trim(flatten_rows(batch), index, int(cu[-1]))
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    return flat, params


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
