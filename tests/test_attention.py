"""SDPA core attention (``--attention-backend sdpa``) against Megatron-Core's local
``DotProductAttention`` on the same weights: logits and every parameter gradient of the tiny
GQA Llama at TP1 and TP2, an explicit boolean mask, dropout, and the backend resolution."""

from __future__ import annotations

import pytest
import torch
from conftest import run_gloo

from megatron_simpo.attention import resolve_attention_backend
from megatron_simpo.errors import ConfigError

#: GQA (4 query heads, 2 KV groups: at TP2 one KV head and two query heads per rank).
MODEL = {
    "vocab_size": 32,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "make_vocab_size_divisible_by": 8,
    # A larger init than Llama's 0.02 so attention is far from uniform and differences show.
    "initializer_range": 0.2,
}
B, S = 2, 24
# fp32 both ways; the local path forms the scores and a full softmax, SDPA's CPU kernel an online
# (blocked) softmax: the same math with a different summation order, ~1e-7 relative per op.
# Measured at TP1 (max|diff| / max|ref|): logits 5.6e-7, worst parameter gradient 1.5e-6; 2e-5
# leaves room and still fails for any real difference (a wrong scale, mask or head mapping is
# O(1)).
RTOL = 2e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _model(backend: str, tp: int):
    from megatron_simpo.config import RunConfig
    from megatron_simpo.model import build_model

    cfg = RunConfig.from_dict(
        {
            "model": MODEL,
            "parallel": {"tensor_model_parallel_size": tp},
            "train": {"attention_backend": backend, "precision": "fp32", "seed": 3},
        }
    )
    (model,) = build_model(cfg)
    return model


def _forward_backward(model, tokens, upstream):
    pos = torch.arange(S).expand(B, S)
    model.zero_grad()
    logits = model(tokens, pos, None)  # [b, s, vocab/TP]
    (logits * upstream).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_model(rank: int, tp: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_simpo import parallel
    from megatron_simpo.attention import SDPAttention

    parallel.init_model_parallel(tp, 1, None, seed=3)
    local, sdpa = _model("local", tp), _model("sdpa", tp)
    cores = [m for m in sdpa.modules() if isinstance(m, SDPAttention)]
    assert len(cores) == 2 and not any(isinstance(m, SDPAttention) for m in local.modules())
    assert any(isinstance(m, DotProductAttention) for m in local.modules())
    sdpa.load_state_dict(local.state_dict())
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, MODEL["vocab_size"], (B, S), generator=g)
    r = ps.get_tensor_model_parallel_rank()
    upstream = torch.randn(B, S, 32, generator=g)[..., r * 32 // tp : (r + 1) * 32 // tp]
    ref_logits, ref_grads = _forward_backward(local, tokens, upstream)
    logits, grads = _forward_backward(sdpa, tokens, upstream)
    assert _rel(logits, ref_logits) <= RTOL, (tp, _rel(logits, ref_logits))
    assert grads.keys() == ref_grads.keys()
    for n, ref in ref_grads.items():
        assert ref.abs().max() > 0, n
        assert _rel(grads[n], ref) <= RTOL, (tp, n, _rel(grads[n], ref))
    parallel.destroy_model_parallel()


def _check_module(rank: int) -> None:
    """The module alone: an explicit mask (True = masked, Megatron's convention), dropout."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_simpo import parallel
    from megatron_simpo.attention import SDPAttention
    from megatron_simpo.config import RunConfig
    from megatron_simpo.model import transformer_config

    parallel.init_model_parallel(1, 1, None, seed=3)
    cfg = RunConfig.from_dict({"model": MODEL, "train": {"precision": "fp32"}})
    tconf = transformer_config(cfg)
    args = dict(config=tconf, layer_number=1, attn_mask_type=AttnMaskType.causal)
    local = DotProductAttention(**args, attention_type="self")
    sdpa = SDPAttention(**args, attention_type="self")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(S, B, 4, 8, generator=g)
    k, v = torch.randn(2, S, B, 2, 8, generator=g)
    # A block-diagonal causal mask (two packed sequences of 10 and 14 tokens), [b, 1, s, s].
    doc = torch.cat([torch.zeros(10), torch.ones(S - 10)]).long()
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(S, S).tril().bool()
    mask = (~allowed).expand(B, 1, S, S)
    assert _rel(sdpa(q, k, v, mask), local(q, k, v, mask)) <= RTOL
    assert _rel(sdpa(q, k, v, None), local(q, k, v, None)) <= RTOL
    # A fully masked row (padding) stays finite, with finite gradients.
    qg = q.clone().requires_grad_()
    padded = mask.clone()
    padded[:, :, -1] = True
    out = sdpa(qg, k, v, padded)
    out.sum().backward()
    assert out.isfinite().all() and qg.grad.isfinite().all()
    assert _rel(out[:-1], local(q, k, v, padded)[:-1]) <= RTOL
    # Dropout is applied in training only.
    drop = SDPAttention(**args, attention_type="self", attention_dropout=0.5)
    drop.eval()
    assert _rel(drop(q, k, v, None), local(q, k, v, None)) <= RTOL
    drop.train()
    assert _rel(drop(q, k, v, None), local(q, k, v, None)) > 0.1
    parallel.destroy_model_parallel()


def _worker(rank: int, world: int) -> None:
    from megatron_simpo import parallel

    parallel.init_distributed()
    # TP1 runs as data parallel 2 (each rank checks its own copy); TP2 splits heads over ranks.
    _check_model(rank, 1)
    _check_model(rank, 2)
    _check_module(rank)


def test_sdpa_matches_local_spec_tp1_tp2():
    run_gloo(2, _worker)


def test_resolve_attention_backend():
    assert resolve_attention_backend("auto", te_available=False) == "sdpa"
    assert resolve_attention_backend("auto", te_available=True) == "te"
    assert resolve_attention_backend("local", te_available=True) == "local"
    assert resolve_attention_backend("sdpa", te_available=True) == "sdpa"
    with pytest.raises(ConfigError, match="--attention-backend te needs Transformer Engine"):
        resolve_attention_backend("te", te_available=False)
    with pytest.raises(ConfigError, match="--attention-backend must be one of"):
        resolve_attention_backend("flash", te_available=False)


def test_sdpa_mask_is_prepared_once_per_mask_tensor():
    """The SDPA form of a micro-batch's mask is built once and reused by every layer; an
    in-place change of the mask (a new version) rebuilds it. Empty rows attend everywhere."""
    from megatron_simpo.attention import prepare_mask

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.5  # True: may not attend
    mask[0, 0, 3] = True  # a row with nothing allowed
    allowed = prepare_mask(mask)
    expected = ~mask
    expected[0, 0, 3] = True
    assert torch.equal(allowed, expected)
    assert prepare_mask(mask) is allowed  # cached on the tensor: the next layer's call
    mask[1, 0, 0, 0] = ~mask[1, 0, 0, 0]
    again = prepare_mask(mask)
    assert again is not allowed and again[1, 0, 0, 0] == ~allowed[1, 0, 0, 0]
