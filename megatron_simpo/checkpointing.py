"""Checkpoints with Megatron-Core ``dist_checkpointing``: save at one layout, load at any other.

Layout of ``--save DIR``::

    DIR/latest_checkpointed_iteration.txt   the published iteration (written atomically)
    DIR/iter_0000100/                        dist_checkpointing files (model, optimizer, ...)
    DIR/iter_0000100/run_state.json          iteration, consumed pairs, the run's config

A checkpoint is written under ``iter_XXXXXXX.tmp`` and renamed once complete, and only then is
the tracker updated, so a crash during save leaves the previous checkpoint published. With
``--async-save`` the tensors are written by a background process per rank (Megatron-Core's
``AsyncCallsQueue``) and the rename and tracker update are the request's last finalize step, run
on every rank once all have written (:class:`AsyncSaves`): a crash before that leaves only the
``.tmp`` directory. ``--fully-parallel-save`` spreads the writes of replicated shards over the
data-parallel ranks (``FullyParallelSaveStrategyWrapper``).
Non-tensor state is kept in JSON; dist_checkpointing's tensor files are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_simpo import compat
from megatron_simpo.errors import CheckpointError
from megatron_simpo.model import sync_params, unwrap
from megatron_simpo.platform import cpu

TRACKER = "latest_checkpointed_iteration.txt"
RUN_STATE = "run_state.json"
#: Under a checkpoint root: the HF config/tokenizer files recorded at import.
HF_SIDE_DIR = "hf"


def is_extra_state(key: str) -> bool:
    """Whether a (sharded) state-dict key is a module's ``_extra_state``.

    Transformer Engine's modules (core attention, norms, linears) keep FP8 metadata there. A
    checkpoint converted from Hugging Face (built with the local spec) has none, and a fresh
    module's default is right, so it may be absent from a checkpoint -- as Megatron-LM and
    Megatron-Bridge allow. Every other entry is loaded strictly.
    """
    return key.split("/")[0].endswith("_extra_state")


def _refuse_missing(ckpt: Path, missing: list[str]) -> None:
    """Raises on every rank when any rank's model needs entries the checkpoint lacks
    (collective, so no rank goes on to wait for the others)."""
    everywhere: list[list[str] | None] = [missing]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everywhere = [None] * dist.get_world_size()
        dist.all_gather_object(everywhere, missing)
    names = sorted({k for part in everywhere for k in part or []})
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CheckpointError(
            f"--load {ckpt}: the checkpoint has no {shown}, which this model needs "
            f"({len(names)} missing); check the model config and vocabulary"
        )


def _model_state(model: list, select: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The chunks' sharded state dicts (only the keys ``select`` accepts, if given)."""
    sync_params(model)  # --overlap-param-gather: the step's all-gather completes here

    def of(m) -> dict[str, Any]:
        state = unwrap(m).sharded_state_dict()
        return state if select is None else {k: v for k, v in state.items() if select(k)}

    if len(model) == 1:
        return {"model": of(model[0])}
    return {f"model{i}": of(m) for i, m in enumerate(model)}


def is_adapter_key(key: str) -> bool:
    """Whether a (sharded) state-dict key is a LoRA/DoRA adapter tensor
    (``megatron_simpo/adapters.py`` keeps them under each linear's ``lora`` child)."""
    return ".lora." in key


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(root: str | Path) -> Path | None:
    """The directory of the published checkpoint under ``root`` (or ``root`` itself if it is a
    single checkpoint), or None if there is none."""
    root = Path(root)
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
        path = root / f"iter_{int(text):07d}"
        if not path.is_dir():
            raise CheckpointError(f"{tracker} names iteration {text} but {path} is missing")
        return path
    if (root / "metadata.json").is_file():
        return root
    return None


def hf_side_dir(load: str | Path) -> Path | None:
    """The HF files (``config.json``, tokenizer) recorded with the checkpoint at ``load``: the
    ``hf/`` directory of the checkpoint root, ``load`` being the root or one ``iter_*``
    checkpoint in it. None when there is none."""
    load = Path(load)
    sides = [load / HF_SIDE_DIR]
    if checkpoint_dir(load) == load:  # a single checkpoint: its root is the parent
        sides.append(load.parent / HF_SIDE_DIR)
    return next((s for s in sides if s.is_dir()), None)


def read_run_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / RUN_STATE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


class AsyncSaves:
    """Checkpoints still being written in the background (``--async-save``): Megatron-Core's
    ``AsyncCallsQueue`` of dist_checkpointing requests. Every method is collective (all ranks
    call it at the same point of the loop)."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()
        #: The iteration of the newest checkpoint published by this queue (None: none yet).
        self.published: int | None = None

    @property
    def pending(self) -> int:
        """Saves started and not yet published."""
        return self.queue.get_num_unfinalized_calls()

    def poll(self) -> None:
        """Publishes the saves every rank has finished writing (one all-reduce per pending
        save; nothing while none is pending)."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def finish(self) -> None:
        """Waits for every pending save and publishes it (before the next save, the exit, a
        requeue)."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=True)


def save_strategy(fully_parallel: bool):
    """The ``torch_dist`` save strategy, wrapped to spread replicated shards over the
    data-parallel group (with context parallelism) when ``fully_parallel`` and it has >1 rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    strategy = get_default_save_sharded_strategy("torch_dist")
    if fully_parallel and ps.model_parallel_is_initialized():
        group = ps.get_data_parallel_group(with_context_parallel=True)
        if dist.get_world_size(group) > 1:
            strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def save_checkpoint(
    root: str | Path,
    iteration: int,
    model: list,
    optimizer=None,
    scheduler=None,
    run_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
    adapter_only: bool = False,
    *,
    async_saves: AsyncSaves | None = None,
    fully_parallel: bool = False,
) -> Path:
    """Saves model (and optimizer/scheduler if given) at ``iteration``; collective.

    ``adapter_only``: only the LoRA/DoRA tensors (the frozen base stays where ``--load`` has it;
    its path is recorded as ``lora_base`` in the run state).
    With ``async_saves`` the tensors are written in the background and the checkpoint is
    published by ``async_saves.poll()`` / ``finish()`` (a save still pending from before is
    finished first); the returned path exists only once it is published.
    """
    if async_saves is not None:
        async_saves.finish()  # one save in flight at a time, published in order
    root = Path(root)
    final = root / f"iter_{iteration:07d}"
    tmp = root / f"iter_{iteration:07d}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    state = _model_state(model, is_adapter_key if adapter_only else None)
    if optimizer is not None:
        merged = {}
        for v in state.values():
            merged.update(v)
        state["optimizer"] = optimizer.sharded_state_dict(
            merged, is_loading=False, metadata=compat.OPTIMIZER_CKPT_METADATA
        )
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
    info = dict(run_state or {})
    info.update(iteration=iteration, has_optimizer=optimizer is not None, adapter_only=adapter_only)
    publish = partial(_publish, root, tmp, final, iteration, info, keep_last)
    strategy = save_strategy(fully_parallel)
    if async_saves is None:
        dist_checkpointing.save(state, tmp, sharded_strategy=strategy)
        publish()
        return final
    if cpu.is_active():
        cpu.use_process_results_queue()
    request = dist_checkpointing.save(
        state, tmp, sharded_strategy=strategy, async_sharded_save=True, **compat.async_save_kwargs()
    )
    request.add_finalize_fn(publish)  # after dist_checkpointing's own (metadata) finalizers
    request.add_finalize_fn(partial(setattr, async_saves, "published", iteration))
    async_saves.queue.schedule_async_request(request)
    return final


def _publish(
    root: Path, tmp: Path, final: Path, iteration: int, info: dict, keep_last: int | None
) -> None:
    """Makes the fully written ``tmp`` the published checkpoint of ``iteration``; collective."""
    _barrier()
    if dist.get_rank() == 0:
        (tmp / RUN_STATE).write_text(json.dumps(info, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = root / (TRACKER + ".tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, root / TRACKER)
        if keep_last is not None:
            _prune(root, keep_last, keep=final)
    _barrier()


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Removes all but the newest ``keep_last`` published checkpoints (never ``keep``)."""
    published = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    for old in published[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def copy_hf_side_files(src: str | Path | None, root: str | Path) -> None:
    """Carries the HF ``config.json``/tokenizer files recorded at import (``CKPT/hf``) from the
    checkpoint a run started from to the run's own checkpoint directory."""
    if src is None or dist.get_rank() != 0:
        return
    side = hf_side_dir(src)
    target = Path(root) / HF_SIDE_DIR
    if side is not None and not target.exists():
        shutil.copytree(side, target)


def load_checkpoint(
    root: str | Path,
    model: list,
    optimizer=None,
    scheduler=None,
    select: Callable[[str], bool] | None = None,
    may_lack: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Loads weights (and optimizer/scheduler state when the checkpoint has them and an
    optimizer is given) into this layout; returns the checkpoint's run state.

    ``select``: load only these keys (an adapter-only checkpoint: ``is_adapter_key``);
    ``may_lack``: keys the checkpoint may lack, which keep their values (a base checkpoint
    under LoRA lacks the adapters). Everything else is loaded strictly."""
    ckpt = checkpoint_dir(root)
    if ckpt is None:
        raise CheckpointError(
            f"--load {root}: no checkpoint there (neither {TRACKER} nor metadata.json)"
        )
    info = read_run_state(ckpt)
    state = _model_state(model, select)

    def needed(k: str) -> bool:
        return not is_extra_state(k) and not (may_lack and may_lack(k))

    resume = optimizer is not None and info.get("has_optimizer", False)
    if resume:
        _init_torch_adam_states(optimizer)
        merged = {}
        for v in state.values():
            merged.update(v)
        state["optimizer"] = optimizer.sharded_state_dict(
            merged, is_loading=True, metadata=compat.OPTIMIZER_CKPT_METADATA
        )
    try:
        # The checkpoint's missing entries ("unexpected" to dist_checkpointing) are left out of
        # the load and returned; only Transformer Engine's extra state may be among them.
        loaded, _, absent = dist_checkpointing.load(
            state, str(ckpt), strict=StrictHandling.RETURN_UNEXPECTED
        )
    # Several types for mismatches; torch's CheckpointException derives from BaseException.
    except (Exception, CheckpointException) as e:
        raise CheckpointError(
            f"--load {ckpt}: the checkpoint does not match this model ({type(e).__name__}: "
            f"{str(e)[:500]}); check the model config and vocabulary"
        ) from e
    _refuse_missing(ckpt, [k for k in absent if needed(k)])
    info["lacked"] = sorted(k for k in absent if may_lack and may_lack(k))
    for key, chunk in zip([k for k in state if k.startswith("model")], model):
        result = unwrap(chunk).load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if select is None or select(k)]
        _refuse_missing(ckpt, [k for k in missing if needed(k)])
        if result.unexpected_keys:
            raise CheckpointError(
                f"--load {ckpt}: entries {sorted(result.unexpected_keys)[:5]} do not belong to "
                "this model; check the model config"
            )
    if optimizer is not None and not resume:
        # Weights only (--load of a converted or weights-only checkpoint): under bf16/fp16 the
        # optimizer built its fp32 main params from the random init; without this refresh the
        # first step would copy those (plus the update) back over the loaded weights.
        optimizer.reload_model_params()
    if resume:
        with _skip_step_when_setting_states(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_torch_adam_steps(optimizer)
        if scheduler is not None and "scheduler" in loaded:
            scheduler.load_state_dict(loaded["scheduler"])
    info["resumed_optimizer"] = resume
    return info


# Resuming a DistributedOptimizer checkpoint without apex/TE (torch AdamW fallback) hits three
# Megatron-Core bugs (0.16.1; the code is unchanged up to 0.19). The three helpers below work
# around them and do nothing when a fused Adam (apex/TE) is installed.


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer import distrib_optimizer as do

    if getattr(do, "HAVE_APEX_OR_TE", True):
        return []
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if isinstance(p, do.DistributedOptimizer)]


def _torch_adams_of_distributed_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The inner torch Adam of each ``DistributedOptimizer`` of the fallback."""
    return [d.optimizer for d in _distributed_optimizers(optimizer)]


@contextmanager
def _skip_step_when_setting_states(optimizer):
    """Bug 2: ``load_parameter_state_*`` leaves ``step`` out of the loaded tensors (it lives in
    the param groups) but ``_set_main_param_and_optimizer_states`` copies every state key,
    ``step`` included -> KeyError. While loading, ``step`` is set aside around that call."""
    originals = []
    for dopt in _distributed_optimizers(optimizer):
        original = dopt._set_main_param_and_optimizer_states

        def patched(model_param, tensors, dopt=dopt, original=original):
            group_index, group_order = dopt.model_param_group_index_map[model_param]
            main = dopt.optimizer.param_groups[group_index]["params"][group_order]
            state = dopt.optimizer.state[main]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step.detach().clone()

        dopt._set_main_param_and_optimizer_states = patched
        originals.append(dopt)
    try:
        yield
    finally:
        for dopt in originals:
            del dopt._set_main_param_and_optimizer_states  # back to the class method


def _init_torch_adam_states(optimizer) -> None:
    """Bug 1: ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` calls
    ``state_dict()``, which asserts that every param's state holds one common ``step`` -- false
    before the first step, when the state is empty. Zero states with step 0 make it pass;
    loading overwrites all of them."""
    for adam in _torch_adams_of_distributed_optimizers(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }


def _unshare_torch_adam_steps(optimizer) -> None:
    """Bug 3: ``DistributedOptimizer.load_state_dict`` puts one ``step``
    tensor object into every param's state; torch Adam increments each param's step in place,
    so a shared tensor advances once per parameter per iteration and bias correction goes
    wrong after a resume. Each param gets its own copy. (With the fully reshardable format the
    bug-2 wrapper already re-creates every step it sets aside; this pass also covers params that
    path does not visit, and costs one small clone per param at load.)"""
    for adam in _torch_adams_of_distributed_optimizers(optimizer):
        for state in adam.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].detach().clone()


@contextmanager
def grads_as_params(model: list):
    """Temporarily swaps each parameter's data with its fp32 main gradient, so the sharded state
    dict (and a dist checkpoint of it) holds gradients in the layout-independent format."""
    swapped = []
    for chunk in model:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                continue
            swapped.append((p, p.data))
            # Cast (bf16 params: the gradient rounded to bf16): ``.data`` of another dtype would
            # reset the parameter's grad accumulator, dropping DDP's main_grad hooks for good.
            p.data = g.view_as(p).to(p.dtype)
    try:
        yield
    finally:
        for p, data in swapped:
            p.data = data


def save_tensors(path: str | Path, model: list) -> None:
    """Saves only the model tensors (weights, or gradients inside :func:`grads_as_params`)."""
    path = Path(path)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(_model_state(model), path)
    _barrier()


def load_full_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint, unsharded, keyed by its global name."""
    return dist_checkpointing.load_plain_tensors(str(path))
