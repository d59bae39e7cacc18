"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

Megatron-Core's local spec (``DotProductAttention``) materialises the ``[b, heads, s, s]`` score
matrix, its softmax and (for backward) both again. SDPA dispatches to fused kernels instead
(flash / memory-efficient attention on CUDA, a fused flash kernel on CPU), which keep only
``O(s)`` softmax statistics per row. The module below is a drop-in replacement for
``DotProductAttention`` in a layer spec: same constructor, same ``forward`` arguments, same tensor
layout, no parameters (checkpoints are interchangeable with the local spec's).

:func:`resolve_attention_backend` turns ``--attention-backend`` into the spec to build: ``auto``
is Transformer Engine when it is installed and CUDA is present, SDPA otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_simpo.errors import ConfigError
from megatron_simpo.packed_seq import thd_allowed

BACKENDS = ("auto", "sdpa", "local", "te", "flex")


def resolve_attention_backend(requested: str, te_available: bool) -> str:
    """The attention backend to build: ``sdpa``, ``local``, ``te`` or ``flex``
    (``flex_attention.py``; whether it works here is ``model.run_attention_backend``'s check).

    Args:
        requested: ``--attention-backend`` (``auto``, ``sdpa``, ``local``, ``te`` or ``flex``).
        te_available: Transformer Engine importable and CUDA present.
    """
    if requested not in BACKENDS:
        raise ConfigError(f"--attention-backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        return "te" if te_available else "sdpa"
    if requested == "te" and not te_available:
        raise ConfigError(
            "--attention-backend te needs Transformer Engine and a CUDA device; "
            "use --attention-backend sdpa (or auto)"
        )
    return requested


def prepare_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """SDPA's boolean mask (True: may attend) of Megatron's (True: may *not* attend).

    A row with nothing allowed (e.g. padding) would give NaN (softmax over no keys), and NaN
    gradients through the loss mask; such a row attends to every key instead (the local path's
    -10000 fill also keeps it finite). Its output is never used.

    Every layer gets the same mask tensor of a micro-batch, so the result is kept on it: built
    once per micro-batch (and per recomputation of it), not once per layer.
    """
    cached = getattr(attention_mask, "_sdpa_allowed", None)
    if cached is not None and cached[0] == attention_mask._version:
        return cached[1]
    allowed = ~attention_mask
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    attention_mask._sdpa_allowed = (attention_mask._version, allowed)
    return allowed


class SDPAttention(MegatronModule):
    """Causal (or explicitly masked) softmax attention through SDPA.

    Constructed by Megatron's ``SelfAttention`` exactly like ``DotProductAttention``. Heads are
    this tensor-parallel rank's heads (the caller splits them); grouped-query attention is passed
    to SDPA as is (``enable_gqa``), so key/value heads are never copied.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ConfigError(
                "--attention-backend sdpa does not support context parallelism; use te"
            )
        if config.softmax_type != "vanilla":
            raise ConfigError("--attention-backend sdpa supports softmax_type 'vanilla' only")
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            raise ConfigError("--attention-backend sdpa does not support sliding-window attention")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        # Megatron's query-key layer scaling divides the scale by the layer number and multiplies
        # the scores back before the softmax: a no-op mathematically, so SDPA ignores it.
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Attention of this rank's heads.

        Args:
            query: ``[sq, b, heads, d]``.
            key, value: ``[sk, b, kv_heads, d]`` (``heads`` a multiple of ``kv_heads``).
            attention_mask: None (causal by ``attn_mask_type``) or bool, broadcastable to
                ``[b, heads, sq, sk]``, True where attention is *not* allowed (Megatron's
                convention; the mask replaces the causal one, as in ``DotProductAttention``).
            packed_seq_params: THD ``PackedSeqParams`` (then query/key/value are ``[t, n, d]``
                and each ``cu_seqlens_q`` span attends causally to itself, as TE computes it).

        Returns:
            ``[sq, b, heads * d]``.
        """
        if attention_bias is not None:
            raise ConfigError("attention bias is not supported by --attention-backend sdpa")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        thd = packed_seq_params is not None
        if thd:  # [t, n, d]: one stream of sequences (megatron_simpo/packed_seq.py)
            if packed_seq_params.qkv_format != "thd" or attention_mask is not None:
                raise ConfigError("--attention-backend sdpa takes packed sequences as THD only")
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed = None
        causal = False
        if thd:
            # The dense reference of TE's THD attention: causal within each cu_seqlens span.
            allowed = thd_allowed(packed_seq_params.cu_seqlens_q, q.shape[2])
        elif attention_mask is not None:
            allowed = prepare_mask(attention_mask)
        elif mask_type == AttnMaskType.causal and q.shape[2] > 1:
            causal = True
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(
            attn_mask=allowed,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        if dropout > 0.0 and not self.config.sequence_parallel:
            # Same RNG stream as DotProductAttention: heads differ per TP rank, so their dropout
            # masks must too.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **kwargs)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **kwargs)
        # [b, n, s, d] -> [s, b, n * d] (THD: [t, n * d], which Megatron reshapes to [t, 1, -1])
        s, b = out.shape[2], out.shape[0]
        out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
        return out.squeeze(1) if thd else out
