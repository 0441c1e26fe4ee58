"""Render EMPIR's README table (MNIST or CIFAR-10) beside ours, from the store of a ``qrobust run``.

    qrobust run configs/empir_mnist.toml --data-root ../shared/data      # computes (cached, resumable)
    python scripts/reproduce_empir.py --dataset mnist [--run runs/empir_mnist] [--out FILE]

The protocol (attacks, threat models, images, seeds) is the config's (configs/empir_<dataset>.toml); the
SQLite store of that run is the only cache. This script computes nothing: it reads the newest record of
each cell, puts the README's numbers beside them, and writes docs/results/empir_<dataset>.md with the
command, date and code version that produced it. Every sentence about the results is generated from the
numbers on the page.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from qrobust.evaluate import wilson_interval
from qrobust.experiment import load_config
from qrobust.experiment.results import latest_records, stamp
from qrobust.experiment.runner import STORE_NAME
from qrobust.utils import update_marked_section

REPO = Path(__file__).resolve().parents[1]
ATTACKS = ("CW-L2", "FGSM", "BIM", "PGD")  # the configs' attack labels, in the README's column order
TRAMER = "PGD-100 (Tramer)"
MODE_TEXT = {
    "legacy": "**legacy** (EMPIR's gradients)",
    "adaptive": "**adaptive** (mean softmax of all members)",
    "adaptive_logits": "**adaptive, mean logits** (all members)",
}
# EMPIR's README (10,000 test images): clean, CW, FGSM, BIM, PGD, average
PAPER: dict[str, dict[str, Any]] = {
    "mnist": {
        "title": "MNIST",
        "empir": (98.89, 86.73, 67.06, 18.61, 17.51, 47.48),
        "baseline": (98.87, 3.69, 14.32, 0.90, 0.77, 4.92),
        "seed_epochs": "15 (mnist_attack.py --nb_epochs default)",
    },
    "cifar10": {
        "title": "CIFAR-10",
        "empir": (72.56, 48.51, 20.45, 24.59, 13.55, 26.78),
        "baseline": (74.54, 13.38, 10.28, 11.97, 10.69, 11.58),
        "seed_epochs": "not stated in the README",
        "tramer": "Tramer et al. report 1.5% on CIFAR-10; ART's replication 1.41%",
    },
}


def pct_ci(rec: dict[str, Any] | None, missing: str = "not run") -> str:
    """Accuracy % with its 95% Wilson interval (``missing`` when there is no such cell)."""
    if rec is None:
        return missing
    lo, hi = wilson_interval(rec["correct"], rec["n"])
    return f"{100 * rec['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def worst_of(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per image, robust only if the vote survived every threat model run (their stored outcomes)."""
    masks = [c["correct_mask"] for c in cells if c.get("correct_mask")]
    if len(masks) < 2 or len({len(m) for m in masks}) != 1:
        return None
    n = len(masks[0])
    correct = sum(all(m[i] == "1" for m in masks) for i in range(n))
    return {"accuracy": correct / n, "correct": correct, "n": n}


def row(label: str, clean: dict[str, Any] | None, cells: dict[str, dict[str, Any] | None],
        missing: str = "not run") -> list[str]:
    done = [cells[a]["accuracy"] for a in ATTACKS if cells.get(a)]
    avg = f"{100 * sum(done) / len(done):.2f}" if len(done) == len(ATTACKS) else "—"
    return [label, pct_ci(clean), *(pct_ci(cells.get(a), missing) for a in ATTACKS), avg]


def table(cfg: Any, records: dict, paper: dict[str, Any]) -> tuple[list[list[str]], dict[str, Any]]:
    """The README table's rows (README, ours per threat model, worst per image, baselines) and the numbers
    the findings are generated from."""
    ens = cfg.ensembles[0]
    base = ens.members[-1]  # model 3, the full-precision member, is EMPIR's baseline
    clean_e, clean_b = records.get(("clean", ens.name, "clean", None, None)), records.get(
        ("clean", base, "clean", None, None))
    eps_of = {a.label: (None if a.table_eps is None else round(a.table_eps, 6)) for a in cfg.attacks}
    per_mode = {m: {a: records.get(("attack", ens.name, a, m, eps_of.get(a))) for a in ATTACKS}
                for m in ens.targets}
    baseline = {a: records.get(("attack", base, a, None, eps_of.get(a))) for a in ATTACKS}
    worst = {a: worst_of([per_mode[m][a] for m in ens.targets if per_mode[m][a]]) for a in ATTACKS}
    rows = [["EMPIR, README (10,000 images)", *(f"{v:.2f}" for v in paper["empir"])]]
    rows += [row(f"EMPIR, ours — {MODE_TEXT.get(m, m)}", clean_e, per_mode[m]) for m in ens.targets]
    modes = ", ".join(m.replace("_", " ") for m in ens.targets)
    rows.append(row(f"EMPIR, ours — worst of {modes}, per image", clean_e, worst,
                    "— (needs two threat models with per-image outcomes)"))
    rows.append([f"{cfg.model(base).label} baseline, README", *(f"{v:.2f}" for v in paper["baseline"])])
    rows.append(row(f"{cfg.model(base).label} baseline, ours", clean_b, baseline))
    return rows, {"per_mode": per_mode, "worst": worst, "baseline": baseline, "clean": clean_e,
                  "base": base}


def average(cells: dict[str, dict[str, Any] | None]) -> float | None:
    vals = [c["accuracy"] for c in cells.values() if c]
    return 100 * sum(vals) / len(vals) if len(vals) == len(ATTACKS) else None


def findings(numbers: dict[str, Any], paper: dict[str, Any]) -> list[str]:
    """Sentences computed from the table's numbers (nothing here is written by hand)."""
    out = []
    legacy, worst = average(numbers["per_mode"].get("legacy", {})), average(numbers["worst"])
    if legacy is not None:
        out.append(f"Against EMPIR's own gradients (legacy) the ensemble keeps {legacy:.2f}% on average over "
                   f"the four attacks (README: {paper['empir'][-1]:.2f}%).")
    if legacy is not None and worst is not None:
        verdict = "the legacy gradients overstate robustness" if worst < legacy - 1 else "within 1 point"
        out.append(f"Counting an image as robust only if it survives every threat model, the average falls "
                   f"to {worst:.2f}% ({worst - legacy:+.2f} points from legacy: {verdict}).")
    base = average(numbers["baseline"])
    if base is not None:
        out.append(f"The full-precision baseline alone averages {base:.2f}% (README: "
                   f"{paper['baseline'][-1]:.2f}%).")
    return out


def settings_text(records: dict) -> list[str]:
    """Each attack's settings as stored in its records' ``attack_config`` (what the code ran)."""
    seen: dict[str, str] = {}
    skip = {"attack", "bounds", "targeted", "eot_samples", "ensemble_mode", "target_output", "target", "loss"}
    for r in records.values():
        if r["kind"] == "attack" and r["attack"] not in seen:
            cfg = r.get("attack_config", {})
            kept = [(k, v) for k, v in sorted(cfg.items()) if k not in skip and v is not None]
            seen[r["attack"]] = ", ".join(f"{k} {v}" for k, v in kept)
    return [f"- {label}: {text}" for label, text in seen.items()]


def render(dataset: str, cfg: Any, records: dict, command: str, store: Path) -> str:
    paper = PAPER[dataset]
    rows, numbers = table(cfg, records, paper)
    n = numbers["clean"]["n"] if numbers["clean"] else cfg.samples
    lines = [stamp(command, store, records), "",
             f"Accuracy (%) on the first {n} {paper['title']} test images; ours with a 95% Wilson interval. "
             "Average = mean of the four attack columns.", "",
             "| system | clean | CW-L2 | FGSM | BIM | PGD | average |", "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    tramer = {m: records.get(("attack", cfg.ensembles[0].name, TRAMER, m, round(8 / 255, 6)))
              for m in ("adaptive", "adaptive_logits")}
    if any(tramer.values()):
        done = "; ".join(f"{MODE_TEXT[m]} {pct_ci(r)} on {r['n']} images" for m, r in tramer.items() if r)
        lines += ["", "Tramer et al. (2020) setting (PGD eps 8/255, step 0.0078 x 100, random start) on "
                  f"EMPIR: {done} ({paper['tramer']})."]
    lines += ["", "## Findings (generated from the numbers above)", ""]
    lines += [f"- {s}" for s in findings(numbers, paper)]
    specs = [cfg.model(m) for m in cfg.ensembles[0].members]
    members = ", ".join(f"`{m.recipe or m.checkpoint}`" for m in specs)
    lines += ["", "## Protocol", "",
              f"Config `{cfg.source}` (labels = the attacked system's own clean predictions; accuracy "
              f"against the true labels; attack batch {cfg.batch_size}; seed {cfg.seed}). Members "
              f"{members} (model 3 breaks "
              f"ties in the vote and is the baseline). Seed's training: {paper['seed_epochs']}; ours: the "
              "recipes (docs/results/training.md). Attack settings as run:", "", *settings_text(records)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(PAPER), required=True)
    ap.add_argument("--config", default=None, help="experiment file (default configs/empir_<dataset>.toml)")
    ap.add_argument("--run", default=None, help="output directory of the qrobust run (default: the config's)")
    ap.add_argument("--out", default=None, help="markdown file (default docs/results/empir_<dataset>.md)")
    args = ap.parse_args()
    cfg = load_config(args.config or REPO / "configs" / f"empir_{args.dataset}.toml")
    store = Path(args.run or cfg.output_dir) / STORE_NAME
    records = latest_records(store)
    out = Path(args.out) if args.out else REPO / "docs" / "results" / f"empir_{args.dataset}.md"
    command = "python scripts/reproduce_empir.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    body = render(args.dataset, cfg, records, command, store)
    title = f"EMPIR reproduction: {PAPER[args.dataset]['title']}"
    update_marked_section(out, f"empir-{args.dataset}", body, title=title)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
