"""Config tree: YAML + flags layering, validation messages that name the flag."""

from __future__ import annotations

import json
import re

import pytest

from megatron_simpo.cli import build_parser, config_from_args
from megatron_simpo.config import SECTIONS, ModelConfig, RunConfig, field_docs
from megatron_simpo.errors import ConfigError


def parse(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def valid(**sections) -> RunConfig:
    cfg = RunConfig.from_dict({"data": {"data_path": "x.jsonl"}, **sections})
    return cfg


def test_every_field_is_documented():
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for name in cls.__dataclass_fields__:
            assert docs.get(name, "").strip(), f"{cls.__name__}.{name} has no docstring"


def test_megatron_flag_names_exist(tmp_path):
    (tmp_path / "a/iter_0000001").mkdir(parents=True)  # a checkpoint without a run state
    (tmp_path / "a/latest_checkpointed_iteration.txt").write_text("1")
    load = str(tmp_path / "a")
    cfg = parse(
        [
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--sequence-parallel",
            "--use-distributed-optimizer",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "64",
            "--train-iters",
            "7",
            "--lr",
            "3e-7",
            "--min-lr",
            "1e-8",
            "--lr-warmup-iters",
            "3",
            "--clip-grad",
            "0.5",
            "--seed",
            "9",
            "--load",
            load,
            "--save",
            "b",
            "--save-interval",
            "5",
            "--exit-interval",
            "6",
            "--tensorboard-dir",
            "tb",
            "--beta",
            "10",
            "--simpo-gamma",
            "3",
            "--label-smoothing",
            "0.1",
            "--sft-weight",
            "0.2",
            "--loss-type",
            "hinge",
        ]
    )
    p, t, lo, o = cfg.parallel, cfg.train, cfg.loss, cfg.optim
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (2, 2)
    assert p.num_layers_per_virtual_pipeline_stage == 1
    assert p.sequence_parallel and p.use_distributed_optimizer
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters, t.seed) == (2, 64, 7, 9)
    assert (o.lr, o.min_lr, o.lr_warmup_iters, o.clip_grad) == (3e-7, 1e-8, 3, 0.5)
    assert (t.load, t.save, t.save_interval, t.exit_interval) == (load, "b", 5, 6)
    assert cfg.logging.tensorboard_dir == "tb"
    assert (lo.beta, lo.simpo_gamma, lo.label_smoothing, lo.sft_weight, lo.loss_type) == (
        10.0,
        3.0,
        0.1,
        0.2,
        "hinge",
    )
    assert lo.gamma == 3.0


def test_flags_override_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  train_iters: 11\n  micro_batch_size: 3\nloss:\n  beta: 5.0\n")
    cfg = parse(["--config", str(f), "--train-iters", "4"])
    assert cfg.train.train_iters == 4  # flag wins
    assert cfg.train.micro_batch_size == 3  # file value kept
    assert cfg.loss.beta == 5.0
    assert cfg.loss.gamma == 1.25  # default gamma_beta_ratio 0.25


def test_default_margin_is_the_simpo_code_default_defined_once():
    from megatron_simpo.config import DEFAULT_GAMMA_BETA_RATIO, LossConfig

    # The SimPO reference code's default (beta 2.0, gamma_beta_ratio 0.25): gamma 0.5.
    assert DEFAULT_GAMMA_BETA_RATIO == 0.25
    assert LossConfig().gamma == 0.5
    assert LossConfig(beta=10.0, gamma_beta_ratio=0.3).gamma == pytest.approx(3.0)
    assert LossConfig(beta=10.0, simpo_gamma=1.5).gamma == 1.5
    # --help says the same number as the code.
    assert "0.25" in field_docs(LossConfig)["gamma_beta_ratio"]


def test_default_margin_reaches_the_loss():
    """The step's loss uses LossConfig.gamma (no second default): margin gamma -> log 2."""
    import math

    import torch

    from megatron_simpo.batch_loss import pair_metrics
    from megatron_simpo.config import LossConfig

    cfg = LossConfig(beta=2.0)
    # One pair, chosen and rejected 2 response tokens each, mean log-probs -1.0 and -1.25:
    # reward margin 2 * 0.25 = 0.5 = gamma, so the sigmoid loss is log 2.
    token_logps = torch.tensor([[0.0, -0.5, -1.5], [0.0, -1.0, -1.5]], dtype=torch.float64)
    batch = {
        "loss_mask": torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]),
        "weights": torch.tensor([1.0]),
    }
    losses, _, per_pair = pair_metrics(cfg, token_logps, batch)
    assert per_pair["rewards/margins"].item() == pytest.approx(0.5, abs=1e-15)
    assert losses.item() == pytest.approx(math.log(2), abs=1e-15)


def test_yaml_numbers_are_coerced_to_the_field_type(tmp_path):
    f = tmp_path / "c.yaml"
    # PyYAML reads 1e-6 and 3e-7 (no dot) as strings.
    f.write_text(
        "optim:\n  lr: 1e-6\n  min_lr: 3e-7\n  lr_warmup_iters: 5\n"
        "loss:\n  beta: 2\n  gamma_beta_ratio: 5e-1\n"
        "train:\n  global_batch_size: 1e2\n  load: null\n"
    )
    cfg = parse(["--config", str(f)])
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == 3e-7 and cfg.optim.lr_warmup_iters == 5
    assert cfg.loss.beta == 2.0 and isinstance(cfg.loss.beta, float)
    assert cfg.loss.gamma_beta_ratio == 0.5
    assert cfg.train.global_batch_size == 100 and isinstance(cfg.train.global_batch_size, int)


@pytest.mark.parametrize(
    "text,message",
    [
        ("optim:\n  lr: fast\n", "optim.lr: expected a number, got 'fast'"),
        ("train:\n  micro_batch_size: 2.5\n", "train.micro_batch_size: expected an integer"),
        ("train:\n  prefix_sharing: maybe\n", "train.prefix_sharing: expected true or false"),
        ("train:\n  precision: fp64\n", "train.precision: expected one of"),
        ("loss:\n  sft_reduction: mean\n", "loss.sft_reduction: expected one of"),
        ("data:\n  data_path: [a, b]\n", "data.data_path: expected a string"),
        ("model:\n  rope_scaling: 8\n", "model.rope_scaling: expected a mapping"),
        ("model:\n  num_key_value_heads: two\n", "model.num_key_value_heads: expected an int"),
    ],
)
def test_yaml_type_errors_name_the_file_and_key(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=rf"c\.yaml: {re.escape(message)}"):
        parse(["--config", str(f)])


def test_sft_reduction_flag():
    assert RunConfig().loss.sft_reduction == "token"  # TRL's and the SimPO code's pooling
    assert parse(["--sft-reduction", "pair"]).loss.sft_reduction == "pair"


def test_loss_flag_selects_the_objective_and_its_defaults():
    assert RunConfig().loss.objective == "simpo" and RunConfig().loss.resolved_beta == 2.0
    lo = parse(["--loss", "dpo"]).loss
    assert (lo.objective, lo.resolved_beta, lo.needs_reference) == ("dpo", 0.1, True)  # TRL's
    assert parse(["--objective", "orpo"]).loss.objective == "orpo"  # the field's own spelling
    lo = parse(["--loss", "cpo", "--loss-type", "ipo", "--cpo-alpha", "0.5", "--beta", "3"]).loss
    assert (lo.loss_type, lo.nll_weight, lo.resolved_beta) == ("ipo", 0.5, 3.0)
    assert parse(["--loss", "cpo"]).loss.nll_weight == 1.0  # TRL's default cpo_alpha
    assert parse(["--loss", "orpo"]).loss.nll_weight == 1.0  # TRL's fixed NLL weight
    assert parse(["--loss", "simpo", "--loss-type", "hinge"]).loss.loss_type == "hinge"
    assert parse(["--sft-weight", "0.3"]).loss.nll_weight == 0.3
    with pytest.raises(SystemExit):  # argparse names the choices
        parse(["--loss", "kto"])


@pytest.mark.parametrize(
    "loss,flag",
    [
        ({"objective": "dpo", "loss_type": "hinge"}, "--loss-type hinge does not apply to --loss"),
        ({"objective": "orpo", "loss_type": "ipo"}, "--loss-type ipo"),
        ({"objective": "simpo", "loss_type": "ipo"}, "--loss-type ipo"),
        ({"objective": "ipo", "label_smoothing": 0.1}, "--label-smoothing"),
        ({"objective": "dpo-hinge", "label_smoothing": 0.1}, "--label-smoothing"),
        ({"objective": "orpo", "label_smoothing": 0.1}, "--label-smoothing"),
        ({"objective": "cpo", "loss_type": "hinge", "label_smoothing": 0.1}, "--label-smoothing"),
        ({"objective": "dpo", "simpo_gamma": 1.0}, "--simpo-gamma"),
        ({"objective": "cpo", "gamma_beta_ratio": 0.5}, "--gamma-beta-ratio"),
        ({"objective": "cpo", "sft_weight": 0.5}, "--sft-weight"),
        ({"objective": "dpo", "cpo_alpha": 0.5}, "--cpo-alpha"),
        ({"objective": "simpo", "orpo_alpha": 0.5}, "--orpo-alpha"),
        ({"objective": "cpo", "cpo_alpha": -1.0}, "--cpo-alpha"),
        ({"objective": "orpo", "beta": -0.1}, "--beta"),
    ],
)
def test_impossible_loss_combinations_name_the_flag(loss, flag):
    with pytest.raises(ConfigError, match=re.escape(flag)):
        valid(loss=loss).validate(world_size=1)


@pytest.mark.parametrize(
    "loss",
    [
        {"objective": "dpo", "label_smoothing": 0.1, "sft_weight": 0.2},
        {"objective": "dpo-norm", "label_smoothing": 0.1},
        {"objective": "cpo", "label_smoothing": 0.1, "cpo_alpha": 0.0},
        {"objective": "cpo", "loss_type": "hinge"},
        {"objective": "orpo", "orpo_alpha": 0.5, "beta": 0.2},
        {"objective": "simpo", "loss_type": "hinge", "simpo_gamma": 1.0},
    ],
)
def test_possible_loss_combinations_pass(loss):
    valid(loss=loss).validate(world_size=1)


def test_yaml_unknown_key_names_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  trian_iters: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'train\.trian_iters'"):
        parse(["--config", str(f)])
    f.write_text("trainer:\n  x: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'trainer'"):
        parse(["--config", str(f)])


def test_hf_model_config(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 1000,
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "rope_theta": 500000.0,
                "tie_word_embeddings": True,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
            }
        )
    )
    cfg = parse(["--model-config", str(tmp_path)])
    m = cfg.model
    assert (m.vocab_size, m.kv_heads, m.tie_word_embeddings, m.rope_theta) == (
        1000,
        2,
        True,
        500000.0,
    )
    assert m.padded_vocab_size() == 1024  # multiple of 128, whatever the TP size
    assert ModelConfig(vocab_size=128).padded_vocab_size() == 128


@pytest.mark.parametrize(
    "sections,world,flag",
    [
        ({"parallel": {"tensor_model_parallel_size": 3}}, 3, "--tensor-model-parallel-size 3"),
        ({"parallel": {"pipeline_model_parallel_size": 3}}, 3, "--pipeline-model-parallel-size 3"),
        ({"parallel": {"sequence_parallel": True}}, 1, "--sequence-parallel"),
        (
            {
                "parallel": {
                    "pipeline_model_parallel_size": 2,
                    "num_layers_per_virtual_pipeline_stage": 3,
                }
            },
            2,
            "--num-layers-per-virtual-pipeline-stage 3",
        ),
        (
            {"parallel": {"num_layers_per_virtual_pipeline_stage": 1}},
            1,
            "--num-layers-per-virtual-pipeline-stage",
        ),
        ({"train": {"global_batch_size": 6, "micro_batch_size": 4}}, 1, "--global-batch-size 6"),
        ({"train": {"global_batch_size": 8, "micro_batch_size": 2}}, 8, "--global-batch-size 8"),
        ({"parallel": {"tensor_model_parallel_size": 2}}, 3, "world size 3"),
        ({"loss": {"gamma_beta_ratio": 0.5, "simpo_gamma": 1.0}}, 1, "--gamma-beta-ratio"),
        ({"loss": {"loss_type": "hinge", "label_smoothing": 0.1}}, 1, "--label-smoothing"),
        ({"loss": {"label_smoothing": 0.5}}, 1, "--label-smoothing"),
        ({"loss": {"beta": 0.0}}, 1, "--beta"),
        ({"train": {"save_interval": 5}}, 1, "--save-interval needs --save"),
        ({"train": {"micro_batch_size": 0}}, 1, "--micro-batch-size"),
        ({"model": {"rope_scaling": {"rope_type": "yarn"}}}, 1, "rope_scaling"),
    ],
)
def test_invalid_combinations_name_the_flag(sections, world, flag):
    with pytest.raises(ConfigError, match=flag.replace("-", r"\-").replace(" ", r"\s")):
        valid(**sections).validate(world_size=world)


def test_tp_must_divide_kv_heads():
    cfg = valid(
        model={"num_attention_heads": 8, "num_key_value_heads": 2},
        parallel={"tensor_model_parallel_size": 4},
    )
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        cfg.validate(world_size=4)


def test_data_path_required():
    with pytest.raises(ConfigError, match="--data-path"):
        RunConfig().validate(world_size=1)


def test_a_valid_config_passes():
    valid(
        parallel={
            "tensor_model_parallel_size": 2,
            "pipeline_model_parallel_size": 2,
            "sequence_parallel": True,
        },
        train={"global_batch_size": 8, "micro_batch_size": 2},
    ).validate(world_size=8)


def test_load_takes_the_model_from_the_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000003").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3\n")
    model = {**ModelConfig(hidden_size=96, num_attention_heads=6).__dict__}
    (ckpt / "iter_0000003/run_state.json").write_text(json.dumps({"config": {"model": model}}))
    cfg = parse(["--load", str(ckpt)])
    assert cfg.model.hidden_size == 96 and cfg.model.num_attention_heads == 6
    with pytest.raises(ConfigError, match="hidden_size: checkpoint 96 vs given 64"):
        parse(["--load", str(ckpt), "--hidden-size", "64"])
    with pytest.raises(ConfigError, match="no checkpoint there"):
        parse(["--load", str(tmp_path / "nothing")])


# ---------------------------------------------------------------------------------------------
# Defaults resolved per run (megatron_simpo/defaults.py): unset means "on wherever applicable".

FAST = ("pack_pairs", "prefix_sharing", "fused_loss_head")


def resolved(argv, te=False, dtype_bytes=4):
    from megatron_simpo.defaults import resolve

    cfg, why = resolve(parse(["--data-path", "x.jsonl", *argv]), te, dtype_bytes)
    return {k: getattr(cfg.train, k) for k in FAST}, why


def test_fast_paths_are_unset_by_default_and_flags_set_them():
    cfg = parse(["--data-path", "x.jsonl"])
    assert [getattr(cfg.train, k) for k in FAST] == [None, None, None]
    old = parse(["--data-path", "x.jsonl", "--pack-pairs", "--prefix-sharing", "--fused-loss-head"])
    assert [getattr(old.train, k) for k in FAST] == [True, True, True]
    off = ["--no-pack-pairs", "--no-prefix-sharing", "--no-fused-loss-head"]
    assert [getattr(parse(["--data-path", "x.jsonl", *off]).train, k) for k in FAST] == [False] * 3
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert all(f in help_text for f in off)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "local"])
def test_packing_defaults_on_where_the_backend_takes_the_mask(backend):
    got, why = resolved(["--attention-backend", backend])  # no TE: auto is sdpa
    assert got["pack_pairs"] is got["prefix_sharing"] is True
    assert "default on" in why["pack_pairs"][1]


@pytest.mark.parametrize("argv", [["--attention-backend", "te"], []])
def test_with_transformer_engine_packing_is_thd_and_prefix_sharing_off(argv):
    got, why = resolved(argv, te=True)  # auto picks TE where it is installed with CUDA
    assert got["pack_pairs"] is True and got["prefix_sharing"] is False
    assert "THD sequences" in why["pack_pairs"][1]
    assert "causal per sequence" in why["prefix_sharing"][1] and "off" in why["prefix_sharing"][1]
    # Explicit flags win: off everywhere, on with auto (which then builds SDPA, as before).
    assert resolved(["--no-pack-pairs"], te=True)[0]["pack_pairs"] is False
    assert resolved(["--prefix-sharing"], te=True)[0]["prefix_sharing"] is True


def test_explicit_prefix_sharing_with_te_errors_and_packing_does_not():
    with pytest.raises(ConfigError, match="--prefix-sharing needs --attention-backend sdpa"):
        parse(["--data-path", "x", "--attention-backend", "te", "--prefix-sharing"]).validate()
    parse(["--data-path", "x", "--attention-backend", "te", "--pack-pairs"]).validate()
    parse(["--data-path", "x", "--attention-backend", "te"]).validate()


def test_fused_head_default_follows_the_memory_model():
    from megatron_simpo import defaults

    # bf16, Llama-3-8B shape: threshold 0.6 x 1024 + 4096 tokens per micro-batch (module doc).
    assert defaults.fused_head_threshold(4096, 2, 1024) == 4711
    assert defaults.fused_head_threshold(8192, 2, 1024) == 8807
    shape = {"hidden": 4096, "vocab_per_rank": 128256, "dtype_bytes": 2, "chunk": 1024}
    on, why = defaults.resolve_fused_loss_head(None, micro_batch_size=1, seq_length=4096, **shape)
    assert on and "threshold 4711" in why
    off, _ = defaults.resolve_fused_loss_head(None, micro_batch_size=1, seq_length=2048, **shape)
    assert not off
    # At the threshold the models cross: fused is smaller from there on, not before.
    t, args = 4711, (128256, 4096, 2)
    assert defaults.fused_head_bytes(t, *args, 1024) < defaults.unfused_head_bytes(t, *args)
    before = defaults.fused_head_bytes(t - 1, *args, 1024)
    assert before >= defaults.unfused_head_bytes(t - 1, *args)
    # Unfused bf16: logits + two fp32 copies, 10 bytes per logit; fp32: 12.
    assert defaults.unfused_head_bytes(8192, 100, 64, 2) == 8192 * 100 * 10
    assert defaults.unfused_head_bytes(8192, 100, 64, 4) == 8192 * 100 * 12
    # Through the config: the tiny default model (hidden 64) in fp32 at 2 x 1 x 1024 tokens is
    # above its threshold (33); --micro-batch-size/--seq-length/--precision all count.
    assert resolved([])[0]["fused_loss_head"] is True
    assert resolved(["--seq-length", "16"])[0]["fused_loss_head"] is False  # 32 tokens
    assert resolved(["--no-fused-loss-head"])[0]["fused_loss_head"] is False
    assert resolved(["--seq-length", "16", "--fused-loss-head"])[0]["fused_loss_head"] is True
    big = ["--hidden-size", "4096", "--seq-length", "2048"]
    assert resolved(big, dtype_bytes=2)[0]["fused_loss_head"] is False  # 4096 < 4711
    assert resolved([*big, "--micro-batch-size", "2"], dtype_bytes=2)[0]["fused_loss_head"]


def test_resolution_leaves_the_given_config_alone():
    from megatron_simpo.defaults import resolve

    cfg = parse(["--data-path", "x.jsonl"])
    out, why = resolve(cfg, False, 4)
    assert cfg.train.pack_pairs is None and out.train.pack_pairs is True
    assert set(why) == set(FAST) and all(isinstance(r, str) and r for _, r in why.values())


def test_checkpoint_save_defaults():
    """With --save: --async-save on with CUDA only, --fully-parallel-save on; flags win; without
    --save neither is decided (nothing is saved)."""
    from megatron_simpo.defaults import resolve

    def saving(argv, cuda):
        cfg = parse(["--data-path", "x.jsonl", "--save", "ck", *argv])
        out, why = resolve(cfg, False, 4, cuda=cuda)
        return (out.train.async_save, out.train.fully_parallel_save), why

    assert saving([], cuda=True)[0] == (True, True)
    (value, why) = saving([], cuda=False)
    assert value == (False, True) and "no CUDA" in why["async_save"][1]
    assert saving(["--async-save", "--no-fully-parallel-save"], cuda=False)[0] == (True, False)
    assert saving(["--no-async-save"], cuda=True)[0] == (False, True)
    out, why = resolve(parse(["--data-path", "x.jsonl"]), False, 4, cuda=True)
    assert out.train.async_save is None and "async_save" not in why
