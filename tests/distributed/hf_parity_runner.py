"""Megatron logits and ``evaluate`` results of converted HF models, at several layouts.

    torchrun --nproc-per-node N tests/distributed/hf_parity_runner.py --root DIR \\
        [--convert] --layouts L1 L2 --variants V1 V2 ... [--evaluate DATA]

``DIR/<variant>/hf`` holds a Hugging Face model. With ``--convert`` (world of one) each is
converted to ``DIR/<variant>/ckpt``. Then, at the layout, each checkpoint is loaded and its full
(vocab-gathered, unpadded) logits on ``DIR/input_ids.pt`` are written to
``DIR/<variant>/logits_<layout>.pt``; with ``--evaluate`` the first variant is also evaluated on
DATA (beta 2.5, gamma 0.7) into ``DIR/<variant>/eval_<layout>.json``.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from megatron_simpo import parallel

parallel.init_distributed()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402

from megatron_simpo import checkpointing  # noqa: E402
from megatron_simpo.cli import checkpoint_model_config  # noqa: E402
from megatron_simpo.config import RunConfig  # noqa: E402
from megatron_simpo.model import build_model  # noqa: E402

#: name -> (TP, PP, EP, sequence parallel); EP layouts are for mixture-of-experts models (the
#: dense layers are data-parallel over the EP ranks, each holding the whole batch here).
LAYOUTS = {
    "tp1": (1, 1, 1, False),
    "tp2": (2, 1, 1, False),
    "pp2": (1, 2, 1, False),
    "tp2_pp2": (2, 2, 1, False),
    "tp2_sp": (2, 1, 1, True),
    "ep2": (1, 1, 2, False),
    "ep2_pp2": (1, 2, 2, False),
    "ep2_tp2_etp1": (2, 1, 2, True),
}


def layout_config(ckpt: Path, layout: str) -> RunConfig:
    cfg = RunConfig()
    cfg.model = checkpoint_model_config(str(ckpt))
    p = cfg.parallel
    tp, p.pipeline_model_parallel_size, p.expert_model_parallel_size, sp = LAYOUTS[layout]
    p.tensor_model_parallel_size, p.sequence_parallel = tp, sp
    p.expert_tensor_parallel_size = 1 if sp else None
    cfg.train.precision = "fp32"
    cfg.train.load = str(ckpt)
    return cfg


def logits_of(cfg: RunConfig, input_ids: torch.Tensor) -> torch.Tensor | None:
    parallel.init_model_parallel_for(cfg)
    model = build_model(cfg)
    checkpointing.load_checkpoint(cfg.train.load, model)
    b, s = input_ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)

    def forward_step(it, m):
        out = m(next(it), pos, None)

        def collect(output):
            full = gather_from_tensor_model_parallel_region(output)
            return output.sum() * 0, {"logits": full[..., : cfg.model.vocab_size].detach()}

        return out, partial(collect)

    with torch.no_grad():
        data = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([input_ids]),
            model=model[0],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    parallel.destroy_model_parallel()
    return data[0]["logits"] if data else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--layouts", nargs="+", required=True, choices=LAYOUTS)
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--convert", action="store_true")
    ap.add_argument("--evaluate")
    args = ap.parse_args()
    root = Path(args.root)
    if args.convert:
        from megatron_simpo.convert.hf import hf_to_mcore

        for v in args.variants:
            hf_to_mcore(root / v / "hf", root / v / "ckpt")
    input_ids = torch.load(root / "input_ids.pt", weights_only=True)
    for layout in args.layouts:
        for v in args.variants:
            logits = logits_of(layout_config(root / v / "ckpt", layout), input_ids)
            if logits is not None and ps_rank_writes():
                torch.save(logits, root / v / f"logits_{layout}.pt")
            dist.barrier()
        if args.evaluate:
            from megatron_simpo.evaluate import evaluate

            v = args.variants[0]
            cfg = layout_config(root / v / "ckpt", layout)
            cfg.data.data_path = args.evaluate
            cfg.train.micro_batch_size = 3
            cfg.loss.beta, cfg.loss.simpo_gamma = 2.5, 0.7
            evaluate(cfg, str(root / v / f"eval_{layout}.json"))
    dist.destroy_process_group()


def ps_rank_writes() -> bool:
    # The logits exist on every TP rank of the last stage after the gather; one writes them.
    return dist.get_rank() == dist.get_world_size() - 1


if __name__ == "__main__":
    main()
