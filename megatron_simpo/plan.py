"""Memory planner: ``megatron-simpo plan`` — will a SimPO run fit, and with which layout?

Per-GPU memory of one training step, for SimPO and for DPO with a frozen reference model, over the
layouts a cluster allows (TP x PP x DP x EP, distributed optimizer, activation recompute), for
full-parameter or LoRA training, dense or mixture-of-experts models, ranked by a simple
expected-throughput model::

    megatron-simpo plan --model llama3-70b --nodes 2 --gpus-per-node 8 --gpu-memory-gb 80 \\
        --seq-length 4096 --global-batch-size 128
    megatron-simpo plan --model path/to/config.json ... --tp 8 --pp 2 --json
    megatron-simpo plan --model llama3-70b --nodes 1 ... --lora-rank 16   # + full vs offload
    megatron-simpo plan --model qwen3-30b-a3b --nodes 1 ... --expert-model-parallel-size 8
    megatron-simpo plan --model llama3-8b ... --loss dpo --num-pairs 60000

What is counted, per GPU (the worst pipeline stage; bytes per element ``B`` = 2 in bf16, 4 in fp32):

* **weights** ``B`` per parameter the rank holds: the transformer layers of its stage split over
  TP (norm weights replicated), the embedding on the first stage and the output layer (+ final
  norm) on the last, both split over TP along the (padded) vocabulary.
* **gradients** 4 bytes per parameter (Megatron's DDP grad buffer accumulates in fp32).
* **optimizer** Adam ``m`` and ``v`` in fp32, plus fp32 master weights in bf16 training: 12 bytes
  per parameter (8 in fp32 training, where the weights are their own master); divided by DP
  with the distributed optimizer. bf16 total: 2 + 4 + 12 = 18 bytes per parameter.
* **reference** (DPO only) a frozen copy of the weights in the model dtype, split like the
  weights; no gradients or optimizer state. That is the whole SimPO saving: 2 of ~18 bytes per
  parameter in bf16 (plus a reference forward pass per step in time, not modelled here).
* **activations** kept for backward, per layer per micro-batch, after Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", eq. 1-2), rederived for the
  Llama layer (RMSNorm, GQA, SwiGLU, no dropout). Per token, in elements: ``4h`` around the two
  norms (inputs and outputs; divided by TP with sequence parallelism), and, divided by TP,
  ``q, k, v`` (``(a + 2 a_kv) d``; ``3 a d`` for unfused attention, which repeats K/V per query
  head), the attention output ``a d``, the SwiGLU input ``2 f`` and output ``f``; unfused
  attention also keeps the softmax, ``a s`` per token (the ``5 a s / h`` term of the paper, without
  dropout). With plain torch ops (``--kernels torch``, the CPU path; counted with saved-tensor
  hooks) each RMSNorm also keeps its normalised input (``6h``), SwiGLU keeps ``5f`` and SDPA's
  inputs keep the whole fused QKV output alive. A micro-batch of ``b`` pairs is ``2b``
  sequences of ``s`` tokens (padded worst case).
  Selective recompute drops the softmax term; full recompute keeps only each layer's input
  (``h`` per token, /TP with SP) plus one layer's activations while it is recomputed (on the
  last stage only their excess over the loss head: the two are not live at once). Unfused
  attention also holds a persistent ``[2b a/TP, s, s]`` score workspace (Megatron's global
  memory buffer). 1F1B
  pipelining keeps ``min(PP - stage, m)`` micro-batches in flight on a stage.
* **loss head** unfused: the logits of one micro-batch, ``[2 b s, V/TP]``, in the model dtype plus
  two fp32 working copies (max-shifted logits and their exponentials/softmax) while the
  vocab-parallel log-probs are formed (``megatron_simpo/logprobs.py``). Fused
  (``--fused-loss-head``, ``megatron_simpo/fused_logprobs.py``): one ``--loss-chunk-size`` chunk
  of those logits plus the head's weight-gradient accumulator. Unset, as in training, the
  fused head is counted where its peak is the smaller (``megatron_simpo/defaults.py`` has both
  peak models and the threshold).
* **margin** ``--fragmentation`` x the sum above (allocator fragmentation) + ``--overhead-gb``
  (CUDA context, NCCL communicators, library workspaces).

* **mixture of experts** (``megatron_simpo/shapes.py``): the routed experts of a stage's layers
  split over EP x ETP (``E/EP`` experts per rank, each split over ETP), the attention, router
  and shared expert like a dense layer over TP; the experts' Adam state shards over the expert
  data-parallel group ``TP x DP / (EP x ETP)`` with the distributed optimizer. Activations: per
  token the ``k`` expert copies (permuted input, output, SwiGLU tensors of width ``f_e``), the
  shared expert and the router probabilities, over TP (Megatron requires SP with MoE and TP),
  for balanced routing (imbalance raises the peak).
* **LoRA** (``--lora-rank``): the base frozen, its weights in the model dtype (2 bytes/param,
  no gradients, no optimizer state); the adapters (per projection: q, k, v of the fused QKV,
  o, gate and up of the fused fc1, down) in the model dtype with fp32 gradients, master weights
  and Adam (18 bytes/param). Activations as full training plus each adapter's ``x A^T``
  (``r`` per token, whole on every TP rank) and, with ``--lora-dropout``, its dropped-out input.
* **optimizer CPU offload** (``--optimizer-cpu-offload``, Megatron-Core's
  ``optimizer_cpu_offload``): the fp32 master weights and Adam state of each rank's shard on
  the host (the ``host`` column, per node; ``--host-memory-gb`` checks it), weights and fp32
  gradients stay on the GPU.
* **objectives** (``--loss``): for a reference objective (DPO family) the report compares DPO
  with a resident reference (a second copy of the weights in the model dtype, no gradients or
  optimizer state, plus its transient forward: one layer of one micro-batch), DPO from
  precomputed log-probs (SimPO plus two fp32 scalars per pair) and SimPO, and prints the one-off
  cost of ``score-reference`` (``--num-pairs``: one forward of each pair).

Throughput model. ``speed`` (relative, 1.0 = ideal) multiplies: TP communication
``1 / (1 + 0.1 log2 TP)`` and MoE all-to-all ``1 / (1 + 0.05 log2 EP)`` (assumed costs, not
measured: they only order layouts), the pipeline bubble ``1 - (p-1)/(m+p-1)`` (1F1B, exact),
full recompute ``1/1.33`` (one extra forward of three), selective recompute ``1/1.05`` with
unfused attention (nothing to recompute with flash attention). Data-parallel gradient
communication is assumed overlapped (``overlap_grad_reduce``, the distributed optimizer's
default here). ``s/step`` turns it into seconds: the step's model FLOPs (``flops.py``:
Megatron-LM's accounting, causal attention as half the square, every pair at ``--seq-length``,
a ``--prompt-length`` prompt counted once as prefix sharing computes it, active parameters for
MoE) over ``GPUs x --peak-tflops x --mfu x speed``; DPO with a resident reference does 4/3 the
work, LoRA ~2/3 of it (no weight gradients for the frozen base); optimizer offload adds each
rank's gradient and weight transfer over PCIe (25 GB/s assumed; the host Adam step is not
modelled). ``--mfu`` (default 40%) is an assumption, not a
prediction: the seconds are as good as it is. Layouts are ranked by ``s/step``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from megatron_simpo import defaults, flops
from megatron_simpo.config import OBJECTIVE_NAMES, LoraConfig, LossConfig, ModelConfig
from megatron_simpo.errors import ConfigError
from megatron_simpo.flags import field_flags
from megatron_simpo.plan_report import format_plan
from megatron_simpo.shapes import (
    LORA_PROJECTIONS,
    PRESETS,
    ParamCount,
    count_params,
    load_model,
    lora_params,
    lora_projections,
    moe_dims,
    projection_dims,
)

__all__ = ["PRESETS", "ParamCount", "count_params", "load_model", "plan", "breakdown"]

GB = 1e9

Recompute = Literal["none", "selective", "full"]
Attention = Literal["flash", "unfused"]
Kernels = Literal["fused", "torch"]


@dataclass(frozen=True)
class Layout:
    """One way to lay a run out over the GPUs."""

    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    """Pairs per micro-batch (2 sequences each)."""
    num_microbatches: int
    distributed_optimizer: bool
    recompute: Recompute
    sequence_parallel: bool
    ep: int = 1
    """Expert-parallel size (MoE: the routed experts are split over EP ranks)."""
    etp: int = 1
    """Expert-tensor-parallel size (MoE: each expert split over ETP ranks)."""

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the experts: ``TP x DP / (EP x ETP)`` (Megatron's expert
        data-parallel group, over which the distributed optimizer shards expert state)."""
        return self.tp * self.dp // (self.ep * self.etp)

    def name(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}", f"DP{self.dp}"]
        if self.ep > 1 or self.etp > 1:
            parts += [f"EP{self.ep}", f"ETP{self.etp}"]
        if self.sequence_parallel:
            parts.append("SP")
        if self.distributed_optimizer:
            parts.append("distopt")
        if self.recompute != "none":
            parts.append(f"recomp-{self.recompute}")
        return " ".join(parts)


@dataclass(frozen=True)
class Job:
    """The hardware and the batch shape."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    seq_length: int
    global_batch_size: int
    precision: Literal["bf16", "fp32"] = "bf16"
    attention: Attention = "flash"
    kernels: Kernels = "fused"
    fragmentation: float = 0.10
    overhead_gb: float = 1.5
    fused_loss_head: bool | None = None
    """The fused chunked loss head; None: where it saves memory (training's default)."""
    loss_chunk_size: int = 1024
    lora_rank: int = 0
    """LoRA rank; 0: full-parameter training."""
    lora_target: str = "all"
    """``--lora-target``: ``qkv,proj,fc1,fc2``, ``all`` or HF projection names."""
    lora_dropout: float = 0.0
    """With dropout each adapter keeps its dropped-out input for backward."""
    optimizer_cpu_offload: bool = False
    """Megatron-Core's ``optimizer_cpu_offload``: fp32 master weights and Adam state on the host."""
    host_memory_gb: float | None = None
    """Host memory per node (for the offloaded state); None: not checked."""
    prompt_length: int = 0
    """Prompt tokens of a pair shared by its two sequences (prefix sharing) in the FLOP count."""
    mfu: float = 0.40
    """Assumed MFU of a layout without pipeline bubble or recompute, for the time estimates."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100/H200 SXM) for the time estimates."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


def bytes_per_param(job: Job) -> dict[str, int]:
    """Weights, gradients and optimizer state (unsharded) per trained parameter."""
    w = job.dtype_bytes
    return {"weights": w, "gradients": 4, "optimizer": 12 if w == 2 else 8, "reference": w}


def lora_targets(job: Job) -> tuple[str, ...]:
    return lora_projections(job.lora_target) if job.lora_rank else ()


def rank_params(m: ModelConfig, layout: Layout, job: Job, stage: int) -> dict[str, float]:
    """Parameters one rank of ``stage`` holds: ``frozen`` (LoRA's base), ``dense`` and
    ``experts`` (trained; the experts' optimizer state shards over the expert DP group) and
    ``adapters`` (LoRA)."""
    c = count_params(m)
    layers = c.num_layers // layout.pp
    dense = stage_params(m, layout.tp, layout.pp, stage)
    experts = layers * c.layer_experts / (layout.ep * layout.etp)
    if not job.lora_rank:
        return {"frozen": 0.0, "dense": dense, "experts": experts, "adapters": 0.0}
    ad = lora_params(m, job.lora_rank, lora_targets(job))
    adapters = layers * (ad.sharded / layout.tp + ad.replicated)
    return {"frozen": dense + experts, "dense": 0.0, "experts": 0.0, "adapters": adapters}


def stage_params(m: ModelConfig, tp: int, pp: int, stage: int) -> float:
    """Parameters held by one rank of pipeline stage ``stage`` (of ``pp``) at TP ``tp``."""
    c = count_params(m)
    n = c.num_layers // pp * (c.layer_sharded / tp + c.layer_replicated)
    if stage == 0:
        n += c.embedding / tp
    if stage == pp - 1:
        n += c.output / tp + c.final_norm
        if m.tie_word_embeddings and pp > 1:
            n += c.embedding / tp  # the last stage keeps its own copy of the tied weight
    return n


def layer_activation_elements(m: ModelConfig, layout: Layout, job: Job) -> dict[str, float]:
    """Elements kept for backward per token of one layer, by how they shard (see module doc)."""
    h, d, f = m.hidden_size, m.head_size, m.intermediate_size
    a, akv = m.num_attention_heads, m.kv_heads
    torch_ops = job.kernels == "torch"
    if job.attention == "unfused":
        attn = 3 * a * d + a * d  # q, K/V repeated per query head, output
    elif torch_ops:
        # SDPA on the local spec: rotated q and k, the fused QKV output (kept alive by the v
        # view) and the output.
        attn = a * d + akv * d + (a + 2 * akv) * d + a * d
    else:
        attn = (a + 2 * akv) * d + a * d
    t = layout.tp
    # fused: each norm keeps its input and output; torch's RMSNorm also the normalised input.
    norms = (6 if torch_ops else 4) * h / (t if layout.sequence_parallel else 1)
    # SwiGLU: fused keeps fc1's output and fc2's input; torch ops also silu(x) and one more.
    per_ffn = 5 if torch_ops else 3
    moe = moe_dims(m)
    if moe is None:
        mlp = per_ffn * f
    else:
        # Each token's k expert copies: the permuted input and the expert output (h each) and
        # the SwiGLU tensors of width f_e, plus the shared expert and the router's probabilities
        # (E, fp32 = 2 bf16 elements). Balanced routing; Megatron needs SP with TP and MoE,
        # so everything is split over TP. Imbalance (no token drop) raises the peak.
        mlp = moe.top_k * (2 * h + per_ffn * moe.expert_ffn)
        mlp += per_ffn * moe.shared_ffn + 2 * moe.num_experts
    sharded = (attn + mlp) / t
    softmax = a * job.seq_length / t if job.attention == "unfused" else 0.0
    out = {"norms": norms, "sharded": sharded, "softmax": softmax, "lora": 0.0}
    if job.lora_rank:
        # Each adapter keeps x A^T ([tokens, r], whole on every TP rank) and, with dropout, its
        # dropped-out input (gathered for column-parallel bases, split for row-parallel ones).
        targets = lora_targets(job)
        out["lora"] = lora_params(m, job.lora_rank, targets).rank_per_token
        if job.lora_dropout > 0:
            dims = projection_dims(m)
            for p in targets:
                column = LORA_PROJECTIONS[p][1] == "column"
                out["lora"] += dims[p][0] / (1 if column else t)
    return out


def activation_bytes(m: ModelConfig, layout: Layout, job: Job, stage: int) -> float:
    """Activations of pipeline stage ``stage`` at its peak (all in-flight micro-batches)."""
    tokens = 2 * layout.micro_batch_size * job.seq_length
    el = layer_activation_elements(m, layout, job)
    full_layer = tokens * sum(el.values()) * job.dtype_bytes
    layers = m.num_hidden_layers // layout.pp
    in_flight = min(layout.pp - stage, layout.num_microbatches)
    # Unfused attention also keeps one persistent score workspace [2b heads/TP, s, s] (Megatron's
    # global memory buffer, reused by every layer).
    workspace = 0.0
    if job.attention == "unfused":
        heads = m.num_attention_heads / layout.tp
        workspace = 2 * layout.micro_batch_size * heads * job.seq_length**2 * job.dtype_bytes
    if layout.recompute == "full":
        kept = tokens * m.hidden_size / (layout.tp if layout.sequence_parallel else 1)
        per_mb = layers * kept * job.dtype_bytes
        # One layer is live again while it is recomputed in backward. On the last stage that
        # happens after the loss head's working copies are freed: only the excess counts.
        recomputed = full_layer
        if stage == layout.pp - 1:
            recomputed = max(0.0, full_layer - loss_head_bytes(m, layout, job))
        return in_flight * per_mb + recomputed + workspace
    if layout.recompute == "selective":
        full_layer -= tokens * el["softmax"] * job.dtype_bytes
    per_mb = layers * full_layer
    if stage == layout.pp - 1:
        # Final norm input and output (and normalised input with torch ops), kept for backward.
        final = (3 if job.kernels == "torch" else 2) * m.hidden_size
        per_mb += tokens * final / (layout.tp if layout.sequence_parallel else 1) * job.dtype_bytes
    return in_flight * per_mb + workspace


def fused_loss_head(m: ModelConfig, layout: Layout, job: Job) -> tuple[bool, str]:
    """Whether the run uses the fused loss head, and why (training's resolution)."""
    return defaults.resolve_fused_loss_head(
        job.fused_loss_head,
        hidden=m.hidden_size,
        vocab_per_rank=m.padded_vocab_size() // layout.tp,
        micro_batch_size=layout.micro_batch_size,
        seq_length=job.seq_length,
        dtype_bytes=job.dtype_bytes,
        chunk=job.loss_chunk_size,
    )


def loss_head_bytes(m: ModelConfig, layout: Layout, job: Job) -> float:
    """Peak of the loss head of one micro-batch: unfused, the logits in the model dtype plus two
    fp32 working copies; fused, one chunk of them and the weight-gradient accumulator."""
    tokens = defaults.head_tokens(layout.micro_batch_size, job.seq_length)
    # LoRA freezes the output layer: no weight gradient (its [v, h] terms vanish with h = 0).
    hidden = 0 if job.lora_rank else m.hidden_size
    args = (tokens, m.padded_vocab_size() // layout.tp, hidden, job.dtype_bytes)
    if fused_loss_head(m, layout, job)[0]:
        return defaults.fused_head_bytes(*args, job.loss_chunk_size)
    return defaults.unfused_head_bytes(*args)


#: ``breakdown`` objectives: SimPO, DPO with a resident reference model, DPO from precomputed
#: reference log-probs (``score-reference``).
ALGOS = ("simpo", "dpo", "dpo-precomputed")


def layer_bytes(m: ModelConfig, layout: Layout, job: Job) -> float:
    """Activations of one layer for one micro-batch (no recompute): a bound on what a no-grad
    forward of that layer holds at once."""
    tokens = 2 * layout.micro_batch_size * job.seq_length
    return tokens * sum(layer_activation_elements(m, layout, job).values()) * job.dtype_bytes


def breakdown(m: ModelConfig, layout: Layout, job: Job, algo: str = "simpo") -> dict[str, Any]:
    """Per-GPU bytes of the worst pipeline stage, by component (``algo``: one of :data:`ALGOS`).

    ``reference``: DPO's resident reference (a second copy of the weights in the model dtype,
    no gradients or optimizer state), or precomputed, two fp32 log-probs per pair of the
    micro-batches in flight. ``reference_acts``: the reference's forward activations, transient
    (one layer of one micro-batch at a time). ``host``: bytes on the host per GPU (optimizer CPU
    offload), not part of ``total``."""
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    bpp = bytes_per_param(job)
    worst: dict[str, Any] | None = None
    stages = sorted({0, layout.pp - 1})
    shard = layout.distributed_optimizer or job.optimizer_cpu_offload
    for stage in stages:
        n = rank_params(m, layout, job, stage)
        trained = n["dense"] + n["experts"] + n["adapters"]
        opt = bpp["optimizer"] * (
            n["dense"] / (layout.dp if shard else 1)
            + n["experts"] / (layout.expert_dp if shard else 1)
            + n["adapters"] / (layout.dp if shard else 1)
        )
        host = opt if job.optimizer_cpu_offload else 0.0
        weights = n["frozen"] + n["dense"] + n["experts"]  # the model proper (LoRA: frozen)
        in_flight = min(layout.pp - stage, layout.num_microbatches)
        reference = ref_acts = 0.0
        if algo == "dpo":
            reference = weights * bpp["reference"]
            ref_acts = layer_bytes(m, layout, job)
        elif algo == "dpo-precomputed":
            reference = 2 * 4 * layout.micro_batch_size * in_flight
        parts = {
            "weights": (weights + n["adapters"]) * bpp["weights"],
            "gradients": trained * bpp["gradients"],
            "optimizer": opt - host,
            "reference": reference,
            "reference_acts": ref_acts,
            "activations": activation_bytes(m, layout, job, stage),
            "loss_head": loss_head_bytes(m, layout, job) if stage == layout.pp - 1 else 0.0,
        }
        subtotal = sum(parts.values())
        parts["margin"] = job.fragmentation * subtotal + job.overhead_gb * GB
        parts["total"] = subtotal + parts["margin"]
        parts["host"] = host
        parts["stage"] = stage
        if worst is None or parts["total"] > worst["total"]:
            worst = parts
    assert worst is not None
    return worst


#: Assumed costs of the throughput model (not measured here; see the module doc).
TP_COST_PER_DOUBLING = 0.10
EP_COST_PER_DOUBLING = 0.05
PCIE_GBPS = 25.0


def throughput(layout: Layout, job: Job) -> float:
    """Relative expected throughput (1.0 = no parallel overheads); see the module doc."""
    tp = 1.0 / (1.0 + TP_COST_PER_DOUBLING * math.log2(layout.tp))
    ep = 1.0 / (1.0 + EP_COST_PER_DOUBLING * math.log2(layout.ep))
    m, p = layout.num_microbatches, layout.pp
    pp = 1.0 - (p - 1) / (m + p - 1)
    rc = {"none": 1.0, "full": 1 / 1.33}.get(layout.recompute)
    if rc is None:
        rc = 1 / 1.05 if job.attention == "unfused" else 1.0
    return tp * ep * pp * rc


def step_flops(m: ModelConfig, job: Job) -> int:
    """Model FLOPs of one step: every pair at ``--seq-length`` (the padded worst case), its
    ``--prompt-length`` prompt counted once (prefix sharing), 3x forward (``flops.py``)."""
    q = min(job.prompt_length, job.seq_length - 1)
    per_pair = flops.shared_pair_forward_flops(m, q, job.seq_length - q, job.seq_length - q)
    return 3 * job.global_batch_size * per_pair


def step_seconds(m: ModelConfig, layout: Layout, job: Job, algo: str = "simpo") -> float:
    """Estimated seconds per step: model FLOPs over ``world x peak x --mfu x throughput``; DPO
    with a resident reference runs one more forward (4/3 the work); with optimizer offload,
    the gradients (fp32) and weights (model dtype) of each rank's shard cross PCIe at
    :data:`PCIE_GBPS` (host Adam itself is not modelled); LoRA does ~2/3 of the work."""
    work = step_flops(m, job) * (4 / 3 if algo == "dpo" else 1.0)
    if job.lora_rank:
        # A frozen base computes no weight gradients: backward is ~1 forward (the input
        # gradients), not 2; the adapters' own matmuls are negligible at small rank.
        work *= 2 / 3
    seconds = work / (job.world * job.peak_tflops * 1e12 * job.mfu * throughput(layout, job))
    if job.optimizer_cpu_offload:
        n = rank_params(m, layout, job, 0)
        trained = n["dense"] / layout.dp + n["experts"] / layout.expert_dp + n["adapters"]
        seconds += trained * (4 + job.dtype_bytes) / (PCIE_GBPS * GB)
    return seconds


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def tp_problem(m: ModelConfig, tp: int) -> str | None:
    """Why TP size ``tp`` cannot split this model (None if it can)."""
    moe = moe_dims(m)
    mlp = [("intermediate_size", m.intermediate_size)] if moe is None else []
    if moe is not None and moe.shared_ffn:
        mlp = [("shared_expert_intermediate_size", moe.shared_ffn)]
    for what, n in [
        ("num_attention_heads", m.num_attention_heads),
        ("num_key_value_heads", m.kv_heads),
        *mlp,
        ("the padded vocabulary", m.padded_vocab_size()),
    ]:
        if n % tp:
            return f"{tp} does not divide {what} ({n})"
    return None


def expert_problem(m: ModelConfig, tp: int, dp: int, ep: int, etp: int) -> str | None:
    """Why EP ``ep`` x ETP ``etp`` cannot split the experts at TP ``tp`` x DP ``dp``."""
    moe = moe_dims(m)
    if moe is None:
        return None if ep == etp == 1 else "a dense model has no experts to split"
    if moe.num_experts % ep:
        return f"EP {ep} does not divide the {moe.num_experts} experts"
    if moe.expert_ffn % etp:
        return f"ETP {etp} does not divide the expert width {moe.expert_ffn}"
    if (tp * dp) % (ep * etp):
        return f"EP {ep} x ETP {etp} does not divide TP {tp} x DP {dp}"
    return None


def enumerate_layouts(
    m: ModelConfig,
    job: Job,
    *,
    tp: int | None = None,
    pp: int | None = None,
    micro_batch_size: int | None = None,
    distributed_optimizer: bool | None = None,
    recompute: Recompute | None = None,
    sequence_parallel: bool = True,
    ep: int | None = None,
    etp: int | None = None,
) -> list[Layout]:
    """Every valid layout: TP among the divisors of the GPUs per node up to 8 (that split the
    model), PP among the divisors of the layer count, DP = world / (TP x PP), the global batch a
    multiple of micro-batch x DP; for MoE, EP among the divisors of the expert count with
    EP x ETP dividing TP x DP, and ETP 1 or TP (Megatron's default); given values are fixed
    instead of enumerated. Optimizer CPU offload shards over DP like the distributed optimizer
    (Megatron's HybridDeviceOptimizer wraps its shards), so it is always on with it."""
    moe = moe_dims(m)
    tps = [tp] if tp else [t for t in _divisors(job.gpus_per_node) if t <= 8]
    pps = [pp] if pp else _divisors(m.num_hidden_layers)
    mbss = [micro_batch_size or 1]
    recs: list[Recompute] = [recompute] if recompute else ["none", "full"]
    out = []
    for t in tps:
        if tp_problem(m, t):
            continue
        for p in pps:
            if m.num_hidden_layers % p or job.world % (t * p):
                continue
            dp = job.world // (t * p)
            eps = [ep] if ep else (_divisors(moe.num_experts) if moe else [1])
            etps = [etp] if etp else (sorted({1, t}) if moe else [1])
            experts = [(e, et) for e in eps for et in etps if not expert_problem(m, t, dp, e, et)]
            for b in mbss:
                if job.global_batch_size % (b * dp):
                    continue
                mb = job.global_batch_size // (b * dp)
                dists = [distributed_optimizer] if distributed_optimizer is not None else [False]
                if distributed_optimizer is None and dp > 1:
                    dists.append(True)
                if job.optimizer_cpu_offload:
                    dists = [True]
                for dist_opt in dists:
                    for rc in recs:
                        for e, et in experts:
                            sp = sequence_parallel and t > 1
                            out.append(Layout(t, p, dp, b, mb, dist_opt, rc, sp, e, et))
    return out


def host_fits(part: dict[str, Any], job: Job) -> bool:
    """The offloaded state of a node's GPUs (worst stage's) fits ``--host-memory-gb``."""
    if job.host_memory_gb is None:
        return True
    return part["host"] * job.gpus_per_node <= job.host_memory_gb * GB


def plan(m: ModelConfig, job: Job, **fixed: Any) -> dict[str, Any]:
    """All valid layouts with their breakdowns for each of :data:`ALGOS`, ranked, and a
    verdict."""
    validate_job(job)
    for key in ("tp", "pp", "ep", "etp"):
        if fixed.get(key) is not None and fixed[key] < 1:
            flag = {"ep": "expert-model-parallel-size", "etp": "expert-tensor-parallel-size"}
            raise ConfigError(
                f"--{flag.get(key, key)} must be a positive integer, got {fixed[key]}"
            )
    if fixed.get("tp") and (problem := tp_problem(m, fixed["tp"])):
        raise ConfigError(f"--tp {problem}; choose a TP size that divides it")
    if fixed.get("pp") and m.num_hidden_layers % fixed["pp"]:
        raise ConfigError(
            f"--pp {fixed['pp']} must divide the {m.num_hidden_layers} layers; choose a divisor"
        )
    moe = moe_dims(m)
    for key, flag in (
        ("ep", "--expert-model-parallel-size"),
        ("etp", "--expert-tensor-parallel-size"),
    ):
        if (fixed.get(key) or 1) > 1 and moe is None:
            raise ConfigError(f"{flag} {fixed[key]}: a dense model has no experts; drop it")
    if fixed.get("ep") and moe is not None and moe.num_experts % fixed["ep"]:
        raise ConfigError(
            f"--expert-model-parallel-size {fixed['ep']} must divide the {moe.num_experts} "
            "experts; choose a divisor"
        )
    if job.lora_rank:
        lora_params(m, job.lora_rank, lora_targets(job))  # raises for MoE / bad targets
    layouts = enumerate_layouts(m, job, **fixed)
    if not layouts:
        raise ConfigError(
            f"no layout splits --global-batch-size {job.global_batch_size} over "
            f"{job.world} GPUs with the given --tp/--pp/--micro-batch-size (and expert sizes): "
            "the global batch must be a multiple of micro-batch x DP and EP x ETP must divide "
            "TP x DP; change one of them"
        )
    limit = job.gpu_memory_gb * GB
    rows = []
    for lay in layouts:
        s, d, pre = (breakdown(m, lay, job, a) for a in ALGOS)
        rows.append(
            {
                "layout": asdict(lay),
                "name": lay.name(),
                "simpo": s,
                "dpo": d,
                "dpo_precomputed": pre,
                "fits_simpo": s["total"] <= limit and host_fits(s, job),
                "fits_dpo": d["total"] <= limit and host_fits(d, job),
                "fits_dpo_precomputed": pre["total"] <= limit and host_fits(pre, job),
                "throughput": throughput(lay, job),
                "step_seconds": step_seconds(m, lay, job),
                "fused_loss_head": fused_loss_head(m, lay, job)[0],
            }
        )
    # Layouts that fit, fastest first; then the rest, smallest first.
    rows.sort(
        key=lambda r: (
            (0, r["step_seconds"], r["simpo"]["total"])
            if r["fits_simpo"]
            else (1, r["simpo"]["total"], r["step_seconds"])
        )
    )
    bpp = bytes_per_param(job)
    per_param = bpp["weights"] + bpp["gradients"] + bpp["optimizer"]
    c = count_params(m)
    model = {**asdict(m), "params": c.total, "active_params": c.active}
    if moe is not None:
        model["moe"] = asdict(moe)
    if job.lora_rank:
        model["adapter_params"] = (
            c.num_layers * lora_params(m, job.lora_rank, lora_targets(job)).total
        )
    fl = step_flops(m, job)
    return {
        "model": model,
        "job": {**asdict(job), "world": job.world},
        "bytes_per_param": {
            **bpp,
            "simpo_total": per_param,
            "dpo_total": per_param + bpp["weights"],
        },
        "flops": {
            "step": fl,
            "router_share": step_router_flops(m, job) / fl,
            "matmul_params": flops.matmul_params(m),
        },
        "layouts": rows,
        "verdict": verdict(rows, job),
    }


def step_router_flops(m: ModelConfig, job: Job) -> int:
    """The routers' share of :func:`step_flops` (3x forward over the same tokens)."""
    q = min(job.prompt_length, job.seq_length - 1)
    tokens = job.global_batch_size * (2 * job.seq_length - q)
    return 3 * tokens * flops.router_flops_per_token(m)


def validate_job(job: Job) -> None:
    for flag, v in [
        ("--nodes", job.nodes),
        ("--gpus-per-node", job.gpus_per_node),
        ("--seq-length", job.seq_length),
        ("--global-batch-size", job.global_batch_size),
    ]:
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {v!r}")
    if not job.gpu_memory_gb > 0:
        raise ConfigError(f"--gpu-memory-gb must be positive, got {job.gpu_memory_gb}")
    if not 0 <= job.fragmentation < 1:
        raise ConfigError(f"--fragmentation must be in [0, 1), got {job.fragmentation}")
    if job.overhead_gb < 0:
        raise ConfigError(f"--overhead-gb must be >= 0, got {job.overhead_gb}")
    if not isinstance(job.loss_chunk_size, int) or job.loss_chunk_size < 1:
        raise ConfigError(f"--loss-chunk-size must be >= 1, got {job.loss_chunk_size}")
    if not isinstance(job.lora_rank, int) or job.lora_rank < 0:
        raise ConfigError(f"--lora-rank must be a positive integer, got {job.lora_rank!r}")
    if not 0 <= job.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {job.lora_dropout}")
    if not 0 < job.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {job.mfu}")
    if not job.peak_tflops > 0:
        raise ConfigError(f"--peak-tflops must be positive, got {job.peak_tflops}")
    if not 0 <= job.prompt_length < job.seq_length:
        raise ConfigError(f"--prompt-length must be in [0, --seq-length), got {job.prompt_length}")
    if job.host_memory_gb is not None and not job.host_memory_gb > 0:
        raise ConfigError(f"--host-memory-gb must be positive, got {job.host_memory_gb}")


def verdict(rows: list[dict[str, Any]], job: Job) -> str:
    where = f"{job.nodes}x{job.gpus_per_node} GPUs of {job.gpu_memory_gb:g} GB"
    fit = [r for r in rows if r["fits_simpo"]]
    if not fit:
        best = min(rows, key=lambda r: r["simpo"]["total"])
        return (
            f"does not fit on {where}: the smallest SimPO peak is "
            f"{best['simpo']['total'] / GB:.1f} GB/GPU ({best['name']}); add GPUs, shorten "
            "--seq-length or lower --micro-batch-size"
        )
    best = fit[0]
    n_dpo = sum(r["fits_dpo"] for r in rows)
    dpo = "DPO+ref fits it too" if best["fits_dpo"] else "DPO+ref does not fit that layout"
    return (
        f"fits on {where}: best {best['name']} ({best['simpo']['total'] / GB:.1f} GB/GPU SimPO, "
        f"{best['dpo']['total'] / GB:.1f} GB DPO+ref; {dpo}); {len(fit)} layouts fit SimPO, "
        f"{n_dpo} fit DPO+ref"
    )


def _best(rows: list[dict[str, Any]], algo: str) -> dict[str, Any]:
    """The fastest layout that fits ``algo``, else the one with the smallest peak."""
    key = "fits_" + algo.replace("-", "_")
    fit = [r for r in rows if r[key]]
    if fit:
        return min(fit, key=lambda r: r["step_seconds"] * (4 / 3 if algo == "dpo" else 1))
    return min(rows, key=lambda r: r[algo.replace("-", "_")]["total"])


def scoring_cost(m: ModelConfig, job: Job, num_pairs: int) -> dict[str, float]:
    """One-off cost of ``score-reference`` over ``num_pairs`` pairs: one forward of both
    sequences of each pair at ``--seq-length`` (prompt counted once with ``--prompt-length``),
    on all GPUs at the assumed MFU (no backward, no bubble)."""
    q = min(job.prompt_length, job.seq_length - 1)
    per_pair = flops.shared_pair_forward_flops(m, q, job.seq_length - q, job.seq_length - q)
    total = num_pairs * per_pair
    seconds = total / (job.world * job.peak_tflops * 1e12 * job.mfu)
    steps = num_pairs / job.global_batch_size
    return {"pairs": num_pairs, "flops": total, "seconds": seconds, "train_steps": steps}


def objectives(m: ModelConfig, job: Job, rows: list[dict[str, Any]], num_pairs: int | None):
    """DPO with a resident reference vs DPO from precomputed log-probs vs SimPO: each at its
    best layout, the one-off scoring cost, and the memory the reference takes on this model."""
    names = {
        "dpo": "DPO, resident reference",
        "dpo-precomputed": "DPO, precomputed log-probs",
        "simpo": "SimPO",
    }
    out = []
    for algo, name in names.items():
        r = _best(rows, algo)
        part = r[algo.replace("-", "_")]
        seconds = r["step_seconds"] * (4 / 3 if algo == "dpo" else 1)
        fits = r["fits_" + algo.replace("-", "_")]
        out.append(
            {"objective": name, "layout": r["name"], "fits": fits, "seconds": seconds, **part}
        )
    c = count_params(m)
    bpp = bytes_per_param(job)
    # LoRA: the trained state is the frozen base (its weights) plus the small adapters.
    state = bpp["weights"] + (0 if job.lora_rank else bpp["gradients"] + bpp["optimizer"])
    truth = {
        "params": c.total,
        "reference_gb": c.total * bpp["reference"] / GB,
        "training_state_gb": c.total * state / GB,
        "reference_bytes_per_param": bpp["reference"],
        "state_bytes_per_param": state,
    }
    scoring = scoring_cost(m, job, num_pairs) if num_pairs else None
    return {"rows": out, "memory": truth, "scoring": scoring}


#: The LoRA rank the variants table shows when ``--lora-rank`` is not given.
DEFAULT_VARIANT_RANK = 16


def variants(m: ModelConfig, job: Job, **fixed: Any) -> list[dict[str, Any]]:
    """Which SimPO jobs fit this hardware: full-parameter, full-parameter with optimizer CPU
    offload, LoRA (``--lora-rank``, else rank 16): the best layout of each."""
    base = dataclasses.replace(job, lora_rank=0, optimizer_cpu_offload=False)
    rank = job.lora_rank or DEFAULT_VARIANT_RANK
    jobs = {
        "full-parameter": base,
        "full-parameter + optimizer CPU offload": dataclasses.replace(
            base, optimizer_cpu_offload=True
        ),
        f"LoRA r{rank} ({job.lora_target})": dataclasses.replace(base, lora_rank=rank),
    }
    out = []
    for name, j in jobs.items():
        rows = plan(m, j, **fixed)["layouts"]
        r = _best(rows, "simpo")
        out.append(
            {
                "job": name,
                "layout": r["name"],
                "fits": r["fits_simpo"],
                "gb_per_gpu": r["simpo"]["total"] / GB,
                "host_gb_per_node": r["simpo"]["host"] * j.gpus_per_node / GB,
                "step_seconds": r["step_seconds"],
                "layouts_that_fit": sum(x["fits_simpo"] for x in rows),
            }
        )
    return out


#: The LoRA fields sized by ``plan``: (the planner's default, its help; None: the field's).
_LORA_FLAGS: dict[str, tuple[Any, str | None]] = {
    "lora_rank": (0, "size a LoRA run of this rank"),
    "lora_alpha": (None, "LoRA alpha (no effect on memory)"),
    "lora_dropout": (0.0, None),
    "lora_target": ("all", None),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help=f"preset ({', '.join(PRESETS)}), HF config.json or megatron-simpo YAML",
    )
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    p.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU (GB)")
    p.add_argument("--seq-length", type=int, required=True, help="padded sequence length")
    p.add_argument("--global-batch-size", type=int, required=True, help="pairs per step")
    p.add_argument("--tp", type=int, help="fix the tensor-parallel size (default: enumerate)")
    p.add_argument("--pp", type=int, help="fix the pipeline-parallel size (default: enumerate)")
    p.add_argument("--micro-batch-size", type=int, help="pairs per micro-batch (default 1)")
    p.add_argument(
        "--recompute",
        choices=["none", "selective", "full"],
        help="fix activation recompute (default: enumerate none and full)",
    )
    p.add_argument(
        "--distributed-optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fix the distributed optimizer on/off (default: enumerate)",
    )
    p.add_argument(
        "--sequence-parallel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sequence parallelism whenever TP > 1",
    )
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="model dtype")
    p.add_argument(
        "--attention",
        choices=["flash", "unfused"],
        default="flash",
        help="flash (TE/SDPA: no s^2 term) or unfused (Megatron local spec: keeps the softmax)",
    )
    p.add_argument(
        "--kernels",
        choices=["fused", "torch"],
        default="fused",
        help="fused (TE/apex on GPU) or torch (plain torch ops, the CPU path: RMSNorm and SwiGLU "
        "keep more for backward)",
    )
    p.add_argument(
        "--fragmentation", type=float, default=0.10, help="allocator margin, fraction of the sum"
    )
    p.add_argument(
        "--overhead-gb",
        type=float,
        default=1.5,
        help="fixed per-GPU overhead: CUDA context, NCCL, workspaces",
    )
    p.add_argument(
        "--fused-loss-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="count the fused chunked loss head (default: where it saves memory, as training "
        "decides; megatron_simpo/defaults.py)",
    )
    p.add_argument(
        "--loss-chunk-size", type=int, default=1024, help="tokens per chunk of the fused head"
    )
    p.add_argument(
        "--loss",
        choices=OBJECTIVE_NAMES,
        default="simpo",
        help="the objective; a reference objective (DPO family) adds the comparison of DPO with "
        "a resident reference, DPO from precomputed log-probs and SimPO",
    )
    p.add_argument(
        "--num-pairs", type=int, help="pairs in the dataset: the one-off score-reference cost"
    )
    p.add_argument(
        "--prompt-length",
        type=int,
        default=0,
        help="prompt tokens shared by a pair's two sequences (prefix sharing): counted once in "
        "the FLOPs",
    )
    p.add_argument(
        "--mfu", type=float, default=0.40, help="assumed MFU for the time estimates (no bubble)"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak TFLOP/s per GPU (H100/H200 bf16)"
    )
    # train's --lora-* flags (names and types from LoraConfig), with the planner's defaults.
    for name, flags, kw in field_flags(LoraConfig, tuple(_LORA_FLAGS)):
        default, help_text = _LORA_FLAGS[name]
        p.add_argument(*flags, **{**kw, "help": help_text or kw["help"]}, default=default)
    p.add_argument(
        "--optimizer-cpu-offload",
        action="store_true",
        help="fp32 master weights and Adam state on the host (Megatron-Core's "
        "optimizer_cpu_offload, with the distributed optimizer)",
    )
    p.add_argument("--host-memory-gb", type=float, help="host memory per node for the offload")
    p.add_argument(
        "--expert-model-parallel-size",
        type=int,
        help="fix EP (MoE; default: enumerate divisors of the expert count)",
    )
    p.add_argument(
        "--expert-tensor-parallel-size",
        type=int,
        help="fix ETP (MoE; default: enumerate 1 and TP)",
    )
    p.add_argument("--top", type=int, default=10, help="layouts to list")
    p.add_argument("--json", action="store_true", help="print the full plan as JSON")


def main(args: argparse.Namespace) -> int:
    """``megatron-simpo plan``: prints the table (or JSON); errors are ConfigError."""
    m = load_model(args.model)
    job = Job(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gb=args.gpu_memory_gb,
        seq_length=args.seq_length,
        global_batch_size=args.global_batch_size,
        precision=args.precision,
        attention=args.attention,
        kernels=args.kernels,
        fragmentation=args.fragmentation,
        overhead_gb=args.overhead_gb,
        fused_loss_head=args.fused_loss_head,
        loss_chunk_size=args.loss_chunk_size,
        lora_rank=args.lora_rank,
        lora_target=args.lora_target,
        lora_dropout=args.lora_dropout,
        optimizer_cpu_offload=args.optimizer_cpu_offload,
        host_memory_gb=args.host_memory_gb,
        prompt_length=args.prompt_length,
        mfu=args.mfu,
        peak_tflops=args.peak_tflops,
    )
    if args.num_pairs is not None and args.num_pairs < 1:
        raise ConfigError(f"--num-pairs must be a positive integer, got {args.num_pairs}")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise ConfigError(
            f"--micro-batch-size must be a positive integer, got {args.micro_batch_size}"
        )
    fixed = dict(
        tp=args.tp,
        pp=args.pp,
        micro_batch_size=args.micro_batch_size,
        distributed_optimizer=args.distributed_optimizer,
        recompute=args.recompute,
        sequence_parallel=args.sequence_parallel,
        ep=args.expert_model_parallel_size,
        etp=args.expert_tensor_parallel_size,
    )
    result = plan(m, job, **fixed)
    result["job_loss"] = args.loss
    if LossConfig(objective=args.loss).needs_reference:
        result["objectives"] = objectives(m, job, result["layouts"], args.num_pairs)
    if job.lora_rank or job.optimizer_cpu_offload:
        result["variants"] = variants(m, job, **fixed)
    print(json.dumps(result, indent=1) if args.json else format_plan(result, args.top))
    return 0
