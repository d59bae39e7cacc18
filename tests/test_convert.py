"""HF <-> Megatron key map and transforms, HF config reading, and conversion error paths."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, run_cli

from megatron_simpo.config import ModelConfig
from megatron_simpo.convert import keymap
from megatron_simpo.errors import ConfigError


def random_hf_state(m: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, f, d = m.hidden_size, m.intermediate_size, m.head_size
    shapes = {"model.embed_tokens.weight": (m.vocab_size, h), "model.norm.weight": (h,)}
    if not m.tie_word_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, h)
    for i in range(m.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (m.num_attention_heads * d, h),
                p + "self_attn.k_proj.weight": (m.kv_heads * d, h),
                p + "self_attn.v_proj.weight": (m.kv_heads * d, h),
                p + "self_attn.o_proj.weight": (h, m.num_attention_heads * d),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("heads,kv,tied", [(4, 4, False), (4, 2, True), (8, 1, False)])
def test_round_trip_is_bit_identical(heads, kv, tied):
    m = ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        make_vocab_size_divisible_by=16,
    )
    hf = random_hf_state(m)
    mc = keymap.hf_to_megatron(hf.__getitem__, m)
    assert mc["embedding.word_embeddings.weight"].shape == (64, 32)  # padded to 16
    assert (mc["embedding.word_embeddings.weight"][50:] == 0).all()
    assert ("output_layer.weight" in mc) == (not tied)
    back = keymap.megatron_to_hf(mc, m)
    assert set(back) == set(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


def test_qkv_packing_groups_queries_with_their_kv_head():
    m = ModelConfig(
        vocab_size=8,
        hidden_size=4,
        intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=1,
        make_vocab_size_divisible_by=8,
    )
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]]).expand(4, 4)
    k = torch.tensor([[20.0], [21.0]]).expand(2, 4)
    v = torch.tensor([[30.0], [31.0]]).expand(2, 4)
    packed = keymap.TRANSFORMS["qkv_pack"][0]([q, k, v], keymap.Shapes.of(m))
    # Megatron's layout: per KV group, its queries, then its key, then its value.
    assert packed[:, 0].tolist() == [10, 11, 20, 30, 12, 13, 21, 31]


def test_hf_config_transformers_4_and_5_styles(tmp_path):
    base = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 16,
    }
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    (tmp_path / "v4.json").write_text(
        json.dumps({**base, "rope_theta": 5e5, "rope_scaling": scaling})
    )
    (tmp_path / "v5.json").write_text(
        json.dumps({**base, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    )
    v4 = ModelConfig.from_hf_config(tmp_path / "v4.json")
    v5 = ModelConfig.from_hf_config(tmp_path / "v5.json")
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling["factor"] == 8.0


MLA = {"kv_lora_rank": 512, "q_lora_rank": 1536}


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "supported families"),
        (
            {
                "model_type": "mistral",
                "architectures": ["MistralForCausalLM"],
                "sliding_window": 4096,
                "max_position_embeddings": 32768,
            },
            "sliding_window=4096",
        ),
        (
            {
                "model_type": "qwen2",
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
            },
            "use_sliding_window=True",
        ),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        (
            {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "attention_bias": True},
            "attention_bias=True is not supported for qwen3",
        ),
        # Known families that are refused name the field that cannot be reproduced.
        (
            {
                "model_type": "gemma2",
                "architectures": ["Gemma2ForCausalLM"],
                "attn_logit_softcapping": 50.0,
            },
            "'gemma2' is refused: attn_logit_softcapping=50.0: attention-logit soft-capping",
        ),
        (
            {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]} | MLA,
            r"'deepseek_v3' is refused: kv_lora_rank=512: multi-head latent attention \(MLA\)",
        ),
        # ... and so do those fields in a supported family's config.
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
        (MLA, r"kv_lora_rank=512 is not supported for llama \(multi-head latent"),
        ({"num_local_experts": 8}, "num_local_experts=8 is not supported for llama"),
        (
            {"layer_types": ["full_attention", "sliding_attention"]},
            "layer_types=.* is not supported for llama",
        ),
        ({"attention_bias": True}, "attention_bias=True is not supported"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, patch, message):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 10, **patch}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_config(tmp_path)


@pytest.mark.parametrize(
    "family,options",
    [
        ("llama", {"qkv_bias": False, "qk_layernorm": False}),
        ("qwen2", {"qkv_bias": True, "qk_layernorm": False}),
        ("qwen3", {"qkv_bias": False, "qk_layernorm": True}),
    ],
)
def test_family_sets_layer_options_and_export_omits_them(tmp_path, family, options):
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    raw = {"model_type": family, "architectures": [arch[family]], "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    m = ModelConfig.from_hf_config(tmp_path)
    assert {k: getattr(m, k) for k in options} == options
    out = m.to_hf_config(raw)
    assert out["architectures"] == [arch[family]] and not set(options) & set(out)


def test_key_map_refuses_layer_options_the_family_lacks():
    m = ModelConfig(model_type="llama", qkv_bias=True, num_hidden_layers=1)
    with pytest.raises(ConfigError, match="model.qkv_bias=True but the llama family has False"):
        keymap.entries(m)
    with pytest.raises(ConfigError, match="model_type 'gemma2' is not supported"):
        keymap.entries(ModelConfig(model_type="gemma2"))


def test_convert_cli_errors(tmp_path):
    res = run_cli(
        "convert", "hf-to-mcore", "--hf-dir", str(tmp_path / "none"), "--save", str(tmp_path / "c")
    )
    assert res.returncode == 2 and "no config.json there" in res.stderr
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text((REPO / "examples/tiny/config.json").read_text())
    (hf / "pytorch_model.bin").write_bytes(b"not loaded")
    res = run_cli("convert", "hf-to-mcore", "--hf-dir", str(hf), "--save", str(tmp_path / "c"))
    assert res.returncode == 2 and "no safetensors weights" in res.stderr
    assert "safe_serialization=True" in res.stderr and "Traceback" not in res.stderr


def test_convert_cli_refuses_shape_mismatch(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = json.loads((REPO / "examples/tiny/config.json").read_text())
    cfg["intermediate_size"] = 96  # the weights have 128
    (hf / "config.json").write_text(json.dumps(cfg))
    (hf / "model.safetensors").write_bytes((REPO / "examples/tiny/model.safetensors").read_bytes())
    res = run_cli("convert", "hf-to-mcore", "--hf-dir", str(hf), "--save", str(tmp_path / "c"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "does not match the model's" in res.stderr and "Traceback" not in res.stderr
