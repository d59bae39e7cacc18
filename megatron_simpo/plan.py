"""Memory planner: ``megatron-simpo plan`` — will a SimPO run fit, and with which layout?

Per-GPU memory of one training step, for SimPO and for DPO with a frozen reference model, over the
layouts a cluster allows (TP x PP x DP, distributed optimizer, activation recompute), ranked by a
simple expected-throughput model::

    megatron-simpo plan --model llama3-70b --nodes 2 --gpus-per-node 8 --gpu-memory-gb 80 \\
        --seq-length 4096 --global-batch-size 128
    megatron-simpo plan --model path/to/config.json ... --tp 8 --pp 2 --json

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

Throughput model (relative, 1.0 = ideal): TP communication ``1 / (1 + 0.1 log2 TP)``, pipeline
bubble ``1 - (p-1)/(m+p-1)``, full recompute ``1/1.33`` (one extra forward), selective recompute
``1/1.05`` with unfused attention (nothing to recompute with flash attention). Data-parallel
gradient communication is assumed overlapped. It ranks layouts; it does not predict seconds.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_simpo import defaults
from megatron_simpo.config import ModelConfig, RunConfig
from megatron_simpo.errors import ConfigError

GB = 1e9

#: Model presets (Hugging Face ``config.json`` values of Meta's Llama 3 / 3.1 models).
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama3-70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}

Recompute = Literal["none", "selective", "full"]
Attention = Literal["flash", "unfused"]
Kernels = Literal["fused", "torch"]


def load_model(spec: str) -> ModelConfig:
    """A preset name, a Hugging Face ``config.json`` (or its directory) or our YAML config."""
    if spec in PRESETS:
        return ModelConfig(**PRESETS[spec])
    path = Path(spec)
    if not path.exists():
        raise ConfigError(
            f"--model {spec}: not a preset ({', '.join(PRESETS)}) and no such file; give a "
            "preset, a Hugging Face config.json or a megatron-simpo YAML config"
        )
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--model {spec}: cannot read it: {e}") from None
        if not isinstance(raw, dict) or not raw.get("model"):
            raise ConfigError(f"--model {spec}: the YAML file has no 'model' section")
        return RunConfig.from_dict({"model": raw["model"]}, source=spec).model
    return ModelConfig.from_hf_config(path)


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a Llama-architecture model (padded vocabulary)."""

    embedding: int
    """Input embedding ``V_pad x h``."""
    layer_sharded: int
    """Per layer, the weights split over TP (QKV, attention output, MLP; QKV bias)."""
    layer_replicated: int
    """Per layer, the weights every TP rank holds (the two RMSNorm weights)."""
    final_norm: int
    output: int
    """Output layer ``V_pad x h`` (0 when tied to the embedding)."""
    num_layers: int

    @property
    def total(self) -> int:
        per_layer = self.layer_sharded + self.layer_replicated
        return self.embedding + self.num_layers * per_layer + self.final_norm + self.output


def count_params(m: ModelConfig) -> ParamCount:
    h, d = m.hidden_size, m.head_size
    q, kv = m.num_attention_heads * d, m.kv_heads * d
    qkv = h * (q + 2 * kv) + ((q + 2 * kv) if m.qkv_bias else 0)
    sharded = qkv + q * h + 3 * h * m.intermediate_size  # QKV, proj, gate+up (2hf), down (fh)
    v = m.padded_vocab_size()
    return ParamCount(
        embedding=v * h,
        layer_sharded=sharded,
        layer_replicated=2 * h + (2 * d if m.qk_layernorm else 0),  # norms (+ QK norms)
        final_norm=h,
        output=0 if m.tie_word_embeddings else v * h,
        num_layers=m.num_hidden_layers,
    )


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

    def name(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}", f"DP{self.dp}"]
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

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


def bytes_per_param(job: Job) -> dict[str, int]:
    """Weights, gradients and optimizer state (unsharded) per parameter."""
    w = job.dtype_bytes
    return {"weights": w, "gradients": 4, "optimizer": 12 if w == 2 else 8, "reference": w}


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
    mlp = (5 if torch_ops else 3) * f
    sharded = (attn + mlp) / t
    softmax = a * job.seq_length / t if job.attention == "unfused" else 0.0
    return {"norms": norms, "sharded": sharded, "softmax": softmax}


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
    args = (tokens, m.padded_vocab_size() // layout.tp, m.hidden_size, job.dtype_bytes)
    if fused_loss_head(m, layout, job)[0]:
        return defaults.fused_head_bytes(*args, job.loss_chunk_size)
    return defaults.unfused_head_bytes(*args)


def breakdown(m: ModelConfig, layout: Layout, job: Job, algo: str = "simpo") -> dict[str, Any]:
    """Per-GPU bytes of the worst pipeline stage, by component (``algo``: simpo | dpo)."""
    bpp = bytes_per_param(job)
    worst: dict[str, Any] | None = None
    stages = sorted({0, layout.pp - 1})
    for stage in stages:
        n = stage_params(m, layout.tp, layout.pp, stage)
        opt = n * bpp["optimizer"] / (layout.dp if layout.distributed_optimizer else 1)
        parts = {
            "weights": n * bpp["weights"],
            "gradients": n * bpp["gradients"],
            "optimizer": opt,
            "reference": n * bpp["reference"] if algo == "dpo" else 0.0,
            "activations": activation_bytes(m, layout, job, stage),
            "loss_head": loss_head_bytes(m, layout, job) if stage == layout.pp - 1 else 0.0,
        }
        subtotal = sum(parts.values())
        parts["margin"] = job.fragmentation * subtotal + job.overhead_gb * GB
        parts["total"] = subtotal + parts["margin"]
        parts["stage"] = stage
        if worst is None or parts["total"] > worst["total"]:
            worst = parts
    assert worst is not None
    return worst


def throughput(layout: Layout, job: Job) -> float:
    """Relative expected throughput (1.0 = no parallel overheads); see the module doc."""
    tp = 1.0 / (1.0 + 0.1 * math.log2(layout.tp))
    m, p = layout.num_microbatches, layout.pp
    pp = 1.0 - (p - 1) / (m + p - 1)
    rc = {"none": 1.0, "full": 1 / 1.33}.get(layout.recompute)
    if rc is None:
        rc = 1 / 1.05 if job.attention == "unfused" else 1.0
    return tp * pp * rc


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def tp_problem(m: ModelConfig, tp: int) -> str | None:
    """Why TP size ``tp`` cannot split this model (None if it can)."""
    for what, n in [
        ("num_attention_heads", m.num_attention_heads),
        ("num_key_value_heads", m.kv_heads),
        ("intermediate_size", m.intermediate_size),
        ("the padded vocabulary", m.padded_vocab_size()),
    ]:
        if n % tp:
            return f"{tp} does not divide {what} ({n})"
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
) -> list[Layout]:
    """Every valid layout: TP among the divisors of the GPUs per node up to 8 (that split the
    model), PP among the divisors of the layer count, DP = world / (TP x PP), the global batch a
    multiple of micro-batch x DP; given values are fixed instead of enumerated."""
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
            for b in mbss:
                if job.global_batch_size % (b * dp):
                    continue
                mb = job.global_batch_size // (b * dp)
                dists = [distributed_optimizer] if distributed_optimizer is not None else [False]
                if distributed_optimizer is None and dp > 1:
                    dists.append(True)
                for dist_opt in dists:
                    for rc in recs:
                        out.append(
                            Layout(t, p, dp, b, mb, dist_opt, rc, sequence_parallel and t > 1)
                        )
    return out


def plan(m: ModelConfig, job: Job, **fixed: Any) -> dict[str, Any]:
    """All valid layouts with their SimPO and DPO breakdowns, ranked, and a verdict."""
    validate_job(job)
    for key in ("tp", "pp"):
        if fixed.get(key) is not None and fixed[key] < 1:
            raise ConfigError(f"--{key} must be a positive integer, got {fixed[key]}")
    if fixed.get("tp") and (problem := tp_problem(m, fixed["tp"])):
        raise ConfigError(f"--tp {problem}; choose a TP size that divides it")
    if fixed.get("pp") and m.num_hidden_layers % fixed["pp"]:
        raise ConfigError(
            f"--pp {fixed['pp']} must divide the {m.num_hidden_layers} layers; choose a divisor"
        )
    layouts = enumerate_layouts(m, job, **fixed)
    if not layouts:
        raise ConfigError(
            f"no layout splits --global-batch-size {job.global_batch_size} over "
            f"{job.world} GPUs with the given --tp/--pp/--micro-batch-size: the global batch must "
            "be a multiple of micro-batch x DP; change one of them"
        )
    limit = job.gpu_memory_gb * GB
    rows = []
    for lay in layouts:
        s, d = breakdown(m, lay, job, "simpo"), breakdown(m, lay, job, "dpo")
        rows.append(
            {
                "layout": asdict(lay),
                "name": lay.name(),
                "simpo": s,
                "dpo": d,
                "fits_simpo": s["total"] <= limit,
                "fits_dpo": d["total"] <= limit,
                "throughput": throughput(lay, job),
                "fused_loss_head": fused_loss_head(m, lay, job)[0],
            }
        )
    # Layouts that fit, fastest first; then the rest, smallest first.
    rows.sort(
        key=lambda r: (
            (0, -r["throughput"], r["simpo"]["total"])
            if r["fits_simpo"]
            else (1, r["simpo"]["total"], -r["throughput"])
        )
    )
    bpp = bytes_per_param(job)
    per_param = bpp["weights"] + bpp["gradients"] + bpp["optimizer"]
    params = count_params(m).total
    return {
        "model": {**asdict(m), "params": params},
        "job": {**asdict(job), "world": job.world},
        "bytes_per_param": {
            **bpp,
            "simpo_total": per_param,
            "dpo_total": per_param + bpp["weights"],
        },
        "layouts": rows,
        "verdict": verdict(rows, job),
    }


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


#: Breakdown keys and their table headings.
COLUMNS = {
    "weights": "weights",
    "gradients": "grads",
    "optimizer": "optim",
    "activations": "acts",
    "loss_head": "logits",
    "margin": "margin",
}


def stage_name(stage: int, pp: int) -> str:
    return "all" if pp == 1 else ("first" if stage == 0 else "last")


def format_plan(result: dict[str, Any], top: int = 10) -> str:
    """The human-readable report."""
    m, job, bpp = result["model"], result["job"], result["bytes_per_param"]
    lines = [
        f"model: {m['params'] / 1e9:.2f}B parameters (hidden {m['hidden_size']}, "
        f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} heads / "
        f"{m['num_key_value_heads'] or m['num_attention_heads']} KV, ffn "
        f"{m['intermediate_size']}, vocab {m['vocab_size']})",
        f"job: {job['nodes']} node(s) x {job['gpus_per_node']} GPUs x "
        f"{job['gpu_memory_gb']:g} GB, seq {job['seq_length']}, global batch "
        f"{job['global_batch_size']} pairs, {job['precision']}, {job['attention']} attention, "
        f"{job['kernels']} kernels, "
        + {None: "loss head fused where it saves memory", True: "fused loss head"}.get(
            job["fused_loss_head"], "unfused loss head"
        )
        + (f" (chunk {job['loss_chunk_size']})" if job["fused_loss_head"] is not False else ""),
        f"bytes/param: weights {bpp['weights']} + grads {bpp['gradients']} + Adam "
        f"{bpp['optimizer']} = {bpp['simpo_total']} (SimPO); DPO adds a reference copy, "
        f"+{bpp['reference']} = {bpp['dpo_total']}: SimPO saves "
        f"{bpp['reference'] / bpp['dpo_total']:.0%} of static memory without the distributed "
        "optimizer (a larger share when it shards Adam over DP), plus the reference forward",
        "",
    ]
    head = (
        f"{'#':>3} {'layout':<34} {'mbs':>3} {'m':>4} {'stage':>5} "
        + " ".join(f"{c:>7}" for c in COLUMNS.values())
        + f" {'SimPO':>7} {'DPO':>7} {'fits':>5} {'speed':>5} {'head':>7}"
    )
    lines += [
        "per-GPU GB of the worst pipeline stage (stage); m = micro-batches per step; "
        "fits: S = SimPO, D = DPO+ref; speed = relative expected throughput; head = loss head",
        head,
    ]
    for i, r in enumerate(result["layouts"][:top], 1):
        s, d, lay = r["simpo"], r["dpo"], r["layout"]
        fits = ("S" if r["fits_simpo"] else "-") + ("D" if r["fits_dpo"] else "-")
        lines.append(
            f"{i:>3} {r['name']:<34} {lay['micro_batch_size']:>3} {lay['num_microbatches']:>4} "
            f"{stage_name(s['stage'], lay['pp']):>5} "
            + " ".join(f"{s[c] / GB:>7.2f}" for c in COLUMNS)
            + f" {s['total'] / GB:>7.2f} {d['total'] / GB:>7.2f} {fits:>5} "
            f"{r['throughput']:>5.2f} {'fused' if r['fused_loss_head'] else 'unfused':>7}"
        )
    hidden = len(result["layouts"]) - top
    if hidden > 0:
        lines.append(f"    ... {hidden} more layouts (--top N to show them, --json for all)")
    lines += ["", "verdict: " + result["verdict"]]
    return "\n".join(lines)


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
    )
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise ConfigError(
            f"--micro-batch-size must be a positive integer, got {args.micro_batch_size}"
        )
    result = plan(
        m,
        job,
        tp=args.tp,
        pp=args.pp,
        micro_batch_size=args.micro_batch_size,
        distributed_optimizer=args.distributed_optimizer,
        recompute=args.recompute,
        sequence_parallel=args.sequence_parallel,
    )
    print(json.dumps(result, indent=1) if args.json else format_plan(result, args.top))
    return 0
