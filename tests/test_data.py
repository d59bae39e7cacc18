"""Batching: layout-independent global batches, DP sharding, collation masks."""

from __future__ import annotations

import pytest
import torch

from megatron_simpo.data import Pair, PairBatcher, collate, global_batch_indices


def test_global_batches_are_layout_independent_and_cover_epochs():
    n, g = 10, 4
    batches = [global_batch_indices(n, g, i, seed=3) for i in range(5)]
    stream = [i for b in batches for i in b]
    assert sorted(stream[:10]) == list(range(10))  # epoch 0 is a permutation
    assert sorted(stream[10:20]) == list(range(10))  # epoch 1 too, reshuffled
    assert stream[:10] != stream[10:20]
    assert batches == [global_batch_indices(n, g, i, seed=3) for i in range(5)]
    assert batches != [global_batch_indices(n, g, i, seed=4) for i in range(5)]


def _pairs(n):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        lp, lc, lr = (int(x) for x in torch.randint(1, 6, (3,), generator=g))
        out.append(
            Pair(
                tuple(range(1, lp + 1)), tuple([10 + i % 5] * lc), tuple([20 + i % 5] * lr), 1.0 + i
            )
        )
    return out


@pytest.mark.parametrize("dp,mbs", [(1, 1), (1, 4), (2, 2), (4, 1), (8, 1)])
def test_dp_ranks_partition_the_global_batch(dp, mbs):
    pairs = _pairs(13)
    reference = PairBatcher(
        pairs, global_batch_size=8, micro_batch_size=8, dp_rank=0, dp_size=1, seed=5
    )
    for it in range(3):
        (ref_mb,), ref_len = reference.micro_batches(it)
        seen = []
        for rank in range(dp):
            b = PairBatcher(
                pairs, global_batch_size=8, micro_batch_size=mbs, dp_rank=rank, dp_size=dp, seed=5
            )
            mbs_list, seq_len = b.micro_batches(it)
            assert seq_len <= ref_len and len(mbs_list) == 8 // (mbs * dp)
            seen += [mb["weights"] for mb in mbs_list]
        # Weights identify pairs (1.0 + index): same pairs, same order.
        assert torch.equal(torch.cat(seen), ref_mb["weights"])


def test_collate_scores_exactly_the_response_tokens():
    pairs = [Pair((1, 4, 5), (6, 7, 2), (8, 2)), Pair((1, 3), (9, 2), (10, 11, 12, 2))]
    mb = collate(pairs, seq_len=6)
    assert mb["tokens"].shape == (4, 6)
    rows = [
        ((1, 4, 5), (6, 7, 2)),
        ((1, 3), (9, 2)),
        ((1, 4, 5), (8, 2)),
        ((1, 3), (10, 11, 12, 2)),
    ]
    for r, (prompt, resp) in enumerate(rows):
        seq = list(prompt + resp)
        n = len(seq) - 1
        assert mb["tokens"][r, :n].tolist() == seq[:-1]
        assert mb["labels"][r, :n].tolist() == seq[1:]
        scored = mb["labels"][r][mb["loss_mask"][r].bool()].tolist()
        assert scored == list(resp), "only (and all) response tokens are scored"
        assert mb["loss_mask"][r, n:].sum() == 0
        assert mb["lengths"][r] == len(resp) and mb["seq_tokens"][r] == len(seq)
    assert mb["position_ids"][0].tolist() == list(range(6))


def test_sequence_parallel_padding_multiple():
    b = PairBatcher(
        _pairs(4),
        global_batch_size=4,
        micro_batch_size=2,
        dp_rank=0,
        dp_size=1,
        seed=0,
        pad_multiple=4,
    )
    _, seq_len = b.micro_batches(0)
    assert seq_len % 4 == 0


@pytest.mark.parametrize("uniform", [False, True])
def test_padding_per_micro_batch_or_uniform_under_pipelining(uniform):
    pairs = _pairs(8)
    b = PairBatcher(
        pairs,
        global_batch_size=8,
        micro_batch_size=2,
        dp_rank=0,
        dp_size=1,
        seed=0,
        uniform_length=uniform,
    )
    mbs, seq_len = b.micro_batches(0)
    idx = global_batch_indices(8, 8, 0, seed=0)
    longest = [
        max(
            len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)) - 1
            for i in idx[k : k + 2]
        )
        for k in range(0, 8, 2)
    ]
    widths = [mb["tokens"].shape[1] for mb in mbs]
    assert seq_len == max(longest)
    assert widths == ([max(longest)] * 4 if uniform else longest)


def _long_tail(n: int, seed: int = 1) -> list[Pair]:
    """Pairs of 3..140 tokens (prompt + longer response), unit weights."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lp, lc, lr = (int(x) for x in torch.randint(1, 70, (3,), generator=g))
        out.append(Pair(tuple([3] * lp), tuple([4] * lc), tuple([5] * lr)))
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_pipeline_micro_batches_padded_to_their_own_length_in_buckets(pack):
    """Under pipeline parallelism with variable shapes each micro-batch is as wide as its own
    longest row rounded up to the bucket (never beyond the capacity rounded to the SP multiple);
    with fixed shapes all share the slice's widest."""
    from megatron_simpo.config import ParallelConfig
    from megatron_simpo.data.batching import padding_for
    from megatron_simpo.data.packing import pack_rows, row_width

    pairs = _long_tail(16)
    p = ParallelConfig(
        pipeline_model_parallel_size=2, tensor_model_parallel_size=2, sequence_parallel=True
    )
    kw = dict(global_batch_size=16, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    kw.update(capacity=150, pack_pairs=pack)
    var = PairBatcher(pairs, **kw, **padding_for(p, variable_seq_lengths=True))
    fixed = PairBatcher(pairs, **kw, **padding_for(p, variable_seq_lengths=False))
    assert padding_for(p, True) == {"pad_multiple": 2, "uniform_length": False, "bucket": 64}
    assert padding_for(p, False) == {"pad_multiple": 2, "uniform_length": True, "bucket": 1}
    mbs, seq_len = var.micro_batches(0)
    fixed_mbs, fixed_len = fixed.micro_batches(0)
    idx = global_batch_indices(16, 16, 0, seed=0)
    groups = [[pairs[i] for i in idx[k : k + 2]] for k in range(0, 16, 2)]
    if pack:
        own = [row_width(pack_rows(g, 150, prefix_sharing=False, pack=True)) for g in groups]
    else:
        own = [
            max(len(q.prompt_ids) + max(len(q.chosen_ids), len(q.rejected_ids)) - 1 for q in g)
            for g in groups
        ]
    expected = [min(-(-w // 64) * 64, 150) for w in own]  # the cap: 150, even
    widths = [mb["tokens"].shape[1] for mb in mbs]
    assert widths == expected and len(set(widths)) > 1
    assert {mb["tokens"].shape[1] for mb in fixed_mbs} == {fixed_len}
    assert fixed_len == -(-max(own) // 2) * 2 and seq_len == max(widths)
    # Same pairs, same targets: only padding differs.
    for a, b in zip(mbs, fixed_mbs):
        assert a["loss_mask"].sum() == b["loss_mask"].sum()
        assert torch.equal(a["weights"], b["weights"])


def test_variable_seq_lengths_only_where_megatron_can_exchange_shapes():
    from megatron_simpo import parallel
    from megatron_simpo.config import RunConfig

    def cfg(**p):
        c = RunConfig()
        for k, v in p.items():
            setattr(c.parallel, k, v)
        return c

    assert not parallel.variable_seq_lengths(cfg())  # no pipeline: nothing exchanged
    assert parallel.variable_seq_lengths(cfg(pipeline_model_parallel_size=2))
    assert not parallel.variable_seq_lengths(
        cfg(pipeline_model_parallel_size=2, variable_seq_lengths=False)
    )
    # The interleaved schedule on gloo crosses the shape exchange (see parallel.py).
    vpp = cfg(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1)
    assert parallel.variable_seq_lengths(vpp) == torch.cuda.is_available()
