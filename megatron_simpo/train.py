"""``megatron-simpo train``: SimPO with Megatron-Core (TP / PP / virtual PP / DP, SP, distributed
optimizer). The loop is ``trainer.Trainer``; one step is ``step.train_step``.

Run (CPU, gloo; the same command runs on CUDA/NCCL)::

    torchrun --nproc-per-node 2 -m megatron_simpo train --config examples/tiny_pretok.yaml \\
        --tensor-model-parallel-size 2 --train-iters 5

    torchrun --nproc-per-node 4 -m megatron_simpo train --config examples/tiny_pretok.yaml \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
"""

from __future__ import annotations

import torch.distributed as dist

from megatron_simpo import parallel, run_control
from megatron_simpo.config import RunConfig
from megatron_simpo.data import prepare_for_run
from megatron_simpo.trainer import Trainer

__all__ = ["Trainer", "run"]


def run(cfg: RunConfig) -> list[dict[str, float]]:
    """Entry point of ``megatron-simpo train``: initialise, train, tear down."""
    prepare_for_run(cfg)  # before the process group: tokenising may outlast its timeout
    parallel.init_distributed(cfg.parallel.distributed_timeout_minutes)
    trainer = Trainer(cfg)
    trainer.setup()
    history = trainer.train()
    parallel.destroy_model_parallel()
    if trainer.requeue_wanted:
        # Last: `scontrol requeue` cancels the job step at once, so everything is saved and
        # torn down first.
        dist.barrier()
        run_control.requeue()
    return history
