"""The text report of ``megatron-simpo plan`` (``plan.py`` computes; this formats its result).

Every function takes the JSON-able result of :func:`megatron_simpo.plan.plan` (plus the
``objectives`` / ``variants`` blocks ``plan.main`` adds) and returns lines of text.
"""

from __future__ import annotations

from typing import Any

GB = 1e9

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
    params = f"{m['params'] / 1e9:.2f}B parameters"
    if "moe" in m:
        e = m["moe"]
        params += (
            f", {m['active_params'] / 1e9:.2f}B active ({e['num_experts']} experts of width "
            f"{e['expert_ffn']}, top-{e['top_k']}"
            + (f", shared expert {e['shared_ffn']}" if e["shared_ffn"] else "")
            + "; "
        )
    else:
        params += " ("
    lines = [
        f"model: {params}hidden {m['hidden_size']}, "
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
    ]
    if job["lora_rank"]:
        lines.append(
            f"LoRA rank {job['lora_rank']} on {job['lora_target']}: "
            f"{m['adapter_params'] / 1e6:.1f}M adapter parameters ({bpp['weights']} + 4 grads + "
            f"{bpp['optimizer']} Adam bytes each); the frozen base {bpp['weights']} bytes/param, "
            "no gradients, no optimizer state"
        )
    else:
        lines.append(
            f"bytes/param: weights {bpp['weights']} + grads {bpp['gradients']} + Adam "
            f"{bpp['optimizer']} = {bpp['simpo_total']} (SimPO); DPO adds a reference copy, "
            f"+{bpp['reference']} = {bpp['dpo_total']}: SimPO saves "
            f"{bpp['reference'] / bpp['dpo_total']:.0%} of static memory without the distributed "
            "optimizer (a larger share when it shards Adam over DP), plus the reference forward"
        )
    if job["optimizer_cpu_offload"]:
        lines.append(
            "optimizer CPU offload: fp32 master weights + Adam m, v on the host (host GB per "
            "node in the host column), gradients and weights cross PCIe each step"
        )
    fl = result["flops"]
    lines.append(
        f"model FLOPs/step: {fl['step'] / 1e15:.1f} PFLOP (6 x {fl['matmul_params'] / 1e9:.2f}B "
        "matmul params x tokens + causal attention, Megatron-LM's MFU accounting"
        + (f"; routers {fl['router_share']:.2%}" if "moe" in m else "")
        + (f"; prompt of {job['prompt_length']} counted once" if job["prompt_length"] else "")
        + f"); time = that / (GPUs x {job['peak_tflops']:g} TFLOP/s x assumed MFU "
        f"{job['mfu']:.0%} x speed)"
    )
    lines.append("")
    offload = job["optimizer_cpu_offload"]
    head = (
        f"{'#':>3} {'layout':<44} {'mbs':>3} {'m':>4} {'stage':>5} "
        + " ".join(f"{c:>7}" for c in COLUMNS.values())
        + f" {'SimPO':>7} {'DPO':>7}"
        + (f" {'host':>6}" if offload else "")
        + f" {'fits':>5} {'speed':>5} {'s/step':>6} {'head':>7}"
    )
    lines += [
        "per-GPU GB of the worst pipeline stage (stage); m = micro-batches per step; "
        "fits: S = SimPO, D = DPO+ref; speed = relative expected throughput; head = loss head",
        head,
    ]
    for i, r in enumerate(result["layouts"][:top], 1):
        s, d, lay = r["simpo"], r["dpo"], r["layout"]
        fits = ("S" if r["fits_simpo"] else "-") + ("D" if r["fits_dpo"] else "-")
        host = f" {s['host'] * job['gpus_per_node'] / GB:>6.0f}" if offload else ""
        lines.append(
            f"{i:>3} {r['name']:<44} {lay['micro_batch_size']:>3} {lay['num_microbatches']:>4} "
            f"{stage_name(s['stage'], lay['pp']):>5} "
            + " ".join(f"{s[c] / GB:>7.2f}" for c in COLUMNS)
            + f" {s['total'] / GB:>7.2f} {d['total'] / GB:>7.2f}{host} {fits:>5} "
            f"{r['throughput']:>5.2f} {r['step_seconds']:>6.1f} "
            f"{'fused' if r['fused_loss_head'] else 'unfused':>7}"
        )
    hidden = len(result["layouts"]) - top
    if hidden > 0:
        lines.append(f"    ... {hidden} more layouts (--top N to show them, --json for all)")
    if "objectives" in result:
        lines += ["", *format_objectives(result)]
    if "variants" in result:
        lines += ["", *format_variants(result)]
    lines += ["", "verdict: " + result["verdict"]]
    return "\n".join(lines)


def format_objectives(result: dict[str, Any]) -> list[str]:
    o = result["objectives"]
    lines = [
        f"objectives (--loss {result['job_loss']}), each at its best layout; per-GPU GB:",
        f"    {'objective':<28} {'layout':<44} {'weights':>7} {'grads':>7} {'optim':>7} "
        f"{'ref':>7} {'ref-act':>7} {'acts':>7} {'total':>7} {'fits':>4} {'s/step':>6}",
    ]
    for r in o["rows"]:
        lines.append(
            f"    {r['objective']:<28} {r['layout']:<44} "
            + " ".join(
                f"{r[k] / GB:>7.2f}"
                for k in ("weights", "gradients", "optimizer", "reference", "reference_acts")
            )
            + f" {r['activations'] / GB:>7.2f} {r['total'] / GB:>7.2f} "
            f"{'yes' if r['fits'] else 'no':>4} {r['seconds']:>6.1f}"
        )
    t = o["memory"]
    share = t["reference_gb"] / (t["reference_gb"] + t["training_state_gb"])
    lines.append(
        f"    memory: a {t['reference_bytes_per_param']}-byte reference of this model's "
        f"{t['params'] / 1e9:.2f}B parameters is {t['reference_gb']:.0f} GB against "
        f"{t['training_state_gb']:.0f} GB of training state ({t['reference_bytes_per_param']} "
        f"of {t['state_bytes_per_param']} bytes/param, {share:.0%} "
        "of DPO's static memory); per GPU the rows above; DPO+ref also runs a reference "
        "forward each step (4/3 the model FLOPs)"
    )
    sc = o["scoring"]
    if sc is None:
        lines.append("    score-reference: give --num-pairs N for its one-off cost")
    else:
        lines.append(
            f"    score-reference (one-off, forward only): {sc['pairs']:,} pairs = "
            f"{sc['flops'] / 1e18:.2f} EFLOP, ~{sc['seconds'] / 60:.1f} min on these "
            f"{result['job']['world']} GPUs at the assumed MFU (an epoch of training: "
            f"{sc['train_steps']:.0f} steps)"
        )
    return lines


def format_variants(result: dict[str, Any]) -> list[str]:
    job = result["job"]
    where = f"{job['nodes']}x{job['gpus_per_node']} GPUs of {job['gpu_memory_gb']:g} GB"
    lines = [
        f"which SimPO jobs fit on {where} (seq {job['seq_length']}, "
        f"{job['global_batch_size']} pairs/step), best layout of each:",
        f"    {'job':<40} {'fits':>4} {'layout':<44} {'GB/GPU':>7} {'host GB/node':>12} "
        f"{'s/step':>6} {'#fit':>4}",
    ]
    for v in result["variants"]:
        lines.append(
            f"    {v['job']:<40} {'yes' if v['fits'] else 'no':>4} {v['layout']:<44} "
            f"{v['gb_per_gpu']:>7.1f} {v['host_gb_per_node']:>12.0f} {v['step_seconds']:>6.1f} "
            f"{v['layouts_that_fit']:>4}"
        )
    return lines
