"""The integration matrix, as data: named parallel layouts trained from the same weights and data.

Every layout runs the same 3 SimPO steps (global batch of 8 pairs of ``tests/data/
varied_pretok.jsonl``: varied lengths and weights) from the weights that the fp32
single-process reference ``tp1`` (or ``tp1_tied``) wrote, and is compared with its reference:
per-step losses, metrics and gradient norms, the full gradients of step 1 (layouts without the
distributed optimizer, whose gradient buffer only holds its own shard after the reduce-scatter)
and the weights after step 3. The bf16 layouts load the same fp32 weights (rounded to bf16) and
are compared with the bf16 single process ``tp1_bf16`` and with the fp32 ``tp1``. The ``_dpo``
and ``_orpo`` layouts train those objectives instead (their references ``tp1_dpo``, ``tp1_orpo``);
DPO's reference log-probs are :func:`synthetic_reference` values, written into the
prepared data as the reference columns that ``megatron-simpo score-reference`` writes.
"""

from __future__ import annotations

from typing import NamedTuple

#: Small Llama: GQA (4 query heads, 2 KV groups), SwiGLU, RMSNorm, RoPE; fp32.
BASE = {
    "model": {
        "vocab_size": 32,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "make_vocab_size_divisible_by": 8,
        "tie_word_embeddings": False,
    },
    "loss": {"beta": 2.5, "gamma_beta_ratio": 0.4, "sft_weight": 0.1},
    # adam_eps 1e-3: the Adam update is then Lipschitz in the gradient (constant lr/eps = 10), so
    # float-rounding differences between layouts stay small in the weights; with eps=1e-8 the
    # update is ~lr*sign(g) and a ~1e-7 gradient difference on a near-zero element can flip it.
    "optim": {"lr": 1e-2, "lr_warmup_iters": 0, "clip_grad": 1.0, "adam_eps": 1e-3},
    "train": {
        "micro_batch_size": 2,
        "global_batch_size": 8,
        "train_iters": 3,
        "seq_length": 16,
        "seed": 7,
        "precision": "fp32",
        # The padded, unfused path (the matrix's comments and tolerances are about it); packing,
        # prefix sharing and the fused head, on by default here, are compared with it per layout
        # in test_packing.py and test_fused_logprobs.py.
        "pack_pairs": False,
        "prefix_sharing": False,
        "fused_loss_head": False,
    },
}


class Layout(NamedTuple):
    """One entry of the matrix."""

    world: int
    """Ranks (layouts of one world size share one torchrun)."""
    ref: str | None
    """Layout compared with (None: a reference, which initialises and saves the weights)."""
    parallel: dict
    """Overrides of the ``parallel`` section."""
    train: dict | None = None
    """Overrides of the ``train`` section (precision, micro-batch size)."""
    loss: dict | None = None
    """The ``loss`` section instead of BASE's (another objective)."""
    model: dict | None = None
    """Overrides of the ``model`` section (another family); a layout and its reference agree."""
    lora: dict | None = None
    """The ``lora`` section (LoRA/DoRA adapters on the frozen base); as its reference's."""


BF16 = {"precision": "bf16"}
DPO = {"objective": "dpo", "beta": 0.5, "sft_weight": 0.1}
ORPO = {"objective": "orpo", "beta": 0.5, "orpo_alpha": 0.7}
#: Qwen3: per-head QK RMSNorm (its weight's gradient is partial on each TP rank and must be summed
#: over TP), head_dim 16 != hidden / heads.
QWEN3 = {"model_type": "qwen3", "qk_layernorm": True, "head_dim": 16}
#: LoRA on all seven projections; DoRA on a subset (unadapted q/k/v and gate/up rows in the
#: fused layers). The references start from random non-zero B (and DoRA magnitudes off ||W||).
LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lora_target": "all"}
DORA = {
    "lora_rank": 3,
    "lora_alpha": 6.0,
    "lora_target": "q_proj,v_proj,proj,up_proj,fc2",
    "dora": True,
}
#: Mixtral: 4 experts, top-2 (Megatron-Core's MoE layer, alltoall dispatcher), with the router's
#: load-balancing loss at a weight that moves the gradient (0.1; its gradient path through
#: every layout, padding masked out of it).
MIXTRAL = {"model_type": "mixtral", "num_experts": 4, "num_experts_per_tok": 2}
#: Qwen2-MoE: QKV biases, top-2 of the full softmax (norm_topk_prob False), a shared expert
#: whose sigmoid gate weight is replicated over TP and, with SP, sees only its rank's tokens (its
#: gradient partial, summed over TP by Megatron as for the norms).
QWEN2_MOE = {
    **MIXTRAL,
    "model_type": "qwen2_moe",
    "qkv_bias": True,
    "norm_topk_prob": False,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 24,
    "shared_expert_gate": True,
}
AUX = {"moe_aux_loss_coeff": 0.1}
EP2 = {"expert_model_parallel_size": 2}
PP2 = {"pipeline_model_parallel_size": 2}
TP2_PP2 = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
TP2_DP2_SP_DISTOPT = {
    "tensor_model_parallel_size": 2,
    "sequence_parallel": True,
    "use_distributed_optimizer": True,
}

LAYOUTS: dict[str, Layout] = {
    "tp1": Layout(1, None, {}),
    "tp1_tied": Layout(1, None, {}),
    # Loads tp1's weights; compared with tp1 (fp32) and the reference of the bf16 layouts.
    "tp1_bf16": Layout(1, "tp1", {}, BF16),
    "tp2": Layout(2, "tp1", {"tensor_model_parallel_size": 2}),
    # 8 micro-batches of one pair through the 1F1B schedule (default padding: multiples of 64,
    # capped at --seq-length 16, so all 16 wide).
    "pp2": Layout(2, "tp1", {"pipeline_model_parallel_size": 2}, {"micro_batch_size": 1}),
    # Today's fixed-shape path: every micro-batch padded to the longest of the slice.
    "pp2_fixed": Layout(2, "tp1", {**PP2, "variable_seq_lengths": False}, {"micro_batch_size": 1}),
    # Variable shapes between stages, each micro-batch padded to its own length rounded to 4
    # (widths 4..16 on this data): the same losses and gradients as the fixed-shape path.
    "pp2_varlen": Layout(
        2, "pp2_fixed", {**PP2, "pipeline_pad_multiple": 4}, {"micro_batch_size": 1}
    ),
    "pp2_vpp2": Layout(
        2, "tp1", {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1}
    ),
    # Distributed optimizer with its overlapped gradient reduce-scatter and parameter all-gather
    # (the defaults): 4 one-pair micro-batches per rank, so the reduction must wait for the
    # last one (no_sync), and the all-gather of step i's update happens in step i+1's forward.
    "dp2_distopt": Layout(2, "tp1", {"use_distributed_optimizer": True}, {"micro_batch_size": 1}),
    "tp2_bf16": Layout(2, "tp1_bf16", {"tensor_model_parallel_size": 2}, BF16),
    "pp2_bf16": Layout(2, "tp1_bf16", {"pipeline_model_parallel_size": 2}, BF16),
    "tp2_pp2": Layout(4, "tp1", TP2_PP2),
    "tp2_pp2_tied": Layout(4, "tp1_tied", TP2_PP2),
    "tp2_dp2_sp_distopt": Layout(4, "tp1", TP2_DP2_SP_DISTOPT),
    # Two one-pair micro-batches per rank, each padded to its own length (tp1: pairs of pairs).
    "dp4": Layout(4, "tp1", {}, {"micro_batch_size": 1}),
    "tp2_pp2_bf16": Layout(4, "tp1_bf16", TP2_PP2, BF16),
    "tp2_dp2_sp_distopt_bf16": Layout(4, "tp1_bf16", TP2_DP2_SP_DISTOPT, BF16),
    # Other objectives: DPO from (synthetic) reference log-probs through TP and the pipeline;
    # ORPO's pooled NLL over one-pair micro-batches and two data-parallel ranks.
    "tp1_dpo": Layout(1, None, {}, loss=DPO),
    "tp2_pp2_dpo": Layout(4, "tp1_dpo", TP2_PP2, loss=DPO),
    "tp1_orpo": Layout(1, None, {}, loss=ORPO),
    "tp2_dp2_orpo": Layout(
        4, "tp1_orpo", {"tensor_model_parallel_size": 2}, {"micro_batch_size": 1}, loss=ORPO
    ),
    # Another family: Qwen3's QK norms through TP with sequence parallelism.
    "tp1_qwen3": Layout(1, None, {}, model=QWEN3),
    "tp2_sp_qwen3": Layout(
        2, "tp1_qwen3", {"tensor_model_parallel_size": 2, "sequence_parallel": True}, model=QWEN3
    ),
    # LoRA / DoRA SimPO: only the adapters train (the replicated factor's partial gradients are
    # summed over TP), through sequence parallelism + the distributed optimizer, and the pipeline.
    "tp1_lora": Layout(1, None, {}, lora=LORA),
    "tp2_dp2_sp_distopt_lora": Layout(4, "tp1_lora", TP2_DP2_SP_DISTOPT, lora=LORA),
    "tp1_dora": Layout(1, None, {}, lora=DORA),
    "tp2_pp2_dora": Layout(4, "tp1_dora", TP2_PP2, lora=DORA),
    # Mixture of experts: experts split over 2 EP ranks (dense layers data-parallel over them);
    # with TP2 + SP and whole experts (ETP1); with a 2-stage pipeline (the aux loss of stage 1's
    # layers reaches the same optimizer step).
    "tp1_mixtral": Layout(1, None, {}, AUX, model=MIXTRAL),
    "ep2_mixtral": Layout(2, "tp1_mixtral", EP2, AUX, model=MIXTRAL),
    "ep2_tp2_etp1_mixtral": Layout(
        4,
        "tp1_mixtral",
        {
            **EP2,
            "tensor_model_parallel_size": 2,
            "sequence_parallel": True,
            "expert_tensor_parallel_size": 1,
        },
        AUX,
        model=MIXTRAL,
    ),
    "ep2_pp2_mixtral": Layout(4, "tp1_mixtral", {**EP2, **PP2}, AUX, model=MIXTRAL),
    # Qwen2-MoE: the shared expert and its gate through TP2 + SP (experts TP-split, ETP2).
    "tp1_qwen2moe": Layout(1, None, {}, AUX, model=QWEN2_MOE),
    "tp2_sp_qwen2moe": Layout(
        2,
        "tp1_qwen2moe",
        {"tensor_model_parallel_size": 2, "sequence_parallel": True},
        AUX,
        model=QWEN2_MOE,
    ),
    # LoRA / DoRA on mixture of experts: attention, every routed expert (SequentialMLP) and
    # Qwen2-MoE's shared expert adapted, router and shared-expert gate frozen. EP2: each expert's
    # adapters on its own rank, reduced over expert-DP; TP2 + SP: the experts TP-split (ETP2),
    # their replicated factors' partial gradients summed over expert-TP, DoRA's row norms too.
    "tp1_lora_mixtral": Layout(1, None, {}, AUX, model=MIXTRAL, lora=LORA),
    "ep2_lora_mixtral": Layout(2, "tp1_lora_mixtral", EP2, AUX, model=MIXTRAL, lora=LORA),
    "tp1_dora_qwen2moe": Layout(1, None, {}, AUX, model=QWEN2_MOE, lora=DORA),
    "tp2_sp_dora_qwen2moe": Layout(
        2,
        "tp1_dora_qwen2moe",
        {"tensor_model_parallel_size": 2, "sequence_parallel": True},
        AUX,
        model=QWEN2_MOE,
        lora=DORA,
    ),
}


#: Every objective and loss variant, run forward and backward once at the initial weights of each
#: SWEEP_LAYOUTS layout on its first global batch (8 pairs of uneven lengths, one-token responses,
#: non-unit weights; reference log-probs from :func:`synthetic_reference`), without an update:
#: losses, metrics and full gradients compared with the single process ``tp1``'s (test_layouts).
SWEEP = {
    "simpo": {"objective": "simpo", "beta": 2.5, "gamma_beta_ratio": 0.4, "sft_weight": 0.1},
    "simpo-hinge": {"objective": "simpo", "beta": 2.5, "simpo_gamma": 1.0, "loss_type": "hinge"},
    "simpo-smoothed": {"objective": "simpo", "beta": 2.5, "label_smoothing": 0.2},
    "dpo": {"objective": "dpo", "beta": 0.5},
    "dpo-smoothed": {"objective": "dpo", "beta": 0.5, "label_smoothing": 0.2, "sft_weight": 0.3},
    "ipo": {"objective": "ipo", "beta": 0.5},
    "dpo-hinge": {"objective": "dpo-hinge", "beta": 0.5},
    "dpo-norm": {"objective": "dpo-norm", "beta": 2.5, "label_smoothing": 0.1},
    "cpo": {"objective": "cpo", "beta": 0.5, "cpo_alpha": 0.5},
    "cpo-smoothed": {"objective": "cpo", "beta": 0.5, "label_smoothing": 0.2},
    "cpo-hinge": {"objective": "cpo", "beta": 0.5, "loss_type": "hinge", "cpo_alpha": 0.3},
    "cpo-ipo": {"objective": "cpo", "beta": 0.5, "loss_type": "ipo", "sft_reduction": "pair"},
    "orpo": {"objective": "orpo", "beta": 0.5, "orpo_alpha": 0.7},
}
#: PP2 (8 one-pair micro-batches through 1F1B) and TP2 x PP2, inside the matrix's own worlds.
SWEEP_LAYOUTS = ("tp1", "pp2", "tp2_pp2")


def synthetic_reference(pair):
    """``pair`` with reference log-probs (a deterministic function of its ids, near the tiny
    model's ~-log 32 per token, varied per pair), the same at every layout."""
    import dataclasses

    def ref(ids: tuple[int, ...]) -> float:
        return -3.3 * len(ids) - 0.05 * (sum(ids) % 13)

    return dataclasses.replace(
        pair, ref_chosen_logp=ref(pair.chosen_ids), ref_rejected_logp=ref(pair.rejected_ids)
    )


def is_tied(name: str) -> bool:
    return name.endswith("_tied")


def init_of(name: str) -> str:
    """The reference layout whose initial weights ``name`` loads (the root of its ref chain)."""
    while (ref := LAYOUTS[name].ref) is not None:
        name = ref
    return name


def fp32_of(name: str) -> str | None:
    """The fp32 layout a bf16 layout is also compared with (None for fp32 layouts)."""
    train = LAYOUTS[name].train or {}
    return init_of(name) if train.get("precision") == "bf16" else None


def config_dict(name: str, data_path: str, load: str | None) -> dict:
    """The full config of a layout (a dict for ``RunConfig.from_dict``)."""
    layout = LAYOUTS[name]
    cfg = {k: dict(v) for k, v in BASE.items()}
    cfg["model"]["tie_word_embeddings"] = is_tied(name)
    cfg["model"].update(layout.model or {})
    cfg["parallel"] = dict(layout.parallel)
    cfg["train"].update(layout.train or {})
    if layout.loss is not None:
        cfg["loss"] = dict(layout.loss)
    if layout.lora is not None:
        cfg["lora"] = dict(layout.lora)
    cfg["data"] = {"data_path": data_path}
    cfg["train"]["load"] = load
    return cfg
