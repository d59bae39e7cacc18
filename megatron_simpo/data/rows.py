"""Row schemas, detected automatically (``--data-schema`` overrides), and their validation.

- ``text``: ``{"prompt": str, "chosen": str, "rejected": str}``.
- ``conversational`` (UltraFeedback-binarized style): ``chosen`` / ``rejected`` are message lists
  ``[{"role", "content"}, ...]``. Their shared leading messages are the prompt (an explicit
  ``prompt`` — a string or a message list — is used when the lists hold only the answer); an
  optional system message comes first, then user and assistant alternate; the last message of
  each is the assistant's response. **Multi-turn: only the final assistant turn is the response.**
- ``pretokenized``: ``{"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}``,
  response ids used as given.

Every schema takes an optional ``weight`` (a finite number >= 0). Each check raises
:class:`RowError` with the field and the fix; the caller adds the file and line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCHEMAS = ("auto", "text", "conversational", "pretokenized")
ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """One invalid row: ``reason`` is a short key for counting, the message says what to fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TextRow:
    prompt: str
    chosen: str
    rejected: str
    weight: float


@dataclass(frozen=True)
class ConversationRow:
    prompt: tuple[dict, ...]  # messages before the final answer (system/user/assistant turns)
    chosen: dict  # the final assistant message
    rejected: dict
    weight: float


@dataclass(frozen=True)
class IdsRow:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    weight: float


def detect_schema(row: Any) -> str:
    """The schema a row looks like (a row that fits none raises RowError)."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"each row must be a JSON object, got {type(row).__name__}")
    if "prompt_ids" in row or "chosen_ids" in row:
        return "pretokenized"
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        return "conversational"
    if "chosen" in row or "rejected" in row or "prompt" in row:
        return "text"
    raise RowError(
        "unknown_schema",
        f"fields {sorted(row)[:8]} match no schema; expected "
        "prompt/chosen/rejected (text or message lists) or prompt_ids/chosen_ids/"
        "rejected_ids",
    )


def _weight(row: dict) -> float:
    w = row.get("weight", 1.0)
    if w is None:
        return 1.0
    if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
        raise RowError("bad_weight", f"field 'weight' must be a finite number >= 0, got {w!r}")
    return float(w)


def _require(row: dict, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise RowError(
            "missing_field", f"missing field(s) {missing}; this schema needs {list(fields)}"
        )


def _text(row: dict, name: str) -> str:
    v = row[name]
    if not isinstance(v, str):
        raise RowError("wrong_type", f"field '{name}' must be a string, got {type(v).__name__}")
    if not v.strip():
        raise RowError("empty_text", f"field '{name}' is empty; every text needs content")
    return v


def parse_text(row: dict) -> TextRow:
    _require(row, ("prompt", "chosen", "rejected"))
    return TextRow(_text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected"), _weight(row))


def _message(m: Any, where: str) -> dict:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise RowError("bad_message", f"{where} must be an object with 'role' and 'content'")
    if m["role"] not in ROLES:
        raise RowError("bad_role", f"{where} has role {m['role']!r}; roles are {list(ROLES)}")
    if not isinstance(m["content"], str):
        raise RowError("wrong_type", f"{where}.content must be a string")
    if not m["content"].strip():
        raise RowError("empty_text", f"{where}.content is empty")
    return {"role": m["role"], "content": m["content"]}


def _messages(v: Any, name: str) -> list[dict]:
    if not isinstance(v, list):
        raise RowError("wrong_type", f"field '{name}' must be a list of messages")
    if not v:
        raise RowError("empty_text", f"field '{name}' is an empty conversation")
    return [_message(m, f"{name}[{i}]") for i, m in enumerate(v)]


def _check_order(msgs: list[dict], name: str) -> None:
    roles = [m["role"] for m in msgs]
    body = roles[1:] if roles and roles[0] == "system" else roles
    if "system" in body:
        raise RowError("role_order", f"field '{name}': a system message may only come first")
    for i, r in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if r != want:
            raise RowError(
                "role_order",
                f"field '{name}': expected '{want}' at turn {i + 1} "
                f"(user and assistant alternate, starting with user), got '{r}'",
            )


def parse_conversation(row: dict) -> ConversationRow:
    _require(row, ("chosen", "rejected"))
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise RowError(
                "final_not_assistant",
                f"field '{name}': the final message must be "
                f"the assistant's response, got '{msgs[-1]['role']}'",
            )
    if len(chosen) == 1 and len(rejected) == 1:
        if "prompt" not in row or row["prompt"] is None:
            raise RowError(
                "missing_field",
                "chosen/rejected hold only the answer: a 'prompt' "
                "field (string or message list) is needed",
            )
        p = row["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise RowError("empty_text", "field 'prompt' is empty")
            prompt = [{"role": "user", "content": p}]
        else:
            prompt = _messages(p, "prompt")
    else:
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            raise RowError(
                "prompt_mismatch",
                "chosen and rejected must share the same prompt "
                "messages (all but the final answer); they differ",
            )
        if (
            isinstance(row.get("prompt"), str)
            and prompt
            and prompt[-1]["role"] == "user"
            and (row["prompt"].strip() != prompt[-1]["content"].strip())
        ):
            raise RowError(
                "prompt_mismatch",
                "field 'prompt' differs from the last user message of chosen/rejected",
            )
    _check_order(prompt + [chosen[-1]], "chosen")
    return ConversationRow(tuple(prompt), chosen[-1], rejected[-1], _weight(row))


def _ids(row: dict, name: str, vocab_size: int | None) -> tuple[int, ...]:
    v = row[name]
    if not isinstance(v, list):
        raise RowError(
            "wrong_type", f"field '{name}' must be a list of token ids, got {type(v).__name__}"
        )
    for i, t in enumerate(v):
        if isinstance(t, bool) or not isinstance(t, int):
            raise RowError("wrong_type", f"field '{name}'[{i}] = {t!r} is not an integer token id")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise RowError(
                "id_out_of_vocab",
                f"field '{name}'[{i}] = {t} is outside the "
                f"vocabulary [0, {vocab_size}); re-tokenise with the model's "
                "tokenizer or fix model.vocab_size",
            )
    return tuple(v)


def parse_ids(row: dict, vocab_size: int | None) -> IdsRow:
    _require(row, ("prompt_ids", "chosen_ids", "rejected_ids"))
    prompt, chosen, rejected = (
        _ids(row, f, vocab_size) for f in ("prompt_ids", "chosen_ids", "rejected_ids")
    )
    if not prompt:
        raise RowError(
            "empty_text",
            "field 'prompt_ids' is empty; the first token is never "
            "predicted, so start the prompt with at least BOS",
        )
    for name, resp in (("chosen_ids", chosen), ("rejected_ids", rejected)):
        if not resp:
            raise RowError(
                "empty_response",
                f"field '{name}' is empty; a response needs at "
                "least one token (SimPO's length-normalised reward of an empty "
                "response is 0/0)",
            )
    return IdsRow(prompt, chosen, rejected, _weight(row))


def parse_row(row: Any, schema: str, vocab_size: int | None) -> TextRow | ConversationRow | IdsRow:
    """Validates a decoded row under ``schema`` (``auto`` detects it per row)."""
    kind = detect_schema(row) if schema == "auto" else schema
    if not isinstance(row, dict):
        raise RowError("not_an_object", "each row must be a JSON object")
    if kind == "text":
        return parse_text(row)
    if kind == "conversational":
        return parse_conversation(row)
    if kind == "pretokenized":
        return parse_ids(row, vocab_size)
    raise ValueError(f"unknown schema {kind!r}")


def is_tie(row: TextRow | ConversationRow | IdsRow) -> bool:
    if isinstance(row, IdsRow):
        return row.chosen_ids == row.rejected_ids
    if isinstance(row, TextRow):
        return row.chosen == row.rejected
    return row.chosen["content"] == row.rejected["content"]
