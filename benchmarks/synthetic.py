"""Synthetic pre-tokenised preference pairs with realistic, long-tailed lengths (benchmarks).

Prompt ~ lognormal(median 0.12 max_len, sigma 0.8), each response ~ lognormal(median
0.21 max_len, sigma 0.7), clipped so prompt + response <= max_len tokens (at 512: medians 61 and
108, the shape of UltraFeedback's token counts scaled down). Id 1 starts each prompt (BOS), id 2
ends each response (EOS), other ids are uniform in [3, vocab).
"""

from __future__ import annotations

import math
import random


def long_tailed_pairs(n: int, max_len: int, vocab: int, seed: int) -> list[dict]:
    """``n`` rows ``{"prompt_ids", "chosen_ids", "rejected_ids"}``, reproducible from ``seed``."""
    rng = random.Random(seed)

    def length(median: float, sigma: float, lo: int, hi: int) -> int:
        return max(lo, min(hi, int(rng.lognormvariate(math.log(median), sigma))))

    def tokens(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    out = []
    for _ in range(n):
        p = length(0.12 * max_len, 0.8, 4, max_len // 2)
        prompt = [1, *tokens(p - 1)]
        chosen, rejected = (
            [*tokens(length(0.21 * max_len, 0.7, 2, max_len - p) - 1), 2] for _ in range(2)
        )
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out
