"""Builds a stock Megatron-Core GPT model for a Llama-architecture config.

SimPO needs no new layer: the model is Megatron-Core's ``GPTModel`` with its own layer spec
(Transformer Engine's when TE is importable and CUDA is present, the local spec otherwise), split
over the tensor/pipeline groups that :mod:`megatron_simpo.parallel` created, and wrapped in
Megatron-Core's DDP. The only local addition is an RMSNorm that declares its weight
sequence-parallel, which the local spec's torch norm does not (TE/apex norms do).

Without TE the local spec's core attention is SDPA by default (``--attention-backend``,
:mod:`megatron_simpo.attention`); ``--fused-loss-head`` makes the last stage return hidden states
for the chunked loss head (:mod:`megatron_simpo.fused_logprobs`).

Everything is built on :func:`model_device` (the current GPU): Megatron allocates its own layers
there, the norms above are created there, and each chunk is moved there once built as
Megatron-LM's ``get_model`` does (Megatron's DDP moves parameters only with the distributed
optimizer, and evaluation has no DDP). Each kernel fusion is switched on only where the
kernel it calls is importable (:func:`fusion_flags`).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
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

from megatron_simpo import moe, parallel
from megatron_simpo.attention import SDPAttention, resolve_attention_backend
from megatron_simpo.config import RunConfig
from megatron_simpo.errors import ConfigError
from megatron_simpo.flex_attention import FlexAttention, flex_unavailable_reason
from megatron_simpo.fused_logprobs import HiddenStatesGPTModel

# Megatron-Core's RotaryEmbedding applies Llama-3 scaling with these fixed constants; other values
# would silently differ from the Hugging Face model, so they are refused.
_MCORE_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def model_device() -> torch.device:
    """Where the model lives: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with the constructor Megatron specs call and SP-tagged weight.

    Under sequence parallelism each TP rank normalises a different slice of the sequence, so the
    weight's gradient is partial; Megatron all-reduces it over TP for params tagged
    ``sequence_parallel`` (``finalize_model_grads``). Torch's norm lacks the tag, which is why the
    local spec refuses SP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        # On the model's device from the start, like Megatron's own layers: torch's norms
        # default to the CPU, and a move that must replace the parameter drops the SP tag.
        super().__init__(
            normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype, device=model_device()
        )
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]


class HeadRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over one attention head (``[head_dim]`` weight shared by all heads),
    with the constructor Megatron specs call: Qwen3's ``q_norm`` / ``k_norm``.

    Each TP rank holds other heads, so the weight's gradient is partial there; Megatron's
    ``finalize_model_grads`` sums it over TP by name (``q_layernorm`` / ``k_layernorm``) when
    ``TransformerConfig.qk_layernorm`` is set. No ``sequence_parallel`` tag: the heads see the
    whole sequence (after the QKV projection's all-gather).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(
            normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype, device=model_device()
        )


def have_transformer_engine() -> bool:
    """Whether Transformer Engine is importable (it is only used together with CUDA)."""
    return importlib.util.find_spec("transformer_engine") is not None


def _importable(module: str) -> bool:
    """Whether ``import module`` succeeds (a compiled extension may exist yet fail to load)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Kernels:
    """The fused kernels Megatron-Core's fusion flags call, and whether each is usable here."""

    cuda: bool
    """A CUDA device is present (every kernel below is CUDA-only)."""
    fused_softmax: bool
    """The ``scaled_*masked_softmax_cuda`` extensions (apex or Megatron-LM's fused kernels):
    ``FusedScaleMaskSoftmax`` imports them for fp16/bf16 scores, the shape check included."""
    wgrad_accumulation: bool
    """apex's ``fused_weight_gradient_mlp_cuda``: ``ColumnParallelLinear`` (the output layer in
    every spec) refuses ``gradient_accumulation_fusion`` without it."""
    te_rope: bool
    """Transformer Engine's fused RoPE (``fused_apply_rotary_pos_emb``); TransformerConfig
    refuses ``apply_rope_fusion`` without it."""
    compiler: bool
    """triton, for ``torch.compile`` (Megatron's ``jit_fuser``) of the bias-SwiGLU and
    bias-dropout-add kernels on the GPU."""
    te_rope_thd: bool = False
    """Transformer Engine's fused RoPE over THD packed sequences
    (``fused_apply_rotary_pos_emb_thd``), which ``apply_rope_fusion`` calls with packed rows."""


def available_kernels() -> Kernels:
    """Detects the kernels of :class:`Kernels` (nothing is imported without CUDA)."""
    if not torch.cuda.is_available():
        return Kernels(
            cuda=False, fused_softmax=False, wgrad_accumulation=False, te_rope=False, compiler=False
        )
    te_rope = te_rope_thd = False
    if have_transformer_engine():
        from megatron.core.extensions import transformer_engine as mte

        te_rope = getattr(mte, "fused_apply_rotary_pos_emb", None) is not None
        te_rope_thd = getattr(mte, "fused_apply_rotary_pos_emb_thd", None) is not None
    softmax = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda")
    return Kernels(
        cuda=True,
        fused_softmax=all(_importable(m) for m in (*softmax, "scaled_softmax_cuda")),
        wgrad_accumulation=_importable("fused_weight_gradient_mlp_cuda"),
        te_rope=te_rope,
        compiler=_importable("triton"),
        te_rope_thd=te_rope_thd,
    )


def fusion_flags(kernels: Kernels, *, explicit_mask: bool, thd: bool = False) -> dict[str, bool]:
    """Megatron-Core's fusion flags, each on only where its kernel is usable.

    All are off on the CPU: the kernels are CUDA-only, and ``torch.compile`` of the jit-fused
    ones costs seconds per shape there (``shared/notes/megatron-core-on-cpu.md``).

    Args:
        kernels: what is usable (:func:`available_kernels`).
        explicit_mask: rows carry an explicit attention mask (``--pack-pairs`` /
            ``--prefix-sharing``): the fused causal softmax would ignore it, and the fused RoPE
            does not take per-sequence positions.
        thd: packed rows as THD sequences (Transformer Engine, :mod:`megatron_simpo.packed_seq`):
            RoPE is applied per ``cu_seqlens`` span, fused only with TE's THD kernel.
    """
    cuda = kernels.cuda
    rope = kernels.te_rope_thd if thd else kernels.te_rope
    return {
        "masked_softmax_fusion": cuda and kernels.fused_softmax and not explicit_mask,
        "gradient_accumulation_fusion": cuda and kernels.wgrad_accumulation,
        "apply_rope_fusion": cuda and rope and not explicit_mask,
        "bias_activation_fusion": cuda and kernels.compiler,
        "bias_dropout_fusion": cuda and kernels.compiler,
        # Read only by apex's FusedLayerNorm (LayerNorm); these models use RMSNorm.
        "persist_layer_norm": False,
    }


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
    variable = parallel.variable_seq_lengths(cfg)
    packed = bool(t.pack_pairs or t.prefix_sharing)
    thd = packed and run_attention_backend(cfg) == "te"
    fusions = fusion_flags(available_kernels(), explicit_mask=packed and not thd, thd=thd)
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
        qk_layernorm=m.qk_layernorm,
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
        **fusions,
        # gloo: batched p2p gives wrong interleaved-pipeline results (measured); NCCL is fine.
        batch_p2p_comm=cuda,
        # Stages send each micro-batch's shape first: micro-batches padded to their own length
        # (megatron_simpo/data/batching.py), not all to the longest of the slice.
        variable_seq_lengths=variable,
        # Inert without experts, but Megatron-Core refuses variable_seq_lengths next to its
        # default MoE dispatcher ("allgather") even in a dense model.
        **{
            **({"moe_token_dispatcher_type": "alltoall"} if variable else {}),
            **moe.transformer_fields(cfg, grouped_gemm=use_grouped_gemm(cfg)),
        },
        use_cpu_initialization=not cuda,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
    )


def use_grouped_gemm(cfg: RunConfig) -> bool:
    """MoE experts as Transformer Engine's grouped GEMM: where TE and CUDA are present (the
    local spec's ``SequentialMLP`` otherwise, e.g. on the CPU)."""
    return (
        cfg.model.num_experts is not None
        and torch.cuda.is_available()
        and have_transformer_engine()
        and cfg.train.attention_backend in ("auto", "te")
    )


def _layer_spec(
    backend: str,
    qk_layernorm: bool = False,
    num_experts: int | None = None,
    grouped_gemm: bool = False,
) -> tuple[ModuleSpec, type | None]:
    """The per-layer spec and the final-norm module (None: let Megatron pick).

    ``backend`` is a resolved ``--attention-backend``: ``te``, ``sdpa``, ``flex`` or ``local``;
    ``qk_layernorm``: an RMSNorm over each query and key head (the family's layer option);
    ``num_experts``: Megatron-Core's MoE layer instead of the dense MLP, its experts TE's
    grouped GEMM with ``grouped_gemm`` (TE spec only), a ``SequentialMLP`` otherwise.
    """
    moe_args = {"num_experts": num_experts, "moe_grouped_gemm": grouped_gemm}
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm, **moe_args)
        return spec, None
    moe_args["moe_grouped_gemm"] = False  # the local spec's grouped MLP needs TE or a GPU
    spec = copy.deepcopy(
        get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm, **moe_args)
    )
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    if qk_layernorm:
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = HeadRMSNorm
    if backend in ("sdpa", "flex"):
        core = FlexAttention if backend == "flex" else SDPAttention
        spec.submodules.self_attention.submodules.core_attention = core
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


def run_attention_backend(cfg: RunConfig) -> str:
    """The resolved ``--attention-backend`` of this process (``te``, ``sdpa`` or ``local``).

    ``auto`` is TE where it and CUDA are present, except with ``--prefix-sharing``: its mask is
    not causal per sequence, which TE's THD path cannot express, so FlexAttention's block mask
    takes it where that works (``flex_attention.py``), else SDPA's dense mask
    (:func:`prefix_sharing_attention` says why). Plain packing (``--pack-pairs``) stays on TE, as
    THD sequences (``packed_seq.py``).
    """
    return prefix_sharing_attention(cfg)[0]


def prefix_sharing_attention(cfg: RunConfig) -> tuple[str, str | None]:
    """:func:`run_attention_backend` and, where ``auto`` with ``--prefix-sharing`` could not take
    FlexAttention, why (None otherwise)."""
    t = cfg.train
    te = have_transformer_engine() and torch.cuda.is_available()
    if t.attention_backend == "flex" or (t.attention_backend == "auto" and t.prefix_sharing):
        why = flex_unavailable_reason(
            cuda=torch.cuda.is_available(), recompute=t.recompute_granularity is not None
        )
        if why is None:
            return "flex", None
        if t.attention_backend == "flex":
            raise ConfigError(f"--attention-backend flex: {why}; use --attention-backend sdpa")
        return "sdpa", why
    return resolve_attention_backend(t.attention_backend, te and not t.prefix_sharing), None


def attention_label(cfg: RunConfig) -> str:
    """The attention backend of a run and, with packed rows, how they reach it (for reports):
    ``te``, ``te/thd``, ``sdpa``, ``sdpa/mask``, ``flex/block``, ``local/mask``."""
    backend = run_attention_backend(cfg)
    if not (cfg.train.pack_pairs or cfg.train.prefix_sharing):
        return backend
    return f"{backend}/{ {'te': 'thd', 'flex': 'block'}.get(backend, 'mask') }"


def build_model(cfg: RunConfig, use_te: bool | None = None) -> list[GPTModel]:
    """Builds this rank's model chunks (one per virtual pipeline stage) on :func:`model_device`,
    with LoRA/DoRA adapters (base frozen) when ``--lora-rank`` is set.

    Must run after :func:`megatron_simpo.parallel.initialize`.
    """
    backend, fallback = prefix_sharing_attention(cfg)
    if fallback and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"attention: sdpa with the dense prefix-sharing mask (FlexAttention: {fallback})")
    if use_te is not None:  # callers that only need the weights (export) may force a spec
        backend = "te" if use_te else ("local" if backend == "te" else backend)
    lora = cfg.lora.lora_rank is not None
    if lora and backend == "te":
        # TE fuses the norm into the QKV / fc1 linears: an adapter needs the normalised input.
        backend = "sdpa"
        if cfg.model.num_experts is not None and use_grouped_gemm(cfg):
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(
                    "lora: experts as SequentialMLP, not TE's grouped GEMM (one weight for all "
                    "local experts; adapters need each expert's own linears)"
                )
    tconf = transformer_config(cfg)
    # TE's grouped GEMM only with the TE spec (e.g. packed rows choose sdpa even with TE).
    tconf.moe_grouped_gemm = backend == "te" and tconf.moe_grouped_gemm
    layer_spec, final_norm = _layer_spec(
        backend, cfg.model.qk_layernorm, cfg.model.num_experts, tconf.moe_grouped_gemm
    )
    # With the fused loss head the last stage returns final hidden states; the loss function
    # applies the output layer's weight chunk by chunk (megatron_simpo/fused_logprobs.py).
    model_cls = HiddenStatesGPTModel if cfg.train.fused_loss_head else GPTModel
    device = model_device()
    inv_freq = rope_inv_freq(cfg).to(device)
    vpp = tconf.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        spec: ModuleSpec | TransformerBlockSubmodules = layer_spec
        if final_norm is not None:
            n = get_num_layers_to_build(config=tconf, vp_stage=stage)
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
        # As Megatron-LM's get_model does: anything a spec built without a device (torch's
        # defaults) goes to the GPU here; Megatron's DDP moves parameters only with the
        # distributed optimizer, and evaluation has no DDP.
        model.to(device)
        # A plain attribute, not a buffer: .to() does not move it.
        model.rotary_pos_emb.inv_freq = inv_freq
        if cfg.train.fused_loss_head:
            model.loss_chunk_size = cfg.train.loss_chunk_size
        # How packed rows reach the attention (megatron_simpo/step.py): TE takes THD sequences
        # (PackedSeqParams), FlexAttention a block mask, the other local specs a dense mask.
        model.packed_seq_format = {"te": "thd", "flex": "block"}.get(backend, "mask")
        chunks.append(model)
    moe.prepare_routers(chunks)
    if lora:  # as parallelism is: applied to the built model, base weights frozen
        from megatron_simpo.adapters import apply_adapters

        apply_adapters(chunks, cfg.lora, cfg.train.seed)
    return chunks


def wrap_ddp(chunks: list[GPTModel], cfg: RunConfig) -> list[DistributedDataParallel]:
    """Wraps chunks in Megatron-Core DDP (fp32 gradient buffers, optional distributed optimizer).

    With the distributed optimizer, gradient reduce-scatters and parameter all-gathers overlap
    compute (``--overlap-grad-reduce`` / ``--overlap-param-gather``, on by default), wired as
    Megatron-LM does: the schedule's ``no_sync_func`` holds the reduction back until the last
    micro-batch, and the gathered parameters are waited for by forward pre-hooks
    (:func:`sync_params` completes them before the weights are read outside a forward).
    """
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.use_distributed_optimizer and p.overlap_grad_reduce,
        overlap_param_gather=p.use_distributed_optimizer and p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
    )
    model = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's buffer is bucketed (Megatron-LM's convention).
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    if ddp_config.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        for chunk in chunks:
            chunk.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return model


def sync_params(model: list) -> None:
    """Completes the parameter all-gather that ``--overlap-param-gather`` defers to the next
    forward, so every chunk holds the updated weights (before a checkpoint or export reads
    them); a no-op otherwise. Collective over the data-parallel group."""
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a DDP wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model
