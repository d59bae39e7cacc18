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
