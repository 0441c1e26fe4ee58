"""Sanity checks (Carlini et al. 2019): each check on crafted tables, then a masked vs a normal real model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qrobust.report.sanity import check_results


def _row(attack, eps, acc, row="m", n=1000, name=None):
    return {
        "row": row,
        "attack": attack,
        "attack_name": name or attack.lower(),
        "eps": eps,
        "accuracy": acc,
        "n": n,
    }


GOOD = [
    _row("clean", None, 0.98),
    _row("FGSM", 0.0, 0.98),
    _row("FGSM", 0.1, 0.60),
    _row("FGSM", 0.3, 0.20),
    _row("PGD", 0.0, 0.98),
    _row("PGD", 0.1, 0.30),
    _row("PGD", 0.3, 0.01),
    _row("PGD", 1.0, 0.0),
]


def test_consistent_table_passes_every_check():
    report = check_results(GOOD)
    assert report.ok, report.violations
    assert report.checked == {"eps0": 2, "monotone": 5, "iterative": 2, "unbounded": 1, "worst_case": 0}


@pytest.mark.parametrize(
    ("change", "check"),
    [
        ({("FGSM", 0.0): 0.90}, "eps0"),  # eps = 0 differs from clean
        ({("FGSM", 0.3): 0.70}, "monotone"),  # accuracy rises with eps
        ({("PGD", 0.3): 0.40}, "iterative"),  # PGD weaker than FGSM at eps 0.3
        ({("PGD", 1.0): 0.35}, "unbounded"),  # unbounded eps leaves accuracy high
    ],
)
def test_each_check_fires_on_its_violation(change, check):
    rows = [{**r, "accuracy": change.get((r["attack"], r["eps"]), r["accuracy"])} for r in GOOD]
    report = check_results(rows)
    assert check in {v.check for v in report.violations}
    assert report.flagged_rows() == {"m"}
    assert "m" in report.markdown()


def test_gradient_attacks_far_above_the_worst_case_are_flagged():
    worst = [_row("WORST", 0.1, 0.25, name="worst_case"), _row("WORST", 0.3, 0.005, name="worst_case")]
    report = check_results([*GOOD, *worst])  # PGD: 30% at 0.1 (5 points above), 1% at 0.3 (0.5 above)
    assert report.ok and report.checked["worst_case"] == 2
    masked = [{**r, "accuracy": 0.20} if r["eps"] == 0.1 else r for r in worst]  # PGD 30% = 10 points above
    report = check_results([*GOOD, *masked])
    (v,) = report.violations
    assert (v.check, v.row, v.attack, v.eps) == ("worst_case", "m", "PGD", 0.1)
    assert "gradient masking suspected" in v.message and "10.0 points" in v.message
    per_attack = [{"attack": "apgd_ce", "broken": 3}, {"attack": "apgd_t", "broken": 0},
                  {"attack": "square", "broken": 40}]
    kept = [{**r, "attack_config": {"report": {"per_attack": per_attack}}} for r in masked]
    (v,) = check_results([*GOOD, *kept]).violations
    assert v.message.endswith("(images broken by: apgd_ce 3, square 40)")
    # another row's worst case does not count; FGSM alone is compared when it is the only gradient attack
    other = [{**r, "row": "other"} for r in masked]
    assert check_results([*GOOD, *other]).checked["worst_case"] == 0
    fgsm_only = [r for r in GOOD if r["attack"] != "PGD"]
    assert not check_results([*fgsm_only, *masked]).ok  # FGSM 60% vs 20% at 0.1


def test_differences_within_sampling_noise_are_tolerated():
    rows = [*GOOD, _row("FGSM", 0.2, 0.20 + 0.005), _row("FGSM", 0.25, 0.21)]
    assert check_results(rows).ok
    small = [_row("clean", None, 0.5, n=20), _row("PGD", 0.1, 0.40, n=20), _row("PGD", 0.2, 0.45, n=20)]
    assert check_results(small).ok  # one sample of 20 is noise
    assert not check_results([*small, _row("PGD", 0.3, 0.8, n=20)]).ok


# -- real models ----------------------------------------------------------------------------------------


class RoundInput(nn.Module):
    """Masks gradients the classic way: the input is snapped to a coarse grid (zero gradient a.e.)."""

    def __init__(self, model: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x):
        return self.model(torch.round(x * self.levels) / self.levels)


def _evaluate(model, x, y):
    from qrobust.attacks import create_attack
    from qrobust.evaluate import accuracy, evaluate_attack

    rows = [{"row": "m", "attack": "clean", "eps": None, "accuracy": accuracy(model, x, y), "n": len(y)}]
    grid = {"fgsm": [0.0, 0.1, 0.3], "pgd": [0.0, 0.1, 0.3, 1.0]}
    for name, eps_list in grid.items():
        for eps in eps_list:
            params = {"alpha": max(eps / 4, 0.01), "steps": 10} if name == "pgd" else {}
            atk = create_attack(name, eps=eps, **params)
            res = evaluate_attack(model, atk, x, y, labels="true", batch_size=200)
            rows.append(
                {
                    "row": "m",
                    "attack": name.upper(),
                    "attack_name": name,
                    "eps": eps,
                    "accuracy": res.adversarial_accuracy,
                    "n": len(y),
                }
            )
    return rows


@pytest.fixture(scope="module")
def sample(digits_test):
    x, y = digits_test
    return x[:100], y[:100]


def test_masked_gradients_are_flagged(trained_mnistconv, sample):
    x, y = sample
    rows = _evaluate(RoundInput(trained_mnistconv).eval(), x, y)
    report = check_results(rows)
    assert not report.ok
    assert "unbounded" in {v.check for v in report.violations}
    pgd_big = next(r for r in rows if r["attack"] == "PGD" and r["eps"] == 1.0)
    assert pgd_big["accuracy"] > 0.3  # gradients are zero: only the random start moved the images


def test_normal_model_is_not_flagged(trained_mnistconv, sample):
    x, y = sample
    rows = _evaluate(trained_mnistconv, x, y)
    report = check_results(rows)
    assert report.ok, report.violations
    assert report.checked["unbounded"] == 1 and report.checked["iterative"] == 2
