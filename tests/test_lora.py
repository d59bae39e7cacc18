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


#: Tiny Qwen2-MoE (attention with QKV biases, 4 routed experts top-2, a gated shared expert,
#: tied embeddings): every kind of adaptable MoE linear.
QWEN2_MOE = {
    **{k: v for k, v in SHAPE.items() if k != "intermediate_size"},
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 24,
    "norm_topk_prob": False,
    "tie_word_embeddings": True,
}
#: Attention only (q/k/v partly, o): LoRA, exported as a peft adapter and merged. Everything
#: (attention, shared expert, every routed expert): DoRA, merged only (no peft form).
MOE_ADAPTERS = {
    "attention": {"lora_rank": 4, "lora_alpha": 8.0, "lora_target": "q_proj,v_proj,o_proj"},
    "all": {"lora_rank": 3, "lora_alpha": 6.0, "lora_target": "all", "dora": True},
}


def _moe_adapter_exports(rank: int, world: int, root) -> None:
    """One process: the HF model converted, each MOE_ADAPTERS variant built on it with random
    adapters, its logits on ``root/ids.pt`` saved, its adapter-only checkpoint exported merged
    and (attention) as a peft adapter, which imports back to the same tensors; the experts' peft
    form refused, on export and on import."""
    from megatron_simpo import checkpointing, parallel
    from megatron_simpo.adapters import init_magnitudes
    from megatron_simpo.cli import checkpoint_model_config
    from megatron_simpo.convert.export import mcore_to_hf
    from megatron_simpo.convert.hf import hf_to_mcore
    from megatron_simpo.convert.lora import peft_to_mcore
    from megatron_simpo.model import build_model

    parallel.init_distributed()
    hf_to_mcore(root / "hf", root / "base")
    ids = torch.load(root / "ids.pt", weights_only=True)
    for name, lora in MOE_ADAPTERS.items():
        cfg = RunConfig()
        cfg.model = checkpoint_model_config(str(root / "base"))
        cfg.lora = LoraConfig(**lora)
        cfg.train.precision = "fp32"
        parallel.init_model_parallel(1, 1, None, seed=0)
        (model,) = build_model(cfg)
        checkpointing.load_checkpoint(root / "base", [model], may_lack=checkpointing.is_adapter_key)
        init_magnitudes([model])
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        adapted = {"shared": 0, "expert": 0}
        with torch.no_grad():
            for n, p in model.named_parameters():
                assert p.requires_grad == (".lora." in n), n  # router, gate, base: frozen
                if n.endswith("lora_B"):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                    adapted["shared"] += ".shared_experts." in n
                    adapted["expert"] += ".local_experts." in n
                elif n.endswith("lora_magnitude"):
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
        # 2 layers x (up/gate, down) on the shared expert and on each of the 4 experts.
        want = {"shared": 6, "expert": 24} if name == "all" else {"shared": 0, "expert": 0}
        assert adapted == want, adapted
        model.eval()
        with torch.no_grad():
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
            logits = model(ids, pos, None)[..., : cfg.model.vocab_size]
        torch.save(logits, root / f"logits_{name}.pt")
        run_state = {"config": cfg.to_dict(), "lora_base": str(root / "base")}
        save = root / name / "ckpt"
        checkpointing.save_checkpoint(save, 1, [model], run_state=run_state, adapter_only=True)
        parallel.destroy_model_parallel()
        mcore_to_hf(save, root / name / "merged")
        if name == "attention":
            mcore_to_hf(save, root / name / "peft", adapter_only=True)
            # Imported back (peft_to_mcore): the very tensors that were exported.
            back = peft_to_mcore(root / name / "peft", root / "base", root / name / "back")
            want, got = (checkpointing.load_full_tensors(d) for d in (save / "iter_0000001", back))
            want = {k: v for k, v in want.items() if ".lora." in k}
            assert want and want.keys() == {k for k in got if ".lora." in k}
            assert all(torch.equal(got[k], v) for k, v in want.items())
        else:
            with pytest.raises(ConfigError, match="--adapter-only: adapters on the routed") as e:
                mcore_to_hf(save, root / name / "peft", adapter_only=True)
            assert "\n" not in str(e.value) and "without --adapter-only" in str(e.value)
            # A peft adapter naming the MLP projections of an MoE model: refused on import too.
            cfg_json = json.loads((root / "attention" / "peft" / "adapter_config.json").read_text())
            cfg_json["target_modules"] = ["q_proj", "gate_proj"]
            (root / "mlp_peft").mkdir()
            (root / "mlp_peft" / "adapter_config.json").write_text(json.dumps(cfg_json))
            with pytest.raises(ConfigError, match="mlp_peft: target_modules: adapters on the"):
                peft_to_mcore(root / "mlp_peft", root / "base", root / "mlp_back")


def test_moe_adapters_export_merged_and_as_peft(tmp_path):
    """LoRA/DoRA on a Qwen2-MoE: the merged export's transformers logits equal the adapted
    Megatron model's, with adapters on attention, the shared expert and every routed expert
    (DoRA per expert row); the attention adapter exported for peft gives them too."""
    from conftest import run_gloo

    torch.manual_seed(3)
    base = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**QWEN2_MOE))
    with torch.no_grad():  # HF inits norms to 1, routers small, biases 0: a mis-map must show
        for n, p in base.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in n:
                p.normal_(0, 0.5)
            elif n.endswith(".bias"):
                p.normal_(0, 0.1)
    base.save_pretrained(tmp_path / "hf")
    # Uneven rows would need a mask; three full rows of random ids instead.
    ids = torch.randint(0, 32, (3, 11), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    run_gloo(1, _moe_adapter_exports, tmp_path)

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    with torch.no_grad():
        plain = hf_base(ids).logits
        for name in MOE_ADAPTERS:
            want = torch.load(tmp_path / f"logits_{name}.pt", weights_only=True)
            assert (want - plain).abs().max() > 1e-2  # the adapters change the model
            merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name / "merged")
            got = merged.float().eval()(ids).logits
            print(f"{name} merged: max |diff| {float((got - want).abs().max()):.2e}")
            # fp32 both; merging reorders (W + sBA) x vs W x + sB(Ax), and the top-2 routing
            # is far from ties on this data (test_moe.py: >> 1e-6), so only fp32 reduction
            # order differs: as test_moe.py's 2e-5. Measured (2-core CPU, 2026-12-03): merged
            # 4.1e-7 (attention) and 1.2e-7 (all), peft 2.0e-7; reading each expert's adapter
            # from expert 0's slot gives 1.4e-2.
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
        adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "attention" / "peft")
        got = adapted.eval()(ids).logits
        want = torch.load(tmp_path / "logits_attention.pt", weights_only=True)
        print(f"attention peft: max |diff| {float((got - want).abs().max()):.2e}")
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
