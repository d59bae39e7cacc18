"""Builds a stock Megatron-Core GPT model for a Llama-architecture config.

SimPO needs no new layer: the model is Megatron-Core's ``GPTModel`` with its own layer spec
(Transformer Engine's when TE is importable and CUDA is present, the local spec otherwise), split
over the tensor/pipeline groups that :mod:`megatron_simpo.parallel` created, and wrapped in
Megatron-Core's DDP. The only local addition is an RMSNorm that declares its weight
sequence-parallel, which the local spec's torch norm does not (TE/apex norms do).

Without TE the local spec's core attention is SDPA by default (``--attention-backend``,
:mod:`megatron_simpo.attention`); ``--fused-loss-head`` makes the last stage return hidden states
for the chunked loss head (:mod:`megatron_simpo.fused_logprobs`).
"""

from __future__ import annotations

import copy
import importlib.util
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from megatron_simpo.attention import SDPAttention, resolve_attention_backend
from megatron_simpo.config import RunConfig
from megatron_simpo.fused_logprobs import HiddenStatesGPTModel

# Megatron-Core's RotaryEmbedding applies Llama-3 scaling with these fixed constants; other values
# would silently differ from the Hugging Face model, so they are refused.
_MCORE_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with the constructor Megatron specs call and SP-tagged weight.

    Under sequence parallelism each TP rank normalises a different slice of the sequence, so the
    weight's gradient is partial; Megatron all-reduces it over TP for params tagged
    ``sequence_parallel`` (``finalize_model_grads``). Torch's norm lacks the tag, which is why the
    local spec refuses SP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]


def have_transformer_engine() -> bool:
    """Whether Transformer Engine is importable (it is only used together with CUDA)."""
    return importlib.util.find_spec("transformer_engine") is not None


def model_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype of the model's parameters and activations."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def transformer_config(cfg: RunConfig) -> TransformerConfig:
    """Megatron-Core TransformerConfig for a Llama-architecture model and the run's parallelism."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = model_dtype(cfg)
    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=m.num_hidden_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.intermediate_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.kv_heads,
        kv_channels=m.head_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.initializer_range,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # The loss returns (sum over pairs, pair count, report): gradients are divided by the
        # global pair count, so every layout computes the same update.
        calculate_per_token_loss=True,
        # Fusions that need apex/TE kernels stay off without them.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=cuda,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        # gloo: batched p2p gives wrong interleaved-pipeline results (measured); NCCL is fine.
        batch_p2p_comm=cuda,
        use_cpu_initialization=not cuda,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
    )


def _layer_spec(backend: str) -> tuple[ModuleSpec, type | None]:
    """The per-layer spec and the final-norm module (None: let Megatron pick).

    ``backend`` is a resolved ``--attention-backend``: ``te``, ``sdpa`` or ``local``.
    """
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(), None
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    if backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec, SequenceParallelRMSNorm


def rope_inv_freq(cfg: RunConfig) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim / 2]`` (fp32), with Llama-3 scaling if configured.

    Megatron-Core's own Llama-3 scaling hard-codes ``low_freq_factor=1, high_freq_factor=4,
    original_max_position_embeddings=8192``; computing the frequencies here reproduces any HF
    config (Llama 3.1 / 3.2 and fine-tunes with other values) exactly.
    """
    m = cfg.model
    dim = m.head_size
    # fp32 like transformers, so the frequencies match it bit for bit.
    inv = 1.0 / (m.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if m.rope_scaling is None:
        return inv.float()
    sc = m.rope_scaling
    factor, low, high = (
        float(sc["factor"]),
        float(sc["low_freq_factor"]),
        float(sc["high_freq_factor"]),
    )
    orig = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, smoothed, out).float()


def build_model(cfg: RunConfig, use_te: bool | None = None) -> list[GPTModel]:
    """Builds this rank's model chunks (one per virtual pipeline stage).

    Must run after :func:`megatron_simpo.parallel.initialize`.
    """
    # Packed / prefix-shared rows need an explicit attention mask, which the SDPA spec takes:
    # 'auto' then means sdpa even where Transformer Engine is installed.
    masked = cfg.train.pack_pairs or cfg.train.prefix_sharing
    backend = resolve_attention_backend(
        cfg.train.attention_backend,
        have_transformer_engine() and torch.cuda.is_available() and not masked,
    )
    if use_te is not None:  # callers that only need the weights (export) may force a spec
        backend = "te" if use_te else ("local" if backend == "te" else backend)
    tconf = transformer_config(cfg)
    layer_spec, final_norm = _layer_spec(backend)
    # With the fused loss head the last stage returns final hidden states; the loss function
    # applies the output layer's weight chunk by chunk (megatron_simpo/fused_logprobs.py).
    model_cls = HiddenStatesGPTModel if cfg.train.fused_loss_head else GPTModel
    inv_freq = rope_inv_freq(cfg)
    vpp = tconf.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        spec: ModuleSpec | TransformerBlockSubmodules = layer_spec
        if final_norm is not None:
            n = get_num_layers_to_build(tconf, vp_stage=stage)
            spec = ModuleSpec(
                module=TransformerBlock,
                submodules=TransformerBlockSubmodules(
                    layer_specs=[layer_spec] * n, layer_norm=final_norm
                ),
            )
        model = model_cls(
            config=tconf,
            transformer_layer_spec=spec,
            vocab_size=cfg.model.padded_vocab_size(),
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.model.rope_theta),
            vp_stage=stage,
        )
        rotary = model.rotary_pos_emb
        rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
        if cfg.train.fused_loss_head:
            model.loss_chunk_size = cfg.train.loss_chunk_size
        chunks.append(model)
    return chunks


def wrap_ddp(chunks: list[GPTModel], cfg: RunConfig) -> list[DistributedDataParallel]:
    """Wraps chunks in Megatron-Core DDP (fp32 gradient buffers, optional distributed optimizer)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's buffer is bucketed (Megatron-LM's convention).
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a DDP wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model
