"""Monitoring: FLOP accounting vs torch's FLOP counter on the real Megatron model, drift alarms,
the PNG dashboard, the progress reporter, and TensorBoard events read back against
``metrics.jsonl`` after a real training run."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_gloo

from megatron_simpo.alarms import DriftMonitor
from megatron_simpo.config import LoggingConfig, ModelConfig
from megatron_simpo.data import Pair
from megatron_simpo.data.packing import attention_mask_from, collate_packed, per_sequence_rope
from megatron_simpo.errors import DataError
from megatron_simpo.flops import (
    detect_peak_tflops,
    forward_flops,
    matmul_params,
    mfu,
    pairs_training_flops,
    peak_tflops_for,
    shared_pair_forward_flops,
    tflops_per_gpu,
    training_flops,
)
from megatron_simpo.plot import load_run, plot_runs
from megatron_simpo.progress import Progress, progress

TRL_NAMES = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "lr",
    "grad_norm",
]

# Two shapes that exercise every term: GQA with head_dim != hidden/heads, an untied output layer
# and a vocabulary that needs padding; MHA with tied embeddings.
FLOP_MODELS = {
    "gqa_untied": ModelConfig(
        vocab_size=100,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=64,
        make_vocab_size_divisible_by=64,
    ),
    "mha_tied": ModelConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        make_vocab_size_divisible_by=16,
        tie_word_embeddings=True,
    ),
}
SEQ_LENS = [7, 13, 20]  # different lengths: attention cost is per sequence, not per batch
#: A pair for prefix sharing: prompt of 6 tokens (5 shared input positions), chosen 4, rejected 7.
SHARED_PAIR = Pair(tuple(range(3, 9)), (9, 10, 11, 12), (13, 14, 15, 16, 17, 18, 19))
SHARED_INPUTS = (5, 4, 7)  # shared prompt positions, chosen and rejected branch positions


# ---------------------------------------------------------------- FLOPs


def _count_flops_worker(rank, world, out_path):
    """Builds the real Megatron-Core GPT model of each config (single process) and counts the
    FLOPs torch dispatches for forward + backward of each sequence."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_simpo import parallel
    from megatron_simpo.config import RunConfig
    from megatron_simpo.model import build_model

    parallel.init_distributed()  # CPU compatibility layer (the gloo world exists already)
    counts = {}
    for name, model_cfg in FLOP_MODELS.items():
        cfg = RunConfig()
        cfg.model = model_cfg
        cfg.train.precision = "fp32"
        # Megatron's unfused attention: its baddbmm/bmm are visible to the counter. (The default
        # CPU backend, SDPA, runs one fused kernel that torch's counter has no formula for;
        # the model FLOPs are the same by definition.)
        cfg.train.attention_backend = "local"
        parallel.init_model_parallel(1, 1, None, seed=0)
        (model,) = build_model(cfg)
        with FlopCounterMode(display=False) as counter:
            for s in SEQ_LENS:
                ids = torch.randint(0, model_cfg.vocab_size, (1, s))
                logits = model(ids, torch.arange(s)[None], None)  # [1, s, padded vocab]
                logits.float().square().mean().backward()
        counts[name] = {
            "total": counter.get_total_flops(),
            "ops": {str(k): v for k, v in counter.get_flop_counts()["Global"].items()},
        }
        # One prefix-shared row [P[:-1] | P[-1] C[:-1] | P[-1] R[:-1]], with its packing mask
        # and per-sequence RoPE, as --prefix-sharing runs it.
        mb = collate_packed([SHARED_PAIR], capacity=64, prefix_sharing=True, pack=False)
        mask = attention_mask_from(mb["segment_ids"], mb["branch_ids"])
        with FlopCounterMode(display=False) as counter:
            with per_sequence_rope(model, mb["position_ids"]):
                logits = model(mb["tokens"], mb["position_ids"], mask)
            logits.float().square().mean().backward()
        counts[name]["shared"] = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        parallel.destroy_model_parallel()
    Path(out_path).write_text(json.dumps(counts))


def test_training_flops_equal_torch_flop_counter_on_the_megatron_model(tmp_path):
    out = tmp_path / "counts.json"
    run_gloo(1, _count_flops_worker, str(out))
    counts = json.loads(out.read_text())
    for name, model_cfg in FLOP_MODELS.items():
        counted = counts[name]
        # The counter sees every matmul torch runs: linear layers (aten.mm) and the unfused
        # attention of the local spec (baddbmm for Q K^T over the full s x s square, bmm for
        # A V), forward and backward. Norms, RoPE, SiLU, softmax and the embedding lookup are
        # not matmuls and are counted by neither side, so the counts must agree exactly; the
        # backward of every matmul is 2x its forward (the embedding weight needs the first
        # layer's input gradient), which is where the formula's 3x comes from.
        assert set(counted["ops"]) <= {"aten.mm", "aten.bmm", "aten.baddbmm", "aten.addmm"}
        full = training_flops(model_cfg, SEQ_LENS, causal=False)  # the whole square
        assert counted["total"] == full, name
        # and the attention part alone (the only term quadratic in s) agrees too.
        attention = counted["ops"].get("aten.bmm", 0) + counted["ops"].get("aten.baddbmm", 0)
        dense = 3 * 2 * sum(SEQ_LENS) * matmul_params(model_cfg)
        assert attention == full - dense > 0
        # The default (Megatron-LM's causal accounting) counts half of that square.
        assert 2 * (training_flops(model_cfg, SEQ_LENS) - dense) == attention
        # Prefix sharing: the dense work is that of the prompt once plus both branches, exactly
        # the formula's dense term; the masked kernel computes the whole row x row square, the
        # formula counts the two sequences' squares less the shared prompt block (module
        # docstring of flops.py), which is less than the row square and more than either alone.
        shared = counted["shared"]
        q, c, r = SHARED_INPUTS
        formula = pairs_training_flops(model_cfg, [q + c], [q + r], [q], causal=False)
        shared_dense = 3 * 2 * (q + c + r) * matmul_params(model_cfg)
        assert shared["aten.mm"] == shared_dense
        kernel_square = shared["aten.bmm"] + shared["aten.baddbmm"]
        per_entry = 3 * model_cfg.num_hidden_layers * 4 * model_cfg.num_attention_heads
        per_entry *= model_cfg.head_size
        assert kernel_square == per_entry * (q + c + r) ** 2
        assert formula - shared_dense == per_entry * ((q + c) ** 2 + (q + r) ** 2 - q**2)
        assert formula < training_flops(model_cfg, [q + c, q + r], causal=False)  # padded path


def test_shared_pair_flops_without_a_prefix_are_two_sequences():
    m = FLOP_MODELS["gqa_untied"]
    assert shared_pair_forward_flops(m, 0, 9, 4) == forward_flops(m, 9) + forward_flops(m, 4)
    # q = 5 shared positions, branches of 4 and 7: dense over 16 tokens; attention squares
    # 9^2 + 12^2 - 5^2 = 200 (vs 81 + 144 = 225 unshared), per layer 2 (QK^T, AV) * 2 FLOPs
    # * heads * head_dim.
    params = matmul_params(m)
    want = 2 * 16 * params + 2 * 2 * 2 * 200 * 6 * 24
    assert shared_pair_forward_flops(m, 5, 4, 7, causal=False) == want
    causal = 2 * 16 * params + 2 * 2 * 2 * 100 * 6 * 24  # half the squares
    assert shared_pair_forward_flops(m, 5, 4, 7) == causal
    assert pairs_training_flops(m, [9, 7], [12, 3], [5, 0]) == 3 * (
        causal + forward_flops(m, 7) + forward_flops(m, 3)
    )


@pytest.mark.parametrize("pack", [False, True])
def test_prefix_shared_token_counts_are_what_is_computed(pack):
    """``tokens`` counts the prompt once per prefix-shared pair; ``tokens_effective`` counts it
    for both sequences, as the padded layout computes them."""
    from megatron_simpo.batch_loss import token_counts
    from megatron_simpo.data import collate

    rng = np.random.default_rng(8)
    pairs = [
        Pair(
            tuple(rng.integers(3, 30, rng.integers(1, 9))),
            tuple(rng.integers(3, 30, rng.integers(1, 7))),
            tuple(rng.integers(3, 30, rng.integers(1, 7))),
        )
        for _ in range(7)
    ]
    pairs.append(Pair(tuple(range(3, 17)), (3,) * 9, (4,) * 8))  # too long to share a row
    mb = collate_packed(pairs, capacity=24, prefix_sharing=True, pack=pack)
    padded = collate(pairs, 30)
    tokens, effective = (x.item() for x in token_counts(mb))
    assert effective == token_counts(padded)[0].item() == token_counts(padded)[1].item()
    assert effective == sum(
        2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
    )
    # The rows hold exactly the computed input positions: each sequence's tokens but its last
    # (one per sequence, 2 per pair), the shared prompt positions once.
    assert tokens - 2 * len(pairs) == int((mb["segment_ids"] > 0).sum())
    shared = mb["shared_prefix"].tolist()
    if pack:  # the long pair does not fit one row of 24: split into plain sequences
        assert shared[-1] == 0
    else:
        assert shared[-1] == len(pairs[-1].prompt_ids) - 1
    assert shared[:-1] == [len(p.prompt_ids) - 1 for p in pairs[:-1]]
    assert tokens < effective


def test_flop_formula_terms():
    m = FLOP_MODELS["gqa_untied"]
    # By hand: per layer q 96*144 + k,v 2*96*48 + o 144*96 + mlp 3*96*160; output 96*128.
    params = 2 * (96 * 144 + 2 * 96 * 48 + 144 * 96 + 3 * 96 * 160) + 96 * 128
    s = 10
    attention = 2 * 2 * 2 * s * s * 144  # layers * (QK^T + AV) * 2 FLOPs/MAC * s^2 * heads*dim
    assert forward_flops(m, s, causal=False) == 2 * s * params + attention
    assert forward_flops(m, s) == 2 * s * params + attention // 2  # causal: Megatron-LM's count
    assert training_flops(m, [s, s]) == 6 * forward_flops(m, s)


def test_peak_tflops_table_and_mfu():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert peak_tflops_for("NVIDIA H200", torch.bfloat16) == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB", torch.float16) == 312.0
    assert peak_tflops_for("NVIDIA A100 80GB PCIe", torch.float32) == 19.5
    assert peak_tflops_for("Tesla T4", torch.bfloat16) is None
    if not torch.cuda.is_available():
        assert detect_peak_tflops(torch.bfloat16) is None
    # 8 GPUs doing 4e15 FLOPs in 2 s: 250 TFLOP/s each, a quarter of a 1000 TFLOP/s peak.
    assert tflops_per_gpu(4e15, 2.0, 8) == pytest.approx(250.0)
    assert mfu(4e15, 2.0, 8, 1000.0) == pytest.approx(0.25)


# ---------------------------------------------------------------- alarms


def feed_evals(monitor, chosen, accuracy):
    """Warnings per evaluation (iteration 10, 20, ...)."""
    return [
        monitor.update(10 * (i + 1), {"eval/rewards/chosen": c, "eval/rewards/accuracies": a})
        for i, (c, a) in enumerate(zip(chosen, accuracy))
    ]


def test_displacement_alarm_fires_once_and_again_after_recovery():
    monitor = DriftMonitor.from_config(
        LoggingConfig(alarm_evals=3, alarm_flat_accuracy=0.02, alarm_logp_drop=0.5)
    )
    # Both rewards sliding down with accuracy stuck around 0.60 (moves 0.01 < 0.02): falls at
    # evals 2, 3, 4 -> fires at eval 4; still falling at 5, 6 -> silent; rises at 7 (clears);
    # falls at 8, 9, 10 -> fires again.
    chosen = [0.0, -0.1, -0.2, -0.3, -0.4, -0.5, -0.2, -0.3, -0.35, -0.5]
    acc = [0.60, 0.61, 0.60, 0.61, 0.60, 0.60, 0.60, 0.61, 0.60, 0.605]
    warnings = feed_evals(monitor, chosen, acc)
    fired = [i for i, w in enumerate(warnings) if w]
    assert fired == [3, 9]
    assert all(len(w) <= 1 for w in warnings)
    msg = warnings[3][0]
    assert "likelihood displacement" in msg and "iteration 40" in msg and "-0.3000" in msg


@pytest.mark.parametrize(
    "chosen, acc",
    [
        ([0.0, 0.1, 0.15, 0.3, 0.4, 0.5], [0.6] * 6),  # chosen rising
        # SimPO's usual healthy picture: both rewards fall while the pairs separate.
        ([0.0, -0.1, -0.2, -0.3, -0.4, -0.5], [0.60, 0.63, 0.66, 0.70, 0.72, 0.75]),
        ([0.0, -0.1, -0.2, -0.1, -0.2, -0.3], [0.6] * 6),  # never 3 falls in a row
    ],
)
def test_displacement_alarm_stays_quiet_on_healthy_curves(chosen, acc):
    monitor = DriftMonitor(evals=3, flat_accuracy=0.02, logp_drop=0.5)
    assert feed_evals(monitor, chosen, acc) == [[]] * len(chosen)


def test_chosen_logp_drop_alarm():
    monitor = DriftMonitor(evals=3, flat_accuracy=0.02, logp_drop=0.5)
    logps = [-1.0, -1.2, -1.4, -1.6, -1.7, -1.3, -1.8, -0.9]
    fired = [
        i for i, lp in enumerate(logps) if monitor.update(i + 1, {"logps/chosen": lp, "loss": 1.0})
    ]
    assert fired == [3, 6]  # below -1.5 at -1.6; cleared at -1.3; below again at -1.8
    # train and eval keys in one dict: both conditions are checked
    both = DriftMonitor(evals=1, flat_accuracy=0.02, logp_drop=0.1)
    both.update(
        1, {"logps/chosen": -1.0, "eval/rewards/chosen": 0.0, "eval/rewards/accuracies": 0.5}
    )
    out = both.update(
        2, {"logps/chosen": -1.5, "eval/rewards/chosen": -0.1, "eval/rewards/accuracies": 0.5}
    )
    assert len(out) == 2 and "displacement" in out[0] and "log-prob drop" in out[1]


def test_chosen_logp_drop_alarm_reads_the_per_token_mean_of_summed_objectives():
    """DPO/CPO log ``logps/chosen`` summed (TRL); the alarm's nats are per token: it must read
    ``logps/chosen_mean`` (a summed log-prob falling by 5 is 0.05 per token here)."""
    monitor = DriftMonitor(evals=3, flat_accuracy=0.02, logp_drop=0.5)
    first = {"logps/chosen": -100.0, "logps/chosen_mean": -1.0}
    assert not monitor.update(1, first)
    assert not monitor.update(2, {"logps/chosen": -105.0, "logps/chosen_mean": -1.05})
    out = monitor.update(3, {"logps/chosen": -105.0, "logps/chosen_mean": -1.6})
    assert len(out) == 1 and "logps/chosen_mean is -1.6" in out[0]


# ---------------------------------------------------------------- plot


def write_metrics(path: Path, n: int, seed: int, eval_every: int = 5) -> Path:
    """A synthetic run: ``n`` train records, eval records every ``eval_every`` iterations."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    lines = []
    for it in range(1, n + 1):
        rec = {
            "iteration": it,
            "loss": 1.3 - 0.01 * it + 0.05 * rng.standard_normal(),
            "rewards/chosen": -7 - 0.02 * it,
            "rewards/rejected": -7 - 0.05 * it,
            "rewards/margins": 0.03 * it,
            "rewards/accuracies": min(1.0, 0.5 + 0.01 * it),
            "logps/chosen": -3.5 - 0.01 * it,
            "logps/rejected": -3.5 - 0.025 * it,
            "length/chosen": 3.0,
            "length/rejected": 2.5,
            "lr": 1e-3,
            "grad_norm": 3.0 + rng.random(),
            "tokens_per_sec": 1000 + 50 * rng.random(),
        }
        lines.append(json.dumps(rec))
        if it % eval_every == 0:
            ev = {"iteration": it, "eval/loss": 1.2, "eval/rewards/accuracies": 0.6 + 0.005 * it}
            lines.append(json.dumps(ev))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_plot_draws_the_per_token_logp_of_summed_objectives(tmp_path):
    """DPO/CPO runs log ``logps/chosen`` summed and ``logps/chosen_mean`` per token: the
    per-token panel draws the mean; a SimPO run (no ``_mean``) draws ``logps/chosen``."""
    from megatron_simpo.plot import series_key

    simpo = load_run(write_metrics(tmp_path / "simpo", 3, seed=0))
    dpo_dir = tmp_path / "dpo"
    dpo_dir.mkdir()
    (dpo_dir / "metrics.jsonl").write_text(
        '{"iteration": 1, "logps/chosen": -90.0, "logps/chosen_mean": -1.1}\n'
    )
    dpo = load_run(dpo_dir)
    spec = "logps/chosen_mean|logps/chosen"
    assert series_key(simpo, spec) == "logps/chosen"
    assert series_key(dpo, spec) == "logps/chosen_mean"
    plot_runs([simpo.path.parent, dpo_dir], tmp_path / "mixed.png")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_overlays_runs_into_a_png(tmp_path):
    import matplotlib.image as mpimg

    write_metrics(tmp_path / "run_a" / "tb", 40, seed=0)  # the make-demo layout: RUN/tb/
    b = write_metrics(tmp_path / "run_b", 25, seed=1)  # a --tensorboard-dir itself
    with (b / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 25, "loss": 9.0}\n')  # resumed after a crash: logged again
        f.write('{"iteration": 26, "loss"')  # a run still writing: truncated last line
    run_a = load_run(tmp_path / "run_a")
    assert run_a.label == "run_a" and run_a.series["eval/loss"][0] == [
        5,
        10,
        15,
        20,
        25,
        30,
        35,
        40,
    ]
    its, losses = load_run(b).series["loss"]
    assert its == list(range(1, 26)) and losses[-1] == 9.0  # the later record wins
    one = plot_runs([tmp_path / "run_a"], tmp_path / "one.png")
    two = plot_runs([tmp_path / "run_a", b], tmp_path / "out" / "two.png", smooth=0.6)
    for p in (one, two):
        # 4 x 3 panels of 5.2 x 3.4 inches at 100 dpi
        assert png_size(p) == (1560, 1360) and p.stat().st_size > 50_000
        assert mpimg.imread(p)[..., :3].std() > 0.05  # not a blank canvas
    # the second run adds visible curves
    assert np.abs(mpimg.imread(one) - mpimg.imread(two)).mean() > 1e-3


def test_plot_errors_name_the_directory(tmp_path):
    with pytest.raises(DataError, match="no metrics.jsonl nor tb/metrics.jsonl"):
        plot_runs([tmp_path], tmp_path / "x.png")
    with pytest.raises(DataError, match="does not exist"):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text(
        '{"iteration": 1}\nnot json\n{"iteration": 2}\n'
    )
    with pytest.raises(DataError, match="line 2: not JSON"):
        plot_runs([tmp_path / "bad"], tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no metrics"):
        plot_runs([tmp_path / "empty"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_never_floods_a_log(monkeypatch):
    monkeypatch.delenv("MEGATRON_SIMPO_PROGRESS", raising=False)
    log = io.StringIO()
    assert sum(progress(range(1000), "evaluate", unit="batch", stream=log)) == 499500
    assert log.getvalue() == ""  # short job, log file: silent
    log = io.StringIO()
    for _ in progress(range(5), "evaluate", unit="batch", stream=log, interval=0):
        pass
    lines = log.getvalue().splitlines()
    assert len(lines) == 6 and lines[2].startswith("evaluate 3/5 batch (60%)")
    assert lines[-1].startswith("evaluate 5/5") and lines[-1].endswith("done")
    tty = FakeTTY()
    with Progress("convert", total=None, unit="tensor", stream=tty, interval=0) as bar:
        bar.wrap(lambda: None)()
    assert tty.getvalue().startswith("\r") and tty.getvalue().endswith("done\n")
    monkeypatch.setenv("MEGATRON_SIMPO_PROGRESS", "0")
    off = FakeTTY()
    list(progress(range(3), "x", stream=off, interval=0))
    assert off.getvalue() == ""


# ---------------------------------------------------------------- TensorBoard


def jsonl_scalars(tb: Path) -> dict[str, dict[int, float]]:
    """Every finite numeric value of metrics.jsonl as ``{key: {iteration: value}}``."""
    out: dict[str, dict[int, float]] = {}
    for line in (tb / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        it = rec.pop("iteration")
        for k, v in rec.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                assert it not in out.get(k, {}), f"{k} logged twice at iteration {it}"
                out.setdefault(k, {})[it] = v
    return out


def test_tensorboard_events_match_metrics_jsonl(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    expected = jsonl_scalars(tiny_run)
    tb_tags = set(acc.Tags()["scalars"])
    assert set(TRL_NAMES) <= tb_tags
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"} <= tb_tags
    # The same keys in both places, whatever keys the trainer adds.
    assert tb_tags == set(expected)
    for tag, values in expected.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == sorted(values), tag
        # TensorBoard stores scalars as float32; metrics.jsonl keeps the float64: equal after
        # rounding the jsonl value to float32, exactly.
        assert [e.value for e in events] == [float(np.float32(values[s])) for s in sorted(values)]
    assert sorted(expected["eval/loss"]) == [2, 3]
    health = {"skipped_iters", "memory/peak_gib", "tflops_per_gpu", "model_flops"}
    health |= {f"length/{s}_{m}" for s in ("chosen", "rejected") for m in ("min", "max")}
    assert health <= tb_tags
    assert sorted(expected["gen/mean_length"]) == [2, 3]  # the generation probe
    assert {"gen/repetition", "gen/eos_fraction"} <= tb_tags
    for it in (1, 2, 3):
        assert expected["length/chosen_min"][it] <= expected["length/chosen"][it]
        assert expected["length/chosen"][it] <= expected["length/chosen_max"][it]
        assert expected["memory/peak_gib"][it] > 0 and expected["skipped_iters"][it] == 0
    texts = acc.Tensors("gen/texts/text_summary")
    assert [t.step for t in texts] == [2, 3] and b"**1.**" in texts[0].tensor_proto.string_val[0]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    config = json.loads(text.strip().strip("`"))
    assert config["train"]["train_iters"] == 3 and config["model"]["hidden_size"] == 64

    # The dashboard of the real run renders.
    png = plot_runs([tiny_run.parent], tiny_run.parent / "dash.png")
    assert png_size(png) == (1560, 1360)


def test_plot_cli(tmp_path, capsys):
    from megatron_simpo.cli import main  # in-process: the parser and the error path, no startup

    write_metrics(tmp_path / "a", 10, seed=0)
    write_metrics(tmp_path / "b", 12, seed=1)
    fig = tmp_path / "fig.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(fig)]) == 0
    assert png_size(fig) == (1560, 1360)
    assert main(["plot", str(tmp_path / "nothing"), "--output", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-simpo: error: plot:") and "does not exist" in err


def test_mfu_of_llama3_8b_against_a_float64_hand_computation():
    """Megatron-LM's MFU formula for a causal decoder, written out in float64 for Llama 3 8B
    (GQA 32/8 heads of 128, SwiGLU 14336, vocab 128256; no padding of the vocabulary): one
    training iteration of a pair with a shared 700-token prompt and responses of 300 and 500
    tokens, prompt counted once, attention half the square; 8 GPUs, 12 s, 989 TFLOP/s peak."""
    from megatron_simpo.config import ModelConfig

    m = ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        make_vocab_size_divisible_by=128,
    )
    h, L, f, V, a, g, d = 4096.0, 32.0, 14336.0, 128256.0, 32.0, 8.0, 128.0
    q, c, r = 700.0 - 1, 300.0, 500.0  # inputs: the prompt's last token is each branch's own
    per_layer = h * a * d + 2 * h * g * d + a * d * h + 3 * h * f
    dense = 2 * (q + c + r) * (L * per_layer + h * V)
    square = ((q + c) ** 2 + (q + r) ** 2 - q**2) / 2  # causal: half, shared block once
    attention = L * 2 * 2 * square * a * d
    want = 3 * (dense + attention)
    got = pairs_training_flops(m, [int(q + c)], [int(q + r)], [int(q)])
    assert got == pytest.approx(want, rel=1e-12)  # integers vs float64: exact up to rounding
    assert mfu(got, 12.0, 8, 989.0) == pytest.approx(want / 12.0 / 8 / 989e12, rel=1e-12)


def _throughput_worker(rank, world):
    from megatron_simpo import parallel
    from megatron_simpo.report import throughput_and_memory

    parallel.init_distributed()
    model = FLOP_MODELS["gqa_untied"]
    # Rank r's pairs: response lengths differ per rank, so each extreme comes from one rank.
    pairs = {
        r: [Pair(tuple(range(3, 8 + r)), (5,) * (2 + 3 * r), (6,) * (4 - r)) for _ in range(2)]
        for r in range(world)
    }
    local = {
        r: collate_packed(p, capacity=32, prefix_sharing=True, pack=True) for r, p in pairs.items()
    }
    flops_of = {
        r: pairs_training_flops(
            model,
            (mb["seq_tokens"][:2] - 1).tolist(),
            (mb["seq_tokens"][2:] - 1).tolist(),
            mb["shared_prefix"].tolist(),
        )
        for r, mb in local.items()
    }
    for tp in (1, 2):  # DP2: FLOPs summed over both ranks; TP2 (DP1): this rank's only
        parallel.init_model_parallel(tp, 1, None, seed=0)
        out = throughput_and_memory(model, [local[rank]], 2.0, None)
        expected = sum(flops_of.values()) if tp == 1 else flops_of[rank]
        assert out["model_flops"] == expected, (tp, out["model_flops"], expected)
        # Lengths: the worst over the world, whatever the layout.
        assert out["length/chosen_max"] == 5 and out["length/chosen_min"] == 2
        assert out["length/rejected_max"] == 4 and out["length/rejected_min"] == 3
        assert out["memory/peak_gib"] > 0
        parallel.destroy_model_parallel()


def test_throughput_reductions_at_dp2_and_tp2():
    """One gather serves both reductions of ``throughput_and_memory``: FLOPs summed over the
    data-parallel group only, lengths and memory maxed over the world."""
    run_gloo(2, _throughput_worker)
