"""``megatron-simpo score-reference`` at TP2, PP2 and DP2 in one process group of 2 ranks.

    torchrun --nproc-per-node 2 tests/distributed/score_reference_runner.py CKPT ROOT

``ROOT/<layout>`` are copies of one prepared dataset (``dp2``'s already scored at TP1: ``--force``
scores it again); each is scored in place by the real command (``cli.main``) at its layout, one
after the other (Megatron's groups are rebuilt between them, the torch.distributed world stays).
"""

from __future__ import annotations

import sys

from megatron_simpo import parallel

LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2": [],  # TP1 PP1 on 2 ranks: data parallel
}


def main() -> None:
    ckpt, root = sys.argv[1], sys.argv[2]
    parallel.init_distributed()
    from megatron_simpo.cli import main as cli_main

    for name, flags in LAYOUTS.items():
        # micro-batch 3: 12 pairs per DP2 rank make 4 micro-batches, TP2/PP2 score 8 of them.
        args = ["score-reference", "--load", ckpt, "--data", f"{root}/{name}"]
        args += [
            "--seq-length",
            "32",
            "--micro-batch-size",
            "3",
            "--precision",
            "fp32",
            "--force",
            *flags,
        ]
        rc = cli_main(args)
        assert rc == 0, (name, rc)


if __name__ == "__main__":
    main()
