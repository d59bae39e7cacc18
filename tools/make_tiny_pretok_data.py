"""Writes ``examples/tiny_pretok.jsonl``: pre-tokenised pairs with a learnable preference.

Token ids: 1 is BOS, 2 is EOS, 3..12 are the digits 0..9, 13 is '+', 14 is '='. A prompt is
``BOS a + b =`` (single digits); the chosen response spells the right sum, the rejected one a
wrong sum, each followed by EOS. Deterministic (seeded).

    python tools/make_tiny_pretok_data.py [--pairs 256] [--out examples/tiny_pretok.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

BOS, EOS, PLUS, EQ = 1, 2, 13, 14


def digits(n: int) -> list[int]:
    return [3 + int(c) for c in str(n)]


def make_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        wrong = wrong if wrong >= 0 else a + b + 4
        rows.append(
            {
                "prompt_ids": [BOS, 3 + a, PLUS, 3 + b, EQ],
                "chosen_ids": digits(a + b) + [EOS],
                "rejected_ids": digits(wrong) + [EOS],
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "examples/tiny_pretok.jsonl"))
    args = ap.parse_args()
    with open(args.out, "w") as f:
        for row in make_pairs(args.pairs, args.seed):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
