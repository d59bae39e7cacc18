"""The SimPO objective, as pure tensor functions (no devices, process groups or models).

SimPO (Meng, Xia and Chen, 2024) scores a response by its length-normalised log-likelihood,

    r(x, y) = beta * (1/|y|) * sum_t log pi(y_t | x, y_<t)        (response tokens only)

and trains on preference pairs with a target margin gamma:

    sigmoid: L = -(1 - eps) log sigmoid(r_w - r_l - gamma) - eps log sigmoid(-(r_w - r_l - gamma))
    hinge:   L = relu(1 - (r_w - r_l - gamma))

with label smoothing eps (conservative loss). gamma is either ``gamma_beta_ratio * beta`` (the
reference code's convention) or an absolute ``simpo_gamma`` (TRL's convention). An optional SFT
term adds ``sft_weight * NLL(chosen)`` with NLL the per-token mean negative log-likelihood of the
chosen response; per-pair weights multiply each pair's loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class SimPOOutput(NamedTuple):
    """Per-pair results; reduce them (sum over pairs / global pair count) outside.

    All tensors are ``[pairs]``.
    """

    losses: torch.Tensor
    """Weighted per-pair loss (SimPO term + optional SFT term)."""
    chosen_rewards: torch.Tensor
    """beta * mean log-prob of the chosen response (detached)."""
    rejected_rewards: torch.Tensor
    """beta * mean log-prob of the rejected response (detached)."""


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
    weights: torch.Tensor | None = None,
) -> SimPOOutput:
    """SimPO loss per pair from mean response log-probs.

    Args:
        chosen_logps: ``[pairs]`` mean log-prob per response token of the chosen responses.
        rejected_logps: ``[pairs]`` same for the rejected responses.
        beta: reward scale.
        gamma_beta_ratio: margin as gamma / beta; exclusive with ``simpo_gamma``.
        simpo_gamma: absolute margin gamma; exclusive with ``gamma_beta_ratio``.
        loss_type: ``"sigmoid"`` or ``"hinge"``.
        label_smoothing: eps of the conservative sigmoid loss, in [0, 0.5).
        sft_weight: weight of the chosen NLL (``-chosen_logps``) added to each pair's loss.
        weights: optional ``[pairs]`` per-pair weights multiplying the loss.

    Returns:
        :class:`SimPOOutput`.
    """
    if (gamma_beta_ratio is None) == (simpo_gamma is None):
        raise ValueError("give exactly one of gamma_beta_ratio and simpo_gamma")
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
    if sft_weight:
        losses = losses + sft_weight * (-chosen_logps)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return SimPOOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())
