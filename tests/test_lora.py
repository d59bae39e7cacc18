"""LoRA/DoRA: flags and their one-line errors; train with adapters on a converted base, resume
bit for bit from an adapter-only checkpoint, export as a peft adapter and merged.

Logits parity with peft at TP1/TP2/PP2/TP2xPP2 is in ``test_hf_parity.py``; the SimPO layout
entries (losses and adapter gradients vs the single process, what the optimizer holds) in
``distributed/layouts.py``.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_cli, torchrun

from megatron_simpo.config import LoraConfig, RunConfig
from megatron_simpo.errors import ConfigError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def test_targets_accept_megatron_and_hf_names():
    assert LoraConfig(lora_rank=4, lora_target="qkv").hf_targets() == (
        "q_proj",
        "k_proj",
        "v_proj",
    )
    mixed = LoraConfig(lora_rank=4, lora_target="down_proj, q_proj,fc1").hf_targets()
    assert mixed == ("q_proj", "gate_proj", "up_proj", "down_proj")  # model order
    assert len(LoraConfig(lora_rank=4).hf_targets()) == 7


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"lora_rank": 0}, "--lora-rank must be a positive integer, got 0"),
        ({"lora_rank": -2}, "--lora-rank must be a positive integer, got -2"),
        ({"lora_rank": 4, "lora_target": "qkv,mlp"}, "unknown module(s) ['mlp']"),
        ({"dora": True}, "--dora needs --lora-rank R"),
        ({"lora_rank": 4, "lora_dropout": 1.0}, "--lora-dropout must be in [0, 1)"),
    ],
)
def test_bad_lora_flags_are_one_line_errors(over, message):
    cfg = RunConfig()
    cfg.data.data_path = "x.jsonl"
    for k, v in over.items():
        setattr(cfg.lora, k, v)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lora_refuses_transformer_engine_modules():
    cfg = RunConfig()
    cfg.data.data_path = "x.jsonl"
    cfg.lora.lora_rank, cfg.lora.dora = 4, True
    cfg.train.attention_backend = "te"
    with pytest.raises(ConfigError, match="fused norm\\+linear modules are not supported"):
        cfg.validate()


SHAPE = {
    "vocab_size": 32,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rope_theta": 5000.0,
    "tie_word_embeddings": False,
}
TRAIN = ["--data-path", "tests/data/varied_pretok.jsonl", "--micro-batch-size", "2"]
TRAIN += ["--global-batch-size", "8", "--seq-length", "16", "--lr", "1e-2", "--precision"]
TRAIN += ["fp32", "--lora-rank", "4", "--lora-alpha", "8", "--dora", "--seed", "5"]
TRAIN += ["--lora-target", "qkv,o_proj,fc1,down_proj", "--train-iters", "4"]


def _losses(stdout: str) -> list[str]:
    return re.findall(r"iter \d+/\d+ \| loss (\S+) .*gnorm (\S+)", stdout)


def _train(*args: str):
    res = torchrun(1, ["-m", "megatron_simpo", "train", *TRAIN, *args])
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_adapter_training_resume_and_export(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(
        tmp_path / "hf"
    )
    base = tmp_path / "base"
    res = run_cli("convert", "hf-to-mcore", "--hf-dir", str(tmp_path / "hf"), "--save", str(base))
    assert res.returncode == 0, res.stderr[-2000:]

    # Uninterrupted vs stopped at 2 then the same command again: bit-identical losses and
    # gradient norms (the base is re-read from --load, the adapters and Adam from --save).
    full = _losses(_train("--load", str(base), "--save", str(tmp_path / "full")).stdout)
    part = tmp_path / "part"
    first = _losses(_train("--load", str(base), "--save", str(part), "--exit-interval", "2").stdout)
    rest = _losses(_train("--load", str(base), "--save", str(part)).stdout)
    assert len(full) == 4 and first + rest == full
    assert full[0] != full[3]

    # The iteration-2 adapter checkpoint resumed at TP2 (--load names it; its base comes from
    # it): the remaining steps as uninterrupted, to fp32 reduction order (printed to 4 places).
    res = torchrun(
        2,
        ["-m", "megatron_simpo", "train", *TRAIN, "--tensor-model-parallel-size", "2"]
        + ["--load", str(part / "iter_0000002"), "--save", str(tmp_path / "tp2")],
    )
    assert res.returncode == 0, res.stderr[-3000:]
    tp2 = _losses(res.stdout)
    assert len(tp2) == 2
    for (loss, gnorm), (ref_loss, ref_gnorm) in zip(tp2, full[2:]):
        assert abs(float(loss) - float(ref_loss)) <= 2e-4
        assert abs(float(gnorm) - float(ref_gnorm)) <= 2e-3

    # Adapter-only: no base tensor in the checkpoint; it names its base.
    ckpt = part / "iter_0000004"
    state = json.loads((ckpt / "run_state.json").read_text())
    assert state["adapter_only"] and state["lora_base"] == str(base)
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if not k.startswith("optimizer")]
    assert model_keys and all(".lora." in k for k in model_keys), model_keys[:3]

    # A different rank than the checkpoint's: one line naming the flag. In process (the train
    # command's own parse and checkpoint resolution, before any model is built): a launch costs
    # a Megatron import; the CLI's exit 2 with a ConfigError's line is test_faults.py's.
    from megatron_simpo.cli import build_parser, config_from_args
    from megatron_simpo.trainer import lora_sources

    argv = ["train", *TRAIN, "--lora-rank", "2", "--load", str(ckpt)]
    with pytest.raises(ConfigError, match="lora_rank: checkpoint 4 vs given 2") as e:
        lora_sources(config_from_args(build_parser().parse_args(argv)), None)
    assert "\n" not in str(e.value)

    # Export: peft adapter and merged; peft's adapter model equals the merged model.
    adapter_dir, merged_dir = tmp_path / "peft", tmp_path / "merged"
    res = run_cli(
        "convert",
        "mcore-to-hf",
        "--load",
        str(part),
        "--hf-dir",
        str(adapter_dir),
        "--adapter-only",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("convert", "mcore-to-hf", "--load", str(part), "--hf-dir", str(merged_dir))
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["use_dora"] and "gate_proj" in cfg["target_modules"]
    ids = torch.randint(0, 32, (3, 11), generator=torch.Generator().manual_seed(1))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    with torch.no_grad():
        plain = hf_base(ids).logits
        adapted = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()(ids).logits
        merged_model = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).float()
        merged = merged_model.eval()(ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # four steps at lr 1e-2 moved the adapters
    # fp32 both; merging reorders (W + sBA) x vs W x + sB(Ax): ~1e-7 per op; 1e-5 absolute.
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


def test_adapter_for_another_base_is_refused(tmp_path):
    """LoRA --load of an adapter checkpoint whose base is another model: one line."""
    from megatron_simpo.trainer import check_adapter_checkpoint

    for name, layers in (("a", 2), ("b", 3)):
        d = tmp_path / name
        d.mkdir()
        (d / "metadata.json").write_text("{}")
        cfg = RunConfig()
        cfg.model.num_hidden_layers = layers
        cfg.lora.lora_rank = 4
        state = {"config": cfg.to_dict(), "adapter_only": name == "a"}
        (d / "run_state.json").write_text(json.dumps(state))
    cfg = RunConfig()
    cfg.model.num_hidden_layers = 2
    cfg.lora.lora_rank = 4
    with pytest.raises(ConfigError, match="base checkpoint is of another model") as e:
        check_adapter_checkpoint(cfg, str(tmp_path / "a"), str(tmp_path / "b"))
    assert "\n" not in str(e.value)
