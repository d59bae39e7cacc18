"""The preference objectives of ``loss.OBJECTIVES`` against float64 hand-written formulas, closed
forms, autograd, and (where ``trl`` is importable) TRL's own loss code on the same log-probs."""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from megatron_simpo.loss import (
    NEEDS_REFERENCE,
    OBJECTIVES,
    PairLogps,
    batch_totals,
    log1mexp,
    simpo_loss,
)

# float64 throughout: the implementation and the scalar references differ only in the order of
# a handful of operations on O(1..100) numbers, so 1e-12 relative leaves ~4 orders of slack.
RTOL = 1e-12
ATOL = 1e-12


F64 = torch.float64


def subset(p: PairLogps, index) -> PairLogps:
    """The pairs ``index`` (a slice or list) of ``p``."""
    return PairLogps(*(None if v is None else v[index] for v in p))


def make_pairs(seed: int, b: int = 7, ref: bool = True, dtype=F64) -> PairLogps:
    """Random pairs with uneven token counts, including one-token responses; summed log-probs
    are count * (mean log-prob per token in (-2.5, -0.05)), the reference's a perturbed copy."""
    g = torch.Generator().manual_seed(seed)
    n_c = torch.randint(1, 40, (b,), generator=g).to(dtype)
    n_r = torch.randint(1, 40, (b,), generator=g).to(dtype)
    n_c[0], n_r[1] = 1, 1  # one-token responses
    mean = lambda: -(0.05 + 2.45 * torch.rand(b, generator=g, dtype=dtype))  # noqa: E731
    c, r = n_c * mean(), n_r * mean()
    if not ref:
        return PairLogps(c, r, n_c, n_r)
    c0 = c + n_c * 0.3 * torch.randn(b, generator=g, dtype=dtype)
    r0 = r + n_r * 0.3 * torch.randn(b, generator=g, dtype=dtype)
    return PairLogps(c, r, n_c, n_r, c0, r0)


def make_weights(seed: int, b: int = 7) -> torch.Tensor:
    """Non-unit positive weights, one pair of weight 0."""
    g = torch.Generator().manual_seed(seed + 1000)
    w = 0.2 + 2.3 * torch.rand(b, generator=g, dtype=F64)
    w[2] = 0.0
    return w


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def reference_pair(name: str, p: dict, o: dict) -> tuple[float, float, float, float, dict]:
    """One pair, written from the papers/TRL with plain floats: ``(l, reward_c, reward_r,
    nll_weight, extra metrics)``. ``p`` has c, r, c0, r0, nc, nr."""
    beta, eps = o["beta"], o.get("label_smoothing", 0.0)
    c, r, nc, nr = p["c"], p["r"], p["nc"], p["nr"]
    if name == "simpo":
        mc, mr = c / nc, r / nr
        m = beta * mc - beta * mr - o["simpo_gamma"]
        loss = smoothed(m, eps) if o.get("loss_type", "sigmoid") == "sigmoid" else max(0, 1 - m)
        return loss, beta * mc, beta * mr, o.get("sft_weight", 0.0), {}
    if name == "cpo":
        kind, alpha = o.get("loss_type", "sigmoid"), o.get("cpo_alpha", 1.0)
        if kind == "ipo":  # TRL scores mean log-probs for CPO's ipo
            mc, mr = c / nc, r / nr
            return (mc - mr - 1 / (2 * beta)) ** 2, beta * mc, beta * mr, alpha, {}
        loss = smoothed(beta * (c - r), eps) if kind == "sigmoid" else max(0, 1 - beta * (c - r))
        return loss, beta * c, beta * r, alpha, {}
    if name == "orpo":
        mc, mr = c / nc, r / nr
        # odds p / (1 - p) of the per-token geometric-mean probability, straight from eq. 4
        pc, pr = math.exp(mc), math.exp(mr)
        log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        extra = {"log_odds_ratio": logsig(log_odds), "log_odds_chosen": log_odds}
        return -beta * logsig(log_odds), beta * mc, beta * mr, o.get("orpo_alpha", 1.0), extra
    dc, dr = c - p["c0"], r - p["r0"]
    if name == "dpo":
        loss = smoothed(beta * (dc - dr), eps)
    elif name == "dpo-norm":
        loss = smoothed(beta * (dc / nc - dr / nr), eps)
    elif name == "ipo":
        loss = (dc / nc - dr / nr - 1 / (2 * beta)) ** 2
    elif name == "dpo-hinge":
        loss = max(0.0, 1 - beta * (dc - dr))
    return loss, beta * dc, beta * dr, o.get("sft_weight", 0.0), {}


def reference_objective(name, logps: PairLogps, w: list[float], o: dict, reduction: str):
    """The batch objective ``sum w l / sum w + nll_weight * NLL`` (loss.py docstring) with the
    per-pair references; returns (objective, nll, per-pair tuples)."""
    pairs = []
    for i in range(len(w)):
        p = {
            k: float(v[i])
            for k, v in zip(("c", "r", "nc", "nr", "c0", "r0"), logps)
            if v is not None
        }
        pairs.append(reference_pair(name, p, o))
    c, nc = logps.chosen.tolist(), logps.chosen_tokens.tolist()
    pref = sum(wi * q[0] for wi, q in zip(w, pairs)) / sum(w)
    if reduction == "token":
        nll = sum(wi * -ci for wi, ci in zip(w, c)) / sum(wi * ni for wi, ni in zip(w, nc))
    else:
        nll = sum(wi * -ci / ni for wi, ci, ni in zip(w, c, nc)) / sum(w)
    return pref + pairs[0][3] * nll, nll, pairs


CASES = [
    ("simpo", dict(beta=2.0, simpo_gamma=0.5)),
    ("simpo", dict(beta=2.5, simpo_gamma=0.3, label_smoothing=0.1, sft_weight=0.4)),
    ("simpo", dict(beta=2.0, simpo_gamma=0.5, loss_type="hinge")),
    ("dpo", dict(beta=0.1)),
    ("dpo", dict(beta=0.3, label_smoothing=0.2, sft_weight=0.5)),
    ("dpo-norm", dict(beta=5.0)),
    ("dpo-norm", dict(beta=3.0, label_smoothing=0.1)),
    ("ipo", dict(beta=0.2)),
    ("ipo", dict(beta=1.5, sft_weight=0.3)),
    ("dpo-hinge", dict(beta=0.1)),
    ("cpo", dict(beta=0.1)),
    ("cpo", dict(beta=0.5, cpo_alpha=0.3, label_smoothing=0.1)),
    ("cpo", dict(beta=0.2, loss_type="hinge", cpo_alpha=0.5)),
    ("cpo", dict(beta=0.7, loss_type="ipo")),
    ("orpo", dict(beta=0.1)),
    ("orpo", dict(beta=1.0)),
    ("orpo", dict(beta=0.3, orpo_alpha=0.4)),
]


def ids(case):
    return "-".join([case[0], *(f"{k}={v}" for k, v in case[1].items())])


def test_registry_names_are_the_issue_contract():
    assert set(OBJECTIVES) == {"simpo", "dpo", "ipo", "dpo-hinge", "dpo-norm", "cpo", "orpo"}
    assert NEEDS_REFERENCE == {"dpo", "ipo", "dpo-hinge", "dpo-norm"}


@pytest.mark.parametrize("reduction", ["token", "pair"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_matches_float64_reference(case, reduction):
    name, opts = case
    seed = zlib.crc32(f"{ids(case)}-{reduction}".encode()) % 10_000  # stable across runs
    logps = make_pairs(seed, ref=name in NEEDS_REFERENCE)
    w = make_weights(seed)
    out = OBJECTIVES[name](logps, **opts, sft_reduction=reduction, weights=w)
    objective, nll, pairs = reference_objective(name, logps, w.tolist(), opts, reduction)
    expect = lambda k: torch.tensor([q[k] for q in pairs], dtype=F64)  # noqa: E731
    # Without totals these pairs are the batch: the mean contribution is the objective.
    torch.testing.assert_close(
        out.losses.mean(), torch.tensor(objective, dtype=F64), rtol=RTOL, atol=ATOL
    )
    torch.testing.assert_close(out.nll.mean(), torch.tensor(nll, dtype=F64), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.chosen_rewards, expect(1), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.rejected_rewards, expect(2), rtol=RTOL, atol=ATOL)
    own = expect(0) + pairs[0][3] * (-logps.chosen / logps.chosen_tokens)
    torch.testing.assert_close(out.pair_losses, own, rtol=RTOL, atol=ATOL)
    for key in pairs[0][4]:
        got = out.metrics[key]
        torch.testing.assert_close(
            got, torch.tensor([q[4][key] for q in pairs], dtype=F64), rtol=RTOL, atol=ATOL
        )
    assert set(out.metrics) == set(pairs[0][4])


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_micro_batches_with_global_totals_give_the_global_objective(case):
    """Split into uneven micro-batches, contributions scaled by the global totals sum (over
    N) to the objective of the whole batch: the layout-independence the training step needs."""
    name, opts = case
    logps = make_pairs(11, b=9, ref=name in NEEDS_REFERENCE)
    w = make_weights(11, b=9)
    fn = OBJECTIVES[name]
    whole = fn(logps, **opts, weights=w).losses.sum()
    totals = batch_totals(w.tolist(), logps.chosen_tokens.tolist())
    parts = [slice(0, 1), slice(1, 5), slice(5, 9)]
    split = sum(
        fn(
            subset(logps, s),
            **opts,
            weights=w[s],
            totals=totals,
        ).losses.sum()
        for s in parts
    )
    torch.testing.assert_close(split, whole, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_weight_zero_pair_is_as_if_absent(case):
    name, opts = case
    logps = make_pairs(5, ref=name in NEEDS_REFERENCE)
    w = make_weights(5)  # w[2] == 0
    keep = [i for i in range(len(w)) if i != 2]
    fn = OBJECTIVES[name]
    full = fn(logps, **opts, weights=w).losses
    kept = fn(subset(logps, keep), **opts, weights=w[keep]).losses
    assert full[2] == 0
    # Each batch's objective is its mean contribution (weighted mean + NLL pooled by weight).
    torch.testing.assert_close(full.mean(), kept.mean(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_gradcheck(case):
    """Analytic gradients of the contributions w.r.t. the policy's log-probs match finite
    differences (float64; the data keep the hinge away from its kink)."""
    name, opts = case
    logps = make_pairs(3, b=5, ref=name in NEEDS_REFERENCE)
    w = make_weights(3, b=5)
    fn = OBJECTIVES[name]

    def f(c, r):
        return fn(logps._replace(chosen=c, rejected=r), **opts, weights=w).losses

    c, r = (logps.chosen.clone().requires_grad_(), logps.rejected.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, (c, r))


# --- closed forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("name", ["dpo", "dpo-norm"])
def test_dpo_at_the_reference_is_log2(name, eps):
    p = make_pairs(21)
    at_ref = p._replace(ref_chosen=p.chosen.clone(), ref_rejected=p.rejected.clone())
    out = OBJECTIVES[name](at_ref, beta=0.7, label_smoothing=eps)
    torch.testing.assert_close(
        out.pair_losses, torch.full_like(p.chosen, math.log(2)), rtol=RTOL, atol=ATOL
    )
    assert bool((out.chosen_rewards == 0).all() and (out.rejected_rewards == 0).all())


def preference_logit(name: str, p: PairLogps, beta: float) -> torch.Tensor:
    """The argument ``beta z`` of the conservative sigmoid loss of dpo, dpo-norm and cpo."""
    if name == "cpo":
        return beta * (p.chosen - p.rejected)
    dc, dr = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    if name == "dpo-norm":
        return beta * (dc / p.chosen_tokens - dr / p.rejected_tokens)
    return beta * (dc - dr)


@pytest.mark.parametrize("name", ["dpo", "dpo-norm", "cpo"])
def test_label_smoothing_limits(name):
    """eps flips the labels: l_eps(pair) = l_(1-eps)(swapped pair). At eps = 1/2 the labels
    carry no information: l = log 2 + log cosh(beta z / 2), even in z and minimal (log 2) at
    z = 0."""
    p = make_pairs(22, ref=name in NEEDS_REFERENCE)
    swapped = PairLogps(
        p.rejected, p.chosen, p.rejected_tokens, p.chosen_tokens, p.ref_rejected, p.ref_chosen
    )
    opts = {"cpo_alpha": 0.0} if name == "cpo" else {}  # the preference term alone
    fn, beta = OBJECTIVES[name], 0.9
    for eps in (0.1, 0.3):
        a = fn(p, beta=beta, label_smoothing=eps, **opts).pair_losses
        b = fn(swapped, beta=beta, label_smoothing=1 - eps, **opts).pair_losses
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    half = fn(p, beta=beta, label_smoothing=0.5, **opts).pair_losses
    z = preference_logit(name, p, beta)
    torch.testing.assert_close(
        half, math.log(2) + torch.log(torch.cosh(z / 2)), rtol=RTOL, atol=ATOL
    )
    assert bool((half >= math.log(2)).all())


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_dpo_gradient_closed_form(eps):
    """d l / d c = -beta ((1 - eps) sigmoid(-beta z) - eps sigmoid(beta z)), z the log-ratio
    difference; unit weights, so the contribution of pair i is l_i."""
    p = make_pairs(23)
    beta = 0.4
    c = p.chosen.clone().requires_grad_()
    out = OBJECTIVES["dpo"](p._replace(chosen=c), beta=beta, label_smoothing=eps)
    (g,) = torch.autograd.grad(out.losses.sum(), c)
    z = (p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected)
    expect = -beta * ((1 - eps) * torch.sigmoid(-beta * z) - eps * torch.sigmoid(beta * z))
    torch.testing.assert_close(g, expect, rtol=RTOL, atol=ATOL)


def test_ipo_minimum_at_half_inverse_beta():
    """l = (z - 1/(2 beta))^2 (z from per-token log-ratios): 0 with zero gradient at
    z = 1/(2 beta), 1/(4 beta^2) at z = 0."""
    beta = 0.25
    p = make_pairs(24)
    n_c, n_r = p.chosen_tokens, p.rejected_tokens
    # choose r0 so that (c - c0)/n_c - (r - r0)/n_r = target
    for target, loss in ((1 / (2 * beta), 0.0), (0.0, 1 / (4 * beta**2))):
        r0 = p.rejected - n_r * ((p.chosen - p.ref_chosen) / n_c - target)
        c = p.chosen.clone().requires_grad_()
        out = OBJECTIVES["ipo"](p._replace(chosen=c, ref_rejected=r0), beta=beta)
        # r0 is rebuilt from a difference of O(100) sums: ~1e-14 relative rounding, squared
        # near the minimum
        torch.testing.assert_close(
            out.pair_losses, torch.full_like(c, loss), rtol=1e-10, atol=1e-20
        )
        if loss == 0.0:
            (g,) = torch.autograd.grad(out.losses.sum(), c)
            torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-12)


def test_dpo_hinge_zero_beyond_margin_and_one_at_reference():
    beta = 0.5
    p = make_pairs(25)
    z_far = 1 / beta + 0.01 + torch.rand(len(p.chosen), dtype=F64)  # beta z > 1
    r0 = p.rejected - (p.chosen - p.ref_chosen - z_far)
    out = OBJECTIVES["dpo-hinge"](p._replace(ref_rejected=r0), beta=beta)
    assert bool((out.pair_losses == 0).all())
    at_ref = p._replace(ref_chosen=p.chosen, ref_rejected=p.rejected)
    torch.testing.assert_close(
        OBJECTIVES["dpo-hinge"](at_ref, beta=beta).pair_losses, torch.ones_like(p.chosen)
    )


def test_cpo_equal_responses_is_log2_plus_alpha_nll():
    p = make_pairs(26, ref=False)
    same = p._replace(rejected=p.chosen, rejected_tokens=p.chosen_tokens)
    out = OBJECTIVES["cpo"](same, beta=0.3, cpo_alpha=0.7, label_smoothing=0.2)
    expect = math.log(2) + 0.7 * (-p.chosen / p.chosen_tokens)
    torch.testing.assert_close(out.pair_losses, expect, rtol=RTOL, atol=ATOL)


def test_orpo_log_odds_closed_forms():
    """Equal mean log-probs: log-odds 0, loss = beta log 2. Mean log-probs log 0.6 and log 0.2:
    odds 1.5 and 0.25, log-odds log 6."""
    beta = 0.2
    n_c = torch.tensor([3.0, 1.0], dtype=F64)
    n_r = torch.tensor([5.0, 4.0], dtype=F64)
    mean = torch.tensor([-0.7, math.log(0.6)], dtype=F64)
    p_same = PairLogps(n_c * mean, n_r * mean, n_c, n_r)
    out = OBJECTIVES["orpo"](p_same, beta=beta)
    torch.testing.assert_close(
        out.metrics["log_odds_chosen"], torch.zeros(2, dtype=F64), rtol=0, atol=1e-15
    )
    torch.testing.assert_close(out.pair_losses, beta * math.log(2) - mean, rtol=RTOL, atol=ATOL)
    p6 = PairLogps(n_c[1:] * math.log(0.6), n_r[1:] * math.log(0.2), n_c[1:], n_r[1:])
    out = OBJECTIVES["orpo"](p6, beta=beta)
    torch.testing.assert_close(
        out.metrics["log_odds_chosen"], torch.tensor([math.log(6)], dtype=F64)
    )
    torch.testing.assert_close(
        out.metrics["log_odds_ratio"], torch.tensor([logsig(math.log(6))], dtype=F64)
    )


def test_log1mexp_is_accurate_at_both_ends():
    """Against 50-digit mpmath: near 0 a naive log(1 - exp(x)) loses all digits, below -log 2
    log(-expm1(x)) does (at -40 it gives 0 instead of -4.2e-18)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    x = torch.tensor([-1e-12, -1e-5, -0.5, -0.69, -0.7, -2.0, -40.0], dtype=F64)
    expect = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()]
    # a few ulps: each branch is two correctly-rounded libm calls
    torch.testing.assert_close(log1mexp(x), torch.tensor(expect, dtype=F64), rtol=4e-16, atol=0)
    assert float(log1mexp(torch.tensor(-1e-12, dtype=F64))) == pytest.approx(
        math.log(1e-12), rel=1e-12
    )


def test_simpo_objective_is_simpo_loss_on_means():
    p = make_pairs(27, ref=False)
    w = make_weights(27)
    a = OBJECTIVES["simpo"](p, beta=2.0, gamma_beta_ratio=0.4, sft_weight=0.2, weights=w)
    b = simpo_loss(
        p.chosen / p.chosen_tokens,
        p.rejected / p.rejected_tokens,
        beta=2.0,
        gamma_beta_ratio=0.4,
        sft_weight=0.2,
        weights=w,
        chosen_tokens=p.chosen_tokens,
    )
    for x, y in zip(a[:5], b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(NEEDS_REFERENCE))
def test_missing_reference_is_refused(name):
    with pytest.raises(ValueError, match=f"the '{name}' objective needs the reference"):
        OBJECTIVES[name](make_pairs(28, ref=False), beta=0.1)


# --- TRL's own loss code on the same log-probs -------------------------------------------------


def trl_dpo(loss_type: str, beta: float, p: PairLogps) -> tuple[float, float, float]:
    """TRL 1.x ``DPOTrainer._compute_loss`` on a stub model whose per-token log-probs sum to
    ``p``'s, with precomputed reference log-probs; returns (loss, rewards/chosen mean,
    rewards/rejected mean)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    b = len(p.chosen)
    counts = torch.cat([p.chosen_tokens, p.rejected_tokens]).long()
    sums = torch.cat([p.chosen, p.rejected])
    prompt, t = 3, 3 + int(counts.max()) + 2  # prompt tokens, then the response, then padding
    completion = torch.zeros(2 * b, t, dtype=torch.long)
    for i, n in enumerate(counts.tolist()):
        completion[i, prompt : prompt + n] = 1
    shift = completion[:, 1:].to(torch.float64)
    g = torch.Generator().manual_seed(99)
    raw = torch.rand(2 * b, t - 1, generator=g, dtype=F64) * shift + 1e-3 * shift
    token_logps = raw / raw.sum(1, keepdim=True) * sums[:, None]  # sums exactly to p's, 0 off mask
    zeros = torch.zeros_like(token_logps)

    def model(**_):
        return SimpleNamespace(
            log_probs=token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * b, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": p.ref_chosen,
        "ref_rejected_logps": p.ref_rejected,
    }
    loss = DPOTrainer._compute_loss(stub, model, inputs, False)
    m = stub._metrics["train"]
    return float(loss), m["rewards/chosen"][0], m["rewards/rejected"][0]


TRL_DPO = [
    ("dpo", "sigmoid", 0.1),
    ("dpo", "sigmoid", 0.5),
    ("ipo", "ipo", 0.3),
    ("dpo-hinge", "hinge", 0.2),
    ("dpo-norm", "sigmoid_norm", 4.0),
]


@pytest.mark.parametrize(("name", "trl_type", "beta"), TRL_DPO)
def test_dpo_family_matches_trl(name, trl_type, beta):
    pytest.importorskip("trl")
    p = make_pairs(31, b=6)
    loss, rc, rr = trl_dpo(trl_type, beta, p)
    out = OBJECTIVES[name](p, beta=beta)
    # TRL runs in float64 here too; only the summation order of the token log-probs differs.
    assert float(out.losses.mean()) == pytest.approx(loss, rel=1e-12, abs=1e-14)
    assert float(out.chosen_rewards.mean()) == pytest.approx(rc, rel=1e-12, abs=1e-14)
    assert float(out.rejected_rewards.mean()) == pytest.approx(rr, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize(
    ("beta", "eps", "alpha", "kind"),
    [
        (0.1, 0.0, 1.0, "sigmoid"),
        (0.5, 0.2, 0.3, "sigmoid"),
        (0.2, 0.0, 0.5, "hinge"),
        (0.7, 0.0, 1.0, "ipo"),
    ],
)
def test_cpo_matches_trl(beta, eps, alpha, kind):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    p = make_pairs(32, b=6, ref=False)
    stub = SimpleNamespace(
        alpha=0.0,
        loss_type=kind,
        beta=beta,
        label_smoothing=eps,
        simpo_gamma=0.5,
        accelerator=SimpleNamespace(device="cpu"),
    )
    # TRL's concatenated_forward averages the log-probs for ipo, sums them otherwise.
    mean = kind == "ipo"
    c, r = (p.chosen / p.chosen_tokens, p.rejected / p.rejected_tokens) if mean else p[:2]
    losses, rc, rr = CPOTrainer.cpo_loss(stub, c, r)
    # TRL: losses.mean() + cpo_alpha * nll, nll the cross-entropy over all chosen tokens.
    trl_loss = losses.mean() + alpha * (-p.chosen.sum() / p.chosen_tokens.sum())
    out = OBJECTIVES["cpo"](p, beta=beta, cpo_alpha=alpha, label_smoothing=eps, loss_type=kind)
    # TRL keeps float64 inputs in float64: rounding only.
    torch.testing.assert_close(out.losses.mean(), trl_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.chosen_rewards, rc, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.rejected_rewards, rr, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl(beta):
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    p = make_pairs(33, b=6, ref=False)
    mean_c, mean_r = p.chosen / p.chosen_tokens, p.rejected / p.rejected_tokens
    stub = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, rc, rr, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        stub, mean_c, mean_r
    )
    trl_loss = -p.chosen.sum() / p.chosen_tokens.sum() - losses.double().mean()
    out = OBJECTIVES["orpo"](p, beta=beta)
    # TRL casts the log-probs to float32 first: agreement to float32 rounding (~6e-8 relative,
    # amplified a little by log1mexp near 0).
    tol = dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.losses.mean(), trl_loss, **tol)
    torch.testing.assert_close(out.chosen_rewards, rc.double(), **tol)
    torch.testing.assert_close(out.rejected_rewards, rr.double(), **tol)
    torch.testing.assert_close(out.metrics["log_odds_ratio"].mean(), log_odds_ratio.double(), **tol)
    torch.testing.assert_close(
        out.metrics["log_odds_chosen"].mean(), log_odds_chosen.double(), **tol
    )
