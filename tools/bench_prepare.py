"""Benchmark of ``prepare``: pairs/s on synthetic conversational pairs with a real-size tokenizer.

    python tools/bench_prepare.py [--pairs 100000] [--vocab 32000] [--workers 1 2]

Builds (in a temporary directory, nothing downloaded) a byte-level BPE tokenizer of ``--vocab``
tokens trained on synthetic text, gives it a Llama-3-like chat template, writes ``--pairs``
UltraFeedback-style conversational pairs (system + user prompt, two assistant answers, 1 in 10
multi-turn), and times ``prepare`` (validation, chat template, tokenisation, truncation to 1024,
Arrow output) with each worker count. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or "
    "by one had not but what all were when we there can an your which their said if do will "
    "each about how up out them then she many some so these would other into has more her "
    "two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after words called just where "
    "most know get through back much before go good new write our used me man too any day "
    "same right look think also around another came come work three word must because "
    "does part even place well such here take why things help put years different away "
    "again off went old number great tell men say small every found still between name "
    "should home big give air line set own under read last never us left end along while "
    "might next sound below saw something thought both few those always looked show large "
    "often together asked house don't world going want school important until form food "
    "keep children feet land side without boy once animals life enough took sometimes four "
    "head above kind began almost live page got earth need far hand high year mother light "
    "parts country father let night following picture being study second eyes soon times "
    "story boys since white days ever paper hard near sentence better best across during "
    "today others however sure means knew it's try told young miles sun ways thing whole "
    "hear example heard several change answer room sea against top turned learn point city "
    "play toward five using himself usually"
).split()

TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def make_tokenizer(out: Path, vocab: int, rng: random.Random) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [sentence(rng, 5, 40) + " " + str(rng.randint(0, 10**6)) for _ in range(20000)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    fast.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))


def make_data(path: Path, n: int, rng: random.Random) -> None:
    with path.open("w") as f:
        for _ in range(n):
            prompt = [
                {"role": "system", "content": sentence(rng, 5, 15)},
                {"role": "user", "content": sentence(rng, 10, 80)},
            ]
            if rng.random() < 0.1:
                prompt += [
                    {"role": "assistant", "content": sentence(rng, 10, 60)},
                    {"role": "user", "content": sentence(rng, 5, 30)},
                ]
            row = {
                "prompt": prompt[-1]["content"],
                "chosen": prompt + [{"role": "assistant", "content": sentence(rng, 20, 250)}],
                "rejected": prompt + [{"role": "assistant", "content": sentence(rng, 20, 250)}],
            }
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    from megatron_simpo.data.prepare import PrepareOptions, prepare

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_tokenizer(tmp / "tok", args.vocab, rng)
        make_data(tmp / "pairs.jsonl", args.pairs, rng)
        print(
            f"setup (tokenizer {args.vocab} + {args.pairs} pairs): "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        rows = []
        for w in args.workers:
            t0 = time.perf_counter()
            s = prepare(
                str(tmp / "pairs.jsonl"),
                tmp / f"out{w}",
                tokenizer=str(tmp / "tok"),
                opts=PrepareOptions(max_length=1024, max_prompt_length=512),
                num_workers=w,
                quiet=True,
            )
            dt = time.perf_counter() - t0
            rows.append((w, s["kept"], dt, s["kept"] / dt, s["truncated"]))
        print("\n| workers | pairs kept | seconds | pairs/s | truncated |\n|---|---|---|---|---|")
        for w, kept, dt, rate, trunc in rows:
            print(f"| {w} | {kept} | {dt:.1f} | {rate:,.0f} | {trunc} |")


if __name__ == "__main__":
    main()
