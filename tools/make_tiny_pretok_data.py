"""Writes pre-tokenised preference pairs for the tiny model (one JSON object per line).

Default (``examples/tiny_pretok.jsonl``): pairs with a learnable preference. Token ids: 1 is BOS,
2 is EOS, 3..12 are the digits 0..9, 13 is '+', 14 is '='. A prompt is ``BOS a + b =`` (single
digits); the chosen response spells the right sum, the rejected one a wrong sum, each followed
by EOS.

``--varied`` (``tests/data/varied_pretok.jsonl``, the layout matrix, resume and packing tests):
what real data looks like to the batching code: prompt lengths from 1 to ``max_length - 1``,
response lengths from 1 to what fits (``prompt + longest response <= max_length``, so nothing
is truncated at ``--seq-length max_length``), random non-unit weights in [0.2, 3.0], and the
corner cases first: a one-token prompt, one-token chosen / rejected / both responses, a pair of
exactly ``max_length`` tokens, a prompt of ``max_length - 2`` tokens. Random token ids in
``[3, vocab)``; chosen and rejected always differ (ties are dropped by data validation).

Deterministic (seeded).

    python tools/make_tiny_pretok_data.py [--pairs 256] [--out examples/tiny_pretok.jsonl]
    python tools/make_tiny_pretok_data.py --varied --pairs 24 --out tests/data/varied_pretok.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

BOS, EOS, PLUS, EQ = 1, 2, 13, 14
REPO = Path(__file__).resolve().parents[1]


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


def varied_lengths(n: int, max_length: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """``(prompt, chosen, rejected)`` lengths: the corner cases, then random ones that fit."""
    m = max_length
    corners = [(1, 3, 5), (4, 1, 6), (6, 7, 1), (3, 1, 1), (2, m - 2, 5), (m - 2, 2, 1)]
    out = corners[:n]
    while len(out) < n:
        total = rng.randint(2, m)  # prompt + longest response, uniform: every padding width
        p = rng.randint(1, total - 1)
        lengths = [total - p, rng.randint(1, total - p)]
        rng.shuffle(lengths)
        out.append((p, *lengths))
    return out


def make_varied_pairs(n: int, seed: int, max_length: int = 16, vocab: int = 32) -> list[dict]:
    """``n`` pairs with varied lengths and weights (see the module docstring); ``n >= 6``
    keeps every corner case."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    rows = []
    for p, c, r in varied_lengths(n, max_length, rng):
        chosen, rejected = ids(c), ids(r)
        while rejected == chosen:
            rejected = ids(r)
        rows.append(
            {
                "prompt_ids": ids(p),
                "chosen_ids": chosen,
                "rejected_ids": rejected,
                "weight": round(rng.uniform(0.2, 3.0), 3),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=None, help="256; 24 with --varied")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--varied", action="store_true", help="varied lengths and weights")
    ap.add_argument("--max-length", type=int, default=16, help="--varied: the --seq-length")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.varied:
        rows = make_varied_pairs(args.pairs or 24, args.seed, args.max_length)
        out = args.out or REPO / "tests/data/varied_pretok.jsonl"
    else:
        rows = make_pairs(args.pairs or 256, args.seed)
        out = args.out or REPO / "examples/tiny_pretok.jsonl"
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
