"""The SimPO math against float64 hand-written references and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_simpo.loss import sequence_logps, simpo_loss


def reference_loss(c, r, beta, gamma, kind, eps, sft, w):
    """Scalar float64 transcription of the SimPO paper's loss, one pair at a time."""
    out = []
    for i in range(len(c)):
        m = beta * c[i] - beta * r[i] - gamma
        if kind == "sigmoid":
            sig = 1 / (1 + math.exp(-m))
            loss = -(1 - eps) * math.log(sig) - eps * math.log(1 - sig)
        else:
            loss = max(0.0, 1 - m)
        loss += sft * (-c[i])
        out.append(loss * w[i])
    return out


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
def test_matches_float64_reference(kind, eps, sft, convention):
    g = torch.Generator().manual_seed(0)
    c = -torch.rand(16, generator=g, dtype=torch.float64) * 3
    r = -torch.rand(16, generator=g, dtype=torch.float64) * 3
    w = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    beta, ratio = 2.5, 0.4
    kwargs = {"gamma_beta_ratio": ratio} if convention == "ratio" else {"simpo_gamma": ratio * 2.5}
    out = simpo_loss(
        c, r, beta=beta, loss_type=kind, label_smoothing=eps, sft_weight=sft, weights=w, **kwargs
    )
    ref = reference_loss(c.tolist(), r.tolist(), beta, ratio * beta, kind, eps, sft, w.tolist())
    # float64 throughout: agreement to ~1e-15 relative; 1e-12 leaves room for log1p/exp paths.
    torch.testing.assert_close(
        out.losses, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(out.chosen_rewards, beta * c)
    torch.testing.assert_close(out.rejected_rewards, beta * r)


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
