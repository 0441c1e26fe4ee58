"""Automatic sanity checks on robustness results (Carlini et al. 2019, "On Evaluating Adversarial
Robustness").

Four checks that a correct white-box evaluation of an L-inf attack must pass; failing one is the
classic symptom of gradient masking (or of a bug in the attack):

``eps0``       accuracy at eps = 0 equals clean accuracy;
``monotone``   accuracy does not rise as eps grows (same attack);
``iterative``  an iterative attack (BIM, PGD) does no worse than the single-step FGSM at equal eps;
``unbounded``  at eps >= 1 (the whole pixel cube) the strongest attack drives accuracy near zero.

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
CHECKS = {
    "eps0": "accuracy at eps = 0 equals clean accuracy",
    "monotone": "accuracy does not rise with eps",
    "iterative": "iterative attacks do no worse than single-step ones",
    "unbounded": "unbounded eps drives accuracy near zero",
}


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
) -> SanityReport:
    """Run the four checks on result rows (see the module docstring for the row format)."""
    clean: dict[str, tuple[float, int]] = {}
    curves: dict[tuple[str, str], dict[float, tuple[float, int]]] = defaultdict(dict)
    kinds: dict[tuple[str, str], str] = {}
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

    out: list[Violation] = []
    checked = dict.fromkeys(CHECKS, 0)
    for (row, attack), curve in sorted(curves.items()):
        eps_sorted = sorted(curve)
        if 0.0 in curve and row in clean:
            checked["eps0"] += 1
            (a0, n0), (ac, nc) = curve[0.0], clean[row]
            if abs(a0 - ac) > slack(ac, min(n0, nc), tolerance):
                out.append(
                    Violation(
                        "eps0",
                        row,
                        attack,
                        0.0,
                        f"accuracy at eps=0 is {a0:.2%} but clean accuracy is {ac:.2%}",
                    )
                )
        for lo, hi in zip(eps_sorted, eps_sorted[1:], strict=False):
            checked["monotone"] += 1
            (alo, nlo), (ahi, nhi) = curve[lo], curve[hi]
            if ahi > alo + slack(alo, min(nlo, nhi), tolerance):
                out.append(
                    Violation(
                        "monotone",
                        row,
                        attack,
                        hi,
                        f"accuracy rises from {alo:.2%} at eps={lo:g} to {ahi:.2%} at eps={hi:g}",
                    )
                )

    by_row: dict[str, list[tuple[str, dict[float, tuple[float, int]]]]] = defaultdict(list)
    for (row, attack), curve in curves.items():
        by_row[row].append((attack, curve))
    for row, items in sorted(by_row.items()):
        singles = [(a, c) for a, c in items if kinds[(row, a)] in single_step]
        iters = [(a, c) for a, c in items if kinds[(row, a)] in iterative]
        for ia, ic in iters:
            for sa, sc in singles:
                for eps in sorted(set(ic) & set(sc)):
                    if eps == 0:
                        continue
                    checked["iterative"] += 1
                    (ai, ni), (as_, ns) = ic[eps], sc[eps]
                    if ai > as_ + slack(as_, min(ni, ns), tolerance):
                        out.append(
                            Violation(
                                "iterative",
                                row,
                                ia,
                                eps,
                                f"{ia} leaves {ai:.2%} accuracy but single-step {sa} only {as_:.2%}",
                            )
                        )
        big = [(c[e][0], c[e][1], a, e) for a, c in items for e in c if e >= unbounded_eps]
        if big:
            checked["unbounded"] += 1
            acc, n, attack, eps = min(big)
            if acc > near_zero + slack(near_zero, n, tolerance):
                out.append(
                    Violation(
                        "unbounded",
                        row,
                        attack,
                        eps,
                        f"at eps={eps:g} (unbounded) the best attack still leaves {acc:.2%} accuracy "
                        f"(expected <= {near_zero:.0%})",
                    )
                )
    return SanityReport(out, checked)
