"""Vocab-parallel log-probs at TP=1,2,4 against a gathered float64 log_softmax: values and grads."""

from __future__ import annotations

import torch
from conftest import run_gloo

# 18 padding columns, as vocabulary padding adds: at TP4 the last rank holds only padding.
VOCAB, PADDED = 30, 48


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, PADDED, generator=g) * 4).to(dtype)
    targets = torch.randint(0, VOCAB, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)
    return logits, targets, upstream


def _reference(logits, targets, upstream):
    z = logits.double()[..., :VOCAB].clone().requires_grad_()
    lp = torch.log_softmax(z, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (lp * upstream).sum().backward()
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    grad[..., :VOCAB] = z.grad
    return lp.detach(), grad


def _check(rank, world, group, dtype, tol):
    from megatron_simpo.logprobs import vocab_parallel_logprobs

    logits, targets, upstream = _inputs(dtype)
    shard = PADDED // world
    local = logits[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
    lp = vocab_parallel_logprobs(local, targets, vocab_size=VOCAB, group=group)
    assert lp.dtype == torch.float32
    (lp.double() * upstream).sum().backward()
    ref_lp, ref_grad = _reference(logits, targets, upstream)
    torch.testing.assert_close(lp.double(), ref_lp, **tol)
    got = local.grad.double()
    torch.testing.assert_close(got, ref_grad[..., rank * shard : (rank + 1) * shard], **tol)


# fp32 inputs: fp32 arithmetic on values of size ~10 gives ~1e-6 relative error vs float64.
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}
# bf16 inputs: both sides see the same bf16-rounded logits and the reduction is fp32, but the
# gradient is returned in bf16 (8 mantissa bits: ~4e-3 relative).
BF16_TOL = {"rtol": 8e-3, "atol": 8e-3}


def _worker(rank, world):
    import torch.distributed as dist

    # One 4-process world (imports paid once); TP groups of 1, 2 and 4 ranks inside it.
    for tp in (1, 2, 4):
        group = dist.new_group(list(range(tp)))
        if rank < tp:
            _check(rank, tp, group, torch.float32, FP32_TOL)
            if tp == 2:
                _check(rank, tp, group, torch.bfloat16, BF16_TOL)
        dist.barrier()


def test_values_and_grads_match_gathered_log_softmax_at_tp_1_2_4():
    run_gloo(4, _worker)


def test_single_process_without_group():
    from megatron_simpo.logprobs import vocab_parallel_logprobs

    logits, targets, upstream = _inputs(torch.float32)
    x = logits.clone().requires_grad_()
    lp = vocab_parallel_logprobs(x, targets, vocab_size=VOCAB, group=None)
    (lp.double() * upstream).sum().backward()
    ref_lp, ref_grad = _reference(logits, targets, upstream)
    torch.testing.assert_close(lp.double(), ref_lp, **FP32_TOL)
    torch.testing.assert_close(x.grad.double(), ref_grad, **FP32_TOL)
    assert (x.grad[..., VOCAB:] == 0).all(), "padding columns must get no gradient"
