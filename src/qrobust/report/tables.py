"""Result tables in the seeds' formats: markdown, CSV and JSON.

The summary table follows EMPIR's README (rows = models and ensembles; columns = clean, one column
per attack at its table eps, and the average over the attack columns), with detection ROC-AUCs
appended. The detection table follows QNN-defense's logs (clean and adversarial accuracy of the
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


WORST_CASE = "worst_case"  # attack_name of qrobust.attacks.WorstCase records: a column of their own


def is_worst_case(r: Record) -> bool:
    return str(r.get("attack_name") or "") == WORST_CASE


def expand_clean(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Copy each target's clean result onto every report row of that target (an ensemble's legacy and
    adaptive rows share one clean accuracy), so per-row consumers (tables, sanity checks) see it. A
    worst-case result covers every threat model of its target, so it is copied too, onto the rows that
    lack one at that eps."""
    rows_of: dict[str, list[str]] = {}
    for r in records:
        if r.get("kind") == "attack":
            rows_of.setdefault(str(r["target"]), [])
            if r["row"] not in rows_of[str(r["target"])]:
                rows_of[str(r["target"])].append(str(r["row"]))
    have = {(str(r["row"]), str(r["attack"]), r.get("eps")) for r in records if is_worst_case(r)}
    out: list[dict[str, Any]] = []
    for r in records:
        rows = rows_of.get(str(r.get("target")))
        if r.get("kind") == "clean" and rows:
            out += [{**r, "row": row} for row in rows]
        elif is_worst_case(r) and rows:
            out.append(dict(r))
            out += [{**r, "row": row} for row in rows
                    if row != r["row"] and (row, str(r["attack"]), r.get("eps")) not in have]
        else:
            out.append(dict(r))
    return out


def _default_columns(recs: Sequence[Record]) -> list[tuple[str, float | None]]:
    """Every attack at its largest eps below 1 (else its largest eps)."""
    found: dict[str, list[float]] = {}
    for r in recs:
        if r["kind"] == "attack":
            found.setdefault(str(r["attack"]), [])
            if r.get("eps") is not None:
                found[str(r["attack"])].append(float(r["eps"]))
    columns: list[tuple[str, float | None]] = []
    for label, eps in found.items():
        bounded = [e for e in eps if 0 < e < 1]
        columns.append((label, max(bounded) if bounded else (max(eps) if eps else None)))
    return columns


def _cells(recs: Sequence[Record], det: Sequence[Record], columns: Sequence[tuple[str, float | None]]
           ) -> tuple[dict[tuple[str, str], Record], dict[str, str]]:
    """(row, column label | "clean" | "auc:<attack>") -> record, and row -> bits."""
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
    return cells, bits


def _acc(v: Record | None) -> float | None:
    return v["accuracy"] if v is not None else None


Column = tuple[str, float | None]


def _summary_row(row: str, cells: Mapping[tuple[str, str], Record], attacks: Sequence[Column],
                 worst: Sequence[Column], det_labels: Sequence[str], bits: str,
                 sanity: SanityReport | None) -> tuple[list[str], dict[str, Any]]:
    """One summary line (display strings) and its JSON row."""
    clean = cells.get((row, "clean"))
    values = [cells.get((row, label)) for label, _ in attacks]
    worst_values = [cells.get((row, label)) for label, _ in worst]
    accs = [v["accuracy"] for v in values if v is not None and v.get("accuracy") is not None]
    average = sum(accs) / len(accs) if accs and len(accs) == len(values) else None
    aucs = [cells.get((row, "auc:" + label)) for label in det_labels]
    line = [row, bits, pct(_acc(clean))] + [pct(_acc(v)) for v in values]
    if attacks:
        line.append(pct(average))
    line += [pct(_acc(v)) for v in worst_values]
    line += [f"{a['detection']['auc']:.3f}" if a else "—" for a in aucs]
    flagged = sanity is not None and row in sanity.flagged_rows()
    line.append("—" if sanity is None else ("**suspected gradient masking**" if flagged else "ok"))
    data = {
        "model": row,
        "bits": bits,
        "clean": _acc(clean),
        **{_col(label, eps): _acc(v) for (label, eps), v in zip(attacks, values, strict=True)},
        "average": average,
        **{_worst_col(eps): _acc(v) for (_, eps), v in zip(worst, worst_values, strict=True)},
        **{f"AUC {label}": (a["detection"]["auc"] if a else None)
           for label, a in zip(det_labels, aucs, strict=True)},
        "sanity": ([v.as_dict() for v in sanity.for_row(row)] if sanity is not None else None),
        "records": [dict(x) for x in [clean, *values, *worst_values, *aucs] if x is not None],
    }
    return line, data


def summary_table(
    records: Sequence[Record],
    columns: Sequence[tuple[str, float | None]] | None = None,
    *,
    sanity: SanityReport | None = None,
    title: str = "Accuracy (%)",
) -> Table:
    """EMPIR-style table. ``columns``: (attack label, eps shown); by default every attack at its
    largest eps below 1. Worst-case columns (:class:`qrobust.attacks.WorstCase` results) come after the
    average, which they do not enter; detection AUCs (kind ``detection``) are appended per attack."""
    recs = expand_clean([r for r in records if r.get("kind") in ("clean", "attack")])
    columns = list(columns) if columns is not None else _default_columns(recs)
    worst_labels = {str(r["attack"]) for r in recs if is_worst_case(r)}
    attacks = [c for c in columns if c[0] not in worst_labels]
    worst = [c for c in columns if c[0] in worst_labels]
    det = [r for r in records if r.get("kind") == "detection"]
    det_labels = list(dict.fromkeys(str(r["attack"]) for r in det))
    cells, bits = _cells(recs, det, columns)
    heads = ["model", "bits", "clean"] + [_col(label, eps) for label, eps in attacks]
    heads += ["average"] if attacks else []
    heads += [_worst_col(eps) for _, eps in worst] + [f"AUC {label}" for label in det_labels] + ["sanity"]
    rows, data = [], []
    for row in _row_order([*recs, *det]):
        if any(k[0] == row for k in cells):
            line, d = _summary_row(row, cells, attacks, worst, det_labels, bits.get(row, ""), sanity)
            rows.append(line)
            data.append(d)
    notes = []
    if columns:
        notes.append(
            "Columns: accuracy in % on the first N test images; each attack column at the eps in "
            "parentheses; average = mean over the attack columns (EMPIR's README convention)."
        )
    if worst:
        notes.append(
            "Worst case: per image, the first success of a suite of attacks (APGD-CE, APGD-T, Square; for "
            "an ensemble also its legacy, adaptive and vote-aware targets, covering every threat model, so "
            "all rows of an ensemble share it), each later attack only on the images still standing."
        )
    return Table(title, heads, rows, data, notes)


def _worst_col(eps: float | None) -> str:
    return "worst case" if eps is None else f"worst case ({eps:g})"


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
    """QNN-defense's log layout, one line per (model, attack): accuracies, uncertainty, detection scores."""
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
