"""Parity with TRL 1.16's own trainers on TRL's own token ids, at TP1 (data parallel 2) and TP2.

TRL tokenises the text pairs (each trainer its own way: ``DPOTrainer`` without BOS, ``CPOTrainer``
and ``ORPOTrainer`` with it) and computes, in fp32 on ``examples/tiny`` (a Llama), each pair's
loss and rewards (a batch of that one pair) and the batch's loss and metrics (all pairs in one
batch): ``DPOTrainer(precompute_ref_log_probs=True)`` with a reference model (the policy with
seeded noise on its weights) for sigmoid, ipo, hinge and sigmoid_norm (our dpo-norm),
``CPOTrainer`` for sigmoid (with and without label smoothing), hinge, ipo (``cpo_alpha`` > 0)
and simpo, ``ORPOTrainer``. Our side
scores the same ids (and, for the DPO family, TRL's precomputed reference log-probs) with the
converted checkpoint through ``evaluate``'s machinery in one 2-rank run
(``tests/distributed/trl_parity_runner.py``). The max abs differences are printed per case.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, torchrun

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

TINY = REPO / "examples" / "tiny"
#: Text pairs of uneven lengths (the tiny model's word-level vocabulary); TRL appends EOS.
ROWS = [
    ("what is 6 plus 7 ?", " 13", " 6 plus 7 is 4"),
    ("what is 2 plus 1 ?", " 2 plus 1 is 3", " 2"),
    ("what", " is 3 plus 4 ? 7", " 9 9"),
    ("what is 9 plus 9 ?", " 9 plus 9 is 18", " 9 plus 9 is 17 ? 16 15"),
    ("what is 1 plus 1 ? what is 2 plus 2 ?", " 2 and 4", " 4"),
    ("what is 5 plus 0 ?", " 5", " 0"),
]
#: name -> (trainer, TRL config kwargs, our LossConfig fields).
CASES = {
    "dpo": ("dpo", dict(loss_type=["sigmoid"], beta=0.1), dict(objective="dpo", beta=0.1)),
    "ipo": ("dpo", dict(loss_type=["ipo"], beta=0.5), dict(objective="ipo", beta=0.5)),
    "dpo-hinge": (
        "dpo",
        dict(loss_type=["hinge"], beta=0.1),
        dict(objective="dpo-hinge", beta=0.1),
    ),
    "dpo-norm": (
        "dpo",
        dict(loss_type=["sigmoid_norm"], beta=2.0),
        dict(objective="dpo-norm", beta=2.0),
    ),
    "cpo": ("cpo", dict(loss_type="sigmoid", beta=0.1), dict(objective="cpo", beta=0.1)),
    "cpo-smoothed": (
        "cpo",
        dict(loss_type="sigmoid", beta=0.2, label_smoothing=0.1, cpo_alpha=0.0),
        dict(objective="cpo", beta=0.2, label_smoothing=0.1, cpo_alpha=0.0),
    ),
    "cpo-hinge": (
        "cpo",
        dict(loss_type="hinge", beta=0.1, cpo_alpha=0.5),
        dict(objective="cpo", beta=0.1, loss_type="hinge", cpo_alpha=0.5),
    ),
    "cpo-ipo": (
        "cpo",
        dict(loss_type="ipo", beta=0.5, cpo_alpha=0.3),
        dict(objective="cpo", beta=0.5, loss_type="ipo", cpo_alpha=0.3),
    ),
    "simpo": (
        "cpo",
        dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0),
        dict(objective="simpo", beta=2.0, simpo_gamma=0.5),
    ),
    "orpo": ("orpo", dict(beta=0.1), dict(objective="orpo", beta=0.1)),
    "orpo-beta0.5": ("orpo", dict(beta=0.5), dict(objective="orpo", beta=0.5)),
}
#: Metrics compared (TRL's names); nll_loss only where TRL computes it (NLL weight > 0). ORPO:
#: TRL 1.16's ORPOTrainer scores its NLL over prompt + response ("orpo chosen nll loss is
#: computed over the full prompt and response", orpo_trainer.py); ours, like CPO's and SimPO's,
#: over the response, so ORPO's loss is compared without it (loss - nll_loss).
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
ORPO_KEYS = ("log_odds_ratio", "log_odds_chosen")
# fp32 on both sides, the same math in another order (our vocab-parallel log-softmax and fused
# QKV/SwiGLU GEMMs, TP-split reductions vs HF's): logits agree to ~1e-7 (test_hf_parity). The
# issue's 1e-5 on every metric, absolute for O(1) values and relative above (rel_err): summed
# log-probs reach ~40 nats and IPO's squared loss ~20, where one fp32 ulp is already ~4e-6.
ATOL = 1e-5


#: Objectives without a TRL trainer, scored (on a TRL case's ids) for the bf16 check only:
#: name -> (case whose pairs they take, our LossConfig fields).
OURS_ONLY = {
    "dpo-norm-smoothed": ("dpo", dict(objective="dpo-norm", beta=2.0, label_smoothing=0.1)),
    "dpo-smoothed": ("dpo", dict(objective="dpo", beta=0.1, label_smoothing=0.2, sft_weight=0.5)),
    "simpo-hinge": ("simpo", dict(objective="simpo", beta=2.0, loss_type="hinge")),
}
#: bf16 params vs fp32 (log-probs accumulated in fp32, reference log-probs fp64 in both runs).
#: bf16 keeps 8 significant bits (eps = 2^-8): rounding weights and activations through 4 layers
#: moves each response's log-prob by a few eps relative (measured 3.6 eps; score-reference: 2 eps).
BF16_EPS = 2.0**-8
BF16_LOGPS_RTOL = 8 * BF16_EPS


def rel_err(ours: float, theirs: float) -> float:
    """``|ours - theirs| / max(1, |theirs|)``: absolute for O(1) values, relative above (fp32
    keeps ~7 digits: IPO's squared loss reaches ~20)."""
    return abs(ours - theirs) / max(1.0, abs(theirs))


def policy():
    return transformers.LlamaForCausalLM.from_pretrained(TINY).float()


def reference_model():
    """The policy with seeded noise on every weight: the log-ratios are not zero."""
    model = policy()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def trl_trainer(kind: str, kw: dict, out: str):
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(TINY)
    data = datasets.Dataset.from_list([dict(prompt=p, chosen=c, rejected=r) for p, c, r in ROWS])
    common = dict(output_dir=out, per_device_train_batch_size=len(ROWS), report_to=[])
    common.update(use_cpu=True, dataloader_num_workers=0)
    if kind == "dpo":
        args = DPOConfig(precompute_ref_log_probs=True, max_length=None, **common, **kw)
        return DPOTrainer(
            model=policy(),
            ref_model=reference_model(),
            args=args,
            train_dataset=data,
            processing_class=tok,
        )
    cls, cfg = (CPOTrainer, CPOConfig) if kind == "cpo" else (ORPOTrainer, ORPOConfig)
    return cls(model=policy(), args=cfg(**common, **kw), train_dataset=data, processing_class=tok)


def trl_metrics(trainer, kind: str, examples: list[dict]) -> dict[str, float]:
    """TRL's loss and logged metrics of one batch (eval mode: no dropout, no update)."""
    batch = trainer.data_collator(examples)
    trainer.model.eval()
    with torch.no_grad():
        if kind == "dpo":
            trainer._metrics["eval"].clear()
            loss = trainer.compute_loss(trainer.model, batch)
            metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
        else:
            loss, logged = trainer.get_batch_loss_metrics(trainer.model, batch, "eval")
            metrics = {k.removeprefix("eval_"): v for k, v in logged.items()}
    return {"loss": float(loss), **metrics}


def trl_ids(kind: str, example: dict) -> dict:
    """TRL's token ids of one tokenised example as our Pair fields."""
    if kind == "dpo":
        return dict(
            prompt_ids=example["prompt_ids"],
            chosen_ids=example["chosen_ids"],
            rejected_ids=example["rejected_ids"],
            ref_chosen_logp=example["ref_chosen_logps"],
            ref_rejected_logp=example["ref_rejected_logps"],
        )
    prompt = example["prompt_input_ids"]
    out = dict(prompt_ids=prompt)
    for side in ("chosen", "rejected"):
        ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
        assert ids[: len(prompt)] == prompt and all(x == -100 for x in labels[: len(prompt)])
        assert labels[len(prompt) :] == ids[len(prompt) :]  # scored: exactly the response
        out[f"{side}_ids"] = ids[len(prompt) :]
    return out


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    from megatron_simpo.convert.hf import hf_to_mcore

    root = tmp_path_factory.mktemp("trl_parity")
    hf_to_mcore(TINY, root / "ckpt")
    cases, trl_results = [], {}
    for name, (kind, kw, ours) in CASES.items():
        trainer = trl_trainer(kind, kw, str(root / "trl_out"))
        examples = [trainer.train_dataset[i] for i in range(len(ROWS))]
        per_pair = [trl_metrics(trainer, kind, [e]) for e in examples]
        trl_results[name] = {"per_pair": per_pair, "batch": trl_metrics(trainer, kind, examples)}
        cases.append({"name": name, "loss": ours, "pairs": [trl_ids(kind, e) for e in examples]})
    by_name = {c["name"]: c for c in cases}
    for name, (source, ours) in OURS_ONLY.items():  # no TRL counterpart: bf16 vs fp32 only
        cases.append({"name": name, "loss": ours, "pairs": by_name[source]["pairs"]})
    (root / "cases.json").write_text(json.dumps(cases))
    res = torchrun(2, [str(REPO / "tests/distributed/trl_parity_runner.py"), "--root", str(root)])
    assert res.returncode == 0, res.stderr[-4000:]
    return root, trl_results


def test_every_objective_matches_trl_at_tp1_and_tp2(parity):
    root, trl_results = parity
    worst: dict[str, dict[str, float]] = {}  # "case layout" -> metric -> max |ours - TRL|
    for name, (kind, kw, _) in CASES.items():
        keys = KEYS + (ORPO_KEYS if kind == "orpo" else ())
        if kind != "dpo" and kw.get("cpo_alpha", 1.0) > 0:
            keys += ("nll_loss",)
        want = trl_results[name]
        for layout in ("tp1", "tp2"):
            got = json.loads((root / f"{name}_{layout}.json").read_text())
            assert len(got["per_pair"]) == len(ROWS)
            diff = {}
            for k in keys:
                if kind == "orpo" and k in ("loss", "nll_loss"):
                    continue  # below: TRL's NLL also scores the prompt
                ours_all, trl_all = (
                    [got["summary"], *got["per_pair"]],
                    [want["batch"], *want["per_pair"]],
                )
                diff[k] = max(rel_err(g[k], w[k]) for g, w in zip(ours_all, trl_all))
            if kind == "orpo":  # the odds-ratio term: loss - NLL on both sides
                term = [
                    (g["loss"] - g["nll_loss"], w["loss"] - w["nll_loss"])
                    for g, w in zip(
                        [got["summary"], *got["per_pair"]], [want["batch"], *want["per_pair"]]
                    )
                ]
                diff["loss - nll_loss"] = max(rel_err(a, b) for a, b in term)
            worst[f"{name} {layout}"] = diff
            # The data are not degenerate: the pairs' losses differ, DPO's log-ratios are not 0.
            losses = [g["loss"] for g in got["per_pair"]]
            assert max(losses) - min(losses) > 1e-2, (name, losses)
            if kind == "dpo":
                assert min(abs(g["rewards/chosen"]) for g in got["per_pair"]) > 1e-3
    table = {c: {k: f"{v:.1e}" for k, v in d.items()} for c, d in worst.items()}
    print("max |ours - TRL| / max(1, |TRL|) per case, layout, metric:", json.dumps(table, indent=1))
    (root / "parity.json").write_text(json.dumps(worst, indent=1))
    bad = {(c, k): v for c, d in worst.items() for k, v in d.items() if not v <= ATOL}
    assert not bad, bad


def test_every_objective_in_bf16_is_close_to_fp32(parity):
    """Each objective (TRL's cases and OURS_ONLY) scored with bf16 params against fp32, per pair
    and for the batch. The one source of difference is the policy's log-probs: they are within
    BF16_LOGPS_RTOL (and really bf16: not equal); the rewards move by exactly beta times them
    (the fp64 reference enters both runs unrounded: fp32 rounding only); each pair's loss by at
    most its Lipschitz bound in the log-probs, K * (|d logps/chosen| + |d logps/rejected|) with
    K = max(1, beta) * (1 + NLL weight) * (2 + 2 sqrt(loss)) (sigmoid, hinge: beta; IPO's square:
    2 |h - tau| = 2 sqrt(loss); ORPO's log-odds: beta / (1 - p) <= 2 beta; NLL: its weight)."""
    from megatron_simpo.config import LossConfig

    root, _ = parity
    worst = {}
    ours_all = {n: c[2] for n, c in CASES.items()} | {n: c[1] for n, c in OURS_ONLY.items()}
    for name, fields in ours_all.items():
        cfg = LossConfig(**fields)
        beta, nll = cfg.resolved_beta, cfg.nll_weight
        fp32 = json.loads((root / f"{name}_tp1.json").read_text())
        bf16 = json.loads((root / f"{name}_tp1_bf16.json").read_text())
        rows = list(zip([bf16["summary"], *bf16["per_pair"]], [fp32["summary"], *fp32["per_pair"]]))
        logps = max(
            rel_err(b[k], f[k]) for b, f in rows for k in ("logps/chosen", "logps/rejected")
        )
        rewards = max(
            abs(
                (b[f"rewards/{s}"] - f[f"rewards/{s}"]) - beta * (b[f"logps/{s}"] - f[f"logps/{s}"])
            )
            / max(1.0, abs(f[f"rewards/{s}"]))
            for b, f in rows
            for s in ("chosen", "rejected")
        )
        loss = max(
            abs(b["loss"] - f["loss"])
            / (
                max(1.0, beta)
                * (1 + nll)
                * (2 + 2 * abs(f["loss"]) ** 0.5)
                * sum(abs(b[f"logps/{s}"] - f[f"logps/{s}"]) for s in ("chosen", "rejected"))
            )
            for b, f in rows[1:]
        )
        worst[name] = {"logps": logps, "rewards - beta*logps": rewards, "loss / bound": loss}
        assert 0 < logps <= BF16_LOGPS_RTOL, (name, worst[name])
        # fp32 arithmetic on rewards of magnitude <= ~50: a few ulps.
        assert rewards <= 1e-5, (name, worst[name])
        assert loss <= 1.0, (name, worst[name])
    table = {n: {k: f"{v:.1e}" for k, v in d.items()} for n, d in worst.items()}
    print("bf16 vs fp32 per objective:", json.dumps(table, indent=1))
