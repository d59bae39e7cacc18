"""SimPO training with Megatron-Core (TP / PP / virtual PP / DP, SP, distributed optimizer).

Run (CPU, gloo; the same command runs on CUDA/NCCL)::

    torchrun --nproc-per-node 2 -m megatron_simpo train --config examples/tiny_pretok.yaml \\
        --tensor-model-parallel-size 2 --train-iters 5

    torchrun --nproc-per-node 4 -m megatron_simpo train --config examples/tiny_pretok.yaml \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_simpo import checkpointing, parallel
from megatron_simpo.config import RunConfig
from megatron_simpo.data import PairBatcher, Subset, pairs_for, split_heldout
from megatron_simpo.metrics import MetricsWriter, console_line, eval_line
from megatron_simpo.model import build_model, model_dtype, wrap_ddp
from megatron_simpo.step import train_step


def is_logging_rank() -> bool:
    """First rank of the last pipeline stage (the one that holds the loss)."""
    return (
        ps.is_pipeline_last_stage()
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )


def build_optimizer(cfg: RunConfig, model: list):
    """Megatron-Core optimizer (AdamW; distributed if configured) and LR scheduler."""
    o, t = cfg.optim, cfg.train
    dtype = model_dtype(cfg)
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, model)
    decay_iters = max(t.train_iters, o.lr_warmup_iters + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.lr_warmup_iters else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=decay_iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


class Trainer:
    """Owns the model chunks, optimizer, data and the loop; one per parallel layout."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.iteration = 0
        self.consumed_pairs = 0

    def setup(self) -> None:
        cfg = self.cfg
        cfg.validate(world_size=dist.get_world_size())
        p = cfg.parallel
        parallel.init_model_parallel_for(cfg)
        # Read (and validate) the data before building anything expensive.
        pairs = pairs_for(cfg, cfg.data.data_path)
        self.eval_pairs = None
        if cfg.data.eval_data_path:
            self.eval_pairs = pairs_for(cfg, cfg.data.eval_data_path)
        elif cfg.data.eval_split_ratio:
            pairs, self.eval_pairs = split_heldout(pairs, cfg.data.eval_split_ratio, cfg.train.seed)
        self.batcher = PairBatcher(
            pairs,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            seed=cfg.train.seed,
            pad_multiple=p.tensor_model_parallel_size if p.sequence_parallel else 1,
            uniform_length=p.pipeline_model_parallel_size > 1,
        )
        chunks = build_model(cfg)
        self.model = wrap_ddp(chunks, cfg)
        chunks[0].config.finalize_model_grads_func = finalize_model_grads
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        # The same command is requeue-safe: a checkpoint already under --save wins over --load.
        source = cfg.train.load
        if cfg.train.save and checkpointing.checkpoint_dir(cfg.train.save) is not None:
            source = cfg.train.save
        if source:
            info = checkpointing.load_checkpoint(source, self.model, self.optimizer, self.scheduler)
            if dist.get_rank() == 0:
                kind = "resuming" if info["resumed_optimizer"] else "starting from"
                print(f"{kind} {source} (iteration {info.get('iteration', 0)})", flush=True)
            if info["resumed_optimizer"]:
                self.iteration = int(info.get("iteration", 0))
                self.consumed_pairs = int(info.get("consumed_pairs", 0))

    def step(self, after_backward: Callable[[], None] | None = None) -> dict[str, float]:
        """One optimizer step on the next global batch (see ``step.train_step``)."""
        start = time.perf_counter()
        micro_batches, seq_len = self.batcher.micro_batches(self.iteration)
        metrics = train_step(
            self.model,
            self.optimizer,
            self.scheduler,
            micro_batches,
            seq_len,
            self.cfg.loss,
            self.cfg.model.vocab_size,
            after_backward,
        )
        self.iteration += 1
        self.consumed_pairs += self.cfg.train.global_batch_size
        dt = time.perf_counter() - start
        metrics.update(
            iteration_time=dt,
            tokens_per_sec=metrics["tokens"] / dt,
            pairs_per_sec=metrics["pairs"] / dt,
            consumed_pairs=float(self.consumed_pairs),
        )
        return metrics

    def evaluate_heldout(self) -> dict[str, float]:
        """SimPO metrics on the held-out pairs (``eval/`` prefix), on the logging rank (empty
        elsewhere); collective."""
        from megatron_simpo.evaluate import score_pairs, summarize

        pairs = self.eval_pairs
        if self.cfg.logging.eval_iters is not None:
            n = min(len(pairs), self.cfg.logging.eval_iters * self.cfg.train.global_batch_size)
            pairs = Subset(pairs, list(range(n)))
        rows = score_pairs(self.model, self.cfg, pairs)
        return {f"eval/{k}": v for k, v in summarize(rows).items()} if rows else {}

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (Slurm before a time limit or preemption): finish the iteration,
        checkpoint, exit 0."""
        self._signal: int | None = None
        self._stop_reason = ""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _should_stop(self, start: float) -> bool:
        """Whether any rank got a stop signal or the time limit passed (collective, so every
        rank stops at the same iteration)."""
        limit = self.cfg.train.exit_duration_in_mins
        flags = torch.tensor(
            [
                float(self._signal is not None),
                float(limit is not None and time.time() - start > limit * 60),
            ]
        )
        if torch.cuda.is_available():
            flags = flags.cuda()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            self._stop_reason = "stop signal received (SIGTERM/SIGUSR1)"
        elif flags[1]:
            self._stop_reason = f"--exit-duration-in-mins {limit} reached"
        return bool(flags.any())

    def save(self) -> None:
        checkpointing.copy_hf_side_files(self.cfg.train.load, self.cfg.train.save)
        checkpointing.save_checkpoint(
            self.cfg.train.save,
            self.iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            run_state={"consumed_pairs": self.consumed_pairs, "config": self.cfg.to_dict()},
            keep_last=self.cfg.train.keep_last,
        )

    def train(self) -> list[dict[str, float]]:
        """The loop: steps, logs, periodic and final checkpoints; returns logged metrics."""
        cfg = self.cfg
        t = cfg.train
        log_rank = is_logging_rank()
        writer = MetricsWriter(cfg.logging.tensorboard_dir if log_rank else None, cfg.to_dict())
        history = []
        start = time.time()
        saved_at = self.iteration
        self._install_signal_handlers()
        try:
            while self.iteration < t.train_iters:
                metrics = self.step()
                history.append(metrics)
                it = self.iteration
                ev = cfg.logging.eval_interval
                if self.eval_pairs is not None and ev and (it % ev == 0 or it == t.train_iters):
                    metrics.update(self.evaluate_heldout())
                    if log_rank:
                        print(eval_line(it, metrics), flush=True)
                if it % cfg.logging.log_interval == 0 or it == t.train_iters:
                    if log_rank:
                        writer.write(it, metrics)
                        print(console_line(it, t.train_iters, metrics, start), flush=True)
                if t.save and t.save_interval and it % t.save_interval == 0:
                    self.save()
                    saved_at = it
                if t.exit_interval and it % t.exit_interval == 0:
                    break
                if self._should_stop(start):
                    if dist.get_rank() == 0:
                        print(f"stopping at iteration {it}: {self._stop_reason}", flush=True)
                    break
            if t.save and saved_at != self.iteration:
                self.save()
        finally:
            writer.close()
        return history


def run(cfg: RunConfig) -> list[dict[str, float]]:
    """Entry point of ``megatron-simpo train``: initialise, train, tear down."""
    parallel.init_distributed(cfg.parallel.distributed_timeout_minutes)
    trainer = Trainer(cfg)
    trainer.setup()
    history = trainer.train()
    parallel.destroy_model_parallel()
    return history
