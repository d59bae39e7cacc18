"""Command-line flags from the fields of the config dataclasses (``config.py``): one definition
of each flag's name, type, choices and help, shared by ``cli.py`` (train, evaluate,
score-reference, prepare) and ``plan.py`` (``--lora-*``), so that they cannot drift apart.

A field ``foo_bar`` is the flag ``--foo-bar`` (``config.FLAG_NAMES`` adds an alias); its help is
the docstring under the field, its type and choices come from the annotation (``int | None`` is
``int``, ``Literal[...]`` gives choices, a ``dict`` is read as JSON).
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any

from megatron_simpo.config import FLAG_NAMES, field_docs, field_types


def base_type(tp: Any) -> tuple[Any, list | None]:
    """(python type, choices) for an annotation like ``int | None`` or ``Literal[...]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return base_type(args[0])
    if origin is typing.Literal:
        choices = list(typing.get_args(tp))
        return type(choices[0]), choices
    return tp, None


def field_flags(
    cls: type,
    names: Sequence[str] | None = None,
    *,
    bool_action: Any = argparse.BooleanOptionalAction,
    aliases: bool = True,
) -> Iterator[tuple[str, list[str], dict[str, Any]]]:
    """``(field name, flags, add_argument keywords)`` of the fields of dataclass ``cls`` (in
    field order, or in the order of ``names``); the caller adds ``dest``, ``default``, ...

    Args:
        bool_action: the ``action`` of a boolean field (default ``--foo`` / ``--no-foo``; or
            ``"store_true"``).
        aliases: also spell the field's ``config.FLAG_NAMES`` alias (first, so that it names
            argparse's default ``dest``).
    """
    docs, hints = field_docs(cls), field_types(cls)
    for name in names if names is not None else [f.name for f in fields(cls)]:
        tp, choices = base_type(hints[name])
        spelled = "--" + name.replace("_", "-")
        flags = [FLAG_NAMES[name], spelled] if aliases and name in FLAG_NAMES else [spelled]
        help_text = docs.get(name, "")
        if tp is bool:
            yield name, flags, dict(action=bool_action, help=help_text)
        elif tp is dict:
            yield name, flags, dict(type=json.loads, help=help_text + " (JSON)")
        else:
            yield name, flags, dict(type=tp, choices=choices, help=help_text)
