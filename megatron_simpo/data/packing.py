"""Padding-free packing of pairs and prefix sharing: several sequences per micro-batch row.

The padded layout (``batching.collate``) spends compute on padding and computes every prompt
twice (once with chosen, once with rejected). Here a micro-batch row holds *segments*:

* a plain segment is one sequence ``prompt + response`` (inputs ``s[:-1]``, targets ``s[1:]``);
* a shared segment (``--prefix-sharing``) is one pair ``[P[:-1] | P[-1], C[:-1] | P[-1], R[:-1]]``:
  the prompt (but its last token) once, then a *chosen branch* and a *rejected branch*, each
  starting with the last prompt token. The last prompt position predicts both ``C[0]`` and
  ``R[0]``; repeating that one token (same id, same position, same context) gives each branch its
  own copy of that logit, so labels stay one per position and the loss head is unchanged.
  Position ids of both branches continue from the prompt's; a rejected token attends to the prompt
  and to its own branch, never to chosen.

Attention inside a row is decided by two ids per token, ``segment_ids`` and ``branch_ids``
(0: shared prompt, 1: chosen branch, 2: rejected branch): query ``q`` may attend key ``k`` iff
``k <= q``, both are in the same segment, and ``k`` is shared or in ``q``'s branch
(:func:`attention_mask_from`). Plain segments are all branch 0, so this is the block-diagonal
causal mask. Padding (segment 0, at the end of a row) attends causally to padding only, so no
softmax row is empty. RoPE positions restart per sequence through ``position_ids`` and
:func:`per_sequence_rope` (Megatron's GPTModel otherwise rotates by the index in the row).

With ``--pack-pairs`` the segments of a micro-batch's pairs are placed by first-fit-decreasing into
rows of ``capacity`` (``--seq-length``) input tokens; chosen and rejected of a pair stay adjacent in
one segment group unless together they exceed a row. Each target carries the index of its sequence
(``seq_index``: pair ``i`` chosen is ``i``, rejected is ``b + i``) so per-sequence means are
computed from packed rows (:func:`packed_sequence_logps`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron_simpo.data.reference import with_reference
from megatron_simpo.errors import ConfigError

SHARED, CHOSEN, REJECTED = 0, 1, 2
#: ``branch_ids`` values, by name.
BRANCH_NAMES = {SHARED: "shared", CHOSEN: "chosen", REJECTED: "rejected"}


@dataclass
class _Segment:
    """Input tokens of one segment and, per token, its target, position, branch and sequence."""

    tokens: list[int]
    labels: list[int]
    positions: list[int]
    branches: list[int]
    seq_index: list[int]  # -1: target not scored

    def __len__(self) -> int:
        return len(self.tokens)


def _plain_segment(prompt: Sequence[int], response: Sequence[int], seq_id: int) -> _Segment:
    """One sequence ``prompt + response`` as inputs ``s[:-1]`` / targets ``s[1:]``."""
    seq = [*prompt, *response]
    m = len(seq) - 1
    scored = [seq_id if i >= len(prompt) - 1 else -1 for i in range(m)]
    return _Segment(seq[:-1], seq[1:], list(range(m)), [SHARED] * m, scored)


def _shared_segment(
    prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], i: int, b: int
) -> _Segment:
    """Pair ``i`` of ``b`` as ``[P[:-1] | P[-1], C[:-1] | P[-1], R[:-1]]`` (module docstring)."""
    p = len(prompt)
    seg = _Segment(
        list(prompt[:-1]), list(prompt[1:]), list(range(p - 1)), [SHARED] * (p - 1), [-1] * (p - 1)
    )
    for branch, resp, seq_id in ((CHOSEN, chosen, i), (REJECTED, rejected, b + i)):
        n = len(resp)
        seg.tokens += [prompt[-1], *resp[:-1]]
        seg.labels += list(resp)
        seg.positions += list(range(p - 1, p - 1 + n))
        seg.branches += [branch] * n
        seg.seq_index += [seq_id] * n
    return seg


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items by decreasing size, each into the first bin it fits.

    Ties keep the input order, so the result is deterministic. An item larger than ``capacity``
    gets a bin of its own.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for idx in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        for k, free in enumerate(room):
            if sizes[idx] <= free:
                bins[k].append(idx)
                room[k] -= sizes[idx]
                break
        else:
            bins.append([idx])
            room.append(capacity - sizes[idx])
    return bins


def _items(
    pairs: Sequence, capacity: int, prefix_sharing: bool, pack: bool
) -> list[list[_Segment]]:
    """Units placed whole into rows: a pair's segment(s), split into its two sequences when the
    pair does not fit one row (packing) — a split pair is never prefix-shared."""
    b = len(pairs)
    items: list[list[_Segment]] = []
    for i, p in enumerate(pairs):
        plain = [
            _plain_segment(p.prompt_ids, p.chosen_ids, i),
            _plain_segment(p.prompt_ids, p.rejected_ids, b + i),
        ]
        if prefix_sharing:
            shared = _shared_segment(p.prompt_ids, p.chosen_ids, p.rejected_ids, i, b)
            if not pack or len(shared) <= capacity:
                items.append([shared])
            else:
                items.extend([s] for s in plain)
        elif sum(map(len, plain)) <= capacity:
            items.append(plain)
        else:
            items.extend([s] for s in plain)
    return items


def pack_rows(
    pairs: Sequence, capacity: int, *, prefix_sharing: bool, pack: bool
) -> list[list[_Segment]]:
    """The rows (lists of segments) of one micro-batch of ``pairs``.

    ``pack``: first-fit-decreasing into rows of ``capacity`` input tokens; otherwise one row per
    item (with ``prefix_sharing``: one row per pair).
    """
    items = _items(pairs, capacity, prefix_sharing, pack)
    if not pack:
        return items
    bins = first_fit_decreasing([sum(map(len, it)) for it in items], capacity)
    return [[seg for j in sorted(bin_) for seg in items[j]] for bin_ in bins]


def row_width(rows: list[list[_Segment]]) -> int:
    """Input tokens of the longest row."""
    return max(sum(map(len, r)) for r in rows)


_PACKED_KEYS = ("tokens", "labels", "position_ids", "segment_ids", "branch_ids", "seq_index")


def collate_packed(
    pairs: Sequence,
    *,
    capacity: int,
    prefix_sharing: bool,
    pack: bool,
    width: int | None = None,
    num_rows: int | None = None,
    pad_multiple: int = 1,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """One micro-batch of whole pairs in packed rows.

    Args:
        pairs: the micro-batch's ``Pair`` objects (``b`` of them).
        capacity: most input tokens per row when packing (``--seq-length``).
        prefix_sharing: one shared segment per pair (prompt computed once).
        pack: first-fit-decreasing of several pairs per row.
        width, num_rows: pad to at least this many columns / rows (pipeline parallelism: stages
            exchange fixed shapes); extra rows are all padding.
        pad_multiple: the width is rounded up to a multiple of it (sequence parallelism).

    Returns:
        ``tokens``, ``labels``, ``position_ids``, ``segment_ids``, ``branch_ids``, ``seq_index``
        (int64, ``[rows, s]``), ``loss_mask`` (float ``[rows, s]``), and, as in ``collate``,
        ``weights`` ``[b]``, ``lengths`` ``[2b]`` response lengths and ``seq_tokens`` ``[2b]``
        prompt+response lengths (chosen sequences first), and ``shared_prefix`` ``[b]``: the
        prompt positions computed once for both sequences of pair ``i`` (``len(prompt) - 1``
        when prefix-shared, else 0); with reference log-probs also ``ref_logps`` ``[2b]``
        (``data/reference.py``).
    """
    rows = pack_rows(pairs, capacity, prefix_sharing=prefix_sharing, pack=pack)
    s = max(row_width(rows), width or 0)
    s = -(-s // pad_multiple) * pad_multiple
    n = max(len(rows), num_rows or 0)
    # Built as flat Python lists, one tensor per key: a torch call per segment and key costs
    # more than the list work on the host.
    cols: dict[str, list[int]] = {k: [] for k in _PACKED_KEYS}
    for r in range(n):
        row = rows[r] if r < len(rows) else []
        col = 0
        for seg_no, seg in enumerate(row, start=1):
            cols["tokens"] += seg.tokens
            cols["labels"] += seg.labels
            cols["position_ids"] += seg.positions
            cols["segment_ids"] += [seg_no] * len(seg)
            cols["branch_ids"] += seg.branches
            cols["seq_index"] += seg.seq_index
            col += len(seg)
        # Padding: its own causal block, positions counting from 0 (never scored).
        pad = s - col
        cols["tokens"] += [pad_id] * pad
        cols["labels"] += [pad_id] * pad
        cols["position_ids"] += range(pad)
        cols["segment_ids"] += [0] * pad
        cols["branch_ids"] += [SHARED] * pad
        cols["seq_index"] += [-1] * pad
    out = {k: torch.tensor(v, dtype=torch.long).view(n, s) for k, v in cols.items()}
    out["loss_mask"] = (out["seq_index"] >= 0).float()
    b = len(pairs)
    counts = torch.bincount(out["seq_index"][out["seq_index"] >= 0], minlength=2 * b)
    if bool((counts == 0).any()):
        raise ValueError("a pair without response tokens reached collation; validate the data")
    resp = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    out["weights"] = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    out["lengths"] = torch.tensor(resp, dtype=torch.long)
    prompts = [len(p.prompt_ids) for p in pairs] * 2
    out["seq_tokens"] = torch.tensor([a + c for a, c in zip(prompts, resp)], dtype=torch.long)
    # Prompt positions computed once for both sequences of a prefix-shared pair (all but the
    # prompt's last token, which each branch repeats); 0 for a pair in plain segments. Honest
    # token counts and FLOPs subtract them (megatron_simpo/step.py, flops.py).
    shared = [0] * b
    for row in rows:
        for seg in row:
            if CHOSEN in seg.branches:
                shared[seg.seq_index[seg.branches.index(CHOSEN)]] = seg.branches.count(SHARED)
    out["shared_prefix"] = torch.tensor(shared, dtype=torch.long)
    return with_reference(out, pairs)


def attention_mask_from(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean attention mask (True: may *not* attend) of packed rows.

    Args:
        segment_ids, branch_ids: ``[rows, s]``.

    Returns:
        ``[rows, 1, s, s]`` bool: query ``q`` sees key ``k`` iff ``k <= q``, same segment, and
        ``k`` is in the shared prompt or in ``q``'s branch.
    """
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same_seg = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    key_branch = branch_ids.unsqueeze(1)  # [rows, 1, s]
    branch_ok = (key_branch == SHARED) | (branch_ids.unsqueeze(2) == key_branch)
    return ~(causal & same_seg & branch_ok).unsqueeze(1)


def packed_sequence_logps(
    token_logps: torch.Tensor, loss_mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence ``(sum, mean, count)`` ``[num_seqs]`` of target log-probs in packed rows.

    Args:
        token_logps: ``[rows, s]`` log pi of each target.
        loss_mask: ``[rows, s]`` 1 for scored (response) targets.
        seq_index: ``[rows, s]`` the sequence each scored target belongs to (-1: none).
        num_seqs: number of sequences (``2b``).
    """
    dtype = torch.promote_types(token_logps.dtype, torch.float32)
    mask = loss_mask.to(dtype).flatten()
    idx = seq_index.flatten().clamp(min=0)
    vals = token_logps.to(dtype).flatten() * mask
    total = torch.zeros(num_seqs, dtype=dtype, device=vals.device).index_add(0, idx, vals)
    count = torch.zeros(num_seqs, dtype=dtype, device=vals.device).index_add(0, idx, mask)
    # On an accelerator the check would stall the step (a host sync per micro-batch);
    # collate_packed has already refused such pairs on the host.
    if count.device.type == "cpu" and bool((count == 0).any()):
        raise ValueError(
            "a sequence with zero response tokens reached the SimPO loss; such pairs must be "
            "rejected by data validation (megatron_simpo.data)"
        )
    return total, total / count, count


@contextmanager
def per_sequence_rope(model: torch.nn.Module, position_ids: torch.Tensor) -> Iterator[None]:
    """Makes ``model``'s RoPE rotate each token by its ``position_ids`` entry during the block.

    Megatron-Core's GPTModel computes the rotary angles of positions ``0..s-1`` (``[s, 1, 1, d]``)
    and applies them by index in the row; position ids only reach learned position embeddings. A
    forward hook on the rotary module gathers those angles at ``position_ids`` instead
    (``[s, rows, 1, d]``, which the unfused RoPE broadcasts over heads). Valid because every
    position id is below the row length. The model's code is untouched; the hook lives for one
    forward call.

    Args:
        model: a GPTModel (possibly wrapped: anything with ``.module`` chains).
        position_ids: ``[rows, s]`` int64.
    """
    from megatron_simpo.model import unwrap

    core = unwrap(model)
    rope = getattr(core, "rotary_pos_emb", None)
    if rope is None:
        yield
        return

    def hook(_module, _args, freqs):
        if isinstance(freqs, tuple) or freqs.dim() != 4 or freqs.shape[1:3] != (1, 1):
            raise ConfigError(
                "--pack-pairs / --prefix-sharing support plain (and Llama-3-scaled) RoPE only"
            )
        if freqs.shape[0] < position_ids.shape[1]:
            raise ConfigError("--pack-pairs / --prefix-sharing do not support context parallelism")
        return freqs[:, 0, 0, :][position_ids.t()].unsqueeze(2)

    handle = rope.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def check_attention_supports_mask(model: torch.nn.Module) -> None:
    """Refuses core attentions that would ignore an explicit attention mask.

    SDPA (``--attention-backend sdpa``) honours it; Megatron's local ``DotProductAttention``
    does only with its torch softmax (``masked_softmax_fusion`` off: the fused causal kernel
    ignores the mask); Transformer Engine would need THD ``packed_seq_params`` instead.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_simpo.attention import SDPAttention
    from megatron_simpo.model import unwrap

    core = unwrap(model)
    for mod in core.modules():
        name = type(mod).__name__
        if isinstance(mod, SDPAttention):
            continue
        if isinstance(mod, DotProductAttention):
            if mod.config.masked_softmax_fusion:
                raise ConfigError(
                    "--pack-pairs / --prefix-sharing need --attention-backend sdpa here (the "
                    "local backend's fused softmax ignores the packing mask)"
                )
        elif name in ("TEDotProductAttention", "DotProductAttention"):
            raise ConfigError(
                "--pack-pairs / --prefix-sharing need --attention-backend sdpa (or local without "
                f"its fused softmax); {name} does not take the packing mask"
            )
