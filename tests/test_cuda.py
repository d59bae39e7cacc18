"""Checks that need a CUDA device (skipped on CPU; run by ``benchmarks/gpu_check.sh`` when a GPU
machine is lent): the same SimPO steps on CUDA/NCCL as on CPU/gloo, SDPA vs Megatron's local
attention on the GPU kernels, and the vocab-parallel log-probs on CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = ["-m", "megatron_simpo", "train", "--config", "examples/tiny_pretok.yaml"]
STEPS += ["--train-iters", "3", "--precision", "fp32", "--lr", "3e-3"]


def _losses(tmp_path, name, args, env=None):
    tb = tmp_path / name
    r = torchrun(1, [*STEPS, *args, "--tensorboard-dir", str(tb)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x)["loss"] for x in (tb / "metrics.jsonl").read_text().splitlines()]


def test_cuda_steps_match_cpu(tmp_path):
    gpu = _losses(tmp_path, "gpu", ["--attention-backend", "local"])
    cpu = _losses(tmp_path, "cpu", ["--attention-backend", "local"], {"CUDA_VISIBLE_DEVICES": ""})
    sdpa = _losses(tmp_path, "sdpa", ["--attention-backend", "sdpa"])
    # fp32 on both devices (TF32 off by default for matmuls in torch): different kernels and
    # reduction orders, ~1e-6 relative per op; 3 Adam steps keep it far below 1e-3 while a wrong
    # kernel path (mask, scale, GQA mapping) moves these ~1.3 losses by > 1e-2.
    for a, b, c in zip(gpu, cpu, sdpa):
        assert abs(a - b) < 1e-3 and abs(a - c) < 1e-3, (gpu, cpu, sdpa)


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
