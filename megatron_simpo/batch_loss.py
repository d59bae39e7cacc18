"""The loss of a micro-batch in Megatron-Core's schedule contract, and the reduction of its reports.

On the last pipeline stage ``loss_func(output)`` returns ``(loss_sum, num_pairs, report)``. With
``calculate_per_token_loss=True`` the schedule sums ``num_pairs`` over micro-batches and
``finalize_model_grads`` divides the gradients by it after summing it over data-parallel ranks.
``loss_sum`` adds up per-pair *contributions* scaled by the global batch's totals (carried by
every micro-batch, ``loss.batch_totals``), so the gradient is that of the global-batch objective
(weighted mean, pooled NLL) whatever the layout (``megatron_simpo/loss.py``). The reports'
sums are reduced over micro-batches and data-parallel ranks by :func:`reduce_reports`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_simpo.config import LossConfig
from megatron_simpo.data.packing import packed_sequence_logps
from megatron_simpo.fused_logprobs import HiddenStatesGPTModel
from megatron_simpo.logprobs import vocab_parallel_logprobs
from megatron_simpo.loss import OBJECTIVES, ObjectiveOutput, PairLogps, sequence_logps

#: Means over the pairs of positive weight (a weight-0 pair is computed but not scored);
#: :func:`scored_keys` adds the objective's own.
SCORED_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "length/chosen",
    "length/rejected",
)
#: Per-pair metrics of every objective (TRL's names), in ``pair_metrics`` and ``evaluate``'s
#: ``per_pair``; :func:`pair_keys` adds the objective's own.
PAIR_KEYS = ("loss", "nll_loss", *SCORED_KEYS, "weight")
#: Summed per micro-batch, then over data-parallel ranks: ``loss`` and ``nll_loss`` are divided
#: by ``pairs`` (they are contributions, see ``loss.py``), the scored keys by ``scored_pairs``.
TOTAL_KEYS = ("pairs", "scored_pairs", "tokens", "tokens_effective")
REPORT_KEYS = ("loss", "nll_loss", *SCORED_KEYS, *TOTAL_KEYS)
#: The reference model's summed log-probs per pair (DPO family; ``per_pair`` only).
REFERENCE_KEYS = ("ref_logps/chosen", "ref_logps/rejected")


def mean_logps(loss_cfg: LossConfig) -> bool:
    """Whether ``logps/chosen`` is the mean log-prob per response token (SimPO, ORPO, CPO's ipo:
    what TRL's trainers log for them) rather than the summed one (DPO family, CPO)."""
    obj = loss_cfg.objective
    return obj in ("simpo", "orpo") or (obj == "cpo" and loss_cfg.loss_type == "ipo")


def scored_keys(loss_cfg: LossConfig) -> tuple[str, ...]:
    """SCORED_KEYS plus the objective's: the other reduction of the log-probs
    (``logps/chosen_sum`` where ``logps/chosen`` is a mean, else ``logps/chosen_mean``; the
    drift alarm reads the mean) and ORPO's ``log_odds_ratio``, ``log_odds_chosen``."""
    other = "sum" if mean_logps(loss_cfg) else "mean"
    extra = (f"logps/chosen_{other}", f"logps/rejected_{other}")
    if loss_cfg.objective == "orpo":
        extra += ("log_odds_ratio", "log_odds_chosen")
    return SCORED_KEYS + extra


def pair_keys(loss_cfg: LossConfig) -> tuple[str, ...]:
    """The ``per_pair`` keys of this objective: PAIR_KEYS, its scored extras and, for the DPO
    family, the reference log-probs."""
    extra = tuple(k for k in scored_keys(loss_cfg) if k not in SCORED_KEYS)
    return PAIR_KEYS + extra + (REFERENCE_KEYS if loss_cfg.needs_reference else ())


def report_keys(loss_cfg: LossConfig | None = None) -> tuple[str, ...]:
    """The summed keys of a micro-batch report (REPORT_KEYS with the objective's scored keys)."""
    if loss_cfg is None:
        return REPORT_KEYS
    return ("loss", "nll_loss", *scored_keys(loss_cfg), *TOTAL_KEYS)


def loss_kwargs(loss_cfg: LossConfig) -> dict:
    """The keyword arguments of ``OBJECTIVES[loss_cfg.objective]`` that come from the config
    (SimPO's margin is always passed as the absolute ``LossConfig.gamma``, where its default is
    defined; beta as ``resolved_beta``)."""
    obj = loss_cfg.objective
    kw: dict = dict(beta=loss_cfg.resolved_beta, sft_reduction=loss_cfg.sft_reduction)
    if obj in ("simpo", "cpo"):
        kw.update(loss_type=loss_cfg.loss_type, label_smoothing=loss_cfg.label_smoothing)
    if obj in ("dpo", "dpo-norm"):
        kw.update(label_smoothing=loss_cfg.label_smoothing)
    if obj == "simpo":
        kw.update(simpo_gamma=loss_cfg.gamma)
    if obj == "cpo":
        kw.update(cpo_alpha=loss_cfg.nll_weight)
    elif obj == "orpo":
        kw.update(orpo_alpha=loss_cfg.nll_weight)
    else:
        kw.update(sft_weight=loss_cfg.sft_weight)
    return kw


def objective_per_pair(
    loss_cfg: LossConfig,
    sums: torch.Tensor,
    counts: torch.Tensor,
    weights: torch.Tensor,
    ref: torch.Tensor | None = None,
    totals: torch.Tensor | None = None,
) -> tuple[ObjectiveOutput, dict[str, torch.Tensor]]:
    """The selected objective (``loss.OBJECTIVES``) and the per-pair metrics (:func:`pair_keys`)
    of ``b`` pairs from per-sequence values ``[2b]`` (chosen of each pair, then rejected).

    Args:
        sums: summed policy log-probs of the response tokens.
        counts: response token counts.
        weights: ``[b]`` pair weights.
        ref: the reference model's summed log-probs (DPO family), or None.
        totals: ``loss.batch_totals`` of the global batch; default: these pairs'.

    The objective is computed in float64 (the DPO family's ``c - c0`` cancels: summed log-probs
    of long responses are large) and its contributions are returned in ``sums``' dtype.
    """
    dtype, b = sums.dtype, sums.shape[0] // 2
    s64, n64 = sums.double(), counts.double()
    r64 = None if ref is None else ref.to(device=sums.device, dtype=torch.float64)
    logps = PairLogps(
        s64[:b],
        s64[b:],
        n64[:b],
        n64[b:],
        None if r64 is None else r64[:b],
        None if r64 is None else r64[b:],
    )
    out = OBJECTIVES[loss_cfg.objective](
        logps, **loss_kwargs(loss_cfg), weights=weights, totals=totals
    )
    out = out._replace(losses=out.losses.to(dtype), nll=out.nll.to(dtype))
    sums, means = sums.detach(), (s64 / n64).to(dtype).detach()
    trl, other = (means, sums) if mean_logps(loss_cfg) else (sums, means)
    other_name = "sum" if mean_logps(loss_cfg) else "mean"
    rc, rr = out.chosen_rewards.to(dtype), out.rejected_rewards.to(dtype)
    per_pair = {
        "loss": out.pair_losses.to(dtype),
        "nll_loss": -means[:b],
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/margins": rc - rr,
        "rewards/accuracies": (rc > rr).to(dtype),
        "logps/chosen": trl[:b],
        "logps/rejected": trl[b:],
        "length/chosen": counts[:b].detach().to(dtype),
        "length/rejected": counts[b:].detach().to(dtype),
        "weight": weights.to(dtype),
        f"logps/chosen_{other_name}": other[:b],
        f"logps/rejected_{other_name}": other[b:],
        **{k: v.to(dtype) for k, v in out.metrics.items()},
    }
    if r64 is not None:
        per_pair["ref_logps/chosen"], per_pair["ref_logps/rejected"] = r64[:b], r64[b:]
    return out, per_pair


def pair_metrics(
    loss_cfg: LossConfig, token_logps: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and NLL contributions ``[b]`` of the selected objective and per-pair metrics
    (:func:`objective_per_pair`) of a micro-batch from target log-probs ``[rows, s]`` (padded:
    ``2b`` rows, chosen first; packed: ``seq_index`` maps targets to sequences).
    ``batch["batch_totals"]`` (the global batch's, from ``PairBatcher``) scales the
    contributions; without it the micro-batch is the batch. ``batch["ref_logps"]`` ``[2b]``
    carries the reference log-probs of the DPO family."""
    if "seq_index" in batch:  # --pack-pairs / --prefix-sharing (megatron_simpo/data/packing.py)
        num_seqs = 2 * batch["weights"].shape[0]
        total, _, count = packed_sequence_logps(
            token_logps, batch["loss_mask"], batch["seq_index"], num_seqs
        )
    else:
        total, _, count = sequence_logps(token_logps, batch["loss_mask"])
    out, per_pair = objective_per_pair(
        loss_cfg,
        total,
        count,
        batch["weights"],
        ref=batch.get("ref_logps"),
        totals=batch.get("batch_totals"),
    )
    return out.losses, out.nll, per_pair


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, tokens_effective)`` of a micro-batch: the prompt+response tokens of its
    sequences, less (``tokens``) the prompt tokens that prefix sharing computes once for both
    sequences of a pair (``shared_prefix``); ``tokens_effective`` counts every prompt twice,
    as the padded layout computes it."""
    effective = batch["seq_tokens"].sum().float()
    shared = batch.get("shared_prefix")
    computed = effective if shared is None else effective - shared.sum().float()
    return computed, effective


def loss_func(
    loss_cfg: LossConfig,
    vocab_size: int,
    batch: dict[str, torch.Tensor],
    output: torch.Tensor,
    head: HiddenStatesGPTModel | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Megatron's ``loss_func(output)`` (bound by ``step.make_forward_step``): per-token
    log-probs of the targets (vocab-parallel, or the fused head's from hidden states), the
    objective's contributions, ``(loss_sum, num_pairs, report)``."""
    if head is not None:  # --fused-loss-head: output is the final hidden states [s, b, h]
        token_logps = head.token_logprobs(
            output, batch["labels"], vocab_size, scored=batch.get("scored_index")
        )
    else:  # output is this rank's logits [b, s, vocab/TP]
        token_logps = vocab_parallel_logprobs(
            output,
            batch["labels"],
            vocab_size=vocab_size,
            group=ps.get_tensor_model_parallel_group(),
        )
    losses, nll, per_pair = pair_metrics(loss_cfg, token_logps, batch)
    num_pairs = torch.tensor(losses.shape[0], dtype=torch.int, device=losses.device)
    return losses.sum(), num_pairs, micro_batch_report(losses, nll, per_pair, batch)


def micro_batch_report(
    losses: torch.Tensor,
    nll: torch.Tensor,
    per_pair: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
) -> dict:
    """The sums (REPORT_KEYS) of one micro-batch from :func:`pair_metrics`, plus ``per_pair``.

    Fresh tensors, never the returned loss itself (the schedule may scale that in place).
    """
    scored = (per_pair["weight"] > 0).to(losses.dtype)
    keys = [k for k in per_pair if k not in PAIR_KEYS or k in SCORED_KEYS]
    report = {k: (per_pair[k] * scored).sum().float() for k in keys if k not in REFERENCE_KEYS}
    report["loss"] = losses.detach().sum().float()
    report["nll_loss"] = nll.sum().float()
    report["pairs"] = torch.tensor(float(losses.shape[0]), device=losses.device)
    report["scored_pairs"] = scored.sum().float()
    report["tokens"], report["tokens_effective"] = token_counts(batch)
    report["per_pair"] = per_pair
    return report


def reduce_reports(reports: list[dict], loss_cfg: LossConfig | None = None) -> dict[str, float]:
    """Sums reports over micro-batches and data-parallel ranks; broadcasts from the last pipeline
    stage so every rank returns the same values: ``loss`` and ``nll_loss`` (the global-batch
    objective and its NLL term), means of the scored keys (:func:`scored_keys` of ``loss_cfg``;
    without it SCORED_KEYS) over the pairs of positive weight (NaN when there is none), and the
    totals ``pairs``, ``tokens``, ``tokens_effective``."""
    keys = report_keys(loss_cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Summed where the reports are (no host sync per key or micro-batch), in micro-batch order.
    vec = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for r in reports:
        vec += torch.stack([r[k].detach().double() for k in keys]).to(device)
    dp_group, pp_group = ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(dp_group) > 1:
        dist.all_reduce(vec, group=dp_group)
    if dist.get_world_size(pp_group) > 1:
        dist.broadcast(vec, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
    totals = dict(zip(keys, vec.tolist()))  # the step's one host sync for its metrics
    return summarize_totals(totals)


def summarize_totals(totals: dict[str, float]) -> dict[str, float]:
    """Metrics from summed reports (:func:`report_keys`): see :func:`reduce_reports`."""
    pairs, scored = totals["pairs"], totals.pop("scored_pairs")
    out = {k: totals[k] / pairs if pairs else 0.0 for k in ("loss", "nll_loss")}
    means = [k for k in totals if k not in ("loss", "nll_loss", *TOTAL_KEYS)]
    out.update({k: totals[k] / scored if scored else float("nan") for k in means})
    out.update({k: totals[k] for k in ("pairs", "tokens", "tokens_effective") if k in totals})
    return out
