"""Command line: ``megatron-simpo <command>`` (also ``python -m megatron_simpo``).

Commands:
    train                 SimPO training; run under ``torchrun`` for several processes.
    evaluate              SimPO metrics of a checkpoint on a preference file (any TP/PP).
    prepare               Validate, tokenise and truncate preference data ahead of training.
    score-reference       Reference log-probs of a checkpoint into a prepared dataset (DPO family).
    convert hf-to-mcore   Import a Hugging Face Llama/Mistral/Qwen2/Qwen3 directory as a checkpoint.
    convert mcore-to-hf   Export a checkpoint (any layout) as a Hugging Face directory.
    plot                  PNG dashboard of one or more runs' metrics.jsonl (overlaid).
    plan                  Per-GPU memory (SimPO vs DPO+reference) and layouts that fit.

Flags are generated from the config dataclasses (``megatron_simpo/config.py``): every field
``foo_bar`` is ``--foo-bar`` (``config.FLAG_NAMES`` adds ``--loss`` for ``objective``, ``--data``
for ``data_path``); booleans
also take ``--no-foo-bar``. ``--config FILE`` reads a YAML file first and ``--model-config`` a
Hugging Face ``config.json``; flags given on the command line override both.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from megatron_simpo import compat
from megatron_simpo.config import SECTIONS, ModelConfig, RunConfig
from megatron_simpo.errors import ConfigError, SimPOError
from megatron_simpo.flags import field_flags


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for name, flags, kw in field_flags(cls):
            group.add_argument(*flags, dest=f"{section}.{name}", default=argparse.SUPPRESS, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-simpo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    train = sub.add_parser("train", help="SimPO training (run under torchrun)", formatter_class=fmt)
    evaluate = sub.add_parser(
        "evaluate", help="SimPO metrics of a checkpoint (no training)", formatter_class=fmt
    )
    evaluate.add_argument("--output", help="write the metrics and per-pair results here (JSON)")
    score = sub.add_parser(
        "score-reference",
        help="reference log-probs of --load into a prepared dataset (for --loss dpo/ipo/...)",
        formatter_class=fmt,
    )
    score.add_argument(
        "--force", action="store_true", help="score again even if the columns are up to date"
    )
    for p in (train, evaluate, score):
        p.add_argument("--config", help="YAML file with sections " + ", ".join(SECTIONS))
        p.add_argument("--model-config", help="Hugging Face config.json (or its directory)")
        _add_config_flags(p)

    prep = sub.add_parser(
        "prepare", help="validate + tokenise data ahead of training", formatter_class=fmt
    )
    prep.add_argument("--output", required=True, help="directory for the prepared dataset")
    prep.add_argument("--vocab-size", type=int, help="refuse ids >= this (the model's)")
    defaults = {f.name: f.default for f in fields(SECTIONS["data"])}
    for name, flags, kw in field_flags(
        SECTIONS["data"],
        (
            "data_path",
            "data_split",
            "data_schema",
            "tokenizer",
            "max_length",
            "max_prompt_length",
            "truncation_mode",
            "truncation_rule",
            "skip_invalid",
            "keep_ties",
            "num_workers",
        ),
        bool_action="store_true",
        aliases=False,
    ):
        if "action" in kw:  # a boolean: store_true
            prep.add_argument(*flags, **kw)
        else:
            prep.add_argument(*flags, default=defaults[name], required=name == "data_path", **kw)

    convert = sub.add_parser("convert", help="checkpoint conversion")
    conv_sub = convert.add_subparsers(dest="direction", required=True)
    h2m = conv_sub.add_parser(
        "hf-to-mcore",
        help="HF Llama/Mistral/Qwen2/Qwen3 directory -> Megatron checkpoint",
        formatter_class=fmt,
    )
    h2m.add_argument("--hf-dir", required=True, help="HF model directory (safetensors)")
    h2m.add_argument("--save", required=True, help="new Megatron checkpoint directory")
    h2m.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this",
    )
    m2h = conv_sub.add_parser(
        "mcore-to-hf", help="Megatron checkpoint -> HF directory", formatter_class=fmt
    )
    m2h.add_argument("--load", required=True, help="checkpoint directory (any layout)")
    m2h.add_argument("--iteration", type=int, help="this iteration instead of the latest")
    m2h.add_argument("--hf-dir", required=True, help="new HF directory")
    m2h.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="cast the weights (default: as stored)"
    )
    m2h.add_argument("--tokenizer", help="tokenizer files to copy (default: recorded at import)")
    m2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors file")
    m2h.add_argument(
        "--adapter-only",
        action="store_true",
        help="a LoRA/DoRA checkpoint as a peft adapter (adapter_config.json + "
        "adapter_model.safetensors) instead of merged into its base",
    )
    plot = sub.add_parser(
        "plot", help="PNG dashboard of runs (loss, rewards, accuracy, lengths)", formatter_class=fmt
    )
    plot.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="--tensorboard-dir of a run, or its parent"
    )
    plot.add_argument("--output", required=True, help="the PNG to write")
    plot.add_argument("--smooth", type=float, default=0.0, help="EMA weight for train curves")
    from megatron_simpo import plan

    plan.add_arguments(
        sub.add_parser("plan", help="per-GPU memory and ranked layouts", formatter_class=fmt)
    )
    return parser


def _model_given(args: argparse.Namespace, raw_yaml: dict) -> bool:
    return bool(
        args.model_config
        or raw_yaml.get("model")
        or any(k.startswith("model.") for k in vars(args))
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """defaults < --config YAML < --model-config < command-line flags.

    With ``--load CKPT`` and no model settings, the model config comes from the checkpoint; with
    both, they must agree.
    """
    raw: dict = {}
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
    model_from = "the model settings given" if _model_given(args, raw) else None
    if cfg.train.load:
        model_from = _check_checkpoint_model(cfg, "--load", cfg.train.load, model_from)
    if getattr(args, "command", None) == "train" and cfg.train.save:
        from megatron_simpo.checkpointing import checkpoint_dir

        if checkpoint_dir(cfg.train.save) is not None:  # a requeued run resumes from here
            _check_checkpoint_model(cfg, "--save", cfg.train.save, model_from)
    return cfg


def _check_checkpoint_model(cfg: RunConfig, flag: str, path: str, model_from: str | None) -> str:
    """Takes the model config from the checkpoint at ``path`` if none was given yet, else
    requires it to agree; returns where the model config now comes from."""
    saved = checkpoint_model_config(path)
    if saved is None:
        return model_from or f"{flag} {path}"
    if model_from is None:
        cfg.model = saved
        return f"the checkpoint of {flag} {path}"
    if saved != cfg.model:
        diff = [
            f"{f.name}: checkpoint {getattr(saved, f.name)!r} "
            f"vs given {getattr(cfg.model, f.name)!r}"
            for f in fields(ModelConfig)
            if getattr(saved, f.name) != getattr(cfg.model, f.name)
        ]
        fix = (
            "use a new --save directory for another model"
            if flag == "--save"
            else "drop the model settings to use the checkpoint's, or load a matching checkpoint"
        )
        raise ConfigError(
            f"{flag} {path}: the checkpoint's model differs from {model_from} "
            f"({'; '.join(diff)}); {fix}"
        )
    return model_from


def checkpoint_model_config(load: str) -> ModelConfig | None:
    """The model config recorded in a checkpoint (None if it has none)."""
    from megatron_simpo.checkpointing import checkpoint_dir, read_run_state

    ckpt = checkpoint_dir(load)
    if ckpt is None:
        raise ConfigError(f"--load {load}: no checkpoint there (no tracker or metadata.json)")
    model = read_run_state(ckpt).get("config", {}).get("model")
    return ModelConfig(**model) if model else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":  # arithmetic only: answers without importing torch
        from megatron_simpo.plan import main as plan_main

        try:
            return plan_main(args)
        except SimPOError as e:
            print(f"megatron-simpo: error: {e}", file=sys.stderr)
            return e.exit_code
    import torch

    if not torch.cuda.is_available():
        # Expected on CPU: Megatron-Core says so once per process and module; not actionable.
        warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
    try:
        if args.command in ("train", "evaluate", "score-reference", "convert"):  # Megatron's
            compat.check_mcore_version()
        if args.command == "convert" and args.direction == "hf-to-mcore":
            from megatron_simpo.convert.hf import hf_to_mcore

            ckpt = hf_to_mcore(args.hf_dir, args.save, args.make_vocab_size_divisible_by)
            print(f"convert: wrote {ckpt}")
            return 0
        if args.command == "convert":
            from megatron_simpo.convert.export import mcore_to_hf

            out = mcore_to_hf(
                args.load,
                args.hf_dir,
                iteration=args.iteration,
                dtype=args.dtype,
                tokenizer=args.tokenizer,
                max_shard_size=args.max_shard_size,
                adapter_only=args.adapter_only,
            )
            print(f"convert: wrote {out}")
            return 0
        if args.command == "plot":
            from megatron_simpo.plot import plot_runs

            print(f"plot: wrote {plot_runs(args.run_dirs, args.output, smooth=args.smooth)}")
            return 0
        if args.command == "prepare":
            from megatron_simpo.data.prepare import PrepareOptions, prepare

            opts = PrepareOptions.from_flags(
                args, max_length=args.max_length, vocab_size=args.vocab_size
            )
            prepare(
                args.data_path,
                args.output,
                tokenizer=args.tokenizer,
                opts=opts,
                split=args.data_split,
                num_workers=args.num_workers,
            )
            return 0
        cfg = config_from_args(args)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world_size=world, training=args.command == "train")
        if args.command == "train":
            from megatron_simpo.train import run

            run(cfg)
        elif args.command == "evaluate":
            from megatron_simpo.evaluate import evaluate

            evaluate(cfg, args.output)
        elif args.command == "score-reference":
            from megatron_simpo.score_reference import score_reference

            score_reference(cfg, force=args.force)
    except SimPOError as e:
        print(f"megatron-simpo: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
