"""Checks that need a CUDA device (skipped on CPU; ``benchmarks/gpu_check.sh`` runs them when a
GPU machine is lent).

From one set of initial weights and one varied data set (uneven lengths, one-token responses,
pair weights 0.5/1/2), three SimPO training steps of a small GQA Llama are run:

* the **fp32 CPU reference**: a process with CUDA hidden (gloo, Megatron's local attention);
* on CUDA (NCCL, one process): fp32 with local attention, SDPA, the fused loss head and packed
  rows, and bf16 with SDPA, the fused head and packed rows; prefix-shared rows through the
  compiled FlexAttention block mask (fp32, bf16); with Transformer Engine installed, bf16 on TE
  padded, TE packed as THD sequences (``PackedSeqParams``) and the defaults (TE + THD).

Then: CUDA fp32 matches the CPU reference closely (device parity); bf16 matches it within bf16
rounding; SDPA matches local attention; the fused head matches the materialised one; packed rows
match padded ones — each on the GPU kernels. Also: the vocab-parallel log-probs on CUDA, and the
real entry point (``train`` under torchrun, bf16) saving a checkpoint and resuming from it.

Mixture of experts (Transformer Engine only): a tiny Mixtral-like and Qwen3-MoE-like model
(``MOE_MODELS``) trained with the experts as TE's grouped GEMM (``TEGroupedMLP``, what
``model.use_grouped_gemm`` picks with TE and CUDA) against a ``SequentialMLP`` of TE linears
(the same TE spec, ``moe_grouped_gemm`` off), same weights, fp32 and bf16; at EP2 too where two
GPUs are visible (torchrun, NCCL all-to-all).

The module doubles as the worker script: ``python tests/test_cuda.py OUT DATA VARIANT...``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, free_port, torchrun  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: GQA (4 query heads, 2 KV groups), 4 layers; init 0.1 instead of 0.02 so the attention is far
#: from uniform and a wrong mask, scale or head mapping moves the losses by O(0.1).
MODEL = {
    "vocab_size": 32,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "make_vocab_size_divisible_by": 16,
    "initializer_range": 0.1,
}
SEQ_LENGTH = 48
STEPS = 3
#: name -> train-section overrides. The CPU reference is ``fp32_local`` run with CUDA hidden.
# Explicit: the fast paths default on with SDPA (defaults.py); each variant sets its own.
SDPA = {
    "attention_backend": "sdpa",
    "pack_pairs": False,
    "prefix_sharing": False,
    "fused_loss_head": False,
}
FUSED = {**SDPA, "fused_loss_head": True, "loss_chunk_size": 7}  # several chunks, one partial
PACKED = {**SDPA, "pack_pairs": True}
VARIANTS = {
    "fp32_local": {"precision": "fp32", "attention_backend": "local"},
    "fp32_sdpa": {"precision": "fp32", **SDPA},
    "fp32_fused": {"precision": "fp32", **FUSED},
    "fp32_packed": {"precision": "fp32", **PACKED},
    "bf16_sdpa": {"precision": "bf16", **SDPA},
    "bf16_fused": {"precision": "bf16", **FUSED},
    "bf16_packed": {"precision": "bf16", **PACKED},
}
#: Transformer Engine variants (where TE is installed): its fused attention padded, packed as
#: THD sequences (PackedSeqParams, megatron_simpo/packed_seq.py), and the defaults (auto: TE,
#: packing on as THD, prefix sharing off, the fused head as the memory model decides).
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
TE = {**SDPA, "attention_backend": "te"}
TE_VARIANTS = {
    "bf16_te": {"precision": "bf16", **TE},
    "bf16_te_thd": {"precision": "bf16", **TE, "pack_pairs": True},
    # PP1 drops the rows' trailing padding from the THD stream; padded to 16 instead of 64 here
    # so that these short micro-batches really get shorter streams (train_variant).
    "bf16_te_thd_trim16": {"precision": "bf16", **TE, "pack_pairs": True},
    "bf16_defaults": {"precision": "bf16"},
}
if HAVE_TE:
    VARIANTS.update(TE_VARIANTS)
#: Prefix-shared pairs through FlexAttention's block mask (compiled; gradients on CUDA only).
FLEX = {**SDPA, "attention_backend": "flex", "prefix_sharing": True}
VARIANTS["fp32_flex_prefix"] = {"precision": "fp32", **FLEX}
VARIANTS["bf16_flex_prefix"] = {"precision": "bf16", **FLEX}
SCALARS = ("loss", "logps/chosen", "logps/rejected", "rewards/margins")

#: Mixture-of-experts variants (run where TE is installed): model overrides of ``MODEL`` per
#: family: 4 experts, top-2, expert width != hidden; Qwen3-MoE-like with per-head QK norms and the
#: unnormalised top-k (norm_topk_prob False), Mixtral-like with the renormalised one.
MOE_MODELS = {
    "mixtral": {"model_type": "mixtral", "num_experts": 4, "intermediate_size": 48},
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "moe_intermediate_size": 32,
        "qk_layernorm": True,
        "norm_topk_prob": False,
    },
}
#: moe_<family>_<precision>_<experts>[_ep2]: ``grouped`` = TEGroupedMLP, ``seq`` = SequentialMLP.
#: The aux loss is on (coeff 0.01) so that its gradient through the router is compared as well.
MOE_TRAIN = {**TE, "moe_aux_loss_coeff": 0.01}
MOE_VARIANTS = {
    f"moe_{family}_{precision}_{experts}": {"precision": precision, **MOE_TRAIN}
    for family in MOE_MODELS
    for precision in ("fp32", "bf16")
    for experts in ("grouped", "seq")
}
MOE_EP2 = ["moe_mixtral_bf16_grouped_ep2"]  # torchrun, 2 ranks: EP2 (DP2 for the dense part)


def write_pairs(path: Path, n: int = 64, seed: int = 0) -> None:
    """Pre-tokenised pairs: prompts 1-20 tokens (BOS 1 first), responses 1-24 tokens, weights
    0.5, 1 or 2; every prompt + response fits SEQ_LENGTH."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, MODEL["vocab_size"]) for _ in range(k)]

    with path.open("w") as f:
        for i in range(n):
            prompt = [1, *ids(0 if i == 0 else rng.randint(0, 19))]
            room = SEQ_LENGTH - len(prompt)
            chosen, rejected = (ids(1 if i == 1 else rng.randint(1, min(24, room))) for _ in "cr")
            row = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
            row["weight"] = rng.choice([0.5, 1.0, 2.0])
            f.write(json.dumps(row) + "\n")


def local_name(name: str) -> str:
    """A parameter's name in the local spec: TE's spec fuses each pre-norm into the next linear
    (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); same tensors."""
    name = name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
    return name.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")


def moe_family(name: str) -> str | None:
    """The MoE family of a variant name (``moe_<family>_...``), None for the dense variants."""
    return next((f for f in MOE_MODELS if name.startswith(f"moe_{f}_")), None)


def canonical_name(name: str, expert_offset: int = 0) -> str:
    """A parameter's name in the local spec with a ``SequentialMLP`` at EP1: :func:`local_name`,
    and TE's grouped GEMM's ``mlp.experts.linear_fc1.weight{i}`` (one parameter per local expert)
    as ``mlp.experts.local_experts.{offset + i}.linear_fc1.weight`` (``expert_offset``: the first
    global expert of this expert-parallel rank; SequentialMLP's local index likewise)."""
    name = local_name(name)
    m = re.search(r"\.mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$", name)
    if m:
        fc, kind, i = m.groups()
        i = expert_offset + int(i)
        return name[: m.start()] + f".mlp.experts.local_experts.{i}.{fc}.{kind}"
    m = re.search(r"\.mlp\.experts\.local_experts\.(\d+)\.", name)
    if m:
        i = expert_offset + int(m.group(1))
        return name[: m.start()] + f".mlp.experts.local_experts.{i}." + name[m.end() :]
    return name


def checkpoint_layout(model: list) -> list[tuple]:
    """What a distributed checkpoint of ``model`` holds: (key, global shape, global offset) of
    every tensor shard, factories (e.g. the SwiGLU fc1 split) built, extra state left out. Import
    writes, and export reads, the keys of a local-spec ``SequentialMLP`` model
    (convert/common.py)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_simpo.model import unwrap

    out = set()
    for chunk in model:
        sd = unwrap(chunk).sharded_state_dict()
        apply_factories(sd)
        out |= {
            (t.key, tuple(t.global_shape), tuple(t.global_offset))
            for t in nested_values(sd)
            if isinstance(t, ShardedTensor)
        }
    return sorted(out)


def _config(name: str, data: str):
    from megatron_simpo.config import RunConfig

    family = moe_family(name)
    train = MOE_VARIANTS[name.removesuffix("_ep2")] if family else VARIANTS[name]
    return RunConfig.from_dict(
        {
            "model": {**MODEL, **MOE_MODELS[family]} if family else MODEL,
            "parallel": {"expert_model_parallel_size": 2 if name.endswith("_ep2") else 1},
            "loss": {"beta": 2.0, "gamma_beta_ratio": 0.5},
            "optim": {"lr": 3e-3, "lr_warmup_iters": 0, "clip_grad": 1.0},
            "train": {
                "seq_length": SEQ_LENGTH,
                "micro_batch_size": 4,
                "global_batch_size": 16,
                "train_iters": STEPS,
                "seed": 1234,
                **train,
            },
            "data": {"data_path": data, "data_schema": "pretokenized"},
        }
    )


def train_variant(name: str, data: str, out: Path) -> None:
    """``STEPS`` steps of one variant from ``out/init.pt`` (``init_<family>.pt`` for a MoE
    variant; written by the first run when absent); metrics of every step and the step-1
    gradients go to ``out/NAME.pt`` (from the first rank; at EP2 its experts only)."""
    from unittest import mock

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_simpo import model as model_mod
    from megatron_simpo import packed_seq, parallel
    from megatron_simpo.train import Trainer

    family = moe_family(name)
    # SequentialMLP on the TE spec: what the builder picks without grouped GEMM.
    grouped = not (family and "_seq" in name)
    no_grouped = mock.patch.object(model_mod, "use_grouped_gemm", lambda cfg: False)
    with contextlib.nullcontext() if grouped else no_grouped:
        trainer = Trainer(_config(name, data))
        trainer.setup()
    streams: list[tuple[int, int]] = []  # THD: (stream length, rows * s) per micro-batch
    real_thd_batch = packed_seq.thd_batch

    def thd_batch(batch, pad_multiple=None):
        out = real_thd_batch(batch, pad_multiple)
        streams.append((out[0]["tokens"].shape[1], batch["tokens"].numel()))
        return out

    patches = [mock.patch.object(packed_seq, "thd_batch", thd_batch)]
    if name.endswith("_trim16"):
        patches.append(mock.patch.object(packed_seq, "stream_multiple", lambda tp: 16))
    offset = 0
    if family:
        kinds = {type(m).__name__ for c in trainer.model for m in c.modules()}
        kind = kinds & {"TEGroupedMLP", "SequentialMLP", "GroupedMLP"}
        assert kind == {"TEGroupedMLP" if grouped else "SequentialMLP"}, (name, kind)
        n_local = MOE_MODELS[family]["num_experts"] // ps.get_expert_model_parallel_world_size()
        offset = ps.get_expert_model_parallel_rank() * n_local
    params = {
        canonical_name(n, offset): p for chunk in trainer.model for n, p in chunk.named_parameters()
    }
    init = out / (f"init_{family}.pt" if family else "init.pt")
    if init.exists():
        weights = torch.load(init)
        if ps.get_expert_model_parallel_world_size() > 1:  # this rank's experts only
            weights = {n: w for n, w in weights.items() if n in params}
        assert weights.keys() == params.keys(), (name, set(weights) ^ set(params))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
        trainer.optimizer.reload_model_params()  # bf16: the fp32 master copies too
    else:
        torch.save({n: p.detach().float().cpu().clone() for n, p in params.items()}, init)
    device = next(iter(params.values())).device.type
    grads: dict[str, torch.Tensor] = {}

    def grab() -> None:
        grads.update({n: p.main_grad.detach().float().cpu().clone() for n, p in params.items()})

    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        steps = [trainer.step(grab if i == 0 else None) for i in range(STEPS)]
    layout = checkpoint_layout(trainer.model) if family else None
    parallel.destroy_model_parallel()
    from megatron_simpo.model import attention_label

    record = {"device": device, "steps": steps, "grads": grads}
    record["attention"] = attention_label(trainer.cfg)
    record["thd_streams"] = streams
    if family:
        record["checkpoint_layout"] = layout
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(record, out / f"{name}.pt")


def _worker(out: Path, data: str, names: list[str], cuda: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, Megatron-Core through the CPU layer
    cmd = [sys.executable, __file__, str(out), data, *names]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """The CPU reference (first: it writes the initial weights), then every CUDA variant."""
    out = tmp_path_factory.mktemp("cuda_runs")
    data = out / "pairs.jsonl"
    write_pairs(data)
    _worker(out, str(data), ["fp32_local"], cuda=False)
    (out / "fp32_local.pt").rename(out / "cpu_reference.pt")
    _worker(out, str(data), list(VARIANTS), cuda=True)
    res = {name: torch.load(out / f"{name}.pt") for name in ["cpu_reference", *VARIANTS]}
    assert res["cpu_reference"]["device"] == "cpu"
    assert all(res[n]["device"] == "cuda" for n in VARIANTS), {n: res[n]["device"] for n in res}
    return res


def _check(
    got: dict,
    ref: dict,
    scalar_atol: float,
    grad_rtol: float,
    later_atol: float,
    fewer_tokens: bool = False,
) -> None:
    """Step-1 metrics and gradients (same weights, same batch), then the losses of the later
    steps (after Adam updates)."""
    g1, r1 = got["steps"][0], ref["steps"][0]
    assert g1["pairs"] == r1["pairs"] == 16
    # Prefix sharing computes each prompt once: fewer tokens than the same pairs padded.
    assert (g1["tokens"] < r1["tokens"]) if fewer_tokens else (g1["tokens"] == r1["tokens"])
    for key in SCALARS:
        assert math.isfinite(g1[key]) and abs(g1[key] - r1[key]) <= scalar_atol, (key, g1, r1)
    assert abs(g1["grad_norm"] - r1["grad_norm"]) <= grad_rtol * r1["grad_norm"], (g1, r1)
    assert got["grads"].keys() == ref["grads"].keys() and ref["grads"]
    for n, want in ref["grads"].items():
        scale = want.abs().max().item()
        err = (got["grads"][n] - want).abs().max().item()
        assert scale > 0 and err <= grad_rtol * scale, (n, err, scale)
    for i in range(1, STEPS):
        a, b = got["steps"][i]["loss"], ref["steps"][i]["loss"]
        assert abs(a - b) <= later_atol, (i, a, b)


# fp32 on both sides (torch keeps TF32 off for matmuls by default): different kernels and
# reduction orders, ~1e-6 relative per op through 4 layers. Step 1: losses/log-probs (~0.5-4)
# within 2e-5, gradients within 1e-4 of each tensor's largest entry (SDPA vs local on the CPU:
# 2.7e-7 and 1.3e-6). Later steps: Adam divides by sqrt(v), so gradient entries near zero (their
# sign is rounding noise) move by up to the learning rate; the losses stay within 2e-3.
FP32 = {"scalar_atol": 2e-5, "grad_rtol": 1e-4, "later_atol": 2e-3}
# bf16 keeps 8 significant bits: unit roundoff u = 2**-9 ~ 2e-3 per rounding of weights,
# activations and their gradients. Measured with bf16 on the CPU against this reference: step-1
# scalars 2.6e-3, gradients 2.2e-2 of each tensor's largest entry (~10 u, alike in every tensor),
# later losses 7.9e-3. GPU kernels (flash/efficient attention keep the probabilities in bf16)
# may be a few times worse: 3e-2, 1e-1 and 3e-2 allow that. Bugs stay far above: with the same
# data and weights, a packing mask that leaks across sequences moved the gradients by 1.0 of
# their scale and a softmax scale off by 25% by 0.45 (step-1 scalars only 5e-3: the gradient
# check is the sensitive one).
BF16 = {"scalar_atol": 3e-2, "grad_rtol": 1e-1, "later_atol": 3e-2}


def test_fp32_cuda_steps_match_the_cpu_reference(runs):
    _check(runs["fp32_local"], runs["cpu_reference"], **FP32)


def test_bf16_cuda_steps_match_the_fp32_cpu_reference(runs):
    _check(runs["bf16_sdpa"], runs["cpu_reference"], **BF16)


def test_sdpa_matches_local_attention_on_cuda(runs):
    _check(runs["fp32_sdpa"], runs["fp32_local"], **FP32)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_loss_head_matches_materialised_on_cuda(runs, precision):
    tol = FP32 if precision == "fp32" else BF16
    _check(runs[f"{precision}_fused"], runs[f"{precision}_sdpa"], **tol)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_rows_match_padded_on_cuda(runs, precision):
    tol = FP32 if precision == "fp32" else BF16
    _check(runs[f"{precision}_packed"], runs[f"{precision}_sdpa"], **tol)


needs_te = pytest.mark.skipif(not HAVE_TE, reason="needs Transformer Engine")


@needs_te
def test_te_steps_match_the_fp32_cpu_reference(runs):
    assert runs["bf16_te"]["attention"] == "te"
    _check(runs["bf16_te"], runs["cpu_reference"], **BF16)


@needs_te
def test_te_thd_packing_matches_te_padded(runs):
    """Packed pairs through TE's fused attention as THD sequences (cu_seqlens) against the same
    pairs padded, both bf16 on TE: BF16's bounds (the packed layout changes the flash kernel's
    tiling, i.e. which bf16 roundings happen, not what is summed); a span boundary in the wrong
    place leaks across sequences, which moved the gradients by 1.0 of their scale (see BF16)."""
    assert runs["bf16_te_thd"]["attention"] == "te/thd"
    _check(runs["bf16_te_thd"], runs["bf16_te"], **BF16)
    _check(runs["bf16_te_thd"], runs["cpu_reference"], **BF16)


@needs_te
def test_te_thd_without_trailing_padding_matches_te_padded(runs):
    """PP1: the THD stream holds the real tokens and one padding span up to a multiple (16
    here, 64 by default), not the rows' trailing padding; same bounds as THD packing (the sums
    are the same, only the stream is shorter)."""
    got = runs["bf16_te_thd_trim16"]
    assert got["attention"] == "te/thd"
    streams = got["thd_streams"]
    assert streams and all(t % 16 == 0 or t == full for t, full in streams), streams
    assert any(t < full for t, full in streams), streams
    _check(got, runs["bf16_te"], **BF16)
    _check(got, runs["bf16_te_thd"], **BF16)


@needs_te
def test_defaults_on_te_pack_as_thd_and_match_the_reference(runs):
    assert runs["bf16_defaults"]["attention"] == "te/thd"
    _check(runs["bf16_defaults"], runs["cpu_reference"], **BF16)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_flex_prefix_sharing_matches_padded_on_cuda(runs, precision):
    """Prefix-shared pairs (prompt once, rejected not seeing chosen) through the compiled
    FlexAttention block mask against the same pairs padded: the fp32/bf16 bounds of packed vs
    padded (the same sums over other tiles; a leak of chosen into rejected is O(1))."""
    assert runs[f"{precision}_flex_prefix"]["attention"] == "flex/block"
    tol = FP32 if precision == "fp32" else BF16
    _check(runs[f"{precision}_flex_prefix"], runs[f"{precision}_sdpa"], **tol, fewer_tokens=True)


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory) -> dict[str, dict]:
    """Every MoE variant in one CUDA process (the first of each family writes its weights)."""
    if not HAVE_TE:
        pytest.skip("needs Transformer Engine (grouped GEMM experts)")
    out = tmp_path_factory.mktemp("cuda_moe_runs")
    data = out / "pairs.jsonl"
    write_pairs(data)
    _worker(out, str(data), list(MOE_VARIANTS), cuda=True)
    res = {name: torch.load(out / f"{name}.pt") for name in MOE_VARIANTS}
    res["_out"], res["_data"] = out, data
    return res


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", list(MOE_MODELS))
def test_moe_grouped_gemm_matches_sequential_mlp(moe_runs, family, precision):
    """TE's grouped GEMM experts (``TEGroupedMLP``: one ``GroupedLinear`` of ``weight0..N``)
    against a ``SequentialMLP`` of TE linears (one GEMM per expert), same TE attention, same
    weights and data: losses, log-probs, ``moe/aux_loss`` and every gradient (the router's and
    each expert's included), then the later steps.

    fp32: FP32's bounds (the same products, summed in another order by cuBLAS' grouped kernel).
    bf16: BF16's bounds. Both paths round the same inputs to bf16 and accumulate in fp32; what
    differs is the order of the fp32 sums and hence which bf16 roundings of the expert outputs
    happen (a few u, as for TE vs SDPA above). Those ~u differences reach the next layer's router
    (also bf16) and may flip a near-tied top-2 choice for a token; one flipped token of the ~1,500
    per step changes an expert's gradient by ~1/750 of a sum of O(1) terms, far below BF16's 1e-1
    of the largest entry, while a wrong expert-to-weight mapping (``weight{i}`` loaded into
    expert j) or routing weight moves every scalar by O(0.1)."""
    tol = FP32 if precision == "fp32" else BF16
    got = moe_runs[f"moe_{family}_{precision}_grouped"]
    ref = moe_runs[f"moe_{family}_{precision}_seq"]
    assert got["attention"] == ref["attention"] == "te"
    assert any(".local_experts.3.linear_fc1." in n for n in got["grads"])
    # One checkpoint for both: TEGroupedMLP's weight{i} are stored as SequentialMLP's experts.
    assert got["checkpoint_layout"] == ref["checkpoint_layout"]
    assert any("mlp.experts.experts.linear_fc1.weight" in k for k, *_ in got["checkpoint_layout"])
    _check(got, ref, **tol)
    for g, r in zip(got["steps"], ref["steps"]):
        assert (
            g["moe/aux_loss"] > 0
            and abs(g["moe/aux_loss"] - r["moe/aux_loss"]) <= tol["scalar_atol"]
        ), (g, r)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (EP2)")
def test_moe_grouped_gemm_at_ep2_matches_ep1(moe_runs):
    """EP2 (2 ranks, NCCL all-to-all; experts 0-1 on rank 0) with grouped GEMM against EP1 with
    grouped GEMM, bf16: BF16's bounds (the experts see the same tokens; only the dense part's
    data-parallel gradient reduce is added). Gradients compared on rank 0's parameters."""
    out, data = moe_runs["_out"], moe_runs["_data"]
    r = torchrun(2, [__file__, str(out), str(data), *MOE_EP2])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = torch.load(out / f"{MOE_EP2[0]}.pt")
    ref = dict(moe_runs[MOE_EP2[0].removesuffix("_ep2")])
    assert ".mlp.experts.local_experts.2.linear_fc1.weight" not in " ".join(got["grads"])
    ref["grads"] = {n: g for n, g in ref["grads"].items() if n in got["grads"]}
    assert len(ref["grads"]) == len(got["grads"])
    _check(got, ref, **BF16)


def test_cuda_vocab_parallel_logprobs_match_cpu():
    from megatron_simpo.logprobs import vocab_parallel_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 130, generator=g) * 5  # vocab 120, padded to 130
    targets = torch.randint(0, 120, (3, 7), generator=g)
    ref = torch.log_softmax(logits[..., :120].double(), -1)
    ref = ref.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = vocab_parallel_logprobs(logits.cuda(), targets.cuda(), vocab_size=120)
    # fp32 log-softmax on the GPU vs a float64 reference: ~1e-6 relative for |logits| ~ 15.
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_cli_trains_saves_and_resumes_on_cuda(tmp_path):
    """``train`` under torchrun on CUDA/NCCL in bf16: 2 iterations and a checkpoint, then the
    same command with --train-iters 3 resumes from it (dist-checkpointing on the GPU)."""
    base = ["-m", "megatron_simpo", "train", "--config", "examples/tiny_pretok.yaml"]
    base += ["--precision", "bf16", "--save", str(tmp_path / "ckpt"), "--log-interval", "1"]
    runs = []
    for iters in (2, 3):
        tb = tmp_path / f"tb{iters}"
        r = torchrun(1, [*base, "--train-iters", str(iters), "--tensorboard-dir", str(tb)])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        rows = [json.loads(x) for x in (tb / "metrics.jsonl").read_text().splitlines()]
        runs.append((r.stdout, rows))
    (_, rows1), (second, rows2) = runs
    assert [r["iteration"] for r in rows1] == [1, 2] and [r["iteration"] for r in rows2] == [3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows1 + rows2)
    assert f"resuming {tmp_path / 'ckpt'} (iteration 2)" in second, second[-2000:]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


if __name__ == "__main__":
    from megatron_simpo import parallel

    out_dir, data_path, *names = sys.argv[1:]
    parallel.init_distributed()
    for variant in names:
        train_variant(variant, data_path, Path(out_dir))
