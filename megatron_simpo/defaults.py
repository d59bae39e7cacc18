"""The defaults that depend on the run: packing, prefix sharing and the fused loss head.

``--pack-pairs``, ``--prefix-sharing`` and ``--fused-loss-head`` default to *unset* (None in
``TrainConfig``): "on wherever applicable". :func:`resolve` turns them into booleans with a
reason each, from the attention backend, the model shape, the micro-batch size, the sequence
length and the dtype; an explicit value (``--pack-pairs`` / ``--no-pack-pairs``, ...) always wins.

* **Packing** is on with every backend: ``sdpa`` and ``local`` take the explicit block mask
  (``data/packing.py``); Transformer Engine (``--attention-backend te``, or ``auto`` where TE and
  CUDA are present) takes the packed rows as THD sequences, ``PackedSeqParams`` with
  ``cu_seqlens`` (``packed_seq.py``), so its fused attention runs on them.
* **Prefix sharing** is on with ``sdpa`` and ``local``, off with TE: its rejected branch attends
  to the prompt but not to the chosen branch before it, which no causal THD span expresses;
  under TE pairs are then packed without sharing (each sequence its own span).
* **The fused loss head** is on where its modelled peak memory is below the unfused head's
  (:func:`unfused_head_bytes` vs :func:`fused_head_bytes`, per micro-batch of ``T`` tokens on one
  TP rank holding ``v = padded vocab / TP`` output rows of width ``h``; ``B`` bytes per element of
  the model dtype, ``c = --loss-chunk-size``):

  - unfused (``logprobs.py``): forward holds the logits (``B``) and two fp32 working copies
    (max-shifted logits, their exponentials/softmax), ``(B + 8) T v``; backward the saved fp32
    softmax turned into the logit gradient in place plus its cast to the model dtype and the
    output layer's weight gradient, ``(4 + B') T v + B v h`` (``B' = 0`` in fp32, where the cast
    is a no-op).
  - fused (``fused_logprobs.py``): one chunk of logits at a time, ``(B' + 4) c v`` (the matmul's
    model-dtype output and its fp32 copy), plus in backward the fp32 weight-gradient accumulator
    ``4 v h`` and, in bf16/fp16, the per-chunk ``[v, h]`` product and its fp32 copy (``6 v h``).

  ``v`` cancels, so the threshold is a token count (:func:`fused_head_threshold`). For
  ``T >= c`` and ``T >= h / 2``: in bf16/fp16 the fused head is smaller iff
  ``10 T > 6 c + 10 h``, i.e. ``T > 0.6 c + h``: 4711 tokens for Llama-3-8B (h 4096) at the
  default chunk of 1024, so on at micro-batch 1 x seq 4096 (8192 tokens), off at seq 2048; 8807
  for Llama-3-70B (h 8192). In fp32 both heads hold a ``4 v h`` weight gradient and the fused one
  is smaller iff ``12 T > 4 c + 4 h`` (1025 tokens at h 4096; 33 at h 64). The bf16 weight-
  gradient temporaries (``6 v h``) are what keeps the fused head off for shorter micro-batches.
  ``benchmarks/bench_loss_head.py`` measures both (README, "Fused loss head").

* **Checkpoint saving** (with ``--save``): ``--async-save`` defaults on with CUDA (the write
  overlaps training) and off on CPU/gloo, where it works but the fork per save costs more than
  the small saves it hides; ``--fully-parallel-save`` defaults on
  (:func:`resolve_checkpoint_saving`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_simpo.config import RunConfig

#: Why prefix sharing is off by default with Transformer Engine.
TE_REASON = (
    "TE's THD path is causal per sequence, the prefix-sharing mask is not; pairs are packed "
    "without sharing instead"
)


def resolve_packing(
    requested: bool | None, flag: str, backend: str, te_available: bool
) -> tuple[bool, str]:
    """``(value, reason)`` of ``--pack-pairs`` or ``--prefix-sharing`` (``flag``).

    Args:
        requested: the flag's value, None when unset.
        backend: ``--attention-backend`` (``auto``, ``sdpa``, ``local`` or ``te``).
        te_available: Transformer Engine importable and CUDA present (what ``auto`` picks by).
    """
    if requested is not None:
        return requested, f"{flag if requested else '--no-' + flag[2:]} given"
    resolved = ("te" if te_available else "sdpa") if backend == "auto" else backend
    if resolved != "te":
        why = f"--attention-backend {backend} ({resolved}) takes the packing mask"
        return True, f"default on: {why}"
    if flag == "--pack-pairs":
        return True, (
            f"default on: --attention-backend {backend} (te) takes packed pairs as THD sequences"
        )
    return False, f"default off: {TE_REASON} (--attention-backend {backend})"


def head_tokens(micro_batch_size: int, seq_length: int) -> int:
    """Most target tokens of one micro-batch: ``2b`` sequences of ``--seq-length``, padded or
    packed (a packed micro-batch holds the same pairs in fewer, fuller rows)."""
    return 2 * micro_batch_size * seq_length


def unfused_head_bytes(tokens: int, vocab_per_rank: int, hidden: int, dtype_bytes: int) -> float:
    """Peak bytes of the unfused loss head of one micro-batch (see the module doc)."""
    t, v, b = tokens, vocab_per_rank, dtype_bytes
    cast = 0 if b == 4 else b
    return max((b + 8) * t * v, (4 + cast) * t * v + b * v * hidden)


def fused_head_bytes(
    tokens: int, vocab_per_rank: int, hidden: int, dtype_bytes: int, chunk: int
) -> float:
    """Peak bytes of the fused chunked loss head of one micro-batch (see the module doc)."""
    c, v = min(tokens, chunk), vocab_per_rank
    low = dtype_bytes != 4
    chunk_bytes = (dtype_bytes + 4 if low else 4) * c * v
    weight_grad = (4 + 6 if low else 4) * v * hidden
    return chunk_bytes + weight_grad


def fused_head_threshold(hidden: int, dtype_bytes: int, chunk: int) -> int:
    """Fewest tokens per micro-batch at which the fused head's modelled peak is below the
    unfused head's (independent of the vocabulary, which both scale with)."""
    lo, hi = 1, 1
    while fused_head_bytes(hi, 1, hidden, dtype_bytes, chunk) >= unfused_head_bytes(
        hi, 1, hidden, dtype_bytes
    ):
        lo, hi = hi, 2 * hi
    while lo < hi:  # the smallest t in (lo, hi] where fused < unfused (monotone in t)
        mid = (lo + hi) // 2
        if fused_head_bytes(mid, 1, hidden, dtype_bytes, chunk) < unfused_head_bytes(
            mid, 1, hidden, dtype_bytes
        ):
            hi = mid
        else:
            lo = mid + 1
    return hi


def resolve_fused_loss_head(
    requested: bool | None,
    *,
    hidden: int,
    vocab_per_rank: int,
    micro_batch_size: int,
    seq_length: int,
    dtype_bytes: int,
    chunk: int,
) -> tuple[bool, str]:
    """``(value, reason)`` of ``--fused-loss-head``: unset, on iff it saves memory."""
    if requested is not None:
        return requested, f"{'--' if requested else '--no-'}fused-loss-head given"
    tokens = head_tokens(micro_batch_size, seq_length)
    args = (tokens, vocab_per_rank, hidden, dtype_bytes)
    fused, unfused = fused_head_bytes(*args, chunk), unfused_head_bytes(*args)
    threshold = fused_head_threshold(hidden, dtype_bytes, chunk)
    why = (
        f"modelled peak {_size(fused)} fused vs {_size(unfused)} unfused at "
        f"{tokens} tokens/micro-batch (threshold {threshold} tokens)"
    )
    on = fused < unfused
    return on, f"default {'on' if on else 'off'}: {why}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def resolve_checkpoint_saving(
    async_save: bool | None, fully_parallel_save: bool | None, cuda: bool
) -> dict[str, tuple[bool, str]]:
    """``{field: (value, reason)}`` of ``--async-save`` and ``--fully-parallel-save``.

    Async saving forks a writer process per save (Megatron-Core's ``TemporalAsyncCaller``) after
    copying the state to host memory: on a GPU that hides the write behind training; on CPU
    (gloo) it works (tests/test_resume.py) but the state is already in host memory and small
    saves take less than the fork, so it defaults off there. The fully-parallel wrapper only
    decides which data-parallel replica writes each shard: on everywhere.
    """
    if async_save is not None:
        a = async_save, f"{'--' if async_save else '--no-'}async-save given"
    elif cuda:
        a = True, "default on: CUDA (the write overlaps training)"
    else:
        a = False, "default off: no CUDA (CPU/gloo saves are synchronous unless --async-save)"
    if fully_parallel_save is not None:
        f = (
            fully_parallel_save,
            f"{'--' if fully_parallel_save else '--no-'}fully-parallel-save given",
        )
    else:
        f = True, "default on: replicated shards written by all data-parallel ranks"
    return {"async_save": a, "fully_parallel_save": f}


def resolve(
    cfg: RunConfig, te_available: bool, dtype_bytes: int, cuda: bool = False
) -> tuple[RunConfig, dict]:
    """A copy of ``cfg`` whose unset defaults are decided, and ``{field: (value, reason)}``.

    Args:
        te_available: Transformer Engine importable and CUDA present.
        dtype_bytes: bytes per element of the model dtype (``model.model_dtype``).
        cuda: a CUDA device is present (checkpoint saving defaults).
    """
    t, m = cfg.train, cfg.model
    out = {
        name: resolve_packing(getattr(t, name), flag, t.attention_backend, te_available)
        for name, flag in (("pack_pairs", "--pack-pairs"), ("prefix_sharing", "--prefix-sharing"))
    }
    out["fused_loss_head"] = resolve_fused_loss_head(
        t.fused_loss_head,
        hidden=m.hidden_size,
        vocab_per_rank=m.padded_vocab_size() // cfg.parallel.tensor_model_parallel_size,
        micro_batch_size=t.micro_batch_size,
        seq_length=t.seq_length,
        dtype_bytes=dtype_bytes,
        chunk=t.loss_chunk_size,
    )
    if t.save:
        out.update(resolve_checkpoint_saving(t.async_save, t.fully_parallel_save, cuda))
    train = dataclasses.replace(t, **{k: v for k, (v, _) in out.items()})
    return dataclasses.replace(cfg, train=train), out


def resolve_for_run(cfg: RunConfig, announce: bool = True) -> RunConfig:
    """:func:`resolve` for this process (TE and CUDA detected, the model dtype); prints each
    value and its reason once, on global rank 0 (``announce``)."""
    import torch
    import torch.distributed as dist

    from megatron_simpo.model import have_transformer_engine, model_dtype

    te = have_transformer_engine() and torch.cuda.is_available()
    dtype_bytes = torch.empty((), dtype=model_dtype(cfg)).element_size()
    resolved, why = resolve(cfg, te, dtype_bytes, cuda=torch.cuda.is_available())
    if announce and (not dist.is_initialized() or dist.get_rank() == 0):
        for name, (value, reason) in why.items():
            print(f"defaults: {name} = {value} ({reason})", flush=True)
    return resolved
