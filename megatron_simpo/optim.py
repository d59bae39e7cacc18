"""The Megatron-Core optimizer and learning-rate schedule of a run, and fp16's loss scaling."""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_simpo.config import RunConfig
from megatron_simpo.model import model_dtype

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


def use_foreach(optimizer) -> None:
    """Makes torch's Adam/AdamW inside a Megatron optimizer update all tensors of a group per op
    (``foreach``) where torch would loop over them in Python: on CPU its default is the loop,
    ~4x slower here (on CUDA foreach is already the default; TE/apex FusedAdam are untouched).
    The same arithmetic per element: bit-identical updates (tests/test_loss.py)."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for part in parts:
        inner = getattr(part, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                if group.get("foreach") is None:
                    group["foreach"] = True


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
    use_foreach(optimizer)
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
