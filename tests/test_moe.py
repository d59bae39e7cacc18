"""Mixture of experts (Mixtral, Qwen3-MoE, Qwen2-MoE): config mapping, the expert key map,
bit-identical import/export round trips, and logits equal to ``transformers``' at TP1, TP2+SP
(experts TP-split) and EP2 (Megatron-Core's MoE layer, alltoall dispatcher on gloo) for Mixtral,
Qwen3-MoE (QK norms, unnormalised top-k) and Qwen2-MoE (QKV biases, gated shared expert)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, run_cli, run_gloo, torchrun

from megatron_simpo.config import ModelConfig, RunConfig
from megatron_simpo.convert import keymap
from megatron_simpo.errors import ConfigError

transformers = pytest.importorskip("transformers")

VOCAB = 100
#: Tiny Mixtral: 2 layers, 4 experts, top-2, hidden 64, GQA; expert width 48 != hidden.
MIXTRAL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
    "rope_theta": 5000.0,
}
#: Tiny Qwen3-MoE: QK norms, head_dim 16 != hidden / heads, expert width 32 (moe_intermediate_size)
#: != intermediate_size; norm_topk_prob False (the other routing: top-k of the full softmax).
QWEN3_MOE = {
    **{k: v for k, v in MIXTRAL.items() if k != "num_local_experts"},
    "num_experts": 4,
    "moe_intermediate_size": 32,
    "head_dim": 16,
    "norm_topk_prob": False,
}
#: Tiny Qwen2-MoE: QKV biases, tied embeddings, expert width 32, a shared expert of width 40
#: (gated), norm_topk_prob False (transformers' default and the released models').
QWEN2_MOE = {
    **{k: v for k, v in QWEN3_MOE.items() if k != "head_dim"},
    "shared_expert_intermediate_size": 40,
    "tie_word_embeddings": True,
}
VARIANTS = ["mixtral", "qwen3_moe", "qwen2_moe"]
#: world -> (layouts of tests/distributed/hf_parity_runner.py, variants).
LAYOUTS = {
    1: (["tp1"], VARIANTS),
    2: (["tp2_sp", "ep2"], VARIANTS),
}
# EP2xPP2 and EP2xTP2 (ETP1) gave the same 1.79e-7 (hf_parity_runner.py layouts ep2_pp2,
# ep2_tp2_etp1, measured 2026-12-03); CI covers them in the layout matrix instead (losses and
# gradients against tp1_mixtral, tests/distributed/layouts.py), which saves a 4-rank world here.
CASES = [(v, lay) for lays, variants in LAYOUTS.values() for v in variants for lay in lays]


def hf_model(variant: str):
    torch.manual_seed(16)
    if variant == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL))
    elif variant == "qwen3_moe":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**QWEN3_MOE))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**QWEN2_MOE))
    with torch.no_grad():  # HF inits norms to 1, the router small, biases 0: randomise so a
        for n, p in model.named_parameters():  # mis-map shows
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in n:  # the routers and Qwen2-MoE's shared-expert gate
                p.normal_(0, 0.5)
            elif n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def hf_mixtral():
    return hf_model("mixtral")


def test_qwen3_moe_config_maps_to_moe_fields(tmp_path):
    hf_model("qwen3_moe").config.save_pretrained(tmp_path)
    m = ModelConfig.from_hf_config(tmp_path)
    assert (m.model_type, m.num_experts, m.expert_ffn_size) == ("qwen3_moe", 4, 32)
    assert m.qk_layernorm and not m.norm_topk_prob
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "mlp_only_layers": [1]}))
    with pytest.raises(ConfigError, match=r"mlp_only_layers=\[1\] is not supported"):
        ModelConfig.from_hf_config(tmp_path)


def test_qwen2_moe_config_maps_to_moe_fields(tmp_path):
    hf_model("qwen2_moe").config.save_pretrained(tmp_path)
    m = ModelConfig.from_hf_config(tmp_path)
    assert (m.model_type, m.num_experts, m.expert_ffn_size) == ("qwen2_moe", 4, 32)
    assert m.shared_expert_intermediate_size == 40 and m.shared_expert_gate
    assert m.qkv_bias and not m.norm_topk_prob and m.tie_word_embeddings
    names = [h for _, hf, _ in keymap.entries(m) for h in hf]
    assert "model.layers.1.mlp.shared_expert_gate.weight" in names
    assert "model.layers.1.mlp.shared_expert.up_proj.weight" in names
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert "lm_head.weight" not in names  # tied
    # The trainer's active-parameter FLOPs count the shared expert (3 x 64 x 40) and its gate:
    # per layer attention 3 x 64 x 64, router 64 x 4, top-2 experts 2 x 3 x 64 x 32; output layer.
    from megatron_simpo import flops

    layer = 3 * 64 * 64 + 64 * 4 + 2 * 3 * 64 * 32 + 3 * 64 * 40 + 64
    assert flops.matmul_params(m) == 2 * layer + 64 * 128
    # Only the family with shared experts has them in its key map.
    with pytest.raises(ConfigError, match="qwen3_moe family has no shared expert"):
        keymap.entries(
            ModelConfig(
                model_type="qwen3_moe",
                num_experts=4,
                qk_layernorm=True,
                shared_expert_intermediate_size=40,
            )
        )
    raw = json.loads((tmp_path / "config.json").read_text())
    for patch, message in [
        ({"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\] is not supported"),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step=2 is not supported"),
        ({"qkv_bias": False}, "qkv_bias=False is not supported"),
        ({"norm_topk_prob": None}, "norm_topk_prob=None is not supported .*missing"),
        ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**raw, **patch}))
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_hf_config(tmp_path)


def test_mixtral_config_maps_to_moe_fields(tmp_path):
    hf_mixtral().config.save_pretrained(tmp_path)
    m = ModelConfig.from_hf_config(tmp_path)
    assert (m.model_type, m.num_experts, m.num_experts_per_tok) == ("mixtral", 4, 2)
    assert m.norm_topk_prob and m.moe_intermediate_size is None and m.expert_ffn_size == 48
    out = m.to_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert out["num_local_experts"] == 4 and "num_experts" not in out
    assert "norm_topk_prob" not in out and "moe_intermediate_size" not in out
    # A dense family writes no MoE fields.
    assert "num_experts_per_tok" not in ModelConfig().to_hf_config()


def test_moe_transformer_config_fields():
    from megatron_simpo import moe

    cfg = RunConfig()
    cfg.model = ModelConfig(model_type="mixtral", num_experts=4, intermediate_size=48)
    cfg.train.micro_batch_size, cfg.train.moe_aux_loss_coeff = 3, 0.01
    cfg.parallel.expert_model_parallel_size = 2
    f = moe.transformer_fields(cfg, grouped_gemm=False)
    assert f["num_moe_experts"] == 4 and f["moe_router_topk"] == 2
    assert f["moe_ffn_hidden_size"] == 48 and f["moe_router_pre_softmax"] is False
    assert f["moe_expert_capacity_factor"] is None  # no token dropping
    assert f["moe_router_load_balancing_type"] == "aux_loss"
    assert f["moe_aux_loss_coeff"] == pytest.approx(0.03)  # x pairs per micro-batch
    assert f["expert_model_parallel_size"] == 2
    assert f["moe_shared_expert_intermediate_size"] is None and not f["moe_shared_expert_gate"]
    cfg.train.moe_aux_loss_coeff = 0.0
    assert moe.transformer_fields(cfg, False)["moe_router_load_balancing_type"] == "none"
    cfg.model = ModelConfig(
        model_type="qwen2_moe",
        num_experts=4,
        norm_topk_prob=False,
        shared_expert_intermediate_size=40,
        shared_expert_gate=True,
    )
    f = moe.transformer_fields(cfg, grouped_gemm=False)
    assert f["moe_router_pre_softmax"] is True  # top-k of the full softmax, not renormalised
    assert f["moe_shared_expert_intermediate_size"] == 40 and f["moe_shared_expert_gate"]
    cfg.model = ModelConfig()
    assert moe.transformer_fields(cfg, False) == {}


@pytest.mark.parametrize(
    "parallel,message",
    [
        ({"expert_model_parallel_size": 3}, "--expert-model-parallel-size 3 must divide"),
        ({"expert_tensor_parallel_size": 5}, "--expert-tensor-parallel-size 5 must divide"),
        (
            {"tensor_model_parallel_size": 2},
            "needs --sequence-parallel",
        ),
    ],
)
def test_expert_parallel_flags_are_checked(parallel, message):
    cfg = RunConfig()
    cfg.model = ModelConfig(model_type="mixtral", num_experts=4, intermediate_size=48)
    cfg.data.data_path = "x.jsonl"
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    dense = RunConfig()
    dense.data.data_path = "x.jsonl"
    dense.parallel.expert_model_parallel_size = 2
    with pytest.raises(ConfigError, match="need a mixture-of-experts model"):
        dense.validate()


def test_expert_key_map_round_trip_is_bit_identical():
    m = ModelConfig(
        model_type="mixtral", num_experts=4, vocab_size=50, make_vocab_size_divisible_by=16
    )
    names = [h for _, hf, _ in keymap.entries(m) for h in hf]
    assert "model.layers.3.block_sparse_moe.experts.3.w2.weight" in names
    assert not any("mlp.gate_proj" in n for n in names)
    shapes = {"embed_tokens": (50, 64), "lm_head": (50, 64), "gate.": (4, 64), "w2": (64, 128)}
    g = torch.Generator().manual_seed(1)

    def shape(n: str) -> tuple[int, ...]:
        for k, s in shapes.items():
            if k in n:
                return s
        if "norm" in n:
            return (64,)
        return (128, 64) if ".w1." in n or ".w3." in n else (64, 64)

    state = {n: torch.randn(shape(n), generator=g) for n in names}
    mc = keymap.hf_to_megatron(state.__getitem__, m)
    e1 = mc["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"]
    w1 = state["model.layers.1.block_sparse_moe.experts.2.w1.weight"]
    w3 = state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    assert torch.equal(e1, torch.cat([w1, w3]))  # gate first, as Megatron's SwiGLU expects
    back = keymap.megatron_to_hf(mc, m)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_parity")
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randint(0, VOCAB, (3, 12), generator=g), root / "input_ids.pt")
    for variant in VARIANTS:
        hf_model(variant).save_pretrained(root / variant / "hf")
    runner = str(REPO / "tests/distributed/hf_parity_runner.py")
    for world, (layouts, variants) in LAYOUTS.items():
        args = [runner, "--root", str(root), "--layouts", *layouts, "--variants", *variants]
        if world == 1:
            args.append("--convert")
        res = torchrun(world, args)
        assert res.returncode == 0, res.stderr[-4000:]
    return root


# fp32 on both sides; the routing decisions are the same (no near-ties on this data: the top-2
# probabilities are separated by >> 1e-6), so only the order of fp32 reductions differs (fused
# QKV / SwiGLU matmuls, softmax over the k kept logits instead of a renormalised softmax over all,
# TP/EP-split sums): measured max |diff| 1.4e-7 to 3.6e-7 (printed by the test); 2e-5 is loose for
# reduction order and tight enough to catch a mis-mapped expert or a wrong routing weight (the
# other top-k normalisation gives 4.2e-3 / 6.0e-3 / 2.8e-3 for Mixtral / Qwen3-MoE / Qwen2-MoE;
# Qwen2-MoE's shared expert ungated 4.2e-2, left out 5.4e-2; measured 2026-12-03).
LOGITS_ATOL = 2e-5


@pytest.mark.parametrize("variant,layout", CASES)
def test_moe_logits_match_transformers(mixtral, variant, layout):
    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral / variant / "hf").eval()
    ids = torch.load(mixtral / "input_ids.pt", weights_only=True)
    with torch.no_grad():
        ref = model(ids).logits
    got = torch.load(mixtral / variant / f"logits_{layout}.pt", weights_only=True)
    assert got.shape == ref.shape
    print(f"{variant} {layout}: max |diff| {float((got - ref).abs().max()):.2e}")
    torch.testing.assert_close(got, ref, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_export_round_trip_is_bit_identical(mixtral, tmp_path, variant):
    from safetensors.torch import load_file

    out = tmp_path / "exported"
    res = run_cli(
        "convert", "mcore-to-hf", "--load", str(mixtral / variant / "ckpt"), "--hf-dir", str(out)
    )
    assert res.returncode == 0, res.stderr[-3000:]
    want = load_file(str(mixtral / variant / "hf" / "model.safetensors"))
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    config = json.loads((out / "config.json").read_text())
    arch = {
        "mixtral": "MixtralForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
        "qwen2_moe": "Qwen2MoeForCausalLM",
    }[variant]
    experts = "num_local_experts" if variant == "mixtral" else "num_experts"
    assert config["architectures"] == [arch] and config[experts] == 4
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts_per_tok == 2
    if variant == "qwen2_moe":
        assert config["shared_expert_intermediate_size"] == 40 and config["qkv_bias"] is True
        assert config["norm_topk_prob"] is False and config["tie_word_embeddings"] is True
        assert "shared_expert_gate" not in config  # a layer option, not an HF field
    else:
        assert "shared_expert_intermediate_size" not in config


def _check_expert_load(rank: int, world: int) -> None:
    """One training forward of a 2-layer Mixtral (local spec, coeff 0: no aux loss) with padded
    rows; the router inputs are captured and the routing recomputed in float64."""
    from megatron.core.transformer.moe.router import Router

    from megatron_simpo import moe, parallel
    from megatron_simpo.model import build_model, unwrap

    parallel.init_distributed()  # the CPU layer (the gloo world exists)
    parallel.init_model_parallel(1, 1, None, seed=5)
    cfg = RunConfig()
    cfg.model = ModelConfig(
        model_type="mixtral", num_experts=4, intermediate_size=48, num_hidden_layers=2
    )
    cfg.train.precision = "fp32"
    (model,) = build_model(cfg)
    config = unwrap(model).config
    assert config.moe_router_load_balancing_type == "none"
    inputs: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, Router):
            with torch.no_grad():
                m.weight.normal_(0, 0.5)  # routing far from uniform
            m.register_forward_pre_hook(
                lambda mod, args: inputs.__setitem__(mod.layer_number, args[0].detach())
            )
    g = torch.Generator().manual_seed(3)
    b, s = 3, 10
    tokens = torch.randint(0, 200, (b, s), generator=g)
    padding = torch.arange(s).unsqueeze(0) >= torch.tensor([[10], [4], [7]])  # [b, s]
    model.train()
    out = model(tokens, torch.arange(s).expand(b, s), None, padding_mask=padding)
    out.sum().backward()
    share = []
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for layer, x in sorted(inputs.items()):
        router = next(m for m in routers if m.layer_number == layer)
        logits = x.reshape(-1, x.shape[-1]).double() @ router.weight.double().t()
        top = logits.topk(2, dim=-1).indices  # [s * b, 2]; softmax keeps the order
        keep = ~padding.t().reshape(-1)  # the router's tokens are in (s, b) order
        counts = torch.bincount(top[keep].reshape(-1), minlength=4).double()
        share.append(counts.max() / counts.sum())
    assert len(share) == 2
    got = moe.expert_load_metrics([model], config)
    assert got.keys() == {"moe/max_expert_load_fraction"}
    assert got["moe/max_expert_load_fraction"] == pytest.approx(float(max(share)), abs=1e-12)
    assert 0.25 < got["moe/max_expert_load_fraction"] <= 0.5
    assert moe.expert_load_metrics([model], config) == {}  # zeroed
    with torch.no_grad():  # evaluation is not counted
        model.eval()
        model(tokens, torch.arange(s).expand(b, s), None, padding_mask=padding)
    assert moe.expert_load_metrics([model], config) == {}
    parallel.destroy_model_parallel()


def test_expert_load_fraction_is_logged_at_coeff_0_and_matches_float64():
    run_gloo(1, _check_expert_load)
