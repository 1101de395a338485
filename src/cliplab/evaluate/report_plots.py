"""The plots of `cliplab report` (matplotlib, Agg backend, PNG files): few-shot accuracy vs k,
per-concept accuracy vs training frequency with the log-linear fit, and training curves."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from cliplab.evaluate.report_inputs import ReportSource, measured  # noqa: E402
from cliplab.report_text import legend_label, literal_plot  # noqa: E402

FEW_SHOT_KEY = re.compile(r"^(?P<method>.+)_(?P<k>\d+)shot$")
ALPHA_KEY = re.compile(r"^α (?P<alpha>\S+)$")
TRAINING_CURVES = ("loss", "lr", "logit_scale")
LEGEND_INSIDE_AT_MOST = 8  # entries; more go below the plot, where they hide no data
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
FIT_STYLES = ("--", ":", "-.", (0, (1, 3)))  # a fit line's, told from the points' solid look


def is_few_shot(metrics: dict) -> bool:
    """A few-shot result: ``<method>_<k>shot`` keys holding acc1_mean / acc1_std."""
    entries = measured(metrics)
    return bool(entries) and all(FEW_SHOT_KEY.match(k) and isinstance(v, dict)
                                 and "acc1_mean" in v for k, v in entries.items())


def is_alpha_sweep(metrics: dict) -> bool:
    """An α sweep (`report_inputs.alpha_sweep`): ``α <value>`` keys holding {set: acc1}."""
    entries = measured(metrics)
    return bool(entries) and all(ALPHA_KEY.match(k) and isinstance(v, dict)
                                 for k, v in entries.items())


def is_long_tail(metrics: dict) -> bool:
    """A long-tail result: ``fit`` plus ``per_class`` entries with acc1 and frequency."""
    per_class = metrics.get("per_class")
    return isinstance(metrics.get("fit"), dict) and isinstance(per_class, dict) and all(
        isinstance(v, dict) and {"acc1", "frequency"} <= set(v) for v in per_class.values())


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "plot"


def line_style(index: int, count: int) -> dict:
    """Colour and line style of curve ``index`` of ``count`` on one plot, each pair distinct for
    up to 80 curves: matplotlib's ten colours as they are up to ten curves; past ten its twenty
    colours, then each again dashed, dotted and dash-dotted (the ten repeated at the 11th curve,
    so two inputs shared a look)."""
    if count <= 10:
        return {"color": f"C{index % 10}", "linestyle": "-"}
    twenty = plt.get_cmap("tab20").colors
    return {"color": twenty[index % 20], "linestyle": LINE_STYLES[index // 20 % 4]}


def marker_style(index: int, count: int) -> dict:
    """`line_style`'s colour with a marker shape for points (a scatter has no line style) and
    the line style of their fit line, each distinct for up to 80 inputs as `line_style`'s."""
    return {"color": line_style(index, count)["color"], "marker": MARKERS[index // 20 % 4],
            "fit": FIT_STYLES[index // 20 % 4]}


class _PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks to label (the minor ones too on an axis spanning
    less than a power of its base), each written as a plain number: its own formatter writes
    math (``$\\mathdefault{2^{0}}$``), which `literal_plot` shows as written."""

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return f"{x:g}"


def _log_x(ax, base: float) -> None:
    """A log x axis whose ticks read as plain numbers (1, 4, 16; 10, 100; 20, 30, 40)."""
    ax.set_xscale("log", base=base)
    for set_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        set_formatter(_PlainLogFormatter(base=base, labelOnlyBase=False,
                                         minor_thresholds=(1, 0.4)))


def _legend(fig, ax) -> None:
    """``ax``'s legend: inside it for a few entries, below the figure in columns for many (a
    legend of 24 inputs covered the curves and ran off the plot, its last entries cut)."""
    handles, labels = ax.get_legend_handles_labels()
    if len(labels) <= LEGEND_INSIDE_AT_MOST:
        ax.legend(fontsize=7)
        return
    columns = max(1, min(len(labels) // 8 + 1, int(fig.get_figwidth() // 2.2)))
    fig.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=columns, frameon=False)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": a legend below is kept whole
    plt.close(fig)
    return path


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, title, grid and legend of a one-axis plot, then the PNG written."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return _save(fig, path)


@literal_plot
def plot_few_shot(section: str, runs: list[tuple[str, dict]], path: Path) -> Path:
    """Accuracy vs shots per (model, method): mean line with a ± std band; log2 x axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    curves: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for label, metrics in runs:
        for key, value in measured(metrics).items():
            m = FEW_SHOT_KEY.match(key)
            curves.setdefault((label, m["method"]), []).append(
                (int(m["k"]), value["acc1_mean"], value.get("acc1_std", 0.0)))
    for index, ((label, method), points) in enumerate(curves.items()):
        k, mean, std = zip(*sorted(points))
        line, = ax.plot(k, mean, marker="o", label=legend_label(f"{label} · {method}"),
                        **line_style(index, len(curves)))
        ax.fill_between(k, [a - s for a, s in zip(mean, std)],
                        [a + s for a, s in zip(mean, std)], color=line.get_color(),
                        alpha=0.2)
    _log_x(ax, 2)
    return _finish(fig, ax, path, "shots per class (k)",
                   "top-1 accuracy (mean ± std over seeds)", f"few-shot: {section}")


@literal_plot
def plot_alpha_sweep(section: str, runs: list[tuple[str, dict]], path: Path) -> Path:
    """Top-1 accuracy vs the interpolation α, one line per (model, set): WiSE-FT's curve."""
    fig, ax = plt.subplots(figsize=(6, 4))
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for label, metrics in runs:
        for key, sets in measured(metrics).items():
            alpha = float(ALPHA_KEY.match(key)["alpha"])
            for name, acc in sets.items():
                curves.setdefault((label, name), []).append((alpha, acc))
    for index, ((label, name), points) in enumerate(curves.items()):
        ax.plot(*zip(*sorted(points)), marker="o", label=legend_label(f"{label} · {name}"),
                **line_style(index, len(curves)))
    return _finish(fig, ax, path, "α (0: zero-shot, 1: fine-tuned)", "top-1 accuracy",
                   f"weight interpolation: {section}")


@literal_plot
def plot_long_tail(section: str, runs: list[tuple[str, dict]], path: Path) -> Path:
    """Per-class accuracy vs training frequency (log x) with each model's fit line; classes of
    frequency zero cannot sit on a log axis and are counted in the legend instead."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, (label, metrics) in enumerate(runs):
        points = [(v["frequency"], v["acc1"], c) for c, v in metrics["per_class"].items()]
        seen = [(f, a, c) for f, a, c in points if f > 0]
        zero = len(points) - len(seen)
        fit = metrics["fit"]
        text = f"{label}"
        if fit.get("slope") is not None:
            text += f" (slope {fit['slope']:.3f}/decade, r² {fit['r2']:.2f})"
        if zero:
            text += f"; {zero} class(es) at frequency 0 not shown"
        style = marker_style(index, len(runs))
        ax.scatter([p[0] for p in seen], [p[1] for p in seen], label=legend_label(text),
                   color=style["color"], marker=style["marker"])
        for f, a, c in seen:
            ax.annotate(c, (f, a), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if fit.get("slope") is not None and seen:
            lo, hi = min(p[0] for p in seen), max(p[0] for p in seen)
            xs = [lo * (hi / lo) ** (i / 20) for i in range(21)]
            ax.plot(xs, [fit["intercept"] + fit["slope"] * math.log10(x) for x in xs],
                    color=style["color"], linestyle=style["fit"])
    _log_x(ax, 10)
    return _finish(fig, ax, path, "concept frequency in training captions (samples)",
                   "zero-shot top-1 accuracy of the class", f"long tail: {section}")


@literal_plot
def plot_training(sources: list[ReportSource], path: Path) -> Path | None:
    """Loss, learning rate and logit scale vs step, one line per run; None without history."""
    runs = [s for s in sources if s.history]
    keys = [k for k in TRAINING_CURVES if any(k in r for s in runs for r in s.history)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for index, source in enumerate(runs):
            points = [(r["step"], r[key]) for r in source.history
                      if isinstance(r.get(key), (int, float)) and "step" in r]
            if points:  # markers on short runs: a single logged step is a dot, not nothing
                ax.plot(*zip(*points), label=legend_label(source.label),
                        marker="o" if len(points) <= 30 else None, markersize=3,
                        **line_style(index, len(runs)))
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    # one legend, of the axis drawing the most runs (a run may not log every curve)
    _legend(fig, max(axes[0], key=lambda ax: len(ax.get_legend_handles_labels()[1])))
    return _save(fig, path)
