"""Under bf16 params the log-probs and the SimPO loss are accumulated in fp32 (unit level; the
layout matrix checks gradient buffers, main grads and main params of real bf16 runs).

Each result is compared with a float64 reference computed from the *same* bf16 logits (or bf16
hidden states and weight): an fp32 computation lands within fp32 rounding of it, a bf16 one
(rounding each log-prob to 8 significant bits) would be off by ~2e-3 relative.
"""

from __future__ import annotations

import torch

from megatron_simpo.fused_logprobs import fused_vocab_parallel_logprobs
from megatron_simpo.logprobs import vocab_parallel_logprobs
from megatron_simpo.loss import sequence_logps, simpo_loss

VOCAB, PADDED = 50, 56  # real and padded vocabulary (padding columns are excluded)
# fp32 log-softmax over 50 logits of size ~3: a few ulps of |logp| ~ 4, i.e. ~1e-6 absolute;
# bf16 rounding of the same values would be 4 * 2^-9 = 8e-3, far beyond this bound.
FP32_ATOL = 5e-6


def bf16_logits(rows: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, seq, PADDED, generator=g)).bfloat16()


def reference_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 log_softmax over the real vocabulary of the given (bf16) logits."""
    z = logits.double()[..., :VOCAB]
    return torch.log_softmax(z, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def test_vocab_parallel_logprobs_of_bf16_logits_are_fp32():
    logits = bf16_logits(4, 9, seed=0).requires_grad_()
    targets = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
    got = vocab_parallel_logprobs(logits, targets, vocab_size=VOCAB)
    assert got.dtype == torch.float32
    want = reference_logps(logits.detach(), targets)
    assert (got.double() - want).abs().max().item() <= FP32_ATOL
    # Not merely rounded from bf16: the bf16 copy of the result is measurably further away.
    assert (got.bfloat16().double() - want).abs().max().item() > 10 * FP32_ATOL
    got.sum().backward()
    assert logits.grad.dtype == torch.bfloat16  # the model's dtype, as autograd expects


def test_fused_head_of_bf16_hidden_and_weight_is_fp32():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(21, 16, generator=g).bfloat16()
    weight = (0.5 * torch.randn(PADDED, 16, generator=g)).bfloat16()
    targets = torch.randint(0, VOCAB, (21,), generator=g)
    # One chunk: the bf16 GEMM is then the same as the reference's, so both see equal logits.
    got = fused_vocab_parallel_logprobs(hidden, weight, targets, vocab_size=VOCAB, chunk_size=21)
    assert got.dtype == torch.float32
    want = reference_logps(hidden @ weight.t(), targets)
    assert (got.double() - want).abs().max().item() <= FP32_ATOL
    assert (got.bfloat16().double() - want).abs().max().item() > 10 * FP32_ATOL


def test_sequence_logps_and_loss_of_bf16_inputs_are_fp32():
    g = torch.Generator().manual_seed(3)
    token_logps = (-4 * torch.rand(6, 15, generator=g)).bfloat16()
    lengths = torch.tensor([1, 15, 7, 1, 3, 11])  # one-token responses too
    mask = (torch.arange(15) < lengths.unsqueeze(-1)).float()
    total, mean, count = sequence_logps(token_logps, mask)
    assert total.dtype == mean.dtype == torch.float32
    want = (token_logps.double() * mask.double()).sum(-1)
    # A 15-term fp32 sum of values <= 4: <= 15 * 2^-24 * 60 ~ 5e-5 worst case, ~1e-6 typical.
    assert (total.double() - want).abs().max().item() <= 5e-6
    assert (mean.double() - want / lengths.double()).abs().max().item() <= 5e-6
    weights = torch.tensor([0.3, 2.7, 1.4])
    out = simpo_loss(mean[:3], mean[3:], beta=2.5, gamma_beta_ratio=0.4, weights=weights)
    assert out.losses.dtype == torch.float32
