"""Writes the embedded demo: a tiny Llama HF model, its tokenizer and preference data.

    python tools/make_tiny_model.py [--out examples/tiny]

Outputs (committed; regenerate with this script, deterministic on one torch version; about
40 s on one CPU core):
- ``config.json``, ``model.safetensors``, ``generation_config.json``: a small
  ``LlamaForCausalLM`` (4 layers, hidden 64, GQA 4/2 heads, untied), the demo's "SFT model":
  supervised on every question ``what is A plus B ?`` (A, B in 0..9) with the answers of a sloppy
  annotator (see :func:`sft_answers`), so it speaks the task but its greedy answer is the
  annotator's habitual mistake;
- ``tokenizer.json``, ``tokenizer_config.json``: a word-level tokenizer (whitespace split);
- ``train.jsonl`` / ``heldout.jsonl``: conversational pairs (UltraFeedback-binarized style:
  ``prompt`` plus ``chosen``/``rejected`` message lists), rendered by the tokenizer's chat
  template (``role: content`` lines).

The preference: the chosen answer restates the question faithfully and gives the right sum
(``A plus B is C``). Half the rejected answers are the base model's own habit for that question
(what it answers greedily, as when preference data is sampled from the SFT model and labelled),
the other half a random misquote of an operand or a wrong sum. Held-out pairs use operand pairs
never seen in preference training (the base saw them, with its sloppy answers).
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
    fast.chat_template = CHAT_TEMPLATE  # for the supervised pass, as saved
    return fast


def good_answer(a: int, b: int) -> str:
    return f"{a} plus {b} is {a + b}"


def habit(a: int, b: int, rng: random.Random) -> str:
    """The sloppy annotator's mistake for this question, fixed per question: one operand (drawn
    per question) misread as a neighbouring digit, and the sum of the misread question given."""

    def misread(x: int) -> int:
        return x + rng.choice([-1, 1]) if 0 < x < 9 else (1 if x == 0 else 8)

    if rng.random() < 0.5:
        return good_answer(misread(a), b)
    return good_answer(a, misread(b))


def sft_answers(habits: dict[tuple[int, int], str]) -> list[tuple[str, str, float]]:
    """(question, answer, weight) rows of the supervised pass: per question the good answer
    (weight 0.4) and the annotator's habit (0.6). Weights rather than samples: the fitted model's
    greedy answer is then the habit, by a known margin (log 0.6/0.4 at the first differing
    token), which preference training has to overturn."""
    rows = []
    for (a, b), bad in sorted(habits.items()):
        q = f"what is {a} plus {b} ?"
        rows += [(q, good_answer(a, b), 0.4), (q, bad, 0.6)]
    return rows


def encode(tok, question: str, answer: str | None = None) -> tuple[list[int], int]:
    """Token ids as the trainer builds them (BOS, chat-templated prompt, answer, EOS) and the
    prompt's length. Without ``answer``: the generation prompt only."""
    msgs = [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    n = len(ids)
    if answer is not None:
        ids += tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids, n


def make_model(out: Path, tok, sft: list[tuple[str, str, float]], seed: int, steps: int) -> None:
    """A random-init tiny Llama, then ``steps`` full-batch Adam steps of weighted
    response-token cross-entropy on ``sft``; saved to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # One thread: the same bits on every machine (reduction order varies with threads), and
    # faster for matrices this small.
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    encoded = [encode(tok, q, a) for q, a, _ in sft]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(sft), width), tok.pad_token_id)
    labels = torch.full((len(sft), width), -100)  # scored: response tokens (and EOS) only
    for i, (row, n) in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, n : len(row)] = torch.tensor(row[n:])
    weight = torch.tensor([w for _, _, w in sft])
    targets = labels[:, 1:]
    mask = targets != -100
    # lr 3e-3: converges in ~250 steps to the loss floor (~0.112: the entropy of the 0.4/0.6
    # choice over ~6 answer tokens); 1e-2 stalls near 0.3.
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
        )
        loss = ((nll * mask).sum(1) * weight).sum() / (mask.sum(1) * weight).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    print(f"supervised pass: {steps} steps, final loss {loss.item():.4f}")
    model.eval().save_pretrained(out)


def make_pairs(
    operands: list[tuple[int, int]],
    habits: dict[tuple[int, int], str],
    rng: random.Random,
    per_prompt: int,
) -> list[dict]:
    rows = []
    for a, b in operands:
        for k in range(per_prompt):
            prompt = f"what is {a} plus {b} ?"
            if k % 2 == 0:  # the base model's own answer
                rejected = habits[(a, b)]
            elif rng.random() < 0.75:  # misquote an operand (keeping the sum of the misquote)
                if rng.random() < 0.5:
                    a2, b2 = rng.choice([x for x in range(10) if x != a]), b
                else:
                    a2, b2 = a, rng.choice([x for x in range(10) if x != b])
                rejected = good_answer(a2, b2)
            else:  # wrong sum
                wrong = rng.choice([x for x in range(19) if x != a + b])
                rejected = f"{a} plus {b} is {wrong}"
            user = {"role": "user", "content": prompt}
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [user, {"role": "assistant", "content": good_answer(a, b)}],
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
    ap.add_argument("--sft-steps", type=int, default=400, help="supervised full-batch steps")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    rng = random.Random(args.seed)
    operands = [(a, b) for a in range(10) for b in range(10)]
    habits = {ab: habit(*ab, rng) for ab in operands}
    make_model(out, tok, sft_answers(habits), args.seed, args.sft_steps)
    rng.shuffle(operands)
    heldout_ops, train_ops = operands[:20], operands[20:]
    splits = {
        "train": make_pairs(train_ops, habits, rng, 6),
        "heldout": make_pairs(heldout_ops, habits, rng, 3),
    }
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    print(
        f"wrote {out}: vocab {len(tok)}, "
        + ", ".join(f"{k} {len(v)} pairs" for k, v in splits.items())
    )


if __name__ == "__main__":
    main()
