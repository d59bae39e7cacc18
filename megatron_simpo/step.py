"""One training (or evaluation) step, spoken in Megatron-Core's schedule contract.

``forward_step(data_iterator, model)`` returns ``(output, loss_func)`` (``batch_loss.py`` holds
the loss and the reduction of its reports); :func:`train_step` runs the schedule's forward and
backward over a rank's micro-batches and the optimizer step, which is skipped when the loss or a
gradient is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_simpo import batch_loss, moe, packed_seq
from megatron_simpo.batch_loss import reduce_reports
from megatron_simpo.config import LossConfig
from megatron_simpo.data.packing import (
    attention_mask_from,
    check_attention_supports_mask,
    per_sequence_rope,
)
from megatron_simpo.flex_attention import block_mask_from
from megatron_simpo.fused_logprobs import HiddenStatesGPTModel, scored_positions
from megatron_simpo.model import model_device, unwrap


def make_forward_step(loss_cfg: LossConfig, vocab_size: int):
    """The ``forward_step_func`` for ``get_forward_backward_func()``."""
    device = model_device()

    checked: set[int] = set()

    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model):
        batch = next(data_iterator)
        core = unwrap(model)
        head = core if isinstance(core, HiddenStatesGPTModel) else None
        if "segment_ids" in batch and thd_packed(model):
            # Transformer Engine: the rows as one stream of THD sequences (packed_seq.py),
            # cu_seqlens from the host batch; without pipeline stages to keep shapes for, the
            # rows' trailing padding is dropped.
            c = core.config
            pad = None
            if c.pipeline_model_parallel_size == 1:
                pad = packed_seq.stream_multiple(c.tensor_model_parallel_size)
            batch, params = packed_seq.thd_batch(batch, pad)
            batch = _to_device(_with_scored_index(batch, core, head), device)
            params = packed_seq.to_device(params, device)
            output = model(
                batch["tokens"],
                batch["position_ids"],
                None,
                packed_seq_params=params,
                **_moe_kwargs(batch, core),
            )
            return output, partial(batch_loss.loss_func, loss_cfg, vocab_size, batch, head=head)
        batch = _to_device(_with_scored_index(batch, core, head), device)
        moe_kwargs = _moe_kwargs(batch, core)
        if "segment_ids" in batch:  # packed rows: block-diagonal mask, per-sequence RoPE
            if id(model) not in checked:
                check_attention_supports_mask(model)
                checked.add(id(model))
            # FlexAttention models take a block mask (the rule, per tile), others a dense one.
            build = block_mask_from if packed_format(model) == "block" else attention_mask_from
            mask = build(batch["segment_ids"], batch["branch_ids"])
            with per_sequence_rope(model, batch["position_ids"]):
                output = model(batch["tokens"], batch["position_ids"], mask, **moe_kwargs)
        else:
            output = model(batch["tokens"], batch["position_ids"], None, **moe_kwargs)
        return output, partial(batch_loss.loss_func, loss_cfg, vocab_size, batch, head=head)

    return forward_step


def _moe_kwargs(batch: dict[str, torch.Tensor], core) -> dict:
    """MoE: padding stays out of the router's load-balancing loss ({} for a dense model)."""
    return {"padding_mask": moe.padding_mask(batch, core)} if core.config.num_moe_experts else {}


def packed_format(model) -> str:
    """How ``model`` takes packed rows (set by ``model.build_model``): ``thd`` (Transformer
    Engine: THD sequences), ``block`` (FlexAttention block mask) or ``mask`` (dense mask)."""
    return getattr(unwrap(model), "packed_seq_format", "mask")


def thd_packed(model) -> bool:
    """Whether ``model`` takes packed rows as THD sequences (Transformer Engine)."""
    return packed_format(model) == "thd"


def _with_scored_index(batch: dict, core, head) -> dict:
    """The batch plus ``scored_index`` (``fused_logprobs.scored_positions``) for the fused head
    on the last stage, computed on the host before the transfer (no device sync)."""
    if head is None or not core.post_process:
        return batch
    return {**batch, "scored_index": scored_positions(batch["loss_mask"])}


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
    if "segment_ids" in micro_batches[0] and thd_packed(model[0]):
        rows, seq_len = 1, rows * seq_len  # one [rows * s] stream per micro-batch (packed_seq.py)
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(loss_cfg, vocab_size),
        data_iterator=iterators,
        model=model if vpp > 1 else model[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=rows,
        forward_only=forward_only,
    )


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
    ``update_ok``, with fp16's dynamic loss scaling ``loss_scale`` and for a mixture of experts
    ``moe/max_expert_load_fraction`` (and ``moe/aux_loss`` with an aux loss).

    ``after_backward`` runs once gradients are final (reduced over DP, divided by the global
    pair count) and before the optimizer touches them (tests use it to export gradients).
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    config = unwrap(model[0]).config
    if config.num_moe_experts:
        moe.reset_aux_loss()
        moe.reset_expert_load(model)
    reports = run_forward_backward(model, micro_batches, seq_len, loss_cfg, vocab_size)
    aux = moe.aux_loss_metrics(config, len(micro_batches))  # before anything else runs forward
    aux |= moe.expert_load_metrics(model, config)
    if after_backward is not None:
        after_backward()
    metrics = reduce_reports(reports, loss_cfg) | aux
    lr = optimizer.param_groups[0]["lr"]
    update_ok, grad_norm = False, None
    # A non-finite loss or gradient must never reach the weights (or Adam's moments): skip the
    # update. Megatron-Core's own check covers only fp16 loss scaling; there the optimizer must
    # see the overflow itself (it skips the update and lowers the loss scale).
    scaled = uses_loss_scaling(optimizer)
    if scaled:
        if math.isfinite(metrics["loss"]):
            update_ok, grad_norm, _ = optimizer.step()
    else:
        update_ok, grad_norm = step_unless_non_finite(optimizer, math.isfinite(metrics["loss"]))
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


def step_unless_non_finite(optimizer, loss_finite: bool) -> tuple[bool, float]:
    """Megatron's ``optimizer.step()`` (a ``ChainedOptimizer``: prepare the gradients, their
    global norm, clip, update), skipped when the loss or the gradient norm is not finite;
    returns ``(updated, grad_norm)``.

    The non-finite check is the norm's own reduction (one pass over the gradients and one
    collective, which the step does anyway): an inf or NaN gradient anywhere makes the global
    norm inf or NaN on every rank of the gradient-statistics group (the model-parallel group,
    or the world with the distributed optimizer; data-parallel replicas hold the same reduced
    gradients), so every rank skips together. Only a finite norm whose square overflows fp32
    (gradients ~1e19) is also skipped. The norm is computed ahead of ``step()``, inside its
    ``prepare_grads``, and handed back to it, so the update is exactly Megatron's.
    """
    norm: list[float] = []
    prepare, get_norm = optimizer.prepare_grads, optimizer.get_grad_norm

    def prepare_then_check() -> bool:  # True: "found inf", step() returns without updating
        if prepare():
            return True
        norm.append(float(get_norm()))
        return not (loss_finite and math.isfinite(norm[0]))

    optimizer.prepare_grads = prepare_then_check
    optimizer.get_grad_norm = lambda: norm[0]
    try:
        update_ok, _, _ = optimizer.step()
    finally:  # back to the class's methods
        del optimizer.prepare_grads, optimizer.get_grad_norm
    return bool(update_ok), norm[0] if norm else float("nan")
