"""LoRA and DoRA adapters on a built Megatron-Core GPTModel, applied as parallelism is.

:func:`apply_adapters` takes the stock model's tensor-parallel linears (``linear_qkv``,
``linear_proj``, ``linear_fc1``, ``linear_fc2`` of each layer), gives each an ``lora`` child
holding one adapter per Hugging Face projection, replaces that instance's ``forward`` and
``sharded_state_dict`` (never the Megatron classes), and freezes every base weight. Each
adapter's tensors are exactly peft's (``lora_A [r, in]``, ``lora_B [out, r]``, DoRA's
``lora_magnitude [out]``), split over tensor parallelism:

- column-parallel (QKV, gate/up): ``B`` and the magnitude sharded like the output rows, ``A``
  replicated. The adapter reads the base layer's (sequence-gathered) input: no extra
  communication. A fused QKV has q/k/v adapters and a fused fc1 gate/up adapters, their outputs
  laid out in Megatron's per-rank order (q/k/v per query group; gate then up).
- row-parallel (proj, fc2): ``A`` sharded like the input, ``B`` and the magnitude replicated.
  The adapter's partial output is added before the base layer's all-reduce (reduce-scatter under
  sequence parallelism), which then sums both: no extra communication.

A replicated factor sees partial gradients (column ``A``: each rank's ``B`` rows; row ``B``:
each rank's input slice), which :func:`finalize_model_grads` sums over TP once per step, as
Megatron-Core does for norms under sequence parallelism.

Mixture of experts (``MoELayer``): the attention projections, the shared expert's MLP
(Qwen2-MoE's ``SharedExpertMLP``: stock column/row-parallel linears on the TP group) and each
routed expert of a ``SequentialMLP`` (``local_experts.{e}.linear_fc1`` / ``linear_fc2``, the
local spec's experts, which every LoRA run builds: ``model.build_model``) take adapters; the
router and the shared-expert gate stay frozen. An expert's adapters live with it: on its
expert-parallel rank, split over the expert-TP group as its weight is, with no communication of
their own (the token dispatcher moves the tokens; the expert linears do none either), reduced
over the expert-data-parallel group by Megatron's DDP (they carry the weight's ``allreduce``
flag) and saved along the checkpoint's expert axis. Transformer Engine's grouped GEMM experts
(``TEGroupedMLP``: one weight for all local experts) are refused.

DoRA (Liu et al. 2024; peft's definition): ``y = W x + (m / n - 1) * W x' + (m / n) * s * B A x'``
with ``x'`` the dropped-out input, ``s = alpha / r`` and ``n = ||W + s B A||`` per output row,
detached. Column-parallel rows are local; a row-parallel row spans the shards, so its squared
norm is all-reduced over TP.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_simpo.config import LoraConfig
from megatron_simpo.errors import ConfigError

#: Megatron linear (the last part of its name) -> (parallel kind, the HF projections fused in it,
#: in Megatron's order): attention, the dense MLP, a shared expert's and a routed expert's MLP.
LINEARS: dict[str, tuple[str, tuple[str, ...]]] = {
    "linear_qkv": ("column", ("q_proj", "k_proj", "v_proj")),
    "linear_proj": ("row", ("o_proj",)),
    "linear_fc1": ("column", ("gate_proj", "up_proj")),
    "linear_fc2": ("row", ("down_proj",)),
}
#: Attribute that marks a replicated adapter tensor whose gradient is partial over TP: "tp"
#: (the tensor-parallel group) or "expert_tp" (a routed expert's: the expert-TP group).
TP_PARTIAL = "lora_tp_partial"


class Target(NamedTuple):
    """One adaptable linear of a chunk."""

    layer: int
    """Global layer index."""
    name: str
    """Its name in the layer (``mlp.experts.local_experts.{local e}.linear_fc1``)."""
    module: torch.nn.Module
    expert: int | None
    """The routed expert's global index (None: not a routed expert)."""


class Adapter(torch.nn.Module):
    """One projection's LoRA factors (this rank's shards) and DoRA magnitude.

    Attributes:
        lora_A: ``[r, in]`` (row-parallel: ``[r, in / tp]``).
        lora_B: ``[out / tp, r]`` (row-parallel: ``[out, r]``).
        lora_magnitude: ``[out / tp]`` (row-parallel: ``[out]``), DoRA only.
    """

    def __init__(self, rank: int, in_features: int, out_features: int, dora: bool, like):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.lora_magnitude = torch.nn.Parameter(torch.ones(out_features, **kw)) if dora else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` ``[..., out]``. Called as a module, so that Megatron DDP's forward
        pre-hooks (the overlapped parameter all-gather of the distributed optimizer) see it."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


class Adapters(torch.nn.Module):
    """The adapters of one Megatron linear: one :class:`Adapter` per adapted HF projection.

    Args:
        kind: 'column' or 'row'.
        rows: HF projection -> its output rows on this rank per group (column-parallel), in
            the fused order; ``groups`` such groups make the local output.
        groups: query groups on this rank (QKV), else 1.
        tp_group: the base layer's tensor-parallel group (a routed expert's: expert-TP).
    """

    def __init__(
        self,
        cfg: LoraConfig,
        kind: str,
        targets: tuple[str, ...],
        rows: dict[str, int],
        groups: int,
        in_features: int,
        like: torch.Tensor,
        tp_group=None,
    ):
        super().__init__()
        self.kind, self.rows, self.groups = kind, rows, groups
        self.tp_group = tp_group
        self.scaling = cfg.lora_alpha / cfg.lora_rank
        self.dropout = cfg.lora_dropout
        self.dora = cfg.dora
        self.parts = torch.nn.ModuleDict(
            {
                name: Adapter(cfg.lora_rank, in_features, rows[name] * groups, cfg.dora, like)
                for name in rows
                if name in targets
            }
        )

    def fuse(self, per_part: dict[str, torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """Lays per-projection tensors ``[..., rows_p * groups]`` out in the fused order
        ``[..., (g0: p0, p1, ..) (g1: ..)]``; projections without an adapter are ``fill``."""
        some = next(iter(per_part.values()))
        lead = some.shape[:-1]
        pieces = []
        for name, n in self.rows.items():
            t = per_part.get(name)
            if t is None:
                t = some.new_full((*lead, n * self.groups), fill)
            pieces.append(t.reshape(*lead, self.groups, n))
        width = self.groups * sum(self.rows.values())  # not -1: an expert may get no tokens
        return torch.cat(pieces, dim=-1).reshape(*lead, width)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dropout or not self.training:
            return x
        if self.kind == "row":  # a sharded input: each rank's own stream (Megatron's tracker)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.dropout(x, self.dropout, True)
        return F.dropout(x, self.dropout, True)

    def lora_outputs(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per projection ``s * B A drop(x)`` ``[..., out_p]`` and the last dropped input."""
        out, dropped = {}, x
        for name, a in self.parts.items():
            dropped = self._drop(x)
            out[name] = self.scaling * a(dropped)
        return out, dropped

    @torch.no_grad()
    def delta_weight(self) -> dict[str, torch.Tensor]:
        """``s * B A`` of each projection (this rank's block)."""
        return {n: self.scaling * (a.lora_B @ a.lora_A) for n, a in self.parts.items()}

    @torch.no_grad()
    def dora_ratio(self, weight: torch.Tensor) -> torch.Tensor:
        """``m / ||W + s B A||`` per local output row ``[out_local]`` (1 where not adapted),
        detached. ``weight``: the base layer's local weight."""
        delta = self.delta_weight()
        if self.kind == "column":
            merged = weight + self.fuse({n: d.t() for n, d in delta.items()}).t()
            norm = torch.linalg.vector_norm(merged.float(), dim=1)
            mag = self.fuse({n: a.lora_magnitude for n, a in self.parts.items()}, fill=0.0)
            ratio = mag.float() / norm
            adapted = self.fuse(
                {n: torch.ones_like(a.lora_magnitude) for n, a in self.parts.items()}
            )
            ratio = torch.where(adapted.bool(), ratio, torch.ones_like(ratio))
        else:
            ((name, a),) = self.parts.items()
            squares = (weight + delta[name]).float().pow(2).sum(dim=1)
            _all_reduce(squares, self.tp_group)
            ratio = a.lora_magnitude.float() / squares.sqrt()
        return ratio.to(weight.dtype)

    def delta(self, x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What the adapters add to the base output ``base = W x`` (no bias) ``[s, b, out]``
        (row-parallel: partial sums, like ``base``). ``x``: the base layer's input."""
        lora, dropped = self.lora_outputs(x)
        fused = self.fuse(lora) if self.kind == "column" else lora[next(iter(lora))]
        if not self.dora:
            return fused
        ratio = self.dora_ratio(weight)
        if self.dropout and self.training:
            base = F.linear(dropped, weight)
        return (ratio - 1) * base + ratio * fused


def _all_reduce(t: torch.Tensor, group) -> None:
    """Sum over ``group`` (None: the tensor-parallel group), skipped for a group of one."""
    group = group if group is not None else ps.get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(t, group=group)


def _column_forward(self, input_, weight=None, runtime_gather_output=None):
    """ColumnParallelLinear.forward for a frozen weight plus adapters (no gather of output).
    A routed expert's linear communicates nothing (``explicit_expert_comm``: the token
    dispatcher has gathered its tokens over expert-TP), as Megatron's own forward."""
    if getattr(self, "explicit_expert_comm", False):
        total = input_
    elif self.sequence_parallel:
        total = tensor_parallel.gather_from_sequence_parallel_region(input_, group=self.tp_group)
    else:
        total = tensor_parallel.copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
    out = F.linear(total, self.weight)
    out = out + self.lora.delta(total, out, self.weight)
    if self.bias is not None and not self.skip_bias_add:
        out = out + self.bias
    return out, (self.bias if self.skip_bias_add else None)


def _row_forward(self, input_):
    """RowParallelLinear.forward for a frozen weight plus adapters: the adapters' partial
    output joins the base layer's one reduction."""
    partial = F.linear(input_, self.weight)
    partial = partial + self.lora.delta(input_, partial, self.weight)
    if getattr(self, "explicit_expert_comm", False):  # the dispatcher reduces expert outputs
        out = partial
    elif self.sequence_parallel:
        out = tensor_parallel.reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
    else:
        out = tensor_parallel.reduce_from_tensor_model_parallel_region(partial, self.tp_group)
    if self.bias is not None and not self.skip_bias_add:
        out = out + self.bias
    return out, (self.bias if self.skip_bias_add else None)


def _sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
    """The base layer's sharded state dict, with the adapters' tensors sharded like them (over
    the layer's own TP group; a routed expert's along the expert axis in ``sharded_offsets``,
    with the replica ids its ``SequentialMLP`` then sets)."""
    out = type(self).sharded_state_dict(self, prefix, sharded_offsets, metadata)
    for key in [k for k in out if k.startswith(prefix + "lora.")]:
        del out[key]
    state = self.lora.state_dict(prefix="", keep_vars=True)
    axes = {k: t.partition_dim for k, t in state.items() if getattr(t, "tensor_model_parallel", 0)}
    dp_cp = (metadata or {}).get("dp_cp_group") or ps.get_data_parallel_group(
        with_context_parallel=True
    )
    out.update(
        make_sharded_tensors_for_checkpoint(
            state,
            prefix + "lora.",
            axes,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=dp_cp,
        )
    )
    return out


def _init_a(a: Adapter, seed: int, full_in: int, shard: slice | None) -> None:
    """peft's init of ``A`` (Kaiming-uniform, a=sqrt(5)) from a generator of the layer and
    projection, drawn whole and sliced: the same values at every layout."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(full_in)  # kaiming_uniform_(a=sqrt(5)) on fan_in
    full = torch.empty(a.lora_A.shape[0], full_in).uniform_(-bound, bound, generator=g)
    with torch.no_grad():
        a.lora_A.copy_(full if shard is None else full[:, shard])


def _layout(name: str, module, config) -> tuple[dict[str, int], int]:
    """Output rows per group of each fused projection on this rank, and the group count."""
    local = module.weight.shape[0]
    leaf = name.rsplit(".", 1)[1]
    if leaf == "linear_qkv":
        tp = ps.get_tensor_model_parallel_world_size()
        groups = config.num_query_groups // tp
        d = config.kv_channels
        per_group = config.num_attention_heads // config.num_query_groups
        return {"q_proj": per_group * d, "k_proj": d, "v_proj": d}, groups
    if leaf == "linear_fc1":
        return {"gate_proj": local // 2, "up_proj": local // 2}, 1
    return {LINEARS[leaf][1][0]: local}, 1


def _modules(chunk: torch.nn.Module) -> Iterable[Target]:
    """Every adaptable linear of a chunk: attention, then the dense MLP, or an MoE layer's
    shared expert and routed experts (a grouped-GEMM experts module as one target, ``name``
    ``mlp.experts``, which :func:`apply_adapters` refuses when MLP projections are targeted)."""
    for layer in chunk.decoder.layers:
        i = layer.layer_number - 1
        for name in ("self_attention.linear_qkv", "self_attention.linear_proj"):
            yield Target(i, name, layer.self_attention.get_submodule(name.split(".", 1)[1]), None)
        mlp = layer.mlp
        experts = getattr(mlp, "experts", None)
        if experts is None:  # a dense MLP
            for leaf in ("linear_fc1", "linear_fc2"):
                yield Target(i, f"mlp.{leaf}", getattr(mlp, leaf), None)
            continue
        shared = getattr(mlp, "shared_experts", None)
        if shared is not None:
            for leaf in ("linear_fc1", "linear_fc2"):
                yield Target(i, f"mlp.shared_experts.{leaf}", getattr(shared, leaf), None)
        local = getattr(experts, "local_experts", None)
        if local is None:  # TEGroupedMLP / GroupedMLP: one weight for all local experts
            yield Target(i, "mlp.experts", experts, -1)
            continue
        ep = experts.ep_group
        first = ep.rank() * len(local)
        for e, expert in enumerate(local):
            for leaf in ("linear_fc1", "linear_fc2"):
                name = f"mlp.experts.local_experts.{e}.{leaf}"
                yield Target(i, name, getattr(expert, leaf), first + e)


def apply_adapters(chunks: list[torch.nn.Module], cfg: LoraConfig, seed: int) -> None:
    """Adds adapters to every targeted linear of each chunk and freezes everything else.

    Call after ``build_model`` and before DDP / the optimizer are built. ``B`` starts at zero
    (the model is unchanged until trained); DoRA magnitudes are set by :func:`init_magnitudes`
    once the base weights are loaded.
    """
    targets = cfg.hf_targets()
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
        for layer, name, module, expert in _modules(chunk):
            kind, projections = LINEARS.get(name.rsplit(".", 1)[1], ("grouped", ()))
            if kind == "grouped":
                mlp = [p for p in targets if p in LINEARS["linear_fc1"][1] + ("down_proj",)]
                if mlp:
                    raise ConfigError(
                        f"--lora-target {','.join(mlp)}: layer {layer + 1}'s experts are a "
                        f"{type(module).__name__} (grouped GEMM); adapters support Megatron-Core's "
                        "SequentialMLP (the local spec: --attention-backend sdpa or local), or "
                        "target the attention only (--lora-target qkv,o_proj)"
                    )
                continue
            if not any(p in targets for p in projections):
                continue
            expected = ColumnParallelLinear if kind == "column" else RowParallelLinear
            if type(module) is not expected:
                raise ConfigError(
                    f"--lora-target: {name} is a {type(module).__name__}; the adapters support "
                    f"Megatron-Core's {expected.__name__} (use --attention-backend sdpa or local)"
                )
            if kind == "column" and module.gather_output:
                raise ConfigError(f"--lora-target: {name} gathers its output; not supported")
            group = module.tp_group
            rows, groups = _layout(name, module, module.config)
            in_local = module.weight.shape[1]
            module.lora = Adapters(cfg, kind, targets, rows, groups, in_local, module.weight, group)
            # A routed expert's adapters: reduced over expert-DP as its weight (DDP's flag).
            allreduce = getattr(module.weight, "allreduce", True)
            for proj, a in module.lora.parts.items():
                shard, full_in = None, in_local
                if kind == "row":
                    full_in = in_local * group.size()
                    shard = slice(group.rank() * in_local, (group.rank() + 1) * in_local)
                key = seed * 1000003 + layer * 31 + sum(map(ord, proj))
                if expert is not None:
                    key += 100003 * (expert + 1)
                _init_a(a, key, full_in, shard)
                sharded, replicated = (
                    ([a.lora_B, a.lora_magnitude], [a.lora_A])
                    if kind == "column"
                    else ([a.lora_A], [a.lora_B, a.lora_magnitude])
                )
                for t in sharded:
                    if t is not None:
                        set_tensor_model_parallel_attributes(t, True, 1 if t is a.lora_A else 0, 1)
                for t in replicated:
                    if t is not None:
                        setattr(t, TP_PARTIAL, "tp" if expert is None else "expert_tp")
                for t in a.parameters():
                    t.allreduce = allreduce
            module.forward = types.MethodType(
                _column_forward if kind == "column" else _row_forward, module
            )
            module.sharded_state_dict = types.MethodType(_sharded_state_dict, module)


@torch.no_grad()
def init_magnitudes(chunks: list[torch.nn.Module]) -> None:
    """DoRA's init: each magnitude is its row's norm of the (loaded) base weight ``||W||``
    (row-parallel: all-reduced over the layer's TP group), so the adapted model starts equal to
    the base."""
    for chunk in chunks:
        for target in _modules(chunk):
            module = target.module
            lora = getattr(module, "lora", None)
            if lora is None or not lora.dora:
                continue
            w = module.weight.float()
            if lora.kind == "column":
                norms = torch.linalg.vector_norm(w, dim=1)
                start = 0
                per = {n: r for n, r in lora.rows.items()}
                width = sum(per.values())
                grouped = norms.reshape(lora.groups, width)
                for name, n in per.items():
                    if name in lora.parts:
                        lora.parts[name].lora_magnitude.copy_(
                            grouped[:, start : start + n].reshape(-1)
                        )
                    start += n
            else:
                squares = w.pow(2).sum(dim=1)
                _all_reduce(squares, lora.tp_group)
                (a,) = lora.parts.values()
                a.lora_magnitude.copy_(squares.sqrt())


def adapter_parameters(chunks: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The trainable (adapter) parameters."""
    return [p for c in chunks for p in c.parameters() if p.requires_grad]


def finalize_model_grads(model: list, *args, **kwargs) -> None:
    """Megatron-Core's ``finalize_model_grads``, then the sum of the replicated adapter tensors'
    partial gradients over TP (routed experts': over expert-TP), one coalesced all-reduce per
    group and step."""
    from megatron.core.distributed import finalize_model_grads as mcore_finalize

    mcore_finalize(model, *args, **kwargs)
    groups = {
        "tp": ps.get_tensor_model_parallel_group,
        "expert_tp": ps.get_expert_tensor_parallel_group,
    }
    for kind, get_group in groups.items():
        group = get_group()
        if torch.distributed.get_world_size(group) == 1:
            continue
        grads = [
            p.main_grad
            for chunk in model
            for p in chunk.parameters()
            if p.requires_grad and getattr(p, TP_PARTIAL, None) == kind and p.main_grad is not None
        ]
        if grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat, group=group)
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
