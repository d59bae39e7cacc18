"""Per-token log-probs of target tokens from vocabulary-sharded logits, never gathering the vocab.

Under tensor parallelism each rank holds logits for a contiguous slice of the (padded) vocabulary.
``log pi(t) = z_t - log sum_j exp(z_j)`` is formed with three all-reduces over the TP group:
max (for stability), sum of exp, and the target logit (owned by exactly one rank). Everything is
computed in fp32 whatever the model dtype (bf16/fp16 logits would lose the small differences
SimPO's rewards are made of). Columns at or past ``vocab_size`` (padding added so the vocabulary
divides evenly) are excluded, so the result equals ``log_softmax`` over the real vocabulary —
what a Hugging Face model computes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_size, group):
        local_v = logits.shape[-1]
        z = logits.float()
        col = torch.arange(vocab_start, vocab_start + local_v, device=logits.device)
        padded = col >= vocab_size
        if bool(padded.any()):
            z = z.masked_fill(padded, float("-inf"))
        z_max = z.max(dim=-1).values
        _all_reduce(z_max, dist.ReduceOp.MAX, group)
        z = z - z_max.unsqueeze(-1)
        exp_z = z.exp()
        sum_exp = exp_z.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)

        local_t = targets - vocab_start
        owned = (local_t >= 0) & (local_t < local_v)
        local_t = local_t.clamp(0, local_v - 1)
        # where, not a product: a rank whose columns are all padding holds -inf, and -inf * 0
        # is NaN.
        target_z = torch.where(owned, z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1), 0.0)
        _all_reduce(target_z, dist.ReduceOp.SUM, group)

        logp = target_z - sum_exp.log()
        softmax = exp_z.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, owned)
        ctx.logits_dtype = logits.dtype
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        softmax, local_t, owned = ctx.saved_tensors
        # d logp / d z_j = 1[j == t] - softmax_j
        grad = softmax.mul_(-grad_logp.unsqueeze(-1))
        grad.scatter_add_(-1, local_t.unsqueeze(-1), (grad_logp * owned).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Log-probability of each target token.

    Args:
        logits: ``[..., vocab/TP]`` this rank's slice of the logits (rank r holds columns
            ``[r * vocab/TP, (r+1) * vocab/TP)`` of the padded vocabulary), any float dtype.
        targets: ``[...]`` global token ids (int64).
        vocab_size: number of real tokens; columns at or past it are padding and excluded.
        group: the tensor-parallel group (None or size 1: the logits hold the whole vocab).

    Returns:
        ``[...]`` fp32 log pi(target), differentiable with respect to ``logits``.
    """
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    vocab_start = rank * logits.shape[-1]
    return _VocabParallelLogProbs.apply(logits, targets, vocab_start, vocab_size, group)
