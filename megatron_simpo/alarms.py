"""Drift alarms: warnings for the ways a SimPO run fails quietly.

Two conditions, both from metrics the run already logs (names as in :mod:`megatron_simpo.metrics`):

* **Likelihood displacement** (evaluations): the held-out ``eval/rewards/chosen`` fell at each
  of the last K evaluations (K = ``--alarm-evals``; K falls need K + 1 evaluations) while
  ``eval/rewards/accuracies`` moved by less than ``--alarm-flat-accuracy`` between the first and
  the last of them. Both rewards are sliding down together: the model is pushing probability
  mass off the preferred responses without learning to tell them apart.
* **Chosen log-prob drop** (training): the mean log-prob per chosen response token
  (``logps/chosen_mean`` for the objectives whose ``logps/chosen`` is summed, as TRL's DPO and
  CPO trainers log it; ``logps/chosen`` otherwise) is more than ``--alarm-logp-drop`` nats below
  its first logged value.

Each condition warns once when it starts and stays silent while it lasts; once it has cleared
(a rise in the chosen reward or a moving accuracy; the log-prob back above the threshold) it can
warn again.

    monitor = DriftMonitor.from_config(cfg.logging)
    for msg in monitor.update(iteration, metrics):  # train or eval metrics dict
        log.warning(msg)
"""

from __future__ import annotations

from collections.abc import Mapping

from megatron_simpo.config import LoggingConfig


class DriftMonitor:
    """Watches logged metrics and returns warnings when a drift condition starts.

    Args:
        evals: K, the number of consecutive falls of ``eval/rewards/chosen`` that warn (>= 1).
        flat_accuracy: accuracy counts as flat when ``|last - first|`` over those evaluations is
            below this.
        logp_drop: warn when ``logps/chosen`` is more than this below its first value (nats).
    """

    def __init__(self, evals: int = 3, flat_accuracy: float = 0.02, logp_drop: float = 0.5):
        if evals < 1:
            raise ValueError(f"alarm_evals must be >= 1, got {evals}")
        self.evals = evals
        self.flat_accuracy = flat_accuracy
        self.logp_drop = logp_drop
        self._eval_history: list[tuple[int, float, float]] = []  # (iteration, chosen, accuracy)
        self._displacement_active = False
        self._first_logp: tuple[int, float] | None = None
        self._logp_active = False

    @classmethod
    def from_config(cls, cfg: LoggingConfig) -> DriftMonitor:
        """A monitor with the thresholds of ``--alarm-evals``, ``--alarm-flat-accuracy`` and
        ``--alarm-logp-drop``."""
        return cls(cfg.alarm_evals, cfg.alarm_flat_accuracy, cfg.alarm_logp_drop)

    def update(self, iteration: int, metrics: Mapping[str, float]) -> list[str]:
        """Feeds one logged metrics dict (training and/or ``eval/`` keys; missing keys are
        ignored) and returns the warnings that start at this iteration (usually none)."""
        out = []
        if "eval/rewards/chosen" in metrics and "eval/rewards/accuracies" in metrics:
            msg = self._update_eval(
                iteration,
                float(metrics["eval/rewards/chosen"]),
                float(metrics["eval/rewards/accuracies"]),
            )
            if msg:
                out.append(msg)
        key = "logps/chosen_mean" if "logps/chosen_mean" in metrics else "logps/chosen"
        if key in metrics:
            msg = self._update_logp(iteration, float(metrics[key]), key)
            if msg:
                out.append(msg)
        return out

    def _update_eval(self, iteration: int, chosen: float, accuracy: float) -> str | None:
        self._eval_history.append((iteration, chosen, accuracy))
        window = self._eval_history[-(self.evals + 1) :]
        self._eval_history = window  # only the last K + 1 evaluations matter
        falling = len(window) == self.evals + 1 and all(
            b[1] < a[1] for a, b in zip(window, window[1:])
        )
        moved = abs(window[-1][2] - window[0][2])
        condition = falling and moved < self.flat_accuracy
        fire = condition and not self._displacement_active
        self._displacement_active = condition
        if not fire:
            return None
        (it0, c0, a0), (it1, c1, a1) = window[0], window[-1]
        return (
            f"drift alarm (likelihood displacement) at iteration {iteration}: eval "
            f"rewards/chosen fell {self.evals} evaluations in a row ({c0:+.4f} at iteration "
            f"{it0} -> {c1:+.4f} at {it1}) while eval rewards/accuracies stayed flat "
            f"({a0:.3f} -> {a1:.3f}, moved less than {self.flat_accuracy}); the model is "
            "lowering the likelihood of preferred responses without separating the pairs "
            "better. Consider a lower --lr, a smaller --beta or --sft-weight > 0."
        )

    def _update_logp(self, iteration: int, logp: float, key: str) -> str | None:
        if self._first_logp is None:
            self._first_logp = (iteration, logp)
            return None
        it0, first = self._first_logp
        threshold = first - self.logp_drop
        condition = logp < threshold
        fire = condition and not self._logp_active
        self._logp_active = condition
        if not fire:
            return None
        return (
            f"drift alarm (chosen log-prob drop) at iteration {iteration}: {key} is "
            f"{logp:.4f}, more than {self.logp_drop} below its first value {first:.4f} "
            f"(iteration {it0}); preferred responses are becoming less likely. Consider a lower "
            "--lr or --sft-weight > 0, and watch response lengths and generations."
        )
