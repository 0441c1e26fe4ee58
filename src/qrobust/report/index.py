"""Write a whole report folder: tables (md/csv/json), figures, sanity checks and one index page.

``write_report(records, out_dir, ...)`` is what ``qrobust run`` calls after the grid; it can also be
called on any list of result records (e.g. re-read from a store) to rebuild the report.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrobust.report import plots
from qrobust.report.sanity import SanityReport, check_results
from qrobust.report.tables import Table, detection_table, eps_table, expand_clean, summary_table
from qrobust.utils import atomic_write_text

Record = Mapping[str, Any]


@dataclass
class Report:
    directory: Path
    summary: Table
    detection: Table
    sanity: SanityReport
    files: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    @property
    def index(self) -> Path:
        return self.directory / "index.html"


def sanity_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Records in the row format :func:`qrobust.report.sanity.check_results` reads."""
    return [r for r in expand_clean([r for r in records if r.get("kind") in ("clean", "attack")])]


def write_report(
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    *,
    columns: Sequence[tuple[str, float | None]] | None = None,
    sanity_options: Mapping[str, float] | None = None,
    meta: Mapping[str, Any] | None = None,
    title: str = "qrobust report",
) -> Report:
    """Build every table and figure from ``records`` into ``out_dir`` and link them from ``index.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sanity = check_results(sanity_rows(records), **dict(sanity_options or {}))
    summary = summary_table(records, columns, sanity=sanity)
    detection = detection_table(records)
    long = eps_table(records)
    meta = dict(meta or {})
    files: list[Path] = []

    def put(name: str, text: str) -> None:
        atomic_write_text(out / name, text)
        os.chmod(out / name, 0o644)  # a report is meant to be read by others
        files.append(out / name)

    put("results.md", f"# {title}\n\n{summary.markdown()}\n")
    put("results.csv", summary.csv())
    put(
        "results.json",
        json.dumps(
            {"meta": meta, **summary.as_dict(), "sanity": sanity.as_dict()},
            indent=2,
            sort_keys=True,
            default=str,
        )
        + "\n",
    )
    put("results_by_eps.csv", long.csv())
    put("results_by_eps.json", json.dumps(long.as_dict(), indent=2, sort_keys=True, default=str) + "\n")
    put("sanity.md", "# Sanity checks (Carlini et al. 2019)\n\n" + sanity.markdown() + "\n")
    if detection.rows:
        put("detection.md", f"# {detection.title}\n\n{detection.markdown()}\n")
        put("detection.csv", detection.csv())
        put("detection.json", json.dumps(detection.as_dict(), indent=2, sort_keys=True, default=str) + "\n")

    figures = _figures(records, out, sanity, columns if columns is not None else _columns_from(summary))

    report = Report(out, summary, detection, sanity, files, figures)
    put("report.md", _markdown_page(report, meta, title))
    put("index.html", _html_page(report, meta, title))
    return report


def _figures(records: Sequence[Record], out: Path, sanity: SanityReport,
             columns: Sequence[tuple[str, float | None]]) -> list[Path]:
    """Accuracy-vs-eps per attack (sanity-flagged rows masked), ROC curves, robustness vs bits."""
    attacks: list[str] = []
    for r in records:
        if r.get("kind") == "attack" and r["attack"] not in attacks:
            attacks.append(str(r["attack"]))
    flagged = sanity.flagged_rows()
    figures = [plots.accuracy_vs_eps(records, a, out / f"acc_vs_eps_{plots.slug(a)}.png", masked=flagged)
               for a in attacks]
    figures.append(plots.roc_curves(records, out / "roc.png"))
    figures.append(plots.robustness_vs_bits(records, columns, out / "robustness_vs_bits.png"))
    return [f for f in figures if f is not None]


def _columns_from(summary: Table) -> list[tuple[str, float | None]]:
    cols = []
    for head in summary.columns[3:]:
        if head in ("average", "sanity") or head.startswith("AUC "):
            continue
        if head.endswith(")") and " (" in head:
            label, eps = head[:-1].rsplit(" (", 1)
            cols.append((label, float(eps)))
        else:
            cols.append((head, None))
    return cols


def _meta_lines(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(k), v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in meta.items()]


def _markdown_page(report: Report, meta: Mapping[str, Any], title: str) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {k}: `{v}`" for k, v in _meta_lines(meta)]
    lines += [
        "",
        "## Accuracy",
        "",
        report.summary.markdown(),
        "",
        "## Sanity checks",
        "",
        report.sanity.markdown(),
    ]
    if report.detection.rows:
        lines += ["", "## Detection", "", report.detection.markdown()]
    if report.figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{p.stem}]({p.name})" for p in report.figures]
    lines += [
        "",
        "Files: " + ", ".join(f"[{p.name}]({p.name})" for p in report.files if p.name != "report.md"),
    ]
    return "\n".join(lines) + "\n"


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c).replace('**', '')}</td>" for c in row) + "</tr>"
        for row in table.rows
    )
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in table.notes)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


def _html_page(report: Report, meta: Mapping[str, Any], title: str) -> str:
    t = html.escape(title)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{t}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:center}"
        "th{background:#eee}.note{color:#555;font-size:90%}.bad{color:#b00}img{max-width:48%;margin:4px}"
        "</style></head><body>",
        f"<h1>{t}</h1><ul>",
        *[f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in _meta_lines(meta)],
        "</ul><h2>Accuracy</h2>",
        _html_table(report.summary),
        "<h2>Sanity checks (Carlini et al. 2019)</h2>",
    ]
    checks = Table("", ["check", "comparisons", "violations"], [])
    from qrobust.report.sanity import CHECKS

    for name, text in CHECKS.items():
        checks.rows.append(
            [
                text,
                str(report.sanity.checked.get(name, 0)),
                str(sum(v.check == name for v in report.sanity.violations)),
            ]
        )
    parts.append(_html_table(checks))
    if report.sanity.violations:
        parts.append("<p class='bad'>Suspected gradient masking (or a broken attack):</p><ul>")
        parts += [
            f"<li class='bad'><b>{html.escape(v.row)}</b>, {html.escape(v.attack)}: "
            f"{html.escape(v.message)}</li>"
            for v in report.sanity.violations
        ]
        parts.append("</ul>")
    else:
        parts.append("<p>No violations.</p>")
    if report.detection.rows:
        parts += ["<h2>Detection</h2>", _html_table(report.detection)]
    if report.figures:
        parts.append("<h2>Figures</h2>")
        parts += [f"<a href='{p.name}'><img src='{p.name}' alt='{p.stem}'></a>" for p in report.figures]
    parts.append("<h2>Files</h2><ul>")
    parts += [f"<li><a href='{p.name}'>{p.name}</a></li>" for p in report.files]
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"
