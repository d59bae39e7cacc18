"""One SimPO training (or evaluation) step, spoken in Megatron-Core's schedule contract.

``forward_step(data_iterator, model)`` returns ``(output, loss_func)``; on the last pipeline stage
``loss_func(output)`` returns ``(loss_sum, num_pairs, report)``. With
``calculate_per_token_loss=True`` the schedule sums ``num_pairs`` over micro-batches and
``finalize_model_grads`` divides the gradients by it after summing it over data-parallel ranks:
the gradient is that of the mean loss over the *global* batch, whatever the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_simpo.config import LossConfig
from megatron_simpo.data.packing import (
    attention_mask_from,
    check_attention_supports_mask,
    packed_sequence_logps,
    per_sequence_rope,
)
from megatron_simpo.fused_logprobs import HiddenStatesGPTModel
from megatron_simpo.logprobs import vocab_parallel_logprobs
from megatron_simpo.loss import sequence_logps, simpo_loss
from megatron_simpo.model import unwrap

#: Per-pair SimPO metrics (TRL's names), in ``pair_metrics`` and ``evaluate``'s ``per_pair``.
PAIR_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
#: Summed per micro-batch, then over data-parallel ranks; divided by "pairs" for the means.
REPORT_KEYS = (*PAIR_KEYS, "length/chosen", "length/rejected", "pairs", "tokens")


def pair_metrics(
    loss_cfg: LossConfig, token_logps: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO per-pair losses and metrics of a micro-batch from target log-probs ``[rows, s]``
    (padded: ``2b`` rows, chosen first; packed: ``seq_index`` maps targets to sequences)."""
    if "seq_index" in batch:  # --pack-pairs / --prefix-sharing (megatron_simpo/data/packing.py)
        num_seqs = 2 * batch["weights"].shape[0]
        _, mean, _ = packed_sequence_logps(
            token_logps, batch["loss_mask"], batch["seq_index"], num_seqs
        )
    else:
        _, mean, _ = sequence_logps(token_logps, batch["loss_mask"])
    b = mean.shape[0] // 2
    ratio = loss_cfg.gamma_beta_ratio
    if loss_cfg.simpo_gamma is None and ratio is None:
        ratio = 0.5
    out = simpo_loss(
        mean[:b],
        mean[b:],
        beta=loss_cfg.beta,
        gamma_beta_ratio=ratio,
        simpo_gamma=loss_cfg.simpo_gamma,
        loss_type=loss_cfg.loss_type,
        label_smoothing=loss_cfg.label_smoothing,
        sft_weight=loss_cfg.sft_weight,
        weights=batch["weights"],
    )
    per_pair = {
        "loss": out.losses.detach(),
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
        "logps/chosen": mean[:b].detach(),
        "logps/rejected": mean[b:].detach(),
    }
    return out.losses, per_pair


def _loss_func(
    loss_cfg: LossConfig,
    vocab_size: int,
    batch: dict[str, torch.Tensor],
    output: torch.Tensor,
    head: HiddenStatesGPTModel | None = None,
):
    if head is not None:  # --fused-loss-head: output is the final hidden states [s, b, h]
        token_logps = head.token_logprobs(output, batch["labels"], vocab_size)
    else:  # output is this rank's logits [b, s, vocab/TP]
        token_logps = vocab_parallel_logprobs(
            output,
            batch["labels"],
            vocab_size=vocab_size,
            group=ps.get_tensor_model_parallel_group(),
        )
    losses, per_pair = pair_metrics(loss_cfg, token_logps, batch)
    b = losses.shape[0]
    lengths, seq_tokens = batch["lengths"].float(), batch["seq_tokens"].float()
    report = {k: v.sum().float() for k, v in per_pair.items()}
    report["length/chosen"] = lengths[:b].sum()
    report["length/rejected"] = lengths[b:].sum()
    report["pairs"] = torch.tensor(float(b), device=losses.device)
    report["tokens"] = seq_tokens.sum()
    # Fresh tensors, never the returned loss itself (the schedule may scale that in place).
    report["per_pair"] = per_pair  # type: ignore[assignment]
    num_pairs = torch.tensor(b, dtype=torch.int, device=losses.device)
    return losses.sum(), num_pairs, report


def make_forward_step(loss_cfg: LossConfig, vocab_size: int):
    """The ``forward_step_func`` for ``get_forward_backward_func()``."""
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )

    checked: set[int] = set()

    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        if "segment_ids" in batch:  # packed rows: block-diagonal mask, per-sequence RoPE
            if id(model) not in checked:
                check_attention_supports_mask(model)
                checked.add(id(model))
            mask = attention_mask_from(batch["segment_ids"], batch["branch_ids"])
            with per_sequence_rope(model, batch["position_ids"]):
                output = model(batch["tokens"], batch["position_ids"], mask)
        else:
            output = model(batch["tokens"], batch["position_ids"], None)
        core = unwrap(model)
        head = core if isinstance(core, HiddenStatesGPTModel) else None
        return output, partial(_loss_func, loss_cfg, vocab_size, batch, head=head)

    return forward_step


def run_forward_backward(
    model: list,
    micro_batches: list[dict[str, torch.Tensor]],
    seq_len: int,
    loss_cfg: LossConfig,
    vocab_size: int,
    forward_only: bool = False,
) -> list[dict]:
    """Runs Megatron's schedule over this rank's micro-batches; returns the loss reports
    (non-empty on the last pipeline stage only)."""
    vpp = len(model)
    iterators = [iter(micro_batches) for _ in range(vpp)] if vpp > 1 else iter(micro_batches)
    rows = micro_batches[0]["tokens"].shape[0]
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(loss_cfg, vocab_size),
        data_iterator=iterators,
        model=model if vpp > 1 else model[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=rows,
        forward_only=forward_only,
    )


def reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Sums reports over micro-batches and data-parallel ranks; broadcasts from the last pipeline
    stage so every rank returns the same means (``pairs`` and ``tokens`` stay totals)."""
    vec = torch.zeros(len(REPORT_KEYS), dtype=torch.float64)
    for r in reports:
        vec += torch.stack([r[k].detach().double().cpu() for k in REPORT_KEYS])
    if torch.cuda.is_available():
        vec = vec.cuda()
    dist.all_reduce(vec, group=ps.get_data_parallel_group())
    pp_group = ps.get_pipeline_model_parallel_group()
    dist.broadcast(vec, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
    totals = dict(zip(REPORT_KEYS, vec.tolist()))
    pairs = max(totals["pairs"], 1.0)
    return {k: (v if k in ("pairs", "tokens") else v / pairs) for k, v in totals.items()}


def train_step(
    model: list,
    optimizer,
    scheduler,
    micro_batches,
    seq_len: int,
    loss_cfg: LossConfig,
    vocab_size: int,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Forward, backward, optimizer step; returns the reduced metrics, ``grad_norm``, ``lr``,
    ``update_ok`` and, with fp16's dynamic loss scaling, ``loss_scale``.

    ``after_backward`` runs once gradients are final (reduced over DP, divided by the global
    pair count) and before the optimizer touches them (tests use it to export gradients).
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_forward_backward(model, micro_batches, seq_len, loss_cfg, vocab_size)
    if after_backward is not None:
        after_backward()
    metrics = reduce_reports(reports)
    lr = optimizer.param_groups[0]["lr"]
    update_ok, grad_norm = False, None
    # A non-finite loss or gradient must never reach the weights (or Adam's moments): skip the
    # update. Megatron-Core's own check covers only fp16 loss scaling; there the optimizer must
    # see the overflow itself (it skips the update and lowers the loss scale).
    scaled = uses_loss_scaling(optimizer)
    if math.isfinite(metrics["loss"]) and (scaled or grads_are_finite(model)):
        update_ok, grad_norm, _ = optimizer.step()
        if update_ok:
            scheduler.step(increment=1)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = lr
    metrics["update_ok"] = float(bool(update_ok))
    if scaled:  # after the step: the scale the next iteration uses
        metrics["loss_scale"] = float(optimizer.get_loss_scale())
    return metrics


def uses_loss_scaling(optimizer) -> bool:
    """Whether the Megatron optimizer (or one of a chained optimizer's parts) scales the loss
    dynamically (fp16) and so checks the gradients for overflow itself."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(getattr(p, "grad_scaler", None) is not None for p in parts)


def grads_are_finite(model: list) -> bool:
    """Whether every rank's gradient buffers are free of inf/NaN (collective over the world:
    each rank holds other shards). Reads the DDP grad buffers, one pass over the gradients."""
    ok = True
    for chunk in model:
        buffers = [*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", [])]
        if buffers:
            grads = [b.grad_data for b in buffers]
        else:
            grads = [
                g for p in chunk.parameters() if (g := getattr(p, "main_grad", None)) is not None
            ]
        ok = ok and all(bool(torch.isfinite(g).all()) for g in grads)
    flag = torch.tensor([0.0 if ok else 1.0])
    if torch.cuda.is_available():
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())
