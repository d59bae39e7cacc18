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
