"""The fused chunked loss head (``--fused-loss-head``) against the materialised path.

1. The function at TP1/TP2 (a rank holding only vocabulary padding included; a chunk size not
   dividing the token count, and one chunk for all, where backward reuses the forward's
   exponentials instead of recomputing the logits): log-probs and gradients of hidden states
   and weight against a float64 ``log_softmax`` of the full logits, and against
   ``vocab_parallel_logprobs`` of the materialised fp32 logits.
2. A full training step (Megatron schedule, DDP gradient buffers, optimizer) of the tiny model,
   unfused vs fused, from identical weights at TP1xDP2, TP2, TP2+SP, tied TP1xDP2 and tied PP2:
   losses, SimPO metrics, gradient norm and every gradient in the DDP buffers (``main_grad``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import REPO, run_gloo

sys.path.insert(0, str(Path(__file__).parent / "distributed"))

VOCAB, PADDED, HIDDEN, TOKENS, CHUNK = 30, 64, 8, 11, 4

# fp32 against float64: logits ~N(0, 3^2), log-probs ~ -3..-15; each fp32 op rounds at 6e-8
# relative and the sums run over <= 64 terms, so errors stay ~1e-6. Same bound as
# tests/test_logprobs.py.
REF_TOL = {"rtol": 1e-5, "atol": 1e-5}
# Fused vs unfused, both fp32: the same products in a different reduction order (per-rank
# log-sum-exp combined, GEMMs on chunks): a few ulps of the values (~1e-6 absolute at 15).
UNFUSED_TOL = {"rtol": 2e-6, "atol": 2e-6}


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g)
    weight = torch.randn(PADDED, HIDDEN, generator=g)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    upstream = torch.randn(TOKENS, generator=g, dtype=torch.float64)
    return hidden, weight, targets, upstream


def _reference(hidden, weight, targets, upstream):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    z = (h @ w.t())[:, :VOCAB]
    lp = torch.log_softmax(z, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (lp * upstream).sum().backward()
    return lp.detach(), h.grad, w.grad


def _check_function(rank, tp, group, chunk):
    from megatron_simpo.fused_logprobs import fused_vocab_parallel_logprobs, hidden_for_head
    from megatron_simpo.logprobs import vocab_parallel_logprobs

    hidden, weight, targets, upstream = _inputs()
    shard = PADDED // tp
    rows = slice(rank * shard, (rank + 1) * shard)
    ref_lp, ref_dh, ref_dw = _reference(hidden, weight, targets, upstream)
    results = {}
    for fused in (True, False):
        h = hidden.clone().requires_grad_()
        w = weight[rows].clone().requires_grad_()
        h_in = hidden_for_head(h, False, group)
        if fused:
            lp = fused_vocab_parallel_logprobs(
                h_in, w, targets, vocab_size=VOCAB, group=group, chunk_size=chunk
            )
        else:
            lp = vocab_parallel_logprobs(h_in @ w.t(), targets, vocab_size=VOCAB, group=group)
        assert lp.dtype == torch.float32 and lp.shape == (TOKENS,)
        (lp.double() * upstream).sum().backward()
        results[fused] = (lp.detach(), h.grad, w.grad)
    lp, dh, dw = results[True]
    torch.testing.assert_close(lp.double(), ref_lp, **REF_TOL)
    torch.testing.assert_close(dh.double(), ref_dh, **REF_TOL)
    torch.testing.assert_close(dw.double(), ref_dw[rows], **REF_TOL)
    if rank * shard >= VOCAB:  # this rank holds only padding: no gradient at all
        assert dw.abs().max() == 0
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, **UNFUSED_TOL)


def _function_worker(rank, world):
    import torch.distributed as dist

    for tp in (1, 2):
        group = dist.new_group(list(range(tp)))
        if rank < tp:
            for chunk in (CHUNK, TOKENS):  # several chunks; one (the kept exponentials)
                _check_function(rank, tp, group, chunk)


def test_fused_logprobs_match_float64_and_unfused_at_tp1_tp2():
    run_gloo(2, _function_worker)


def test_one_chunk_backward_does_not_recompute_the_logits(monkeypatch):
    from megatron_simpo import fused_logprobs

    calls = []
    orig = fused_logprobs._chunk_logits
    monkeypatch.setattr(
        fused_logprobs, "_chunk_logits", lambda h, w: calls.append(len(h)) or orig(h, w)
    )
    hidden, weight, targets, upstream = _inputs()
    for chunk, want in ((TOKENS, [TOKENS]), (CHUNK, [4, 4, 3] * 2)):
        calls.clear()
        h = hidden.clone().requires_grad_()
        lp = fused_logprobs.fused_vocab_parallel_logprobs(
            h, weight, targets, vocab_size=VOCAB, chunk_size=chunk
        )
        (lp.double() * upstream).sum().backward()
        assert calls == want, (chunk, calls)  # forward's chunks, then backward's recomputed


# name -> (tied embeddings, parallel overrides); all run in a world of 2 ranks.
E2E_LAYOUTS = {
    "tp1_dp2": (False, {}),
    "tp2": (False, {"tensor_model_parallel_size": 2}),
    "tp2_sp": (False, {"tensor_model_parallel_size": 2, "sequence_parallel": True}),
    "tp1_dp2_tied": (True, {}),
    "pp2_tied": (True, {"pipeline_model_parallel_size": 2}),
}
ONE_CHUNK = {"tp2", "pp2_tied"}  # layouts whose fused head runs all tokens in one chunk
# Fused vs unfused on the same weights and data, fp32: only the loss head's reduction order
# differs (see UNFUSED_TOL), and 4 layers of backward carry it on at the same relative size.
# Per tensor: max|g_fused - g_unfused| / max|g_unfused|. Measured worst over these layouts:
# |dloss| 3.6e-7 (tp2_sp), gradients 8.6e-7 (tp2).
E2E_LOSS_ATOL = 2e-6  # loss and metrics ~0.7-10
E2E_GRAD_RTOL = 1e-5


def _run_step(name: str, fused: bool, init: dict | None):
    from layouts import config_dict

    from megatron_simpo import parallel
    from megatron_simpo.config import RunConfig
    from megatron_simpo.train import Trainer

    tied, overrides = E2E_LAYOUTS[name]
    raw = config_dict("tp1_tied" if tied else "tp1", str(REPO / "examples/tiny_pretok.jsonl"), None)
    raw["parallel"] = dict(overrides)
    raw["train"]["fused_loss_head"] = fused
    # Several chunks, the last one partial; or one chunk (backward reuses the forward's buffer).
    raw["train"]["loss_chunk_size"] = 4096 if name in ONE_CHUNK else 5
    cfg = RunConfig.from_dict(raw)
    trainer = Trainer(cfg)
    trainer.setup()
    params = {n: p for chunk in trainer.model for n, p in chunk.named_parameters()}
    start = {n: p.detach().clone() for n, p in params.items()}
    if init is not None:  # the same seed builds the same weights; check rather than assume
        for n, p in start.items():
            assert torch.equal(p, init[n]), f"{name}: initial {n} differs"
    grads = {}

    def grab():
        grads.update({n: p.main_grad.clone() for n, p in params.items()})

    metrics = trainer.step(grab)
    parallel.destroy_model_parallel()
    return start, metrics, grads


def _e2e_worker(rank, world):
    from megatron_simpo import parallel

    parallel.init_distributed()
    for name in E2E_LAYOUTS:
        init, ref, ref_grads = _run_step(name, False, None)
        _, got, got_grads = _run_step(name, True, init)
        assert got["pairs"] == ref["pairs"] == 8
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert abs(got[key] - ref[key]) <= E2E_LOSS_ATOL, (name, key, got[key], ref[key])
        assert abs(got["grad_norm"] - ref["grad_norm"]) <= E2E_GRAD_RTOL * ref["grad_norm"]
        assert got_grads.keys() == ref_grads.keys() and ref_grads
        worst = 0.0
        for n, g in ref_grads.items():
            scale = g.abs().max().item()
            err = (got_grads[n] - g).abs().max().item()
            assert err <= E2E_GRAD_RTOL * max(scale, 1e-12), (name, n, err, scale)
            worst = max(worst, err / max(scale, 1e-12))
            if "output_layer" in n:
                assert scale > 0, f"{name}: no gradient reached {n}"
        print(
            f"{name} rank {rank}: |dloss| {abs(got['loss'] - ref['loss']):.1e}, grads {worst:.1e}"
        )


def test_fused_train_step_matches_unfused():
    run_gloo(2, _e2e_worker)


def test_scored_positions_follow_the_heads_token_order():
    """The fused head flattens ``[s, b]`` position-major; ``scored_positions`` indexes the
    scored targets of a ``[b, s]`` loss mask in that order."""
    from megatron_simpo.fused_logprobs import scored_positions

    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.float32)
    idx = scored_positions(mask)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [1, 2, 4, 7]  # (s=0,b=1), (s=1,b=0), (s=2,b=0), (s=3,b=1)
    values = torch.arange(8.0).view(2, 4)  # [b, s]
    assert values.t().reshape(-1)[idx].tolist() == [4.0, 1.0, 2.0, 7.0]
