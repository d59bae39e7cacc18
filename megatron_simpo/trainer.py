"""The trainer: a run's model chunks, optimizer, data and loop, for one parallel layout.

The pieces it composes each live in their own module: the step (``step.py``), the optimizer
(``optim.py``), the iteration's report (``report.py``), stops, skips and requeue
(``run_control.py``), checkpoints (``checkpointing.py``), metrics (``metrics.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads

from megatron_simpo import checkpointing, defaults, flops, parallel, report, run_control
from megatron_simpo.adapters import finalize_model_grads as adapters_finalize
from megatron_simpo.adapters import init_magnitudes
from megatron_simpo.alarms import DriftMonitor
from megatron_simpo.config import RunConfig
from megatron_simpo.data import PairBatcher, Subset, pairs_for, split_heldout
from megatron_simpo.data.batching import padding_for
from megatron_simpo.errors import CheckpointError, ConfigError, TrainingError
from megatron_simpo.metrics import MetricsWriter, console_line, eval_line
from megatron_simpo.model import build_model, model_dtype, wrap_ddp
from megatron_simpo.optim import build_optimizer
from megatron_simpo.step import train_step


def lora_sources(cfg: RunConfig, source: str | None) -> tuple[str | None, str | None]:
    """(base checkpoint, adapter-only checkpoint) of a LoRA run, each possibly None: ``--load``
    is the base, or an adapter checkpoint that names its base; ``source`` (``--save`` when it
    has a checkpoint) is an adapter checkpoint. Without ``--load`` the base is the seeded random
    init (benchmarks; such adapters resume at the same layout only)."""
    base, adapter = cfg.train.load, None
    if base is not None:
        info = checkpointing.read_run_state(checkpointing.checkpoint_dir(base) or Path(base))
        if info.get("adapter_only"):
            base, adapter = info.get("lora_base"), cfg.train.load
    if source and source != cfg.train.load:
        adapter = source
    if adapter is not None:
        check_adapter_checkpoint(cfg, adapter, base)
    return base, adapter


def check_adapter_checkpoint(cfg: RunConfig, adapter: str, base: str) -> None:
    """One-line errors for an adapter checkpoint that does not fit this run."""
    ckpt = checkpointing.checkpoint_dir(adapter)
    info = checkpointing.read_run_state(ckpt) if ckpt is not None else {}
    if not info.get("adapter_only"):
        raise CheckpointError(
            f"{adapter}: not an adapter-only checkpoint, but --lora-rank is set; use a new "
            "--save directory (or drop --lora-rank to continue a full fine-tune)"
        )
    saved = info.get("config", {})
    ours = cfg.to_dict()["lora"]
    theirs = saved.get("lora", {})
    diff = [
        f"{k}: checkpoint {theirs.get(k)!r} vs given {v!r}"
        for k, v in ours.items()
        if k != "lora_dropout" and theirs.get(k) != v
    ]
    if diff:
        raise ConfigError(f"{adapter}: its adapters differ from the flags ({'; '.join(diff)})")
    base_ckpt = checkpointing.checkpoint_dir(base) if base else None
    if base_ckpt is None:
        return
    base_model = checkpointing.read_run_state(base_ckpt).get("config", {}).get("model")
    if base_model is not None and saved.get("model") not in (None, base_model):
        raise ConfigError(
            f"--load {base}: the base checkpoint is of another model than the adapters of "
            f"{adapter}; load the base they were trained on"
        )


def is_logging_rank() -> bool:
    """First rank of the last pipeline stage (the one that holds the loss)."""
    return (
        ps.is_pipeline_last_stage()
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )


#: fp16's first dynamic loss scale. torch.amp's default: from Megatron's 2**32 the scale needs


class Trainer:
    """Owns the model chunks, optimizer, data and the loop; one per parallel layout."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.iteration = 0
        self.consumed_pairs = 0
        self.peak_tflops = cfg.logging.peak_tflops or flops.detect_peak_tflops(model_dtype(cfg))
        self.stops = run_control.StopControl(cfg.train.exit_duration_in_mins)
        self.skips = run_control.SkipCounter(cfg.train.max_skipped_iters)
        self._phase = "during setup"
        self.lora_base: str | None = None
        self.async_saves: checkpointing.AsyncSaves | None = None

    def setup(self) -> None:
        self.cfg.validate(world_size=dist.get_world_size())
        # Unset --pack-pairs / --prefix-sharing / --fused-loss-head decided (and logged) here.
        cfg = self.cfg = defaults.resolve_for_run(self.cfg)
        if cfg.train.save and cfg.train.async_save:
            self.async_saves = checkpointing.AsyncSaves()
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
            **padding_for(p, parallel.variable_seq_lengths(cfg)),
            pack_pairs=cfg.train.pack_pairs,
            prefix_sharing=cfg.train.prefix_sharing,
            capacity=cfg.train.seq_length,
        )
        chunks = build_model(cfg)
        lora = cfg.lora.lora_rank is not None
        # The same command is requeue-safe: a checkpoint already under --save wins over --load.
        source = cfg.train.load
        if cfg.train.save and checkpointing.checkpoint_dir(cfg.train.save) is not None:
            source = cfg.train.save
        select = None
        if lora:
            # The frozen base is loaded before DDP and the optimizer exist (they then hold only
            # the adapters); the adapters come from an adapter-only checkpoint, if any.
            base, source = lora_sources(cfg, source)
            self.lora_base = base or ""
            lacked = True  # no base checkpoint: the adapters are fresh
            if base:
                info = checkpointing.load_checkpoint(
                    base, chunks, may_lack=checkpointing.is_adapter_key
                )
                lacked = bool(info["lacked"])
            if source is None and lacked:
                init_magnitudes(chunks)
            select = checkpointing.is_adapter_key
        self.model = wrap_ddp(chunks, cfg)
        finalize = adapters_finalize if lora else finalize_model_grads
        chunks[0].config.finalize_model_grads_func = finalize
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        if source:
            info = checkpointing.load_checkpoint(
                source, self.model, self.optimizer, self.scheduler, select=select
            )
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
        self.skips.record(self.iteration, metrics)
        metrics["skipped_iters"] = float(self.skips.total)
        dt = time.perf_counter() - start
        metrics.update(
            iteration_time=dt,
            tokens_per_sec=metrics["tokens"] / dt,
            tokens_per_sec_effective=metrics["tokens_effective"] / dt,
            pairs_per_sec=metrics["pairs"] / dt,
            consumed_pairs=float(self.consumed_pairs),
        )
        metrics.update(
            report.throughput_and_memory(self.cfg.model, micro_batches, dt, self.peak_tflops)
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

    def save(self) -> None:
        checkpointing.copy_hf_side_files(self.cfg.train.load, self.cfg.train.save)
        checkpointing.save_checkpoint(
            self.cfg.train.save,
            self.iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            run_state={
                "consumed_pairs": self.consumed_pairs,
                "config": self.cfg.to_dict(),
                **({"lora_base": self.lora_base or None} if self.lora_base is not None else {}),
            },
            keep_last=self.cfg.train.keep_last,
            adapter_only=self.lora_base is not None,
            async_saves=self.async_saves,
            fully_parallel=bool(self.cfg.train.fully_parallel_save),
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
        saved_at = first = self.iteration
        try:
            while self.iteration < t.train_iters:
                self._phase = f"in iteration {self.iteration + 1}"
                metrics = self.step()
                history.append(metrics)
                if self.async_saves is not None:  # publish a background save once written
                    self.async_saves.poll()
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
                        writer.text("gen/texts", report.markdown_texts(texts), it)
                        print(report.gen_line(it, gen, texts), flush=True)
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
                if self.stops.should_stop(start):
                    if dist.get_rank() == 0:
                        print(f"stopping at iteration {it}: {self.stops.reason}", flush=True)
                    break
            if t.save and saved_at != self.iteration:
                self._phase = f"while saving the checkpoint of iteration {self.iteration}"
                self.save()
                saved_at = self.iteration
            if self.async_saves is not None:  # nothing written is left unpublished at exit
                self._phase = "while finishing the background checkpoint writes"
                self.async_saves.finish()
        except (dist.DistBackendError, dist.DistError, RuntimeError) as e:
            if isinstance(e, TrainingError) or not run_control.is_communication_failure(e):
                raise
            if self.async_saves is not None and self.async_saves.pending:  # not published
                saved_at = self.async_saves.published or first
            raise run_control.collective_failure(
                e, self._phase, time.time() - start, t.save, saved_at
            ) from e
        finally:
            writer.close()
        return history

    @property
    def requeue_wanted(self) -> bool:
        """Stopped by a signal or the time limit with ``--slurm-requeue``: the job should go
        back to the queue (``run_control.requeue``, once everything is torn down)."""
        return self.cfg.train.slurm_requeue and self.stops.stopped_early
