"""What one iteration reports besides the loss: lengths, peak memory, model TFLOP/s and MFU, and
the generation probe's console and TensorBoard text."""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_simpo import flops
from megatron_simpo.config import ModelConfig


def peak_memory_gib() -> float:
    """Peak memory of this process so far: allocated CUDA memory on GPU (what the model, optimizer
    and activations hold), the peak resident set size (RSS) on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def throughput_and_memory(
    model_cfg: ModelConfig,
    micro_batches: list[dict],
    seconds: float,
    peak_tflops: float | None,
) -> dict[str, float]:
    """Min/max response lengths, peak memory (worst rank), model TFLOP/s per device and MFU of
    one iteration (collective; see ``flops.py``: the work actually computed, each sequence's
    input positions, a prefix-shared prompt once, no padding)."""
    lengths = torch.cat([mb["lengths"].view(2, -1) for mb in micro_batches], dim=1).float()
    inputs = torch.cat([mb["seq_tokens"].view(2, -1) - 1 for mb in micro_batches], dim=1)
    no_sharing = [torch.zeros_like(mb["weights"], dtype=torch.long) for mb in micro_batches]
    shared = torch.cat([mb.get("shared_prefix", z) for mb, z in zip(micro_batches, no_sharing)])
    local_flops = flops.pairs_training_flops(
        model_cfg, inputs[0].tolist(), inputs[1].tolist(), shared.tolist()
    )
    # Over the scored pairs (positive weight), like the mean lengths; padding rows
    # (lengths 0) never hold a pair, but guard anyway.
    weights = torch.cat([mb["weights"] for mb in micro_batches])
    real = (lengths > 0) & (weights > 0)
    big = torch.tensor(float("inf"))
    local = torch.stack(
        [
            torch.where(real[0], lengths[0], -big).max(),
            torch.where(real[1], lengths[1], -big).max(),
            -torch.where(real[0], lengths[0], big).min(),
            -torch.where(real[1], lengths[1], big).min(),
            torch.tensor(peak_memory_gib()),
        ]
    ).double()
    local = torch.cat([local, torch.tensor([float(local_flops)], dtype=torch.float64)])
    # One collective for both reductions: every rank's values, then the max over the world
    # (lengths, memory) and the sum over this rank's data-parallel group (FLOPs: integers, exact
    # in float64 in any order below 2**53; a metric, never fed back into training).
    if torch.cuda.is_available():
        local = local.cuda()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    every = torch.stack(gathered).cpu()  # [world, 6]
    dp_ranks = dist.get_process_group_ranks(ps.get_data_parallel_group())
    e = every[:, :5].max(dim=0).values.tolist()
    total = every[dp_ranks, 5].sum()
    out = {
        "length/chosen_max": e[0],
        "length/rejected_max": e[1],
        "length/chosen_min": -e[2],
        "length/rejected_min": -e[3],
        "memory/peak_gib": e[4],
        "model_flops": total.item(),
        "tflops_per_gpu": flops.tflops_per_gpu(total.item(), seconds, dist.get_world_size()),
    }
    if peak_tflops:
        out["mfu"] = out["tflops_per_gpu"] / peak_tflops
    return out


def gen_line(iteration: int, m: dict[str, float], texts: list[str]) -> str:
    """The console line of a generation probe: its metrics and the first continuation."""
    first = texts[0][:120].replace("\n", " ") if texts else ""
    return (
        f"gen @ iter {iteration} | mean length {m['gen/mean_length']:.1f} | "
        f"repetition {m['gen/repetition']:.3f} | eos {m['gen/eos_fraction']:.2f} | {first!r}"
    )


def markdown_texts(texts: list[str]) -> str:
    """The probe's continuations as a numbered Markdown list (TensorBoard's text tab)."""
    return "\n\n".join(f"**{i}.** {t}" for i, t in enumerate(texts, 1))
