"""Render robustness vs bit width (MNISTconv, 1 to 32 bits) from the store of a ``qrobust run``.

    qrobust run configs/bitwidth_mnist.toml --data-root ../shared/data   # computes (cached, resumable)
    python scripts/reproduce_bitwidth.py [--run runs/bitwidth_mnist] [--out FILE]

Seed A asks whether quantizing a net makes it more robust; its evidence is gradient attacks, which
quantizers can mislead. This page puts the seeds' PGD beside qrobust's per-image worst case (APGD-CE,
APGD-T, Square) at every bit width. The script computes nothing: it reads the newest record of each cell,
writes docs/results/bitwidth_mnist.md (stamped with the command, date and code version; every sentence
about the results generated from the numbers) and a figure under docs/results/figures/.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from qrobust.evaluate import wilson_interval
from qrobust.experiment import load_config
from qrobust.experiment.results import attack_settings_lines, latest_records, stamp
from qrobust.experiment.runner import STORE_NAME
from qrobust.utils import update_marked_section

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "bitwidth_mnist.md"
PGD, WORST = "PGD", "worst case"  # the config's attack labels
MASKING_GAP = 0.10  # PGD this far above the worst case: gradient masking suspected


def bits_of(model: Any) -> int:
    """Bit width of a sweep model: its recipe's k (``mnistconv_w4a4``), 32 for full precision."""
    found = re.search(r"_w(\d+)a(\d+)", model.recipe or model.name)
    return int(found.group(1)) if found else 32


def pct_ci(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "not run"
    lo, hi = wilson_interval(rec["correct"], rec["n"])
    return f"{100 * rec['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def collect(cfg: Any, records: dict) -> list[dict[str, Any]]:
    """Per model (by bit width): clean, and PGD / worst case at every eps of the config."""
    eps = sorted({round(e, 6) for a in cfg.attacks for e in a.eps if e is not None})
    rows = []
    for m in sorted(cfg.models, key=bits_of):
        cells = {(a, e): records.get(("attack", m.name, a, None, e)) for a in (PGD, WORST) for e in eps}
        rows.append({"name": m.name, "label": m.label, "bits": bits_of(m),
                     "clean": records.get(("clean", m.name, "clean", None, None)), "cells": cells})
    return rows


def square_breaks(rec: dict[str, Any] | None) -> int:
    """Images broken only by Square (gradient-free), after every gradient attack of the suite."""
    per = ((rec or {}).get("attack_config") or {}).get("report", {}).get("per_attack", [])
    return sum(p["broken"] for p in per if p["attack"].startswith("square"))


def table(rows: list[dict[str, Any]], eps: list[float]) -> list[str]:
    head = ["bits", "model", "clean"]
    for e in eps:
        head += [f"PGD {e:g}", f"worst case {e:g}", f"PGD − worst {e:g}", f"broken only by Square {e:g}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["bits"]), r["label"], pct_ci(r["clean"])]
        for e in eps:
            p, w = r["cells"][(PGD, e)], r["cells"][(WORST, e)]
            gap = f"{100 * (p['accuracy'] - w['accuracy']):+.1f}" if p and w else "—"
            cells += [pct_ci(p), f"**{pct_ci(w)}**" if w else "not run", gap,
                      str(square_breaks(w)) if w else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def findings(rows: list[dict[str, Any]], eps: list[float]) -> list[str]:
    """Per eps: the worst case's range over bit widths, the most robust width, PGD's overstatement."""
    out = []
    for e in eps:
        done = [(r, r["cells"][(WORST, e)]) for r in rows if r["cells"][(WORST, e)]]
        if not done:
            continue
        best = max(done, key=lambda d: d[1]["accuracy"])
        worst = min(done, key=lambda d: d[1]["accuracy"])
        text = (f"At eps {e:g} the per-image worst case ranges from {100 * worst[1]['accuracy']:.1f}% "
                f"({worst[0]['bits']} bits) to {100 * best[1]['accuracy']:.1f}% ({best[0]['bits']} bits)")
        both = [(r, r["cells"][(PGD, e)], w) for r, w in done if r["cells"][(PGD, e)]]
        if both:
            r, p, w = max(both, key=lambda d: d[1]["accuracy"] - d[2]["accuracy"])
            gap = p["accuracy"] - w["accuracy"]
            text += (f"; PGD overstates it most at {r['bits']} bits, by {100 * gap:.1f} points "
                     f"({100 * p['accuracy']:.1f}% vs {100 * w['accuracy']:.1f}%)")
            masked = [str(r["bits"]) for r, p, w in both if p["accuracy"] - w["accuracy"] >= MASKING_GAP]
            if masked:
                text += (f"; gradient masking suspected (PGD {100 * MASKING_GAP:.0f}+ points above the worst "
                         f"case) at {', '.join(masked)} bits")
        out.append(text + ".")
    return out


def figure(rows: list[dict[str, Any]], eps: list[float], path: Path) -> Path | None:
    """Robust accuracy vs bits, one line per (attack, eps) plus clean, 95% Wilson interval bars."""
    from qrobust.report import plots  # sets matplotlib's Agg backend

    plt = plots.plt
    series = [("clean", None)] + [(a, e) for e in eps for a in (PGD, WORST)]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = False
    for i, (attack, e) in enumerate(series):
        pts = [(r["bits"], r["clean"] if e is None else r["cells"][(attack, e)]) for r in rows]
        pts = [(b, rec) for b, rec in pts if rec]
        if not pts:
            continue
        drawn = True
        xs = [b * (1 + 0.03 * (i - len(series) / 2)) for b, _ in pts]  # small offsets keep bars apart
        ys = [100 * rec["accuracy"] for _, rec in pts]
        cis = [wilson_interval(rec["correct"], rec["n"]) for _, rec in pts]
        err = [[y - 100 * lo for y, (lo, _) in zip(ys, cis, strict=True)],
               [100 * hi - y for y, (_, hi) in zip(ys, cis, strict=True)]]
        color = "black" if e is None else f"C{eps.index(e)}"  # one colour per eps: PGD dashed, worst solid
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, linestyle="--" if attack == PGD else "-",
                    color=color, label=attack if e is None else f"{attack}, eps {e:g}")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["bits"] for r in rows], [str(r["bits"]) for r in rows])
    ax.set_xlabel("bits (weights and activations; 32 = full precision)")
    ax.set_ylabel("accuracy (%), 95% Wilson interval")
    ax.set_ylim(-2, 102)
    ax.set_title("MNISTconv: robustness vs bit width (dashed: PGD, solid: worst case)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return plots._save(fig, path)


def render(cfg: Any, records: dict, command: str, store: Path, out: Path) -> str:
    eps = sorted({round(e, 6) for a in cfg.attacks for e in a.eps if e is not None})
    rows = collect(cfg, records)
    fig = figure(rows, eps, out.parent / "figures" / "bitwidth_mnist.png")
    n = next((r["clean"]["n"] for r in rows if r["clean"]), cfg.samples)
    total = sum(float(r.get("seconds") or 0) for r in records.values())
    lines = [stamp(command, store, records), "",
             f"Recompute (members from the committed zoo/): "
             f"`qrobust run configs/{Path(str(cfg.source)).name} "
             f"--data-root ../shared/data && {command}` (each cell is cached; a rerun computes only missing "
             f"cells). Compute time of the cells: {total / 60:.1f} min (sum of the stored cells' seconds).",
             "",
             f"Accuracy (%) on the first {n} MNIST test images with a 95% Wilson interval, L-inf eps in "
             "pixels in [0, 1].", "", *table(rows, eps), ""]
    lines += [f"![robustness vs bit width](figures/{fig.name})" if fig else "No cell is stored yet.", ""]
    lines += ["## Findings (generated from the numbers above)", ""]
    lines += [f"- {s}" for s in findings(rows, eps)] or ["- No worst-case cell is stored yet."]
    lines += ["", "## Protocol", "", PROTOCOL.format(cfg=cfg, source=Path(str(cfg.source)).name), "",
              *settings_text(records)]
    return "\n".join(lines)


PROTOCOL = (
    'Config `configs/{source}` (seed {cfg.seed}, attack batch {cfg.batch_size}). Models: MNISTconv with '
    'weights and activations at k bits (recipes `mnistconv_w{{k}}a{{k}}`, each fine-tuned from '
    '`mnistconv_fp`; docs/results/training.md) and the full-precision MNISTconv (32 bits). **PGD** = the '
    "seeds' protocol (EMPIR's: step 0.01 x 40 from a uniform random start, labels = the model's own "
    'predictions): a gradient attack only, so its number is an upper bound on the robust accuracy. '
    '**Worst case** = `qrobust.suite.WorstCase`: per image, the first success of APGD-CE, APGD-T '
    '(targeted DLR) and Square (gradient-free, CW margin), each later attack only on the images still '
    'standing, labels = the true labels (a clean mistake counts as broken). *Broken only by Square* = '
    'images every gradient attack of the suite left standing. Attack settings as run: '
)


SETTINGS_SKIP = {"attack", "bounds", "targeted", "eot_samples", "loss", "report", "eps"}


def settings_text(records: dict) -> list[str]:
    return attack_settings_lines(records, SETTINGS_SKIP)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "bitwidth_mnist.toml"))
    ap.add_argument("--run", default=None, help="output directory of the qrobust run (default: the config's)")
    ap.add_argument("--out", default=str(OUT), help="markdown file (the figure goes to figures/ beside it)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    store = Path(args.run or cfg.output_dir) / STORE_NAME
    records = latest_records(store)
    args_text = " ".join(shlex.quote(a) for a in sys.argv[1:])
    command = f"python scripts/reproduce_bitwidth.py {args_text}".strip()
    out = Path(args.out)
    update_marked_section(out, "bitwidth-mnist", render(cfg, records, command, store, out),
                          title="Robustness vs bit width: MNISTconv (issue 13)")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
