"""Bugs that only show on a GPU, caught on the CPU (issue 12's four definite bugs).

1. Device placement: the builder's CUDA path is run with the ``meta`` device standing in for the
   GPU (``torch.cuda.is_available`` true, every CUDA device request sent to ``meta`` instead of
   the CPU layer's CPU), so anything the builder leaves on the CPU shows, and a forward/backward
   on ``meta`` fails at the first tensor created without a device.
2. ``--load`` of a checkpoint without Transformer Engine's ``_extra_state`` (what the converter
   writes) into a model whose modules have extra state; a missing real weight is still refused.
3. fp16: the gradient the optimizer steps with equals the fp32 run's (the dynamic loss scale is
   applied in backward and removed by the optimizer).
4. Fusion flags: each on only where its kernel is importable.

The checks that need Megatron's process groups share one single-rank gloo world (one spawn for
the module); the fusion checks are pure.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext

import pytest
import torch
from conftest import run_cli, run_gloo
from torch.overrides import TorchFunctionMode

from megatron_simpo import model as model_lib
from megatron_simpo.config import RunConfig

MODEL = {
    "vocab_size": 32,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "make_vocab_size_divisible_by": 8,  # no padding rows: vocab 32
    # Larger than Llama's 0.02 so that gradients are far from zero and differences show.
    "initializer_range": 0.1,
}


def _cfg(**train) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": MODEL,
            "train": {"precision": "fp32", "seed": 5, "global_batch_size": 3, **train},
            "optim": {"lr": 1e-2, "lr_warmup_iters": 0, "clip_grad": 0.0},
        }
    )


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a CUDA device index


class _CudaToMeta(TorchFunctionMode):
    """Sends every CUDA device request to ``meta`` (entered above the CPU layer's CUDA->CPU
    mode, which then never sees one): whatever lands on the CPU was never asked for CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0].to("meta")
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "meta"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "meta", *args[2:])
        return func(*args, **kwargs)


@contextmanager
def _meta_as_cuda():
    """The code's CUDA path (``is_available``, device 0), with ``meta`` as the GPU."""
    saved = torch.cuda.is_available, torch.cuda.current_device
    torch.cuda.is_available = lambda: True
    torch.cuda.current_device = lambda: 0
    try:
        with _CudaToMeta():
            yield torch.device("meta")
    finally:
        torch.cuda.is_available, torch.cuda.current_device = saved


def _placement(cfg: RunConfig) -> dict:
    """Where each tensor of the built model went, and whether a meta forward/backward runs."""
    from megatron_simpo.data.packing import attention_mask_from, per_sequence_rope

    with _meta_as_cuda() as meta:
        (chunk,) = model_lib.build_model(cfg)
        tensors = {
            **dict(chunk.named_parameters()),
            **dict(chunk.named_buffers()),
            "rotary_pos_emb.inv_freq": chunk.rotary_pos_emb.inv_freq,
        }
        out = {
            "count": len(tensors),
            "off_device": sorted(f"{k} on {v.device}" for k, v in tensors.items() if v.is_cpu),
            "norm_sp_tag": [
                hasattr(m.weight, "sequence_parallel")
                for m in chunk.modules()
                if isinstance(m, model_lib.SequenceParallelRMSNorm)
            ],
        }
        try:
            rows, s = 4, 12
            tokens = torch.empty(rows, s, dtype=torch.long, device=meta)
            segments = torch.empty(rows, s, dtype=torch.long, device=meta)
            packed = cfg.train.pack_pairs
            mask = attention_mask_from(segments, segments) if packed else None
            with per_sequence_rope(chunk, tokens) if packed else nullcontext():
                logits = chunk(tokens, tokens, mask)
            logits.sum().backward()
            out["forward"] = [list(logits.shape), logits.device.type]
        except Exception as e:  # the mismatch the check exists to catch
            out["forward"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


class ExtraStateNorm(model_lib.SequenceParallelRMSNorm):
    """A norm with ``_extra_state``, as Transformer Engine's modules have (FP8 metadata)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = torch.tensor([3.0, 1.0])
        self.loaded_extra: torch.Tensor | None = None

    def get_extra_state(self) -> torch.Tensor:
        return self.extra

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.loaded_extra = state


def _weights(chunk) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in chunk.state_dict().items() if torch.is_tensor(v)}


def _extra_state_loads(tmp: str) -> dict:
    from pathlib import Path

    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_simpo import checkpointing

    tmp = Path(tmp)
    cfg = _cfg(attention_backend="sdpa")
    (plain,) = model_lib.build_model(cfg)
    checkpointing.save_checkpoint(tmp / "plain", 0, [plain])  # no extra state: the converter's
    saved = model_lib.SequenceParallelRMSNorm
    model_lib.SequenceParallelRMSNorm = ExtraStateNorm
    try:
        torch.manual_seed(99)  # other random weights than the checkpoint's
        (te_like,) = model_lib.build_model(cfg)
        (te_like2,) = model_lib.build_model(cfg)
    finally:
        model_lib.SequenceParallelRMSNorm = saved
    norms = [m for m in te_like.modules() if isinstance(m, ExtraStateNorm)]
    out: dict = {"norms_with_extra_state": len(norms)}
    try:
        checkpointing.load_checkpoint(tmp / "plain", [te_like])
        ref, got = _weights(plain), _weights(te_like)
        out["into_extra_state"] = {
            "same_keys": sorted(ref) == sorted(k for k in got if not k.endswith("_extra_state")),
            "max_abs_diff": max((ref[k] - got[k]).abs().max().item() for k in ref),
            "extra_state_kept": all(n.loaded_extra is None for n in norms),
        }
    except (Exception, CheckpointException) as e:  # torch's derives from BaseException
        out["into_extra_state"] = f"{type(e).__name__}: {str(e)[:500]}"
    # Round trip with extra state: it is saved and restored, not skipped.
    for n in norms:
        n.extra = torch.tensor([7.0, float(len(n.weight))])
    checkpointing.save_checkpoint(tmp / "with_extra", 0, [te_like])
    try:
        checkpointing.load_checkpoint(tmp / "with_extra", [te_like2])
        out["round_trip_extra"] = [
            n.loaded_extra.tolist() for n in te_like2.modules() if isinstance(n, ExtraStateNorm)
        ]
    except (Exception, CheckpointException) as e:
        out["round_trip_extra"] = f"{type(e).__name__}: {str(e)[:500]}"
    # A checkpoint without one real weight (a norm's) is refused, by name.
    state = {"model": te_like.sharded_state_dict()}
    del state["model"]["decoder.final_layernorm.weight"]
    (tmp / "holed").mkdir()
    dist_checkpointing.save(state, tmp / "holed")
    try:
        checkpointing.load_checkpoint(tmp / "holed", [te_like2])
        out["missing_weight"] = "loaded"
    except (Exception, CheckpointException) as e:
        out["missing_weight"] = f"{type(e).__name__}: {e}"
    return out


def _record_stepped_gradients(optimizer) -> list[torch.Tensor]:
    """A list that gets, at each inner torch optimizer step, the gradient it steps with (what
    the Megatron optimizer left after unscaling and clipping), flat and float64."""
    seen: list[torch.Tensor] = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = part.optimizer

        def step(*args, _inner=inner, _step=inner.step, **kwargs):
            params = [p for group in _inner.param_groups for p in group["params"]]
            seen.append(torch.cat([p.grad.double().flatten() for p in params]))
            return _step(*args, **kwargs)

        inner.step = step
    return seen


def _fp16_gradients() -> dict:
    """One SimPO step in fp32 and in fp16 from the same weights on the same micro-batch: the
    gradient each optimizer steps with, and how far each step moved the weights."""
    from megatron_simpo.data import Pair, collate
    from megatron_simpo.optim import build_optimizer
    from megatron_simpo.step import train_step

    g = torch.Generator().manual_seed(7)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(1, MODEL["vocab_size"], (n,), generator=g).tolist())

    # Uneven lengths, a one-token response, non-unit weights.
    pairs = [
        Pair(ids(3), ids(4), ids(1), 1.0),
        Pair(ids(5), ids(1), ids(6), 0.5),
        Pair(ids(2), ids(7), ids(3), 2.0),
    ]
    batch = collate(pairs, 12)
    out: dict = {}
    weights = None
    for precision in ("fp32", "fp16"):
        cfg = _cfg(attention_backend="sdpa", precision=precision, micro_batch_size=3)
        (chunk,) = model_lib.build_model(cfg)
        if weights is None:
            weights = _weights(chunk)
        else:
            # Cast to fp16; strict=False only for the None-valued _extra_state entries.
            chunk.load_state_dict(weights, strict=False)
        model = model_lib.wrap_ddp([chunk], cfg)
        optimizer, scheduler = build_optimizer(cfg, model)
        seen = _record_stepped_gradients(optimizer)
        before = torch.cat([p.detach().double().flatten() for p in chunk.parameters()])
        # fp16's dynamic loss scale starts high and halves on overflow (the update is skipped,
        # the weights untouched): the same batch again until a step goes through.
        tries = 0
        while tries < 30:
            tries += 1
            metrics = train_step(model, optimizer, scheduler, [batch], 12, cfg.loss, 32)
            if metrics["update_ok"]:
                break
        after = torch.cat([p.detach().double().flatten() for p in chunk.parameters()])
        out[precision] = {
            "tries": tries,
            "grad": seen[-1].tolist() if seen else None,
            "update_norm": (after - before).norm().item(),
            "loss_scale": float(optimizer.get_loss_scale()),
        }
    return out


def _worker(rank: int, world: int, tmp: str) -> None:
    from megatron_simpo import parallel

    parallel.init_distributed()  # the CPU compatibility layer (the gloo world exists)
    parallel.init_model_parallel(1, 1, None, seed=5)
    facts = {
        "placement": {
            "sdpa": _placement(_cfg(attention_backend="sdpa")),
            "local_untied": _placement(
                RunConfig.from_dict(
                    {
                        "model": {**MODEL, "tie_word_embeddings": False},
                        "train": {"attention_backend": "local", "precision": "fp32"},
                    }
                )
            ),
            "packed": _placement(_cfg(attention_backend="sdpa", pack_pairs=True)),
        }
    }
    facts["extra_state"] = _extra_state_loads(tmp)
    facts["fp16"] = _fp16_gradients()
    with open(f"{tmp}/facts.json", "w") as f:
        json.dump(facts, f)


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_readiness")
    run_gloo(1, _worker, str(tmp))
    return json.loads((tmp / "facts.json").read_text())


@pytest.mark.parametrize("spec", ["sdpa", "local_untied", "packed"])
def test_every_parameter_and_buffer_is_on_the_model_device(facts, spec):
    got = facts["placement"][spec]
    assert got["count"] > 10  # embeddings, 2 layers of norms and linears, final norm, RoPE
    assert got["off_device"] == []
    assert got["norm_sp_tag"] and all(got["norm_sp_tag"])  # SP-tagged on the device
    # A forward and backward on the device: no tensor on the model path is created elsewhere.
    assert got["forward"] == [[4, 12, 32], "meta"], got["forward"]


def test_model_device_is_the_cpu_without_cuda():
    if torch.cuda.is_available():
        assert model_lib.model_device() == torch.device("cuda", torch.cuda.current_device())
    else:
        assert model_lib.model_device() == torch.device("cpu")


def test_load_tolerates_absent_extra_state(facts):
    got = facts["extra_state"]
    assert got["norms_with_extra_state"] == 5  # 2 layers x 2 norms + final norm
    into = got["into_extra_state"]
    assert isinstance(into, dict), into
    # Loaded exactly: the same tensors, bit for bit; the modules' own extra state untouched.
    assert into["same_keys"] and into["max_abs_diff"] == 0.0 and into["extra_state_kept"]


def test_extra_state_round_trips(facts):
    assert facts["extra_state"]["round_trip_extra"] == [[7.0, 32.0]] * 5


def test_load_still_refuses_a_missing_weight(facts):
    message = facts["extra_state"]["missing_weight"]
    assert message.startswith("CheckpointError: --load "), message  # one line, no traceback
    assert "has no decoder.final_layernorm.weight, which this model needs (1 missing)" in message


def test_fp16_steps_with_the_true_gradient(facts):
    fp32, fp16 = facts["fp16"]["fp32"], facts["fp16"]["fp16"]
    assert fp32["tries"] == 1 and fp16["tries"] < 30
    assert fp32["loss_scale"] == 1.0 and fp16["loss_scale"] > 1.0
    a, b = torch.tensor(fp32["grad"]), torch.tensor(fp16["grad"])
    # fp16 activations (10-bit mantissa) against fp32: ~1e-3 relative on the whole gradient
    # (measured 1.25e-3, after 5 tries at scales 2**16 .. 2**13). Without the loss scale applied
    # in backward the optimizer divides the true gradient by the scale: a relative error of 1.0.
    assert ((a - b).norm() / a.norm()).item() < 2e-2
    # The step moves the weights as far as fp32's (measured 1.4225 vs 1.4221; Adam's first step
    # is nearly lr * sign(g), so only a gradient far below eps, as without the fix, shrinks it:
    # 0.0101 then).
    assert fp16["update_norm"] == pytest.approx(fp32["update_norm"], rel=2e-2)


def test_fp16_overflow_skips_do_not_count_towards_the_abort():
    from megatron_simpo.optim import is_loss_scale_search

    assert is_loss_scale_search({"loss": 1.3, "loss_scale": 8192.0})
    assert not is_loss_scale_search({"loss": 1.3, "loss_scale": 1.0})  # at its minimum
    assert not is_loss_scale_search({"loss": float("nan"), "loss_scale": 8192.0})
    assert not is_loss_scale_search({"loss": 1.3})  # fp32 / bf16: no loss scale


def test_fp16_training_run_finds_its_loss_scale_and_learns(tmp_path):
    """The real entry point: the first iterations overflow at the initial scale 2**16 and are
    skipped while the scale comes down, more of them than --max-skipped-iters; then every update
    goes through with finite gradient norms."""
    tb = tmp_path / "tb"
    args = ["train", "--config", "examples/tiny_pretok.yaml", "--precision", "fp16"]
    args += ["--train-iters", "8", "--max-skipped-iters", "2", "--tensorboard-dir", str(tb)]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tb / "metrics.jsonl").read_text().splitlines()]
    ok = [r["update_ok"] for r in rows]
    first = ok.index(1.0)
    assert 2 < first and ok[first:] == [1.0] * (len(rows) - first), ok
    scales = [r["loss_scale"] for r in rows]
    assert scales[0] <= 2.0**16 and scales == sorted(scales, reverse=True) and scales[-1] > 1.0
    assert rows[-1]["skipped_iters"] == first
    grad_norms = [r["grad_norm"] for r in rows[first:]]
    assert all(0.1 < g < 100 for g in grad_norms), grad_norms  # true norms (~1-10), not 1e-8


def _kernels(**on) -> model_lib.Kernels:
    names = ("cuda", "fused_softmax", "wgrad_accumulation", "te_rope", "compiler")
    return model_lib.Kernels(**{n: on.get(n, False) for n in names})


FLAGS = (
    "masked_softmax_fusion",
    "gradient_accumulation_fusion",
    "apply_rope_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "persist_layer_norm",
)


def test_every_fusion_is_off_on_the_cpu():
    every = _kernels(fused_softmax=True, wgrad_accumulation=True, te_rope=True, compiler=True)
    for mask in (False, True):
        assert model_lib.fusion_flags(every, explicit_mask=mask) == dict.fromkeys(FLAGS, False)


@pytest.mark.parametrize(
    ("kernel", "flags"),
    [
        (None, ()),  # CUDA without apex, TE or triton: nothing fused
        ("fused_softmax", ("masked_softmax_fusion",)),
        ("wgrad_accumulation", ("gradient_accumulation_fusion",)),
        ("te_rope", ("apply_rope_fusion",)),
        ("compiler", ("bias_activation_fusion", "bias_dropout_fusion")),
    ],
)
def test_each_fusion_follows_its_kernel(kernel, flags):
    kernels = _kernels(cuda=True, **({kernel: True} if kernel else {}))
    got = model_lib.fusion_flags(kernels, explicit_mask=False)
    assert got == {f: f in flags for f in FLAGS}


def test_an_explicit_mask_turns_off_the_softmax_and_rope_fusions():
    every = _kernels(
        cuda=True, fused_softmax=True, wgrad_accumulation=True, te_rope=True, compiler=True
    )
    got = model_lib.fusion_flags(every, explicit_mask=True)
    assert [f for f in FLAGS if got[f]] == [
        "gradient_accumulation_fusion",
        "bias_activation_fusion",
        "bias_dropout_fusion",
    ]


def test_thd_packing_keeps_rope_fused_only_with_tes_thd_kernel():
    """Packed rows as THD sequences (Transformer Engine) take no explicit mask: the RoPE fusion
    stays on where TE's THD RoPE kernel exists (``fused_apply_rotary_pos_emb_thd``)."""
    every = _kernels(cuda=True, te_rope=True, compiler=True)
    assert not model_lib.fusion_flags(every, explicit_mask=False, thd=True)["apply_rope_fusion"]
    thd = model_lib.Kernels(**{**vars(every), "te_rope_thd": True})
    assert model_lib.fusion_flags(thd, explicit_mask=False, thd=True)["apply_rope_fusion"]
    assert not model_lib.fusion_flags(thd, explicit_mask=True)["apply_rope_fusion"]


def test_available_kernels_reads_what_imports(monkeypatch):
    importable = {"scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_lib, "have_transformer_engine", lambda: False)
    monkeypatch.setattr(model_lib, "_importable", lambda name: name in importable)
    # scaled_softmax_cuda missing: the three softmax extensions ship together, so none is used.
    assert model_lib.available_kernels() == _kernels(cuda=True)
    importable |= {"scaled_softmax_cuda", "fused_weight_gradient_mlp_cuda"}
    assert model_lib.available_kernels() == _kernels(
        cuda=True, fused_softmax=True, wgrad_accumulation=True
    )


def test_bf16_local_attention_on_cuda_without_apex_has_no_fused_softmax(monkeypatch):
    """The issue's case: ``--attention-backend local`` in bf16 on CUDA without apex."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_lib, "have_transformer_engine", lambda: False)
    monkeypatch.setattr(model_lib, "_importable", lambda name: False, raising=False)
    conf = model_lib.transformer_config(_cfg(attention_backend="local", precision="bf16"))
    assert conf.bf16 and not conf.masked_softmax_fusion
    assert not any(getattr(conf, f) for f in FLAGS)
