"""Render QNN-defense's Monte-Carlo dropout detection rows (MNIST) beside ours, from a ``qrobust run`` store.

    qrobust run configs/qnn_detection_mnist.toml --data-root ../shared/data    # computes (cached, resumable)
    python scripts/reproduce_qnn_detection.py [--run runs/qnn_detection_mnist] [--out FILE]

The protocol (models, attacks and their adaptive versions, images, Monte-Carlo passes, seeds) is the
config's; the SQLite store of that run is the only cache. This script computes nothing: it reads the
newest detection record of each cell, puts QNN-defense's logged numbers beside them, draws one ROC figure per
model from the stored curves, and writes docs/results/qnn_detection.md stamped with the command, date and
code version. Every sentence about the results is generated from the numbers on the page.
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
from qrobust.utils import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "qnn_detection.md"
# QNN-defense's logged rows (500 MNIST test images; shared/spec/seed-systems.md "Logged results"), keyed by
# (recipe, attack label of configs/qnn_detection_mnist.toml): clean %, adversarial %, "LR" detection score %.
SEED: dict[tuple[str, str], dict[str, Any]] = {
    ("qnn_5bit_d05", "FGSM"): {"clean": 97.8, "adv": 60.0, "unc": "1.98e-3 → 1.33e-2", "lr": 78.2},
    ("qnn_fp_d05", "PGD"): {"clean": 98.2, "adv": 0.6, "lr": 51.4},
    ("qnn_bnn", "PGD"): {"clean": 93.0, "adv": 11.6, "lr": 68.3},
    ("qnn_fp_d05", "JSMA"): {"clean": 99.2, "adv": 32.8, "lr": 93.9},
    ("qnn_2bit_d05", "JSMA"): {"lr": 86.6},
    ("qnn_3bit_d05", "JSMA"): {"lr": 85.1},
    ("qnn_4bit_d05", "JSMA"): {"lr": 80.7},
    ("qnn_rbnn", "JSMA"): {"clean": 85.6, "adv": 47.0, "lr": 76.0},
}
PROTOCOL = """
- QNN-defense's protocol, as the config runs it: the first n MNIST test images (column n); untargeted attacks
  with the model's own prediction (one stochastic pass) as labels; then T Monte-Carlo passes on clean and
  adversarial inputs (generators seeded 1 and 2). *single* = accuracy of one pass (mean over the T
  passes), *group* = argmax of the summed softmaxes. Uncertainty = QNN-defense's score, the mean over classes
  of the per-class variance of the softmax across passes.
- **seed LR** = QNN-defense's detection number as the seed computed it: TRAINING accuracy of a 1-D logistic
  regression on the variance, clean vs all attacked inputs (failed attacks included), no held-out data.
- **Our detection metrics**: on a held-out half of the images (split by image with the run's seed, the
  raw variance is the score): ROC-AUC with a 95% bootstrap interval and TPR at 5% FPR, (a) clean vs every
  attacked input, (b) only successful adversarial examples vs the clean versions of the same images.
  Accuracy intervals: Wilson 95%.
- Attack settings as run (from the stored records):
""".strip()


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def auc_text(m: dict[str, Any]) -> str:
    ci = m.get("auc_ci95") or [None, None]
    if m.get("auc") is None:
        return "–"
    return f"{m['auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else "")


def seed_text(cfg: Any, rec: dict[str, Any]) -> str:
    s = SEED.get((cfg.model(rec["target"]).recipe or rec["target"], rec["attack"]))
    if not s:
        return "–"
    unc = f" (unc {s['unc']})" if "unc" in s else ""
    return f"{s.get('clean', '–')} / {s.get('adv', '–')} / {s['lr']}{unc}"


def result_row(cfg: Any, rec: dict[str, Any]) -> str:
    r = rec["detection"]["report"]
    n = r["n"]
    ca, aa = r["clean_accuracy"], r["adv_accuracy"]
    ha, hs = r["heldout_all"]["seed_variance"], r["heldout_success"]["seed_variance"]
    lo, hi = wilson_interval(round(aa["group"] * n), n)
    succ = f"{auc_text(hs)} ({hs['n_pos']})" if hs.get("n_pos") else "– (0)"
    cells = [
        cfg.model(rec["target"]).label, rec["attack"], str(n), seed_text(cfg, rec),
        f"{pct(ca['single_pass'])} ({pct(ca['group'])})",
        f"{pct(aa['single_pass'])} ({pct(aa['group'])}) [{100 * lo:.1f}, {100 * hi:.1f}]",
        f"{r['mean_stats_clean']['seed_variance']:.2e} → {r['mean_stats_adv']['seed_variance']:.2e}",
        pct(r["seed_lr_score"]), auc_text(ha), pct(ha.get("tpr@0.05fpr")), succ,
        pct(hs.get("tpr@0.05fpr")) if hs.get("n_pos") else "–",
    ]
    return "| " + " | ".join(cells) + " |"


def other_row(cfg: Any, rec: dict[str, Any]) -> str:
    r = rec["detection"]["report"]
    a = r["heldout_all"]
    cells = [cfg.model(rec["target"]).label, rec["attack"], f"{a['entropy']['auc']:.3f}",
             f"{a['mutual_info']['auc']:.3f}", f"{a['pred_var']['auc']:.3f}", pct(r["heldout_lr_accuracy"]),
             str(r["n"]), f"{rec['seconds']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def verdict(auc: float) -> str:
    """What a held-out ROC-AUC says, in words (thresholds stated on the page)."""
    if auc >= 0.9:
        return "detected"
    if auc >= 0.6:
        return "partly separated"
    if auc > 0.4:
        return "no better than chance"
    return "inverted: the adversarial inputs look more certain than the clean ones"


def _cell_text(d: dict[str, Any]) -> str:
    det = d["detection"]
    return (f"{d['attack']} (AUC {det['auc']:.3f}, {verdict(det['auc'])}; adversarial accuracy "
            f"{pct(det['adv_accuracy'])}%; mean variance {det['uncertainty_clean']:.2e} → "
            f"{det['uncertainty_adv']:.2e})")


def findings(cfg: Any, dets: list[dict[str, Any]]) -> list[str]:
    """Per model: the attacks with the highest and lowest held-out AUC, in numbers and words (AUC >= 0.9
    detected, >= 0.6 partly separated, > 0.4 chance, else inverted); nothing here is written by hand."""
    out = []
    for name in dict.fromkeys(d["target"] for d in dets):
        rows = [d for d in dets if d["target"] == name and d["detection"]["auc"] is not None]
        if not rows:
            continue
        best = max(rows, key=lambda d: d["detection"]["auc"])
        worst = min(rows, key=lambda d: d["detection"]["auc"])
        text = f"{cfg.model(name).label}: highest held-out AUC {_cell_text(best)}"
        if worst is not best:
            text += f"; lowest {_cell_text(worst)}"
        out.append(text + ".")
    return out


def figures(cfg: Any, dets: list[dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """One ROC figure per model (seed variance, all attacked inputs, one curve per attack)."""
    from qrobust.report.plots import roc_plot, slug

    made = {}
    for name in dict.fromkeys(d["target"] for d in dets):
        curves = {d["attack"]: {**d["detection"]["roc"], "auc": d["detection"]["auc"]}
                  for d in dets if d["target"] == name and d["detection"]["roc"]["fpr"]}
        path = roc_plot(out_dir / f"qnn_detection_{slug(name)}.png", curves,
                        f"{cfg.model(name).label}: seed variance, held-out images", mark_fpr=0.05)
        if path is not None:
            made[name] = path.name
    return made


def _settings(config: dict[str, Any], skip: set[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(config.items()) if k not in skip and v is not None)


def settings_text(dets: list[dict[str, Any]]) -> list[str]:
    skip = {"bounds", "targeted", "loss"}
    seen = {d["attack"]: d.get("attack_config", {}) for d in dets}
    return [f"  - {label}: " + _settings(c, skip)
            for label, c in seen.items()]


WORST = "worst case"  # label of the config's worst_case entry (qrobust.suite.WorstCase)
SEED_ATTACKS = ("FGSM", "PGD", "JSMA")  # the seed's own attacks (one random sample per step)
WORST_TEXT = (
    "Defense accuracy (%, 95% Wilson interval) under qrobust's per-image worst case at eps {eps}: per "
    "image, the first success of APGD-CE, APGD-T (targeted DLR) and Square (gradient-free), each later "
    "attack only on the images still standing, labels = the true labels. On a randomized net (dropout "
    "kept on, stochastic weights) every attack runs through K Monte-Carlo copies computed batched "
    "(`_eot`: APGD follows the expected gradient, Square scores the mean prediction) and success is "
    "judged on the copies' mean prediction. Beside it, the seed's attacks (labels = one stochastic pass's"
    " predictions; accuracy of one pass) and the strongest adaptive row. A number without a gradient-free"
    " attack is an upper bound. The bold figure is judged as the suite judges (randomized nets: the K-copy"
    " mean); where one stochastic pass on the same inputs differs, it follows in parentheses. Column n is"
    " the worst case's; the other columns keep their own n (the Results table above gives it)."
)


def _suite_judged(rec: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The worst case as the suite judged it (on a randomized net: the K-copy mean prediction); the record's
    own accuracy is one stochastic pass on the suite's outputs. Deterministic models: the two agree."""
    if report.get("worst_case_accuracy") is None or not report.get("n"):
        return rec
    n, acc = report["n"], report["worst_case_accuracy"]
    return {"accuracy": acc, "correct": round(acc * n), "n": n}


def _acc(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "–"
    lo, hi = wilson_interval(rec["correct"], rec["n"])
    return f"{100 * rec['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def worst_case_section(cfg: Any, records: dict) -> list[str]:
    """Per model with a worst-case cell: clean, the seed's attacks, the strongest adaptive row, the worst
    case and the suite's cumulative breakdown (read from the stored suite report)."""
    spec = next((a for a in cfg.attacks if a.label == WORST), None)
    if spec is None:
        return []
    eps = round(spec.table_eps, 6)
    head = ("| model | n | clean | " + " | ".join(SEED_ATTACKS) + " | strongest adaptive row | worst case "
            "[95% CI] | robust after each suite attack (cumulative) | broken only by Square | s |")
    lines, found = [head, "|" + "---|" * (8 + len(SEED_ATTACKS))], []
    for m in cfg.models:
        rec = records.get(("attack", m.name, WORST, None, eps))
        if rec is not None:
            line, finding = _worst_row(cfg, records, m, rec)
            lines.append(line)
            found += [finding] if finding else []
    if len(lines) == 2:
        return []
    return ["## Defense accuracy under the per-image worst case", "", WORST_TEXT.format(eps=f"{eps:g}"), "",
            *lines, "", *[f"- {f}" for f in found], ""]


def _worst_row(cfg: Any, records: dict, m: Any, rec: dict[str, Any]) -> tuple[str, str | None]:
    """One model's worst-case row and the sentence comparing it with the strongest other attack's cell."""
    labels = {a.label for a in cfg.attacks}

    def cell(label: str) -> dict[str, Any] | None:
        if label not in labels:
            return None
        e = cfg.attack(label).table_eps
        return records.get(("attack", m.name, label, None, None if e is None else round(e, 6)))

    seed = [cell(a) for a in SEED_ATTACKS]
    adaptive = [cell(a.label) for a in cfg.attacks if a.label not in (*SEED_ATTACKS, WORST)]
    best = min((r for r in adaptive if r), key=lambda r: r["accuracy"], default=None)
    report = (rec.get("attack_config") or {}).get("report") or {}
    per = report.get("per_attack", [])
    steps = " → ".join(f"{p['attack']} {100 * p['robust_accuracy']:.1f}" for p in per) or "–"
    square = sum(p["broken"] for p in per if p["attack"].startswith("square"))
    worst = _suite_judged(rec, report)
    shown = f"**{_acc(worst)}**"
    if worst is not rec and worst["correct"] != rec["correct"]:
        shown += f" (one pass on its outputs: {100 * rec['accuracy']:.1f})"
    cells = [m.label, str(rec["n"]), _acc(records.get(("clean", m.name, "clean", None, None))),
             *(_acc(r) for r in seed), f"{_acc(best)} ({best['attack']})" if best else "–",
             shown, steps, str(square), f"{rec.get('seconds', 0):.0f}"]
    done = [r for r in [*seed, best] if r]
    if not done:
        return "| " + " | ".join(cells) + " |", None
    # The gap that matters is to the STRONGEST other cell: what the seed's protocol and the adaptive rows
    # at best report (10 points or more is the quickstart's gradient-masking flag).
    top = min(done, key=lambda r: r["accuracy"])
    on = "" if top["n"] == worst["n"] else (f" on its {top['n']} images, the worst case on the first "
                                             f"{worst['n']}")
    gap = 100 * (top["accuracy"] - worst["accuracy"])
    where = "below" if gap >= 0 else "above"
    text = (f"{m.label}: worst case {100 * worst['accuracy']:.1f}% at eps {rec['eps']:g}, "
            f"{abs(gap):.1f} points {where} the strongest other attack, {top['attack']} "
            f"({100 * top['accuracy']:.1f}%{on})")
    if square:
        text += (f"; Square broke {square} image{'s' if square != 1 else ''} every gradient attack of the "
                 "suite left standing")
    return "| " + " | ".join(cells) + " |", text + "."


def coverage(cfg: Any, records: dict) -> str:
    """Which of the config's models this store holds cells for, and the compute they took (the sum of the
    cells' own timings: what rerunning them costs on the machine that ran them)."""
    counts = {m.name: 0 for m in cfg.models}
    for r in records.values():
        if r["target"] in counts:
            counts[r["target"]] += 1
    have = [f"{m.label} (`{m.recipe or m.arch or m.checkpoint}`, {counts[m.name]} cells)"
            for m in cfg.models if counts[m.name]]
    missing = [f"`{m.recipe or m.name}`" for m in cfg.models if not counts[m.name]]
    seconds = sum(r.get("seconds") or 0.0 for r in records.values())
    text = (f"Models on this page: {', '.join(have) or 'none'}; the cells took {seconds / 60:.0f} min of "
            "compute. Recompute with `qrobust run configs/qnn_detection_mnist.toml "
            "--data-root ../shared/data --train-missing` (QNN-defense's models are recipe-only: "
            "`--train-missing` trains them first; their test accuracies and training times are in "
            "[training.md](training.md)), then this script.")
    if missing:
        text += f" Not run into this store (no rows below): {', '.join(missing)}; that command computes them."
    return text


def render(cfg: Any, records: dict, command: str, store: Path, out: Path) -> str:
    order = {m.name: i for i, m in enumerate(cfg.models)}
    labels = [a.label for a in cfg.attacks]
    dets = sorted((r for r in records.values() if r["kind"] == "detection"),
                  key=lambda r: (order.get(r["target"], 99),
                                 labels.index(r["attack"]) if r["attack"] in labels else 99))
    figs = figures(cfg, dets, out.parent / "figures")
    lines = ["# QNN-defense reproduction: Monte-Carlo dropout detection of adversarial examples (MNIST)", "",
             stamp(command, store, records), "", coverage(cfg, records), "", "## Results", "",
             "| model | attack | n | seed: clean / adv / LR | ours: clean single (group) | "
             "adv single (group) [95% CI of group] | uncertainty clean → adv | seed LR (train acc) | "
             "AUC all [95% CI] | TPR@5%FPR all | AUC successful [95% CI] (n) | TPR@5%FPR succ. |",
             "|" + "---|" * 12]
    lines += [result_row(cfg, d) for d in dets]
    links = ", ".join(f"[{cfg.model(k).label}](figures/{v})" for k, v in figs.items())
    lines += ["", f"ROC figures: {links or 'none'}.", "",
              "Other statistics (held-out ROC-AUC, all attacked inputs) and the held-out accuracy of the "
              "seed's logistic regression fitted on the other half:", "",
              "| model | attack | AUC entropy | AUC mutual info | AUC pred. var | held-out LR acc | n | s |",
              "|" + "---|" * 8]
    lines += [other_row(cfg, d) for d in dets]
    lines += ["", *worst_case_section(cfg, records)]
    lines += ["## Findings (generated from the numbers above)", ""]
    lines += [f"- {s}" for s in findings(cfg, dets)] or ["- No detection cell is stored yet."]
    lines += ["", "## Protocol", "", f"Config `{cfg.source}`.", "", PROTOCOL, *settings_text(dets), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "qnn_detection_mnist.toml"))
    ap.add_argument("--run", default=None, help="output directory of the qrobust run (default: the config's)")
    ap.add_argument("--out", default=str(OUT), help="markdown file to write (figures go next to it)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    store = Path(args.run or cfg.output_dir) / STORE_NAME
    records = latest_records(store)
    command = "python scripts/reproduce_qnn_detection.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    atomic_write_text(args.out, render(cfg, records, command.strip(), store, Path(args.out)))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
