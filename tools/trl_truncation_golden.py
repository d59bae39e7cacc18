"""TRL's own tokenisation of over-long text pairs, as a fixture for the truncation parity test.

Calls the installed TRL's ``CPOTrainer.tokenize_row`` (unbound, on a stand-in object holding only
what it reads) with the shipped ``examples/tiny`` tokenizer, and writes what it produced to
``tests/fixtures/trl_truncation_<rule>.json``. The rule follows from the TRL version: TRL up to
0.27 cuts the prompt to ``max_prompt_length`` first (our ``--truncation-rule trl``); from 0.28 it
never cuts the prompt (``trl-1``).

    pip install trl==1.16.0            # -> trl-1 fixture
    python tools/trl_truncation_golden.py
    pip install --no-deps --target /tmp/trl027 trl==0.27.2
    PYTHONPATH=/tmp/trl027 python tools/trl_truncation_golden.py   # -> trl fixture

``tests/test_trl_truncation.py`` checks ``prepare`` against the fixtures (no TRL needed) and,
where TRL is installed, regenerates the installed version's outputs and compares them too.
"""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny"
WORDS = ["what", "is", "plus", "?"] + [str(i) for i in range(19)]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def cases() -> list[dict[str, Any]]:
    """Over-long pairs (prompt over, one or both responses over, both over) plus one that fits,
    under both truncation modes; seeded, so the fixture is reproducible."""
    rng = random.Random(17)
    shapes = [  # (prompt words, chosen words, rejected words)
        (30, 3, 5),  # the prompt alone is over max_prompt_length and the pair too long
        (4, 25, 2),  # one response over
        (5, 22, 27),  # both responses over
        (28, 20, 1),  # prompt and a response over; a one-token response
        (3, 4, 2),  # fits: nothing cut
        (9, 11, 14),  # prompt under max_prompt_length, the pair just over
    ]
    out = []
    for mode in ("keep_end", "keep_start"):
        for n_p, n_c, n_r in shapes:
            row = {
                "prompt": _text(rng, n_p),
                "chosen": " " + _text(rng, n_c),
                "rejected": " " + _text(rng, n_r),
            }
            out.append(
                {"row": row, "max_length": 24, "max_prompt_length": 10, "truncation_mode": mode}
            )
    return out


def trl_rule() -> tuple[str, str]:
    """(TRL version, our rule name that matches it)."""
    import trl
    from trl.experimental.cpo import CPOConfig

    has_prompt_limit = "max_prompt_length" in CPOConfig.__dataclass_fields__
    return trl.__version__, "trl" if has_prompt_limit else "trl-1"


def trl_tokenize(case: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
    """TRL's ``tokenize_row`` on one case: prompt, chosen and rejected response ids."""
    from accelerate import PartialState
    from trl.experimental.cpo import CPOTrainer

    PartialState(cpu=True)  # TRL's logger (a warning on empty completions) needs it
    me = SimpleNamespace(
        processing_class=tokenizer,
        tokenizer=tokenizer,
        is_encoder_decoder=False,
        max_length=case["max_length"],
        max_prompt_length=case["max_prompt_length"],
        truncation_mode=case["truncation_mode"],
        label_pad_token_id=-100,
    )
    me.build_tokenized_answer = partial(CPOTrainer.build_tokenized_answer, me)
    batch = CPOTrainer.tokenize_row(me, case["row"])
    out: dict[str, list[int]] = {}
    for side in ("chosen", "rejected"):
        ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
        n_prompt = sum(1 for x in labels if x == -100)
        out["prompt_ids"] = list(ids[:n_prompt])
        out[f"{side}_ids"] = list(ids[n_prompt:])
    return out


def main() -> None:
    from transformers import AutoTokenizer

    version, rule = trl_rule()
    tok = AutoTokenizer.from_pretrained(TINY)
    results = [{**c, "trl": trl_tokenize(c, tok)} for c in cases()]
    path = REPO / "tests" / "fixtures" / f"trl_truncation_{rule}.json"
    path.parent.mkdir(exist_ok=True)
    fixture = {"trl_version": version, "rule": rule, "tokenizer": "examples/tiny", "cases": results}
    path.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {path} ({len(results)} cases, TRL {version}, rule {rule})")


if __name__ == "__main__":
    main()
