"""Tokenisation and truncation rules (TRL's conventions, so numbers compare with TRL/CPO runs).

1. Conversations are rendered with the tokenizer's chat template: the prompt text is the template
   of the prompt messages with the generation prompt; the response text is what the template of
   prompt + final answer adds after it. Only the final assistant turn is the response, exactly as
   a model generates it after the prompt: reasoning blocks the template writes into the final
   turn (Qwen3's ``<think>...</think>``, empty when the answer has none) are scored, those it
   drops from earlier turns are not in the prompt either, and whitespace the template writes
   after the turn's closing EOS (ChatML's newline between turns) is not part of the response:
   generation stops at EOS.
2. Prompt and prompt + response are tokenised **without** special tokens. The response ids are
   ``enc(prompt + response)[len(enc(prompt)):]``. When the tokenizer merges the last prompt
   characters with the first response characters (the prefix of ``enc(prompt + response)``
   differs from ``enc(prompt)``), the boundary moves left until it is a common prefix; chosen and
   rejected then share the shorter prompt. ``prompt + response`` is always exactly the tokenised
   text.
3. BOS is put once at the start of the prompt if the tokenizer has one (not twice when a chat
   template already wrote it).
4. EOS is appended to each response if it is not already its last token; EOS counts as a
   response token. Prompt tokens are never scored.
5. Truncation (``--max-length``, ``--max-prompt-length``, ``--truncation-rule``) applies only
   when prompt + the longer response exceed ``max_length``; ``max_prompt_length`` defaults to
   ``max_length // 2``. Rules (see :data:`TRUNCATION_RULES`):

   - ``trl`` (default): TRL's CPO trainer up to 0.27 and the SimPO code. The prompt is cut to
     ``max_prompt_length`` (``keep_end``: its last tokens, so a cut prompt loses BOS as it does
     there; ``keep_start``: its first), then, if still too long, each response to
     ``max_length - max_prompt_length`` tokens.
   - ``trl-1``: TRL's experimental CPO trainer from 0.28 on (1.16 tested): the prompt is never
     cut, each response is cut to ``max_length - len(prompt)`` (possibly to nothing).
   - ``fill``: the prompt is cut as in ``trl`` but ``keep_end`` keeps BOS (for pre-tokenised
     rows the first prompt token is taken as BOS), then the responses fill the rest of
     ``max_length``.

   A pair whose response is empty after truncation is dropped and counted; so is one whose
   responses became identical (``tie_after_truncation``).
"""

from __future__ import annotations

from typing import Any

from megatron_simpo.data.rows import ConversationRow, RowError, TextRow


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render_conversation(tok: Any, row: ConversationRow) -> TextRow:
    """A conversation row as prompt text + response texts via the chat template."""
    if not getattr(tok, "chat_template", None):
        raise RowError(
            "no_chat_template",
            "the tokenizer has no chat template, so "
            "conversations cannot be rendered; use a tokenizer with one or text pairs",
        )
    prompt = list(row.prompt)
    p_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    texts = []
    for final in (row.chosen, row.rejected):
        full = tok.apply_chat_template(prompt + [final], tokenize=False)
        if not full.startswith(p_text):
            raise RowError(
                "template_not_prefix",
                "the chat template renders the prompt "
                "differently alone and before an answer; cannot split the response",
            )
        texts.append(_end_at_eos(full[len(p_text) :], getattr(tok, "eos_token", None)))
    return TextRow(p_text, texts[0], texts[1], row.weight)


def _end_at_eos(response: str, eos: str | None) -> str:
    """``response`` without the whitespace a template writes after its closing EOS (rule 1)."""
    end = response.rstrip()
    return end if eos and end.endswith(eos) else response


def texts_to_encode(row: TextRow) -> tuple[str, str, str]:
    """The three texts :func:`tokenize_text` encodes (to batch them across rows)."""
    return row.prompt, row.prompt + row.chosen, row.prompt + row.rejected


def tokenize_text(
    tok: Any, row: TextRow, encoded: dict[str, list[int]] | None = None
) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) by the rules above; ``encoded`` may hold the
    encodings of :func:`texts_to_encode` computed in one batched call."""

    def enc(text: str) -> list[int]:
        if encoded is not None and text in encoded:
            return encoded[text]
        return list(tok(text, add_special_tokens=False)["input_ids"])

    prompt_ids = enc(row.prompt)
    fulls = [enc(row.prompt + row.chosen), enc(row.prompt + row.rejected)]
    # Boundary: the longest common prefix of enc(prompt) and each full sequence.
    k = min(_common_prefix(prompt_ids, f) for f in fulls)
    prompt = fulls[0][:k]
    responses = [f[k:] for f in fulls]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if bos is not None and (not prompt or prompt[0] != bos):
        prompt = [bos] + prompt
    if eos is not None:
        responses = [r if (r and r[-1] == eos) else r + [eos] for r in responses]
    return prompt, responses[0], responses[1]


TRUNCATION_RULES = ("trl", "trl-1", "fill")
#: Bumped when the rules above change the ids of a row (part of the prepared-data cache key).
#: 2: no whitespace after a template's closing EOS.
RULES_VERSION = 2


def _cut_prompt(prompt: list[int], limit: int, mode: str, keep_bos: bool) -> list[int]:
    """``prompt`` cut to ``limit`` tokens, keeping its start or end (and BOS if asked)."""
    if len(prompt) <= limit:
        return prompt
    if mode == "keep_start":
        return prompt[:limit]
    head = prompt[:1] if keep_bos else []
    return head + prompt[len(prompt) - (limit - len(head)) :]


def truncate(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    max_length: int,
    max_prompt_length: int | None,
    mode: str,
    bos: int | None,
    rule: str = "trl",
) -> tuple[list[int], list[int], list[int], bool]:
    """Applies rule 5 under ``rule``; returns the pieces and whether anything was cut."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected, False
    if rule == "trl-1":
        room = max(0, max_length - len(prompt))
        return prompt, chosen[:room], rejected[:room], True
    limit = max_prompt_length if max_prompt_length is not None else max_length // 2
    if rule == "trl":
        prompt = _cut_prompt(prompt, limit, mode, keep_bos=False)
        if len(prompt) + longest > max_length:
            room = max_length - limit
            chosen, rejected = chosen[:room], rejected[:room]
        return prompt, chosen, rejected, True
    if rule != "fill":
        raise ValueError(f"unknown truncation rule {rule!r}; one of {TRUNCATION_RULES}")
    keep_bos = bos is not None and prompt[:1] == [bos]
    prompt = _cut_prompt(prompt, limit, mode, keep_bos)
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room], True
