"""Generation probe: greedy decoding with the policy itself, at any TP/PP/VPP/DP layout.

SimPO runs drift in ways the preference metrics hide — answers that grow longer or collapse,
loops that repeat a phrase. Every ``--gen-interval`` iterations the trainer greedy-decodes a few
fixed held-out prompts and logs :func:`probe_metrics` (``gen/mean_length``, ``gen/repetition``,
``gen/eos_fraction``) and the texts.

Decoding recomputes the whole sequence at every new token (no KV cache): the probe is a few
prompts of a few dozen tokens, and a plain forward pass through Megatron's pipeline schedule is
exactly the code path training runs, at every layout. Cost of a probe: at most ``max_new_tokens``
forward-only passes over the unfinished rows (at most ``len(prompts)``) of at most
``longest prompt + max_new_tokens`` tokens: between ``max_new_tokens / 2`` and
``max_new_tokens`` times one forward pass of those rows at the final length (the half for short
prompts); rows leave the batch at EOS.

Prompts are right-padded: Megatron's RoPE always rotates position ``t`` of the input by ``t``
(position ids only feed learned absolute embeddings), so left padding would shift every prompt;
with right padding and causal attention a row's logits at its last real token do not depend on
the padding, and each row reads its next token there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_simpo.config import RunConfig
from megatron_simpo.data.batching import Pair
from megatron_simpo.fused_logprobs import HiddenStatesGPTModel, hidden_for_head
from megatron_simpo.model import model_device, unwrap

#: N-gram order of ``gen/repetition``.
REPETITION_N = 3


def _eos_set(eos_id: int | Iterable[int] | None) -> frozenset[int]:
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, int):
        return frozenset([eos_id])
    return frozenset(int(e) for e in eos_id)


def vocab_parallel_argmax(
    logits: torch.Tensor, vocab_size: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Index of the largest logit over a vocabulary split across ``group`` (never gathered).

    Args:
        logits: ``[..., V / TP]`` this rank's contiguous slice of the padded vocabulary (rank
            ``r`` holds ids ``[r * V/TP, (r+1) * V/TP)``).
        vocab_size: real vocabulary size; padded ids ``>= vocab_size`` are never chosen.
        group: the tensor-parallel group (None or size 1: the slice is the whole vocabulary).

    Returns:
        ``[...]`` int64 global token ids, identical on every rank of ``group``. Ties go to the
        lowest id, as ``torch.argmax`` on the full vocabulary does.
    """
    world = 1 if group is None else dist.get_world_size(group)
    part = logits.shape[-1]
    start = (dist.get_rank(group) if world > 1 else 0) * part
    ids = torch.arange(start, start + part, device=logits.device)
    masked = logits.float().masked_fill(ids >= vocab_size, float("-inf"))
    local = masked.argmax(-1)  # first maximum of this slice
    value = masked.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    best_id = local + start
    if world == 1:
        return best_id
    best = value.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    # Every rank proposes its id where it holds the maximum; the smallest proposal wins.
    proposal = torch.where(
        value == best, best_id, torch.full_like(best_id, torch.iinfo(torch.long).max)
    )
    dist.all_reduce(proposal, op=dist.ReduceOp.MIN, group=group)
    return proposal


def _pick_next(
    last: torch.Tensor, vocab_size: int, head: HiddenStatesGPTModel | None, output: torch.Tensor
):
    """Loss-function slot of the schedule: the greedy token of each row, no loss.

    ``output``: this rank's logits ``[b, s, V/TP]``, or with ``--fused-loss-head`` (``head``
    given) the final hidden states ``[s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism),
    of which only each row's last position goes through the output layer. ``last`` ``[b]``: the
    position of each row's last real token.
    """
    group = ps.get_tensor_model_parallel_group()
    rows = torch.arange(last.shape[0], device=last.device)
    if head is None:
        logits = output[rows, last]  # [b, V/TP]
    else:
        hidden = hidden_for_head(output, head.config.sequence_parallel, group)  # [s, b, h]
        logits = hidden[last, rows] @ head.output_weight().t()  # [b, V/TP]
    tokens = vocab_parallel_argmax(logits, vocab_size, group)
    zero = logits.new_zeros(())
    return zero, torch.tensor(1, dtype=torch.int, device=logits.device), {"tokens": tokens}


def _next_tokens(
    model: list, cfg: RunConfig, tokens: torch.Tensor, last: torch.Tensor, num_micro: int
) -> torch.Tensor:
    """One forward-only pass through the pipeline schedule; the greedy next token of every row
    (``[rows]`` int64), the same on every rank of the model-parallel group."""
    rows, seq_len = tokens.shape
    positions = torch.arange(seq_len, device=tokens.device).unsqueeze(0).expand(rows, -1)
    mbs = rows // num_micro
    micro = [
        (tokens[i : i + mbs], positions[i : i + mbs], last[i : i + mbs])
        for i in range(0, rows, mbs)
    ]

    def forward_step(data_iterator, chunk):
        tok, pos, lst = next(data_iterator)
        core = unwrap(chunk)
        head = core if isinstance(core, HiddenStatesGPTModel) else None
        return chunk(tok, pos, None), partial(_pick_next, lst, cfg.model.vocab_size, head)

    vpp = len(model)
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro) for _ in range(vpp)] if vpp > 1 else iter(micro),
        model=model if vpp > 1 else model[0],
        num_microbatches=num_micro,
        seq_length=seq_len,
        micro_batch_size=mbs,
        forward_only=True,
    )
    if out:  # last pipeline stage
        result = torch.cat([r["tokens"] for r in out])
    else:
        result = torch.empty(rows, dtype=torch.long, device=tokens.device)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            result,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
    return result


class _PreservedState:
    """Eval mode and untouched RNG streams for the duration of a block; restored after."""

    def __init__(self, model: list) -> None:
        self.model = model

    def __enter__(self) -> None:
        # Per module: a submodule kept in eval mode inside a training model stays so.
        self.modes = [(m, m.training) for chunk in self.model for m in chunk.modules()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        tracker = get_cuda_rng_tracker()
        self.tracker = {
            k: v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in tracker.get_states().items()
        }
        for chunk in self.model:
            chunk.eval()

    def __exit__(self, *exc) -> None:
        for module, mode in self.modes:
            module.training = mode
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        get_cuda_rng_tracker().set_states(self.tracker)


def greedy_generate(
    model: list,
    cfg: RunConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | Iterable[int] | None,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` by the model (collective over the whole world).

    Every rank calls it with the same prompts and gets the same result. Each data-parallel
    replica decodes all prompts (a probe is a handful of prompts); data-parallel rank 0's result
    is broadcast so every rank returns identical ids.

    Args:
        model: this rank's model chunks (``build_model``, optionally ``wrap_ddp``-wrapped).
        cfg: the run config (vocabulary size, context length, sequence parallelism).
        prompts: token ids of each prompt (non-empty).
        max_new_tokens: most tokens generated per prompt.
        eos_id: end-of-sequence id (or ids); a row stops after generating one. None: never stop
            early.

    Returns:
        The new tokens of each prompt (the EOS included when one was generated). A row also
        stops when prompt + generation reaches ``max_position_embeddings``.

    The model's train/eval modes, the RNG states (torch, CUDA, Megatron's tracker), the weights
    and the gradient buffers are left as they were.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    n = len(prompts)
    if n == 0 or max_new_tokens <= 0:
        return [[] for _ in prompts]
    eos = _eos_set(eos_id)
    device = model_device()
    tp = ps.get_tensor_model_parallel_world_size()
    pad_multiple = tp if cfg.parallel.sequence_parallel else 1
    # The interleaved schedule needs at least PP micro-batches.
    num_micro = ps.get_pipeline_model_parallel_world_size() if len(model) > 1 else 1
    max_total = cfg.model.max_position_embeddings
    seqs = [list(map(int, p)) for p in prompts]
    done = [len(s) >= max_total for s in seqs]
    generated: list[list[int]] = [[] for _ in range(n)]
    with _PreservedState(model), torch.no_grad():
        for _ in range(max_new_tokens):
            # Only unfinished rows are run (the same set on every rank: tokens are broadcast),
            # padded with copies of the first to a multiple of the micro-batch count.
            active = [i for i in range(n) if not done[i]]
            if not active:
                break
            batch = active + [active[0]] * (-len(active) % num_micro)
            longest = max(len(seqs[i]) for i in batch)
            seq_len = -(-longest // pad_multiple) * pad_multiple
            tokens = torch.zeros((len(batch), seq_len), dtype=torch.long)  # right-padded
            for r, i in enumerate(batch):
                tokens[r, : len(seqs[i])] = torch.tensor(seqs[i])
            last = torch.tensor([len(seqs[i]) - 1 for i in batch])
            nxt = _next_tokens(model, cfg, tokens.to(device), last.to(device), num_micro)
            for i, t in zip(active, nxt.tolist()):
                seqs[i].append(t)
                generated[i].append(t)
                done[i] = t in eos or len(seqs[i]) >= max_total
    if ps.get_data_parallel_world_size() > 1:
        # Replicas compute the same thing; broadcasting makes agreement exact even where a
        # non-deterministic kernel could break a near-tie differently.
        flat = torch.full((n, max_new_tokens), -1, dtype=torch.long)
        for i, g in enumerate(generated):
            flat[i, : len(g)] = torch.tensor(g, dtype=torch.long)
        flat = flat.to(device)
        dist.broadcast(
            flat, src=ps.get_data_parallel_src_rank(), group=ps.get_data_parallel_group()
        )
        generated = [[t for t in row if t >= 0] for row in flat.tolist()]
    return generated


def _strip_eos(seq: Sequence[int], eos: frozenset[int]) -> list[int]:
    out = []
    for t in seq:
        if t in eos:
            break
        out.append(int(t))
    return out


def repetition(seq: Sequence[int], n: int = REPETITION_N) -> float | None:
    """Fraction of the ``n``-grams of ``seq`` that repeat an earlier one: ``1 - distinct/total``
    (0: no n-gram occurs twice; near 1: a loop). None when ``seq`` has fewer than ``n`` tokens."""
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    if not grams:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def probe_metrics(
    generated: Sequence[Sequence[int]],
    eos_id: int | Iterable[int] | None,
    n: int = REPETITION_N,
) -> dict[str, float]:
    """Summary of one probe's generations.

    - ``gen/mean_length``: mean number of generated tokens before the first EOS.
    - ``gen/repetition``: mean over generations of :func:`repetition` (fraction of repeated
      ``n``-grams within the generation, EOS excluded), over generations with at least ``n``
      tokens; 0 when none has. Within one generation only: answers to different prompts that
      share phrasing are not repetition.
    - ``gen/eos_fraction``: fraction of generations that ended with EOS (0 without an EOS id).
    """
    eos = _eos_set(eos_id)
    if not generated:
        return {"gen/mean_length": 0.0, "gen/repetition": 0.0, "gen/eos_fraction": 0.0}
    bodies = [_strip_eos(g, eos) for g in generated]
    reps = [r for r in (repetition(b, n) for b in bodies) if r is not None]
    ended = [len(b) < len(g) for b, g in zip(bodies, generated)]
    return {
        "gen/mean_length": sum(map(len, bodies)) / len(bodies),
        "gen/repetition": sum(reps) / len(reps) if reps else 0.0,
        "gen/eos_fraction": sum(ended) / len(ended),
    }


def probe_prompts(pairs: Sequence[Pair], count: int) -> list[list[int]]:
    """The fixed probe prompts: the first ``count`` distinct prompts of the held-out pairs, in
    order (pairs that share a prompt give it once)."""
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for i in range(len(pairs)):
        if len(out) >= count:
            break
        prompt = tuple(pairs[i].prompt_ids)
        if prompt and prompt not in seen:
            seen.add(prompt)
            out.append(list(prompt))
    return out


def _tokenizer_path(cfg: RunConfig, pairs: Sequence[Pair] | None) -> str | None:
    from megatron_simpo.data import _default_tokenizer

    path = _default_tokenizer(cfg)
    base = pairs
    while path is None and base is not None:  # a Subset of prepared pairs: look underneath
        info = getattr(base, "info", None)
        if isinstance(info, dict) and info.get("tokenizer"):
            path = info["tokenizer"]
        base = getattr(base, "base", None)
    return path


def load_probe_tokenizer(cfg: RunConfig, pairs: Sequence[Pair] | None = None) -> Any | None:
    """The tokenizer the run's data was prepared with: ``--tokenizer``, the one recorded in the
    ``--load`` checkpoint, or the one recorded in the prepared ``pairs``; None for pre-tokenised
    data without any (texts are then the ids)."""
    from megatron_simpo.data.prepare import load_tokenizer

    path = _tokenizer_path(cfg, pairs)
    return load_tokenizer(path) if path else None


def resolve_eos_id(
    cfg: RunConfig, tokenizer: Any | None = None, pairs: Sequence[Pair] | None = None
) -> int | list[int] | None:
    """The end-of-sequence id(s) generation stops at, from the first source that has one:

    1. the tokenizer's ``eos_token_id``;
    2. ``eos_token_id`` of ``generation_config.json`` / ``config.json`` recorded with the
       ``--load`` checkpoint (``CKPT/hf``; may be a list, e.g. Llama 3 Instruct);
    3. pre-tokenised data: the token every response of the first 64 ``pairs`` ends with
       (preparation appends EOS to every response, so this is EOS when there is one).
    """
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    if cfg.train.load:
        from megatron_simpo.checkpointing import hf_side_dir

        side = hf_side_dir(cfg.train.load)
        for name in ("generation_config.json", "config.json") if side is not None else ():
            f = side / name
            if f.is_file():
                eos = json.loads(f.read_text()).get("eos_token_id")
                if eos is not None:
                    return eos
    if pairs is not None and len(pairs):
        ends = set()
        for i in range(min(len(pairs), 64)):
            p = pairs[i]
            for resp in (p.chosen_ids, p.rejected_ids):
                ends.add(resp[-1] if resp else None)
        if len(ends) == 1 and None not in ends:
            return int(next(iter(ends)))
    return None


def decode_texts(
    generated: Sequence[Sequence[int]],
    tokenizer: Any | None,
    eos_id: int | Iterable[int] | None = None,
) -> list[str]:
    """Texts of token sequences (cut at the first EOS): the tokenizer's decoding (special tokens
    kept, so a stray BOS shows), or the ids joined by spaces without a tokenizer."""
    eos = _eos_set(eos_id)
    out = []
    for g in generated:
        body = _strip_eos(g, eos)
        if tokenizer is None:
            out.append(" ".join(map(str, body)))
        else:
            out.append(tokenizer.decode(body, skip_special_tokens=False))
    return out
