"""Report figures with matplotlib's Agg backend (no display needed): accuracy vs eps, ROC, bit width.

Each function takes result records (see :mod:`qrobust.report.tables`), writes one PNG and returns
its path, or ``None`` when the records hold nothing to plot.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Record = Mapping[str, Any]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "x"


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def accuracy_vs_eps(
    records: Sequence[Record], attack: str, path: str | os.PathLike, masked: set[str] | None = None
) -> Path | None:
    """One line per model/ensemble row: accuracy against eps for attack ``attack``, 95% Wilson bars.

    Rows in ``masked`` (flagged by the sanity checks) are drawn dashed and marked in the legend.
    """
    curves: dict[str, list[tuple[float, float, float, float]]] = {}
    for r in records:
        if r.get("kind") != "attack" or r["attack"] != attack or r.get("eps") is None:
            continue
        lo, hi = r.get("ci95") or (r["accuracy"], r["accuracy"])
        curves.setdefault(str(r["row"]), []).append((float(r["eps"]), r["accuracy"], lo, hi))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for row, pts in curves.items():
        pts.sort()
        eps = [p[0] for p in pts]
        acc = [100 * p[1] for p in pts]
        err = [[100 * (p[1] - p[2]) for p in pts], [100 * (p[3] - p[1]) for p in pts]]
        flagged = masked is not None and row in masked
        ax.errorbar(
            eps,
            acc,
            yerr=err,
            marker="o",
            ms=4,
            capsize=2,
            linestyle="--" if flagged else "-",
            label=row + (" (sanity check failed)" if flagged else ""),
        )
    ax.set_xlabel("eps (L-inf, pixels in [0, 1])")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{attack}: accuracy vs eps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def roc_plot(
    path: str | os.PathLike,
    curves: Mapping[str, Mapping[str, Any] | None],
    title: str = "Detection ROC",
    *,
    mark_fpr: float | None = None,
) -> Path | None:
    """THE ROC figure: one curve per label from ``{"fpr", "tpr", "auc"}`` (see
    :func:`qrobust.detect.roc_points`; None entries are skipped), AUC in the legend, optionally a
    vertical line at the operating false-positive rate ``mark_fpr``."""
    curves = {k: v for k, v in curves.items() if v is not None}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, roc in curves.items():
        ax.plot(roc["fpr"], roc["tpr"], label=f"{label} (AUC {roc['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    if mark_fpr is not None:
        ax.axvline(mark_fpr, color="grey", linewidth=0.5, linestyle="--")
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (adversarial flagged)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def roc_curves(
    records: Sequence[Record], path: str | os.PathLike, title: str = "Detection ROC"
) -> Path | None:
    """ROC curves of the detection records (one curve per model and attack)."""
    curves = {}
    for r in records:
        if r.get("kind") == "detection" and r["detection"].get("roc"):
            eps = "" if r.get("eps") is None else f" eps={r['eps']:g}"
            det = r["detection"]
            curves[f"{r['row']} / {r['attack']}{eps}"] = {**det["roc"], "auc": det["auc"]}
    return roc_plot(path, curves, title)


def bits_key(bits: str) -> tuple[int, int]:
    """Sort key for bit labels like ``a4w2``, ``k5`` or ``FP`` (full precision last)."""
    if bits.upper() == "FP":
        return (99, 99)
    nums = [int(n) for n in re.findall(r"\d+", bits)] or [99]
    return (min(nums), sum(nums))


def robustness_vs_bits(
    records: Sequence[Record], columns: Sequence[tuple[str, float | None]], path: str | os.PathLike
) -> Path | None:
    """Accuracy of single (non-ensemble) models against their bit width, one line per attack column.

    Several models with the same bit width are averaged (e.g. two a4w2 members). Needs at least two
    distinct bit widths.
    """
    attacked = {r["target"] for r in records if r.get("kind") == "attack"}
    single = [
        r
        for r in records
        if r.get("bits")
        and not r.get("ensemble")
        and r.get("target") in attacked
        and r.get("kind") in ("clean", "attack")
    ]
    widths = sorted({str(r["bits"]) for r in single}, key=bits_key)
    if len(widths) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("clean", None), *columns]
    plotted = False
    for label, eps in series:
        xs, ys = [], []
        for i, w in enumerate(widths):
            if label == "clean":
                vals = [r["accuracy"] for r in single if r["bits"] == w and r["kind"] == "clean"]
            else:
                vals = [
                    r["accuracy"]
                    for r in single
                    if r["bits"] == w
                    and r["kind"] == "attack"
                    and r["attack"] == label
                    and r.get("eps") == eps
                ]
            if vals:
                xs.append(i)
                ys.append(100 * sum(vals) / len(vals))
        if xs:
            plotted = True
            ax.plot(xs, ys, marker="o", label=label if eps is None else f"{label} (eps {eps:g})")
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xticks(range(len(widths)), widths)
    ax.set_xlabel("bit width (activations a, weights w; FP = 32-bit float)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Robustness vs bit width (single models)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
