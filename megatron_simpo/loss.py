"""The SimPO objective and other preference objectives (DPO, IPO, DPO-hinge, length-normalised
DPO, CPO, ORPO: :data:`OBJECTIVES`), as pure tensor functions (no devices, process groups or
models).

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

The other objectives change only ``l_i`` (and the NLL weight: CPO's ``cpo_alpha``, 1 for ORPO);
their weighting and NLL reductions are SimPO's (:func:`weighted_contributions`), so the same
global totals serve them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, TypedDict, Unpack

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
    # On an accelerator the check would stall the step (a host sync per micro-batch); the
    # collators (data/batching.py, data/packing.py) have already refused such pairs on the host.
    if count.device.type == "cpu" and bool((count == 0).any()):
        raise ValueError(
            "a sequence with zero response tokens reached the SimPO loss (its mean log-prob is "
            "0/0); such pairs must be rejected by data validation (megatron_simpo.data)"
        )
    return total, total / count, count


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with ``0 / 0 = 0`` (a global batch whose weights are all zero)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


def weighted_contributions(
    losses: torch.Tensor,
    nll_mean: torch.Tensor,
    *,
    nll_weight: float,
    sft_reduction: SFTReduction = "token",
    weights: torch.Tensor | None = None,
    chosen_tokens: torch.Tensor | None = None,
    totals: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turns per-pair losses into global-batch contributions (module docstring), shared by every
    objective: ``L = sum_i w_i l_i / sum_i w_i + nll_weight * NLL``.

    Args:
        losses: ``[pairs]`` each pair's preference loss ``l_i``.
        nll_mean: ``[pairs]`` ``S_i / n_i``, the mean NLL per token of each chosen response.
        nll_weight: weight of the NLL term (SimPO's ``sft_weight``, CPO's ``cpo_alpha``, 1 for
            ORPO).
        sft_reduction: ``"token"`` (pooled over the batch's chosen tokens) or ``"pair"``.
        weights: optional ``[pairs]`` per-pair weights ``w_i >= 0`` (default 1).
        chosen_tokens: ``[pairs]`` ``n_i``; needed by the ``"token"`` reduction (without it: an
            error if ``nll_weight``, else ``nll`` is NaN).
        totals: ``[3]`` :func:`batch_totals` of the global batch; default: these pairs'.

    Returns:
        ``(contributions, nll, pair_losses)``, each ``[pairs]``: the contribution to ``L``, the
        (detached) contribution to its NLL term, and each pair's own unweighted loss
        ``l_i + nll_weight * S_i / n_i`` (detached).
    """
    if sft_reduction not in ("token", "pair"):
        raise ValueError(f"unknown sft_reduction {sft_reduction!r}; expected 'token' or 'pair'")
    dtype = losses.dtype
    w = torch.ones_like(losses) if weights is None else weights.to(dtype)
    check_weights(w)
    pooled = sft_reduction == "token"
    if chosen_tokens is None and pooled and nll_weight:
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
    if unknown:
        nll = torch.full_like(losses, float("nan"))
    elif pooled:
        nll = _safe_ratio(pairs, weighted_tokens).to(dtype) * w * nll_mean * n  # N/T * w_i S_i
    else:
        nll = per_pair_scale * w * nll_mean
    contributions = per_pair_scale * w * losses
    if nll_weight:
        contributions = contributions + nll_weight * nll
    pair_losses = losses + nll_weight * nll_mean
    return contributions, nll.detach(), pair_losses.detach()


def conservative_sigmoid_loss(z: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``: the Bradley-Terry loss of a preference
    logit ``z`` ``[pairs]`` whose label is flipped with probability ``eps`` (cDPO)."""
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-z)
    return losses


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
    gamma = simpo_gamma if simpo_gamma is not None else gamma_beta_ratio * beta
    chosen_rewards = beta * chosen_logps
    rejected_rewards = beta * rejected_logps
    margin = chosen_rewards - rejected_rewards - gamma
    if loss_type == "sigmoid":
        losses = conservative_sigmoid_loss(margin, label_smoothing)
    elif loss_type == "hinge":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        losses = torch.relu(1.0 - margin)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'hinge'")
    contributions, nll, pair_losses = weighted_contributions(
        losses,
        -chosen_logps,  # S_i / n_i
        nll_weight=sft_weight,
        sft_reduction=sft_reduction,
        weights=weights,
        chosen_tokens=chosen_tokens,
        totals=totals,
    )
    return SimPOOutput(
        contributions, chosen_rewards.detach(), rejected_rewards.detach(), nll, pair_losses
    )


# --- Other preference objectives -------------------------------------------------------------
#
# Each takes the summed response log-probs and token counts of a batch of pairs (PairLogps) and
# returns the same contributions as simpo_loss (weighted mean of l_i plus an optional NLL term of
# the chosen responses, scaled by the global-batch totals), with the chosen/rejected rewards that
# the corresponding TRL trainer logs. Below, for pair i: c, r are the policy's summed log-probs of
# the chosen and rejected responses, c0, r0 the reference model's, n_c, n_r their token counts.


class PairLogps(NamedTuple):
    """Per-sequence inputs of a preference objective; all tensors are ``[pairs]``."""

    chosen: torch.Tensor
    """Policy log-prob of each chosen response, summed over its tokens (``c``)."""
    rejected: torch.Tensor
    """Same for the rejected responses (``r``)."""
    chosen_tokens: torch.Tensor
    """Token count of each chosen response (``n_c`` >= 1)."""
    rejected_tokens: torch.Tensor
    """Token count of each rejected response (``n_r`` >= 1)."""
    ref_chosen: torch.Tensor | None = None
    """Reference model's summed log-prob of each chosen response (``c0``; DPO family only)."""
    ref_rejected: torch.Tensor | None = None
    """Same for the rejected responses (``r0``)."""


class ObjectiveOutput(NamedTuple):
    """Per-pair results of any objective in :data:`OBJECTIVES`; tensors are ``[pairs]``.

    The first five fields mean what :class:`SimPOOutput`'s do (``losses`` and ``nll`` are
    contributions, see the module docstring); only the rewards' definition is per objective.
    """

    losses: torch.Tensor
    """Contribution of each pair to the objective (preference term + NLL term)."""
    chosen_rewards: torch.Tensor
    """Implicit reward of the chosen response, as TRL logs it for this objective (detached)."""
    rejected_rewards: torch.Tensor
    """Same for the rejected response (detached)."""
    nll: torch.Tensor
    """Contribution of each pair to the NLL term of the chosen responses (detached)."""
    pair_losses: torch.Tensor
    """Each pair's own, unweighted loss ``l_i + nll_weight * S_i / n_i`` (detached)."""
    metrics: dict[str, torch.Tensor]
    """Extra per-pair metrics of this objective (ORPO: ``log_odds_ratio``, ``log_odds_chosen``)."""


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation (Maechler 2012: ``log(-expm1(x))``
    near 0, ``log1p(-exp(x))`` below ``-log 2``). Both branches are finite for ``x < 0``, so
    ``torch.where`` passes no NaN gradient."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _log_ratios(logps: PairLogps, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c - c0, r - r0)``, each ``[pairs]``; refuses a batch without reference log-probs."""
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError(
            f"the {name!r} objective needs the reference model's log-probs (ref_chosen, "
            "ref_rejected); score the data with the reference model first, or use a "
            "reference-free objective (simpo, cpo, orpo)"
        )
    return logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected


class Reduction(TypedDict, total=False):
    """The keyword arguments every objective passes on to :func:`weighted_contributions`."""

    sft_reduction: SFTReduction
    """``"token"`` (pooled over the batch's chosen tokens; default) or ``"pair"``."""
    weights: torch.Tensor | None
    """``[pairs]`` per-pair weights ``w_i >= 0`` (default 1)."""
    totals: torch.Tensor | None
    """``[3]`` :func:`batch_totals` of the global batch; default: these pairs'."""


def _per_token(
    logps: PairLogps, chosen: torch.Tensor, rejected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen / n_c, rejected / n_r)``, each ``[pairs]``: values per response token."""
    dtype = chosen.dtype
    return chosen / logps.chosen_tokens.to(dtype), rejected / logps.rejected_tokens.to(dtype)


def _output(
    losses: torch.Tensor,
    logps: PairLogps,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    nll_weight: float,
    metrics: dict[str, torch.Tensor] | None = None,
    **reduction: Unpack[Reduction],
) -> ObjectiveOutput:
    """Weights and reduces ``losses`` ``[pairs]`` (:func:`weighted_contributions`), the NLL
    term being that of the chosen responses."""
    contributions, nll, pair_losses = weighted_contributions(
        losses,
        -logps.chosen / logps.chosen_tokens.to(logps.chosen.dtype),  # S_i / n_i
        nll_weight=nll_weight,
        chosen_tokens=logps.chosen_tokens,
        **reduction,
    )
    return ObjectiveOutput(
        contributions,
        chosen_rewards.detach(),
        rejected_rewards.detach(),
        nll,
        pair_losses,
        {k: v.detach() for k, v in (metrics or {}).items()},
    )


def dpo_loss(
    logps: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    **reduction: Unpack[Reduction],
) -> ObjectiveOutput:
    """DPO (Rafailov et al., 2023), sigmoid loss, with cDPO label smoothing ``eps``:

        z = (c - c0) - (r - r0);   l = -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)

    Rewards: ``beta (c - c0)``, ``beta (r - r0)`` (TRL's ``DPOTrainer``). At ``c = c0``,
    ``r = r0`` the loss is ``log 2`` for every ``eps``.

    Args:
        logps: :class:`PairLogps` with reference log-probs.
        beta: KL-penalty strength.
        label_smoothing: ``eps`` in [0, 0.5), the assumed label-flip probability.
        sft_weight: weight of an NLL term of the chosen responses (RPO-style; 0: none).
        reduction: ``sft_reduction``, ``weights``, ``totals`` (:class:`Reduction`).
    """
    chosen, rejected = _log_ratios(logps, "dpo")
    losses = conservative_sigmoid_loss(beta * (chosen - rejected), label_smoothing)
    return _output(
        losses, logps, beta * chosen, beta * rejected, nll_weight=sft_weight, **reduction
    )


def dpo_norm_loss(
    logps: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    **reduction: Unpack[Reduction],
) -> ObjectiveOutput:
    """Length-normalised DPO (Tülu 3's ``dpo_norm``; TRL's ``sigmoid_norm``): DPO on the log-ratios
    per token,

        z = (c - c0) / n_c - (r - r0) / n_r
        l = -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)

    Rewards: ``beta (c - c0)``, ``beta (r - r0)`` (summed log-ratios, as TRL logs them). Arguments
    as :func:`dpo_loss`.
    """
    chosen, rejected = _log_ratios(logps, "dpo-norm")
    chosen_per_token, rejected_per_token = _per_token(logps, chosen, rejected)
    z = chosen_per_token - rejected_per_token
    losses = conservative_sigmoid_loss(beta * z, label_smoothing)
    return _output(
        losses, logps, beta * chosen, beta * rejected, nll_weight=sft_weight, **reduction
    )


def ipo_loss(
    logps: PairLogps,
    *,
    beta: float,
    sft_weight: float = 0.0,
    **reduction: Unpack[Reduction],
) -> ObjectiveOutput:
    """IPO (Azar et al., 2023, eq. 17) on log-ratios per token, as TRL computes it (confirmed
    with the IPO authors, see TRL's ``DPOTrainer``):

        z = (c - c0) / n_c - (r - r0) / n_r;   l = (z - 1 / (2 beta))^2

    minimal (0) at ``z = 1 / (2 beta)``. ``beta`` is the paper's ``tau``; no label smoothing.
    Rewards: ``beta (c - c0)``, ``beta (r - r0)``. Other arguments as :func:`dpo_loss`.
    """
    chosen, rejected = _log_ratios(logps, "ipo")
    chosen_per_token, rejected_per_token = _per_token(logps, chosen, rejected)
    z = chosen_per_token - rejected_per_token
    losses = (z - 1.0 / (2.0 * beta)) ** 2
    return _output(
        losses, logps, beta * chosen, beta * rejected, nll_weight=sft_weight, **reduction
    )


def dpo_hinge_loss(
    logps: PairLogps,
    *,
    beta: float,
    sft_weight: float = 0.0,
    **reduction: Unpack[Reduction],
) -> ObjectiveOutput:
    """DPO with the hinge loss of SLiC (Zhao et al., 2023; TRL's ``hinge``):

        z = (c - c0) - (r - r0);   l = relu(1 - beta z)

    No label smoothing. Rewards: ``beta (c - c0)``, ``beta (r - r0)``. Other arguments as
    :func:`dpo_loss`.
    """
    chosen, rejected = _log_ratios(logps, "dpo-hinge")
    losses = torch.relu(1.0 - beta * (chosen - rejected))
    return _output(
        losses, logps, beta * chosen, beta * rejected, nll_weight=sft_weight, **reduction
    )


def cpo_loss(
    logps: PairLogps,
    *,
    beta: float,
    cpo_alpha: float = 1.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    **reduction: Unpack[Reduction],
) -> ObjectiveOutput:
    """CPO (Xu et al., 2024, eq. 3; TRL's ``CPOTrainer``), reference free, plus ``cpo_alpha``
    times the NLL of the chosen responses, ``L = sum_i w_i l_i / sum_i w_i + cpo_alpha * NLL``:

        sigmoid: z = c - r;          l = -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
        hinge:   z = c - r;          l = relu(1 - beta z)
        ipo:     z = c / n_c - r / n_r;   l = (z - 1 / (2 beta))^2

    (TRL's ``loss_type``; its ``ipo`` scores mean log-probs, the others summed ones). Rewards:
    ``beta c``, ``beta r`` (``ipo``: ``beta c / n_c``, ``beta r / n_r``).

    Args:
        logps: :class:`PairLogps` (reference log-probs unused).
        beta: temperature of the preference term.
        cpo_alpha: weight of the NLL term (TRL's default 1).
        loss_type: ``"sigmoid"``, ``"hinge"`` or ``"ipo"``.
        label_smoothing: ``eps`` in [0, 0.5) (sigmoid only).
        reduction: ``sft_reduction``, ``weights``, ``totals`` (:class:`Reduction`; ``"token"``
            is TRL's cross-entropy over all chosen tokens).
    """
    if loss_type not in ("sigmoid", "hinge", "ipo"):
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected sigmoid, hinge or ipo")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError("label_smoothing applies to the sigmoid loss only")
    c, r = logps.chosen, logps.rejected
    if loss_type == "ipo":
        c, r = _per_token(logps, c, r)
        losses = (c - r - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * (c - r))
    else:
        losses = conservative_sigmoid_loss(beta * (c - r), label_smoothing)
    return _output(losses, logps, beta * c, beta * r, nll_weight=cpo_alpha, **reduction)


def orpo_loss(
    logps: PairLogps,
    *,
    beta: float,
    orpo_alpha: float = 1.0,
    **reduction: Unpack[Reduction],
) -> ObjectiveOutput:
    """ORPO (Hong et al., 2024, eqs. 4-7; TRL's ``ORPOTrainer``), reference free, on mean
    log-probs ``m_c = c / n_c``, ``m_r = r / n_r``:

        log_odds = (m_c - m_r) - (log(1 - exp(m_c)) - log(1 - exp(m_r)))
        l = -beta log sigmoid(log_odds);   L = orpo_alpha * NLL + sum_i w_i l_i / sum_i w_i

    ``beta`` is the paper's ``lambda`` (TRL's name for it). ``log_odds`` is 0 when ``m_c = m_r``
    (then ``l = beta log 2``). Rewards: ``beta m_c``, ``beta m_r``. Extra metrics per pair:
    ``log_odds_ratio = log sigmoid(log_odds)`` and ``log_odds_chosen = log_odds`` (TRL's names;
    TRL logs their batch means). Mean log-probs must be < 0 (a response of probability 1 has
    infinite odds).

    Args:
        logps: :class:`PairLogps` (reference log-probs unused).
        beta: weight of the odds-ratio term.
        orpo_alpha: weight of the NLL term (TRL: 1).
        reduction: ``sft_reduction``, ``weights``, ``totals`` (:class:`Reduction`).
    """
    mean_c, mean_r = _per_token(logps, logps.chosen, logps.rejected)
    log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
    ratio = F.logsigmoid(log_odds)
    metrics = {"log_odds_ratio": ratio, "log_odds_chosen": log_odds}
    return _output(
        -beta * ratio,
        logps,
        beta * mean_c,
        beta * mean_r,
        nll_weight=orpo_alpha,
        metrics=metrics,
        **reduction,
    )


def simpo_objective(logps: PairLogps, *, beta: float, **options) -> ObjectiveOutput:
    """:func:`simpo_loss` on the mean log-probs ``c / n_c``, ``r / n_r``, in the interface of
    :data:`OBJECTIVES` (``options``: :func:`simpo_loss`'s keyword arguments but
    ``chosen_tokens``; rewards ``beta c / n_c``, ``beta r / n_r``)."""
    mean_c, mean_r = _per_token(logps, logps.chosen, logps.rejected)
    out = simpo_loss(mean_c, mean_r, beta=beta, chosen_tokens=logps.chosen_tokens, **options)
    return ObjectiveOutput(*out, {})


#: ``--loss`` name -> objective; each is called as ``fn(PairLogps(...), beta=..., **options)``.
OBJECTIVES: dict[str, Callable[..., ObjectiveOutput]] = {
    "simpo": simpo_objective,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "dpo-hinge": dpo_hinge_loss,
    "dpo-norm": dpo_norm_loss,
    "cpo": cpo_loss,
    "orpo": orpo_loss,
}

#: Objectives that need the reference model's log-probs in :class:`PairLogps`.
NEEDS_REFERENCE = frozenset({"dpo", "ipo", "dpo-hinge", "dpo-norm"})
