"""The curation report: ``report.md`` and ``report.html`` (images under ``report/``; the HTML
refers to the same files). Per step: items in/kept/dropped, the score histogram with the
threshold drawn, thumbnails of dropped pairs with caption and reason, duplicate clusters,
decontamination matches side by side, the concept histogram before/after balancing, the files
the step wrote and any other material it reported."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cliplab.curate.pool import Record, SourceChanged, open_image
from cliplab.curate.steps.base import Decision
from cliplab.report_text import (HTML_CSS, HTML_VIEWPORT, TABLE_CLOSE, TABLE_OPEN, literal_plot,
                                 md_text, printable)

REPORT_DIR = "report"
THUMB = 96
KNOWN = ("clusters", "matches", "histogram_before", "histogram_after", "files")


class _Doc:
    """Markdown and HTML written side by side (what a user gave, captions and keys, escaped in
    both)."""

    def __init__(self, title: str):
        self.md = [f"# {title}", ""]
        self.html = ["<!DOCTYPE html>",
                     f'<html lang="en"><head><meta charset="utf-8">{HTML_VIEWPORT}',
                     f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;"
                     "max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:"
                     "collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;"
                     "vertical-align:top}th{background:#f3f3f3}img{max-width:100%}"
                     f"{HTML_CSS}</style>"
                     f"</head><body><h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> None:
        self.md += [f"{'#' * level} {md_text(text)}", ""]
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.md += [md_text(text), ""]
        self.html.append(f"<p>{html.escape(text)}</p>")

    def image(self, rel: str, alt: str) -> None:
        self.md += [f"![{md_text(alt)}]({rel})", ""]
        self.html.append(f'<img alt="{html.escape(alt)}" src="{html.escape(rel)}">')

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        """Cells are text, or ``("img", path or [paths])`` for thumbnails."""
        def paths(cell):
            return [p for p in ([cell[1]] if isinstance(cell[1], str) or cell[1] is None
                                else cell[1]) if p]

        def md(cell):
            if isinstance(cell, tuple):
                return " ".join(f"![]({p})" for p in paths(cell)) or "—"
            return md_text(cell)

        def h(cell):
            if isinstance(cell, tuple):
                return " ".join(f'<img src="{html.escape(p)}" alt="">' for p in paths(cell)) or "—"
            return html.escape(str(cell))

        self.md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows] + [""]
        self.html.append(f"{TABLE_OPEN}<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>"
                                                        for c in header) + "</tr></thead><tbody>")
        self.html += ["<tr>" + "".join(f"<td>{h(c)}</td>" for c in row) + "</tr>" for row in rows]
        self.html.append(f"</tbody>{TABLE_CLOSE}")


def _thumbnail(record: Record | None, work: Path, rel: str) -> str | None:
    """Save a thumbnail of ``record``'s image as ``work/rel``; None if it cannot be read."""
    if record is None:
        return None
    try:
        image = open_image(record["location"], work)
    except (SourceChanged, KeyError):
        return None
    image.thumbnail((THUMB, THUMB))
    path = work / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return rel


@literal_plot
def _plot_scores(decision: Decision, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(decision.scores, dtype=float)
    scores = scores[np.isfinite(scores)]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(scores, bins=min(50, max(5, len(scores) // 5)), color="#4c72b0")
    if decision.threshold is not None:
        ax.axvline(decision.threshold, color="#c44e52", linestyle="--",
                   label=f"threshold {decision.threshold:.4g}")
        ax.legend()
    ax.set(title=title, xlabel="score", ylabel="items")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@literal_plot
def _plot_concepts(before: dict, after: dict, path: Path, title: str, top: int = 30) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(before, key=lambda k: (-before[k], k))[:top]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.35), 3.5))
    ax.bar(x - 0.2, [before.get(n, 0) for n in names], 0.4, label="before")
    ax.bar(x + 0.2, [after.get(n, 0) for n in names], 0.4, label="after")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set(title=title, ylabel="items")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@dataclass
class StepShown:
    """What the report shows of a step: its decision (its per-item ``reasons`` not needed),
    the first dropped items' records and reasons, and the records its clusters and matches
    name, by key (`shown_step`)."""

    name: str
    decision: Decision
    dropped: list[tuple[Record, str | None]]
    records: dict[str, Record]


def shown_step(name: str, decision: Decision, keys: Sequence[str],
               load: Callable[[list[int]], list[Record]], examples: int) -> StepShown:
    """`StepShown` of a step whose items (the ones it decided on) have ``keys``; ``load``
    gives the records at positions among them. Only the records the report shows are loaded;
    ``decision.reasons`` may be let go afterwards."""
    dropped = [int(i) for i in np.flatnonzero(~decision.keep)[:examples]]
    report = decision.report
    named = {key for cluster in (report.get("clusters") or [])[:examples] for key in cluster[:6]}
    named |= {match.get("key") for match in (report.get("matches") or [])[:examples]}
    last = {}  # a key two items share names the later (as a dict of the items by key did)
    for i, key in enumerate(keys if named else ()):
        if key in named:
            last[key] = i
    records = load(dropped + list(last.values()))
    return StepShown(name, decision,
                     [(r, decision.reasons[i]) for r, i in zip(records, dropped)],
                     dict(zip(last, records[len(dropped):])))


def _relative(value: Any, work: Path, out: Path) -> str:
    """A path the step wrote (relative to the run folder, as decisions hold them), as it will be
    named once ``work`` is renamed to ``out``."""
    text = str(value)
    if text.startswith(str(work)):
        return str(out / Path(text).relative_to(work))
    return str(out / text) if not Path(text).is_absolute() and (work / text).exists() else text


def write_report(work: Path, summary: dict, decisions: list[StepShown],
                 dropped_read: list[dict], examples: int, out: Path) -> None:
    """Write ``work/report.md``, ``work/report.html`` and ``work/report/*`` (``out`` is where
    ``work`` goes when finished: paths in the report are given as they will be there)."""
    doc = _Doc("cliplab curate report")
    doc.text(f"Pool: {summary['pool']} items from {json.dumps(summary['data'])}; kept "
             f"{summary['kept']}, dropped {summary['dropped']} (each listed with its reason "
             "in dropped.parquet).")
    doc.table(["step", "in", "kept", "dropped", "seconds"],
              [[s["name"], s["in"], s["kept"], s["dropped"], s["seconds"]] for s in summary["steps"]])
    doc.heading("read")
    if dropped_read:
        doc.table(["key", "reason"], [[d["key"], d["reason"]] for d in dropped_read[:max(examples, 1)]])
    else:
        doc.text("Every item was readable and had a caption.")
    for index, shown in enumerate(decisions):
        name, decision, by_key = shown.name, shown.decision, shown.records
        slug = f"{index:02d}-{name}"
        doc.heading(f"{name}")
        row = next(s for s in summary["steps"] if s["name"] == name)
        doc.text(f"{row['in']} in, {row['kept']} kept, {row['dropped']} dropped.")
        if decision.scores is not None and len(decision.scores):
            rel = f"{REPORT_DIR}/{slug}-scores.png"
            (work / REPORT_DIR).mkdir(exist_ok=True)
            _plot_scores(decision, work / rel, f"{name}: scores")
            doc.image(rel, f"{name} score histogram")
        if shown.dropped:
            doc.heading("dropped examples", 3)
            doc.table(["image", "caption", "reason"], [
                [("img", _thumbnail(record, work, f"{REPORT_DIR}/{slug}/drop-{n}.png")),
                 record["caption"], reason] for n, (record, reason) in enumerate(shown.dropped)])
        report = decision.report
        if report.get("clusters"):
            doc.heading(f"duplicate clusters ({len(report['clusters'])}; the first is kept)", 3)
            doc.table(["size", "images (first kept)", "keys"], [
                [len(cluster),
                 ("img", [_thumbnail(by_key.get(key), work, f"{REPORT_DIR}/{slug}/cluster-{n}-{m}.png")
                          for m, key in enumerate(cluster[:6])]),
                 ", ".join(cluster[:6]) + (" …" if len(cluster) > 6 else "")]
                for n, cluster in enumerate(report["clusters"][:examples])])
        if report.get("matches"):
            doc.heading(f"matches ({len(report['matches'])})", 3)
            rows = []
            for n, match in enumerate(report["matches"][:examples]):
                pool = _thumbnail(by_key.get(match.get("key")), work, f"{REPORT_DIR}/{slug}/match-{n}.png")
                other = match.get("match")
                image = work / str(match.get("match_image", ""))  # relative to the run folder
                other_img = None
                if match.get("match_image") and image.is_file():
                    other_img = _thumbnail({"location": {"file": str(image)}}, work,
                                           f"{REPORT_DIR}/{slug}/match-{n}-ref.png")
                rows.append([("img", pool), match.get("key"), ("img", other_img), other,
                             _or_dash(match.get("similarity")),
                             _or_dash(match.get("hash_distance"))])
            # hash-only runs have no cosine: the distance is what matched
            doc.table(["pool image", "key", "matched image", "match", "similarity",
                       "hash distance"], rows)
        if report.get("histogram_before"):
            rel = f"{REPORT_DIR}/{slug}-concepts.png"
            (work / REPORT_DIR).mkdir(exist_ok=True)
            _plot_concepts(report["histogram_before"], report.get("histogram_after", {}),
                           work / rel, f"{name}: concepts before/after")
            doc.image(rel, f"{name} concept histogram before and after")
        if report.get("files"):
            doc.table(["file", "path"], [[label, _relative(path, work, out)]
                                         for label, path in report["files"].items()])
        for key, value in report.items():
            if key not in KNOWN:
                doc.text(f"{key}: {json.dumps(value, default=str)[:2000]}")
    # the paths it names (a source's, a dropped file's) may hold bytes that are not UTF-8
    (work / "report.md").write_text(printable("\n".join(doc.md) + "\n"), encoding="utf-8")
    page = "\n".join(doc.html + ["</body></html>"]) + "\n"
    (work / "report.html").write_text(printable(page), encoding="utf-8")


def _or_dash(value):
    """A table cell: the value, or a dash where there is none (a hash-only match's cosine)."""
    return "—" if value is None else value
