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
from megatron_simpo.loss import sequence_logps, simpo_loss

#: Per-pair SimPO metrics (TRL's names), in ``pair_metrics`` and ``evaluate``'s ``per_pair``.
PAIR_KEYS = (
    "loss",
    "nll_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "length/chosen",
    "length/rejected",
    "weight",
)
#: Means over the pairs of positive weight (a weight-0 pair is computed but not scored).
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
#: Summed per micro-batch, then over data-parallel ranks: ``loss`` and ``nll_loss`` are divided
#: by ``pairs`` (they are contributions, see ``loss.py``), the SCORED_KEYS by ``scored_pairs``.
REPORT_KEYS = (
    "loss",
    "nll_loss",
    *SCORED_KEYS,
    "pairs",
    "scored_pairs",
    "tokens",
    "tokens_effective",
)


def loss_kwargs(loss_cfg: LossConfig) -> dict:
    """The keyword arguments of ``simpo_loss`` that come from the config (the margin is always
    passed as the absolute ``LossConfig.gamma``, where its default is defined)."""
    return dict(
        beta=loss_cfg.resolved_beta,
        simpo_gamma=loss_cfg.gamma,
        loss_type=loss_cfg.loss_type,
        label_smoothing=loss_cfg.label_smoothing,
        sft_weight=loss_cfg.sft_weight,
        sft_reduction=loss_cfg.sft_reduction,
    )


def pair_metrics(
    loss_cfg: LossConfig, token_logps: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO loss and NLL contributions ``[b]`` (``loss.simpo_loss``) and per-pair metrics of a
    micro-batch from target log-probs ``[rows, s]`` (padded: ``2b`` rows, chosen first; packed:
    ``seq_index`` maps targets to sequences). ``batch["batch_totals"]`` (the global batch's,
    from ``PairBatcher``) scales the contributions; without it the micro-batch is the batch."""
    if loss_cfg.objective != "simpo":  # until the batch carries what the others need
        raise NotImplementedError(f"--loss {loss_cfg.objective} is not wired into training yet")
    if "seq_index" in batch:  # --pack-pairs / --prefix-sharing (megatron_simpo/data/packing.py)
        num_seqs = 2 * batch["weights"].shape[0]
        _, mean, count = packed_sequence_logps(
            token_logps, batch["loss_mask"], batch["seq_index"], num_seqs
        )
    else:
        _, mean, count = sequence_logps(token_logps, batch["loss_mask"])
    b = mean.shape[0] // 2
    out = simpo_loss(
        mean[:b],
        mean[b:],
        **loss_kwargs(loss_cfg),
        weights=batch["weights"],
        chosen_tokens=count[:b],
        totals=batch.get("batch_totals"),
    )
    per_pair = {
        "loss": out.pair_losses,
        "nll_loss": -mean[:b].detach(),
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).to(mean.dtype),
        "logps/chosen": mean[:b].detach(),
        "logps/rejected": mean[b:].detach(),
        "length/chosen": count[:b].detach(),
        "length/rejected": count[b:].detach(),
        "weight": batch["weights"].to(mean.dtype),
    }
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
        token_logps = head.token_logprobs(output, batch["labels"], vocab_size)
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
    report = {k: (per_pair[k] * scored).sum().float() for k in SCORED_KEYS}
    report["loss"] = losses.detach().sum().float()
    report["nll_loss"] = nll.sum().float()
    report["pairs"] = torch.tensor(float(losses.shape[0]), device=losses.device)
    report["scored_pairs"] = scored.sum().float()
    report["tokens"], report["tokens_effective"] = token_counts(batch)
    report["per_pair"] = per_pair
    return report


def reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Sums reports over micro-batches and data-parallel ranks; broadcasts from the last pipeline
    stage so every rank returns the same values: ``loss`` and ``nll_loss`` (the global-batch
    objective and its NLL term), means of the SCORED_KEYS over the pairs of positive weight (NaN
    when there is none), and the totals ``pairs``, ``tokens``, ``tokens_effective``."""
    vec = torch.zeros(len(REPORT_KEYS), dtype=torch.float64)
    for r in reports:
        vec += torch.stack([r[k].detach().double().cpu() for k in REPORT_KEYS])
    if torch.cuda.is_available():
        vec = vec.cuda()
    dist.all_reduce(vec, group=ps.get_data_parallel_group())
    pp_group = ps.get_pipeline_model_parallel_group()
    dist.broadcast(vec, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
    totals = dict(zip(REPORT_KEYS, vec.tolist()))
    return summarize_totals(totals)


def summarize_totals(totals: dict[str, float]) -> dict[str, float]:
    """Metrics from summed reports (REPORT_KEYS): see :func:`reduce_reports`."""
    pairs, scored = totals["pairs"], totals.pop("scored_pairs")
    out = {k: totals[k] / pairs if pairs else 0.0 for k in ("loss", "nll_loss")}
    out.update({k: totals[k] / scored if scored else float("nan") for k in SCORED_KEYS})
    out.update({k: totals[k] for k in ("pairs", "tokens", "tokens_effective") if k in totals})
    return out
