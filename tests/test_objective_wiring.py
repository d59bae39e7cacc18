"""Every objective through the training step's loss glue (``batch_loss``), without a model:
padded, packed and prefix-shared micro-batches of pairs that carry reference log-probs, against
the float64 per-pair references of ``test_objectives`` on log-probs summed by hand; and
``evaluate.summarize`` of the same per-pair rows."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_objectives import reference_objective

from megatron_simpo.batch_loss import (
    micro_batch_report,
    pair_metrics,
    report_keys,
    summarize_totals,
)
from megatron_simpo.config import LossConfig
from megatron_simpo.data import Pair, PairBatcher
from megatron_simpo.data.batching import collate, global_batch_indices
from megatron_simpo.data.packing import collate_packed
from megatron_simpo.evaluate import summarize
from megatron_simpo.loss import PairLogps

G = torch.Generator().manual_seed(5)
TABLE = -torch.rand(64, 40, generator=G, dtype=torch.float64) * 2 - 0.05  # [token id, position]


def pairs_with_reference(n: int = 8, seed: int = 3) -> list[Pair]:
    """Uneven lengths (one-token responses), weights incl. 0, distinct reference values."""
    rng = random.Random(seed)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(rng.randrange(3, 64) for _ in range(k))

    weights = [1.0, 0.0, 2.5, 0.5, 1.0, 1.5, 3.0, 0.25]
    return [
        Pair(
            ids(rng.randint(1, 6)),
            ids(1 if i == 2 else rng.randint(1, 9)),
            ids(1 if i == 5 else rng.randint(1, 9)),
            weights[i % 8],
            ref_chosen_logp=-rng.uniform(0.5, 12.0),
            ref_rejected_logp=-rng.uniform(0.5, 12.0),
        )
        for i in range(n)
    ]


def summed_by_hand(prompt: tuple, response: tuple) -> float:
    """sum_t TABLE[target_t, t] over the response targets of ``prompt + response``."""
    seq = prompt + response
    return sum(float(TABLE[seq[t + 1], t]) for t in range(len(prompt) - 1, len(seq) - 1))


def by_hand(pairs: list[Pair]) -> PairLogps:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return PairLogps(
        t([summed_by_hand(p.prompt_ids, p.chosen_ids) for p in pairs]),
        t([summed_by_hand(p.prompt_ids, p.rejected_ids) for p in pairs]),
        t([len(p.chosen_ids) for p in pairs]),
        t([len(p.rejected_ids) for p in pairs]),
        t([p.ref_chosen_logp for p in pairs]),
        t([p.ref_rejected_logp for p in pairs]),
    )


def step(pairs: list[Pair], cfg: LossConfig, mbs: int, **mode) -> tuple[dict, list[dict]]:
    """The step's reduction (``pair_metrics`` -> ``micro_batch_report`` -> summed ->
    ``summarize_totals``) on token log-probs looked up by (target id, position); rows in the
    batch's order."""
    batcher = PairBatcher(
        pairs,
        global_batch_size=len(pairs),
        micro_batch_size=mbs,
        dp_rank=0,
        dp_size=1,
        seed=0,
        capacity=24,
        **mode,
    )
    keys = report_keys(cfg)
    totals = dict.fromkeys(keys, 0.0)
    rows = []
    for mb in batcher.micro_batches(0)[0]:
        token_logps = TABLE[mb["labels"], mb["position_ids"]]
        losses, nll, per_pair = pair_metrics(cfg, token_logps, mb)
        report = micro_batch_report(losses, nll, per_pair, mb)
        for k in keys:
            totals[k] += report[k].item()
        rows += [{k: float(v[j]) for k, v in per_pair.items()} for j in range(len(losses))]
    return summarize_totals(totals), rows


# (LossConfig fields, the reference's options written from those fields by hand)
CASES = [
    (
        dict(beta=2.0, simpo_gamma=0.6, sft_weight=0.3),
        dict(beta=2.0, simpo_gamma=0.6, sft_weight=0.3),
    ),
    (
        dict(objective="dpo", beta=0.3, label_smoothing=0.1, sft_weight=0.2),
        dict(beta=0.3, label_smoothing=0.1, sft_weight=0.2),
    ),
    (dict(objective="ipo", beta=0.5), dict(beta=0.5)),
    (dict(objective="dpo-hinge"), dict(beta=0.1)),  # TRL's default beta
    (
        dict(objective="dpo-norm", beta=2.0, label_smoothing=0.2),
        dict(beta=2.0, label_smoothing=0.2),
    ),
    (
        dict(objective="cpo", beta=0.2, cpo_alpha=0.5, loss_type="hinge"),
        dict(beta=0.2, cpo_alpha=0.5, loss_type="hinge"),
    ),
    (dict(objective="cpo", beta=0.7, loss_type="ipo"), dict(beta=0.7, loss_type="ipo")),
    (dict(objective="cpo", label_smoothing=0.1), dict(beta=0.1, label_smoothing=0.1)),
    (dict(objective="orpo", beta=0.3, orpo_alpha=0.7), dict(beta=0.3, orpo_alpha=0.7)),
]
MODES = {
    "padded": {},
    "packed": {"pack_pairs": True},
    "prefix": {"prefix_sharing": True},
    "packed_prefix": {"pack_pairs": True, "prefix_sharing": True},
}
# The report sums are fp32, as in training (one rounding ~6e-8 relative per sum; a few sums):
# relative 1e-6, and absolute 1e-6 per unit of the summed terms (summed log-probs up to ~25,
# so a margin that cancels to ~0 keeps an absolute error of the terms' size).
REPORT_RTOL, REPORT_ATOL = 1e-6, 3e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("fields", "options"), CASES, ids=lambda c: str(c.get("objective", "")))
def test_every_objective_through_the_step(fields, options, mode):
    cfg = LossConfig(**fields)
    cfg.validate()
    name = cfg.objective
    pairs = pairs_with_reference()
    logps = by_hand([pairs[i] for i in global_batch_indices(len(pairs), len(pairs), 0, 0)])
    weights = [pairs[i].weight for i in global_batch_indices(len(pairs), len(pairs), 0, 0)]
    want, want_nll, ref_pairs = reference_objective(name, logps, weights, options, "token")
    got, rows = step(pairs, cfg, 2, **MODES[mode])
    assert got["loss"] == pytest.approx(want, rel=REPORT_RTOL)
    assert got["nll_loss"] == pytest.approx(want_nll, rel=REPORT_RTOL)
    # Per pair, in float64 (only summation order differs): rewards, TRL's logps, extras.
    mean = name in ("simpo", "orpo") or cfg.loss_type == "ipo" and name == "cpo"
    for i, (row, (_, rc, rr, _, extra)) in enumerate(zip(rows, ref_pairs)):
        assert row["rewards/chosen"] == pytest.approx(rc, rel=1e-12, abs=1e-12)
        assert row["rewards/rejected"] == pytest.approx(rr, rel=1e-12, abs=1e-12)
        c = float(logps.chosen[i]) / (float(logps.chosen_tokens[i]) if mean else 1)
        assert row["logps/chosen"] == pytest.approx(c, rel=1e-12)
        per_token = float(logps.chosen[i] / logps.chosen_tokens[i])
        assert row.get("logps/chosen_mean", row["logps/chosen"]) == pytest.approx(per_token)
        for k, v in extra.items():
            assert row[k] == pytest.approx(v, rel=1e-10), k
    keep = [r for r in rows if r["weight"] > 0]
    for key in ("rewards/margins", "rewards/accuracies", "logps/rejected"):
        want_key = sum(r[key] for r in keep) / len(keep)
        assert got[key] == pytest.approx(want_key, rel=REPORT_RTOL, abs=REPORT_ATOL)
    if name == "orpo":
        assert {"log_odds_ratio", "log_odds_chosen"} <= got.keys()
    # Another micro-batch split gives the same; evaluate's summary of the rows too.
    other, _ = step(pairs, cfg, 4, **MODES[mode])
    ev = summarize(rows, cfg)
    for key, value in got.items():
        if key not in ("tokens", "tokens_effective", "pairs"):
            tol = dict(rel=REPORT_RTOL, abs=REPORT_ATOL)
            assert other[key] == pytest.approx(value, **tol), key
            assert ev[key] == pytest.approx(value, **tol), key


def test_reference_logps_travel_with_their_pairs():
    """ref_logps [2b]: chosen of each pair, then rejected, in micro-batch order."""
    pairs = pairs_with_reference(4)
    mb = collate(pairs, 24)
    want = [p.ref_chosen_logp for p in pairs] + [p.ref_rejected_logp for p in pairs]
    assert mb["ref_logps"].dtype == torch.float64 and mb["ref_logps"].tolist() == want
    plain = [Pair(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    assert "ref_logps" not in collate(plain, 24)
    with pytest.raises(ValueError, match="score-reference"):
        collate([pairs[0], plain[1]], 24)
    # Packed / prefix-shared rows (as evaluate collates them too): the same [2b] order.
    packed = collate_packed(pairs, capacity=24, prefix_sharing=True, pack=True)
    assert packed["ref_logps"].tolist() == want


def test_dpo_without_reference_logps_is_refused():
    plain = [Pair(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs_with_reference(4)]
    with pytest.raises(ValueError, match="reference model's log-probs"):
        step(plain, LossConfig(objective="dpo"), 2)


def test_orpo_trains_end_to_end_with_fused_head_heldout_eval_and_resume(tmp_path):
    """`train --loss orpo --fused-loss-head` with held-out evaluation: the objective's TRL-named
    metrics reach metrics.jsonl, TensorBoard (train and eval/), the plot and `evaluate`'s output
    (summary and per pair); a run stopped at iteration 2 and resumed gives the uninterrupted
    run's losses."""
    import json

    import yaml
    from conftest import REPO, torchrun

    cfg = yaml.safe_load((REPO / "examples/tiny_pretok.yaml").read_text())
    cfg["loss"] = {"objective": "orpo", "beta": 0.5, "orpo_alpha": 0.7}
    cfg["train"]["train_iters"] = 4
    cfg["data"]["data_path"] = str(REPO / cfg["data"]["data_path"])
    (tmp_path / "orpo.yaml").write_text(yaml.safe_dump(cfg))
    common = ["-m", "megatron_simpo", "train", "--config", str(tmp_path / "orpo.yaml")]
    common += ["--fused-loss-head", "--loss-chunk-size", "7", "--eval-split-ratio", "0.1"]
    common += ["--eval-interval", "2", "--eval-iters", "1"]

    def run(name: str, *extra: str) -> dict[int, dict]:
        tb = tmp_path / f"tb_{name}"
        res = torchrun(1, [*common, "--tensorboard-dir", str(tb), *extra])
        assert res.returncode == 0, res.stderr[-3000:]
        rows = [json.loads(x) for x in (tb / "metrics.jsonl").read_text().splitlines()]
        return {r["iteration"]: {**r} for r in rows if "loss" in r} | {
            -r["iteration"]: r for r in rows if "eval/loss" in r
        }

    whole = run("whole")
    for key in ("log_odds_ratio", "log_odds_chosen", "nll_loss", "logps/chosen_sum"):
        assert key in whole[1] and math.isfinite(whole[1][key]), key
    assert "eval/log_odds_ratio" in whole[-2] and "eval/rewards/chosen" in whole[-2]
    trl_names = {"loss", "nll_loss", "log_odds_ratio", "log_odds_chosen"}
    trl_names |= {f"rewards/{k}" for k in ("chosen", "rejected", "margins", "accuracies")}
    trl_names |= {"logps/chosen", "logps/rejected"}
    # TensorBoard: the same scalars as metrics.jsonl, the objective's TRL names among them.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb_whole"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert trl_names | {f"eval/{k}" for k in trl_names} <= tags, trl_names - tags
    # The plot reads them: every panel of the dashboard finds its series (train and eval/).
    from megatron_simpo.plot import PANELS, load_run, plot_runs, series_key

    dash = load_run(tmp_path / "tb_whole")
    for title, keys, _ in PANELS:
        for spec, _ in keys:
            assert series_key(dash, spec) in dash.series, (title, spec)
            if title.startswith(("ORPO", "NLL", "reward")):
                assert "eval/" + series_key(dash, spec) in dash.series, (title, spec)
    assert plot_runs([tmp_path / "tb_whole"], tmp_path / "dash.png").stat().st_size > 0
    save = ["--save", str(tmp_path / "ckpt")]
    run("first", *save, "--exit-interval", "2")
    resumed = run("second", *save)
    # Same layout, deterministic CPU kernels: the resumed run continues bit-identically.
    assert [resumed[i]["loss"] for i in (3, 4)] == [whole[i]["loss"] for i in (3, 4)]
    # `evaluate` of the saved checkpoint reports the same TRL names (summary and per pair).
    out = tmp_path / "eval.json"
    evaluate = ["-m", "megatron_simpo", "evaluate", "--config", str(tmp_path / "orpo.yaml")]
    res = torchrun(1, [*evaluate, "--load", str(tmp_path / "ckpt"), "--output", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    printed = json.loads(res.stdout.split("evaluate: ", 1)[1].splitlines()[0])
    got = json.loads(out.read_text())
    assert trl_names <= printed.keys() and trl_names <= got.keys(), trl_names - got.keys()
    pair_names = {"log_odds_ratio", "log_odds_chosen", "rewards/chosen", "logps/chosen"}
    assert all(pair_names <= row.keys() for row in got["per_pair"])
