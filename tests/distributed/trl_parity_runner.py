"""Our per-pair and batch results of every objective on TRL's token ids, at TP1 and TP2.

    torchrun --nproc-per-node 2 tests/distributed/trl_parity_runner.py --root DIR

``DIR/ckpt`` is the converted policy; ``DIR/cases.json`` a list of ``{"name", "loss" (LossConfig
fields), "pairs" (prompt_ids, chosen_ids, rejected_ids and, for the DPO family, ref_chosen_logp,
ref_rejected_logp)}``. For each layout (tp1: data parallel over the 2 ranks; tp2; tp1_bf16: tp1
with bf16 params, log-probs accumulated in fp32 as in training) each case is scored by
``evaluate``'s machinery (``score_pairs``, ``summarize``) into
``DIR/<name>_<layout>.json`` (``per_pair`` rows and the batch ``summary``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_simpo import parallel

parallel.init_distributed()

import torch.distributed as dist  # noqa: E402

from megatron_simpo import checkpointing  # noqa: E402
from megatron_simpo.cli import checkpoint_model_config  # noqa: E402
from megatron_simpo.config import LossConfig, RunConfig  # noqa: E402
from megatron_simpo.data import Pair  # noqa: E402
from megatron_simpo.evaluate import score_pairs, summarize  # noqa: E402
from megatron_simpo.model import build_model  # noqa: E402

#: name -> (tensor-parallel size, precision).
LAYOUTS = {"tp1": (1, "fp32"), "tp2": (2, "fp32"), "tp1_bf16": (1, "bf16")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    root = Path(ap.parse_args().root)
    cases = json.loads((root / "cases.json").read_text())
    for layout, (tp, precision) in LAYOUTS.items():
        cfg = RunConfig()
        cfg.model = checkpoint_model_config(str(root / "ckpt"))
        cfg.parallel.tensor_model_parallel_size = tp
        cfg.train.precision = precision
        cfg.train.micro_batch_size = 2
        cfg.train.load = str(root / "ckpt")
        parallel.init_model_parallel(tp, 1, None, seed=0)
        model = build_model(cfg)
        checkpointing.load_checkpoint(cfg.train.load, model)
        for case in cases:
            cfg.loss = LossConfig(**case["loss"])
            cfg.loss.validate()
            pairs = [
                Pair(**{k: tuple(v) if k.endswith("_ids") else v for k, v in p.items()})
                for p in case["pairs"]
            ]
            rows = score_pairs(model, cfg, pairs)
            if rows is not None:
                out = {"per_pair": rows, "summary": summarize(rows, cfg.loss)}
                (root / f"{case['name']}_{layout}.json").write_text(json.dumps(out))
        parallel.destroy_model_parallel()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
