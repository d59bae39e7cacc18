"""Run metrics: a console line, TensorBoard scalars and ``metrics.jsonl`` (same keys).

Names follow the TRL trainer of the objective (``--loss``) so curves compare: ``loss`` (the
global-batch objective, ``megatron_simpo/loss.py``: weighted mean plus the NLL weight --
``--sft-weight``, ``--cpo-alpha`` or ``--orpo-alpha`` -- x ``nll_loss``), ``nll_loss`` (NLL of the
chosen responses, ``--sft-reduction``; TRL's ``nll_loss`` with ``token`` and unit weights), and,
as means over the pairs of positive weight: ``rewards/chosen``, ``rewards/rejected`` (the
objective's implicit rewards as TRL defines them: SimPO ``beta`` x mean log-prob, DPO family
``beta (logp - ref_logp)`` summed, CPO ``beta`` x summed log-prob (ipo: mean), ORPO ``beta`` x
mean log-prob), ``rewards/margins`` (chosen minus rejected reward, without gamma),
``rewards/accuracies`` (fraction of pairs with chosen reward > rejected), ``logps/chosen``,
``logps/rejected`` (as TRL logs them: the mean log-prob per response token for simpo, orpo and
cpo's ipo, the summed log-prob for the DPO family and cpo; the other one is
``logps/chosen_sum`` / ``logps/chosen_mean``, ``logps/rejected_*`` alike), ORPO's
``log_odds_ratio`` (log sigmoid of the log odds ratio) and ``log_odds_chosen`` (the log odds
ratio of chosen over rejected), ``length/chosen``, ``length/rejected`` (mean response tokens).
Also: ``lr``, ``grad_norm``, ``pairs`` (pairs in the iteration),
``tokens`` (non-padding tokens computed: each sequence's prompt + response, a prefix-shared
prompt once less its last token), ``tokens_effective`` (chosen and rejected each counted with
their prompt, as the padded layout computes them), ``iteration_time`` (s), ``tokens_per_sec``,
``tokens_per_sec_effective``, ``pairs_per_sec``, ``consumed_pairs``, ``length/chosen_min``,
``length/chosen_max``, ``length/rejected_min``, ``length/rejected_max`` (over the global batch's
pairs of positive weight), ``skipped_iters`` (updates skipped so far for a non-finite loss or
gradient), ``update_ok`` (1, or 0 for a skipped update), ``memory/peak_gib`` (worst rank: peak
allocated CUDA memory on GPU, peak RSS on CPU), ``model_flops`` (of the iteration, what is
computed, see ``flops.py``), ``tflops_per_gpu`` and ``mfu`` (when the peak is known:
``--peak-tflops`` or a detected A100/H100/H200), ``loss_scale`` (fp16: the dynamic loss
scale of the next iteration), ``moe/aux_loss`` (mixture of experts with --moe-aux-loss-coeff > 0:
the router load-balancing loss summed over MoE layers, mean over micro-batches; the objective's
gradient includes coeff x it, ``loss`` does not; unscaled by coeff),
``moe/max_expert_load_fraction`` (mixture of experts, any coeff: in the most imbalanced MoE layer,
the busiest expert's share of the step's routed token slots, 1/num_experts when balanced).
With a held-out set, every
``--eval-interval``: the same objective metrics with an ``eval/`` prefix and ``eval/num_pairs``;
every ``--gen-interval``: the generation probe's ``gen/`` metrics (texts go to TensorBoard text
``gen/texts``). Drift alarms go to the log and to TensorBoard text ``alarms``; the config is
TensorBoard text ``config``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Writes metrics from the one rank that logs (the caller decides which rank that is)."""

    def __init__(self, tensorboard_dir: str | None, config: dict[str, Any] | None = None) -> None:
        self.tb = None
        self.jsonl = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
            self.tb = SummaryWriter(log_dir=tensorboard_dir)
            self.jsonl = open(Path(tensorboard_dir) / "metrics.jsonl", "a", buffering=1)
            if config is not None:
                text = "```\n" + json.dumps(config, indent=2, default=str) + "\n```"
                self.tb.add_text("config", text, 0)

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        record = {"iteration": iteration, **metrics}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, iteration)
            self.tb.flush()

    def text(self, tag: str, text: str, iteration: int) -> None:
        """A TensorBoard text entry (alarms, generated texts)."""
        if self.tb is not None:
            self.tb.add_text(tag, text, iteration)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def console_line(iteration: int, total: int, m: dict[str, float], start_time: float) -> str:
    """One readable line per logged iteration."""
    elapsed = time.time() - start_time
    eta = elapsed / max(iteration, 1) * (total - iteration)
    return (
        f"iter {iteration}/{total} | loss {m['loss']:.4f} | acc {m['rewards/accuracies']:.3f} | "
        f"margin {m['rewards/margins']:.4f} | logps c/r {m['logps/chosen']:.3f}/"
        f"{m['logps/rejected']:.3f} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f} | "
        f"{m['tokens_per_sec']:.0f} tok/s | "
        + (f"MFU {m['mfu']:.1%} | " if "mfu" in m else f"{_flops(m['tflops_per_gpu'])} | ")
        + f"{m['iteration_time']:.2f} s/it | "
        + (f"skipped {m['skipped_iters']:.0f} | " if m.get("skipped_iters") else "")
        + f"elapsed {_hms(elapsed)} eta {_hms(eta)}"
    )


def _flops(tflops: float) -> str:
    """Achieved model FLOP/s per device, in the unit that reads well (GFLOP/s on a CPU)."""
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.2f} GFLOP/s"


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def eval_line(iteration: int, m: dict[str, float]) -> str:
    """The held-out evaluation line."""
    return (
        f"eval @ iter {iteration} | loss {m['eval/loss']:.4f} | "
        f"acc {m['eval/rewards/accuracies']:.3f} | margin {m['eval/rewards/margins']:.4f} | "
        f"pairs {m['eval/num_pairs']}"
    )
