"""Writes the embedded demo: a tiny Llama HF model, its tokenizer and preference data.

    python tools/make_tiny_model.py [--out examples/tiny]

Outputs (committed; regenerate with this script, deterministic):
- ``config.json``, ``model.safetensors``, ``generation_config.json``: a random-init
  ``LlamaForCausalLM`` (4 layers, hidden 64, GQA 4/2 heads, untied) — a stand-in for an SFT model;
- ``tokenizer.json``, ``tokenizer_config.json``: a word-level tokenizer (whitespace split);
- ``train.jsonl`` / ``heldout.jsonl``: conversational pairs (UltraFeedback-binarized style:
  ``prompt`` plus ``chosen``/``rejected`` message lists), rendered by the tokenizer's chat
  template (``role: content`` lines).

The preference: the question is ``what is A plus B ?``; the chosen answer restates the question
faithfully and gives the right sum (``A plus B is C``); the rejected one either misquotes an
operand (3 in 4 pairs) or gives a wrong sum. Held-out pairs use operand pairs never seen in
training: faithful quoting generalises to them, sums of unseen operands mostly do not.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ["system:", "user:", "assistant:", "what", "is", "plus", "?"] + [str(i) for i in range(19)]
#: Each message on its own line, "role: content"; the generation prompt is "assistant:".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(out)
    # The generic class name and an inline chat template load with transformers 4 and 5 alike.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return fast


def make_model(out: Path, vocab_size: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)


def make_pairs(operands: list[tuple[int, int]], rng: random.Random, per_prompt: int) -> list[dict]:
    rows = []
    for a, b in operands:
        for _ in range(per_prompt):
            prompt = f"what is {a} plus {b} ?"
            chosen = f"{a} plus {b} is {a + b}"
            if rng.random() < 0.75:  # misquote an operand (keeping the sum of the misquote)
                if rng.random() < 0.5:
                    a2, b2 = rng.choice([x for x in range(10) if x != a]), b
                else:
                    a2, b2 = a, rng.choice([x for x in range(10) if x != b])
                rejected = f"{a2} plus {b2} is {a2 + b2}"
            else:  # wrong sum
                wrong = rng.choice([x for x in range(19) if x != a + b])
                rejected = f"{a} plus {b} is {wrong}"
            user = {"role": "user", "content": prompt}
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [user, {"role": "assistant", "content": chosen}],
                    "rejected": [user, {"role": "assistant", "content": rejected}],
                }
            )
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "examples/tiny"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    make_model(out, len(tok), args.seed)
    rng = random.Random(args.seed)
    operands = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(operands)
    heldout_ops, train_ops = operands[:20], operands[20:]
    splits = {"train": make_pairs(train_ops, rng, 6), "heldout": make_pairs(heldout_ops, rng, 3)}
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    print(
        f"wrote {out}: vocab {len(tok)}, "
        + ", ".join(f"{k} {len(v)} pairs" for k, v in splits.items())
    )


if __name__ == "__main__":
    main()
