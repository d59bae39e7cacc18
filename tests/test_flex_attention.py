"""FlexAttention for prefix-shared rows (``megatron_simpo/flex_attention.py``).

On the CPU (torch 2.13) FlexAttention runs forward only ("does not support backward on CPU"):
here its block-mask rule is checked against ``packing.attention_mask_from`` exactly, its eager
forward against SDPA with the dense mask, and the backend choice with its logged reasons.
Gradients and the compiled kernel are checked on CUDA (``tests/test_cuda.py``).
"""

from __future__ import annotations

import pytest
import torch
from test_packing import SEQ_LENGTH, random_pairs

from megatron_simpo.data.packing import attention_mask_from, collate_packed
from megatron_simpo.errors import ConfigError
from megatron_simpo.flex_attention import block_mask_from, mask_mod_for

MODEL = {
    "vocab_size": 32,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def rows(seed: int, prefix_sharing: bool = True) -> dict[str, torch.Tensor]:
    """Packed rows of varied pairs (one-token prompt / chosen / rejected among them)."""
    pairs = random_pairs(6, seed)
    return collate_packed(pairs, capacity=SEQ_LENGTH, prefix_sharing=prefix_sharing, pack=True)


@pytest.mark.parametrize("shared", [True, False])
def test_the_block_mask_rule_is_the_packing_mask(shared):
    mb = rows(0, shared)
    seg, br = mb["segment_ids"], mb["branch_ids"]
    n, s = seg.shape
    b = torch.arange(n).view(-1, 1, 1)
    q, k = torch.arange(s).view(1, -1, 1), torch.arange(s).view(1, 1, -1)
    got = mask_mod_for(seg, br)(b, 0, q, k)  # the rule on the whole [rows, s, s] grid
    assert torch.equal(got, ~attention_mask_from(seg, br)[:, 0])


def _cores():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_simpo.attention import SDPAttention
    from megatron_simpo.config import RunConfig
    from megatron_simpo.flex_attention import FlexAttention
    from megatron_simpo.model import transformer_config

    cfg = RunConfig.from_dict({"model": MODEL, "train": {"precision": "fp32"}})
    tconf = transformer_config(cfg)
    args = dict(config=tconf, layer_number=1, attn_mask_type=AttnMaskType.causal)
    flex = FlexAttention(**args, attention_type="self")
    flex.compiled = False  # eager on the CPU; compiling costs ~25 s here (forward only works)
    return flex, SDPAttention(**args, attention_type="self")


@pytest.mark.parametrize("seed", [1, 2])
def test_flex_forward_matches_sdpa_with_the_dense_mask(seed):
    mb = rows(seed)
    seg, br = mb["segment_ids"], mb["branch_ids"]
    n, s = seg.shape
    flex, sdpa = _cores()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, n, 4, 16, generator=g) * 2  # * 2: peaked softmax, so a mask error shows
    k, v = torch.randn(2, s, n, 2, 16, generator=g) * 2
    dense = attention_mask_from(seg, br)
    want = sdpa(q, k, v, dense)
    got = flex(q, k, v, block_mask_from(seg, br))
    # fp32 both: the eager FlexAttention forms the scores and a full softmax, SDPA's CPU kernel
    # an online (blocked) softmax: the same terms in another order, ~1e-7 relative per op on
    # O(1) outputs; 1e-5 leaves room. A leak of chosen into rejected moves rows by O(0.1):
    causal_only = flex(q, k, v, block_mask_from(torch.ones_like(seg), torch.zeros_like(br)))
    assert (causal_only - want).abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # No block mask: plain SDPA (padded rows, causal), the same module.
    torch.testing.assert_close(flex(q, k, v, None), sdpa(q, k, v, None), rtol=0, atol=0)


def _cfg(**train):
    from megatron_simpo.config import RunConfig

    return RunConfig.from_dict({"model": MODEL, "train": {"prefix_sharing": True, **train}})


def test_prefix_sharing_picks_flex_on_cuda_and_says_why_not_elsewhere(monkeypatch):
    from megatron_simpo import model as model_lib

    backend, why = model_lib.prefix_sharing_attention(_cfg())
    assert backend == "sdpa" and "no backward on the CPU" in why
    with pytest.raises(ConfigError, match="--attention-backend flex: FlexAttention has no"):
        model_lib.run_attention_backend(_cfg(attention_backend="flex"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_lib, "have_transformer_engine", lambda: True)
    assert model_lib.prefix_sharing_attention(_cfg()) == ("flex", None)
    assert model_lib.attention_label(_cfg()) == "flex/block"
    backend, why = model_lib.prefix_sharing_attention(_cfg(recompute_granularity="full"))
    assert backend == "sdpa" and "recompute" in why
    # Without prefix sharing, auto stays TE (packing as THD); explicit sdpa stays sdpa.
    assert model_lib.attention_label(_cfg(prefix_sharing=False, pack_pairs=True)) == "te/thd"
    assert model_lib.run_attention_backend(_cfg(attention_backend="sdpa")) == "sdpa"
