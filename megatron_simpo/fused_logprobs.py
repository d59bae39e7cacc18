"""The output layer and the vocab-parallel target log-probs fused, chunk by chunk of tokens.

The unfused loss head materialises the ``[tokens, vocab/TP]`` logits (plus a softmax of the same
size saved for backward): 16 x 1024 tokens x 128256 vocab in fp32 is 8.4 GB per copy. Here the
logits of one chunk of ``chunk_size`` tokens exist at a time:

* forward, per chunk: ``z = h_c @ W^T`` (this rank's vocabulary slice; rows that are only
  vocabulary padding are skipped), keep only the local ``logsumexp`` and the target logit if
  this rank owns it (``O(tokens)`` values). After the loop, three all-reduces over the TP group
  of ``[tokens]`` vectors combine them: ``lse = M + log sum_r exp(lse_r - M)`` with
  ``M = max_r lse_r``, and the target logit from its owner. ``log pi(t) = z_t - lse``.
* backward, per chunk: recompute ``z``, ``dlogp/dz = onehot(t) - softmax(z)``; accumulate
  ``dW += dz^T h_c`` (fp32) and write ``dh_c = dz W``. When all tokens fit one chunk, the
  forward's ``exp(z - max)`` buffer is kept instead and scaled by ``exp(max - lse)``: one of the
  head's four vocabulary matmuls saved, at the same peak (backward's recomputed chunk is the
  buffer it replaces; ``defaults.fused_head_bytes`` is unchanged).

The hidden states enter through Megatron's TP region mappings (copy: all-reduce in backward;
under sequence parallelism all-gather / reduce-scatter), exactly as ``ColumnParallelLinear``
does, so the result and its gradients equal the unfused path's (tests/test_fused_logprobs.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_simpo.logprobs import _all_reduce


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[c, v]`` of a chunk ``h`` ``[c, hidden]`` and real weight rows ``[v, h]``."""
    # The matmul in the model dtype, like ColumnParallelLinear; fp32 from there on.
    return (h @ weight.t()).float()


class _FusedLinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, vocab_size, group, chunk_size):
        n = hidden.shape[0]
        # Rows of this rank's slice that are real tokens; the rest is vocabulary padding, which
        # is left out of the matmuls altogether (its log-prob mass and gradient are zero).
        real = max(0, min(weight.shape[0], vocab_size - vocab_start))
        w = weight[:real]
        local_t = targets - vocab_start
        owned = (local_t >= 0) & (local_t < real)
        local_t = local_t.clamp(0, max(real - 1, 0))
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        target_z = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        # One chunk: backward reuses this chunk's exponentials instead of recomputing the
        # vocabulary matmul (the buffer backward would allocate anyway, so the same peak).
        kept = z_max = None
        for s in range(0, n if real else 0, chunk_size):
            e = min(n, s + chunk_size)
            z = _chunk_logits(hidden[s:e], w)
            picked = z.gather(-1, local_t[s:e].unsqueeze(-1)).squeeze(-1)
            target_z[s:e] = torch.where(owned[s:e], picked, 0.0)
            # log-sum-exp in z's own buffer: one [chunk, vocab/TP] buffer at a time.
            z_max = z.max(dim=-1).values
            lse[s:e] = z_max + z.sub_(z_max.unsqueeze(-1)).exp_().sum(dim=-1).log()
            if n <= chunk_size:
                kept = z  # exp(z - z_max) [n, real]
            del z
        # Combine the per-rank log-sum-exps stably: M + log sum_r exp(lse_r - M).
        m = lse.clone()
        _all_reduce(m, dist.ReduceOp.MAX, group)
        sum_exp = (lse - m).exp()
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        lse = m + sum_exp.log()
        _all_reduce(target_z, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(hidden, weight, local_t, owned, lse)
        # Not saved through save_for_backward: an intermediate, never seen by autograd.
        ctx.kept = (kept, z_max) if kept is not None else None
        ctx.real = real
        ctx.chunk_size = chunk_size
        return target_z - lse

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, local_t, owned, lse = ctx.saved_tensors
        n, real = hidden.shape[0], ctx.real
        w = weight[:real]
        g = grad_logp.float()
        grad_h = torch.zeros_like(hidden)
        # fp32 accumulation over chunks whatever the weight dtype; padding rows stay zero.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, n if real else 0, ctx.chunk_size):
            e = min(n, s + ctx.chunk_size)
            h_c = hidden[s:e]
            # d logp / d z_j = 1[j == t] - softmax_j, computed in place in z's buffer.
            if ctx.kept is not None:
                # softmax = exp(z - z_max) * exp(z_max - lse): equal to exp(z - lse) up to
                # fp32 rounding (tests/test_fused_logprobs.py), one multiply instead of the
                # vocabulary matmul, a subtraction and an exp.
                z, z_max = ctx.kept
                ctx.kept = None
                scale = (z_max - lse).exp().mul_(-g)
                dz = z.mul_(scale.unsqueeze(-1))
            else:
                z = _chunk_logits(h_c, w)
                dz = z.sub_(lse[s:e].unsqueeze(-1)).exp_().mul_(-g[s:e].unsqueeze(-1))
            dz.scatter_add_(-1, local_t[s:e].unsqueeze(-1), (g[s:e] * owned[s:e]).unsqueeze(-1))
            dz = dz.to(weight.dtype)
            grad_h[s:e] = dz @ w
            if weight.dtype == torch.float32:
                grad_w[:real].addmm_(dz.t(), h_c)
            else:
                grad_w[:real] += (dz.t() @ h_c).float()
            del z, dz
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None


def fused_vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``log_softmax(hidden @ weight_full^T)[target]`` without materialising the logits.

    Args:
        hidden: ``[tokens, hidden]`` the same on every TP rank (see :func:`hidden_for_head` for
            the region mapping that makes its gradient correct under TP).
        weight: ``[vocab/TP, hidden]`` this rank's slice of the output layer (rank r holds rows
            ``[r * vocab/TP, (r+1) * vocab/TP)`` of the padded vocabulary).
        targets: ``[tokens]`` global token ids (int64).
        vocab_size: real vocabulary size; rows at or past it are padding and excluded.
        group: the tensor-parallel group (None or size 1: ``weight`` holds the whole vocab).
        chunk_size: tokens per chunk (peak extra memory ~ chunk x vocab/TP x 4 bytes).

    Returns:
        ``[tokens]`` fp32 log-probs, differentiable with respect to ``hidden`` and ``weight``.
    """
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    vocab_start = rank * weight.shape[0]
    return _FusedLinearLogProbs.apply(
        hidden, weight, targets, vocab_start, vocab_size, group, chunk_size
    )


def hidden_for_head(
    hidden: torch.Tensor, sequence_parallel: bool, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """The output layer's view of the final hidden states, as ``ColumnParallelLinear`` makes it.

    ``[s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism) -> ``[s, b, h]`` on every TP
    rank; backward sums the per-rank partial gradients (all-reduce, or reduce-scatter under SP).
    """
    if group is None or dist.get_world_size(group) == 1:
        return hidden
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, True, group)
    return copy_to_tensor_model_parallel_region(hidden, group)


class HiddenStatesGPTModel(GPTModel):
    """``GPTModel`` whose last pipeline stage returns the final (normed) hidden states
    ``[s, b, h]`` (``[s/TP, b, h]`` under SP) instead of logits; the loss function calls
    :meth:`token_logprobs`. Parameters and checkpoints are exactly ``GPTModel``'s."""

    #: Tokens per chunk of the fused head (``--loss-chunk-size``).
    loss_chunk_size: int = 1024

    def _postprocess(self, hidden_states, **kwargs):
        assert self.config.mtp_num_layers is None, "--fused-loss-head does not support MTP"
        return hidden_states

    def output_weight(self) -> torch.Tensor:
        """``[vocab/TP, h]``: the weight the unfused output layer would multiply by."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def token_logprobs(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        scored: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Target log-probs ``[b, s]`` (fp32) from this stage's output ``hidden`` and ``labels``
        ``[b, s]``; equal to ``vocab_parallel_logprobs`` of the unfused model's logits.

        ``scored`` (:func:`scored_positions`): only these targets go through the head (the
        others, prompt and padding, are 0 and get no gradient); the vocabulary matmuls are the
        costliest of a small model, and a loss mask multiplies the rest by 0 anyway.
        """
        group = self.pg_collection.tp
        h = hidden_for_head(hidden, self.config.sequence_parallel, group)
        s, b, width = h.shape
        h, t = h.reshape(s * b, width), labels.t().reshape(s * b)
        if scored is not None:
            h, t = h.index_select(0, scored), t.index_select(0, scored)
        logps = fused_vocab_parallel_logprobs(
            h,
            self.output_weight(),
            t,
            vocab_size=vocab_size,
            group=group,
            chunk_size=self.loss_chunk_size,
        )
        if scored is not None:
            logps = logps.new_zeros(s * b).index_copy(0, scored, logps)
        return logps.view(s, b).t()


def scored_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Indices ``[n]`` (int64) of the scored targets of ``loss_mask`` ``[b, s]`` in the
    fused head's token order (``[s, b]`` flattened: position-major).

    Computed on the host where the batch is collated: on an accelerator ``nonzero`` would be
    a host sync.
    """
    return loss_mask.t().reshape(-1).nonzero().squeeze(1)
