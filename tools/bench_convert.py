"""Benchmark of checkpoint conversion both ways on a random ~1.5B Llama: wall time and peak RSS.

    python tools/bench_convert.py [--workdir /tmp/bench_convert] [--keep]

Writes a random bf16 Llama HF directory (hidden 2048, 24 layers, GQA 16/8 heads, SwiGLU 8192,
vocab 32000: 1.64B parameters, 3.3 GB) shard by shard (never the whole model in memory), then
runs ``convert hf-to-mcore`` and ``convert mcore-to-hf`` as separate processes, sampling each
one's resident memory every 20 ms. Prints a table and a projection for Llama-3-70B.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

CFG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def write_model(out: Path) -> int:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    h, f, v, n = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"], 24
    kv = h // CFG["num_attention_heads"] * CFG["num_key_value_heads"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    shards = [
        {
            "model.embed_tokens.weight": rand(v, h),
            "lm_head.weight": rand(v, h),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
    ]
    for i in range(n):
        p = f"model.layers.{i}."
        shards.append(
            {
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(f, h),
                p + "mlp.up_proj.weight": rand(f, h),
                p + "mlp.down_proj.weight": rand(h, f),
            }
        )
    weight_map, total, params = {}, 0, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * 2
            params += t.numel()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (out / "config.json").write_text(json.dumps(CFG))
    return params


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    err = proc.stderr.read()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return time.perf_counter() - start, peak / 2**30


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/bench_convert")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    params = write_model(work / "hf")
    base = [sys.executable, "-m", "megatron_simpo", "convert"]
    idle = measure(
        [
            sys.executable,
            "-c",
            "import megatron_simpo.convert.export, megatron.core.dist_checkpointing",
        ]
    )
    imp = measure(
        [*base, "hf-to-mcore", "--hf-dir", str(work / "hf"), "--save", str(work / "mcore")]
    )
    exp = measure(
        [
            *base,
            "mcore-to-hf",
            "--load",
            str(work / "mcore"),
            "--hf-dir",
            str(work / "back"),
            "--max-shard-size",
            "1GB",
        ]
    )
    size = du(work / "hf")
    largest = CFG["vocab_size"] * CFG["hidden_size"] * 2 / 2**30
    print(
        f"model: {params / 1e9:.2f}B parameters, {size:.2f} GiB bf16 on disk; largest tensor "
        f"(embedding) {largest:.3f} GiB; imports alone: {idle[1]:.2f} GiB RSS\n"
    )
    print(
        "| direction | wall s | peak RSS GiB | peak / model size | (peak - imports) / largest "
        "tensor |\n|---|---|---|---|---|"
    )
    for name, (wall, peak) in (("hf-to-mcore", imp), ("mcore-to-hf", exp)):
        print(
            f"| {name} | {wall:.1f} | {peak:.2f} | {peak / size:.2f} | "
            f"{(peak - idle[1]) / largest:.1f} |"
        )
    # Projection: the peak above the imports is a fixed buffer (torch DCP's in-flight writes /
    # the safetensors shard being filled) plus about two copies of the largest tensor (as read
    # and as converted). Only the latter grows with the model.
    emb70 = 128256 * 8192 * 2 / 2**30
    for name, (_, peak) in (("hf-to-mcore", imp), ("mcore-to-hf", exp)):
        fixed = peak - idle[1] - 2 * largest
        print(
            f"70B projection ({name}, Llama-3-70B bf16, 131 GiB; largest tensor {emb70:.2f} "
            f"GiB): {idle[1]:.2f} + {fixed:.2f} (buffers) + 2 x {emb70:.2f} = "
            f"{idle[1] + fixed + 2 * emb70:.1f} GiB peak RSS"
        )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
