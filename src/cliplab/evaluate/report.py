"""`cliplab report`: results of several models or runs side by side, as report.md and a
self-contained report.html (plots embedded as base64; the same PNGs also sit in ``plots/``).

Each task (section) gets a table, one row per metric, one column per model (per-class values
last; of more than 40 classes the 10 lowest). Few-shot results read as "mean ± std"; long-tail
results also get the accuracy-vs-frequency plot, α sweeps (wise-ft) the accuracy-vs-α plot; runs
with a metrics.jsonl get training curves and a table of each metric's last logged value.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cliplab.config import OutFolder, Section, validate
from cliplab.errors import ConfigError
from cliplab.evaluate.report_inputs import ReportSource, read_inputs
from cliplab.evaluate.report_per_class import per_class_rows, split_per_class
from cliplab.output_folder import check_out, write_utf8
from cliplab.output_lock import visible_entries
from cliplab.report_text import (HTML_CSS, HTML_VIEWPORT, TABLE_CLOSE, TABLE_OPEN, md_code,
                                 md_text, printable)
from cliplab.evaluate.report_plots import (is_alpha_sweep, is_few_shot, is_long_tail,
                                           plot_alpha_sweep, plot_few_shot, plot_long_tail,
                                           plot_training, slug)

MISSING = "—"


class ReportConfig(Section):
    """`cliplab report`'s settings: ``inputs`` (results JSON files and run folders, or
    ``--inputs``), ``out`` (the report folder, or ``--out``), ``title``, ``names`` (one label
    per input) and ``plots`` (false: tables only)."""

    inputs: list[str] = []
    out: OutFolder | None = None
    title: str = "cliplab report"
    names: list[str] | None = None
    plots: bool = True


@dataclass
class Table:
    """Rows of (metric, {model label: value}) under a section heading."""

    title: str
    columns: list[str]
    rows: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    note: str = ""  # shown under the title: e.g. that its columns ran differently


@dataclass
class Figure:
    title: str
    path: Path


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, object]:
    """Numbers of a nested metrics dict under dotted keys; ``{acc1_mean, acc1_std}`` pairs
    become one ``(mean, std)`` value; lists and strings are left out."""
    out: dict[str, object] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if "acc1_mean" in value and "acc1_std" in value:
                out[name] = (value["acc1_mean"], value["acc1_std"])
            else:
                out.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
        elif value is None:
            out[name] = None
    return out


def format_value(value: object) -> str:
    """Integers as they are, floats to 4 decimals (1 from 100 up; 3 significant digits below
    0.0005, which 4 decimals would show as 0: a last learning rate), (mean, std) as
    mean ± std."""
    if value is None:
        return MISSING
    if isinstance(value, tuple):
        return f"{format_value(value[0])} ± {format_value(value[1])}"
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}" if 0 < abs(value) < 0.0005 else f"{value:.4f}"


def last_logged(history: list[dict]) -> dict[str, object]:
    """Each metric's last logged value over a run's metrics.jsonl records (in order), so a
    final eval record does not hide the loss, lr and logit_scale logged before it."""
    merged: dict[str, object] = {}
    for record in history:  # a null never hides a number logged before it
        merged.update((key, value) for key, value in flatten_metrics(record).items()
                      if value is not None or key not in merged)
    return merged


def build_tables(sources: list[ReportSource]) -> list[Table]:
    """One table per section (first-seen order), plus each run's last logged values."""
    order: dict[str, None] = {}
    for source in sources:
        order.update(dict.fromkeys(source.sections))
    tables = []
    for section in order:
        having = [s for s in sources if section in s.sections]
        table = Table(section, [s.label for s in having])
        split = {s.label: split_per_class(s.sections[section]) for s in having}
        flat = {label: flatten_metrics(rest) for label, (rest, _) in split.items()}
        metrics = dict.fromkeys(k for s in having for k in flat[s.label])
        table.rows = [(m, {label: values.get(m) for label, values in flat.items()})
                      for m in metrics]
        groups: dict[str, dict[str, dict]] = {}
        for label, (_, found) in split.items():
            for path, values in found.items():
                groups.setdefault(path, {})[label] = values
        class_rows, cut = per_class_rows(groups)
        table.rows += class_rows
        table.note = "; ".join(note for note in (spec_differences(section, having),
                                                  scorer_differences(section, having), *cut)
                               if note)
        if table.rows:
            tables.append(table)
    runs = [s for s in sources if s.history]
    if runs:
        last = {s.label: last_logged(s.history) for s in runs}
        metrics = dict.fromkeys(k for values in last.values() for k in values)
        tables.append(Table("training (last logged value of each metric)",
                            [s.label for s in runs],
                            [(m, {lb: v.get(m) for lb, v in last.items()}) for m in metrics]))
    return tables


def spec_differences(task: str, sources: list[ReportSource]) -> str:
    """A sentence naming what the inputs' specs of ``task`` differ in (``test.limit: 500 /
    100``), so columns of the same name over other data are not read as one comparison;
    empty when they ran it alike or do not say."""
    specs = [(s.label, _flat_spec(s.specs[task])) for s in sources if task in s.specs]
    if len(specs) < 2:
        return ""
    keys = dict.fromkeys(k for _, spec in specs for k in spec)
    differing = [k for k in keys if len({json.dumps(spec.get(k), sort_keys=True)
                                         for _, spec in specs}) > 1]
    if not differing:
        return ""
    shown = "; ".join(f"{k}: " + " / ".join(json.dumps(spec.get(k)) for _, spec in specs)
                      for k in differing[:4])
    more = f"; and {len(differing) - 4} more" if len(differing) > 4 else ""
    return (f"the inputs ran {task} differently ({', '.join(label for label, _ in specs)}): "
            f"{shown}{more}")


def scorer_differences(task: str, sources: list[ReportSource]) -> str:
    """A sentence saying which inputs scored ``task`` with a learned classifier head (their
    results' ``classifier``: a fine-tuned model's head.safetensors) and which with the text
    prompts, when some did and some did not (an export leaves the head out); else empty."""
    heads = [(s.label, s.sections[task].get("classifier")) for s in sources
             if isinstance(s.sections.get(task), dict)]
    prompted = [label for label, head in heads if not head]
    if not prompted or len(prompted) == len(heads):
        return ""
    by_head = ", ".join(f"{label} ({head})" for label, head in heads if head)
    return (f"{task} was scored by a classifier head in {by_head}, by the text prompts in "
            f"{', '.join(prompted)}")


def _flat_spec(spec: dict, prefix: str = "") -> dict[str, object]:
    """A task spec's values under dotted keys (``test.limit``), lists and texts kept."""
    out: dict[str, object] = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            out.update(_flat_spec(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_figures(sources: list[ReportSource], plots_dir: Path,
                  progress: bool = True) -> list[Figure]:
    """Few-shot and long-tail plots per section (all models in one plot), training curves."""
    jobs = []
    order = dict.fromkeys(k for s in sources for k in s.sections)
    names: set[str] = set()

    def plot_path(kind: str, section: str) -> Path:
        """A file of its own per plot: sections named "Few shot" and "few-shot" slug alike."""
        name, number = f"{kind}-{slug(section)}", 1
        while name in names:
            number += 1
            name = f"{kind}-{slug(section)}-{number}"
        names.add(name)
        return plots_dir / f"{name}.png"

    for section in order:
        runs = [(s.label, s.sections[section]) for s in sources if section in s.sections]
        if all(is_few_shot(m) for _, m in runs):
            jobs.append((f"few-shot accuracy vs k: {section}", plot_few_shot, section, runs,
                         plot_path("few-shot", section)))
        elif all(is_alpha_sweep(m) for _, m in runs):
            jobs.append((f"accuracy vs α: {section}", plot_alpha_sweep, section, runs,
                         plot_path("alpha-sweep", section)))
        elif all(is_long_tail(m) for _, m in runs):
            jobs.append((f"accuracy vs concept frequency: {section}", plot_long_tail, section,
                         runs, plot_path("long-tail", section)))
    figures = []
    for title, fn, section, runs, path in tqdm(jobs, desc="plots", disable=not progress,
                                               leave=False):
        figures.append(Figure(title, fn(section, runs, path)))
    training = plot_training(sources, plots_dir / "training-curves.png")
    if training is not None:
        figures.append(Figure("training curves", training))
    return figures


def render_markdown(title: str, sources: list[ReportSource], tables: list[Table],
                    figures: list[Figure], out_dir: Path) -> str:
    lines = [REPORT_MARK, f"# {md_text(title)}", "", "Inputs:", ""]
    lines += [f"- **{md_text(s.label)}**: {md_code(printable(str(s.path)))}"
              + (f" ({md_text(printable(s.provenance))})" if s.provenance else "")
              + (f" ({md_text(s.note)})" if s.note else "") for s in sources]
    for table in tables:
        lines += ["", f"## {md_text(table.title)}", ""]
        lines += [f"Note: {md_text(table.note)}", ""] if table.note else []
        lines += ["| metric | " + " | ".join(md_text(c) for c in table.columns) + " |",
                  "|---|" + "---:|" * len(table.columns)]
        lines += ["| " + md_text(metric) + " | " + " | ".join(
            format_value(values.get(c)) for c in table.columns) + " |"
            for metric, values in table.rows]
    if figures:
        lines += ["", "## Plots"]
        for fig in figures:
            lines += ["", f"### {md_text(fig.title)}", "",
                      f"![{md_text(fig.title)}]({fig.path.relative_to(out_dir).as_posix()})"]
    return "\n".join(lines) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "th,td{border:1px solid #ccc;padding:.25em .6em}td.v{text-align:right;"
        "font-variant-numeric:tabular-nums}th{background:#f3f3f3}img{max-width:100%}")


def render_html(title: str, sources: list[ReportSource], tables: list[Table],
                figures: list[Figure]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", f'<html lang="en"><head><meta charset="utf-8">{HTML_VIEWPORT}',
             f"<title>{e(title)}</title><style>{_CSS}{HTML_CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>", "<p>Inputs:</p><ul>"]
    parts += [f"<li><b>{e(s.label)}</b>: <code>{e(printable(str(s.path)))}</code>"
              + (f" ({e(printable(s.provenance))})" if s.provenance else "")
              + (f" ({e(s.note)})" if s.note else "") + "</li>" for s in sources]
    parts.append("</ul>")
    for table in tables:
        parts.append(f"<h2>{e(table.title)}</h2>"
                     + (f"<p>Note: {e(table.note)}</p>" if table.note else "")
                     + f"{TABLE_OPEN}<thead><tr><th>metric</th>"
                     + "".join(f"<th>{e(c)}</th>" for c in table.columns)
                     + "</tr></thead><tbody>")
        for metric, values in table.rows:
            parts.append(f"<tr><td>{e(metric)}</td>" + "".join(
                f'<td class="v">{e(format_value(values.get(c)))}</td>' for c in table.columns)
                + "</tr>")
        parts.append(f"</tbody>{TABLE_CLOSE}")
    if figures:
        parts.append("<h2>Plots</h2>")
    for fig in figures:
        data = base64.b64encode(fig.path.read_bytes()).decode("ascii")
        parts.append(f"<h3>{e(fig.title)}</h3>"
                     f'<img alt="{e(fig.title)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# the first line of every report.md (invisible when rendered): what tells a previous report
# apart from a user's own report.md, which --out must never overwrite
REPORT_MARK = "<!-- written by cliplab report -->"


def is_previous_report(folder: Path) -> bool:
    """Whether ``folder`` holds a report.md `write_report` wrote."""
    try:
        with (folder / "report.md").open(encoding="utf-8") as f:
            return f.readline().rstrip("\n") == REPORT_MARK
    except (OSError, UnicodeDecodeError):
        return False


def _previous_or_leftover(folder: Path) -> bool:
    """Whether ``folder`` holds a previous report, or only what a report's first write left
    when it failed (report.md.tmp: a full disk, a kill)."""
    return is_previous_report(folder) or \
        {p.name for p in visible_entries(folder)} <= {"report.md.tmp", "report.html.tmp"}


def _plots_of(report_md: Path) -> list[Path]:
    """The plots/*.png a previous report.md shows (none: no previous report)."""
    if not is_previous_report(report_md.parent):
        return []
    text = report_md.read_text(encoding="utf-8")
    return [report_md.parent / "plots" / name
            for name in re.findall(r"\]\(plots/([^)/]+\.png)\)", text)]


def write_report(inputs: list[str | Path], out: str | Path,
                 config: ReportConfig | dict | None = None,
                 progress: bool = True) -> dict[str, Path]:
    """Read ``inputs`` (results JSON files / run folders; none given: the config's) and write
    ``out/report.md``, ``out/report.html`` and ``out/plots/*.png``; returns their paths."""
    if not isinstance(config, ReportConfig):
        config = validate(ReportConfig, config or {}, "the report config")
    inputs = list(inputs) or list(config.inputs)
    if not inputs:
        raise ConfigError("say what to report: --inputs RESULTS.json RUN_FOLDER ...")
    # never a file; an existing folder only if it holds a previous report (a new folder inside
    # a run is fine: a report writes only report.md/.html and plots/)
    previous_md = Path(out) / "report.md"
    if previous_md.is_file() and not is_previous_report(Path(out)):
        raise ConfigError(f"--out {out}: its report.md was not written by cliplab report; "
                          "choose a new folder")
    check_out(out, "report", may_exist=True, previous=_previous_or_leftover)
    sources = read_inputs(inputs, config.names)
    title = printable(config.title)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "report.md").is_file():  # stopped while drawing: the same command goes on
        write_utf8(out_dir / "report.md", f"{REPORT_MARK}\n\nThis report was stopped while "
                   "it was written: run the same `cliplab report` command again.\n")
    # a previous report's plots that this one does not draw would look current; any other
    # file in plots/ is the user's
    earlier_plots = _plots_of(out_dir / "report.md")
    tables = build_tables(sources)
    figures = build_figures(sources, out_dir / "plots", progress) \
        if config.plots else []
    drawn = {f.path.resolve() for f in figures}
    for old in earlier_plots:
        if old.resolve() not in drawn and old.is_file():
            old.unlink()
    md = out_dir / "report.md"
    write_utf8(md, render_markdown(title, sources, tables, figures, out_dir))
    page = out_dir / "report.html"
    write_utf8(page, render_html(title, sources, tables, figures))
    return {"markdown": md, "html": page, **{f.title: f.path for f in figures}}
