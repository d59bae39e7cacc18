"""``megatron-simpo score-reference`` and DPO from its columns: values, layouts, the CLI chain,
the atomic write, the reference travelling with the pair, and the refusals of a DPO run."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, torchrun

from megatron_simpo.config import ModelConfig, RunConfig
from megatron_simpo.data import pairs_for, prepare_for_run
from megatron_simpo.data.checks import check_for_run
from megatron_simpo.data.packing import collate_packed
from megatron_simpo.data.prepare import (
    MARKER,
    REFERENCE_COLUMNS,
    REFERENCE_KEY,
    PreparedPairs,
    PrepareOptions,
    prepare,
    tokenisation_of,
    write_reference_columns,
)
from megatron_simpo.errors import DataError

TINY = REPO / "examples" / "tiny"  # an HF Llama: 4 layers, hidden 64, 30 token ids
MAX_LENGTH = 32


def varied_rows(n: int = 24, seed: int = 3) -> list[dict]:
    """Pre-tokenised pairs: uneven prompts and responses, one-token responses, weights != 1."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lc = 1 if i % 5 == 0 else rng.randint(1, 8)
        lr = 1 if i % 7 == 1 else rng.randint(1, 8)
        rows.append(
            {
                "prompt_ids": [1] + [rng.randrange(3, 30) for _ in range(rng.randint(1, 10))],
                "chosen_ids": [rng.randrange(3, 30) for _ in range(lc)],
                "rejected_ids": [rng.randrange(3, 30) for _ in range(lr)],
                "weight": round(rng.uniform(0.2, 2.5), 3),
            }
        )
    return rows


def prepare_rows(tmp_path, rows, name="prep", **opts) -> str:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / name
    opts.setdefault("max_length", MAX_LENGTH)
    prepare(str(src), out, tokenizer=str(TINY), opts=PrepareOptions(**opts), quiet=True)
    return str(out)


def columns(path) -> dict[str, list]:
    ds = PreparedPairs(path)._ds
    return {c: list(ds[c]) for c in REFERENCE_COLUMNS}


def fake_reference(path) -> dict[str, list]:
    """Reference columns of distinct values (no model) written by the real writer."""
    pairs = PreparedPairs(path)
    n = len(pairs)
    cols = {
        "ref_chosen_logps": [-1.0 - 0.25 * i for i in range(n)],
        "ref_rejected_logps": [-100.0 - 0.5 * i for i in range(n)],
        "ref_chosen_tokens": [len(p.chosen_ids) for p in pairs],
        "ref_rejected_tokens": [len(p.rejected_ids) for p in pairs],
    }
    record = {"checkpoint": {"path": "x"}, "tokenisation": tokenisation_of(pairs.info)}
    write_reference_columns(path, cols, record)
    return cols


def dpo_cfg(**data) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig.from_hf_config(TINY)
    cfg.data.tokenizer = str(TINY)
    cfg.train.seq_length = MAX_LENGTH
    cfg.loss.objective = "dpo"
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


# --- the columns: atomic write, PreparedPairs, collation (no model) ----------------------------


def test_write_is_atomic_keeps_the_data_and_pairs_carry_the_reference(tmp_path):
    path = prepare_rows(tmp_path, varied_rows())
    before = PreparedPairs(path)
    ids = [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.weight) for p in before]
    assert not before.has_reference and before[0].ref_chosen_logp is None
    (tmp_path / "prep" / "pairs.1").mkdir()  # the leftover of an interrupted write
    cols = fake_reference(path)
    after = PreparedPairs(path)
    assert after.has_reference and after.info["pairs_dir"] == "pairs.1"
    assert not (tmp_path / "prep" / "pairs").exists()  # the old subdirectory is gone
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.weight) for p in after] == ids
    assert [p.ref_chosen_logp for p in after] == cols["ref_chosen_logps"]
    assert [p.ref_rejected_logp for p in after] == cols["ref_rejected_logps"]
    features = after._ds.features
    assert features["ref_chosen_logps"].dtype == "float64"
    assert features["ref_rejected_tokens"].dtype == "int32"
    # A second write (e.g. --force) replaces the columns and switches back.
    cols2 = {**cols, "ref_chosen_logps": [v - 1 for v in cols["ref_chosen_logps"]]}
    write_reference_columns(path, cols2, after.info[REFERENCE_KEY])
    again = PreparedPairs(path)
    assert again.info["pairs_dir"] == "pairs" and not (tmp_path / "prep" / "pairs.1").exists()
    assert columns(path)["ref_chosen_logps"] == cols2["ref_chosen_logps"]
    assert json.loads((tmp_path / "prep" / MARKER).read_text())["summary"]["kept"] == len(ids)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_reference_travels_with_its_pair_when_packed(tmp_path, prefix_sharing):
    """Each packed sequence's targets are its own response and ``ref_logps`` is its pair's."""
    path = prepare_rows(tmp_path, varied_rows())
    cols = fake_reference(path)
    pairs = PreparedPairs(path)
    chunk = [pairs[i] for i in (3, 0, 7, 5, 11)]  # not in dataset order
    mb = collate_packed(chunk, capacity=MAX_LENGTH, prefix_sharing=prefix_sharing, pack=True)
    assert mb["tokens"].shape[0] < 2 * len(chunk)  # packed: fewer rows than sequences
    b = len(chunk)
    for k in range(2 * b):
        pair = chunk[k % b]
        response = pair.chosen_ids if k < b else pair.rejected_ids
        assert mb["labels"][mb["seq_index"] == k].tolist() == list(response)
        want = pair.ref_chosen_logp if k < b else pair.ref_rejected_logp
        assert mb["ref_logps"][k].item() == want
    assert set(mb["ref_logps"].tolist()) <= set(
        cols["ref_chosen_logps"] + cols["ref_rejected_logps"]
    )


# --- refusals of a DPO-family run -------------------------------------------------------------


def test_dpo_run_without_reference_columns_is_refused(tmp_path):
    path = prepare_rows(tmp_path, varied_rows(6))
    cfg = dpo_cfg()
    with pytest.raises(DataError) as e:
        pairs_for(cfg, path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and "--loss dpo" in msg
    assert f"run `megatron-simpo score-reference --load <reference ckpt> --data {path}`" in msg
    cfg.loss.objective = "simpo"  # reference free: the same data is fine
    assert len(pairs_for(cfg, path)) == 6


def test_dpo_run_on_raw_data_is_refused_before_tokenising(tmp_path):
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in varied_rows(4)))
    cfg = dpo_cfg(data_path=str(src), data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:
        prepare_for_run(cfg)
    msg = str(e.value)
    assert msg.startswith(f"--data {src}: --loss dpo reads reference log-probs") and "\n" not in msg
    assert "megatron-simpo prepare" in msg and "megatron-simpo score-reference" in msg
    assert not (tmp_path / "cache").exists()  # nothing was tokenised


def _edit_record(path, **tokenisation) -> None:
    """Changes the recorded tokenisation (as if prepared.json came from another dataset)."""
    marker = Path(path) / MARKER
    info = json.loads(marker.read_text())
    info[REFERENCE_KEY]["tokenisation"].update(tokenisation)
    marker.write_text(json.dumps(info))


def test_reference_scored_with_another_max_length_is_refused(tmp_path):
    path = prepare_rows(tmp_path, varied_rows(6))
    fake_reference(path)
    assert len(pairs_for(dpo_cfg(), path)) == 6  # up to date: accepted
    with pytest.raises(DataError, match="--max-length 32 but this run has --max-length 24"):
        pairs_for(dpo_cfg(max_length=24), path)
    _edit_record(path, max_length=64)  # e.g. prepared.json copied from a max-length-64 dataset
    with pytest.raises(DataError) as e:
        pairs_for(dpo_cfg(), path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg
    assert "scored with --max-length 64 but the data has --max-length 32" in msg
    assert "score-reference" in msg


def test_stale_reference_is_refused(tmp_path):
    path = prepare_rows(tmp_path, varied_rows(6))
    fake_reference(path)
    # Scored on ids of a tokenizer that did not make this dataset's (pre-tokenised: none).
    _edit_record(path, tokenizer_sha256="0123456789abcdef0123")
    with pytest.raises(DataError, match=r"stale reference.*tokenizer_sha256") as e:
        check_for_run(PreparedPairs(path), seq_length=32, vocab_size=30, objective="ipo")
    assert "re-run score-reference" in str(e.value) and "\n" not in str(e.value)
    # The same dataset's tokenisation changed under the reference (another truncation rule).
    _edit_record(path, tokenizer_sha256=None, truncation_rule="trl-1")
    with pytest.raises(DataError, match=r"stale reference.*truncation_rule.*re-run score-ref"):
        check_for_run(PreparedPairs(path), seq_length=32, vocab_size=30, objective="dpo-hinge")
    # Token counts that are not the responses' lengths (scored on other ids).
    _edit_record(path, truncation_rule="trl")
    cols = columns(path)
    cols["ref_rejected_tokens"][4] += 1
    write_reference_columns(path, cols, PreparedPairs(path).info[REFERENCE_KEY])
    with pytest.raises(DataError, match=r"prep\.jsonl:5 ") as e:
        check_for_run(PreparedPairs(path), seq_length=32, vocab_size=30, objective="dpo-norm")
    assert "stale reference log-probs (the rejected response has" in str(e.value)
    assert "re-run score-reference" in str(e.value)


# --- the command on the tiny model: values, layouts, the CLI chain -----------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The tiny model converted, 24 varied pairs prepared through the CLI and scored by
    ``score-reference`` in one process (TP1), then trained on with ``--loss dpo``."""
    from megatron_simpo.cli import main as cli_main
    from megatron_simpo.convert.hf import hf_to_mcore

    root = tmp_path_factory.mktemp("score_reference")
    hf_to_mcore(TINY, root / "ckpt")
    src = root / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in varied_rows()))
    prep = root / "prep"
    args = ["prepare", "--data-path", str(src), "--tokenizer", str(TINY), "--output", str(prep)]
    assert cli_main([*args, "--max-length", str(MAX_LENGTH)]) == 0
    for name in ("tp2", "pp2"):
        shutil.copytree(prep, root / "layouts" / name)
    ckpt = ["--load", str(root / "ckpt"), "--data", str(prep), "--seq-length", str(MAX_LENGTH)]
    cli = ["-m", "megatron_simpo"]  # under torchrun: a free rendezvous port
    # Micro-batches of 3 pairs, as the TP2/PP2/DP2 runs (the same packed rows).
    score = torchrun(
        1, [*cli, "score-reference", *ckpt, "--precision", "fp32", "--micro-batch-size", "3"]
    )
    assert score.returncode == 0, score.stderr[-3000:]
    # Scored already: the DP2 run must be forced (--force) to score it again.
    shutil.copytree(prep, root / "layouts" / "dp2")
    tb = root / "tb"
    train = torchrun(1, [
        *cli, "train", "--loss", "dpo", "--beta", "0.1", *ckpt, "--micro-batch-size", "4",
        "--global-batch-size", "8", "--train-iters", "2", "--lr", "1e-3", "--precision", "fp32",
        "--tensorboard-dir", str(tb),
    ])  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    return root, score, train


def test_cli_prepare_score_reference_train_dpo(scored):
    root, score, train = scored
    assert "score-reference: wrote ref_chosen_logps" in score.stdout
    info = json.loads((root / "prep" / MARKER).read_text())
    rec = info[REFERENCE_KEY]
    assert rec["checkpoint"]["path"] == str((root / "ckpt" / "iter_0000000").resolve())
    assert rec["checkpoint"]["iteration"] == 0 and len(rec["checkpoint"]["sha256"]) == 20
    assert rec["tokenisation"]["max_length"] == MAX_LENGTH and rec["pairs"] == 24
    # Training packed the pairs and shared prefixes (the defaults on CPU), so the reference
    # values travelled through collate_packed.
    assert "pack_pairs = True" in train.stdout and "prefix_sharing = True" in train.stdout
    rows = [json.loads(x) for x in (root / "tb/metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    # Step 1: the policy is the reference, so every reward is 0 and the DPO loss log 2. Scored
    # and trained at other micro-batch sizes (other packings) in fp32: measured exactly 0; 1e-6
    # allows a last-bit difference in a sum of ~10 log-probs of magnitude ~3.
    assert abs(rows[0]["rewards/chosen"]) < 1e-6 and abs(rows[0]["rewards/rejected"]) < 1e-6
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(rows[1]["rewards/margins"]) > 1e-4  # one update later the policy has moved


def test_rerun_is_a_no_op(scored, capsys):
    from megatron_simpo.cli import main as cli_main

    root, _, _ = scored
    marker = root / "prep" / MARKER
    before = marker.read_text()
    args = ["score-reference", "--load", str(root / "ckpt"), "--data", str(root / "prep")]
    assert cli_main([*args, "--seq-length", str(MAX_LENGTH)]) == 0
    assert "already holds reference log-probs" in capsys.readouterr().out
    assert marker.read_text() == before


def direct_sums(rows: list[dict]) -> tuple[list[float], list[float]]:
    """Summed log-probs of each response's tokens by transformers in float64, one pair at a time
    (no padding, no packing): the slow, obviously correct reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float64).eval()
    out: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        for r in rows:
            for side, sums in zip(("chosen_ids", "rejected_ids"), out):
                seq = torch.tensor([r["prompt_ids"] + r[side]])
                logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1], -1)
                tok = logp.gather(-1, seq[0, 1:, None])[:, 0]
                sums.append(tok[len(r["prompt_ids"]) - 1 :].sum().item())
    return out


def test_values_are_the_summed_response_log_probs(scored):
    root, _, _ = scored
    got = columns(root / "prep")
    rows = varied_rows()
    assert got["ref_chosen_tokens"] == [len(r["chosen_ids"]) for r in rows]
    assert got["ref_rejected_tokens"] == [len(r["rejected_ids"]) for r in rows]
    chosen, rejected = direct_sums(rows)
    err = max(
        abs(a - b)
        for a, b in zip(got["ref_chosen_logps"] + got["ref_rejected_logps"], chosen + rejected)
    )
    # fp32 Megatron (packed, prefix-shared, fused head) vs float64 transformers: fp32 rounding
    # through 4 layers and a sum of <= 8 log-probs; measured max 1.2e-5 at |sum| up to 78
    # (1.5e-7 relative, ~1.5 ulp). 2e-6 relative allows ~16 ulps of the largest sum.
    assert err < 2e-6 * max(abs(v) for v in chosen + rejected), err


def test_values_identical_at_tp2_pp2_dp2(scored):
    root, _, _ = scored
    runner = str(REPO / "tests/distributed/score_reference_runner.py")
    res = torchrun(2, [runner, str(root / "ckpt"), str(root / "layouts")])
    assert res.returncode == 0, res.stderr[-4000:]
    ref = columns(root / "prep")
    for name in ("tp2", "pp2", "dp2"):
        got = columns(root / "layouts" / name)
        assert PreparedPairs(root / "layouts" / name).info[REFERENCE_KEY]["layout"]["dp"] == (
            2 if name == "dp2" else 1
        )
        for c in ("ref_chosen_tokens", "ref_rejected_tokens"):
            assert got[c] == ref[c], (name, c)
        values = [(a, b) for c in ("ref_chosen_logps", "ref_rejected_logps") for a, b in
                  zip(got[c], ref[c])]  # fmt: skip
        if name == "tp2":
            # TP2 sums the vocabulary's exp and the row-parallel matmuls in another order:
            # fp32 rounding; measured max 7.6e-6 = 1 ulp of the largest |sum| (78), i.e. 1e-7
            # relative. 1e-6 relative is 8 ulps.
            assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in values), name
        else:  # PP2 and DP2 only split the same work (same packed micro-batches): bit-identical
            assert all(a == b for a, b in values), name
