"""``megatron-simpo plot RUN_DIR [RUN_DIR...] --output fig.png``: a PNG dashboard of runs.

Reads each run's ``metrics.jsonl`` (written next to the TensorBoard events; keys in
:mod:`megatron_simpo.metrics`) and draws, with matplotlib's Agg backend (no display needed), one
panel per question a SimPO user asks: is the loss falling, are both rewards sliding down, is the
margin growing, is held-out accuracy rising, are responses getting longer, how fast is it. Runs
are overlaid in one colour each (a single run gets a colour per series instead); held-out
(``eval/``) values are drawn as dashed lines with markers; ``smooth`` draws training curves
exponentially smoothed over their faint raw values. A ``RUN_DIR`` is the ``--tensorboard-dir``
of a run, or a directory holding ``tb/metrics.jsonl`` (the layout ``make demo`` writes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_simpo.errors import DataError

#: (panel title, [(metric key, line label)], y-axis label); eval/ variants are added when present.
#: A key ``"a|b"`` draws ``a`` where the run logged it, else ``b`` (the per-token log-prob is
#: ``logps/chosen_mean`` for the objectives whose ``logps/chosen`` is summed, as in TRL).
PANELS: list[tuple[str, list[tuple[str, str]], str]] = [
    ("loss (objective)", [("loss", "")], "loss"),
    ("rewards", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")], "reward"),
    ("reward margin (chosen - rejected)", [("rewards/margins", "")], "margin"),
    ("preference accuracy", [("rewards/accuracies", "")], "accuracy"),
    (
        "log-prob per token",
        [
            ("logps/chosen_mean|logps/chosen", "chosen"),
            ("logps/rejected_mean|logps/rejected", "rejected"),
        ],
        "nats",
    ),
    ("NLL of chosen responses", [("nll_loss", "")], "nats"),
    (
        "ORPO log odds",
        [("log_odds_chosen", "log_odds_chosen"), ("log_odds_ratio", "log_odds_ratio")],
        "log odds",
    ),
    (
        "response length",
        [("length/chosen", "chosen"), ("length/rejected", "rejected")],
        "tokens",
    ),
    ("throughput", [("tokens_per_sec", "")], "tokens/s"),
    ("gradient norm", [("grad_norm", "")], "norm"),
    ("learning rate", [("lr", "")], "lr"),
]

_SERIES_STYLES = ["-", ":"]  # first and second series of a panel (chosen, rejected)
_NOT_SMOOTHED = {"lr"}  # a schedule, not a noisy measurement


@dataclass
class Run:
    """One run's metrics: ``series[key] = (iterations, values)``, sorted by iteration."""

    label: str
    path: Path
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def find_metrics(run_dir: str | Path) -> Path:
    """``RUN_DIR/metrics.jsonl`` or ``RUN_DIR/tb/metrics.jsonl``; DataError if neither exists."""
    d = Path(run_dir)
    if d.is_file() and d.name.endswith(".jsonl"):
        return d
    for candidate in (d / "metrics.jsonl", d / "tb" / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    what = "does not exist" if not d.exists() else "has no metrics.jsonl nor tb/metrics.jsonl"
    raise DataError(
        f"plot: {run_dir} {what}; pass a run's --tensorboard-dir (where metrics.jsonl is "
        "written) or the directory above a tb/ holding it"
    )


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Reads a run's metrics. A resumed run appends to the same file: for an iteration logged
    twice the later record wins. A truncated last line (a run still writing) is ignored."""
    path = find_metrics(run_dir)
    if label is None:
        d = Path(run_dir).resolve()
        d = d.parent if d.is_file() else d
        label = d.parent.name if d.name == "tb" else d.name
    lines = path.read_text().splitlines()
    by_key: dict[str, dict[int, float]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise DataError(f"plot: {path} line {n}: not JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise DataError(f"plot: {path} line {n}: expected an object with an 'iteration'")
        it = record["iteration"]
        for key, value in record.items():
            if key == "iteration" or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                by_key.setdefault(key, {})[it] = float(value)
    if not by_key:
        raise DataError(f"plot: {path} holds no metrics yet (has the run logged an iteration?)")
    run = Run(label=label, path=path)
    for key, points in by_key.items():
        its = sorted(points)
        run.series[key] = (its, [points[i] for i in its])
    return run


def series_key(run: Run, spec: str) -> str:
    """The metric a panel's ``"a|b"`` spec draws for ``run``: the first alternative logged
    (train or eval), else the last."""
    options = spec.split("|")
    return next((k for k in options if k in run.series or "eval/" + k in run.series), options[-1])


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style exponential smoothing (``weight`` 0 = none, 0.99 = heavy), debiased so
    the first points are not pulled towards zero."""
    if weight <= 0:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i))
    return out


def plot_runs(
    run_dirs: list[str | Path], output: str | Path, smooth: float = 0.0, title: str | None = None
) -> Path:
    """Draws the dashboard of ``run_dirs`` (overlaid) into the PNG ``output``; returns its path.

    Args:
        run_dirs: run directories (see :func:`find_metrics`); at least one.
        output: the PNG to write (parent directories are created).
        smooth: exponential smoothing weight in [0, 1) for training curves (eval points as is).
        title: figure title (default: the run labels).
    """
    if not run_dirs:
        raise DataError("plot: give at least one RUN_DIR")
    if not 0 <= smooth < 1:
        raise DataError(f"plot: --smooth {smooth} must be in [0, 1)")
    runs = [load_run(d) for d in run_dirs]
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):  # same directory names: use the paths as given
        for r, d in zip(runs, run_dirs):
            r.label = str(d)

    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ncols = 3
    nrows = -(-len(PANELS) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel_title, keys, ylabel) in zip(axes.flat, PANELS):
        drew = False
        for r_i, run in enumerate(runs):
            for s_i, (spec, name) in enumerate(keys):
                key = series_key(run, spec)
                style = _SERIES_STYLES[s_i % len(_SERIES_STYLES)]
                # One run: a colour per series (chosen, rejected); several: a colour per run.
                color = colors[(s_i if len(runs) == 1 else r_i) % len(colors)]
                if key in run.series:
                    its, vals = run.series[key]
                    label = " ".join(x for x in (run.label, name) if x)
                    w = 0.0 if key in _NOT_SMOOTHED else smooth
                    if w > 0:  # the raw values stay visible, faintly (as in TensorBoard)
                        ax.plot(its, vals, style, color=color, lw=0.8, alpha=0.25)
                    ax.plot(its, ema(vals, w), style, color=color, lw=1.4, label=label)
                    drew = True
                if "eval/" + key in run.series:
                    its, vals = run.series["eval/" + key]
                    label = " ".join(x for x in (run.label, "eval", name) if x)
                    marker = "o" if s_i == 0 else "s"
                    ax.plot(its, vals, "--", marker=marker, ms=4, color=color, lw=1, label=label)
                    drew = True
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drew:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.set_visible(False)
    fig.suptitle(title or "megatron-simpo: " + ", ".join(r.label for r in runs), fontsize=12)
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out
