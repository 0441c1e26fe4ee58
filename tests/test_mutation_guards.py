"""Behaviours a mutation run found unguarded, each pinned against an independent oracle.

- JSMA decreasing features (theta < 0): CleverHans' pair rule, alpha < 0 and beta > 0 (issue 11);
- seed A's detection number: a default logistic regression fitted on the RAW variance, scored on its own
  training points;
- the legacy JSMA target of an ensemble: the mean softmax (probabilities) of the members agreeing with the
  vote on the current input;
- ``require_peer``: oracle tests skip without the peer library, but fail in CI.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

import qrobust.detect as detect
from conftest import require_peer
from qrobust.attacks import JSMA
from qrobust.ensemble import Ensemble, ensemble_attack

pytest_plugins = ["pytester"]

# ---------------------------------------------------------------- JSMA: CleverHans' pair rule, both signs


def cleverhans_pair(jac: np.ndarray, target: int, increase: bool) -> tuple[int, int] | None:
    """CleverHans v3 ``jsma_symbolic`` pair choice, written out over all pairs for one input.

    ``jac`` (classes, features). alpha = target-class gradient summed over the pair, beta = the same for the
    sum of the other classes; valid pairs have alpha > 0, beta < 0 (increase) or alpha < 0, beta > 0
    (decrease); the score is -alpha * beta. None when no pair is valid.
    """
    g_t = jac[target]
    g_o = jac.sum(0) - g_t
    best, pair = 0.0, None
    for p, q in itertools.combinations(range(jac.shape[1]), 2):
        alpha, beta = g_t[p] + g_t[q], g_o[p] + g_o[q]
        valid = (alpha > 0 and beta < 0) if increase else (alpha < 0 and beta > 0)
        if valid and -alpha * beta > best:
            best, pair = -alpha * beta, (p, q)
    return pair


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    lin = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight))
        lin.bias.copy_(torch.tensor(bias))
    return lin


@pytest.mark.parametrize("theta", [-0.3, 0.3])
def test_jsma_pair_rule_hand_computed_for_both_signs_of_theta(theta):
    """A linear model: gradients are the weights, so the saliency of every pair is known by hand.

    Target class 0 (alpha per feature) and the other classes (beta per feature), for theta < 0:
      alpha = [-1, -1, -2, -2, 1, 0], beta = [1, 1, -2, -2, 0, 0]
    valid pairs need alpha < 0 and beta > 0: (0, 1) scores 2 * 2 = 4, (0, 5) and (1, 5) score 1, nothing
    else is valid. Using -beta (the increasing rule's sign for the other classes) would pick (2, 3) instead
    (score 16); using +alpha finds no valid pair at all. theta > 0 negates the weights: the same pair.
    """
    s = 1.0 if theta < 0 else -1.0
    alpha, beta = [-1, -1, -2, -2, 1, 0], [1, 1, -2, -2, 0, 0]
    model = _linear([[s * a for a in alpha], [s * b for b in beta], [0.0] * 6], [0.0, 5.0, 0.0])
    x = torch.full((1, 6), 0.5)
    assert model(x).argmax(1).item() == 1  # the target (0) is not already reached
    assert cleverhans_pair(model.weight.detach().numpy(), 0, increase=theta > 0) == (0, 1)
    adv = JSMA(theta=theta, gamma=0.4, targeted=True)(model, x, torch.tensor([0]))  # one iteration
    expected = x.clone()
    expected[0, :2] = 0.5 + theta
    torch.testing.assert_close(adv, expected)


@pytest.mark.parametrize("max_candidates", [256, None])
@pytest.mark.parametrize("theta", [-1.0, 1.0])
def test_jsma_first_pair_matches_cleverhans_rule_on_a_nonlinear_net(theta, max_candidates):
    """First iteration on a small tanh net: the changed pair is CleverHans' choice from the full Jacobian."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).eval()
    x = torch.rand(12, 16, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    target = (net(x).argmax(1) + 1) % 4
    adv = JSMA(theta=theta, gamma=0.125, targeted=True, max_candidates=max_candidates)(net, x, target)
    picked = 0
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(net, x[i : i + 1])[0, :, 0].numpy()  # (classes, features)
        pair = cleverhans_pair(jac, int(target[i]), increase=theta > 0)
        changed = tuple((adv[i] != x[i]).nonzero().flatten().tolist())
        assert changed == (pair or ()), f"sample {i}: changed {changed}, CleverHans' rule picks {pair}"
        picked += pair is not None
    assert picked >= len(x) // 2  # the comparison is not vacuous


# ---------------------------------------------------------------- seed A's score: raw variances, training set


def _raw_fit_training_accuracy(clean: np.ndarray, adv: np.ndarray) -> float:
    """Seed A: scikit-learn's default LogisticRegression (C=1) on the raw variance, scored on its own
    training points."""
    feats, labels = np.r_[adv, clean].reshape(-1, 1), np.r_[np.ones(len(adv)), np.zeros(len(clean))]
    lr = LogisticRegression().fit(feats, labels)
    return float((lr.predict(feats) == labels).mean())


def _variances(seed: int, n: int = 100, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Clean and adversarial seed-A variances at the scale of seed A's logs (~1e-3, overlapping)."""
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 5e-4, n) * scale, rng.gamma(2.0, 1e-3, n) * scale


def test_seed_lr_score_is_fitted_on_raw_variances():
    """At the logged scale (~1e-3) the L2 penalty of C=1 flattens the raw fit; standardizing would not."""
    clean, adv = _variances(0)
    raw = _raw_fit_training_accuracy(clean, adv)
    mu, sd = np.r_[clean, adv].mean(), np.r_[clean, adv].std()
    standardized = _raw_fit_training_accuracy((clean - mu) / sd, (adv - mu) / sd)
    assert abs(raw - standardized) >= 0.1  # the data tell a raw fit from a standardized one
    assert detect.seed_lr_score(clean, adv) == pytest.approx(raw, abs=1e-12)
    # not scale-invariant: the same variances x1000 are fitted differently (a standardized fit would not be)
    assert detect.seed_lr_score(clean * 1e3, adv * 1e3) == pytest.approx(
        _raw_fit_training_accuracy(clean * 1e3, adv * 1e3), abs=1e-12)
    assert detect.seed_lr_score(clean * 1e3, adv * 1e3) != pytest.approx(detect.seed_lr_score(clean, adv))


@pytest.mark.parametrize("seed", range(4))
def test_seed_lr_score_is_training_accuracy(seed):
    """Fitted and scored on the same (all) points; accepts tensors as the Monte-Carlo statistics come."""
    clean, adv = _variances(seed, n=60, scale=1e3)
    expected = _raw_fit_training_accuracy(clean, adv)
    got = detect.seed_lr_score(torch.from_numpy(clean), torch.from_numpy(adv))
    assert got == pytest.approx(expected, abs=1e-12)
    assert got * 120 == pytest.approx(round(got * 120))  # a fraction of the 120 training points


def test_seed_lr_score_training_accuracy_differs_from_a_held_out_score():
    """Guard for the test above: on these data, scoring held-out points gives other numbers."""
    differs = 0
    for seed in range(4):
        clean, adv = _variances(seed, n=60, scale=1e3)
        lab = np.r_[np.ones(30), np.zeros(30)]
        lr = LogisticRegression().fit(np.r_[adv[:30], clean[:30]].reshape(-1, 1), lab)
        held = float(lr.score(np.r_[adv[30:], clean[30:]].reshape(-1, 1), lab))
        differs += abs(held - detect.seed_lr_score(clean, adv)) > 1e-9
    assert differs >= 2


# ---------------------------------------------------------------- legacy JSMA target of an ensemble


class _Pinned(nn.Module):
    """Linear member predicting ``cls`` on [0, 1] inputs (large bias), with input gradients from W."""

    def __init__(self, cls: int, seed: int, d: int = 12, c: int = 5, bias: float = 6.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d, c)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(c, d, generator=g) * 0.3)
            self.lin.bias.zero_()
            self.lin.bias[cls] = bias

    def forward(self, x):
        return self.lin(x.flatten(1))


class _Switch(nn.Module):
    """Predicts class 1, or class 2 once the first feature exceeds 0.5."""

    def forward(self, x):
        z = x.flatten(1)
        out = torch.zeros(len(z), 5)
        out[:, 1] = 1.0
        out[:, 2] = 10 * (z[:, 0] - 0.5) + z[:, 1]
        return out


def _agreeing_mean_softmax(members, z):
    return sum(F.softmax(m(z), 1) for m in members) / len(members)


def test_legacy_jsma_target_is_the_agreeing_members_mean_softmax():
    a, b, fp = _Pinned(1, seed=1), _Pinned(1, seed=2), _Pinned(2, seed=3)  # vote 1; FP disagrees
    ens = Ensemble([a, b, fp], designated=2)
    target = ens.attack_target("legacy", "jsma")
    x = torch.rand(4, 12, generator=torch.Generator().manual_seed(0))
    out = target(x)
    expected = _agreeing_mean_softmax([a, b], x)
    torch.testing.assert_close(out, expected)  # probabilities: not their log, not the mean logits
    assert not torch.allclose(out, _agreeing_mean_softmax([a, b, fp], x), atol=1e-3)  # FP left out
    jac = torch.autograd.functional.jacobian(target, x)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(
        lambda z: _agreeing_mean_softmax([a, b], z), x))
    # the agreeing members are those of the CURRENT input: {switch, fp} once the switch votes with fp
    sw = _Switch()
    ens2 = Ensemble([a, sw, fp], designated=2)
    clean, moved = torch.full((1, 12), 0.1), torch.full((1, 12), 0.1)
    moved[0, 0] = 0.9
    t2 = ens2.attack_target("legacy", "jsma")
    torch.testing.assert_close(t2(clean), _agreeing_mean_softmax([a, sw], clean))
    torch.testing.assert_close(t2(moved), _agreeing_mean_softmax([sw, fp], moved))


def test_legacy_jsma_on_an_ensemble_follows_the_agreeing_mean_softmax_jacobian():
    """End to end: the first pair JSMA changes is CleverHans' choice on the Jacobian of that probability."""
    a, b, fp = _Pinned(1, seed=4), _Pinned(1, seed=5), _Pinned(2, seed=6, bias=2.5)  # FP: unsaturated
    ens = Ensemble([a, b, fp], designated=2)
    x = torch.rand(6, 12, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.1
    goal = torch.full((6,), 3)
    atk = ensemble_attack(ens, "jsma", "legacy", theta=1.0, gamma=0.2, targeted=True)  # one iteration
    adv = atk(ens, x, goal)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda z: _agreeing_mean_softmax([a, b], z), x[i : i + 1])
        pair = cleverhans_pair(jac[0, :, 0].numpy(), 3, increase=True)
        assert pair is not None
        assert tuple((adv[i] != x[i]).nonzero().flatten().tolist()) == pair


# ---------------------------------------------------------------- peer libraries: skip for users, fail in CI


def test_require_peer_skips_for_users_and_fails_in_ci(monkeypatch):
    missing = "qrobust_no_such_peer_library"
    monkeypatch.delenv("QROBUST_REQUIRE_PEERS", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_peer(missing)
    monkeypatch.setenv("QROBUST_REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception, match="scripts/setup.sh --test"):
        require_peer(missing)
    assert require_peer("numpy") is np


def test_plain_importorskip_of_a_missing_peer_also_fails_in_ci(pytester, monkeypatch):
    """The conftest hook turns any 'could not import' skip into a failure when peers are required."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_peer="""
        import pytest

        def test_peer():
            pytest.importorskip("qrobust_no_such_peer.torch")

        def test_data():
            pytest.skip("data not available")
    """)
    pytester.makepyfile(test_module_level="""
        import pytest

        peer = pytest.importorskip("qrobust_no_such_peer")

        def test_uses_peer():
            pass
    """)
    monkeypatch.delenv("QROBUST_REQUIRE_PEERS", raising=False)
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(skipped=3)
    monkeypatch.setenv("QROBUST_REQUIRE_PEERS", "1")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--continue-on-collection-errors")
    result.assert_outcomes(failed=1, skipped=1, errors=1)
    assert result.ret != 0
