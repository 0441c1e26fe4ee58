"""The worst-case suite against torchattacks' AutoAttack(version="standard"): time and robust accuracy.

Same model, images (true labels), L-inf eps and budgets: qrobust's default suite is APGD-CE (100 steps),
APGD-T (DLR, 9 targets x 100 steps) and Square (5000 queries), each later attack only on the images still
standing; torchattacks' standard AutoAttack runs APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square
(5000) the same way, but with torchattacks' default of 10 APGD steps (the original AutoAttack uses 100).
So the same run also times qrobust's suite at torchattacks' step count (equal budgets: the engines'
speed). The issue's goal: the suite at least 2x faster at an equal or lower robust accuracy (issue 13 asks
for 1000 images; a shared 2-core machine affords ``--n 100-200``, which the recorded section says). Run:

    nice -n 5 flock /tmp/qrobust-heavy.lock env OMP_NUM_THREADS=1 \
        python benchmarks/bench_worst_case.py --n 200
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from qrobust.data import load_dataset
from qrobust.evaluate import wilson_interval
from qrobust.suite import WorstCase, worst_case
from qrobust.utils import update_marked_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_apgd_square import clock, load_model  # noqa: E402  (one loader, one clock)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--note", default="", help="a sentence on the run's conditions, recorded with it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torchattacks

    model, what = load_model(args.data_root)
    x, y = load_dataset("mnist", root=args.data_root).test.head(args.n).tensors()
    ta_steps = torchattacks.APGD(model, eps=args.eps).steps  # torchattacks' default, used by its AutoAttack
    t0 = clock()
    report = worst_case(model, x, y, eps=args.eps, batch_size=args.n)
    t_ours = clock() - t0
    t0 = clock()
    report_eq = worst_case(model, x, y, eps=args.eps, batch_size=args.n, steps=ta_steps)
    t_eq = clock() - t0
    t0 = clock()
    x_ta = torchattacks.AutoAttack(model, norm="Linf", eps=args.eps, version="standard", n_classes=10,
                                   seed=0)(x, y)
    t_ta = clock() - t0
    with torch.no_grad():
        ta_ok = int((model(x_ta).argmax(1) == y).sum())

    def acc(k: int) -> str:
        lo, hi = wilson_interval(k, args.n)
        return f"{100 * k / args.n:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"

    def verdict(label: str, rep, t: float) -> str:
        more = rep.robust - ta_ok
        met = t_ta / t >= 2 and more <= 0
        strength = "equal or lower" if more <= 0 else f"higher by {more} image{'s' * (more > 1)}"
        return (f"- {label}: torchattacks' time / qrobust's = **{t_ta / t:.2f}x**; robust accuracy "
                f"{acc(rep.robust)} vs torchattacks' {acc(ta_ok)} ({strength}). The goal (>= 2x at an equal "
                f"or lower robust accuracy) is **{'met' if met else 'not met'}**.")

    def square_share(rep) -> float:
        return rep.seconds.get("square", 0.0) / max(sum(rep.seconds.values()), 1e-9)

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "## Worst-case suite vs torchattacks' AutoAttack (standard)",
        "",
        f"One run, {stamp}: {what}, first {args.n} MNIST test images (true labels), L-inf eps {args.eps}, "
        f"seed 0, CPU, torch {torch.__version__}, {args.threads} thread(s), Python "
        f"{platform.python_version()}; the issue asks for 1000 images, this shared machine ran {args.n}. "
        f"Clean accuracy {100 * report.robust_after(None) / report.n:.1f}%. The three evaluators ran one "
        "after the other in this process; times are its CPU time (the per-attack tables: wall clock). "
        "Compare ratios, not absolute times across runs. "
        + args.note,
        "",
        "| evaluator | APGD steps | robust accuracy (95% CI) | time s | torchattacks time / this |",
        "|---|---|---|---|---|",
        f"| qrobust `worst_case`, default (APGD-CE, APGD-T 9 targets, Square 5000) | {WorstCase().steps} | "
        f"{acc(report.robust)} | {t_ours:.1f} | {t_ta / t_ours:.2f}x |",
        f"| qrobust `worst_case`, equal budget (same suite, torchattacks' step count) | {ta_steps} | "
        f"{acc(report_eq.robust)} | {t_eq:.1f} | {t_ta / t_eq:.2f}x |",
        f"| torchattacks AutoAttack standard (APGD-CE, APGD-T 9 targets; FAB-T 9 targets; Square 5000) | "
        f"{ta_steps} | {acc(ta_ok)} | {t_ta:.1f} | 1.00x |",
        "",
        verdict(f"Default suite (the issue's comparison; {WorstCase().steps} APGD steps as the original "
                "AutoAttack, "
                f"torchattacks {ta_steps})", report, t_ours),
        verdict(f"Equal budget ({ta_steps} APGD steps each: the engines' speed)", report_eq, t_eq),
        "",
        f"Why: Square's 5000 queries on the images still standing take {100 * square_share(report):.0f}% of "
        f"the default suite's time and {100 * square_share(report_eq):.0f}% at equal budget, and "
        "torchattacks' AutoAttack spends the same 5000 queries on its own survivors. So at equal budgets "
        "the ratio is bounded by how much cheaper one query is (qrobust runs Square's model with "
        "channels-last weights, ~1.3x faster forwards; see the APGD/Square section), and at the default "
        f"budget qrobust also spends {WorstCase().steps // ta_steps}x torchattacks' APGD steps (robust "
        f"accuracy {acc(report.robust)} with them, {acc(report_eq.robust)} with {ta_steps}). Per attack, "
        "default suite:",
        "",
        report.markdown(),
        "",
        f"Equal budget ({ta_steps} APGD steps):",
        "",
        report_eq.markdown(),
        "",
        "Command:",
        "",
        "```",
        "nice -n 5 flock /tmp/qrobust-heavy.lock env OMP_NUM_THREADS=1 "
        + (f"QROBUST_ZOO={os.environ['QROBUST_ZOO']} " if os.environ.get("QROBUST_ZOO") else "")
        + "python benchmarks/bench_worst_case.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "```",
    ]
    body = "\n".join(lines)
    print(body)
    update_marked_section(args.doc, "worst-case", body, title="qrobust benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
