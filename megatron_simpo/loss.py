"""The SimPO objective, as pure tensor functions (no devices, process groups or models).

SimPO (Meng, Xia and Chen, 2024) scores a response by its length-normalised log-likelihood,

    r(x, y) = beta * (1/|y|) * sum_t log pi(y_t | x, y_<t)        (response tokens only)

and trains on preference pairs with a target margin gamma:

    sigmoid: l = -(1 - eps) log sigmoid(r_w - r_l - gamma) - eps log sigmoid(-(r_w - r_l - gamma))
    hinge:   l = relu(1 - (r_w - r_l - gamma))

with label smoothing eps (conservative loss). gamma is either ``gamma_beta_ratio * beta`` (the
reference code's convention) or an absolute ``simpo_gamma`` (TRL's convention).

Over a batch of pairs ``i`` with weights ``w_i >= 0`` (1 by default) the objective is the
**weighted mean** plus an optional SFT term on the chosen responses:

    L = sum_i w_i l_i / sum_i w_i  +  sft_weight * NLL

    NLL (sft_reduction "token") = sum_i w_i S_i / sum_i w_i n_i     (TRL, SimPO code: pooled)
    NLL (sft_reduction "pair")  = sum_i w_i (S_i / n_i) / sum_i w_i  (per-pair mean, averaged)

where ``S_i`` is the summed negative log-likelihood of pair ``i``'s chosen response and ``n_i``
its token count. With unit weights the "token" NLL is TRL's ``nll_loss`` (cross-entropy over all
chosen tokens of the batch); "pair" gives every pair the same SFT weight whatever its length.
A pair of weight 0 contributes nothing; a batch whose weights are all 0 has ``L = 0``.

"The batch" is the **global** batch (all micro-batches, all data-parallel ranks): Megatron sums
``loss_sum`` over micro-batches and ranks and divides by the summed pair count ``N``, so each
pair's contribution is scaled here by global totals known before the step (:func:`batch_totals`)
such that ``sum_i contribution_i / N = L`` whatever the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

SFTReduction = Literal["token", "pair"]


class SimPOOutput(NamedTuple):
    """Per-pair results; all tensors are ``[pairs]``.

    ``losses`` and ``nll`` are *contributions*: summed over the global batch and divided by its
    pair count they give the objective ``L`` and its NLL term (before ``sft_weight``). Without
    ``totals`` the given pairs are the whole batch and ``losses.mean()`` is ``L``.
    """

    losses: torch.Tensor
    """Contribution of each pair to the objective (SimPO term + optional SFT term)."""
    chosen_rewards: torch.Tensor
    """beta * mean log-prob of the chosen response (detached)."""
    rejected_rewards: torch.Tensor
    """beta * mean log-prob of the rejected response (detached)."""
    nll: torch.Tensor
    """Contribution of each pair to the NLL term of the chosen responses (detached)."""
    pair_losses: torch.Tensor
    """Each pair's own, unweighted loss ``l_i + sft_weight * S_i / n_i`` (the objective of a
    batch of that one pair; detached)."""


def batch_totals(weights: Sequence[float], chosen_tokens: Sequence[float]) -> torch.Tensor:
    """Global-batch totals the loss needs: ``[3]`` float64 ``(pairs, sum w_i, sum w_i n_i)``.

    Args:
        weights: ``w_i`` of every pair of the global batch.
        chosen_tokens: ``n_i``, the chosen response's token count, of every pair.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    n = torch.as_tensor(chosen_tokens, dtype=torch.float64)
    pairs = torch.tensor(float(w.numel()), dtype=torch.float64)
    return torch.stack([pairs, w.sum(), (w * n).sum()])


def check_weights(weights: torch.Tensor) -> None:
    """Refuses negative or non-finite pair weights (the data reader already names the row;
    reaching here with one means it was bypassed and the loss would be silently wrong)."""
    if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        raise ValueError(
            f"pair weights must be finite numbers >= 0, got {weights.tolist()}; such rows must "
            "be rejected by data validation (megatron_simpo.data)"
        )


def sequence_logps(
    token_logps: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduces per-token log-probs over the response tokens of each sequence.

    Args:
        token_logps: ``[seqs, tokens]`` log pi of each target token (any float dtype; summed in
            fp32 or wider).
        mask: ``[seqs, tokens]`` 1 for response tokens, 0 for prompt and padding.

    Returns:
        ``(sum, mean, count)``, each ``[seqs]``: the summed log-prob, its mean over response
        tokens, and the number of response tokens.

    Raises:
        ValueError: if a sequence has no response token. The data pipeline drops such pairs;
            reaching here with one means it was bypassed (the mean would be 0/0 = NaN).
    """
    dtype = torch.promote_types(token_logps.dtype, torch.float32)
    mask = mask.to(dtype)
    total = (token_logps.to(dtype) * mask).sum(-1)
    count = mask.sum(-1)
    if bool((count == 0).any()):
        raise ValueError(
            "a sequence with zero response tokens reached the SimPO loss (its mean log-prob is "
            "0/0); such pairs must be rejected by data validation (megatron_simpo.data)"
        )
    return total, total / count, count


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with ``0 / 0 = 0`` (a global batch whose weights are all zero)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float | None = None,
    simpo_gamma: float | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    sft_reduction: SFTReduction = "token",
    weights: torch.Tensor | None = None,
    chosen_tokens: torch.Tensor | None = None,
    totals: torch.Tensor | None = None,
) -> SimPOOutput:
    """SimPO loss contributions per pair from mean response log-probs (module docstring).

    Args:
        chosen_logps: ``[pairs]`` mean log-prob per response token of the chosen responses.
        rejected_logps: ``[pairs]`` same for the rejected responses.
        beta: reward scale.
        gamma_beta_ratio: margin as gamma / beta; exclusive with ``simpo_gamma``.
        simpo_gamma: absolute margin gamma; exclusive with ``gamma_beta_ratio``.
        loss_type: ``"sigmoid"`` or ``"hinge"``.
        label_smoothing: eps of the conservative sigmoid loss, in [0, 0.5).
        sft_weight: weight of the NLL term of the chosen responses.
        sft_reduction: ``"token"`` (pooled over the batch's chosen tokens) or ``"pair"``.
        weights: optional ``[pairs]`` per-pair weights ``w_i >= 0`` (default 1).
        chosen_tokens: ``[pairs]`` token count ``n_i`` of each chosen response; needed by the
            ``"token"`` reduction (without it: an error if ``sft_weight``, else ``nll`` is NaN).
        totals: ``[3]`` :func:`batch_totals` of the global batch; default: these pairs'.

    Returns:
        :class:`SimPOOutput`.
    """
    if (gamma_beta_ratio is None) == (simpo_gamma is None):
        raise ValueError("give exactly one of gamma_beta_ratio and simpo_gamma")
    if sft_reduction not in ("token", "pair"):
        raise ValueError(f"unknown sft_reduction {sft_reduction!r}; expected 'token' or 'pair'")
    gamma = simpo_gamma if simpo_gamma is not None else gamma_beta_ratio * beta
    chosen_rewards = beta * chosen_logps
    rejected_rewards = beta * rejected_logps
    margin = chosen_rewards - rejected_rewards - gamma
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(margin)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-margin)
    elif loss_type == "hinge":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        losses = torch.relu(1.0 - margin)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'hinge'")
    dtype = losses.dtype
    w = torch.ones_like(losses) if weights is None else weights.to(dtype)
    check_weights(w)
    pooled = sft_reduction == "token"
    if chosen_tokens is None and pooled and sft_weight:
        raise ValueError("sft_reduction 'token' needs chosen_tokens")
    # Without counts the pooled NLL is unknown: its metric is NaN (the loss does not use it).
    unknown = chosen_tokens is None and pooled
    n = torch.ones_like(losses) if chosen_tokens is None else chosen_tokens.to(dtype)
    if totals is None:
        totals = batch_totals(w.detach().cpu().tolist(), n.cpu().tolist())
    totals = totals.to(device=losses.device, dtype=torch.float64)
    pairs, weight_sum, weighted_tokens = totals[0], totals[1], totals[2]
    # Contribution scales: sum_i scale * w_i * x_i / N is the weighted mean of x.
    per_pair_scale = _safe_ratio(pairs, weight_sum).to(dtype)
    nll_mean = -chosen_logps  # S_i / n_i
    if unknown:
        nll = torch.full_like(losses, float("nan"))
    elif pooled:
        nll = _safe_ratio(pairs, weighted_tokens).to(dtype) * w * nll_mean * n  # N/T * w_i S_i
    else:
        nll = per_pair_scale * w * nll_mean
    contributions = per_pair_scale * w * losses
    if sft_weight:
        contributions = contributions + sft_weight * nll
    pair_losses = losses + sft_weight * nll_mean
    return SimPOOutput(
        contributions,
        chosen_rewards.detach(),
        rejected_rewards.detach(),
        nll.detach(),
        pair_losses.detach(),
    )
