"""Adversarially trained recipes against their clean-trained versions: train (once), evaluate, record.

    nice -n 10 flock /tmp/qrobust-heavy.lock env OMP_NUM_THREADS=2 \\
        python scripts/adv_train_mnist.py --group mnist-fp          # mnist-a4w2, empir, cifar, madry-pgd

Each group names adversarially trained recipes (``qrobust.recipes``, methods of ``qrobust.adversary``) and
the clean-trained recipes they are compared with; missing checkpoints are trained first (resumable:
rerun after an interruption), then every model is evaluated on the first ``--n-test`` test images:
clean accuracy, PGD-40 (L-inf, uniform random start, true labels; MNIST step 0.01, CIFAR-10 step
2/255) and the strongest evaluation qrobust has, ``WorstCase`` (per image the worst of APGD-CE, APGD-T
and Square with 5000 queries; for an ensemble its ensemble suite), all with 95% Wilson intervals. The
table goes to docs/results/adversarial_training.md (section ``adv-<group>``) with issue 15's goals and
the published references beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from qrobust.attacks import PGD
from qrobust.checkpoint import load_checkpoint, read_config
from qrobust.data import load_dataset
from qrobust.ensemble import Ensemble, ensemble_attack
from qrobust.evaluate import evaluate_attack
from qrobust.experiment.results import code_version
from qrobust.recipes import get_recipe
from qrobust.suite import WorstCase
from qrobust.utils import atomic_write_json, configure_logging, update_marked_section
from qrobust.zoo import ensure_trained

REPO = Path(__file__).resolve().parents[1]
EMPIR_ADV = ("mnistconv_a4w2_m1_fgsmrs", "mnistconv_a4w2_m2_fgsmrs", "mnistconv_bias_fgsmrs")
EMPIR_CLEAN = ("mnistconv_a4w2_m1", "mnistconv_a4w2_m2", "mnistconv_fp")
# group -> (dataset, eps, rows: (label, recipe names: one model, or an EMPIR ensemble's members), goal)
GROUPS = {
    "mnist-fp": ("mnist", 0.3, [("MNISTconv FP, clean-trained", ("mnistconv_fp",)),
                                ("MNISTconv FP, FGSM-RS", ("mnistconv_fp_fgsmrs",)),
                                ("MNISTconv FP with biases, FGSM-RS", ("mnistconv_bias_fgsmrs",)),
                                ("the same + 2 epochs of PGD-10 fine-tuning", ("mnistconv_bias_pgd10",))],
                 "FGSM-RS row: >= 85% robust with >= 98% clean (issue 15)"),
    "mnist-a4w2": ("mnist", 0.3, [("MNISTconv a4w2, clean-trained", ("mnistconv_a4w2_m1",)),
                                  ("MNISTconv a4w2, FGSM-RS", ("mnistconv_a4w2_m1_fgsmrs",)),
                                  ("the same + 1 epoch of PGD-10 fine-tuning", ("mnistconv_a4w2_m1_pgd10",))],
                   "side by side (issue 15)"),
    "empir": ("mnist", 0.3, [("EMPIR a4w2/a4w2/FP, clean-trained members", EMPIR_CLEAN),
                             ("EMPIR a4w2/a4w2/FP, FGSM-RS members", EMPIR_ADV)], "side by side (issue 15)"),
    "cifar": ("cifar10", 8 / 255, [("CIFARconv FP, clean-trained", ("cifarconv_fp",)),
                                   ("CIFARconv FP, FGSM-RS", ("cifarconv_fp_fgsmrs",))],
              "eps 8/255 (issue 15). Reference: Wong, Rice & Kolter (2020), FGSM-RS on PreActResNet18 "
              "(11M parameters, ~100x CIFARconv's 0.12M): about 45% under PGD-50 x 10 restarts; we know "
              "of no published figure for a net of CIFARconv's size"),
    "madry-pgd": ("mnist", 0.3, [("MNISTconv FP, clean-trained", ("mnistconv_fp",)),
                                 ("MNISTconv FP, PGD-7 fine-tuned", ("mnistconv_fp_pgd7",))],
                  "the earlier PGD run as a recipe"),
}
REFERENCES = ("References at MNIST eps 0.3: Madry et al. (2018) about 89% under strong PGD (larger net, ~80 "
              "epochs of PGD-40); Wong, Rice & Kolter (2020) 88.8% under PGD-50 x 10 restarts after FGSM-RS "
              "training (their net: 2 conv + 1024-unit FC, 10 epochs).")


def load(names: tuple[str, ...], data_root: str | None
         ) -> tuple[torch.nn.Module, float, list[dict], list[str]]:
    """The model (an EMPIR vote ensemble for several names), its total training seconds, CO-guard logs and
    the members' weight hashes."""
    models, seconds, guards, hashes = [], 0.0, [], []
    for name in names:
        path = ensure_trained(name, data_root=data_root)
        model, _ = load_checkpoint(path)
        cfg = read_config(path)
        seconds += float(cfg.get("train_seconds", float("nan")))
        hashes.append(str(cfg.get("weights_sha256", "")))
        if cfg.get("co_guard"):
            guards.append({"recipe": name, **{k: v for k, v in cfg["co_guard"].items() if k != "checks"}})
        models.append(model.eval())
    return (models[0] if len(models) == 1 else Ensemble(models).eval()), seconds, guards, hashes


def evaluate_row(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                 args: argparse.Namespace, n_strong: int, cache: Path) -> dict:
    """PGD-40 on all images and the worst case on the first ``n_strong``; cached in ``cache`` (JSON, written
    atomically) so an interrupted group resumes after its last finished row."""
    if cache.is_file():
        return json.loads(cache.read_text())
    res = evaluate_attack(model, pgd40(model, eps), x, y, labels="true", batch_size=250)
    out: dict = {"pgd40": res.as_dict(), "worst_case": None}
    print(json.dumps({"row": cache.stem, "pgd40": out["pgd40"]}), flush=True)
    if not args.no_strong:
        t0 = time.perf_counter()
        wc = WorstCase(eps=eps, steps=args.strong_steps, n_queries=args.strong_queries, seed=0)
        sres = evaluate_attack(model, wc, x[:n_strong], y[:n_strong], labels="true", batch_size=250)
        out["worst_case"] = {**sres.as_dict(), "per_attack": wc.report.per_attack() if wc.report else [],
                             "seconds": time.perf_counter() - t0}
        print(json.dumps({"row": cache.stem, "worst_case": out["worst_case"]}), flush=True)
    out["computed"] = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {code_version()}"
    atomic_write_json(cache, out)
    return out


def breakdown(wc: dict | None) -> str:
    """Which attack of the suite broke how many images first ("apgd_ce 23, square 5")."""
    if not wc or not wc.get("per_attack"):
        return ""
    return ", ".join(f"{r['attack']} {r['broken']}" for r in wc["per_attack"])


def pgd40(model: torch.nn.Module, eps: float):
    alpha = 0.01 if eps >= 0.1 else 2 / 255
    if isinstance(model, Ensemble):  # the mean logits of all members, success judged on the vote
        return ensemble_attack(model, "pgd", "adaptive_logits", eps=eps, alpha=alpha, steps=40, seed=0)
    return PGD(eps=eps, alpha=alpha, steps=40, random_start=True, seed=0)


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def ci(c: tuple[float, float]) -> str:
    return f"[{pct(c[0])}, {pct(c[1])}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", choices=sorted(GROUPS), required=True)
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--strong-steps", type=int, default=100, help="APGD steps of the worst case (100)")
    p.add_argument("--strong-queries", type=int, default=5000, help="Square queries of the worst case (5000)")
    p.add_argument("--n-strong", type=int, default=0,
                   help="worst case on the first N of the --n-test images (default: all of them)")
    p.add_argument("--no-strong", action="store_true", help="PGD-40 only (quick look)")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="evaluate only these rows of the group (1-based) and print them; the page is not "
                        "written")
    p.add_argument("--cache", default=str(REPO / "runs" / "adv_train"),
                   help="per-row results (resume after an interruption; delete to recompute)")
    p.add_argument("--doc", default=str(REPO / "docs" / "results" / "adversarial_training.md"))
    args = p.parse_args(argv)
    configure_logging()
    dataset, eps, rows, goal = GROUPS[args.group]
    x, y = load_dataset(dataset, root=args.data_root).test.head(args.n_test).tensors()
    n_strong = min(args.n_strong or len(x), len(x))
    table = ["| model | recipe(s) | train min | clean % (95% CI) | PGD-40 % (95% CI) | worst case % "
             "(95% CI) | broken first by (worst case) |", "|---|---|---|---|---|---|---|"]
    guards, computed = [], []
    for i, (label, names) in enumerate(rows, 1):
        if args.rows and i not in args.rows:
            continue
        model, seconds, guard, hashes = load(names, args.data_root)
        guards += guard
        key = json.dumps([names, hashes, args.n_test, n_strong, args.strong_steps, args.strong_queries,
                          args.no_strong, eps], sort_keys=True)
        slug = "-".join(names) if len(names) == 1 else f"ensemble-{names[0]}"
        cache = Path(args.cache) / args.group / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
        out = evaluate_row(model, x, y, eps, args, n_strong, cache)
        computed.append((label, out.get("computed", "not recorded")))
        res, wc = out["pgd40"], out["worst_case"]
        strong = ("not run" if wc is None
                  else f"{pct(wc['adversarial_accuracy'])} {ci(wc['adversarial_ci95'])}")
        table.append(f"| {label} | {', '.join(f'`{n}`' for n in names)} | {seconds / 60:.0f} | "
                     f"{pct(res['clean_accuracy'])} {ci(res['clean_ci95'])} | "
                     f"{pct(res['adversarial_accuracy'])} {ci(res['adversarial_ci95'])} | {strong} | "
                     f"{breakdown(wc)} |")
    recipes = {n: get_recipe(n).train for _, names in rows for n in names}
    cmd = "python scripts/adv_train_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = "\n".join([
        f"## {args.group}: adversarial vs clean training ({dataset}, L-inf eps {eps:.4g})",
        "",
        (f"Goal: {goal}. " + (REFERENCES if dataset == "mnist" else "")).rstrip(),
        "",
        f"Evaluation: first {args.n_test} test images, true labels; PGD-40 from a uniform random start "
        f"(step {0.01 if eps >= 0.1 else '2/255'}; an ensemble: on its mean logits, scored on its vote); "
        f"worst case on the first {n_strong} of them = qrobust `WorstCase` (APGD-CE, APGD-T "
        f"{args.strong_steps} steps x 9 target classes, Square {args.strong_queries} queries; ensembles: its "
        "ensemble suite, which adds APGD on the vote margin and on EMPIR's attack objectives), per image the "
        "worst; the last column counts, per attack, the images it was the first to break (images the model "
        "already misclassifies are not attacked). 95% Wilson intervals. Training time from the checkpoints "
        "(an ensemble: sum of its members; init_from recipes not included).",
        "",
        *table,
        "",
        "Catastrophic-overfitting guard: " + (json.dumps(guards) if guards else "not used by these recipes"),
        "",
        "Training settings (`qrobust.recipes`): " + json.dumps(recipes, default=str),
        "",
        f"Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {code_version()}); "
        "rows computed: " + "; ".join(f"{label}: {when}" for label, when in computed),
    ])
    if not args.rows:
        update_marked_section(args.doc, f"adv-{args.group}", body, title="Adversarial training")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
