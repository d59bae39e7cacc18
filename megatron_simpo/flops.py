"""Model FLOPs of a SimPO iteration, achieved TFLOP/s and MFU (Megatron-style accounting).

The model is a decoder-only Llama-architecture transformer; only matrix multiplications are
counted (norms, RoPE, SiLU, softmax, the loss and the embedding lookup are a rounding error and
are left out, as in Megatron-LM's ``num_floating_point_operations``). A multiply-add is 2 FLOPs.

For one sequence of ``s`` tokens, with hidden size ``h``, ``L`` layers, ``a`` query heads and
``g`` key/value heads of width ``d``, SwiGLU width ``f`` and padded vocabulary ``V``::

    matmul params per layer  P = h*a*d (query) + 2*h*g*d (key, value) + a*d*h (output)
                                 + 3*h*f (gate, up, down)
    forward                  F = 2*s*(L*P + h*V)            (2 * params * tokens)
                               + L * 2 * (2 * s^2/2 * a*d)  (scores Q K^T and context A V)
    training                 3 * F                          (forward + backward = 2x forward)

For a mixture of experts (``megatron_simpo/shapes.py``), ``P`` counts what one token goes
through: the router ``h*E``, ``k`` of the ``E`` routed experts ``k*3*h*f_e`` and the shared expert
if any; MFU is then the active-parameter MFU, as Megatron-LM counts MoE models (the routed-away
experts do no work for that token). Routing, permutation and all-to-all are not matmuls.

The attention terms count **half** the ``s x s`` square: a causal model's useful work (a query
attends to itself and the keys before it), the way Megatron-LM counts causal self-attention in
its MFU (``num_floating_point_operations``: the core-attention term at ``seq_length / 2``) and
what a causal flash kernel does. So ``mfu`` here is comparable with Megatron-LM's. The unfused
(local-spec) attention computes the full square, masked half included; ``causal=False`` counts
that (the torch FLOP counter test compares it exactly). QKV biases (Qwen2) are additions and are not
counted. SimPO has no reference model, so there is no extra forward pass. Activation
recomputation re-runs forwards but does not change *model* FLOPs (MFU counts useful work only).

Attention cost grows with each sequence's own length, so the iteration's FLOPs are the sum of
the per-sequence costs over the model's *input* positions (a sequence of ``n`` tokens is
``n - 1`` inputs: the last token is only a target), without padding: padding is computed but
is not useful work, so MFU excludes it like it excludes recomputation.

**Prefix sharing** (``--prefix-sharing``) computes the ``q`` shared prompt positions of a pair
once for both sequences (inputs ``q + c`` and ``q + r``), and they are counted once: the dense
term counts ``q + c + r`` tokens, the attention term both sequences' squares less the prompt
block computed once, ``((q + c)^2 + (q + r)^2 - q^2) / 2`` (:func:`shared_pair_forward_flops`).
Like the half square above this is model work, not what a masked kernel runs: SDPA / the local
attention with an explicit packing mask compute the whole ``row x row`` square of a packed row,
masked entries included.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from megatron_simpo.config import ModelConfig
from megatron_simpo.shapes import moe_dims

if TYPE_CHECKING:  # torch only where a device is asked about: the planner imports this module
    import torch

#: Dense (no sparsity) peak TFLOP/s per accelerator, matched against
#: ``torch.cuda.get_device_name()`` in order (first match wins). fp32 means plain fp32 matmuls
#: (torch's default precision "highest", no TF32). Vendor data sheets.
PEAK_TFLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H200", "GH200"), {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (("H100 PCIE",), {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    (("H100 NVL",), {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (("H100", "H800"), {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM
    (("A100", "A800"), {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
]

_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def matmul_params(model: ModelConfig) -> int:
    """Parameters that take part in one token's matrix multiplications (biases and norms
    excluded): every layer's attention and MLP projections plus the output layer (``hidden x
    padded vocab``, counted once even when tied to the input embedding, whose lookup costs no
    FLOPs). For a mixture of experts, the *active* ones: the router ``h x E``, the ``k`` routed
    experts a token goes through and the shared expert (+ its gate), so the MFU built on it
    is the active-parameter MFU (Megatron-LM's MoE accounting)."""
    h, d = model.hidden_size, model.head_size
    a, g = model.num_attention_heads, model.kv_heads
    per_layer = h * a * d + 2 * h * g * d + a * d * h
    moe = moe_dims(model)
    if moe is None:
        per_layer += 3 * h * model.intermediate_size
    else:
        per_layer += h * moe.num_experts + moe.top_k * 3 * h * moe.expert_ffn
        per_layer += 3 * h * moe.shared_ffn + (h if moe.shared_gate else 0)
    return model.num_hidden_layers * per_layer + h * model.padded_vocab_size()


def router_flops_per_token(model: ModelConfig) -> int:
    """Forward FLOPs of the routers for one token (``2 h E`` per layer; 0 for a dense model):
    part of :func:`matmul_params`' count, reported on its own by the planner."""
    moe = moe_dims(model)
    return 0 if moe is None else model.num_hidden_layers * 2 * model.hidden_size * moe.num_experts


def forward_flops(model: ModelConfig, seq_len: int, causal: bool = True) -> int:
    """Forward FLOPs of one sequence of ``seq_len`` tokens (see the module docstring)."""
    s = int(seq_len)
    dense = 2 * s * matmul_params(model)
    # Q K^T: [s, d] x [d, s] per head and A V: [s, s] x [s, d] per head, 2 FLOPs per MAC each.
    attention = model.num_hidden_layers * 2 * (2 * s * s * model.num_attention_heads)
    attention *= model.head_size
    if causal:
        attention //= 2
    return dense + attention


def shared_pair_forward_flops(
    model: ModelConfig, prefix: int, chosen: int, rejected: int, causal: bool = True
) -> int:
    """Forward FLOPs of one pair whose two sequences share ``prefix`` input positions
    (``chosen`` / ``rejected``: their other input positions); see the module docstring.
    With ``prefix == 0`` this is the cost of the two sequences computed apart."""
    q, c, r = int(prefix), int(chosen), int(rejected)
    dense = 2 * (q + c + r) * matmul_params(model)
    square = (q + c) ** 2 + (q + r) ** 2 - q**2
    attention = model.num_hidden_layers * 2 * 2 * square * model.num_attention_heads
    attention *= model.head_size
    if causal:
        attention //= 2
    return dense + attention


def training_flops(model: ModelConfig, seq_lens: Iterable[int], causal: bool = True) -> int:
    """Model FLOPs of one training iteration: 3x the forward FLOPs of every sequence.

    Args:
        model: the model shape.
        seq_lens: input positions (without padding) of each sequence of the iteration, over all
            micro-batches and data-parallel ranks (a pair contributes two sequences:
            prompt+chosen and prompt+rejected).
        causal: count half of the attention square (the default: Megatron-LM's causal
            accounting) instead of all of it (what unfused attention computes).
    """
    return 3 * sum(forward_flops(model, s, causal) for s in seq_lens)


def pairs_training_flops(
    model: ModelConfig,
    chosen_inputs: Iterable[int],
    rejected_inputs: Iterable[int],
    shared_prefix: Iterable[int],
    causal: bool = True,
) -> int:
    """Model FLOPs of one training iteration from its pairs: 3x the forward FLOPs of each.

    Args:
        model: the model shape.
        chosen_inputs, rejected_inputs: input positions of each pair's two sequences (prompt +
            response - 1), without padding.
        shared_prefix: prompt positions of each pair computed once for both (prefix sharing),
            else 0.
        causal: as in :func:`training_flops`.
    """
    return 3 * sum(
        shared_pair_forward_flops(model, q, c - q, r - q, causal)
        for c, r, q in zip(chosen_inputs, rejected_inputs, shared_prefix, strict=True)
    )


def peak_tflops_for(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense peak TFLOP/s of the named accelerator in ``dtype`` (None if not in the table)."""
    key = _DTYPE_NAMES.get(str(dtype))
    name = device_name.upper()
    for patterns, peaks in PEAK_TFLOPS:
        if any(p in name for p in patterns):
            return peaks.get(key) if key else None
    return None


def detect_peak_tflops(dtype: torch.dtype) -> float | None:
    """Peak TFLOP/s of this process's CUDA device in ``dtype`` (A100, H100, H200 families);
    None on CPU or on a device not in :data:`PEAK_TFLOPS` (then set ``--peak-tflops``)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops_for(torch.cuda.get_device_name(), dtype)


def tflops_per_gpu(flops: float, seconds: float, n_gpus: int) -> float:
    """Achieved model TFLOP/s per accelerator."""
    return flops / seconds / n_gpus / 1e12


def mfu(flops: float, seconds: float, n_gpus: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of ``n_gpus`` devices
    (a fraction in [0, 1] for a correct peak)."""
    return tflops_per_gpu(flops, seconds, n_gpus) / peak_tflops
