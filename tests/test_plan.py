"""Memory planner (``megatron_simpo/plan.py``): arithmetic against hand counts, ranking, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import REPO, run_cli

from megatron_simpo import plan
from megatron_simpo.errors import ConfigError

# Published parameter counts of Meta's models (sum of the safetensors shapes of
# meta-llama/Meta-Llama-3-8B and -70B): an independent check of the counting.
LLAMA3_8B_PARAMS = 8_030_261_248
LLAMA3_70B_PARAMS = 70_553_706_496

JOB = plan.Job(nodes=1, gpus_per_node=8, gpu_memory_gb=80, seq_length=4096, global_batch_size=64)


def layout(**kw) -> plan.Layout:
    base = dict(
        tp=1,
        pp=1,
        dp=8,
        micro_batch_size=1,
        num_microbatches=8,
        distributed_optimizer=False,
        recompute="none",
        sequence_parallel=False,
    )
    return plan.Layout(**{**base, **kw})


def test_param_counts_match_published_llama3():
    assert plan.count_params(plan.load_model("llama3-8b")).total == LLAMA3_8B_PARAMS
    assert plan.count_params(plan.load_model("llama3-70b")).total == LLAMA3_70B_PARAMS


def test_weights_gradients_optimizer_by_hand():
    m = plan.load_model("llama3-8b")
    # TP1 PP1: every parameter, 2 + 4 + 12 bytes (bf16 weights, fp32 grads, fp32 master+m+v).
    b = plan.breakdown(m, layout(), JOB)
    assert b["weights"] == LLAMA3_8B_PARAMS * 2
    assert b["gradients"] == LLAMA3_8B_PARAMS * 4
    assert b["optimizer"] == LLAMA3_8B_PARAMS * 12
    # TP2 PP2, first stage, by hand: 16 layers of (QKV 4096x6144 + proj 4096^2 + MLP 3x4096x14336)
    # / 2 plus two replicated 4096 norms, and half of the 128256 x 4096 embedding.
    h = 4096
    layer = (h * 6144 + h * h + 3 * h * 14336) / 2 + 2 * h
    first = 16 * layer + 128256 * h / 2
    b = plan.breakdown(m, layout(tp=2, pp=2, dp=2, num_microbatches=32), JOB)
    assert b["stage"] == 0  # the first stage holds the in-flight micro-batches: the worst one
    assert b["weights"] == pytest.approx(first * 2, rel=1e-12)
    # Close to params x 2 / (TP x PP): the difference is the replicated norms and the vocab split.
    assert b["weights"] == pytest.approx(LLAMA3_8B_PARAMS * 2 / 4, rel=0.05)


def test_fp32_bytes_per_param():
    m = plan.load_model("llama3-8b")
    job = replace(JOB, precision="fp32")
    b = plan.breakdown(m, layout(), job)
    # fp32: weights are their own master copy: 4 + 4 + 8 (Adam m, v).
    assert (b["weights"], b["gradients"], b["optimizer"]) == (
        LLAMA3_8B_PARAMS * 4,
        LLAMA3_8B_PARAMS * 4,
        LLAMA3_8B_PARAMS * 8,
    )


@pytest.mark.parametrize("dp", [2, 4, 8])
def test_distributed_optimizer_divides_optimizer_state_by_dp(dp):
    m = plan.load_model("llama3-8b")
    lay = layout(tp=8 // dp, dp=dp, num_microbatches=64 // dp)
    off = plan.breakdown(m, lay, JOB)
    on = plan.breakdown(m, replace(lay, distributed_optimizer=True), JOB)
    assert on["optimizer"] == pytest.approx(off["optimizer"] / dp, rel=1e-12)
    for key in ("weights", "gradients", "activations", "loss_head"):
        assert on[key] == off[key]


def test_activations_by_hand():
    m = plan.load_model("llama3-8b")
    # Per token per layer (elements): 4h norms + q,k,v (32 + 2x8 heads x 128) + attention output
    # 4096 + SwiGLU 3 x 14336 = 69632 = 17h: the 34 s b h bytes of Korthikanti et al. without
    # dropout, coincidentally. 2 sequences per pair, 32 layers, 2 bytes.
    per_token = 4 * 4096 + (32 + 16) * 128 + 4096 + 3 * 14336
    assert per_token == 17 * 4096
    b = plan.breakdown(m, layout(), JOB)
    assert b["activations"] == 2 * 4096 * per_token * 32 * 2 + 2 * 4096 * 2 * 4096 * 2
    # TP4 + SP divides everything by 4; PP4 with 8 micro-batches keeps 4 in flight on the first
    # stage, each 8 layers deep: the same total as PP1 (the known 1F1B property).
    sp = plan.breakdown(m, layout(tp=4, dp=2, sequence_parallel=True), JOB)["activations"]
    assert sp == pytest.approx(b["activations"] / 4, rel=1e-12)
    pp = plan.breakdown(m, layout(pp=4, dp=2), JOB)
    assert pp["stage"] == 0
    assert pp["activations"] == 2 * 4096 * per_token * 32 * 2
    # Full recompute: each layer's input (h per token) + one layer while it is recomputed; on
    # the last stage that layer is live after the loss head (4096 x 2 x 128256 x 10 bytes, more
    # than a layer) is freed, so it adds nothing there.
    full = plan.breakdown(m, layout(recompute="full"), JOB)["activations"]
    assert full == 2 * 4096 * 32 * 4096 * 2
    # PP2, first stage: 2 micro-batches in flight, 16 layers each, + the recomputed layer.
    first = plan.activation_bytes(m, layout(pp=2, dp=4, recompute="full"), JOB, stage=0)
    assert first == 2 * 4096 * (2 * 16 * 4096 + per_token) * 2
    # Unfused attention adds the softmax: heads x seq per token.
    unf = replace(JOB, attention="unfused")
    extra = plan.breakdown(m, layout(), unf)["activations"] - b["activations"]
    kv_expand = 2 * (32 - 8) * 128  # K and V repeated to the 32 query heads
    # Plain torch ops (CPU path): each norm also keeps its normalised input (+2h per layer,
    # +h for the final norm), SwiGLU silu(x) and one more f-sized tensor (+2f), and SDPA keeps
    # the rotated q and k besides the fused QKV output (+(a + a_kv) d).
    torch_ops = plan.breakdown(m, layout(), replace(JOB, kernels="torch"))["activations"]
    more = 2 * 4096 + 2 * 14336 + (32 + 8) * 128
    assert torch_ops - b["activations"] == 2 * 4096 * (32 * more + 4096) * 2
    workspace = 2 * 32 * 4096**2 * 2  # the score buffer, [2 sequences x 32 heads, s, s]
    assert extra == 2 * 4096 * (32 * 4096 + kv_expand) * 32 * 2 + workspace


def test_loss_head_is_logits_of_one_micro_batch():
    m = plan.load_model("llama3-8b")
    lay = layout(tp=2, dp=4, micro_batch_size=2, num_microbatches=8)
    b = plan.breakdown(m, lay, replace(JOB, fused_loss_head=False))
    # [2 x 2 pairs x 4096 tokens, 128256 / 2] in bf16 + two fp32 copies.
    assert b["loss_head"] == 4 * 4096 * 128256 / 2 * (2 + 8)


def test_fused_loss_head_is_one_chunk_plus_the_weight_gradient():
    m = plan.load_model("llama3-8b")
    lay = layout(tp=2, dp=4, micro_batch_size=2, num_microbatches=8)
    v = 128256 / 2
    fused = plan.breakdown(m, lay, replace(JOB, fused_loss_head=True))
    # One chunk of 1024 tokens: bf16 matmul output + its fp32 copy; fp32 weight-gradient
    # accumulator + the per-chunk [v, h] bf16 product and its fp32 copy.
    assert fused["loss_head"] == 1024 * v * (2 + 4) + v * 4096 * (4 + 2 + 4)
    chunk = plan.breakdown(m, lay, replace(JOB, fused_loss_head=True, loss_chunk_size=256))
    assert fused["loss_head"] - chunk["loss_head"] == (1024 - 256) * v * 6
    # Unset (the default, as in training): 16384 tokens per micro-batch, above the bf16
    # threshold 0.6 x 1024 + 4096 -> the fused head, whose peak is the smaller.
    assert JOB.fused_loss_head is None
    auto = plan.breakdown(m, lay, JOB)
    assert auto["loss_head"] == fused["loss_head"] < 4 * 4096 * v * 10
    # Below the threshold (seq 1024 at one pair: 2048 tokens) the unfused head is smaller.
    short = replace(JOB, seq_length=1024)
    one = layout(tp=2, dp=4)
    assert plan.fused_loss_head(m, one, short)[0] is False
    unfused = plan.breakdown(m, one, replace(short, fused_loss_head=False))["loss_head"]
    assert plan.breakdown(m, one, short)["loss_head"] == unfused == 2048 * v * 10
    # Fused at 16384 tokens saves ~7.5 GB of the head at TP2, and the rows say which head.
    assert 4 * 4096 * v * 10 - fused["loss_head"] > 7e9
    rows = plan.plan(m, JOB, tp=2)["layouts"]
    assert rows and all(r["fused_loss_head"] for r in rows)


def test_dpo_exceeds_simpo_by_exactly_the_reference_weights():
    m = plan.load_model("llama3-70b")
    job = replace(JOB, nodes=4)
    for lay in plan.enumerate_layouts(m, job):
        s, d = plan.breakdown(m, lay, job, "simpo"), plan.breakdown(m, lay, job, "dpo")
        assert s["reference"] == 0
        assert d["reference"] == d["weights"]  # bf16 copy sharded like the weights
        # + its transient forward: one layer of one micro-batch, no grad (a bound).
        assert d["reference_acts"] == plan.layer_bytes(m, lay, job) > 0
        assert d["total"] - s["total"] == pytest.approx(
            (d["reference"] + d["reference_acts"]) * (1 + job.fragmentation), rel=1e-9
        )
    bpp = plan.bytes_per_param(job)
    assert bpp["weights"] + bpp["gradients"] + bpp["optimizer"] == 18


def test_layouts_valid_and_ranked():
    m = plan.load_model("llama3-70b")
    job = plan.Job(
        nodes=4, gpus_per_node=8, gpu_memory_gb=80, seq_length=4096, global_batch_size=128
    )
    result = plan.plan(m, job)
    rows = result["layouts"]
    fits = [r["fits_simpo"] for r in rows]
    assert any(fits) and not all(fits)
    assert fits == sorted(fits, reverse=True)  # every fitting layout first
    speeds = [r["throughput"] for r in rows if r["fits_simpo"]]
    assert speeds == sorted(speeds, reverse=True)
    for r in rows:
        lay = r["layout"]
        assert lay["tp"] * lay["pp"] * lay["dp"] == 32
        assert lay["tp"] in (1, 2, 4, 8) and 80 % lay["pp"] == 0
        assert lay["micro_batch_size"] * lay["dp"] * lay["num_microbatches"] == 128
        assert r["fits_simpo"] == (r["simpo"]["total"] <= 80e9)
    # TP in {1,2,4,8} x PP in divisors of 80 with TP x PP | 32; distopt only with DP > 1;
    # recompute none/full: counted by hand.
    combos = [
        (t, p)
        for t in (1, 2, 4, 8)
        for p in (1, 2, 4, 5, 8, 10, 16, 20, 40, 80)
        if 32 % (t * p) == 0
    ]
    expected = sum(2 * (2 if 32 // (t * p) > 1 else 1) for t, p in combos)
    assert len(rows) == expected
    assert result["verdict"].startswith("fits") and rows[0]["name"] in result["verdict"]
    # Bubble: PP4 with 4 micro-batches runs 4/7 of the time.
    lay = layout(pp=4, dp=2, num_microbatches=4)
    assert plan.throughput(lay, job) == pytest.approx(4 / 7)


def test_does_not_fit_verdict_and_fixed_sizes():
    m = plan.load_model("llama3-70b")
    job = plan.Job(
        nodes=1, gpus_per_node=8, gpu_memory_gb=80, seq_length=4096, global_batch_size=128
    )
    result = plan.plan(m, job, tp=8)
    assert all(r["layout"]["tp"] == 8 for r in result["layouts"])
    # 70.6B params x 18 bytes / 8 GPUs = 159 GB of static state alone.
    assert not any(r["fits_simpo"] for r in result["layouts"])
    assert result["verdict"].startswith("does not fit")


def test_model_from_yaml_and_hf_config():
    yml = plan.load_model(str(REPO / "examples/tiny_pretok.yaml"))
    hf = plan.load_model(str(REPO / "examples/tiny/config.json"))
    assert (yml.hidden_size, yml.vocab_size, yml.kv_heads) == (64, 32, 2)
    assert (hf.hidden_size, hf.vocab_size, hf.num_hidden_layers) == (64, 30, 4)
    # Padded vocab 128 (multiple of 128) x 64, twice (untied), + 4 layers + final norm.
    layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert plan.count_params(hf).total == 2 * 128 * 64 + 4 * layer + 64


@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"tp": 3}, "--tp"),
        ({"pp": 7}, "--pp"),
        ({"micro_batch_size": 3}, "--global-batch-size"),
    ],
)
def test_bad_layout_requests(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        plan.plan(plan.load_model("llama3-8b"), JOB, **kw)


def test_bad_model():
    with pytest.raises(ConfigError, match="--model"):
        plan.load_model("llama9-1t")


def test_cli_table_json_and_errors():
    args = [
        "plan",
        "--model",
        "llama3-8b",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--gpu-memory-gb",
        "80",
        "--seq-length",
        "4096",
        "--global-batch-size",
        "128",
    ]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "verdict: fits" in r.stdout and "bytes/param" in r.stdout
    assert "loss head fused where it saves memory" in r.stdout and " fused\n" in r.stdout
    r = run_cli(*args, "--tp", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    direct = plan.plan(plan.load_model("llama3-8b"), replace(JOB, global_batch_size=128), tp=2)
    assert out["verdict"] == direct["verdict"]
    assert out["model"]["params"] == LLAMA3_8B_PARAMS
    assert [r["name"] for r in out["layouts"]] == [r["name"] for r in direct["layouts"]]
    table = run_cli(*args, "--seq-length", "1024", "--tp", "2", "--json")
    off = run_cli(*args, "--seq-length", "1024", "--tp", "2", "--json", "--fused-loss-head")
    auto, forced = json.loads(table.stdout), json.loads(off.stdout)
    assert not any(r["fused_loss_head"] for r in auto["layouts"])  # 2048 tokens: below
    assert all(r["fused_loss_head"] for r in forced["layouts"])
    for bad, word in [
        (["--tp", "3"], "--tp"),
        (["--nodes", "0"], "--nodes"),
        (["--loss-chunk-size", "0"], "--loss-chunk-size"),
    ]:
        r = run_cli(*args, *bad)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], r.stderr


# ---- mixture of experts (issue 16) -------------------------------------------------------------


def moe_by_hand(h, layers, heads, kv, d, experts, k, f_e, vocab):
    """(total, active) parameters of an all-MoE Llama-style model, untied, no shared expert."""
    attn = h * (heads + 2 * kv) * d + heads * d * h
    norms = 2 * h
    router = h * experts
    expert = 3 * h * f_e
    shared = layers * (attn + norms + router) + 2 * vocab * h + h
    return shared + layers * experts * expert, shared + layers * k * expert


@pytest.mark.parametrize(
    "preset, shape, published",
    [
        # Mistral: "141B total, 39B active"; Qwen model cards: 30.5B / 3.3B, 235B / 22B.
        ("mixtral-8x22b", (6144, 56, 48, 8, 128, 8, 2, 16384, 32000), (141e9, 39e9)),
        ("qwen3-30b-a3b", (2048, 48, 32, 4, 128, 128, 8, 768, 151936), (30.5e9, 3.3e9)),
        ("qwen3-235b-a22b", (4096, 94, 64, 4, 128, 128, 8, 1536, 151936), (235e9, 22e9)),
    ],
)
def test_moe_total_and_active_params(preset, shape, published):
    m = plan.load_model(preset)
    c = plan.count_params(m)
    total, active = moe_by_hand(*shape)
    if preset.startswith("qwen3"):  # per-head QK RMSNorm weights
        total += shape[1] * 2 * shape[4]
        active += shape[1] * 2 * shape[4]
    assert (c.total, c.active) == (total, active)
    # The published round figures, to their precision (rounded to 1 or 3 digits).
    assert c.total == pytest.approx(published[0], rel=0.005)
    assert c.active == pytest.approx(published[1], rel=0.03)


def test_moe_flops_count_active_params_and_the_router():
    from megatron_simpo import flops

    m = plan.load_model("mixtral-8x22b")
    h, layers, d = 6144, 56, 128
    per_layer = h * 48 * d + 2 * h * 8 * d + 48 * d * h + h * 8 + 2 * 3 * h * 16384
    assert flops.matmul_params(m) == layers * per_layer + h * 32000
    assert flops.router_flops_per_token(m) == layers * 2 * h * 8
    assert flops.router_flops_per_token(plan.load_model("llama3-8b")) == 0
    # Active-parameter MFU: forward FLOPs of a token ~ 2 x active params (39B), not 2 x 141B.
    # (+ the one token attending to itself: 56 layers x 2 matmuls x 2 x 1^2/2 x 48 x 128).
    assert flops.forward_flops(m, 1) == 2 * flops.matmul_params(m) + 56 * 2 * 48 * 128
    assert flops.matmul_params(m) < 0.3 * plan.count_params(m).total


def test_moe_hf_configs(tmp_path):
    cfg = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=200,
        tie_word_embeddings=False,
    )
    (tmp_path / "mixtral.json").write_text(
        json.dumps(
            {**cfg, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
        )
    )
    qwen2 = {
        **cfg,
        "model_type": "qwen2_moe",
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 80,
    }
    (tmp_path / "qwen2.json").write_text(json.dumps(qwen2))
    mix = plan.count_params(plan.load_model(str(tmp_path / "mixtral.json")))
    # Padded vocab 256; attention 64 x (64 + 2 x 32) + 64 x 64; 4 experts of width 96.
    attn = 64 * 128 + 64 * 64
    base = 2 * 256 * 64 + 64 + 2 * (attn + 2 * 64 + 64 * 4)
    assert mix.total == base + 2 * 4 * 3 * 64 * 96
    assert mix.active == base + 2 * 2 * 3 * 64 * 96
    # Qwen2-MoE: QKV bias (128), the shared expert (3 x 64 x 80) and its gate (64 -> 1).
    q = plan.count_params(plan.load_model(str(tmp_path / "qwen2.json")))
    base = 2 * 256 * 64 + 64 + 2 * (attn + 128 + 2 * 64 + 64 * 6 + 3 * 64 * 80 + 64)
    assert q.total == base + 2 * 6 * 3 * 64 * 32
    assert q.active == base + 2 * 2 * 3 * 64 * 32
    (tmp_path / "dense_layers.json").write_text(json.dumps({**qwen2, "mlp_only_layers": [0]}))
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        plan.load_model(str(tmp_path / "dense_layers.json"))


def test_expert_parallel_memory_by_hand():
    m = plan.load_model("qwen3-30b-a3b")
    job = replace(JOB, seq_length=2048)
    lay = layout(tp=2, dp=4, num_microbatches=16, distributed_optimizer=True, ep=4, etp=1)
    assert lay.expert_dp == 2  # TP2 x DP4 / (EP4 x ETP1)
    b = plan.breakdown(m, lay, job)
    # Per TP2 rank: half of attention (q 4096, k/v 512 wide, output) and of the embedding and
    # output layer; norms, QK norms and the router (2048 x 128) whole.
    attn = 2048 * (4096 + 2 * 512) + 4096 * 2048
    dense = 48 * (attn / 2 + 2 * 2048 + 2 * 128 + 2048 * 128) + 2 * 151936 * 2048 / 2 + 2048
    assert dense == plan.stage_params(m, 2, 1, 0)
    experts = 48 * 128 * 3 * 2048 * 768 / 4  # 32 of the 128 experts per rank, whole
    assert b["weights"] == pytest.approx((dense + experts) * 2, rel=1e-12)
    assert b["gradients"] == pytest.approx((dense + experts) * 4, rel=1e-12)
    # Adam: dense state over DP 4, expert state over the expert-DP group of 2.
    assert b["optimizer"] == pytest.approx(dense * 12 / 4 + experts * 12 / 2, rel=1e-12)
    # EP x ETP: the same experts split 4 ways either way; the state shards over 2 both times.
    b2 = plan.breakdown(m, replace(lay, ep=2, etp=2), job)
    assert b2["weights"] == b["weights"] and b2["optimizer"] == b["optimizer"]
    # Activations of the MoE MLP per token (TP2 + SP): 8 expert copies of (2h + 3 f_e), the
    # router probabilities (128 fp32 = 256 elements), over TP.
    el = plan.layer_activation_elements(m, replace(lay, sequence_parallel=True), job)
    attn = (32 + 8) * 128 + 32 * 128
    assert el["sharded"] == (attn + 8 * (2 * 2048 + 3 * 768) + 2 * 128) / 2


def test_moe_layouts_rank_ep_and_fixed_sizes():
    m = plan.load_model("qwen3-30b-a3b")
    result = plan.plan(m, replace(JOB, seq_length=2048))
    rows = result["layouts"]
    eps = {r["layout"]["ep"] for r in rows}
    assert eps == {1, 2, 4, 8}  # divisors of 128 that divide TP x DP (8 GPUs)
    for r in rows:
        lay = r["layout"]
        assert (lay["tp"] * lay["dp"]) % (lay["ep"] * lay["etp"]) == 0
        assert lay["etp"] in (1, lay["tp"])
    assert any(r["fits_simpo"] for r in rows)
    assert result["model"]["active_params"] == plan.count_params(m).active
    fixed = plan.plan(m, replace(JOB, seq_length=2048), ep=8, etp=1)["layouts"]
    assert fixed and all(r["layout"]["ep"] == 8 and "EP8 ETP1" in r["name"] for r in fixed)
    with pytest.raises(ConfigError, match="--expert-model-parallel-size 3"):
        plan.plan(m, JOB, ep=3)
    with pytest.raises(ConfigError, match="--expert-model-parallel-size 2: a dense model"):
        plan.plan(plan.load_model("llama3-8b"), JOB, ep=2)


# ---- LoRA and optimizer CPU offload (issue 15) -------------------------------------------------


def test_lora_adapter_count_tiny_by_hand():
    from megatron_simpo import shapes

    m = plan.load_model(str(REPO / "examples/tiny/config.json"))  # h 64, 4 x 16 q, 2 x 16 kv, f 128
    r = 4
    # r (in + out) for q, k, v, o, gate, up, down.
    per_layer = r * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    every = shapes.lora_projections("all")
    ad = shapes.lora_params(m, r, every)
    assert ad.total == per_layer == 4096
    # TP split: B of column-parallel q, k, v, gate, up (outputs 64, 32, 32, 128, 128) and A of
    # row-parallel o, down (inputs 64, 128) are sharded; the other factors replicated.
    assert ad.sharded == r * (64 + 32 + 32 + 128 + 128 + 64 + 128)
    assert ad.rank_per_token == 7 * r
    assert shapes.lora_projections("qkv,proj,fc1,fc2") == every
    assert shapes.lora_projections("qkv") == ("q_proj", "k_proj", "v_proj")
    assert shapes.lora_projections("fc1,down_proj") == ("gate_proj", "up_proj", "down_proj")
    assert shapes.lora_params(m, r, ("q_proj",)).total == r * 128
    with pytest.raises(ConfigError, match="--lora-target"):
        shapes.lora_projections("qkv,mlp")
    with pytest.raises(ConfigError, match="--lora-rank"):
        shapes.lora_params(plan.load_model("mixtral-8x22b"), r, every)


def test_lora_memory_by_hand():
    m = plan.load_model("llama3-8b")
    from megatron_simpo import shapes

    job = replace(JOB, lora_rank=16)
    lay = layout(tp=2, dp=4, num_microbatches=16, sequence_parallel=True)
    full = plan.breakdown(m, lay, JOB)
    b = plan.breakdown(m, lay, job)
    ad = shapes.lora_params(m, 16, shapes.lora_projections("all"))
    adapters = 32 * (ad.sharded / 2 + ad.replicated)
    base = plan.stage_params(m, 2, 1, 0)
    assert b["weights"] == pytest.approx((base + adapters) * 2, rel=1e-12)  # frozen bf16 base
    assert b["gradients"] == pytest.approx(adapters * 4, rel=1e-12)  # adapters only
    assert b["optimizer"] == pytest.approx(adapters * 12, rel=1e-12)
    # Adapter activations: 7 x r per token per layer in bf16, whole on each TP rank.
    assert b["activations"] - full["activations"] == pytest.approx(
        2 * 4096 * 32 * 7 * 16 * 2, rel=1e-12
    )
    # The output layer is frozen: the (fused, 8192 tokens) loss head has no [v, h] weight-
    # gradient terms (fp32 accumulator, bf16 product and its fp32 copy: 10 bytes per element).
    assert plan.fused_loss_head(m, lay, job)[0]
    lora_head = plan.loss_head_bytes(m, lay, job)
    assert plan.loss_head_bytes(m, lay, JOB) - lora_head == pytest.approx(
        10 * 128256 / 2 * 4096, rel=1e-12
    )
    # With dropout each adapter also keeps its input: h for q, k, v, gate, up (gathered), the
    # TP shard of o's (4096/2) and down's (14336/2) inputs.
    drop = plan.breakdown(m, lay, replace(job, lora_dropout=0.05))
    extra = 5 * 4096 + 4096 / 2 + 14336 / 2
    assert drop["activations"] - b["activations"] == pytest.approx(
        2 * 4096 * 32 * extra * 2, rel=1e-12
    )


def test_optimizer_cpu_offload_moves_master_and_adam_to_the_host():
    m = plan.load_model("llama3-70b")
    lay = layout(tp=8, dp=1, num_microbatches=64, distributed_optimizer=True)
    on_gpu = plan.breakdown(m, lay, JOB)
    off = plan.breakdown(m, lay, replace(JOB, optimizer_cpu_offload=True))
    assert off["optimizer"] == 0 and off["host"] == on_gpu["optimizer"] > 0
    assert off["weights"] == on_gpu["weights"] and off["gradients"] == on_gpu["gradients"]
    rows = plan.plan(m, replace(JOB, optimizer_cpu_offload=True), tp=8)["layouts"]
    assert all(r["layout"]["distributed_optimizer"] for r in rows)
    # --host-memory-gb: 70.6B x 12 bytes of fp32 state ~ 850 GB per node does not fit 512 GB.
    small = plan.plan(m, replace(JOB, optimizer_cpu_offload=True, host_memory_gb=512), tp=8)
    assert not any(r["fits_simpo"] for r in small["layouts"])


def test_which_llama3_70b_simpo_jobs_fit_one_8x80_node():
    """The question users ask (issue 15): full-parameter does not fit one node of 8 x 80 GB;
    with the optimizer state on the host (~850 GB per node) it does; LoRA does on the GPUs."""
    m = plan.load_model("llama3-70b")
    job = replace(JOB, global_batch_size=128)
    got = {v["job"]: v for v in plan.variants(m, job)}
    full = got["full-parameter"]
    offload = got["full-parameter + optimizer CPU offload"]
    lora = got["LoRA r16 (all)"]
    assert not full["fits"] and full["gb_per_gpu"] > 80
    assert offload["fits"] and lora["fits"]
    # Host: at least the fp32 master + Adam m, v of every parameter, 12 bytes each.
    assert offload["host_gb_per_node"] >= 12 * LLAMA3_70B_PARAMS / 1e9
    assert lora["host_gb_per_node"] == 0
    # LoRA's backward computes no base weight gradients: ~2/3 of full training's work.
    lay = plan.Layout(**{k: v for k, v in plan.plan(m, job)["layouts"][0]["layout"].items()})
    lora_job = replace(job, lora_rank=16)
    ratio = plan.step_seconds(m, lay, lora_job) / plan.step_seconds(m, lay, job)
    assert ratio == pytest.approx(2 / 3, rel=1e-12)
    # Static floor by hand: full 18 bytes/param over 8 GPUs ~ 159 GB; offload 6 ~ 53 GB;
    # LoRA ~ 2 bytes/param ~ 18 GB + adapters.
    assert full["gb_per_gpu"] > 18 * LLAMA3_70B_PARAMS / 8 / 1e9
    assert lora["layouts_that_fit"] > offload["layouts_that_fit"]


# ---- objectives and the reference (issue 14) ---------------------------------------------------


def test_reference_objectives_match_the_loss_module():
    from megatron_simpo import loss
    from megatron_simpo.config import OBJECTIVE_NAMES, LossConfig

    for name in OBJECTIVE_NAMES:
        assert LossConfig(objective=name).needs_reference == (name in loss.NEEDS_REFERENCE)


def test_dpo_precomputed_is_simpo_plus_two_scalars_per_pair_and_scoring_cost():
    from megatron_simpo import flops

    m = plan.load_model("llama3-8b")
    lay = layout(pp=2, dp=4, num_microbatches=16, micro_batch_size=1)
    s = plan.breakdown(m, lay, JOB, "simpo")
    pre = plan.breakdown(m, lay, JOB, "dpo-precomputed")
    assert pre["stage"] == 0 and pre["reference"] == 2 * 4 * 1 * 2  # 2 fp32 x 1 pair x 2 in flight
    # (+ 10% margin; abs: a difference of two ~1e10 floats, exact to ~1e-5 bytes)
    assert pre["total"] - s["total"] == pytest.approx(16 * 1.1, abs=1e-3)
    rows = plan.plan(m, JOB)["layouts"]
    o = plan.objectives(m, JOB, rows, 60_000)
    assert [r["objective"] for r in o["rows"]] == [
        "DPO, resident reference",
        "DPO, precomputed log-probs",
        "SimPO",
    ]
    # Memory truth on the measured model: 2 of 18 bytes/param.
    t = o["memory"]
    assert t["reference_gb"] == LLAMA3_8B_PARAMS * 2 / 1e9
    assert t["training_state_gb"] == LLAMA3_8B_PARAMS * 18 / 1e9
    # Under LoRA the base holds 2 bytes/param: a resident reference doubles it.
    lora = plan.objectives(m, replace(JOB, lora_rank=8), rows, None)["memory"]
    assert lora["training_state_gb"] == lora["reference_gb"] == LLAMA3_8B_PARAMS * 2 / 1e9
    # score-reference: one forward of both 4096-token sequences of every pair, 2 x params x
    # tokens + causal attention (32 layers x 2 matmuls x 2 FLOPs x s^2/2 x 4096 width).
    P = flops.matmul_params(m)
    fwd = 2 * 4096 * P + 32 * 2 * 2 * 4096**2 // 2 * 4096
    assert flops.forward_flops(m, 4096) == fwd
    sc = o["scoring"]
    assert sc["flops"] == 60_000 * 2 * fwd
    assert sc["seconds"] == pytest.approx(sc["flops"] / (8 * 989e12 * 0.40), rel=1e-12)


def test_step_flops_count_a_shared_prompt_once():
    from megatron_simpo import flops

    m = plan.load_model("llama3-8b")
    s, q = 4096, 1024
    shared = plan.step_flops(m, replace(JOB, prompt_length=q))
    plain = plan.step_flops(m, JOB)
    assert plain == 3 * 64 * 2 * flops.forward_flops(m, s)
    P = flops.matmul_params(m)
    # Dense over q + 2 (s - q) tokens; attention the two squares less the prompt block, halved.
    attn = 32 * 2 * 2 * (2 * s * s - q * q) // 2 * 4096
    assert shared == 3 * 64 * (2 * (2 * s - q) * P + attn)
    # s/step: model FLOPs over GPUs x peak x MFU x speed.
    lay = layout()
    assert plan.step_seconds(m, lay, JOB) == pytest.approx(
        plain / (8 * 989e12 * 0.40 * plan.throughput(lay, JOB)), rel=1e-12
    )


def test_cli_lora_moe_and_dpo_reports():
    import subprocess
    import sys

    # The planner answers without importing torch (flops.py imports it only for devices).
    code = "import sys, megatron_simpo.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
    base = ["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "80"]
    base += ["--seq-length", "4096", "--global-batch-size", "128"]
    r = run_cli(*base, "--model", "llama3-70b", "--lora-rank", "16", "--lora-alpha", "32")
    assert r.returncode == 0, r.stderr
    assert "which SimPO jobs fit on 1x8 GPUs of 80 GB" in r.stdout
    lines = [line.split() for line in r.stdout.splitlines()]
    full = next(x for x in lines if x[:1] == ["full-parameter"])
    assert full[1] == "no"
    r = run_cli(*base, "--model", "llama3-8b", "--loss", "dpo", "--num-pairs", "1000", "--top", "1")
    assert r.returncode == 0, r.stderr
    assert "DPO, precomputed log-probs" in r.stdout and "score-reference (one-off" in r.stdout
    r = run_cli(*base, "--model", "qwen3-30b-a3b", "--expert-model-parallel-size", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"]["moe"]["num_experts"] == 128 and out["flops"]["router_share"] > 0
    assert all(x["layout"]["ep"] == 8 for x in out["layouts"])
    for bad, word in [
        (["--model", "llama3-8b", "--lora-rank", "8", "--lora-target", "mlp"], "--lora-target"),
        (["--model", "llama3-8b", "--expert-model-parallel-size", "2"], "--expert-model"),
        (["--model", "llama3-8b", "--num-pairs", "0"], "--num-pairs"),
    ]:
        r = run_cli(*base, *bad)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], r.stderr


def test_llama3_70b_tp4_decision_quoted_in_the_sbatch_header():
    """slurm/simpo_llama3_70b.sbatch runs TP4 x PP8 on 4 nodes because the planner says it fits
    and ranks it first; TP4 on 2 nodes does not fit. The header quotes these numbers."""
    m = plan.load_model("llama3-70b")
    job = plan.Job(
        nodes=4, gpus_per_node=8, gpu_memory_gb=80, seq_length=2048, global_batch_size=128
    )
    tp4 = plan.plan(m, job, tp=4)["layouts"][0]
    assert tp4["name"] == "TP4 PP8 DP1 SP" and tp4["fits_simpo"]
    best = plan.plan(m, job)["layouts"][0]
    assert best["name"] == tp4["name"]
    tp8 = plan.plan(m, job, tp=8, pp=4, recompute="none")["layouts"][0]
    assert tp8["fits_simpo"] and tp8["step_seconds"] > tp4["step_seconds"]
    two = plan.plan(m, replace(job, nodes=2), tp=4)
    assert not any(r["fits_simpo"] for r in two["layouts"])
    header = (REPO / "slurm/simpo_llama3_70b.sbatch").read_text().split("#SBATCH")[0]
    assert f"TP4 PP8 DP1 SP          {tp4['simpo']['total'] / 1e9:.1f}" in header
    assert f"TP8 PP4 DP1 SP          {tp8['simpo']['total'] / 1e9:.1f}" in header
    assert f"{tp4['step_seconds']:.1f}   <- this script" in header
