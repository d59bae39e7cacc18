"""Greedy generation of a converted HF model at several layouts inside ONE torch.distributed
world (``tests/test_generate.py`` compares every layout with ``transformers``).

    torchrun --nproc-per-node 4 tests/distributed/generate_runner.py --hf HF_DIR --work DIR \\
        --spec SPEC.json --out OUT.json [--hf-moe HF_MOE_DIR] L1 L2 ...

SPEC holds ``prompts``, ``eos_id`` and ``max_new_tokens``; each layout generates them with that
EOS and without one (``no_eos``, where ``long_prompt`` is added: it must stop at
``max_position_embeddings``). Each layout runs on DDP-wrapped chunks whose gradient buffers hold
noise, as mid-training; the runner asserts that generation leaves buffers, weights, RNG states and
train modes untouched and that every rank returns the same ids, and checks the vocab-parallel
argmax on crafted logits (padding, ties across ranks). Rank 0 writes OUT.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megatron_simpo import parallel

parallel.init_distributed()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker  # noqa: E402

from megatron_simpo import checkpointing  # noqa: E402
from megatron_simpo.cli import checkpoint_model_config  # noqa: E402
from megatron_simpo.config import RunConfig  # noqa: E402
from megatron_simpo.convert.hf import hf_to_mcore  # noqa: E402
from megatron_simpo.generate import greedy_generate, vocab_parallel_argmax  # noqa: E402
from megatron_simpo.model import build_model, wrap_ddp  # noqa: E402

#: name -> (parallel-section overrides, train-section overrides); data-parallel size: the rest
#: of the 4 ranks. Attention is SDPA (the CPU default) except in pp2 (Megatron's local one).
LAYOUTS: dict[str, tuple[dict, dict]] = {
    "tp1": ({}, {}),
    "tp2": ({"tensor_model_parallel_size": 2}, {}),
    "pp2": ({"pipeline_model_parallel_size": 2}, {"attention_backend": "local"}),
    "tp2_pp2": ({"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, {}),
    "pp2_vpp2": (
        {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1},
        {},
    ),
    "tp2_sp": ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, {}),
    "tp2_sp_fused_head": (
        {"tensor_model_parallel_size": 2, "sequence_parallel": True},
        {"fused_loss_head": True},
    ),
    # The mixture-of-experts model (--hf-moe): Megatron's MoE layer, alltoall dispatcher.
    "moe_tp1": ({}, {}),
    "moe_ep2": ({"expert_model_parallel_size": 2}, {}),
}


def layout_config(load: Path, layout: str) -> RunConfig:
    cfg = RunConfig()
    cfg.model = checkpoint_model_config(str(load))
    par, train = LAYOUTS[layout]
    for k, v in par.items():
        setattr(cfg.parallel, k, v)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    cfg.train.precision = "fp32"
    cfg.train.load = str(load)
    return cfg


def snapshot(model: list) -> dict:
    return {
        "grads": [b.grad_data.clone() for c in model for b in c.buffers],
        "params": [p.detach().clone() for c in model for p in c.parameters()],
        "modes": [m.training for c in model for m in c.modules()],
        "cpu_rng": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }


def assert_same_state(before: dict, after: dict, layout: str) -> None:
    for key in ("grads", "params"):
        for x, y in zip(before[key], after[key], strict=True):
            assert torch.equal(x, y), f"{layout}: generation changed the {key}"
    assert before["modes"] == after["modes"], f"{layout}: train/eval modes not restored"
    assert torch.equal(before["cpu_rng"], after["cpu_rng"]), f"{layout}: torch RNG advanced"
    assert before["tracker"].keys() == after["tracker"].keys()
    for k, v in before["tracker"].items():
        assert torch.equal(v, after["tracker"][k]), f"{layout}: RNG tracker state {k} changed"


def check_vocab_parallel_argmax() -> None:
    """The TP argmax against ``torch.argmax`` of the whole masked vocabulary, on logits where
    the largest value sits in the padding and a tie straddles two ranks' slices."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    part = 16
    padded, vocab_size = part * tp, part * tp - 3
    g = torch.Generator().manual_seed(11)
    full = torch.randn(6, padded, generator=g)
    full[0, vocab_size:] = 100.0  # padding must never win
    if tp > 1:
        full[1, part - 1] = full[1, part] = 50.0  # tie across ranks 0 and 1: lower id wins
    full[2, :] = 0.0  # all equal: id 0
    want = full[:, :vocab_size].argmax(-1)
    mine = full[:, rank * part : (rank + 1) * part]
    got = vocab_parallel_argmax(mine, vocab_size, ps.get_tensor_model_parallel_group())
    assert torch.equal(got, want), (got, want)
    assert tp == 1 or int(got[1]) == part - 1


def run_layout(layout: str, load: Path, spec: dict) -> dict:
    cfg = layout_config(load, layout)
    parallel.init_model_parallel_for(cfg)
    model = wrap_ddp(build_model(cfg), cfg)
    checkpointing.load_checkpoint(load, model)
    check_vocab_parallel_argmax()
    for chunk in model:
        chunk.train()
        for b in chunk.buffers:
            b.grad_data.normal_()  # stands in for gradients accumulated mid-iteration
    before = snapshot(model)
    start = time.perf_counter()
    n, prompts = spec["max_new_tokens"], spec["prompts"]
    eos = spec["moe_eos_id"] if layout.startswith("moe_") else spec["eos_id"]
    with_eos = greedy_generate(model, cfg, prompts, n, eos)
    no_eos = greedy_generate(model, cfg, prompts + [spec["long_prompt"]], n, None)
    wall = time.perf_counter() - start
    assert_same_state(before, snapshot(model), layout)
    result = {"with_eos": with_eos, "no_eos": no_eos}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    assert all(e == result for e in everyone), f"{layout}: ranks disagree: {everyone}"
    parallel.destroy_model_parallel()
    return {**result, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hf-moe", help="a mixture-of-experts HF model, for the moe_* layouts")
    ap.add_argument("layouts", nargs="+", choices=LAYOUTS)
    args = ap.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    # The converter is single-process but sets up (collective) model-parallel groups, so every
    # rank converts, into its own directory: a fraction of a second for this model, where a
    # separate converter process would cost ~10 s of start-up.
    load = Path(args.work) / f"ckpt_rank{dist.get_rank()}"
    hf_to_mcore(args.hf, load)
    if args.hf_moe:
        load_moe = Path(args.work) / f"ckpt_moe_rank{dist.get_rank()}"
        hf_to_mcore(args.hf_moe, load_moe)
    out: dict = {"layouts": {}}
    for layout in args.layouts:
        ckpt = load_moe if layout.startswith("moe_") else load
        out["layouts"][layout] = run_layout(layout, ckpt, spec)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
