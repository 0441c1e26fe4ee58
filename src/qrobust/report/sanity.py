"""Automatic sanity checks on robustness results (Carlini et al. 2019, "On Evaluating Adversarial
Robustness").

Four checks that a correct white-box evaluation of an L-inf attack must pass; failing one is the
classic symptom of gradient masking (or of a bug in the attack):

``eps0``       accuracy at eps = 0 equals clean accuracy;
``monotone``   accuracy does not rise as eps grows (same attack);
``iterative``  an iterative attack (BIM, PGD) does no worse than the single-step FGSM at equal eps;
``unbounded``  at eps >= 1 (the whole pixel cube) the strongest attack drives accuracy near zero;
``worst_case`` the best gradient attack (FGSM, BIM, PGD, APGD...) leaves at most ``masking_gap`` (10
               points) more accuracy than the worst case (:class:`qrobust.attacks.WorstCase`, whose
               suite includes a gradient-free attack) at the same eps.

The checks work on any table of results — a list of mappings with ``row`` (model/ensemble label),
``attack`` (label, ``"clean"`` for clean accuracy), ``attack_name`` (fgsm/bim/pgd/...), ``eps``,
``accuracy`` (0-1) and ``n`` (samples) — so they run on the runner's store and on anyone's CSV.
Differences smaller than sampling noise (one binomial standard error, at least two samples) are
tolerated so that randomized models are not flagged for noise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

SINGLE_STEP = ("fgsm",)
ITERATIVE = ("bim", "pgd")
GRADIENT = ("fgsm", "fgsm_random", "bim", "pgd", "apgd", "apgdt", "eot_pgd")
WORST_CASE = ("worst_case",)
MASKING_GAP = 0.10  # gradient attacks this far above the worst case: gradient masking suspected
CHECKS = {
    "eps0": "accuracy at eps = 0 equals clean accuracy",
    "monotone": "accuracy does not rise with eps",
    "iterative": "iterative attacks do no worse than single-step ones",
    "unbounded": "unbounded eps drives accuracy near zero",
    "worst_case": "gradient attacks within 10 points of the worst case",
}
Curve = dict[float, tuple[float, int]]  # eps -> (accuracy, n)


@dataclass(frozen=True)
class Violation:
    check: str
    row: str
    attack: str
    eps: float | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SanityReport:
    violations: list[Violation]
    checked: dict[str, int]  # check -> number of comparisons made (0 = could not be checked)

    @property
    def ok(self) -> bool:
        return not self.violations

    def flagged_rows(self) -> set[str]:
        return {v.row for v in self.violations}

    def for_row(self, row: str) -> list[Violation]:
        return [v for v in self.violations if v.row == row]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": dict(self.checked),
            "violations": [v.as_dict() for v in self.violations],
        }

    def markdown(self) -> str:
        lines = ["| check | comparisons | violations |", "|---|---|---|"]
        for name, text in CHECKS.items():
            nv = sum(v.check == name for v in self.violations)
            lines.append(f"| {text} | {self.checked.get(name, 0)} | {nv} |")
        if self.violations:
            lines += ["", "Suspected gradient masking (or a broken attack):", ""]
            lines += [
                f"- **{v.row}**, {v.attack}"
                + (f" eps={v.eps:g}" if v.eps is not None else "")
                + f": {v.message}"
                for v in self.violations
            ]
        else:
            lines += ["", "No violations."]
        return "\n".join(lines)


def slack(p: float, n: int, tolerance: float = 0.0) -> float:
    """Allowed difference: ``tolerance`` + max(2 samples, one binomial standard error at ``p``)."""
    n = max(int(n), 1)
    p = min(max(p, 0.0), 1.0)
    return tolerance + max(2.0 / n, math.sqrt(p * (1 - p) / n))


def check_results(
    rows: Iterable[Mapping[str, Any]],
    *,
    tolerance: float = 0.0,
    near_zero: float = 0.05,
    unbounded_eps: float = 1.0,
    single_step: tuple[str, ...] = SINGLE_STEP,
    iterative: tuple[str, ...] = ITERATIVE,
    masking_gap: float = MASKING_GAP,
) -> SanityReport:
    """Run the five checks on result rows (see the module docstring for the row format)."""
    rows = list(rows)
    clean, curves, kinds = _collect(rows)
    breakers = _breakers(rows)
    out: list[Violation] = []
    checked = dict.fromkeys(CHECKS, 0)
    for (row, attack), curve in sorted(curves.items()):
        out += _check_curve(row, attack, curve, clean.get(row), tolerance, checked)
    by_row: dict[str, list[tuple[str, str, Curve]]] = defaultdict(list)
    for (row, attack), curve in curves.items():
        by_row[row].append((attack, kinds[(row, attack)], curve))
    for row, items in sorted(by_row.items()):
        singles = [(a, c) for a, k, c in items if k in single_step]
        iters = [(a, c) for a, k, c in items if k in iterative]
        out += _check_iterative(row, iters, singles, tolerance, checked)
        out += _check_unbounded(row, items, near_zero, unbounded_eps, tolerance, checked)
        out += _check_worst_case(row, items, masking_gap, checked, breakers)
    return SanityReport(out, checked)


Key = tuple[str, str]  # (row, attack label)


def _collect(rows: Iterable[Mapping[str, Any]]
             ) -> tuple[dict[str, tuple[float, int]], dict[Key, Curve], dict[Key, str]]:
    """Clean accuracy per row, accuracy-vs-eps curve and attack kind per (row, attack label)."""
    clean: dict[str, tuple[float, int]] = {}
    curves: dict[Key, Curve] = defaultdict(dict)
    kinds: dict[Key, str] = {}
    for r in rows:
        acc = r.get("accuracy")
        if acc is None or (isinstance(acc, float) and math.isnan(acc)):
            continue
        row, attack, n = str(r["row"]), str(r["attack"]), int(r.get("n") or 1)
        if attack.lower() == "clean":
            clean[row] = (float(acc), n)
            continue
        if r.get("eps") is None:
            continue
        curves[(row, attack)][float(r["eps"])] = (float(acc), n)
        kinds[(row, attack)] = str(r.get("attack_name") or attack).lower()
    return clean, curves, kinds


def _breakers(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, float], str]:
    """(row, eps) -> "attack count, ..." of the images each suite attack of a worst-case result broke, when
    its record keeps the report (``attack_config.report``, as the experiment runner stores it)."""
    out = {}
    for r in rows:
        report = (r.get("attack_config") or {}).get("report") if r.get("attack_name") in WORST_CASE else None
        if report and report.get("per_attack") and r.get("eps") is not None:
            counts = [f"{a['attack']} {a['broken']}" for a in report["per_attack"] if a.get("broken")]
            out[(str(r["row"]), float(r["eps"]))] = ", ".join(counts) or "none"
    return out


def _check_curve(row: str, attack: str, curve: Curve, clean: tuple[float, int] | None, tolerance: float,
                 checked: dict[str, int]) -> list[Violation]:
    """eps0 (eps = 0 equals clean) and monotone (no rise with eps) on one attack's curve."""
    out = []
    if 0.0 in curve and clean is not None:
        checked["eps0"] += 1
        (a0, n0), (ac, nc) = curve[0.0], clean
        if abs(a0 - ac) > slack(ac, min(n0, nc), tolerance):
            out.append(Violation("eps0", row, attack, 0.0,
                                 f"accuracy at eps=0 is {a0:.2%} but clean accuracy is {ac:.2%}"))
    eps_sorted = sorted(curve)
    for lo, hi in zip(eps_sorted, eps_sorted[1:], strict=False):
        checked["monotone"] += 1
        (alo, nlo), (ahi, nhi) = curve[lo], curve[hi]
        if ahi > alo + slack(alo, min(nlo, nhi), tolerance):
            out.append(Violation("monotone", row, attack, hi,
                                 f"accuracy rises from {alo:.2%} at eps={lo:g} to {ahi:.2%} at eps={hi:g}"))
    return out


def _check_iterative(row: str, iters: list[tuple[str, Curve]], singles: list[tuple[str, Curve]],
                     tolerance: float, checked: dict[str, int]) -> list[Violation]:
    """An iterative attack does no worse than a single-step one at every shared eps > 0."""
    out = []
    for ia, ic in iters:
        for sa, sc in singles:
            for eps in sorted(set(ic) & set(sc) - {0.0}):
                checked["iterative"] += 1
                (ai, ni), (as_, ns) = ic[eps], sc[eps]
                if ai > as_ + slack(as_, min(ni, ns), tolerance):
                    message = f"{ia} leaves {ai:.2%} accuracy but single-step {sa} only {as_:.2%}"
                    out.append(Violation("iterative", row, ia, eps, message))
    return out


def _check_unbounded(row: str, items: list[tuple[str, str, Curve]], near_zero: float, unbounded_eps: float,
                     tolerance: float, checked: dict[str, int]) -> list[Violation]:
    """At eps >= ``unbounded_eps`` the best attack of the row leaves at most ``near_zero`` accuracy."""
    big = [(c[e][0], c[e][1], a, e) for a, _, c in items for e in c if e >= unbounded_eps]
    if not big:
        return []
    checked["unbounded"] += 1
    acc, n, attack, eps = min(big)
    if acc <= near_zero + slack(near_zero, n, tolerance):
        return []
    return [Violation("unbounded", row, attack, eps,
                      f"at eps={eps:g} (unbounded) the best attack still leaves {acc:.2%} accuracy "
                      f"(expected <= {near_zero:.0%})")]


def _check_worst_case(row: str, items: list[tuple[str, str, Curve]], gap: float, checked: dict[str, int],
                      breakers: Mapping[tuple[str, float], str]) -> list[Violation]:
    """At each eps > 0 with a worst-case result, the best gradient attack is within ``gap`` of it. Both
    are measured on the same images, so the gap is not sampling noise; a larger one means the gradients
    mislead (gradient masking) while a gradient-free attack still finds adversarial examples."""
    worst: Curve = {}
    for _, kind, curve in items:
        if kind in WORST_CASE:
            for eps, value in curve.items():
                worst[eps] = min(worst.get(eps, value), value)
    out = []
    for eps in sorted(set(worst) - {0.0}):
        grads = [(c[eps][0], a) for a, kind, c in items if kind in GRADIENT and eps in c]
        if not grads:
            continue
        checked["worst_case"] += 1
        (best, attack), wc = min(grads), worst[eps][0]
        if best - wc >= gap - 1e-9:
            out.append(Violation("worst_case", row, attack, eps,
                                 f"gradient masking suspected: the best gradient attack ({attack}) leaves "
                                 f"{best:.2%}, {100 * (best - wc):.1f} points above the worst case {wc:.2%}"
                                 + (f" (images broken by: {breakers[(row, eps)]})"
                                    if (row, eps) in breakers else "")))
    return out
