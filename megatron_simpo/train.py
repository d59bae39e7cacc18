"""SimPO training with Megatron-Core (TP / PP / virtual PP / DP, SP, distributed optimizer).

Run (CPU, gloo; the same command runs on CUDA/NCCL)::

    torchrun --nproc-per-node 2 -m megatron_simpo train --config examples/tiny_pretok.yaml \\
        --tensor-model-parallel-size 2 --train-iters 5

    torchrun --nproc-per-node 4 -m megatron_simpo train --config examples/tiny_pretok.yaml \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
"""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_simpo import checkpointing, flops, parallel
from megatron_simpo.alarms import DriftMonitor
from megatron_simpo.config import RunConfig
from megatron_simpo.data import PairBatcher, Subset, pairs_for, prepare_for_run, split_heldout
from megatron_simpo.errors import TrainingError
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


#: fp16's first dynamic loss scale. torch.amp's default: from Megatron's 2**32 the scale needs
#: about 20 overflowing (skipped) iterations to come down to what fp16 gradients fit.
FP16_INITIAL_LOSS_SCALE = 2.0**16
#: fp16's smallest loss scale (Megatron's default).
FP16_MIN_LOSS_SCALE = 1.0


def is_loss_scale_search(metrics: dict[str, float]) -> bool:
    """Whether a skipped update was fp16's dynamic loss scaler at work: the loss is finite, the
    scaled gradients overflowed, and the scale (now lowered) is still above its minimum. Such
    skips are counted but do not count towards ``--max-skipped-iters``; once the scale is at its
    minimum they do (the gradients are then non-finite whatever the scale)."""
    scale = metrics.get("loss_scale")
    return scale is not None and scale > FP16_MIN_LOSS_SCALE and math.isfinite(metrics["loss"])


def build_optimizer(cfg: RunConfig, model: list):
    """Megatron-Core optimizer (AdamW; distributed if configured) and LR scheduler.

    The schedules multiply each loss by ``config.grad_scale_func`` before backward; with fp16 the
    optimizer divides the gradients by its dynamic loss scale, so the chunks' configs get the
    optimizer's ``scale_loss`` (as Megatron-LM does). With fp32/bf16 the scale is 1.
    """
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
        initial_loss_scale=FP16_INITIAL_LOSS_SCALE,
        min_loss_scale=FP16_MIN_LOSS_SCALE,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config=opt_cfg, model_chunks=model)
    for chunk in model:
        chunk.config.grad_scale_func = optimizer.scale_loss
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


def peak_memory_gib() -> float:
    """Peak memory of this process so far: allocated CUDA memory on GPU (what the model, optimizer
    and activations hold), the peak resident set size (RSS) on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    """Owns the model chunks, optimizer, data and the loop; one per parallel layout."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.iteration = 0
        self.consumed_pairs = 0
        self.skipped_iters = 0  # updates skipped for a non-finite loss or gradient, in total
        self.peak_tflops = cfg.logging.peak_tflops or flops.detect_peak_tflops(model_dtype(cfg))
        # From the start: a stop signal during setup (data, model, checkpoint load) is honoured
        # after the first iteration instead of killing the process.
        self._install_signal_handlers()
        self._skipped_in_a_row = 0

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
            pack_pairs=cfg.train.pack_pairs,
            prefix_sharing=cfg.train.prefix_sharing,
            capacity=cfg.train.seq_length,
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
        if metrics["update_ok"]:
            self._skipped_in_a_row = 0
        elif is_loss_scale_search(metrics):
            self.skipped_iters += 1
            if dist.get_rank() == 0:
                print(
                    f"iteration {self.iteration}: update skipped, fp16 gradients overflowed; "
                    f"loss scale now {metrics['loss_scale']:g} ({self.skipped_iters} skipped in "
                    "total)",
                    flush=True,
                )
        else:
            self.skipped_iters += 1
            self._skipped_in_a_row += 1
            if dist.get_rank() == 0:
                print(
                    f"iteration {self.iteration}: update skipped, non-finite loss or gradients "
                    f"(loss {metrics['loss']:.4g}; {self._skipped_in_a_row} in a row, "
                    f"{self.skipped_iters} in total)",
                    flush=True,
                )
            limit = self.cfg.train.max_skipped_iters
            if self._skipped_in_a_row >= limit:
                raise TrainingError(
                    f"{limit} consecutive iterations (up to {self.iteration}) had a non-finite "
                    "loss or gradient norm, so their updates were skipped (--max-skipped-iters "
                    f"{limit}). The weights are still those of iteration "
                    f"{self.iteration - limit}; lower --lr, check the data of these "
                    "iterations, or resume from the last checkpoint"
                )
        metrics["skipped_iters"] = float(self.skipped_iters)
        dt = time.perf_counter() - start
        metrics.update(
            iteration_time=dt,
            tokens_per_sec=metrics["tokens"] / dt,
            tokens_per_sec_effective=metrics["tokens_effective"] / dt,
            pairs_per_sec=metrics["pairs"] / dt,
            consumed_pairs=float(self.consumed_pairs),
        )
        metrics.update(self._throughput_and_memory(micro_batches, dt))
        return metrics

    def _throughput_and_memory(self, micro_batches: list[dict], seconds: float) -> dict:
        """Min/max response lengths, peak memory (worst rank), model TFLOP/s per device and MFU
        (see ``flops.py``; the work actually computed: each sequence's input positions, a
        prefix-shared prompt once, no padding)."""
        lengths = torch.cat([mb["lengths"].view(2, -1) for mb in micro_batches], dim=1).float()
        inputs = torch.cat([mb["seq_tokens"].view(2, -1) - 1 for mb in micro_batches], dim=1)
        no_sharing = [torch.zeros_like(mb["weights"], dtype=torch.long) for mb in micro_batches]
        shared = torch.cat([mb.get("shared_prefix", z) for mb, z in zip(micro_batches, no_sharing)])
        local_flops = flops.pairs_training_flops(
            self.cfg.model, inputs[0].tolist(), inputs[1].tolist(), shared.tolist()
        )
        # Over the scored pairs (positive weight), like the mean lengths; padding rows
        # (lengths 0) never hold a pair, but guard anyway.
        weights = torch.cat([mb["weights"] for mb in micro_batches])
        real = (lengths > 0) & (weights > 0)
        big = torch.tensor(float("inf"))
        extremes = torch.stack(
            [
                torch.where(real[0], lengths[0], -big).max(),
                torch.where(real[1], lengths[1], -big).max(),
                -torch.where(real[0], lengths[0], big).min(),
                -torch.where(real[1], lengths[1], big).min(),
                torch.tensor(peak_memory_gib()),
            ]
        ).double()
        total = torch.tensor([float(local_flops)], dtype=torch.float64)
        if torch.cuda.is_available():
            extremes, total = extremes.cuda(), total.cuda()
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        e = extremes.tolist()
        out = {
            "length/chosen_max": e[0],
            "length/rejected_max": e[1],
            "length/chosen_min": -e[2],
            "length/rejected_min": -e[3],
            "memory/peak_gib": e[4],
            "model_flops": total.item(),
            "tflops_per_gpu": flops.tflops_per_gpu(total.item(), seconds, dist.get_world_size()),
        }
        if self.peak_tflops:
            out["mfu"] = out["tflops_per_gpu"] / self.peak_tflops
        return out

    def evaluate_heldout(self) -> dict[str, float]:
        """SimPO metrics on the held-out pairs (``eval/`` prefix), on the logging rank (empty
        elsewhere); collective."""
        from megatron_simpo.evaluate import score_pairs, summarize

        pairs = self.eval_pairs
        if self.cfg.logging.eval_iters is not None:
            n = min(len(pairs), self.cfg.logging.eval_iters * self.cfg.train.global_batch_size)
            pairs = Subset(pairs, list(range(n)))
        rows = score_pairs(self.model, self.cfg, pairs)
        return {f"eval/{k}": v for k, v in summarize(rows, self.cfg.loss).items()} if rows else {}

    def generation_probe(self) -> tuple[dict[str, float], list[str]]:
        """Greedy continuations of the first ``--gen-prompts`` held-out prompts by the policy
        (collective): the ``gen/`` metrics and the texts."""
        from megatron_simpo import generate

        if not hasattr(self, "_probe"):
            lg = self.cfg.logging
            prompts = generate.probe_prompts(self.eval_pairs, lg.gen_prompts)
            tokenizer = generate.load_probe_tokenizer(self.cfg, self.eval_pairs)
            eos = generate.resolve_eos_id(self.cfg, tokenizer, self.eval_pairs)
            self._probe = (prompts, tokenizer, eos)
        prompts, tokenizer, eos = self._probe
        out = generate.greedy_generate(
            self.model, self.cfg, prompts, self.cfg.logging.gen_max_new_tokens, eos
        )
        return generate.probe_metrics(out, eos), generate.decode_texts(out, tokenizer, eos)

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
        drift = DriftMonitor.from_config(cfg.logging)
        history = []
        start = time.time()
        saved_at = self.iteration
        try:
            while self.iteration < t.train_iters:
                self._phase = f"in iteration {self.iteration + 1}"
                metrics = self.step()
                history.append(metrics)
                it = self.iteration
                ev = cfg.logging.eval_interval
                if self.eval_pairs is not None and ev and (it % ev == 0 or it == t.train_iters):
                    metrics.update(self.evaluate_heldout())
                    if log_rank:
                        print(eval_line(it, metrics), flush=True)
                gi = cfg.logging.gen_interval
                if gi and self.eval_pairs is not None and (it % gi == 0 or it == t.train_iters):
                    gen, texts = self.generation_probe()
                    metrics.update(gen)
                    if log_rank:
                        writer.text("gen/texts", _markdown_texts(texts), it)
                        print(_gen_line(it, gen, texts), flush=True)
                logged = it % cfg.logging.log_interval == 0 or it == t.train_iters
                if logged and log_rank:
                    writer.write(it, metrics)
                    print(console_line(it, t.train_iters, metrics, start), flush=True)
                if log_rank and (logged or any(k.startswith("eval/") for k in metrics)):
                    for warning in drift.update(it, metrics):
                        print(f"WARNING: {warning}", flush=True)
                        writer.text("alarms", warning, it)
                if t.save and t.save_interval and it % t.save_interval == 0:
                    self._phase = f"while saving the checkpoint of iteration {it}"
                    self.save()
                    saved_at = it
                if t.exit_interval and it % t.exit_interval == 0:
                    break
                if self._should_stop(start):
                    if dist.get_rank() == 0:
                        print(f"stopping at iteration {it}: {self._stop_reason}", flush=True)
                    break
            if t.save and saved_at != self.iteration:
                self._phase = f"while saving the checkpoint of iteration {self.iteration}"
                self.save()
                saved_at = self.iteration
        except (dist.DistBackendError, dist.DistError, RuntimeError) as e:
            if isinstance(e, TrainingError) or not _is_communication_failure(e):
                raise
            raise TrainingError(
                f"rank {dist.get_rank()}: a collective failed {self._phase} "
                f"after {time.time() - start:.0f} s ({type(e).__name__}: {str(e)[:300]}). "
                "Another rank probably died or stalled: see the first failure in its log. "
                + (
                    f"The checkpoint of iteration {saved_at} under --save {t.save} is intact; "
                    "rerun the same command to resume."
                    if t.save and saved_at
                    else "No checkpoint was written by this run."
                )
            ) from e
        finally:
            writer.close()
        return history

    @property
    def requeue_wanted(self) -> bool:
        """Stopped by a signal or the time limit with ``--slurm-requeue``: the job should go
        back to the queue (done by :func:`run` once everything is torn down)."""
        stopped = (
            self._stop_reason.startswith("stop signal") or "exit-duration" in self._stop_reason
        )
        return self.cfg.train.slurm_requeue and stopped

    def requeue(self) -> None:
        """``scontrol requeue $SLURM_JOB_ID`` from rank 0, once the stop checkpoint is written.

        Never fails the (already checkpointed) run: inside a container (pyxis/enroot) the job
        step usually has no ``scontrol``, or it may be refused. Then one message says so, the
        process exits 0, and the job id is written to ``$MEGATRON_SIMPO_REQUEUE_FILE`` when set:
        the batch script, which runs outside the container, requeues the job after the step
        (``slurm/common.sh``). Without it, Slurm's own ``--requeue`` (preemption) or a
        resubmission of the same command continues the run.
        """
        job = os.environ.get("SLURM_JOB_ID")
        if dist.get_rank() != 0:
            return
        if not job:
            print("--slurm-requeue: no SLURM_JOB_ID (not under Slurm); not requeued", flush=True)
            return
        try:
            done = subprocess.run(
                ["scontrol", "requeue", job], capture_output=True, text=True, timeout=120
            )
        except FileNotFoundError:
            problem = "scontrol not found in this environment (inside a container?)"
        except (OSError, subprocess.SubprocessError) as e:
            problem = f"scontrol requeue {job} could not run ({type(e).__name__}: {e})"
        else:
            if done.returncode == 0:
                print(
                    f"requeued Slurm job {job}: it resumes from --save when it starts again",
                    flush=True,
                )
                return
            problem = f"scontrol requeue {job} failed: {done.stderr.strip()}"
        marker = os.environ.get("MEGATRON_SIMPO_REQUEUE_FILE")
        if marker:
            with open(marker, "w") as f:
                f.write(job)
            then = f"the batch script requeues job {job} after this step ({marker})"
        else:
            then = (
                "relying on Slurm's own --requeue (preemption) or a resubmission of the same "
                "command, which resumes from --save"
            )
        print(f"megatron-simpo: --slurm-requeue: {problem}; {then}", flush=True)


def _gen_line(iteration: int, m: dict[str, float], texts: list[str]) -> str:
    first = texts[0][:120].replace("\n", " ") if texts else ""
    return (
        f"gen @ iter {iteration} | mean length {m['gen/mean_length']:.1f} | "
        f"repetition {m['gen/repetition']:.3f} | eos {m['gen/eos_fraction']:.2f} | {first!r}"
    )


def _markdown_texts(texts: list[str]) -> str:
    return "\n\n".join(f"**{i}.** {t}" for i, t in enumerate(texts, 1))


def _is_communication_failure(e: BaseException) -> bool:
    """Whether an exception raised inside a step is a failed collective (a dead or stalled
    peer) rather than a bug: torch's distributed error types, or gloo/NCCL's messages."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(
        s in text
        for s in ("connection closed by peer", "connection reset", "timed out", "timeout", "nccl")
    )


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
        trainer.requeue()
    return history
