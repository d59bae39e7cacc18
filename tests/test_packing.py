"""Padding-free packing (``--pack-pairs``) and prefix sharing (``--prefix-sharing``).

1. Pure data tests: first-fit-decreasing bins; every sequence of a packed micro-batch is
   recoverable (its inputs, targets, positions, scored targets); the attention mask of a
   prefix-shared pair lets rejected see the prompt and itself, never chosen.
2. The real tiny Megatron model on gloo (one world of 2 ranks, several layouts): padded vs
   packed vs prefix-shared vs both, from the same weights on the same pairs — per-pair log-probs,
   SimPO loss and metrics, and every gradient in the DDP buffers after the schedule's backward
   and gradient finalisation.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_gloo

from megatron_simpo.data import Pair
from megatron_simpo.data.packing import (
    BRANCH_NAMES,
    attention_mask_from,
    collate_packed,
    first_fit_decreasing,
)

sys.path.insert(0, str(Path(__file__).parent / "distributed"))

SEQ_LENGTH = 32
VARIED = REPO / "tests/data/varied_pretok.jsonl"


def random_pairs(n: int, seed: int) -> list[Pair]:
    """Pairs with a wide length spread (prompt 1-10, responses 1-12 tokens) and non-unit weights;
    pair 0 has a one-token prompt (its shared prefix is empty), pair 1 a one-token chosen and
    pair 2 a one-token rejected response."""
    rng = random.Random(seed)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(rng.randrange(3, 32) for _ in range(k))

    return [
        Pair(
            ids(1 if i == 0 else rng.randint(1, 10)),
            ids(1 if i == 1 else rng.randint(1, 12)),
            ids(1 if i == 2 else rng.randint(1, 12)),
            weight=round(rng.uniform(0.2, 3.0), 3),
        )
        for i in range(n)
    ]


def varied_pairs(n: int) -> list[Pair]:
    """The first ``n`` pairs of ``tests/data/varied_pretok.jsonl`` (its corner cases first: a
    one-token prompt, one-token chosen / rejected / both responses, a full-length pair)."""
    rows = [json.loads(x) for x in VARIED.read_text().splitlines()[:n]]
    return [
        Pair(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]), r["weight"])
        for r in rows
    ]


def test_first_fit_decreasing_fills_bins_within_capacity():
    rng = random.Random(0)
    sizes = [rng.randint(1, 20) for _ in range(50)]
    bins = first_fit_decreasing(sizes, 24)
    assert sorted(i for b in bins for i in b) == list(range(50))
    assert all(sum(sizes[i] for i in b) <= 24 for b in bins)
    # FFD uses at most 11/9 OPT + 1 bins; OPT >= total / capacity.
    assert len(bins) <= 11 / 9 * (sum(sizes) / 24) + 1 + 1e-9
    assert first_fit_decreasing(sizes, 24) == bins  # deterministic
    assert first_fit_decreasing([30, 5], 24) == [[0], [1]]  # oversize item: a bin of its own


@pytest.mark.parametrize("pack,shared", [(True, False), (False, True), (True, True)])
def test_every_sequence_is_recoverable_from_packed_rows(pack, shared):
    pairs = random_pairs(6, seed=1)
    mb = collate_packed(pairs, capacity=SEQ_LENGTH, prefix_sharing=shared, pack=pack)
    b = len(pairs)
    if pack:
        assert mb["tokens"].shape[1] <= SEQ_LENGTH
    for j in range(2 * b):
        p = pairs[j % b]
        resp = p.chosen_ids if j < b else p.rejected_ids
        sel = mb["seq_index"] == j
        # Scored targets of sequence j, in row order, are exactly its response.
        assert mb["labels"][sel].tolist() == list(resp)
        assert mb["loss_mask"][sel].eq(1).all()
        # Their positions are those of the unpacked sequence: len(prompt)-1 .. end.
        n = len(p.prompt_ids)
        assert mb["position_ids"][sel].tolist() == list(range(n - 1, n - 1 + len(resp)))
        # The input at each scored target is the token before it in prompt + response.
        seq = [*p.prompt_ids, *resp]
        assert mb["tokens"][sel].tolist() == seq[n - 1 : -1]
    assert mb["loss_mask"].sum() == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert mb["lengths"].view(2, -1)[0].tolist() == [len(p.chosen_ids) for p in pairs]
    assert mb["weights"].tolist() == torch.tensor([p.weight for p in pairs]).tolist()  # fp32


def test_prefix_shared_mask_hides_chosen_from_rejected():
    pair = Pair((5, 6, 7), (8, 9), (10, 11, 12))
    mb = collate_packed([pair], capacity=SEQ_LENGTH, prefix_sharing=True, pack=False)
    # [P0 P1 | P2 C0 | P2 R0 R1]
    assert mb["tokens"][0].tolist() == [5, 6, 7, 8, 7, 10, 11]
    assert mb["labels"][0].tolist() == [6, 7, 8, 9, 10, 11, 12]
    assert mb["position_ids"][0].tolist() == [0, 1, 2, 3, 2, 3, 4]
    assert [BRANCH_NAMES[x] for x in mb["branch_ids"][0].tolist()] == [
        "shared",
        "shared",
        "chosen",
        "chosen",
        "rejected",
        "rejected",
        "rejected",
    ]
    allowed = ~attention_mask_from(mb["segment_ids"], mb["branch_ids"])[0, 0]
    seen = {q: [k for k in range(7) if allowed[q, k]] for q in range(7)}
    assert seen[3] == [0, 1, 2, 3]  # C0: prompt (with its own copy of P2) and itself
    assert seen[4] == [0, 1, 4]  # the rejected copy of P2: P0 P1 and itself, not P2 / C0
    assert seen[6] == [0, 1, 4, 5, 6]


def test_transformer_engine_refuses_prefix_sharing_and_takes_packing():
    from megatron_simpo.config import RunConfig
    from megatron_simpo.errors import ConfigError

    def cfg(flag: str) -> RunConfig:
        train = {flag: True, "attention_backend": "te"}
        return RunConfig.from_dict({"train": train, "data": {"data_path": "x.jsonl"}})

    with pytest.raises(ConfigError, match="--prefix-sharing needs --attention-backend sdpa"):
        cfg("prefix_sharing").validate(world_size=1)
    # Plain packing reaches TE as THD sequences (tests/test_packed_seq.py).
    cfg("pack_pairs").validate(world_size=1)


def test_packed_rows_are_block_diagonal():
    pairs = random_pairs(5, seed=2)
    mb = collate_packed(pairs, capacity=SEQ_LENGTH, prefix_sharing=False, pack=True)
    allowed = ~attention_mask_from(mb["segment_ids"], mb["branch_ids"])[:, 0]
    seg = mb["segment_ids"]
    for r in range(seg.shape[0]):
        for q in range(seg.shape[1]):
            keys = allowed[r, q].nonzero().flatten().tolist()
            # A query sees exactly the tokens of its own segment up to itself (padding: 0).
            assert keys == [k for k in range(q + 1) if seg[r, k] == seg[r, q]]


# ---------------------------------------------------------------------------------------------
# The real model: packed and prefix-shared against padded.

MODES = {
    "padded": {},
    "packed": {"pack_pairs": True},
    "prefix": {"prefix_sharing": True},
    "packed_prefix": {"pack_pairs": True, "prefix_sharing": True},
}
# name -> (train overrides, parallel overrides, micro-batch size); a world of 2 ranks.
# The model is built unfused; packing comes from the batches (MODES), not the config defaults.
SDPA = {"attention_backend": "sdpa", "fused_loss_head": False}
LOCAL = {"attention_backend": "local", "fused_loss_head": False}
LAYOUTS = {
    "dp2_sdpa": (SDPA, {}, 4),
    "dp2_local": (LOCAL, {}, 4),
    "tp2_sp_sdpa": (SDPA, {"tensor_model_parallel_size": 2, "sequence_parallel": True}, 4),
    "tp2_fused_head": (
        {**SDPA, "fused_loss_head": True, "loss_chunk_size": 7},
        {"tensor_model_parallel_size": 2},
        4,
    ),
    "pp2_sdpa": (SDPA, {"pipeline_model_parallel_size": 2}, 2),
}
# Same weights, same pairs, fp32: a packed row changes only which (exactly zero) masked terms the
# softmax sees and the shapes of the GEMMs/reductions, i.e. summation order: a few ulps per op,
# ~1e-7 relative through 4 layers. Log-probs ~-3.5: 2e-6 absolute, per unit of magnitude (the
# varied pairs' losses are weighted by up to 3, ~8, and a one-token response's log-prob is not
# averaged over tokens; measured <= 3.8e-6 on a per-pair loss). Gradients:
# max|g_mode - g_padded| <= 1e-5 * max|g_padded| per tensor (same bound as the fused loss head).
LOGP_ATOL = 2e-6
GRAD_RTOL = 1e-5


def magnitude(values: dict, key: str) -> float:
    """Size (>= 1) of the terms ``values[key]`` is computed from: a margin, of the two rewards
    it subtracts (floats, or per-pair tensors)."""
    keys = ("rewards/chosen", "rewards/rejected") if key == "rewards/margins" else (key,)
    return max(1.0, *(float(torch.as_tensor(values[k]).abs().max()) for k in keys))


def _run(trainer, mode: str, mbs: int, pairs: list[Pair]):
    from megatron.core import parallel_state as ps

    from megatron_simpo import parallel
    from megatron_simpo.batch_loss import reduce_reports
    from megatron_simpo.data import PairBatcher
    from megatron_simpo.data.batching import padding_for
    from megatron_simpo.step import run_forward_backward

    p = trainer.cfg.parallel
    batcher = PairBatcher(
        pairs,
        global_batch_size=len(pairs),
        micro_batch_size=mbs,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        seed=3,
        **padding_for(p, parallel.variable_seq_lengths(trainer.cfg)),
        capacity=SEQ_LENGTH,
        **MODES[mode],
    )
    micro_batches, seq_len = batcher.micro_batches(0)
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    reports = run_forward_backward(
        trainer.model, micro_batches, seq_len, trainer.cfg.loss, trainer.cfg.model.vocab_size
    )
    per_pair = {}
    if reports:
        per_pair = {
            k: torch.cat([r["per_pair"][k] for r in reports]) for k in reports[0]["per_pair"]
        }
    grads = {n: p.main_grad.clone() for c in trainer.model for n, p in c.named_parameters()}
    tokens = sum(mb["tokens"].numel() for mb in micro_batches)
    return reduce_reports(reports), per_pair, grads, tokens


def _model_worker(rank, world):
    from layouts import config_dict

    from megatron_simpo import parallel
    from megatron_simpo.config import RunConfig
    from megatron_simpo.train import Trainer

    parallel.init_distributed()
    pairs = varied_pairs(8)
    for name, (train, overrides, mbs) in LAYOUTS.items():
        t0 = time.perf_counter()
        raw = config_dict("tp1", str(VARIED), None)
        raw["parallel"] = dict(overrides)
        raw["train"].update(train)
        raw["train"]["seq_length"] = SEQ_LENGTH
        trainer = Trainer(RunConfig.from_dict(raw))
        trainer.setup()
        ref, ref_pp, ref_grads, ref_tokens = _run(trainer, "padded", mbs, pairs)
        for mode in MODES:
            if mode == "padded":
                continue
            got, got_pp, got_grads, tokens = _run(trainer, mode, mbs, pairs)
            if "pipeline_model_parallel_size" not in overrides:  # PP: fixed shapes, may pad more
                assert tokens < ref_tokens, (name, mode, tokens, ref_tokens)
            assert got["pairs"] == ref["pairs"] == 8
            keys = ("loss", "nll_loss", "rewards/margins", "logps/chosen", "logps/rejected")
            for key in (*keys, "tokens_effective"):
                tol = LOGP_ATOL * magnitude(ref, key)
                assert abs(got[key] - ref[key]) <= tol, (name, mode, key, got, ref)
            # Prefix sharing computes each prompt once (less its last token): fewer tokens.
            assert (got["tokens"] < ref["tokens"]) == ("prefix" in mode), (name, mode)
            for key, want in ref_pp.items():  # per pair, this rank's pairs (last stage)
                err = (got_pp[key] - want).abs().max().item()
                tol = LOGP_ATOL * magnitude(ref_pp, key)
                assert err <= tol, (name, mode, key, err, tol)
            assert ref_grads.keys() == got_grads.keys() and ref_grads
            for n, g in ref_grads.items():
                scale = g.abs().max().item()
                err = (got_grads[n] - g).abs().max().item()
                assert scale > 0, (name, n)
                assert err <= GRAD_RTOL * scale, (name, mode, n, err, scale)
        parallel.destroy_model_parallel()
        print(f"{name}: {time.perf_counter() - t0:.1f}s", flush=True)


def test_packed_and_prefix_shared_match_padded_on_the_tiny_model():
    run_gloo(2, _model_worker)


def test_cli_flags_reach_the_trainer(tmp_path):
    """`train --pack-pairs --prefix-sharing` reports the padded run's losses and real-token
    counts (same weights and varied data; fp32, only summation order differs: see above)."""
    from conftest import torchrun

    def run(name, *flags):
        tb = tmp_path / name
        args = ["-m", "megatron_simpo", "train", "--config", "examples/tiny_pretok.yaml"]
        args += ["--train-iters", "2", "--precision", "fp32", "--tensorboard-dir", str(tb)]
        args += ["--data-path", str(VARIED)]
        r = torchrun(1, [*args, *flags])
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads(x) for x in (tb / "metrics.jsonl").read_text().splitlines()]

    padded = run("padded", "--no-pack-pairs", "--no-prefix-sharing")  # both default on here
    shared = run("shared", "--pack-pairs", "--prefix-sharing")  # the old flags still work
    from megatron_simpo.data.batching import global_batch_indices

    pairs = varied_pairs(24)
    for it, (a, b) in enumerate(zip(padded, shared)):
        assert abs(a["loss"] - b["loss"]) < 2e-6
        # Honest throughput: the shared run computes each prompt once (less its last token,
        # which each branch keeps) for pairs whose shared row fits --seq-length 16 (the others
        # are split, unshared); the unshared count keeps its name. tiny_pretok.yaml: global
        # batch 16, seed 1234.
        batch = [pairs[i] for i in global_batch_indices(len(pairs), 16, it, 1234)]
        fits = [p for p in batch if len(p.prompt_ids + p.chosen_ids + p.rejected_ids) - 1 <= 16]
        saved = sum(len(p.prompt_ids) - 1 for p in fits)
        assert a["tokens"] == a["tokens_effective"] == b["tokens_effective"]
        assert saved > 0 and b["tokens"] == a["tokens"] - saved
        assert b["model_flops"] < a["model_flops"]
        assert b["tokens_per_sec"] == pytest.approx(b["tokens"] / b["iteration_time"])


# Evaluation scores pairs as training collates them (evaluate.collate_group): per-pair results of
# packed / prefix-shared scoring equal the padded ones. Forward only, same weights, fp32: only
# the summation order differs, so LOGP_ATOL per unit of magnitude (see above) bounds each value.
EVAL_LAYOUTS = {"dp2": {}, "pp2": {"pipeline_model_parallel_size": 2}}


def _eval_worker(rank, world):
    import dataclasses

    from layouts import config_dict

    from megatron_simpo import parallel
    from megatron_simpo.config import RunConfig
    from megatron_simpo.evaluate import collate_group, score_pairs
    from megatron_simpo.train import Trainer

    parallel.init_distributed()
    pairs = varied_pairs(11)  # odd: a short last micro-batch (and, at DP2, uneven slices)
    for name, overrides in EVAL_LAYOUTS.items():
        raw = config_dict("tp1", str(VARIED), None)
        raw["parallel"] = dict(overrides)
        raw["train"].update(SDPA, seq_length=SEQ_LENGTH, micro_batch_size=3, global_batch_size=12)
        raw["train"].update(pack_pairs=False, prefix_sharing=False, fused_loss_head=False)
        trainer = Trainer(RunConfig.from_dict(raw))
        trainer.setup()
        cfg = trainer.cfg
        ref = score_pairs(trainer.model, cfg, pairs)
        for mode, flags in MODES.items():
            if mode == "padded":
                continue
            train = dataclasses.replace(cfg.train, **flags)
            packed_cfg = dataclasses.replace(cfg, train=train)
            # It really scores packed rows: fewer computed positions than the padded batches.
            (a,), _ = collate_group([pairs[:3]], cfg, 1)
            (b,), _ = collate_group([pairs[:3]], packed_cfg, 1)
            assert "segment_ids" in b and b["tokens"].numel() < a["tokens"].numel(), mode
            got = score_pairs(trainer.model, packed_cfg, pairs)
            assert (got is None) == (ref is None), (name, mode)
            if ref is None:
                continue
            assert len(got) == len(ref) == len(pairs)
            for key in ref[0]:
                want = torch.tensor([r[key] for r in ref])
                err = (torch.tensor([r[key] for r in got]) - want).abs().max().item()
                tol = LOGP_ATOL * max(1.0, want.abs().max().item())
                assert err <= tol, (name, mode, key, err, tol)
        parallel.destroy_model_parallel()


def test_evaluation_packed_matches_padded_per_pair():
    run_gloo(2, _eval_worker)
