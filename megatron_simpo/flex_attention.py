"""Core attention through torch's FlexAttention: the prefix-sharing mask without materialising it.

A prefix-shared row (``data/packing.py``) needs a mask that is not causal per sequence: a
rejected token attends to the shared prompt and to its own branch, never to the chosen branch
placed before it. SDPA takes it only as a dense ``[rows, 1, s, s]`` boolean, which sends it to the
memory-efficient or math kernel (no flash kernel takes an explicit mask) and costs ``rows * s^2``
bytes per micro-batch. FlexAttention instead takes a *block mask*: the rule itself
(:func:`mask_mod`, from the ``segment_ids`` / ``branch_ids`` of each token) evaluated per
``128 x 128`` tile into a sparse list of tiles that are empty, full or partial; the compiled
kernel skips empty tiles and applies the rule inside partial ones.

:class:`FlexAttention` is an ``SDPAttention`` (same constructor and ``forward`` as Megatron's
``DotProductAttention``, no parameters): given a ``BlockMask`` as ``attention_mask`` it calls
``flex_attention``; anything else (no mask, a dense mask, THD) goes to SDPA as before.

Where it runs (torch 2.13): forward on CUDA and CPU; backward on CUDA only (torch raises
"FlexAttention does not support backward on CPU"), so training picks it on CUDA only
(:func:`flex_unavailable_reason`); on the CPU its forward is tested against SDPA's dense mask.
The block mask travels as Megatron's ``attention_mask`` argument, which activation recompute
saves with ``save_for_backward`` (tensors only): with ``--recompute-granularity`` the SDPA path
is used instead.
"""

from __future__ import annotations

import functools

import torch

from megatron_simpo.attention import SDPAttention

#: ``data.packing.SHARED``, the branch id of shared-prompt tokens (not imported: ``data.packing``
#: reaches ``model``, which builds this module's attention; the tests check the rule matches).
SHARED = 0


def flex_unavailable_reason(*, cuda: bool, recompute: bool) -> str | None:
    """Why FlexAttention cannot train here (None: it can)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch.nn.attention.flex_attention does not import ({e})"
    if not cuda:
        return f"FlexAttention has no backward on the CPU (torch {torch.__version__})"
    if recompute:
        return "activation recompute saves the attention mask as a tensor; a BlockMask is not one"
    return None


def mask_mod_for(segment_ids: torch.Tensor, branch_ids: torch.Tensor):
    """FlexAttention's ``mask_mod(b, h, q, k)`` of packed rows: True where query ``q`` of row
    ``b`` may attend key ``k`` — the rule of ``packing.attention_mask_from``: ``k <= q``, same
    segment, and ``k`` in the shared prompt or in ``q``'s branch.

    Args:
        segment_ids, branch_ids: ``[rows, s]`` int.
    """

    def mask_mod(b, h, q, k):
        key_branch = branch_ids[b, k]
        same_segment = segment_ids[b, q] == segment_ids[b, k]
        branch_ok = (key_branch == SHARED) | (branch_ids[b, q] == key_branch)
        return (k <= q) & same_segment & branch_ok

    return mask_mod


def block_mask_from(segment_ids: torch.Tensor, branch_ids: torch.Tensor):
    """The ``BlockMask`` of packed rows ``[rows, s]`` (one for every head), on their device.

    On CUDA the tile classification is compiled (``_compile=True``), so the ``[rows, s, s]``
    mask is never materialised; on the CPU it is built eagerly (tests).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    rows, s = segment_ids.shape
    return create_block_mask(
        mask_mod_for(segment_ids, branch_ids),
        B=rows,
        H=None,
        Q_LEN=s,
        KV_LEN=s,
        device=segment_ids.device,
        _compile=segment_ids.is_cuda,
    )


@functools.cache
def _compiled_flex():
    """``flex_attention`` compiled once per process (eager FlexAttention materialises the scores;
    the compiled kernel is what skips empty tiles)."""
    from torch.nn.attention.flex_attention import flex_attention

    # Shapes vary per micro-batch: default dynamism (recompiles once, then dynamic shapes).
    return torch.compile(flex_attention)


class FlexAttention(SDPAttention):
    """``SDPAttention`` that sends block-masked (prefix-shared) rows to FlexAttention."""

    compiled = True
    """Use the compiled kernel (tests set False to run the eager reference on the CPU)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """As ``SDPAttention.forward``; ``attention_mask`` may also be a ``BlockMask``
        (:func:`block_mask_from`) for ``[sq, b, heads, d]`` query and ``[sk, b, kv_heads, d]``
        key/value. Returns ``[sq, b, heads * d]``."""
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        if not isinstance(attention_mask, BlockMask):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        if attention_bias is not None or (self.training and self.dropout_p > 0.0):
            raise NotImplementedError("FlexAttention here takes no attention bias or dropout")
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        fn = _compiled_flex() if self.compiled else flex_attention
        out = fn(
            q,
            k,
            v,
            block_mask=attention_mask,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
