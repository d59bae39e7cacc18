"""Export to Hugging Face: lossless round trips for Llama, Mistral, Qwen2 and Qwen3, and export of a
TP2xPP2 + distributed-optimizer training checkpoint whose logits match ``transformers``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA3_ROPE, REPO, run_cli, torchrun

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402


def make(family: str, out, **over):
    torch.manual_seed(len(family))
    common = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(
            **common, rope_scaling=LLAMA3_ROPE, rope_theta=5e5, tie_word_embeddings=True, **over
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None, **over)
        model = transformers.MistralForCausalLM(cfg)
    elif family == "qwen3":
        # Tied like Qwen3-0.6B..4B; head_dim 16 != hidden / heads as in every Qwen3.
        cfg = transformers.Qwen3Config(
            **common, head_dim=16, rope_theta=1e6, tie_word_embeddings=True, **over
        )
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, rope_theta=1e6, **over)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(-0.5, 1.5)  # visible if a norm or bias were mis-mapped
    model.save_pretrained(out)
    return model


def hf_tensors(d) -> dict[str, torch.Tensor]:
    index = (
        json.loads((d / "model.safetensors.index.json").read_text())
        if (d / "model.safetensors.index.json").exists()
        else None
    )
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(d / f)))
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_round_trip_is_lossless(tmp_path, family):
    make(family, tmp_path / "hf")
    res = run_cli(
        "convert", "hf-to-mcore", "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ckpt")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # One family exports from the iteration directory itself: the HF side files recorded at
    # import live under the checkpoint root (CKPT/hf), which must be found from there too.
    load = tmp_path / "ckpt" / ("iter_0000000" if family == "qwen2" else "")
    res = run_cli(
        "convert",
        "mcore-to-hf",
        "--load",
        str(load),
        "--hf-dir",
        str(tmp_path / "back"),
        "--max-shard-size",
        "40KB",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1  # sharded
    ca = json.loads((tmp_path / "hf/config.json").read_text())
    cb = json.loads((tmp_path / "back/config.json").read_text())
    for key, value in ca.items():
        if key not in ("transformers_version", "dtype", "torch_dtype"):
            assert cb.get(key) == value, key
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert type(back).__name__.lower().startswith(family)
    gen = json.loads((tmp_path / "hf/generation_config.json").read_text())
    assert json.loads((tmp_path / "back/generation_config.json").read_text()) == gen


def test_hf_side_dir_is_found_from_the_root_or_one_checkpoint(tmp_path):
    from megatron_simpo.checkpointing import TRACKER, hf_side_dir

    root = tmp_path / "ckpt"
    (root / "iter_0000007").mkdir(parents=True)
    (root / "iter_0000007/metadata.json").write_text("{}")
    (root / TRACKER).write_text("7\n")
    assert hf_side_dir(root) is None and hf_side_dir(root / "iter_0000007") is None
    (root / "hf").mkdir()
    assert hf_side_dir(root) == root / "hf"
    assert hf_side_dir(root / "iter_0000007") == root / "hf"
    # A directory that is not a checkpoint does not borrow its parent's hf/.
    (root / "other").mkdir()
    assert hf_side_dir(root / "other") is None


def test_export_errors(tmp_path):
    res = run_cli(
        "convert", "mcore-to-hf", "--load", str(tmp_path / "none"), "--hf-dir", str(tmp_path / "o")
    )
    assert res.returncode == 2 and "no checkpoint there" in res.stderr
    (tmp_path / "o").mkdir()
    (tmp_path / "o/x").write_text("keep me")
    res = run_cli(
        "convert", "mcore-to-hf", "--load", str(REPO / "examples"), "--hf-dir", str(tmp_path / "o")
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert (tmp_path / "o/x").read_text() == "keep me"


def test_export_of_tp2_pp2_distopt_training_checkpoint_matches_transformers(tmp_path):
    make("qwen2", tmp_path / "hf")
    assert (
        run_cli(
            "convert",
            "hf-to-mcore",
            "--hf-dir",
            str(tmp_path / "hf"),
            "--save",
            str(tmp_path / "init"),
        ).returncode
        == 0
    )
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            k: torch.randint(3, 100, (n,), generator=g).tolist()
            for k, n in (("prompt_ids", 4), ("chosen_ids", 3), ("rejected_ids", 5))
        }
        for _ in range(8)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = torchrun(
        4,
        [
            "-m",
            "megatron_simpo",
            "train",
            "--load",
            str(tmp_path / "init"),
            "--data-path",
            str(tmp_path / "pairs.jsonl"),
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--use-distributed-optimizer",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "4",
            "--train-iters",
            "2",
            "--seq-length",
            "16",
            "--lr",
            "1e-2",
            "--precision",
            "fp32",
            "--save",
            str(tmp_path / "ckpt"),
        ],
    )
    assert res.returncode == 0, res.stderr[-4000:]
    res = run_cli(
        "convert",
        "mcore-to-hf",
        "--load",
        str(tmp_path / "ckpt"),
        "--hf-dir",
        str(tmp_path / "out"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trained = hf_tensors(tmp_path / "out")
    assert not torch.equal(
        trained["model.norm.weight"], hf_tensors(tmp_path / "hf")["model.norm.weight"]
    ), "the export must hold the trained weights"
    # Megatron logits of the trained checkpoint at TP2xPP2 vs transformers on the export.
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained/ckpt").symlink_to(tmp_path / "ckpt")
    ids = torch.randint(0, 100, (2, 10), generator=g)
    torch.save(ids, tmp_path / "input_ids.pt")
    res = torchrun(
        4,
        [
            str(REPO / "tests/distributed/hf_parity_runner.py"),
            "--root",
            str(tmp_path),
            "--layouts",
            "tp2_pp2",
            "--variants",
            "trained",
        ],
    )
    assert res.returncode == 0, res.stderr[-4000:]
    got = torch.load(tmp_path / "trained/logits_tp2_pp2.pt", weights_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    with torch.no_grad():
        ref = model(ids).logits
    # fp32 both sides; see test_hf_parity.py for the tolerance.
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
