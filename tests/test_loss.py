"""The SimPO math against float64 hand-written references and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_simpo.loss import batch_totals, sequence_logps, simpo_loss


def reference_pair_losses(c, r, beta, gamma, kind, eps):
    """Scalar float64 transcription of the SimPO paper's loss, one pair at a time."""
    out = []
    for i in range(len(c)):
        m = beta * c[i] - beta * r[i] - gamma
        if kind == "sigmoid":
            sig = 1 / (1 + math.exp(-m))
            loss = -(1 - eps) * math.log(sig) - eps * math.log(1 - sig)
        else:
            loss = max(0.0, 1 - m)
        out.append(loss)
    return out


def reference_objective(c, r, n, w, beta, gamma, kind, eps, sft, reduction):
    """The documented batch objective, written out with plain floats (loss.py docstring):
    sum w l / sum w + sft * NLL, NLL pooled over chosen tokens ("token") or per pair ("pair").
    Returns (objective, nll)."""
    pair = reference_pair_losses(c, r, beta, gamma, kind, eps)
    wsum = sum(w)
    pref = sum(wi * li for wi, li in zip(w, pair)) / wsum
    if reduction == "token":  # S_i = -c_i * n_i: summed NLL of the chosen tokens
        nll = sum(wi * (-ci * ni) for wi, ci, ni in zip(w, c, n)) / sum(
            wi * ni for wi, ni in zip(w, n)
        )
    else:
        nll = sum(wi * (-ci) for wi, ci in zip(w, c)) / wsum
    return pref + sft * nll, nll


def random_batch(n: int, seed: int):
    """Mean log-probs, chosen token counts (one-token responses included) and non-unit weights
    (one of them 0)."""
    g = torch.Generator().manual_seed(seed)
    c = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    r = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(1, 40, (n,), generator=g).double()
    tokens[0] = 1
    w = torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.25
    w[3] = 0.0
    return c, r, tokens, w


@pytest.mark.parametrize(
    "kind,eps,sft",
    [
        ("sigmoid", 0.0, 0.0),
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.2, 0.5),
        ("hinge", 0.0, 0.0),
        ("hinge", 0.0, 1.0),
    ],
)
@pytest.mark.parametrize("convention", ["ratio", "absolute"])
@pytest.mark.parametrize("reduction", ["token", "pair"])
def test_matches_float64_reference(kind, eps, sft, convention, reduction):
    c, r, n, w = random_batch(16, seed=0)
    beta, ratio = 2.5, 0.4
    kwargs = {"gamma_beta_ratio": ratio} if convention == "ratio" else {"simpo_gamma": ratio * 2.5}
    out = simpo_loss(
        c,
        r,
        beta=beta,
        loss_type=kind,
        label_smoothing=eps,
        sft_weight=sft,
        sft_reduction=reduction,
        weights=w,
        chosen_tokens=n,
        **kwargs,
    )
    args = (c.tolist(), r.tolist(), n.tolist(), w.tolist(), beta, ratio * beta, kind, eps, sft)
    want, want_nll = reference_objective(*args, reduction)
    # float64 throughout: agreement to ~1e-15 relative; 1e-12 leaves room for log1p/exp paths.
    assert out.losses.mean().item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert out.nll.mean().item() == pytest.approx(want_nll, rel=1e-12, abs=1e-12)
    assert out.losses[3].item() == 0.0 and out.nll[3].item() == 0.0  # weight 0: no share
    pair = reference_pair_losses(*args[:2], beta, ratio * beta, kind, eps)
    pair = torch.tensor(pair, dtype=torch.float64)
    torch.testing.assert_close(out.pair_losses, pair + sft * -c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, beta * c)
    torch.testing.assert_close(out.rejected_rewards, beta * r)


@pytest.mark.parametrize("reduction", ["token", "pair"])
def test_unit_weights_token_reduction_is_trl_pooled_nll(reduction):
    """With unit weights "token" is TRL's nll_loss: the mean NLL over all chosen tokens of the
    batch, from per-token log-probs; "pair" is the mean of per-pair means."""
    g = torch.Generator().manual_seed(4)
    lengths = [1, 3, 17, 6]
    token_logps = [-torch.rand(k, generator=g, dtype=torch.float64) * 4 for k in lengths]
    c = torch.stack([t.mean() for t in token_logps])
    r = c - 0.3
    out = simpo_loss(
        c,
        r,
        beta=2.0,
        simpo_gamma=0.5,
        sft_weight=1.0,
        sft_reduction=reduction,
        chosen_tokens=torch.tensor(lengths, dtype=torch.float64),
    )
    pooled = -torch.cat(token_logps).mean().item()
    per_pair = -c.mean().item()
    want = pooled if reduction == "token" else per_pair
    assert abs(pooled - per_pair) > 0.05  # the two definitions differ on this batch
    assert out.nll.mean().item() == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("reduction", ["token", "pair"])
def test_micro_batches_with_global_totals_give_the_global_objective(reduction):
    """Megatron sums the per-micro-batch loss sums over micro-batches and data-parallel ranks
    and divides by the summed pair count; with the global batch's totals every split of the
    batch gives the objective of the whole batch, and the same gradients."""
    c, r, n, w = random_batch(12, seed=3)
    kw = dict(beta=2.0, simpo_gamma=0.7, sft_weight=0.3, sft_reduction=reduction)
    c_full = c.clone().requires_grad_()
    whole = simpo_loss(c_full, r, weights=w, chosen_tokens=n, **kw)
    whole.losses.mean().backward()
    totals = batch_totals(w.tolist(), n.tolist())
    for splits in ([3, 3, 3, 3], [1, 5, 6], [12]):
        c_parts = c.clone().requires_grad_()
        total = 0.0
        for idx in torch.arange(12).split(splits):
            part = simpo_loss(
                c_parts[idx], r[idx], weights=w[idx], chosen_tokens=n[idx], totals=totals, **kw
            )
            total = total + part.losses.sum()
        (total / 12).backward()
        # Same sums in another order, float64: ~1e-16 relative; 1e-13 is generous.
        assert (total / 12).item() == pytest.approx(whole.losses.mean().item(), rel=1e-13)
        torch.testing.assert_close(c_parts.grad, c_full.grad, rtol=1e-13, atol=1e-15)
    # Without global totals each micro-batch would be its own weighted mean: not the same.
    local = sum(
        simpo_loss(c[i], r[i], weights=w[i], chosen_tokens=n[i], **kw).losses.sum()
        for i in torch.arange(12).split(4)
    )
    assert abs(local.item() / 12 - whole.losses.mean().item()) > 1e-3


def test_weight_zero_pair_is_as_if_absent():
    c, r, n, w = random_batch(8, seed=5)
    kw = dict(beta=2.0, simpo_gamma=0.5, sft_weight=0.4)
    keep = w > 0
    with_zero = simpo_loss(c, r, weights=w, chosen_tokens=n, **kw)
    without = simpo_loss(c[keep], r[keep], weights=w[keep], chosen_tokens=n[keep], **kw)
    assert with_zero.losses.sum().item() / 8 == pytest.approx(without.losses.mean().item(), 1e-13)
    all_zero = simpo_loss(c, r, weights=torch.zeros(8, dtype=torch.float64), chosen_tokens=n, **kw)
    assert all_zero.losses.abs().max().item() == 0.0  # nothing to learn, not 0/0 = NaN


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_negative_or_non_finite_weights_are_refused(bad):
    c, r, n, w = random_batch(4, seed=6)
    w[1] = bad
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        simpo_loss(c, r, beta=2.0, simpo_gamma=0.5, weights=w, chosen_tokens=n)


def test_margin_equal_to_gamma_over_beta_gives_log2():
    beta, ratio = 3.0, 0.5
    r = -torch.rand(8, dtype=torch.float64) * 4
    c = r + ratio  # r_w - r_l = beta * 0.5 = gamma
    out = simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio)
    torch.testing.assert_close(out.losses, torch.full_like(c, math.log(2)), rtol=0, atol=1e-14)
    hinge = simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio, loss_type="hinge")
    torch.testing.assert_close(hinge.losses, torch.ones_like(c), rtol=0, atol=1e-14)


def test_large_margins_are_finite():
    c = torch.tensor([0.0, -200.0], dtype=torch.float64)
    r = torch.tensor([-200.0, 0.0], dtype=torch.float64)
    out = simpo_loss(c, r, beta=10.0, gamma_beta_ratio=0.5, label_smoothing=0.1)
    assert torch.isfinite(out.losses).all()
    # margin -2005: -log sigmoid(m) ~ -m for very negative m
    assert out.losses[1].item() == pytest.approx(0.9 * 2005, rel=1e-6)


@pytest.mark.parametrize(
    "kind,eps,sft", [("sigmoid", 0.0, 0.0), ("sigmoid", 0.15, 0.3), ("hinge", 0.0, 0.2)]
)
def test_gradcheck(kind, eps, sft):
    g = torch.Generator().manual_seed(1)
    c = (-torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()
    r = (-torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.rand(6, generator=g, dtype=torch.float64)

    def f(c, r):
        return simpo_loss(
            c,
            r,
            beta=2.0,
            gamma_beta_ratio=0.3,
            loss_type=kind,
            label_smoothing=eps,
            sft_weight=sft,
            weights=w,
            chosen_tokens=torch.arange(1.0, 7.0, dtype=torch.float64),
        ).losses

    assert torch.autograd.gradcheck(f, (c, r))


def test_sigmoid_gradient_closed_form():
    # dL/dc = -beta * sigmoid(-m) for the plain sigmoid loss.
    c = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    beta, gamma = 2.0, 0.6
    simpo_loss(c, r, beta=beta, simpo_gamma=gamma).losses.sum().backward()
    m = beta * (c.detach() - r) - gamma
    torch.testing.assert_close(c.grad, -beta * torch.sigmoid(-m), rtol=1e-13, atol=1e-13)


def test_exactly_one_margin_convention():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="exactly one"):
        simpo_loss(x, x, beta=1.0, gamma_beta_ratio=0.5, simpo_gamma=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        simpo_loss(x, x, beta=1.0)
    with pytest.raises(ValueError, match="sigmoid"):
        simpo_loss(x, x, beta=1.0, simpo_gamma=0.0, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown loss_type"):
        simpo_loss(x, x, beta=1.0, simpo_gamma=0.0, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown sft_reduction"):
        simpo_loss(x, x, beta=1.0, simpo_gamma=0.0, sft_reduction="seq")


def test_sequence_logps_sum_mean_count():
    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(3, 7, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 7)
    mask[0, 2:5] = 1
    mask[1, 0:7] = 1
    mask[2, 6] = 1
    total, mean, count = sequence_logps(lp, mask)
    for i in range(3):
        sel = lp[i][mask[i].bool()]
        assert count[i].item() == len(sel)
        assert total[i].item() == pytest.approx(sel.sum().item(), abs=1e-14)
        assert mean[i].item() == pytest.approx(sel.mean().item(), abs=1e-14)


def test_sequence_logps_accumulates_in_fp32_for_half_inputs():
    lp = torch.full((1, 4096), -2.0, dtype=torch.float16)
    total, mean, _ = sequence_logps(lp, torch.ones(1, 4096))
    assert total.dtype == torch.float32
    assert total.item() == -8192.0  # fp16 sums saturate/lose precision well before this
    assert mean.item() == -2.0


def test_empty_response_is_refused():
    lp = torch.randn(2, 5)
    mask = torch.ones(2, 5)
    mask[1] = 0
    with pytest.raises(ValueError, match="zero response tokens"):
        sequence_logps(lp, mask)


# ---------------------------------------------------------------- the step's reduction


def _step_metrics(pairs, mbs, loss_cfg, seed=11):
    """The training step's reduction of fresh random token log-probs, without a model: each
    micro-batch through ``pair_metrics`` and ``micro_batch_report``, the sums through
    ``summarize_totals`` (what ``reduce_reports`` does after its all-reduce)."""
    from megatron_simpo.batch_loss import (
        REPORT_KEYS,
        micro_batch_report,
        pair_metrics,
        summarize_totals,
    )
    from megatron_simpo.data import PairBatcher

    batcher = PairBatcher(
        pairs, global_batch_size=len(pairs), micro_batch_size=mbs, dp_rank=0, dp_size=1, seed=0
    )
    g = torch.Generator().manual_seed(seed)
    table = -torch.rand(200, 64, generator=g, dtype=torch.float64) * 3
    totals = dict.fromkeys(REPORT_KEYS, 0.0)
    rows = []
    for mb in batcher.micro_batches(0)[0]:
        b = mb["weights"].shape[0]
        # The log-prob of a target depends only on its id and position, so every micro-batch
        # split sees the same per-pair values.
        positions = torch.arange(mb["labels"].shape[1]).expand_as(mb["labels"])
        token_logps = table[mb["labels"], positions]
        losses, nll, per_pair = pair_metrics(loss_cfg, token_logps, mb)
        report = micro_batch_report(losses, nll, per_pair, mb)
        for k in REPORT_KEYS:
            totals[k] += report[k].item()
        rows += [{k: float(v[j]) for k, v in per_pair.items()} for j in range(b)]
    return summarize_totals(totals), rows


def _weighted_pairs():
    import random

    from megatron_simpo.data import Pair

    rng = random.Random(9)

    def ids(k):
        return tuple(rng.randrange(3, 200) for _ in range(k))

    weights = [1.0, 0.0, 2.5, 0.5, 0.0, 1.5, 3.0, 0.25]
    return [
        Pair(
            ids(rng.randint(1, 6)),
            ids(1 if i == 2 else rng.randint(1, 9)),
            ids(rng.randint(1, 9)),
            w,
        )
        for i, w in enumerate(weights)
    ]


# The report sums are fp32, as in training (one rounding ~6e-8 relative per sum; a few sums).
REPORT_RTOL = 1e-6


@pytest.mark.parametrize("reduction", ["token", "pair"])
def test_step_metrics_exclude_weight_zero_pairs_and_loss_is_weighted_mean(reduction):
    from megatron_simpo.config import LossConfig
    from megatron_simpo.evaluate import summarize

    pairs = _weighted_pairs()
    cfg = LossConfig(beta=2.0, simpo_gamma=0.6, sft_weight=0.3, sft_reduction=reduction)
    got, rows = _step_metrics(pairs, 2, cfg)
    keep = [r for r in rows if r["weight"] > 0]
    assert len(rows) == 8 and len(keep) == 6
    for key in (
        "rewards/chosen",
        "rewards/accuracies",
        "rewards/margins",
        "logps/rejected",
        "length/chosen",
    ):
        assert got[key] == pytest.approx(sum(r[key] for r in keep) / 6, rel=REPORT_RTOL), key
    c = [r["logps/chosen"] for r in rows]
    want, want_nll = reference_objective(
        c,
        [r["logps/rejected"] for r in rows],
        [r["length/chosen"] for r in rows],
        [r["weight"] for r in rows],
        2.0,
        0.6,
        "sigmoid",
        0.0,
        0.3,
        reduction,
    )
    assert got["loss"] == pytest.approx(want, rel=REPORT_RTOL)
    assert got["nll_loss"] == pytest.approx(want_nll, rel=REPORT_RTOL)
    assert got["pairs"] == 8
    # Another micro-batch split (layout) gives the same numbers ...
    other, _ = _step_metrics(pairs, 4, cfg)
    for key, value in got.items():
        if key not in ("tokens", "tokens_effective"):
            assert other[key] == pytest.approx(value, rel=REPORT_RTOL), key
    # ... and evaluate's summary of the same per-pair rows too.
    ev = summarize(rows, cfg)
    for key in ("loss", "nll_loss", "rewards/chosen", "rewards/accuracies", "length/chosen"):
        assert ev[key] == pytest.approx(got[key], rel=REPORT_RTOL), key
