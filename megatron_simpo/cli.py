"""Command line: ``megatron-simpo <command>`` (also ``python -m megatron_simpo``).

Commands:
    train   SimPO training; run under ``torchrun`` for several processes.

Flags are generated from the config dataclasses (``megatron_simpo/config.py``): every field
``foo_bar`` is ``--foo-bar``; booleans also take ``--no-foo-bar``. ``--config FILE`` reads a YAML
file first and ``--model-config`` a Hugging Face ``config.json``; flags given on the command line
override both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from megatron_simpo.config import (
    SECTIONS,
    ModelConfig,
    RunConfig,
    field_docs,
    field_types,
)
from megatron_simpo.errors import ConfigError, SimPOError


def _base_type(tp: Any) -> tuple[Any, list | None]:
    """(python type, choices) for an annotation like ``int | None`` or ``Literal[...]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is typing.Literal:
        choices = list(typing.get_args(tp))
        return type(choices[0]), choices
    return tp, None


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        docs, hints = field_docs(cls), field_types(cls)
        for f in fields(cls):
            tp, choices = _base_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            dest = f"{section}.{f.name}"
            help_text = docs.get(f.name, "")
            if tp is bool:
                group.add_argument(
                    flag,
                    dest=dest,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            elif tp is dict:
                group.add_argument(
                    flag,
                    dest=dest,
                    type=json.loads,
                    default=argparse.SUPPRESS,
                    help=help_text + " (JSON)",
                )
            else:
                group.add_argument(
                    flag,
                    dest=dest,
                    type=tp,
                    choices=choices,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-simpo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="SimPO training (run under torchrun)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--config", help="YAML file with sections " + ", ".join(SECTIONS))
    train.add_argument("--model-config", help="Hugging Face config.json (or its directory)")
    _add_config_flags(train)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """defaults < --config YAML < --model-config < command-line flags."""
    if args.config:
        import yaml

        try:
            raw = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {args.config}: cannot read it: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {args.config}: expected a mapping of sections")
        cfg = RunConfig.from_dict(raw, source=args.config)
    else:
        cfg = RunConfig()
    if args.model_config:
        base = cfg.model
        hf = ModelConfig.from_hf_config(args.model_config)
        hf.make_vocab_size_divisible_by = base.make_vocab_size_divisible_by
        cfg.model = hf
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if args.command == "train":
            from megatron_simpo.train import run

            run(cfg)
    except SimPOError as e:
        print(f"megatron-simpo: error: {e}", file=sys.stderr)
        return 2
    return 0
