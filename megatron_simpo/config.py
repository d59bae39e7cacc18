"""One typed configuration tree for a SimPO run.

Every field is documented by the string under it; that docstring is also the CLI help.
YAML files (``--config FILE``, one section per dataclass: ``model``, ``parallel``, ``loss``,
``optim``, ``train``, ``data``, ``logging``) and command-line flags (``--field-name``,
Megatron-LM's names where one exists) are thin layers over it: flags override the file.
:meth:`RunConfig.validate` checks every combination that can be checked before any
process-group work and names the flag to fix.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from megatron_simpo import families
from megatron_simpo.errors import ConfigError
from megatron_simpo.families.base import LAYER_OPTIONS

#: The ``ModelConfig`` fields of mixture-of-experts models (not written for dense ones).
MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "shared_expert_intermediate_size",
)
#: MoE fields that are left out of an exported ``config.json`` when None.
_OPTIONAL_MOE_FIELDS = ("moe_intermediate_size", "shared_expert_intermediate_size")


@dataclass
class ModelConfig:
    """Llama-architecture model shape, in Hugging Face ``config.json`` terms."""

    model_type: str = "llama"
    """HF family, one of megatron_simpo/families: 'llama' (Llama 2/3/3.1/3.2), 'mistral' (no
    sliding window), 'qwen2', 'qwen3' (dense), 'mixtral', 'qwen3_moe', 'qwen2_moe' (mixture of
    experts)."""
    qkv_bias: bool = False
    """Biases on the query/key/value projections (Qwen2; set from the family at import)."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3; Megatron-Core's
    ``qk_layernorm``; set from the family at import)."""
    num_experts: int | None = None
    """Mixture of experts: routed experts per layer (HF ``num_local_experts`` for Mixtral,
    ``num_experts`` for Qwen3-MoE); None: a dense MLP."""
    num_experts_per_tok: int = 2
    """Mixture of experts: experts each token is routed to (top-k)."""
    moe_intermediate_size: int | None = None
    """Mixture of experts: width of one expert's SwiGLU MLP; None: ``intermediate_size``
    (Mixtral)."""
    norm_topk_prob: bool = True
    """Mixture of experts: renormalise the k selected router probabilities to sum to 1 (Mixtral
    always; Qwen3-MoE's config field); false keeps the softmax over all experts."""
    shared_expert_intermediate_size: int | None = None
    """Mixture of experts: width of the shared expert, a SwiGLU MLP every token goes through
    besides its routed experts (Qwen2-MoE); None: no shared expert."""
    shared_expert_gate: bool = False
    """The shared expert's output scaled by ``sigmoid(x . w)``, ``w`` a learnt ``[hidden]``
    vector (Qwen2-MoE's ``shared_expert_gate``; set from the family at import)."""
    vocab_size: int = 256
    """Number of real tokens in the vocabulary (before padding for tensor parallelism)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 128
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 4
    """Number of transformer layers."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_key_value_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means equal to query heads."""
    head_dim: int | None = None
    """Width of one attention head; None means hidden_size / num_attention_heads."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is built for."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the RMSNorm layers."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict | None = None
    """HF ``rope_scaling`` dict; only Llama-3 style (``rope_type: llama3``) is supported."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the output layer."""
    initializer_range: float = 0.02
    """Std of the normal init for fresh (not loaded) weights."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (padded rows never score). Unlike Megatron-LM
    the padding does not grow with TP, so one checkpoint loads at every TP size that divides the
    padded vocabulary (all powers of two up to this value)."""

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelConfig:
        """Reads a Hugging Face Llama ``config.json`` (file or its directory).

        Accepts both ``rope_theta``/``rope_scaling`` (transformers 4) and ``rope_parameters``
        (transformers 5). Refuses what this model cannot reproduce exactly.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            raw = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read the model config {p}: {e}") from None
        family = families.check_hf_config(raw, str(p))
        raw = {family.aliases.get(k, family.renames.get(k, k)): v for k, v in raw.items()}
        raw.update(family.options())
        raw.update(family.moe_fixed)
        params = dict(raw.get("rope_parameters") or {})
        if params:
            raw.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
            if params.get("rope_type", "default") != "default":
                raw["rope_scaling"] = params
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names and v is not None})

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def expert_ffn_size(self) -> int:
        """Width of one expert's MLP (MoE models)."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    def to_hf_config(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """``config.json`` of the equivalent HF model: ``base`` (the one recorded at import)
        updated with this config's fields."""
        out: dict[str, Any] = dict(base or {})
        family = families.get(self.model_type)
        out.update(architectures=[family.architecture], model_type=self.model_type)
        out.update(family.hf_fixed)
        back = {v: k for k, v in family.renames.items()}
        # Layer options are the family's, not HF config fields.
        skip = {"make_vocab_size_divisible_by", *LAYER_OPTIONS, *family.moe_fixed}
        if self.num_experts is None:
            skip |= set(MOE_FIELDS)
        skip |= {f for f in _OPTIONAL_MOE_FIELDS if getattr(self, f) is None}
        for f in fields(self):
            if f.name not in skip:
                out[back.get(f.name, f.name)] = getattr(self, f.name)
        out["num_key_value_heads"] = self.kv_heads
        out["head_dim"] = self.head_size
        # Both spellings: transformers 5 reads rope_parameters, 4 reads rope_theta/rope_scaling.
        params = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            params = {**self.rope_scaling, "rope_theta": self.rope_theta}
        out["rope_parameters"] = params
        return out


@dataclass
class ParallelConfig:
    """How the model and the batch are split over ranks (data parallel = world / (TP x PP))."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (splits heads, MLP and vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (splits layers)."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size (EP, mixture-of-experts models): each EP rank holds
    num_experts / EP experts; tokens reach them by all-to-all. EP ranks are carved out of the
    data-parallel ranks (dense layers stay data-parallel over them)."""
    expert_tensor_parallel_size: int | None = None
    """Tensor-parallel size inside each expert (ETP); None: the --tensor-model-parallel-size
    (Megatron-Core's default). ETP 1 with TP > 1 keeps experts whole."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Layers per virtual pipeline stage (interleaved schedule); None disables it."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in the non-tensor-parallel regions (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state (and fp32 master weights) over data-parallel ranks."""
    overlap_grad_reduce: bool = True
    """With --use-distributed-optimizer: reduce-scatter each gradient bucket as soon as the
    last micro-batch's backward has filled it, overlapped with the rest of backward (Megatron's
    DDP); --no-overlap-grad-reduce reduces after backward. No effect without it."""
    overlap_param_gather: bool = True
    """With --use-distributed-optimizer: all-gather the updated parameters bucket by bucket in
    the next forward (forward pre-hooks) instead of at the end of the optimizer step;
    --no-overlap-param-gather gathers in the step. No effect without it."""
    distributed_timeout_minutes: int = 10
    """Timeout of collectives, so a dead rank surfaces as an error instead of a hang."""
    variable_seq_lengths: bool = True
    """Pipeline parallelism: stages send each micro-batch's shape before its activations
    (Megatron-Core's ``variable_seq_lengths``), so a micro-batch is padded only to its own longest
    sequence (rounded up to --pipeline-pad-multiple); --no-variable-seq-lengths pads every
    micro-batch to the longest of the rank's slice (fixed shapes, as before)."""
    pipeline_pad_multiple: int = 64
    """With --variable-seq-lengths under pipeline parallelism: micro-batch widths are rounded up
    to a multiple of this (fewer distinct shapes for kernels and the allocator), never beyond
    --seq-length."""


#: gamma / beta when neither --gamma-beta-ratio nor --simpo-gamma is given: the SimPO
#: reference code's default (gamma 0.5 at its default beta 2.0). The one definition.
DEFAULT_GAMMA_BETA_RATIO = 0.25


#: ``--loss`` choices (``megatron_simpo.loss.OBJECTIVES``; kept here so config imports no torch).
OBJECTIVE_NAMES = ("simpo", "dpo", "ipo", "dpo-hinge", "dpo-norm", "cpo", "orpo")
#: ``--beta`` when not given: SimPO's 2.0 (the SimPO code's default), TRL's 0.1 for the others.
DEFAULT_BETA = {"simpo": 2.0}
DEFAULT_BETA_OTHERS = 0.1
#: ``--loss-type`` values each objective accepts (the first is the default).
LOSS_TYPES = {"simpo": ("sigmoid", "hinge"), "cpo": ("sigmoid", "hinge", "ipo")}
#: CLI spelling of fields whose flag is not ``--field-name`` (the field name's spelling also works).
FLAG_NAMES = {"objective": "--loss", "data_path": "--data"}


@dataclass
class LossConfig:
    """The preference objective (see ``megatron_simpo/loss.py`` and the README's objectives)."""

    objective: Literal["simpo", "dpo", "ipo", "dpo-hinge", "dpo-norm", "cpo", "orpo"] = "simpo"
    """Objective (flag --loss): simpo; the DPO family from precomputed reference log-probs
    (dpo, ipo, dpo-hinge, dpo-norm; run `megatron-simpo score-reference` first); the
    reference-free cpo and orpo."""
    beta: float | None = None
    """Reward scale / temperature (SimPO: r = beta * mean log-prob; DPO/CPO: TRL's beta; ORPO:
    the odds-ratio weight lambda, TRL's beta). Default: 2.0 for simpo, 0.1 (TRL's) otherwise."""
    gamma_beta_ratio: float | None = None
    """SimPO's target margin as gamma / beta (reference-code convention). If neither this nor
    --simpo-gamma is set: 0.25, the SimPO code's default (gamma 0.5 at beta 2)."""
    simpo_gamma: float | None = None
    """SimPO's absolute target margin gamma (TRL's convention); exclusive with
    --gamma-beta-ratio."""
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    """Preference loss of --loss simpo (sigmoid, hinge) and cpo (sigmoid, hinge, ipo: TRL's
    CPOTrainer loss_type); the DPO family picks it by name (--loss dpo-hinge, --loss ipo)."""
    label_smoothing: float = 0.0
    """Conservative (label-smoothed) sigmoid loss, in [0, 0.5): simpo and cpo with the sigmoid
    loss, dpo, dpo-norm."""
    sft_weight: float = 0.0
    """Weight of an NLL term on the chosen responses for simpo and the DPO family (the SimPO
    code's sft_weight; RPO for DPO); its reduction is --sft-reduction. CPO and ORPO have their
    own: --cpo-alpha, --orpo-alpha."""
    sft_reduction: Literal["token", "pair"] = "token"
    """NLL term (--sft-weight, --cpo-alpha, --orpo-alpha): 'token' pools it over all chosen tokens
    of the global batch (TRL and the SimPO code; long responses weigh more); 'pair' averages each
    pair's per-token mean NLL over pairs (every pair weighs the same). Pair weights apply to
    both."""
    cpo_alpha: float | None = None
    """Weight of CPO's NLL term on the chosen responses (TRL's cpo_alpha; default 1.0)."""
    orpo_alpha: float | None = None
    """Weight of ORPO's NLL term (default 1.0, which TRL's ORPOTrainer fixes; the odds-ratio
    term's lambda is --beta, as in TRL)."""

    @property
    def resolved_beta(self) -> float:
        """--beta, or the objective's default (the only place it is defined)."""
        if self.beta is not None:
            return self.beta
        return DEFAULT_BETA.get(self.objective, DEFAULT_BETA_OTHERS)

    @property
    def gamma(self) -> float:
        """SimPO's absolute margin gamma (the only place the default margin is defined)."""
        if self.simpo_gamma is not None:
            return self.simpo_gamma
        ratio = self.gamma_beta_ratio
        return self.resolved_beta * (DEFAULT_GAMMA_BETA_RATIO if ratio is None else ratio)

    @property
    def nll_weight(self) -> float:
        """Weight of the objective's NLL term of the chosen responses."""
        if self.objective == "cpo":
            return 1.0 if self.cpo_alpha is None else self.cpo_alpha
        if self.objective == "orpo":
            return 1.0 if self.orpo_alpha is None else self.orpo_alpha
        return self.sft_weight

    @property
    def needs_reference(self) -> bool:
        """True for the DPO family (its loss reads the reference model's log-probs)."""
        return self.objective in ("dpo", "ipo", "dpo-hinge", "dpo-norm")

    def validate(self) -> None:
        """Refuses impossible combinations; each ConfigError names the flag."""
        obj = self.objective
        if obj not in OBJECTIVE_NAMES:
            raise ConfigError(f"--loss must be one of {', '.join(OBJECTIVE_NAMES)}, got {obj!r}")
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        types_ok = LOSS_TYPES.get(obj, ("sigmoid",))
        if self.loss_type not in types_ok:
            hint = (
                {
                    "hinge": "; for DPO with the hinge loss use --loss dpo-hinge",
                    "ipo": "; for IPO with a reference use --loss ipo",
                }.get(self.loss_type, "")
                if self.needs_reference
                else ""
            )
            raise ConfigError(
                f"--loss-type {self.loss_type} does not apply to --loss {obj} (it takes "
                f"{' / '.join(types_ok)}){hint}"
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        smoothable = obj in ("dpo", "dpo-norm") or (
            obj in ("simpo", "cpo") and self.loss_type == "sigmoid"
        )
        if self.label_smoothing and not smoothable:
            what = f"--loss {obj}" + (f" --loss-type {self.loss_type}" if obj in LOSS_TYPES else "")
            raise ConfigError(
                f"--label-smoothing is not defined for {what}; it applies to the sigmoid losses "
                "(simpo, cpo with --loss-type sigmoid, dpo, dpo-norm)"
            )
        if obj != "simpo":
            for flag, value in (
                ("--gamma-beta-ratio", self.gamma_beta_ratio),
                ("--simpo-gamma", self.simpo_gamma),
            ):
                if value is not None:
                    raise ConfigError(
                        f"{flag} is SimPO's margin; it does not apply to --loss {obj}"
                    )
        if self.gamma_beta_ratio is not None and self.simpo_gamma is not None:
            raise ConfigError(
                "--gamma-beta-ratio and --simpo-gamma both set: give exactly one "
                "(gamma = gamma_beta_ratio * beta, or the absolute --simpo-gamma)"
            )
        if self.sft_reduction not in ("token", "pair"):
            raise ConfigError(
                f"--sft-reduction must be 'token' or 'pair', got {self.sft_reduction!r}"
            )
        if self.sft_weight < 0:
            raise ConfigError(f"--sft-weight must be >= 0, got {self.sft_weight}")
        if self.sft_weight and obj in ("cpo", "orpo"):
            raise ConfigError(
                f"--sft-weight does not apply to --loss {obj}: its NLL weight is --{obj}-alpha"
            )
        for name, value in (("cpo", self.cpo_alpha), ("orpo", self.orpo_alpha)):
            if value is None:
                continue
            if value < 0:
                raise ConfigError(f"--{name}-alpha must be >= 0, got {value}")
            if obj != name:
                raise ConfigError(f"--{name}-alpha applies to --loss {name} only, not {obj}")


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine decay and gradient clipping."""

    lr: float = 1e-6
    """Peak learning rate (SimPO papers: 3e-7 to 1e-6)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    lr_warmup_iters: int = 0
    """Linear warmup iterations."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to --min-lr at --train-iters."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""


@dataclass
class TrainConfig:
    """Batching, length of the run, precision, checkpoints."""

    micro_batch_size: int = 1
    """Pairs per micro-batch per data-parallel rank (each pair is 2 sequences)."""
    global_batch_size: int = 8
    """Pairs per optimizer step over all ranks (published SimPO runs: 128)."""
    train_iters: int = 10
    """Optimizer steps to run."""
    seq_length: int = 1024
    """Longest prompt+response sequence accepted (tokens)."""
    seed: int = 1234
    """Seed for init, data order and dropout."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Model dtype: 'auto' is bf16 on CUDA, fp32 on CPU. Log-probs are always fp32. fp16 uses a
    dynamic loss scale (from 2**16, halved on overflow; those skipped updates do not count towards
    --max-skipped-iters)."""
    moe_aux_loss_coeff: float = 0.0
    """Mixture of experts: weight of the router's load-balancing loss (Switch-Transformer style,
    Megatron-Core's ``aux_loss``), added to the objective as this weight x its mean over
    micro-batches, summed over MoE layers, and logged as ``moe/aux_loss``; 0 (default, as
    transformers' fine-tuning without output_router_logits) turns it off."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recompute (passed to Megatron-Core's TransformerConfig)."""
    recompute_method: Literal["uniform", "block"] | None = None
    """How layers are grouped for full recompute."""
    recompute_num_layers: int | None = None
    """Layers per recompute group (full recompute)."""
    attention_backend: Literal["auto", "sdpa", "local", "te", "flex"] = "auto"
    """Core attention: 'te' (Transformer Engine), 'sdpa' (torch scaled_dot_product_attention,
    fused kernels, no TE needed), 'flex' (SDPA, with prefix-shared rows through torch
    FlexAttention block masks; CUDA), 'local' (Megatron's unfused reference); 'auto' is te when
    TE is installed and CUDA present, else sdpa; with --prefix-sharing, flex on CUDA where it
    works, else sdpa with the dense mask (the reason is logged)."""
    fused_loss_head: bool | None = None
    """Compute the output layer and the vocab-parallel log-probs together, chunk by chunk of
    tokens (recomputed in backward), never materialising the [tokens x vocab/TP] logits. Default
    (unset): on where its modelled peak memory is below the unfused head's (always in fp32; in
    bf16/fp16 above ~0.6 x --loss-chunk-size + hidden_size tokens per micro-batch; see
    megatron_simpo/defaults.py); --no-fused-loss-head turns it off."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the fused loss head (peak extra memory ~ chunk x vocab/TP x 4 bytes)."""
    pack_pairs: bool | None = None
    """Pack several pairs per row up to --seq-length, first-fit-decreasing. Default (unset): on
    with every attention backend (sdpa/local: an explicit block mask; Transformer Engine: THD
    sequences through PackedSeqParams); --no-pack-pairs turns it off."""
    prefix_sharing: bool | None = None
    """One row per pair: [prompt | chosen | rejected], rejected attends to the prompt, not to
    chosen. Default (unset): on with the sdpa and local backends, off with Transformer Engine
    (its THD path is causal per sequence; pairs are packed without sharing there);
    --no-prefix-sharing turns it off."""
    load: str | None = None
    """Checkpoint directory to start from (weights; optimizer and iteration if present)."""
    save: str | None = None
    """Directory for checkpoints."""
    save_interval: int | None = None
    """Save every N iterations (and at the end) when --save is set."""
    exit_interval: int | None = None
    """Stop (after saving, if --save) once the iteration count is a multiple of N."""
    exit_duration_in_mins: float | None = None
    """Stop (after saving, if --save) once the run has lasted this long."""
    keep_last: int | None = None
    """Keep only the newest K checkpoints under --save (None keeps all)."""
    async_save: bool | None = None
    """Write checkpoints in a background process (Megatron-Core dist_checkpointing async save)
    while training goes on; a checkpoint is published (renamed, tracker updated) once every rank
    has written it, at the latest before the next save or the exit. Default (unset): on with
    CUDA, off on CPU/gloo (works there, but a fork per save outweighs small saves)."""
    fully_parallel_save: bool | None = None
    """Spread the writing of replicated shards over the data-parallel ranks (Megatron-Core's
    FullyParallelSaveStrategyWrapper) instead of each shard's first replica writing it.
    Default (unset): on (a no-op at data-parallel size 1)."""
    max_skipped_iters: int = 10
    """Abort after this many consecutive iterations whose loss or gradient norm was not finite
    (each such update is skipped, counted in ``skipped_iters`` and logged)."""
    slurm_requeue: bool = False
    """Under Slurm: after a stop by SIGTERM/SIGUSR1 or --exit-duration-in-mins (checkpoint
    written), rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` so the job continues later."""


@dataclass
class DataConfig:
    """Preference data (see ``megatron_simpo/data``)."""

    data_path: str | None = None
    """JSONL / JSON / Parquet file, datasets.save_to_disk or prepared directory, or Hub name."""
    data_split: str | None = None
    """Split of a DatasetDict directory or Hub dataset (default 'train')."""
    data_schema: Literal["auto", "text", "conversational", "pretokenized"] = "auto"
    """Row schema; 'auto' detects it per row."""
    tokenizer: str | None = None
    """HF tokenizer directory for text data (default: the one saved with the --load checkpoint)."""
    max_length: int | None = None
    """Truncate prompt + response to this many tokens (default: --seq-length)."""
    max_prompt_length: int | None = None
    """Cut prompts to this many tokens first when a pair is too long (default: max_length/2)."""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """Which end of a long prompt to keep ('keep_end' its end, 'keep_start' its start)."""
    truncation_rule: Literal["trl", "trl-1", "fill"] = "trl"
    """Over-long pairs: 'trl' = TRL<=0.27/SimPO (prompt to --max-prompt-length, responses to
    max_length - max_prompt_length); 'trl-1' = TRL>=0.28 (prompt kept, responses fill the rest);
    'fill' = prompt cut as 'trl' keeping BOS, responses fill the rest."""
    skip_invalid: bool = False
    """Skip invalid rows (counted in the summary) instead of stopping at the first."""
    keep_ties: bool = False
    """Keep pairs whose chosen and rejected are identical (dropped by default)."""
    num_workers: int = 1
    """Processes for tokenisation (datasets.map num_proc)."""
    data_cache_dir: str | None = None
    """Prepared-data cache (default $MEGATRON_SIMPO_CACHE or ~/.cache/megatron-simpo)."""
    eval_data_path: str | None = None
    """Held-out pairs evaluated every --eval-interval iterations."""
    eval_split_ratio: float = 0.0
    """Hold out this fraction of --data-path instead (seeded by --seed)."""


@dataclass
class LoggingConfig:
    """Where and how often metrics go."""

    log_interval: int = 1
    """Print (and write) metrics every N iterations."""
    eval_interval: int | None = None
    """Evaluate on the held-out set every N iterations (and at the end); None disables."""
    eval_iters: int | None = None
    """Held-out global batches per evaluation (None: all held-out pairs)."""
    tensorboard_dir: str | None = None
    """TensorBoard event files and metrics.jsonl go here."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one accelerator for MFU (default: detected for A100/H100/H200 in
    the model dtype; on CPU MFU is reported only when this is set)."""
    alarm_evals: int = 3
    """Drift alarm: warn when eval rewards/chosen fell this many evaluations in a row while
    eval accuracy stayed flat (likelihood displacement)."""
    alarm_flat_accuracy: float = 0.02
    """Drift alarm: accuracy counts as flat when it moved less than this over those evals."""
    alarm_logp_drop: float = 0.5
    """Drift alarm: warn when the chosen mean log-prob fell by more than this (nats per token)
    below its first logged value."""
    gen_interval: int | None = None
    """Generation probe: every N iterations greedy-decode a few held-out prompts and log the
    mean generated length and a repetition score (None disables)."""
    gen_prompts: int = 4
    """Generation probe: number of fixed held-out prompts."""
    gen_max_new_tokens: int = 32
    """Generation probe: longest continuation generated."""


#: ``--lora-target`` names: Megatron's module names and Hugging Face's projection names, each
#: mapped to the HF projections (the per-projection adapters of a fused QKV / gate-up).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "proj": ("o_proj",),
    "fc1": ("gate_proj", "up_proj"),
    "fc2": ("down_proj",),
    **{name: (name,) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{name: (name,) for name in ("gate_proj", "up_proj", "down_proj")},
}
LORA_TARGETS["all"] = tuple(dict.fromkeys(p for v in LORA_TARGETS.values() for p in v))


@dataclass
class LoraConfig:
    """LoRA / DoRA adapters on the frozen base (``megatron_simpo/adapters.py``)."""

    lora_rank: int | None = None
    """Rank of the LoRA adapters; set to train adapters only (the base is frozen). Unset: full
    fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapter output is multiplied by alpha / rank (peft's
    ``lora_alpha``)."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (peft's ``lora_dropout``)."""
    lora_target: str = "all"
    """Comma-separated modules to adapt: qkv, proj, fc1, fc2 (Megatron) or q_proj, k_proj, v_proj,
    o_proj, gate_proj, up_proj, down_proj (Hugging Face), or 'all'."""
    dora: bool = False
    """DoRA (weight-decomposed LoRA, peft's ``use_dora``): a trained magnitude per output row over
    the direction of the merged weight."""

    def hf_targets(self) -> tuple[str, ...]:
        """The HF projections adapted (``--lora-target`` expanded), in model order."""
        names = [t.strip() for t in self.lora_target.split(",") if t.strip()]
        unknown = [t for t in names if t not in LORA_TARGETS]
        if unknown or not names:
            raise ConfigError(
                f"--lora-target {self.lora_target!r}: unknown module(s) {unknown}; choose from "
                + ", ".join(LORA_TARGETS)
            )
        chosen = {p for t in names for p in LORA_TARGETS[t]}
        return tuple(p for p in LORA_TARGETS["all"] if p in chosen)

    def validate(self) -> None:
        """Checks the LoRA flags (nothing to check when --lora-rank is unset, except --dora)."""
        if self.lora_rank is None:
            if self.dora:
                raise ConfigError("--dora needs --lora-rank R (DoRA is a LoRA variant)")
            return
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ConfigError(f"--lora-rank must be a positive integer, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        self.hf_targets()


@dataclass
class RunConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def virtual_pipeline_size(self) -> int | None:
        """Virtual pipeline stages per pipeline rank (None without interleaving)."""
        p = self.parallel
        if p.num_layers_per_virtual_pipeline_stage is None:
            return None
        per_stage = self.model.num_hidden_layers // p.pipeline_model_parallel_size
        return per_stage // p.num_layers_per_virtual_pipeline_stage

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RunConfig:
        """Builds a config from nested sections; unknown sections or keys are errors."""
        cfg = cls()
        for section, values in raw.items():
            if section not in SECTIONS:
                raise ConfigError(
                    f"{source}: unknown section '{section}'; expected one of {sorted(SECTIONS)}"
                )
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{section}' must be a mapping")
            target = getattr(cfg, section)
            known = {f.name for f in fields(target)}
            for key, value in values.items():
                key = key.replace("-", "_")
                if key not in known:
                    raise ConfigError(
                        f"{source}: unknown key '{section}.{key}'; known keys: {sorted(known)}"
                    )
                hint = field_types(type(target))[key]
                setattr(target, key, coerce(value, hint, f"{source}: {section}.{key}"))
        return cfg

    def _validate_moe(self) -> None:
        """Expert parallelism and the MoE fields (one-line errors naming the flag)."""
        m, p, t = self.model, self.parallel, self.train
        ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
        for name, v in [
            ("--expert-model-parallel-size", ep),
            ("--expert-tensor-parallel-size", etp),
        ]:
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if t.moe_aux_loss_coeff < 0:
            raise ConfigError(f"--moe-aux-loss-coeff must be >= 0, got {t.moe_aux_loss_coeff}")
        if m.num_experts is None:
            if ep > 1 or (etp or 1) > 1:
                raise ConfigError(
                    "--expert-model-parallel-size / --expert-tensor-parallel-size need a "
                    f"mixture-of-experts model; {m.model_type} has no experts"
                )
            return
        if m.num_experts % ep:
            raise ConfigError(
                f"--expert-model-parallel-size {ep} must divide num_experts ({m.num_experts})"
            )
        if not 1 <= m.num_experts_per_tok <= m.num_experts:
            raise ConfigError(
                f"model.num_experts_per_tok {m.num_experts_per_tok} must be in "
                f"[1, num_experts={m.num_experts}]"
            )
        etp = etp or p.tensor_model_parallel_size
        if m.expert_ffn_size % etp:
            raise ConfigError(
                f"--expert-tensor-parallel-size {etp} must divide the expert MLP width "
                f"({m.expert_ffn_size})"
            )
        shared = m.shared_expert_intermediate_size
        if shared is not None and shared % p.tensor_model_parallel_size:
            # The shared expert is a dense MLP: split over TP like the attention, not ETP.
            raise ConfigError(
                f"--tensor-model-parallel-size {p.tensor_model_parallel_size} must divide "
                f"shared_expert_intermediate_size ({shared})"
            )
        if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
            # Megatron-Core's MoELayer refuses to train so (moe_layer.py, "performance may
            # degrade"): each TP rank would route every token.
            raise ConfigError(
                "a mixture-of-experts model with --tensor-model-parallel-size > 1 needs "
                "--sequence-parallel"
            )

    def validate(self, world_size: int | None = None, training: bool = True) -> None:
        """Checks everything checkable before process groups exist; raises ConfigError.

        ``training=False`` (evaluation) skips the global-batch checks and requires ``--load``.
        """
        m, p, t, lo = self.model, self.parallel, self.train, self.loss
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        for name, v in [
            ("--tensor-model-parallel-size", tp),
            ("--pipeline-model-parallel-size", pp),
            ("--micro-batch-size", t.micro_batch_size),
            ("--global-batch-size", t.global_batch_size),
            ("--train-iters", t.train_iters),
            ("--seq-length", t.seq_length),
            ("--pipeline-pad-multiple", p.pipeline_pad_multiple),
        ]:
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if m.num_attention_heads % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} must divide num_attention_heads "
                f"({m.num_attention_heads}); choose a TP size that divides it"
            )
        if m.kv_heads % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} must divide num_key_value_heads ({m.kv_heads})"
            )
        if m.num_attention_heads % m.kv_heads:
            raise ConfigError(
                f"model.num_key_value_heads ({m.kv_heads}) must divide num_attention_heads "
                f"({m.num_attention_heads})"
            )
        if m.padded_vocab_size() % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} must divide the padded vocabulary "
                f"({m.padded_vocab_size()}); raise --make-vocab-size-divisible-by"
            )
        if m.intermediate_size % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} must divide intermediate_size "
                f"({m.intermediate_size})"
            )
        if m.num_hidden_layers % pp:
            raise ConfigError(
                f"--pipeline-model-parallel-size {pp} must divide num_hidden_layers "
                f"({m.num_hidden_layers})"
            )
        vpl = p.num_layers_per_virtual_pipeline_stage
        if vpl is not None:
            if pp < 2:
                raise ConfigError(
                    "--num-layers-per-virtual-pipeline-stage needs "
                    "--pipeline-model-parallel-size > 1"
                )
            per_stage = m.num_hidden_layers // pp
            if vpl < 1 or per_stage % vpl:
                raise ConfigError(
                    f"--num-layers-per-virtual-pipeline-stage {vpl} must divide the "
                    f"{per_stage} layers of each pipeline stage"
                )
        if p.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        self._validate_moe()
        if t.prefix_sharing and t.attention_backend == "te":
            # Prefix-shared rows need a mask that is not causal per sequence, which TE's THD
            # path cannot express (packed_seq.py). Only an explicit --prefix-sharing gets here:
            # unset, it resolves to off with TE (megatron_simpo/defaults.py); --pack-pairs is
            # fine (THD sequences).
            raise ConfigError(
                "--prefix-sharing needs --attention-backend sdpa or local (or drop it: with TE "
                "it defaults to off and pairs are packed as THD sequences)"
            )
        if m.rope_scaling is not None:
            kind = m.rope_scaling.get("rope_type", m.rope_scaling.get("type"))
            if kind != "llama3":
                raise ConfigError(
                    f"model.rope_scaling type {kind!r} is not supported; only 'llama3' is"
                )
            missing = {
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            } - set(m.rope_scaling)
            if missing:
                raise ConfigError(f"model.rope_scaling lacks {sorted(missing)}")
        lo.validate()
        self.lora.validate()
        if self.lora.lora_rank is not None and t.attention_backend == "te":
            # Transformer Engine's QKV / fc1 fuse the norm into the linear: the adapter would
            # not see the normalised input.
            raise ConfigError(
                "--lora-rank: Transformer Engine's fused norm+linear modules are not supported "
                "by the adapters; use --attention-backend sdpa or local"
            )
        if t.keep_last is not None and t.keep_last < 1:
            raise ConfigError(f"--keep-last must be >= 1, got {t.keep_last}")
        if not isinstance(t.loss_chunk_size, int) or t.loss_chunk_size < 1:
            raise ConfigError(
                f"--loss-chunk-size must be a positive integer, got {t.loss_chunk_size!r}"
            )
        if t.max_skipped_iters < 1:
            raise ConfigError(f"--max-skipped-iters must be >= 1, got {t.max_skipped_iters}")
        if t.save_interval is not None and t.save is None:
            raise ConfigError("--save-interval needs --save DIR")
        d = self.data
        if d.data_path is None:
            raise ConfigError("--data-path is required")
        if not 0.0 <= d.eval_split_ratio < 1.0:
            raise ConfigError(f"--eval-split-ratio must be in [0, 1), got {d.eval_split_ratio}")
        if d.eval_split_ratio and d.eval_data_path:
            raise ConfigError("--eval-split-ratio and --eval-data-path both set: give one")
        max_len = d.max_length if d.max_length is not None else t.seq_length
        if d.max_length is not None and d.max_length > t.seq_length:
            raise ConfigError(f"--max-length {d.max_length} exceeds --seq-length {t.seq_length}")
        if d.max_prompt_length is not None and d.max_prompt_length >= max_len:
            raise ConfigError(
                f"--max-prompt-length {d.max_prompt_length} must be smaller than "
                f"--max-length {max_len}"
            )
        if d.num_workers < 1:
            raise ConfigError(f"--num-workers must be >= 1, got {d.num_workers}")
        lg = self.logging
        has_heldout = bool(d.eval_data_path or d.eval_split_ratio)
        for flag, value in (
            ("--eval-interval", lg.eval_interval),
            ("--gen-interval", lg.gen_interval),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
            if training and value and not has_heldout:
                raise ConfigError(
                    f"{flag} needs held-out pairs: set --eval-data-path FILE or "
                    "--eval-split-ratio FRACTION"
                )
        if lg.gen_prompts < 1 or lg.gen_max_new_tokens < 1:
            raise ConfigError("--gen-prompts and --gen-max-new-tokens must be >= 1")
        if lg.peak_tflops is not None and lg.peak_tflops <= 0:
            raise ConfigError(f"--peak-tflops must be > 0, got {lg.peak_tflops}")
        if lg.alarm_evals < 1:
            raise ConfigError(f"--alarm-evals must be >= 1, got {lg.alarm_evals}")
        if not training and not t.load:
            raise ConfigError("--load CKPT is required (the checkpoint to evaluate)")
        if world_size is not None:
            if world_size % (tp * pp):
                raise ConfigError(
                    f"world size {world_size} is not divisible by TP x PP = {tp * pp}; "
                    "change --nproc-per-node/--nnodes or the parallel sizes"
                )
            ep = p.expert_model_parallel_size
            etp = p.expert_tensor_parallel_size or tp
            if self.model.num_experts is not None and world_size % (ep * etp * pp):
                raise ConfigError(
                    f"world size {world_size} is not divisible by EP x ETP x PP = "
                    f"{ep * etp * pp}; change --expert-model-parallel-size or "
                    "--expert-tensor-parallel-size"
                )
            dp = world_size // (tp * pp)
            if training and t.global_batch_size % (t.micro_batch_size * dp):
                raise ConfigError(
                    f"--global-batch-size {t.global_batch_size} must be divisible by "
                    f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}"
                )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "logging": LoggingConfig,
    "lora": LoraConfig,
}


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it (used for CLI help)."""
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation."""
    return typing.get_type_hints(cls)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` (from YAML or JSON) as the field type ``hint``, or a ConfigError naming ``key``.

    PyYAML reads ``1e-6`` (no dot) as a string: numeric strings become numbers for ``float``
    fields, integral numbers for ``int`` fields. ``X | None``, ``Literal[...]``, ``bool``,
    ``str``, ``dict`` and ``list`` are checked; nothing is converted silently otherwise.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        number = _number(value)
        if number is None or number != int(number):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if hint is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} (quote it in YAML)")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    return value


def _number(value: Any) -> float | int | None:
    """An int/float (not bool) or a string that parses as one; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None
