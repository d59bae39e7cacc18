"""Packed rows as THD sequences (``megatron_simpo/packed_seq.py``), Transformer Engine's path.

1. Pure tests: ``cu_seqlens`` of collated rows against a slow per-row walk (segments, trailing
   padding, rows without padding next to each other), the flattened layout, the refusal of
   prefix-shared rows.
2. The real tiny Megatron model (one gloo rank with the fused loss head; TP2+SP and PP2 on
   two): the same pairs padded, packed with the block mask and packed as THD sequences
   through ``GPTModel.forward(packed_seq_params=...)``: Megatron's own THD RoPE (per
   ``cu_seqlens`` span), layouts ``[1, t]`` / ``[t, 1, h]`` and the schedule's shapes. TE's
   kernel needs CUDA; on the CPU the core attention is ``SDPAttention``'s THD path (the dense
   reference of what TE computes from ``cu_seqlens``), so everything *around* the kernel is
   checked here and the kernel itself in ``tests/test_cuda.py``.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from conftest import run_gloo
from test_packing import (
    GRAD_RTOL,
    LOGP_ATOL,
    SEQ_LENGTH,
    VARIED,
    _run,
    magnitude,
    random_pairs,
    varied_pairs,
)

from megatron_simpo import packed_seq
from megatron_simpo.data.packing import collate_packed
from megatron_simpo.errors import ConfigError
from megatron_simpo.packed_seq import (
    cu_seqlens_from,
    flatten_rows,
    thd_allowed,
    thd_batch,
    trimmed_stream,
)


def slow_lengths(segment_ids: torch.Tensor) -> list[int]:
    """Sequence lengths by walking each row: a new sequence at a row start or an id change."""
    out = []
    for row in segment_ids.tolist():
        for j, sid in enumerate(row):
            if j == 0 or sid != row[j - 1]:
                out.append(0)
            out[-1] += 1
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cu_seqlens_match_the_segments_of_the_rows(seed):
    pairs = random_pairs(7, seed)
    mb = collate_packed(pairs, capacity=SEQ_LENGTH, prefix_sharing=False, pack=True, num_rows=4)
    cu, longest = cu_seqlens_from(mb["segment_ids"])
    lengths = slow_lengths(mb["segment_ids"])
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == mb["tokens"].numel()
    assert (cu[1:] - cu[:-1]).tolist() == lengths and longest == max(lengths)
    # Every scored sequence is one span: its 2b sequences plus the padding spans.
    padding = sum(int((r == 0).any()) for r in mb["segment_ids"])
    assert len(lengths) == 2 * len(pairs) + padding


def test_full_rows_side_by_side_stay_separate_sequences():
    # Two rows holding one segment each and no padding: both segment id 1, yet two sequences.
    seg = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 2, 0]])
    cu, longest = cu_seqlens_from(seg)
    assert cu.tolist() == [0, 3, 6, 7, 8, 9] and longest == 3
    allowed = thd_allowed(cu, 9)
    assert not allowed[3, 2] and allowed[5, 3] and not allowed[3, 4] and allowed[8, 8]
    assert allowed.sum() == 6 + 6 + 1 + 1 + 1


def test_flattened_batch_and_params():
    pairs = random_pairs(5, 4)
    mb = collate_packed(pairs, capacity=SEQ_LENGTH, prefix_sharing=False, pack=True)
    flat, params = thd_batch(mb)
    rows, s = mb["tokens"].shape
    for key in ("tokens", "labels", "position_ids", "seq_index", "loss_mask"):
        assert flat[key].shape == (1, rows * s) and torch.equal(flat[key][0], mb[key].flatten())
    assert torch.equal(flat["weights"], mb["weights"])
    assert params.qkv_format == "thd" and params.cu_seqlens_q is params.cu_seqlens_kv
    assert params.max_seqlen_q == params.max_seqlen_kv == int(mb["position_ids"].max()) + 1
    # Positions restart per segment, as Megatron's THD RoPE restarts per span.
    cu = params.cu_seqlens_q.tolist()
    pos = flat["position_ids"][0]
    for a, b in zip(cu[:-1], cu[1:]):
        assert pos[a:b].tolist() == list(range(b - a))


@pytest.mark.parametrize("seed,multiple", [(0, 8), (1, 64), (2, 1)])
def test_trimmed_stream_drops_trailing_padding(seed, multiple):
    """PP1: the real tokens of the rows, in order, each sequence its own span (rows that end
    and start with the same segment id stay apart), then one padding span up to the multiple."""
    pairs = random_pairs(7, seed)
    mb = collate_packed(pairs, capacity=SEQ_LENGTH, prefix_sharing=False, pack=True, num_rows=4)
    seg = mb["segment_ids"]
    index, cu = trimmed_stream(seg, multiple)
    n, full = int((seg != 0).sum()), seg.numel()
    t = min(-(-n // multiple) * multiple, full)
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == t
    real = [x for x in slow_lengths(seg) if x]  # per-row walk, padding spans left out
    real_lengths = []
    for row in seg.tolist():  # lengths of the non-padding sequences only
        for j, sid in enumerate(row):
            if sid and (j == 0 or sid != row[j - 1]):
                real_lengths.append(0)
            if sid:
                real_lengths[-1] += 1
    assert sum(real_lengths) == n and len(real) >= len(real_lengths)
    want = real_lengths + ([t - n] if t > n else [])
    assert (cu[1:] - cu[:-1]).tolist() == want
    flat, params = thd_batch(mb, multiple)
    assert flat["tokens"].shape == (1, t) and params.cu_seqlens_q is params.cu_seqlens_kv
    assert torch.equal(flat["tokens"][0, :n], mb["tokens"][seg != 0])
    assert torch.equal(flat["loss_mask"][0, :n], mb["loss_mask"][seg != 0])
    assert int(flat["loss_mask"][0, n:].sum()) == 0 and bool((flat["seq_index"][0, n:] == -1).all())
    assert bool((flat["segment_ids"][0, n:] == 0).all()) and index.numel() == n
    pos = flat["position_ids"][0]
    for a, b in zip(params.cu_seqlens_q[:-1].tolist(), params.cu_seqlens_q[1:].tolist()):
        assert pos[a:b].tolist() == list(range(b - a))  # RoPE restarts per span
    assert packed_seq.stream_multiple(1) == 64 and packed_seq.stream_multiple(3) == 192
    # Two full rows of segment 1 side by side stay two sequences after trimming.
    index, cu = trimmed_stream(torch.tensor([[1, 1, 1], [1, 1, 0]]), 1)
    assert cu.tolist() == [0, 3, 5] and index.tolist() == [0, 1, 2, 3, 4]


def test_prefix_shared_rows_have_no_thd_path():
    mb = collate_packed(random_pairs(3, 5), capacity=SEQ_LENGTH, prefix_sharing=True, pack=True)
    with pytest.raises(ConfigError, match="--prefix-sharing has no THD"):
        flatten_rows(mb)


# ---------------------------------------------------------------------------------------------
# The real model.

SDPA = {"attention_backend": "sdpa", "fused_loss_head": False}
LAYOUTS = {  # name -> (train overrides, parallel overrides, micro-batch size, world)
    "tp1_fused_head": ({**SDPA, "fused_loss_head": True, "loss_chunk_size": 7}, {}, 4, 1),
    "tp2_sp": (SDPA, {"tensor_model_parallel_size": 2, "sequence_parallel": True}, 4, 2),
    "pp2": (SDPA, {"pipeline_model_parallel_size": 2}, 2, 2),
}


def _thd_worker(rank, world, names):
    from layouts import config_dict

    from megatron_simpo import parallel
    from megatron_simpo.config import RunConfig
    from megatron_simpo.model import unwrap
    from megatron_simpo.train import Trainer

    parallel.init_distributed()
    pairs = varied_pairs(8)
    for name in names:
        train, overrides, mbs, _ = LAYOUTS[name]
        raw = config_dict("tp1", str(VARIED), None)
        raw["parallel"] = dict(overrides)
        raw["train"].update(train)
        raw["train"]["seq_length"] = SEQ_LENGTH
        trainer = Trainer(RunConfig.from_dict(raw))
        trainer.setup()
        ref, ref_pp, ref_grads, _ = _run(trainer, "padded", mbs, pairs)
        masked = _run(trainer, "packed", mbs, pairs)
        for chunk in trainer.model:  # what build_model sets for --attention-backend te
            unwrap(chunk).packed_seq_format = "thd"
        thd = _run(trainer, "packed", mbs, pairs)
        runs = [thd, masked]
        if trainer.cfg.parallel.pipeline_model_parallel_size == 1:
            # Trailing padding dropped (PP1): with a multiple of 8 instead of 64 the stream of
            # these short rows really is shorter than rows * s.
            lengths: list[tuple[int, int]] = []
            real = packed_seq.thd_batch

            def spy(batch, pad_multiple=None, real=real, lengths=lengths):
                out = real(batch, pad_multiple)
                lengths.append((out[0]["tokens"].shape[1], batch["tokens"].numel()))
                return out

            with (
                mock.patch.object(packed_seq, "stream_multiple", lambda tp: 8),
                mock.patch.object(packed_seq, "thd_batch", spy),
            ):
                runs.append(_run(trainer, "packed", mbs, pairs))
            # A multiple of 8, or the rows' own size where rounding up would exceed it.
            assert all(t % 8 == 0 or t == full for t, full in lengths), lengths
            assert any(t < full for t, full in lengths), lengths
        # fp32, same weights and pairs: as packed-vs-padded in test_packing (summation order
        # only, a few ulps per op). Against the masked packing too, which computes the same
        # sums over the same rows: a wrong span, a RoPE offset or a leaked token moves these
        # by 1e-2 or more.
        for got, got_pp, got_grads, _ in runs:
            assert got["pairs"] == ref["pairs"] == 8
            for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
                tol = LOGP_ATOL * magnitude(ref, key)
                assert abs(got[key] - ref[key]) <= tol, (name, key, got[key], ref[key])
            for key, want in ref_pp.items():
                err = (got_pp[key] - want).abs().max().item()
                assert err <= LOGP_ATOL * magnitude(ref_pp, key), (name, key, err)
            assert ref_grads.keys() == got_grads.keys() and ref_grads
            for n, g in ref_grads.items():
                scale, err = g.abs().max().item(), (got_grads[n] - g).abs().max().item()
                assert scale > 0 and err <= GRAD_RTOL * scale, (name, n, err, scale)
        parallel.destroy_model_parallel()


def test_thd_packing_matches_padded_on_one_rank():
    run_gloo(1, _thd_worker, ["tp1_fused_head"])


def test_thd_packing_matches_padded_under_tp_sp_and_pp():
    run_gloo(2, _thd_worker, ["tp2_sp", "pp2"])
