"""Result tables in the seeds' formats: markdown, CSV and JSON.

The summary table follows EMPIR's README (rows = models and ensembles; columns = clean, one column
per attack at its table eps, and the average over the attack columns), with detection ROC-AUCs
appended. The detection table follows seed A's logs (clean and adversarial accuracy of the
Monte-Carlo "group" prediction, mean uncertainty clean -> adversarial, and the detection scores).
Every JSON row keeps the full records it was built from, so each number can be traced back to
the model hash, attack settings, samples, seed and qrobust version that produced it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qrobust.report.sanity import SanityReport

Record = Mapping[str, Any]


def pct(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:.{digits}f}"


@dataclass
class Table:
    """A rectangular table: ``columns`` (header labels) and ``rows`` of display strings, plus raw data."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    data: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"| {' | '.join(self.columns)} |", "|" + "---|" * len(self.columns)]
        out += [f"| {' | '.join(r)} |" for r in self.rows]
        if self.notes:
            out += [""] + self.notes
        return "\n".join(out)

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(self.rows)
        return buf.getvalue()

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.data, "notes": self.notes}


def _row_order(records: Iterable[Record]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(str(r["row"]), None)
    return list(seen)


def expand_clean(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Copy each target's clean result onto every report row of that target (an ensemble's legacy and
    adaptive rows share one clean accuracy), so per-row consumers (tables, sanity checks) see it."""
    rows_of: dict[str, list[str]] = {}
    for r in records:
        if r.get("kind") == "attack":
            rows_of.setdefault(str(r["target"]), [])
            if r["row"] not in rows_of[str(r["target"])]:
                rows_of[str(r["target"])].append(str(r["row"]))
    out: list[dict[str, Any]] = []
    for r in records:
        if r.get("kind") == "clean" and rows_of.get(str(r["target"])):
            out += [{**r, "row": row} for row in rows_of[str(r["target"])]]
        else:
            out.append(dict(r))
    return out


def summary_table(
    records: Sequence[Record],
    columns: Sequence[tuple[str, float | None]] | None = None,
    *,
    sanity: SanityReport | None = None,
    title: str = "Accuracy (%)",
) -> Table:
    """EMPIR-style table. ``columns``: (attack label, eps shown); by default every attack at its
    largest eps below 1. Detection AUCs (kind ``detection``) are appended per attack."""
    recs = expand_clean([r for r in records if r.get("kind") in ("clean", "attack")])
    if columns is None:
        found: dict[str, list[float]] = {}
        for r in recs:
            if r["kind"] == "attack":
                found.setdefault(str(r["attack"]), [])
                if r.get("eps") is not None:
                    found[str(r["attack"])].append(float(r["eps"]))
        columns = []
        for label, eps in found.items():
            bounded = [e for e in eps if 0 < e < 1]
            columns.append((label, max(bounded) if bounded else (max(eps) if eps else None)))
    det = [r for r in records if r.get("kind") == "detection"]
    det_labels: list[str] = []
    for r in det:
        if r["attack"] not in det_labels:
            det_labels.append(str(r["attack"]))
    cells: dict[tuple[str, str], Record] = {}
    bits: dict[str, str] = {}
    for r in recs:
        row = str(r["row"])
        if r.get("bits"):
            bits[row] = str(r["bits"])
        if r["kind"] == "clean":
            cells[(row, "clean")] = r
            continue
        for label, eps in columns:
            if r["attack"] == label and (r.get("eps") == eps or (eps is None and r.get("eps") is None)):
                cells[(row, label)] = r
    for r in det:
        cells[(str(r["row"]), "auc:" + str(r["attack"]))] = r

    heads = ["model", "bits", "clean"] + [_col(label, eps) for label, eps in columns]
    if columns:
        heads.append("average")
    heads += [f"AUC {label}" for label in det_labels]
    heads.append("sanity")
    rows, data = [], []
    flagged = sanity.flagged_rows() if sanity is not None else set()
    for row in _row_order([r for r in recs] + det):
        if not any(k[0] == row for k in cells):
            continue
        clean = cells.get((row, "clean"))
        values = [cells.get((row, label)) for label, _ in columns]
        accs = [v["accuracy"] for v in values if v is not None and v.get("accuracy") is not None]
        average = sum(accs) / len(accs) if accs and len(accs) == len(values) else None
        line = [row, bits.get(row, ""), pct(clean["accuracy"] if clean else None)]
        line += [pct(v["accuracy"] if v else None) for v in values]
        if columns:
            line.append(pct(average))
        aucs = [cells.get((row, "auc:" + label)) for label in det_labels]
        line += [f"{a['detection']['auc']:.3f}" if a else "—" for a in aucs]
        status = "—" if sanity is None else ("**suspected gradient masking**" if row in flagged else "ok")
        line.append(status)
        rows.append(line)
        data.append(
            {
                "model": row,
                "bits": bits.get(row, ""),
                "clean": clean["accuracy"] if clean else None,
                **{
                    _col(label, eps): (v["accuracy"] if v else None)
                    for (label, eps), v in zip(columns, values, strict=True)
                },
                "average": average,
                **{
                    f"AUC {label}": (a["detection"]["auc"] if a else None)
                    for label, a in zip(det_labels, aucs, strict=True)
                },
                "sanity": ([v.as_dict() for v in sanity.for_row(row)] if sanity is not None else None),
                "records": [dict(x) for x in [clean, *values, *aucs] if x is not None],
            }
        )
    notes = []
    if columns:
        notes.append(
            "Columns: accuracy in % on the first N test images; each attack column at the eps in "
            "parentheses; average = mean over the attack columns (EMPIR's README convention)."
        )
    return Table(title, heads, rows, data, notes)


def _col(label: str, eps: float | None) -> str:
    return label if eps is None else f"{label} ({eps:g})"


def eps_table(records: Sequence[Record], title: str = "Accuracy (%) vs eps") -> Table:
    """Long form: one line per (row, attack, eps) with the 95% interval and the provenance."""
    heads = ["model", "attack", "eps", "accuracy", "95% CI", "n", "steps", "seed", "model hash", "result key"]
    rows, data = [], []
    for r in records:
        if r.get("kind") not in ("clean", "attack"):
            continue
        cfg = r.get("attack_config") or {}
        lo, hi = r.get("ci95") or (None, None)
        rows.append(
            [
                str(r["row"]),
                str(r["attack"]),
                "—" if r.get("eps") is None else f"{r['eps']:g}",
                pct(r.get("accuracy")),
                f"{pct(lo, 1)}–{pct(hi, 1)}",
                str(r.get("n", "")),
                str(cfg.get("steps", "")),
                str(r.get("seed", "")),
                str(r.get("model_hash", ""))[:12],
                str(r.get("key", ""))[:12],
            ]
        )
        data.append(dict(r))
    return Table(title, heads, rows, data)


def detection_table(records: Sequence[Record], title: str = "Detection (Monte-Carlo dropout)") -> Table:
    """Seed A's log layout, one line per (model, attack): accuracies, uncertainty, detection scores."""
    heads = [
        "model",
        "attack",
        "eps",
        "MC passes",
        "n",
        "clean acc",
        "adv acc",
        "uncertainty clean",
        "uncertainty adv",
        "ROC-AUC",
        "LR score (train acc)",
    ]
    rows, data = [], []
    for r in records:
        if r.get("kind") != "detection":
            continue
        d = r["detection"]
        rows.append(
            [
                str(r["row"]),
                str(r["attack"]),
                "—" if r.get("eps") is None else f"{r['eps']:g}",
                str(d.get("mc_samples", "")),
                str(r.get("n", "")),
                pct(d.get("clean_accuracy")),
                pct(d.get("adv_accuracy")),
                _sci(d.get("uncertainty_clean")),
                _sci(d.get("uncertainty_adv")),
                f"{d['auc']:.3f}",
                pct(d.get("lr_score"), 1),
            ]
        )
        data.append(dict(r))
    return Table(title, heads, rows, data)


def _sci(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}"
