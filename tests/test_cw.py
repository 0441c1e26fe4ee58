"""CW-L2's binary search, its kept example and its strength against CleverHans 4 (issues 11 and 17).

The oracles: the binary-search rule written out in the test; a linear model where the constant each
sample needs and its smallest adversarial L2 are known in closed form; a model that records every
input it is given (the smallest successful one must be what comes back); CleverHans 4's torch
``carlini_wagner_l2`` at the benchmark's budget.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from qrobust.attacks import CWL2
from qrobust.attacks.cw import next_constants
from qrobust.errors import QrobustError
from qrobust.evaluate import predict


def reference_constants(c0: float, successes: list[bool]) -> list[float]:
    """Carlini & Wagner's rule, one sample, plain Python: the constant used at each binary step."""
    c, lower, upper, used = c0, 0.0, 1e10, []
    for ok in successes:
        used.append(c)
        if ok:
            upper = min(upper, c)
        else:
            lower = max(lower, c)
        if upper < 1e9:
            c = (lower + upper) / 2
        elif not ok:
            c = c * 10
    return used


def test_next_constants_hand_checked():
    c = torch.tensor([1.0, 1.0, 4.0, 4.0])
    lower = torch.tensor([0.0, 0.0, 2.0, 2.0])
    upper = torch.tensor([1e10, 1e10, 8.0, 8.0])
    ok = torch.tensor([True, False, True, False])
    c2, lo2, up2 = next_constants(c, lower, upper, ok)
    # success, no bound yet -> halve towards 0; failure, no bound -> x10; then midpoints of the new bracket
    assert c2.tolist() == [0.5, 10.0, 3.0, 6.0]
    assert lo2.tolist() == [0.0, 1.0, 2.0, 4.0]
    assert up2.tolist() == [1.0, 1e10, 4.0, 8.0]


def _linear_case(needed: list[float]) -> tuple[nn.Module, Tensor, Tensor]:
    """A linear two-class model and one sample per entry of ``needed``, all predicted class 0.

    The logit margin is ``z0 - z1 = b - u . (x - 0.5)``; sample i starts ``a_i`` along ``-u`` from 0.5,
    with margin ``m_i = b + a_i |u|``. The closest point of class 1 is at L2 distance ``m_i / |u|``, and
    ``||d||^2 + c * max(m_i - u . d, 0)`` reaches it only when ``c >= 2 m_i / |u|^2`` (its minimiser
    along ``u`` is ``|d| = c |u| / 2``). Returns the model, the samples and their distances.
    """
    d = 64
    u = torch.full((d,), 0.05)
    norm = float(u.norm())
    margins = torch.tensor([c * norm**2 / 2 for c in needed])  # c* = 2 m / |u|^2
    b = float(margins.min())
    x = 0.5 - ((margins - b) / norm)[:, None] * (u / norm)
    model = nn.Linear(d, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0] = -u
        model.bias.copy_(torch.tensor([b + 0.5 * float(u.sum()), 0.0]))
    return model, x, margins / norm


def test_binary_search_matches_closed_form_on_linear_model():
    """Sample 0 needs c >= 0.2, sample 1 c >= 4.5: from c = 1 the rule visits 1, .5, .25, .125 and
    1, 10, 5.5, 3.25 (each at least 20% away from the threshold, so every step's outcome is known)."""
    model, x, dist = _linear_case([0.2, 4.5])
    trace = CWL2(c=1.0, steps=600, lr=0.001, binary_steps=4, abort_early=False,
                 warm_start=False).search(model, x, torch.zeros(2, dtype=torch.long))
    expected_ok = [[True, True, True, False], [False, True, True, False]]
    assert trace.succeeded.T.tolist() == expected_ok
    for i, oks in enumerate(expected_ok):
        assert trace.constants[:, i].tolist() == pytest.approx(reference_constants(1.0, oks))
    assert trace.constants[:, 0].tolist() == pytest.approx([1.0, 0.5, 0.25, 0.125])
    assert trace.constants[:, 1].tolist() == pytest.approx([1.0, 10.0, 5.5, 3.25])
    # the kept example: beyond the boundary (no successful point is closer), and close to it
    assert (predict(model, trace.adv) == 1).all()
    l2 = (trace.adv - x).flatten(1).norm(dim=1)
    assert l2.tolist() == pytest.approx(trace.l2.tolist(), rel=1e-5)
    assert (l2 >= dist * (1 - 1e-4)).all() and (l2 <= dist * 1.03).all()


def test_warm_start_keeps_the_rule_on_linear_model():
    """With a warm start a step may begin on an adversarial iterate; the constants still follow the
    rule applied to the recorded outcomes, and the kept examples are as close as the cold search's."""
    model, x, dist = _linear_case([0.2, 4.5])
    trace = CWL2(c=1.0, steps=600, lr=0.001, binary_steps=4, abort_early=False).search(
        model, x, torch.zeros(2, dtype=torch.long))
    for i in range(2):
        oks = trace.succeeded[:, i].tolist()
        assert trace.constants[:, i].tolist() == pytest.approx(reference_constants(1.0, oks))
    assert trace.succeeded[:, 1].tolist()[:2] == [False, True]  # c = 1 < 4 fails, c = 10 succeeds
    assert (trace.l2 >= dist * (1 - 1e-4)).all() and (trace.l2 <= dist * 1.03).all()


class Recorder(nn.Module):
    """Passes inputs through and records every batch the attack evaluates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        self.seen.append((x.detach().clone(), out.detach().clone()))
        return out


@pytest.mark.parametrize("warm_start", [True, False])
def test_kept_example_is_smallest_successful_seen(trained_mnistconv, digits_test, warm_start):
    x = digits_test[0][:12]
    pred = predict(trained_mnistconv, x)
    rec = Recorder(trained_mnistconv)
    trace = CWL2(c=0.05, steps=15, lr=0.03, binary_steps=3, abort_early=False,
                 warm_start=warm_start).search(rec, x, pred)
    best = torch.full((len(x),), float("inf"))
    for seen, out in rec.seen:
        ok = out.argmax(1) != pred
        best = torch.where(ok, torch.minimum(best, (seen - x).flatten(1).norm(dim=1)), best)
    assert torch.isfinite(best).any()
    assert torch.allclose(trace.l2, best, rtol=1e-5)
    found = torch.isfinite(best)
    assert torch.allclose((trace.adv - x).flatten(1).norm(dim=1)[found], best[found], rtol=1e-5)
    assert torch.equal(trace.adv[~found], x[~found])
    # the constants follow the rule, given each step's outcome
    for i in range(len(x)):
        assert trace.constants[:, i].tolist() == pytest.approx(
            reference_constants(0.05, trace.succeeded[:, i].tolist()))


def seeds_cw_reference(model: nn.Module, x: Tensor, y: Tensor, c: float, steps: int, lr: float) -> Tensor:
    """The seeds' CW-L2 (one binary step, no abort), written out plainly: start at atanh(+-0.999999) for
    pixels at a bound, Adam (betas 0.9/0.999, eps 1e-8), keep the smallest successful iterate."""
    w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    mod, m1, m2 = torch.zeros_like(x, requires_grad=True), torch.zeros_like(x), torch.zeros_like(x)
    best, best_l2 = x.clone(), torch.full((len(x),), float("inf"))
    for t in range(1, steps + 2):
        adv = (torch.tanh(w0 + mod) + 1) / 2
        out = model(adv)
        l2 = (adv - x).flatten(1).square().sum(1)
        ok = out.argmax(1) != y
        better = ok & (l2 < best_l2)
        best[better], best_l2[better] = adv[better].detach(), l2[better].detach()
        if t == steps + 1:
            break
        other = out.scatter(1, y[:, None], float("-inf")).amax(1)
        f = (out.gather(1, y[:, None]).squeeze(1) - other).clamp(min=0)
        (g,) = torch.autograd.grad((l2 + c * f).sum(), mod)
        with torch.no_grad():
            m1.mul_(0.9).add_(0.1 * g)
            m2.mul_(0.999).add_(0.001 * g * g)
            mod -= lr / (1 - 0.9**t) * m1 / ((m2 / (1 - 0.999**t)).sqrt() + 1e-8)
    return best


def test_seeds_protocol_is_reachable_exactly(trained_mnistconv, digits_test):
    """``start_margin=1e-6`` with one binary step is the seeds' attack (reference loop above); a warm start
    changes nothing there; the default start differs (it is not the seeds')."""
    x = digits_test[0][:8]
    pred = predict(trained_mnistconv, x)
    ref = seeds_cw_reference(trained_mnistconv, x, pred, c=10.0, steps=15, lr=0.1)
    kw = {"c": 10.0, "steps": 15, "lr": 0.1, "binary_steps": 1, "abort_early": False, "start_margin": 1e-6}
    ours = CWL2(**kw)(trained_mnistconv, x, pred)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.equal(ours, CWL2(**{**kw, "warm_start": False})(trained_mnistconv, x, pred))
    assert not torch.equal(ours, CWL2(**{**kw, "start_margin": 1e-2})(trained_mnistconv, x, pred))
    with pytest.raises(QrobustError, match="start_margin"):
        CWL2(start_margin=1.0)
    assert CWL2().config()["warm_start"] is True


@pytest.mark.peer
@pytest.mark.slow
def test_cw_at_least_as_strong_as_cleverhans4(trained_mnistconv, digits_test):
    """The benchmark's budget (5 binary steps x 100 iterations, Adam lr 0.01, initial c 0.01) on 10
    digits, without abort early (CleverHans 4 has none): success at least CleverHans 4's, mean L2 of
    successes at most 5% above its."""
    ch = pytest.importorskip("cleverhans.torch.attacks.carlini_wagner_l2")
    x = digits_test[0][:10]
    pred = predict(trained_mnistconv, x)
    ref = ch.carlini_wagner_l2(trained_mnistconv, x, 10, y=pred, lr=0.01, initial_const=0.01,
                               binary_search_steps=5, max_iterations=100).detach()
    ours = CWL2(c=0.01, steps=100, lr=0.01, binary_steps=5, abort_early=False)(trained_mnistconv, x, pred)
    ok_ref, ok_ours = predict(trained_mnistconv, ref) != pred, predict(trained_mnistconv, ours) != pred
    assert ok_ours.sum() >= ok_ref.sum()
    l2_ref = (ref - x).flatten(1).norm(dim=1)[ok_ref].mean()
    l2_ours = (ours - x).flatten(1).norm(dim=1)[ok_ours].mean()
    assert l2_ours <= 1.05 * l2_ref
