"""Mixture of experts on Megatron-Core's ``MoELayer``: its ``TransformerConfig`` fields for a
model config, and the router's load-balancing loss (its weight in the objective, its logged value).

The MoE layer is Megatron-Core's own (router, ``alltoall`` token dispatcher, experts): with the
local spec the experts are a ``SequentialMLP`` (one ``MLP`` per local expert, what runs on the
CPU with gloo's all-to-all); with Transformer Engine on a GPU they are its grouped GEMM
(``TEGroupedMLP``). Both name their weights alike in the distributed checkpoint
(``...mlp.experts.experts.linear_fc1.weight`` stacked over layers and experts), so one
checkpoint loads with either and at any expert-parallel size.

The load-balancing loss (``--moe-aux-loss-coeff``) is Megatron's Switch-Transformer ``aux_loss``
per MoE layer and micro-batch, ``E * sum_i f_i * P_i`` over the micro-batch's tokens (``f_i``
the fraction routed to expert ``i``, ``P_i`` its mean router probability). Its gradient reaches
the router through Megatron's ``MoEAuxLossAutoScaler``; here the objective gains
``coeff * mean over micro-batches of (sum over layers of aux_loss)``, whatever the layout (the
pair-count normalisation of the preference loss is undone for it, :func:`prepare_routers`).

At ``--moe-aux-loss-coeff 0`` Megatron-Core computes no aux loss at all (``Router.routing``
calls it only when ``is_aux_loss_enabled()``, and ``_apply_aux_loss`` returns at coefficient 0:
megatron-core 0.16.1 ``transformer/moe/router.py:598`` and ``:284``), so its value cannot be
logged without adding it to the objective. Instead every run logs the expert balance it can
measure for free, ``moe/max_expert_load_fraction`` (:func:`expert_load_metrics`), from the
routing decisions a forward hook on each router sees.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_simpo.config import RunConfig

#: Megatron-Core's name of the load-balancing loss in its MoE metrics tracker.
_TRACKED = "load_balancing_loss"


def transformer_fields(cfg: RunConfig, grouped_gemm: bool) -> dict:
    """The MoE fields of Megatron-Core's ``TransformerConfig`` ({} for a dense model).

    Args:
        grouped_gemm: experts as Transformer Engine's grouped GEMM (GPU) rather than a
            ``SequentialMLP`` of local linears.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.num_experts is None:
        return {}
    coeff = t.moe_aux_loss_coeff
    return {
        "num_moe_experts": m.num_experts,
        "moe_router_topk": m.num_experts_per_tok,
        "moe_ffn_hidden_size": m.expert_ffn_size,
        # Qwen2-MoE: SharedExpertMLP, its output x sigmoid(x @ gate_weight^T) when gated.
        "moe_shared_expert_intermediate_size": m.shared_expert_intermediate_size,
        "moe_shared_expert_gate": m.shared_expert_gate,
        "moe_router_score_function": "softmax",
        # False: softmax over the k largest logits = softmax then top-k then renormalise
        # (Mixtral, Qwen3-MoE's norm_topk_prob); True: top-k of the full softmax, as is.
        "moe_router_pre_softmax": not m.norm_topk_prob,
        "moe_router_load_balancing_type": "aux_loss" if coeff > 0 else "none",
        # Megatron divides every gradient by the global pair count (calculate_per_token_loss,
        # with routers told otherwise in prepare_routers); x pairs per micro-batch makes the
        # aux term coeff x its mean over micro-batches.
        "moe_aux_loss_coeff": coeff * t.micro_batch_size,
        "moe_expert_capacity_factor": None,  # no token dropping
        "moe_token_dispatcher_type": "alltoall",
        "moe_grouped_gemm": grouped_gemm,
        "expert_model_parallel_size": p.expert_model_parallel_size,
        "expert_tensor_parallel_size": p.expert_tensor_parallel_size,
    }


def prepare_routers(chunks: list[torch.nn.Module]) -> None:
    """Makes each router's aux-loss gradient independent of the tokens per micro-batch.

    With ``calculate_per_token_loss`` Megatron's router scales its aux loss by the micro-batch's
    token count, to cancel finalize_model_grads' division by the global *token* count; this
    trainer divides by the global *pair* count instead, so that scaling would weigh the aux
    loss by tokens per pair (thousands) and by padding. Unscaled, the division by pairs is
    undone by ``moe_aux_loss_coeff`` (:func:`transformer_fields`). Also binds the TE names
    megatron-core 0.16's router reads without TE (``compat.define_missing_moe_te_names``).
    """
    from megatron.core.transformer.moe.router import Router

    from megatron_simpo import compat

    compat.define_missing_moe_te_names()
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, Router):
                module.calculate_per_token_loss = False
                module.register_forward_hook(_count_expert_load)


def _count_expert_load(router, args: tuple, output: tuple) -> None:
    """Adds the routing decisions of a training forward to ``router.expert_load`` (tokens per
    expert ``[experts]``, padding left out; on the device, no host sync)."""
    if not (router.training and torch.is_grad_enabled()):
        return  # evaluation, the generation probe
    routing_map = output[1]  # [tokens, experts] bool, tokens in the router's (s, b) order
    padding = args[1] if len(args) > 1 else None  # [s, b], True at padding
    if padding is not None:
        routing_map = routing_map & ~padding.reshape(-1, 1)
    counts = routing_map.sum(0, dtype=torch.float32)
    load = getattr(router, "expert_load", None)
    router.expert_load = counts if load is None else load + counts


def reset_expert_load(model: list) -> None:
    """Forgets the routing counts of forwards before the step (any forward with gradients in
    training mode adds to them, as to Megatron's aux-loss record)."""
    from megatron.core.transformer.moe.router import Router

    for chunk in model:
        for module in chunk.modules():
            if isinstance(module, Router):
                module.expert_load = None


def expert_load_metrics(model: list, config) -> dict[str, float]:
    """``moe/max_expert_load_fraction``: in the most imbalanced MoE layer, the busiest expert's
    share of the step's routed token slots (``max_e n_e / sum_e n_e`` over the step's training
    forwards, all ranks' tokens, padding left out): ``1 / num_experts`` when perfectly balanced,
    at most ``1 / top_k`` (every token on the same k experts). Logged at any
    ``--moe-aux-loss-coeff`` (activation recompute counts a layer's tokens twice, which leaves the
    share as it is); zeroes the counts. Collective over the pipeline, tensor (sequence-parallel
    token shards) and data-parallel groups; {} for a dense model.

    Args:
        model: this rank's model chunks.
        config: the model's Megatron-Core ``TransformerConfig``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router import Router

    if not config.num_moe_experts:
        return {}
    counts = None
    for chunk in model:
        for module in chunk.modules():
            if isinstance(module, Router) and getattr(module, "expert_load", None) is not None:
                if counts is None:  # [layers, experts]: each stage fills its own layers
                    counts = module.expert_load.new_zeros(config.num_layers, config.num_moe_experts)
                counts[module.layer_number - 1] += module.expert_load
                module.expert_load = None
    if counts is None:
        counts = torch.zeros(config.num_layers, config.num_moe_experts)
        counts = counts.to(next(model[0].parameters()).device)
    counts = counts.double()
    groups = [ps.get_pipeline_model_parallel_group(), ps.get_data_parallel_group()]
    if config.sequence_parallel:  # the TP ranks route disjoint token shards
        groups.append(ps.get_tensor_model_parallel_group())
    for group in groups:
        if dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
    total = counts.sum(1)
    share = counts.max(1).values / total.clamp(min=1)
    if not bool((total > 0).any()):
        return {}
    return {"moe/max_expert_load_fraction": float(share.max())}


def _tracker_values() -> tuple[torch.Tensor | None, object]:
    """(per-layer sums of the load-balancing loss over this rank's micro-batches, the entry)."""
    try:  # megatron-core 0.19+
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        entry = get_moe_metrics_tracker().metrics.get(_TRACKED)
        return (entry.values if entry is not None else None), entry
    except ImportError:  # 0.16
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get(_TRACKED)
        return (entry["values"] if entry is not None else None), entry


def reset_aux_loss() -> None:
    """Zeroes Megatron's record of the load-balancing loss (any forward with gradients in
    training mode adds to it, not only the training step's)."""
    values, _ = _tracker_values()
    if values is not None:
        values.zero_()


def aux_loss_metrics(config, num_microbatches: int) -> dict[str, float]:
    """``moe/aux_loss``: the load-balancing loss of the step's forward passes, summed over MoE
    layers and averaged over micro-batches (all ranks: summed over pipeline stages and the
    tensor/context ranks' token shards, averaged over data-parallel ranks), as the objective
    weighs it; then zeroes Megatron's record. Collective over the pipeline and data-parallel
    groups; {} for a dense model or with ``--moe-aux-loss-coeff 0`` (no aux loss computed).

    Args:
        config: the model's Megatron-Core ``TransformerConfig``.
        num_microbatches: micro-batches this rank ran in the step.
    """
    from megatron.core import parallel_state as ps

    if not config.num_moe_experts or not config.moe_aux_loss_coeff:
        return {}
    values, entry = _tracker_values()
    if values is None:  # no training forward yet (every stage has MoE layers otherwise)
        return {}
    v = values.clone()
    get = entry.get if isinstance(entry, dict) else lambda k: getattr(entry, k, None)
    dist.all_reduce(v, group=ps.get_pipeline_model_parallel_group())
    if get("reduce_group") is not None:  # token shards of one micro-batch: partial sums
        dist.all_reduce(v, group=get("reduce_group"))
    dp = ps.get_data_parallel_group()
    v = v.double()
    dist.all_reduce(v, group=dp)
    v /= dist.get_world_size(dp)
    values.zero_()
    return {"moe/aux_loss": float(v.sum()) / num_microbatches}


def padding_mask(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
    """Megatron-Core's MoE ``padding_mask`` of a micro-batch: True at padding positions, so
    that padding is left out of the load-balancing loss (it would otherwise weigh in with
    whatever width a layout pads a micro-batch to). ``[rows, seq]``, or ``[rows, seq / TP]`` on
    a pipeline stage after the first under sequence parallelism (GPTModel scatters it only on
    the first).

    Args:
        batch: a collated micro-batch (``segment_ids`` for packed rows, else ``seq_tokens``).
        model: the (unwrapped) ``GPTModel`` chunk it goes through.
    """
    tokens = batch["tokens"]
    if "segment_ids" in batch:
        mask = batch["segment_ids"] == 0
    else:  # row r holds seq_tokens[r] - 1 input positions
        cols = torch.arange(tokens.shape[1], device=tokens.device)
        mask = cols.unsqueeze(0) >= (batch["seq_tokens"] - 1).unsqueeze(1)
    if model.config.sequence_parallel and not model.pre_process:
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        mask = scatter_to_sequence_parallel_region(mask.t().contiguous()).t().contiguous()
    return mask
