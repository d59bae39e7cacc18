"""The integration matrix, as data: named parallel layouts trained from the same weights and data.

Every layout runs the same 3 SimPO steps (global batch of 8 pairs) from the checkpoint that the
single-process reference (``tp1`` / ``tp1_tied``) wrote, and is compared with it: per-step losses,
metrics and gradient norms, the full gradients of step 1 (layouts without the distributed
optimizer, whose gradient buffer only holds its own shard after the reduce-scatter) and the
weights after step 3.
"""

from __future__ import annotations

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
    },
}

#: name -> (world size, reference layout, overrides of the "parallel" section)
LAYOUTS: dict[str, tuple[int, str | None, dict]] = {
    "tp1": (1, None, {}),
    "tp1_tied": (1, None, {}),
    "tp2": (2, "tp1", {"tensor_model_parallel_size": 2}),
    "pp2": (2, "tp1", {"pipeline_model_parallel_size": 2}),
    "pp2_vpp2": (
        2,
        "tp1",
        {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1},
    ),
    "tp2_pp2": (4, "tp1", {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}),
    "tp2_pp2_tied": (
        4,
        "tp1_tied",
        {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
    ),
    "tp2_dp2_sp_distopt": (
        4,
        "tp1",
        {
            "tensor_model_parallel_size": 2,
            "sequence_parallel": True,
            "use_distributed_optimizer": True,
        },
    ),
    "dp4": (4, "tp1", {}),
}


def is_tied(name: str) -> bool:
    return name.endswith("_tied")


def config_dict(name: str, data_path: str, load: str | None) -> dict:
    """The full config of a layout (a dict for ``RunConfig.from_dict``)."""
    cfg = {k: dict(v) for k, v in BASE.items()}
    cfg["model"]["tie_word_embeddings"] = is_tied(name)
    cfg["parallel"] = dict(LAYOUTS[name][2])
    cfg["data"] = {"data_path": data_path}
    cfg["train"]["load"] = load
    return cfg
