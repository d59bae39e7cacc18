"""Converted Hugging Face models (Llama, Qwen3): Megatron logits equal ``transformers``' logits at
TP1, TP2, PP2 and TP2xPP2, and ``evaluate`` equals a float64 SimPO reference from the HF logits."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from conftest import LLAMA3_ROPE, REPO, torchrun

transformers = pytest.importorskip("transformers")

VOCAB = 100
#: name -> config overrides: GQA and MHA, tied and untied, with and without Llama-3 RoPE. A name
#: starting with a family (``qwen3_``) is of that family, otherwise Llama.
VARIANTS = {
    "gqa_untied_llama3": {
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
        "rope_scaling": LLAMA3_ROPE,
    },
    "mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "gqa_tied_llama3": {
        "num_key_value_heads": 1,
        "tie_word_embeddings": True,
        "rope_scaling": LLAMA3_ROPE,
    },
    "mha_untied": {"num_key_value_heads": 4, "tie_word_embeddings": False},
    # Qwen3: per-head QK RMSNorm; head_dim 16 != hidden / heads (8), as in every Qwen3 size.
    "qwen3_gqa_untied": {"num_key_value_heads": 2, "tie_word_embeddings": False, "head_dim": 16},
    "qwen3_mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True, "head_dim": 16},
}
#: LoRA/DoRA variants: name -> (base variant, peft LoraConfig overrides). Non-zero random adapter
#: weights (peft's B starts at zero), all seven projections or a subset (a fused QKV / gate-up
#: with some projections unadapted), MHA tied and GQA untied bases.
ADAPTERS = {
    "lora_gqa_untied": ("gqa_untied_llama3", {"target_modules": "all"}),
    "dora_gqa_untied": ("gqa_untied_llama3", {"target_modules": "all", "use_dora": True}),
    "dora_mha_tied_subset": (
        "mha_tied",
        {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], "use_dora": True},
    ),
}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYOUTS = {1: ["tp1"], 2: ["tp2", "pp2"], 4: ["tp2_pp2"]}
EVAL_LAYOUTS = ["tp1", "tp2_pp2"]
BETA, GAMMA = 2.5, 0.7


def hf_model(name: str):
    torch.manual_seed(sum(map(ord, name)))
    family = "Qwen3" if name.startswith("qwen3_") else "Llama"
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_theta=5000.0,
        **VARIANTS[name],
    )
    model = getattr(transformers, f"{family}ForCausalLM")(cfg)
    with torch.no_grad():  # HF inits norms to 1: randomise them so a mis-mapped norm shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model.eval()


def peft_model(name: str, hf_dir):
    """The peft model of an adapter variant on its saved base, with random adapter weights."""
    peft = pytest.importorskip("peft")
    base_name, over = ADAPTERS[name]
    over = dict(over)
    if over["target_modules"] == "all":
        over["target_modules"] = SEVEN
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=6, **over))
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "magnitude" in n:  # DoRA: around ||W|| per row, not equal to it
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_parity")
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randint(0, VOCAB, (3, 12), generator=g), root / "input_ids.pt")
    rows = []
    for _ in range(7):
        lp, lc, lr = (int(x) for x in torch.randint(1, 6, (3,), generator=g))
        rows.append(
            {
                k: torch.randint(0, VOCAB, (n,), generator=g).tolist()
                for k, n in (("prompt_ids", lp), ("chosen_ids", lc), ("rejected_ids", lr))
            }
        )
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in VARIANTS:
        hf_model(name).save_pretrained(root / name / "hf")
    # Without peft (the Megatron-Core 0.19 lane) the adapter variants are left out.
    adapters = ADAPTERS if importlib.util.find_spec("peft") is not None else {}
    for name, (base, _) in adapters.items():
        hf_model(base).save_pretrained(root / name / "hf")
        peft_model(name, root / name / "hf").save_pretrained(root / name / "peft")
    runner = str(REPO / "tests/distributed/hf_parity_runner.py")
    for world, layouts in LAYOUTS.items():
        args = [
            runner,
            "--root",
            str(root),
            "--layouts",
            *layouts,
            "--variants",
            *VARIANTS,
            *adapters,
            "--evaluate",
            str(root / "pairs.jsonl"),
        ]
        if world == 1:
            args.append("--convert")
        res = torchrun(world, args)
        assert res.returncode == 0, res.stderr[-4000:]
    return root, rows


# fp32 on both sides, same math in a different order (fused QKV / SwiGLU matmuls, TP-split
# reductions): ~1e-7 relative per op, measured max |diff| ~1e-7 on logits of size ~1; 2e-5 is
# loose enough for reduction order and tight enough to catch any mis-mapped weight (O(0.1)).
LOGITS_ATOL = 2e-5


@pytest.mark.parametrize("layout", [lay for lays in LAYOUTS.values() for lay in lays])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(parity, name, layout):
    root, _ = parity
    model = transformers.AutoModelForCausalLM.from_pretrained(root / name / "hf").float().eval()
    ids = torch.load(root / "input_ids.pt", weights_only=True)
    with torch.no_grad():
        ref = model(ids).logits
    got = torch.load(root / name / f"logits_{layout}.pt", weights_only=True)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=LOGITS_ATOL)


# Same fp32 bound as above: the adapters add two rank-4 matmuls per projection (DoRA: a per-row
# scale from a norm over the input), ~1e-7 each; a mis-laid q/k/v or gate/up adapter, a missing
# TP sum or a wrong DoRA norm is O(0.01..1).
@pytest.mark.parametrize("layout", [lay for lays in LAYOUTS.values() for lay in lays])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_logits_match_peft(parity, name, layout):
    peft = pytest.importorskip("peft")
    root, _ = parity
    base = transformers.AutoModelForCausalLM.from_pretrained(root / name / "hf").float()
    ids = torch.load(root / "input_ids.pt", weights_only=True)
    with torch.no_grad():
        plain = base(ids).logits
        ref = peft.PeftModel.from_pretrained(base, root / name / "peft").eval()(ids).logits
    assert (ref - plain).abs().max() > 0.05  # the adapters change the model
    got = torch.load(root / name / f"logits_{layout}.pt", weights_only=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=LOGITS_ATOL)


def float64_reference(model, rows):
    """SimPO per pair from the HF model run in float64, written out by hand."""
    model = model.double()
    out = []
    for r in rows:
        logps = []
        for resp in (r["chosen_ids"], r["rejected_ids"]):
            seq = torch.tensor([r["prompt_ids"] + resp])
            with torch.no_grad():
                lp = torch.log_softmax(model(seq).logits[0, :-1].double(), -1)
            targets = seq[0, 1:]
            n_prompt = len(r["prompt_ids"])
            scored = [lp[t, targets[t]].item() for t in range(n_prompt - 1, seq.shape[1] - 1)]
            logps.append(sum(scored) / len(scored))
        margin = BETA * logps[0] - BETA * logps[1] - GAMMA
        out.append(
            {
                "loss": math.log1p(math.exp(-margin)),
                "logps/chosen": logps[0],
                "logps/rejected": logps[1],
                "rewards/margins": BETA * (logps[0] - logps[1]),
            }
        )
    return out


@pytest.mark.parametrize("layout", EVAL_LAYOUTS)
def test_evaluate_matches_float64_reference(parity, layout):
    root, rows = parity
    name = next(iter(VARIANTS))
    got = json.loads((root / name / f"eval_{layout}.json").read_text())
    ref = float64_reference(
        transformers.LlamaForCausalLM.from_pretrained(root / name / "hf").eval(), rows
    )
    assert got["num_pairs"] == len(rows) == len(got["per_pair"])
    # fp32 model vs float64: log-probs of ~-4.6 agree to ~1e-6 relative; 1e-5 absolute.
    for g, r in zip(got["per_pair"], ref):  # file order
        for k, v in r.items():
            assert g[k] == pytest.approx(v, abs=1e-5), k
        assert g["rewards/accuracies"] == float(g["rewards/margins"] > 0)
    assert got["loss"] == pytest.approx(sum(r["loss"] for r in ref) / len(ref), abs=1e-5)
    assert got["rewards/chosen"] == pytest.approx(
        BETA * sum(r["logps/chosen"] for r in ref) / len(ref), abs=1e-5
    )
