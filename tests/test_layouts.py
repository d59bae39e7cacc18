"""The integration matrix: every layout of ``distributed/layouts.py`` against its single-process
reference, for losses, SimPO metrics, gradient norms, full gradients and updated weights, on
varied data (``tests/data/varied_pretok.jsonl``), in fp32 and bf16.

Three ``torchrun`` worlds (1, 2 and 4 ranks) run all layouts of their size in one process group.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, torchrun

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from layouts import BASE, LAYOUTS, SWEEP, SWEEP_LAYOUTS, fp32_of  # noqa: E402

DATA = REPO / "tests/data/varied_pretok.jsonl"

# Tolerances, fp32 throughout. Layouts differ only in the order of floating-point reductions
# (TP splits the matmul/softmax reductions, PP/VPP nothing, DP and micro-batching the sum over
# pairs). One fp32 rounding is 6e-8 relative; sums of a few hundred terms in another order give
# ~1e-6 relative at worst, and three Adam steps (eps=1e-3, see layouts.py) propagate that with a
# factor ~lr/eps = 10 per step. Measured worst cases on this machine are quoted per line.
LOSS_ATOL = 5e-6  # loss ~2.5; measured <= 6.9e-7 (tp2)
# Forward-only per-pair losses: weighted by up to 3 (~8) and not averaged; measured <= 3.1e-6.
EVAL_ATOL = 1e-5
METRIC_ATOL = 1e-5  # rewards ~beta*logps ~ -8; measured <= 4.8e-7
# MoE load-balancing loss (~1 per layer, sum of 4 per-expert products of means over ~100
# tokens, summed over 4 layers); measured <= 1.8e-7 (ep2_pp2_mixtral).
AUX_ATOL = 1e-5
GRAD_NORM_RTOL = 5e-5  # measured <= 2.3e-7
GRADS_RTOL = 5e-6  # max|g_layout - g_ref| / max|g_ref| per tensor; measured <= 9.7e-7
WEIGHTS_RTOL = 5e-5  # after 3 steps; measured <= 2.7e-6

WORLDS = sorted({layout.world for layout in LAYOUTS.values()})


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("layouts")
    data = str(DATA)
    runner = str(REPO / "tests/distributed/layout_runner.py")
    for world in WORLDS:  # references (world 1) first
        names = [n for n, layout in LAYOUTS.items() if layout.world == world]
        res = torchrun(world, [runner, "--out", str(out), "--data", data, *names])
        assert res.returncode == 0, f"world {world}: {res.stderr[-4000:]}"
    res = subprocess.run(
        [sys.executable, str(REPO / "tests/distributed/compare_layouts.py"), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    for ref in ("tp1", "tp1_tied", "tp1_dpo", "tp1_orpo", "tp1_mixtral", "tp1_lora"):
        result[ref] = json.loads((out / ref / "metrics.json").read_text())
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    (REPO / ".pytest_cache/layout_matrix.json").write_text(json.dumps(result, indent=1))
    result["_out"] = out
    return result


COMPARED = [n for n, layout in LAYOUTS.items() if layout.ref is not None]
FP32 = [n for n in COMPARED if fp32_of(n) is None]
BF16 = [n for n in COMPARED if fp32_of(n) is not None]


LORA_LAYOUTS = [n for n, layout in LAYOUTS.items() if layout.lora is not None]


@pytest.mark.parametrize("name", LORA_LAYOUTS)
def test_lora_trains_only_the_adapters(matrix, name):
    """Base frozen before DDP and the optimizer: only adapter tensors have gradient buffers and
    optimizer state (the distributed optimizer: the DP shards of the adapters add up to them)."""
    counts = json.loads((matrix["_out"] / name / "metrics.json").read_text())["counts"]
    for c in counts:
        # Rank-4 adapters on a hidden-32 model are ~20% of it (at 7B, rank 16: ~0.6%).
        assert 0 < c["adapters"] == c["trainable"] < c["total"] / 3
        assert c["buffered"] == c["trainable"]
    dp = counts[0]["dp"]
    distopt = LAYOUTS[name].parallel.get("use_distributed_optimizer", False)
    total_opt = sum(c["optimizer"] for c in counts)
    assert total_opt * (dp if distopt else 1) == sum(c["trainable"] for c in counts)


@pytest.mark.parametrize("name", FP32)
def test_layout_matches_single_process(matrix, name):
    r = matrix[name]
    assert r["steps"] == 3
    assert r["dtypes"]["params"] == ["float32"]
    assert r["loss"] <= LOSS_ATOL
    assert r["eval_loss"] <= EVAL_ATOL  # forward-only scoring of 12 pairs, same weights
    assert r["metrics"] <= METRIC_ATOL
    assert r["aux_loss"] <= AUX_ATOL
    assert r["grad_norm"] <= GRAD_NORM_RTOL
    if "distopt" not in name:
        assert r["grads"] is not None and r["grads"] <= GRADS_RTOL
    assert r["weights"] <= WEIGHTS_RTOL


# tp1_mixtral: the gradient includes coeff x the router's load-balancing loss at the weight
# moe.py says (pins the aux-loss scaling, which cross-layout equality cannot see).
# Not tp1_dora: DoRA's weight norm is detached (peft, and the paper's section 4.3), so its
# gradient is deliberately not the loss's full derivative.
@pytest.mark.parametrize(
    "ref", ["tp1", "tp1_tied", "tp1_dpo", "tp1_orpo", "tp1_mixtral", "tp1_lora"]
)
def test_reference_gradient_is_the_gradient_of_the_reported_loss(matrix, ref):
    # Central difference along g/|g| with step 1e-3 in fp32: truncation O(eps^2 * curvature)
    # ~1e-6, rounding ~1e-7 * loss / eps ~ 2e-4 absolute on a slope of ~5; 1% relative leaves
    # room and still catches any systematic scale error (a factor 2 is 100%).
    r = matrix[ref]
    assert r["grad_l2"] > 0.1
    # The aux term moves the slope by only 3.7e-4 relative (measured: 7.1537 without it, 7.1562
    # with it, |g| 7.1564), so tp1_mixtral needs 1e-4 (measured 2.3e-5): a missing or
    # mis-scaled aux gradient (Megatron's per-token scaling would be ~20x) then fails.
    rel = 1e-4 if ref == "tp1_mixtral" else 1e-2
    assert r["fd_slope"] == pytest.approx(r["grad_l2"], rel=rel)


@pytest.mark.parametrize("name", [n for n in SWEEP_LAYOUTS if n != "tp1"])
def test_every_objective_matches_single_process_at_pp2_and_tp2_pp2(matrix, name):
    """Each objective and loss variant of layouts.SWEEP (one forward-backward on the first global
    batch, same weights): loss, every reported metric (TRL's names) and the full gradients at PP2
    and TP2 x PP2 against the single process. Same fp32 reduction-order bounds as the training
    steps above; measured on this machine (2-core CPU, 2026-12-03): loss <= 3.6e-7, metrics
    <= 8.9e-7 (dpo-norm's per-token log-ratios), gradients <= 7.8e-7 (dpo, label-smoothed)."""
    sweep = matrix[name]["sweep"]
    assert set(sweep) == set(SWEEP)
    for key, r in sweep.items():
        assert r["loss"] <= LOSS_ATOL, (key, r)
        assert r["metrics"] <= METRIC_ATOL, (key, r)
        assert r["grads"] <= GRADS_RTOL, (key, r)


def test_sweep_objectives_are_not_degenerate(matrix):
    """The sweep's objectives give different losses (none silently falls back to another) and
    the DPO family sees non-zero reference log-ratios."""
    sweep = matrix["tp1"]["sweep"]
    losses = sorted(r["loss"] for r in sweep.values())
    assert min(b - a for a, b in zip(losses, losses[1:])) > 1e-4, losses
    assert abs(sweep["dpo"]["rewards/margins"]) > 1e-3


def test_matrix_covers_required_layouts():
    required = {"tp2", "pp2", "tp2_pp2", "tp2_dp2_sp_distopt", "pp2_vpp2", "dp4"}
    required |= {"tp2_pp2_dpo", "tp2_dp2_orpo"}  # other objectives (issue 14)
    required |= {"pp2_fixed", "pp2_varlen"}  # variable shapes between stages (issue 13)
    required |= {"tp2_sp_qwen3"}  # another family: QK-norm gradients summed over TP (issue 16)
    required |= {"ep2_mixtral", "ep2_tp2_etp1_mixtral", "ep2_pp2_mixtral"}  # experts (issue 16)
    required |= {"tp2_sp_qwen2moe"}  # the shared expert's gate: SP-partial gradient over TP
    assert required <= set(COMPARED)
    assert LAYOUTS["pp2_varlen"].ref == "pp2_fixed"  # variable shapes against today's path
    sp = LAYOUTS["tp2_dp2_sp_distopt"].parallel
    assert sp["sequence_parallel"] and sp["use_distributed_optimizer"]
    bf16 = {"tp1_bf16", "tp2_bf16", "pp2_bf16", "tp2_pp2_bf16", "tp2_dp2_sp_distopt_bf16"}
    assert bf16 <= set(BF16)
    assert LAYOUTS["tp2_dp2_sp_distopt_bf16"].parallel == sp


# bf16 (params, activations and TP/SP/PP communication in bf16; log-probs, loss, gradient
# buffers, main params and Adam in fp32). bf16 keeps 8 significant bits: eps = 2^-8, each rounding
# up to eps/2 = 2e-3 relative. A bf16 layout rounds in other places than the bf16 single process
# (TP: each rank's partial GEMM output is rounded before the sum; SP: reduce-scatters in bf16), so
# they differ by bf16 roundings, not fp32 ones: through 4 layers, forward and backward, a few eps
# in the per-token log-probs, averaged over response tokens and pairs. Measured worst cases on
# this machine (all bf16 layouts; PP alone is bit-identical) are quoted per line; each bound is a
# small multiple of eps that leaves >= 2.5x room, and a real bug (the stale fp32 main params fixed
# with this matrix: losses off by 0.3 from step 2) is orders of magnitude beyond it.
BF16_EPS = 2.0**-8
BF16_LOSS_ATOL = 4 * BF16_EPS  # mean loss over 8 pairs, ~2.5; measured <= 4.8e-3
BF16_EVAL_ATOL = 4 * BF16_EPS  # max over 12 per-pair losses; measured <= 2.2e-3
BF16_METRIC_ATOL = 4 * BF16_EPS  # rewards = 2.5 * logps ~ -9; measured <= 3.5e-3
BF16_GRAD_NORM_RTOL = 2 * BF16_EPS  # measured <= 2.1e-3
# |g - g_ref| / |g_ref| over all step-1 gradients (exported rounded to bf16: <= eps/2 more).
BF16_GRADS_L2_RTOL = 4 * BF16_EPS  # measured <= 4.8e-3
# |w - w_ref| / |w_ref| over all weights after 3 steps, themselves rounded to bf16. Not the
# per-tensor max: elements whose gradient is near zero see bf16's absolute gradient noise (eps x
# the tensor's gradient scale) amplified by lr/adam_eps = 10 (measured up to 3.6e-2 of max|w|).
BF16_WEIGHTS_L2_RTOL = 2 * BF16_EPS  # measured <= 7.7e-4
# Against fp32: the bf16 single process differs from fp32 by the same kind of roundings (its
# measured gaps are quoted), so a bf16 layout is within the sum of both bounds: twice the above.
VS_FP32 = 2  # measured vs fp32: loss 3.5e-3, eval 4.5e-3, metrics 3.6e-3, grad norm 1.1e-3,
# gradients 6.3e-3, weights 1.6e-3


def assert_bf16_close(r: dict, factor: float = 1) -> None:
    assert r["loss"] <= factor * BF16_LOSS_ATOL
    assert r["eval_loss"] <= factor * BF16_EVAL_ATOL
    assert r["metrics"] <= factor * BF16_METRIC_ATOL
    assert r["grad_norm"] <= factor * BF16_GRAD_NORM_RTOL
    if r["grads"] is not None:  # the distributed optimizer shards them
        assert r["grads_l2"] <= factor * BF16_GRADS_L2_RTOL
    assert r["weights_l2"] <= factor * BF16_WEIGHTS_L2_RTOL


@pytest.mark.parametrize("name", BF16)
def test_bf16_layout_matches_bf16_single_process_and_fp32(matrix, name):
    r = matrix[name]
    assert r["steps"] == 3
    assert r["dtypes"]["params"] == ["bfloat16"]  # really bf16 (also: test below)
    if name == "tp1_bf16":  # its reference is fp32 tp1 itself
        assert_bf16_close(r, VS_FP32)
        return
    assert "distopt" in name or r["grads"] is not None
    assert_bf16_close(r)
    assert_bf16_close(r["vs_fp32"], VS_FP32)


@pytest.mark.parametrize("name", BF16)
def test_bf16_accumulates_in_fp32(matrix, name):
    """Under bf16 params: DDP gradient buffers and main_grad (grad_reduce_in_fp32), the
    optimizer's main params, the per-pair log-probs and the loss backward starts from are fp32."""
    d = matrix[name]["dtypes"]
    assert d["params"] == ["bfloat16"]
    for key in ("main_grad", "grad_buffers", "main_params", "loss", "logps"):
        assert d[key] == ["float32"], (key, d[key])


def test_varied_data_has_what_the_matrix_must_compare(tmp_path):
    """The shipped data is the generator's output, survives ``prepare`` at the matrix's
    --seq-length untouched, and its 3 global batches hold the cases layouts handle differently:
    one-token prompts and responses, full-length pairs, non-unit weights, micro-batches of
    different lengths per DP rank, odd lengths that sequence parallelism pads to a TP multiple."""
    sys.path.insert(0, str(REPO / "tools"))
    from make_tiny_pretok_data import make_varied_pairs

    from megatron_simpo.data import Pair, PairBatcher, PreparedPairs
    from megatron_simpo.data.prepare import PrepareOptions, prepare

    train = BASE["train"]
    rows = [json.loads(x) for x in DATA.read_text().splitlines()]
    assert rows == make_varied_pairs(len(rows), seed=0, max_length=train["seq_length"])
    assert len(rows) == train["train_iters"] * train["global_batch_size"]  # all trained on
    opts = PrepareOptions(max_length=train["seq_length"], vocab_size=32)
    prepare(str(DATA), tmp_path / "p", tokenizer=None, opts=opts, quiet=True)
    pairs = list(PreparedPairs(tmp_path / "p"))
    assert pairs == [
        Pair(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]), r["weight"])
        for r in rows
    ]
    assert min(len(p.prompt_ids) for p in pairs) == 1
    assert min(len(p.chosen_ids) for p in pairs) == min(len(p.rejected_ids) for p in pairs) == 1
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    assert longest == train["seq_length"]
    assert all(0.2 <= p.weight <= 3.0 and p.weight != 1.0 for p in pairs)
    # DP2 with SP on TP2 (tp2_dp2_sp_distopt): per rank, micro-batches of different lengths,
    # some of them odd before SP pads them.
    for it in range(train["train_iters"]):
        for rank in range(2):
            kw = dict(global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=2, seed=7)
            raw, _ = PairBatcher(pairs, **kw).micro_batches(it)
            sp, _ = PairBatcher(pairs, pad_multiple=2, **kw).micro_batches(it)
            widths = [mb["tokens"].shape[1] for mb in raw]
            assert [mb["tokens"].shape[1] for mb in sp] == [w + w % 2 for w in widths]
            if it == 0:
                assert len(set(widths)) == 2 and any(w % 2 for w in widths), (rank, widths)


def test_pp2_varlen_sends_shapes_that_vary():
    """``pp2_varlen`` really runs micro-batches of different widths through the pipeline (each
    one pair, padded to its own longest rounded to 4), ``pp2_fixed`` one width per slice."""
    from layouts import config_dict

    from megatron_simpo import parallel
    from megatron_simpo.config import RunConfig
    from megatron_simpo.data import Pair, PairBatcher
    from megatron_simpo.data.batching import padding_for

    rows = [json.loads(x) for x in DATA.read_text().splitlines()]
    pairs = [
        Pair(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]), r["weight"])
        for r in rows
    ]
    widths = {}
    for name in ("pp2_varlen", "pp2_fixed"):
        cfg = RunConfig.from_dict(config_dict(name, str(DATA), None))
        variable = parallel.variable_seq_lengths(cfg)
        assert variable == (name == "pp2_varlen")
        t = cfg.train
        batcher = PairBatcher(
            pairs,
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            dp_rank=0,
            dp_size=1,
            seed=t.seed,
            capacity=t.seq_length,
            **padding_for(cfg.parallel, variable),
        )
        widths[name] = [
            [mb["tokens"].shape[1] for mb in batcher.micro_batches(it)[0]]
            for it in range(t.train_iters)
        ]
    for var, fixed in zip(widths["pp2_varlen"], widths["pp2_fixed"]):
        assert len(set(var)) >= 3 and all(w % 4 == 0 for w in var), var
        assert len(set(fixed)) == 1 and max(var) <= -(-fixed[0] // 4) * 4


@pytest.mark.parametrize("name", ["ep2_mixtral", "ep2_tp2_etp1_mixtral", "ep2_pp2_mixtral"])
def test_expert_load_fraction_matches_single_process(matrix, name):
    """``moe/max_expert_load_fraction`` counts routing decisions (integers) over all ranks'
    tokens: equal to the single process at every step, whatever the layout (an extra forward
    left in the counts, or a token shard counted twice or not at all, changes it)."""

    def history(layout: str) -> list[float]:
        rows = json.loads((matrix["_out"] / layout / "metrics.json").read_text())["history"]
        return [r["moe/max_expert_load_fraction"] for r in rows]

    want = history("tp1_mixtral")
    assert len(want) > 1 and all(0.25 <= x <= 0.5 for x in want)
    assert history(name) == want
