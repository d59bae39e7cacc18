"""Truncation parity with TRL's own tokenisation of over-long pairs.

The fixtures (``tests/fixtures/trl_truncation_<rule>.json``) hold what TRL's
``CPOTrainer.tokenize_row`` produced, written by ``tools/trl_truncation_golden.py``: TRL 0.27.2
for ``--truncation-rule trl`` (prompt cut to max_prompt_length first, as in the SimPO code),
TRL 1.16.0 for ``trl-1`` (prompt never cut). The live test regenerates the installed TRL's
outputs, so a fixture that drifted from TRL fails too.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

from megatron_simpo.data import PreparedPairs
from megatron_simpo.data.prepare import PrepareOptions, prepare

sys.path.insert(0, str(REPO / "tools"))
import trl_truncation_golden as golden  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
TINY = str(REPO / "examples" / "tiny")


def ours(tmp_path, cases: list[dict], rule: str) -> list[dict | None]:
    """Our prepare() on each case: its three id lists, or None where the pair was dropped."""
    out = []
    for i, c in enumerate(cases):
        src = tmp_path / f"c{i}.jsonl"
        src.write_text(json.dumps(c["row"]) + "\n")
        opts = PrepareOptions(
            max_length=c["max_length"],
            max_prompt_length=c["max_prompt_length"],
            truncation_mode=c["truncation_mode"],
            truncation_rule=rule,
        )
        try:
            prepare(str(src), tmp_path / f"o{i}", tokenizer=TINY, opts=opts, quiet=True)
        except Exception as e:  # a single dropped pair leaves nothing to write
            assert "empty_after_truncation" in str(e), e
            out.append(None)
            continue
        (p,) = PreparedPairs(tmp_path / f"o{i}")
        out.append(
            {
                "prompt_ids": list(p.prompt_ids),
                "chosen_ids": list(p.chosen_ids),
                "rejected_ids": list(p.rejected_ids),
            }
        )
    return out


def expected(trl_out: dict) -> dict | None:
    """TRL trains on a pair with an empty response (a warning); we drop and count it."""
    if not trl_out["chosen_ids"] or not trl_out["rejected_ids"]:
        return None
    return trl_out


@pytest.mark.parametrize("rule", ["trl", "trl-1"])
def test_prepare_matches_trl_fixture(tmp_path, rule):
    fixture = json.loads((FIXTURES / f"trl_truncation_{rule}.json").read_text())
    assert fixture["rule"] == rule
    cases = fixture["cases"]
    assert [c["row"] for c in cases] == [c["row"] for c in golden.cases()], "regenerate"
    got = ours(tmp_path, cases, rule)
    for c, g in zip(cases, got):
        assert g == expected(c["trl"]), (c["row"], c["truncation_mode"])


def test_default_rule_is_trl():
    assert PrepareOptions().truncation_rule == "trl"


def test_live_trl_matches_its_fixture_and_prepare(tmp_path):
    pytest.importorskip("trl")
    from transformers import AutoTokenizer

    version, rule = golden.trl_rule()
    tok = AutoTokenizer.from_pretrained(TINY)
    cases = golden.cases()
    live = [golden.trl_tokenize(c, tok) for c in cases]
    fixture = json.loads((FIXTURES / f"trl_truncation_{rule}.json").read_text())
    assert live == [c["trl"] for c in fixture["cases"]], f"TRL {version} differs from the fixture"
    assert ours(tmp_path, cases, rule) == [expected(t) for t in live]
