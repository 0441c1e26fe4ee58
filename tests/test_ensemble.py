"""EMPIR ensembles: the vote rule, what forward returns, and legacy vs adaptive attack gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.ensemble import Ensemble, agreeing, member_bits, vote
from qrobust.errors import QrobustError
from qrobust.evaluate import accuracy
from qrobust.models import create_model


class Fixed(nn.Module):
    """A linear member whose prediction is pinned to ``cls`` by a large bias, with input gradients from W."""

    def __init__(self, cls: int, seed: int, d: int = 12, c: int = 5, bias: float = 4.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d, c)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(c, d, generator=g) * 0.05)
            self.lin.bias.zero_()
            self.lin.bias[cls] = bias

    def forward(self, x):
        return self.lin(x.flatten(1))


def _x(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 12, generator=torch.Generator().manual_seed(seed))


def _grad(module: nn.Module, x: torch.Tensor, loss) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    loss(module(x)).sum().backward()
    return x.grad.detach()


# ---------------------------------------------------------------- vote rule on hand-made predictions

def test_vote_majority_and_all_disagree_goes_to_designated():
    preds = torch.tensor([[1, 1, 2, 3, 4],
                          [1, 2, 2, 4, 4],
                          [0, 0, 0, 5, 4]])  # member 2 is EMPIR's full-precision model 3
    assert vote(preds, designated=2, num_classes=10).tolist() == [1, 0, 2, 5, 4]
    # the same cases with the designated member first: all-disagree now follows member 0
    assert vote(preds, designated=0, num_classes=10).tolist() == [1, 1, 2, 3, 4]


def test_vote_ties_with_more_members():
    # 4 members, 2-2: the pair containing the designated member (index 3) wins, whatever the class index
    preds = torch.tensor([[1, 7], [1, 7], [6, 2], [6, 2]])
    assert vote(preds, designated=3, num_classes=10).tolist() == [6, 2]
    assert vote(preds, designated=0, num_classes=10).tolist() == [1, 7]
    # 5 members, 2-2-1 with the designated member alone: highest mean probability among the tied classes
    preds = torch.tensor([[3], [3], [8], [8], [0]])
    probs = torch.zeros(5, 1, 10)
    probs[:, 0, 3], probs[:, 0, 8] = 0.5, 0.3
    probs[2:4, 0, 8] = 0.9
    assert vote(preds, designated=4, probs=probs).tolist() == [8]
    # ... and without probabilities, the lowest tied class index
    assert vote(preds, designated=4, num_classes=10).tolist() == [3]
    # 2 members that disagree: the designated one decides
    assert vote(torch.tensor([[4], [9]]), designated=1, num_classes=10).tolist() == [9]


def test_agreeing_mask_is_never_empty():
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 4, (5, 200), generator=g)
    win = vote(preds, designated=4, num_classes=4)
    mask = agreeing(preds, win)
    assert mask.any(0).all()
    counts = torch.stack([(preds == k).sum(0) for k in range(4)], 1)
    assert (mask.sum(0) == counts.max(1).values).all()  # the winner always has the top vote count


def test_vote_rejects_bad_designated():
    with pytest.raises(QrobustError, match="designated"):
        vote(torch.zeros(3, 2, dtype=torch.long), designated=3, num_classes=2)


# ---------------------------------------------------------------- forward, rules, evaluate.accuracy

def _mixed_ensemble(rule="vote"):
    # sample-wise disagreement comes from the input, so use real (random) MNISTconv members
    torch.manual_seed(0)
    members = [create_model("mnistconv", wbits=2, abits=4), create_model("mnistconv", wbits=2, abits=4),
               create_model("mnistconv")]
    return Ensemble(members, rule=rule).eval()


def test_designated_defaults_to_last_full_precision_member():
    fp, lp = create_model("mnistconv"), create_model("mnistconv", wbits=2, abits=4)
    assert member_bits(fp) == 32 and member_bits(lp) == 2
    assert Ensemble([lp, lp, fp]).designated == 2
    assert Ensemble([fp, lp, lp]).designated == 0
    assert Ensemble([lp, lp]).designated == 1  # no FP member: the last one
    assert Ensemble([lp, fp, lp], designated=-1).designated == 2


def test_forward_argmax_is_the_vote_and_softmax_the_agreeing_mean(digits_test):
    x = digits_test[0][:64]
    ens = _mixed_ensemble()
    logits = ens.member_logits(x).detach()
    preds = logits.argmax(-1)
    assert (preds[0] != preds[2]).any(), "test needs disagreeing members"
    win = vote(preds, 2, num_classes=10)
    out = ens(x).detach()
    assert torch.equal(out.argmax(1), win)
    # independent oracle for softmax(forward): mean softmax of the members that voted for the winner
    probs = F.softmax(logits, -1)
    mask = (preds == win).float()
    expected = (probs * mask[:, :, None]).sum(0) / mask.sum(0)[:, None]
    torch.testing.assert_close(F.softmax(out, 1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["vote", "mean_softmax", "mean_logits"])
def test_accuracy_uses_the_chosen_rule(digits_test, rule):
    x, y = digits_test
    ens = _mixed_ensemble(rule)
    logits = ens.member_logits(x).detach()
    if rule == "vote":
        pred = vote(logits.argmax(-1), 2, num_classes=10)
    elif rule == "mean_softmax":
        pred = F.softmax(logits, -1).mean(0).argmax(1)
    else:
        pred = logits.mean(0).argmax(1)
    assert accuracy(ens, x, y) == pytest.approx((pred == y).float().mean().item())
    assert torch.allclose(F.softmax(ens(x), 1).sum(1), torch.ones(len(x)))


def test_identical_members_behave_like_one(trained_mnistconv_a4w2, digits_test):
    x, y = digits_test[0][:32], digits_test[1][:32]
    member = trained_mnistconv_a4w2
    ens = Ensemble([copy.deepcopy(member) for _ in range(3)]).eval()
    assert torch.equal(ens.predict(x), member(x).argmax(1))
    assert accuracy(ens, x, y) == accuracy(member, x, y)
    ce = lambda out: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    g_member = _grad(member, x, ce)
    assert g_member.abs().sum() > 0  # STE lets gradients through the 4-bit input quantizer
    for combine in ("mean_softmax", "mean_logits"):
        target = ens.attack_target("adaptive", "pgd", combine=combine)
        torch.testing.assert_close(_grad(target, x, ce), g_member, rtol=1e-4,
                                   atol=1e-5 * g_member.abs().max().item())
    # legacy FGSM on identical members = EMPIR's quirk on the single member: CE of softmax fed as logits
    ce_prob = lambda out: F.cross_entropy(F.softmax(out, 1), y, reduction="none")  # noqa: E731
    g_prob = _grad(member, x, ce_prob)
    torch.testing.assert_close(_grad(ens.attack_target("legacy", "fgsm"), x, ce_prob), g_prob,
                               rtol=1e-4, atol=1e-5 * g_prob.abs().max().item())


# ---------------------------------------------------------------- legacy vs adaptive gradients

def test_legacy_bim_and_cw_only_see_the_designated_member():
    x = _x()
    y = torch.zeros(len(x), dtype=torch.long)
    a, b, fp = Fixed(1, seed=1), Fixed(1, seed=2), Fixed(2, seed=3)
    ens = Ensemble([a, b, fp], designated=2)
    ce = lambda out: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    for name in ("bim", "cw"):
        target = ens.attack_target("legacy", name)
        torch.testing.assert_close(_grad(target, x, ce), _grad(fp, x, ce))
        assert target.loss == ("cw" if name == "cw" else "ce")
    # the adaptive BIM gradient involves the low-precision members too
    adaptive = _grad(ens.attack_target("adaptive", "bim"), x, ce)
    assert not torch.allclose(adaptive, _grad(fp, x, ce))


def test_legacy_fgsm_ignores_disagreeing_members_adaptive_does_not():
    x = _x()
    a, b, fp = Fixed(1, seed=1), Fixed(1, seed=2), Fixed(2, seed=3)  # vote: class 1, FP disagrees
    ens = Ensemble([a, b, fp], designated=2)
    y = ens.attack_target("legacy", "fgsm").labels(x)
    assert (y == 1).all()
    ce_prob = lambda out: F.cross_entropy(F.softmax(out, 1), y, reduction="none")  # noqa: E731
    ce = lambda out: F.cross_entropy(out, y, reduction="none")  # noqa: E731

    def oracle(z):  # EMPIR: CE(one-hot vote, mean softmax of agreeing members used as logits)
        p = (F.softmax(a(z), 1) + F.softmax(b(z), 1)) / 2
        return F.cross_entropy(p, y, reduction="none")

    legacy = ens.attack_target("legacy", "fgsm")
    g_legacy = _grad(legacy, x, ce_prob)
    x_req = x.clone().requires_grad_(True)
    oracle(x_req).sum().backward()
    torch.testing.assert_close(g_legacy, x_req.grad)
    g_adaptive = _grad(ens.attack_target("adaptive", "fgsm"), x, ce)
    # change the disagreeing FP member's weights (its prediction stays 2): legacy is unchanged, adaptive moves
    with torch.no_grad():
        fp.lin.weight.mul_(-3.0)
    torch.testing.assert_close(_grad(legacy, x, ce_prob), g_legacy)
    assert not torch.allclose(_grad(ens.attack_target("adaptive", "fgsm"), x, ce), g_adaptive)
    # adaptive oracle: CE on the log of the mean softmax of all three members
    z = x.clone().requires_grad_(True)
    p = sum(F.softmax(m(z), 1) for m in (a, b, fp)) / 3
    F.nll_loss(p.log(), y, reduction="none").sum().backward()
    torch.testing.assert_close(_grad(ens.attack_target("adaptive", "fgsm"), x, ce), z.grad)


def test_legacy_mask_follows_the_current_input_unless_frozen():
    # member 1 flips its prediction from class 1 to class 3 when the first feature is large
    class Switch(nn.Module):
        def forward(self, x):
            z = x.flatten(1)
            out = torch.zeros(len(z), 5)
            out[:, 1] = 1.0
            out[:, 3] = 10 * (z[:, 0] - 0.5) + z[:, 1]
            return out

    a, sw, fp = Fixed(1, seed=1), Switch(), Fixed(3, seed=3)
    ens = Ensemble([a, sw, fp], designated=2)
    clean = torch.full((1, 12), 0.1)
    moved = clean.clone()
    moved[0, 0] = 0.9
    assert ens.predict(clean).item() == 1 and ens.predict(moved).item() == 3
    target = ens.attack_target("legacy", "pgd")
    # recomputed on the current input: agreeing members {a, sw} on clean, {sw, fp} on moved
    expect_moved = torch.log((F.softmax(sw(moved), 1) + F.softmax(fp(moved), 1)) / 2)
    torch.testing.assert_close(target(moved), expect_moved)
    with target.frozen_mask(clean):
        expect_frozen = torch.log((F.softmax(a(moved), 1) + F.softmax(sw(moved), 1)) / 2)
        torch.testing.assert_close(target(moved), expect_frozen)
        with pytest.raises(QrobustError, match="frozen mask"):
            target(torch.cat([moved, moved]))


def test_errors_are_user_facing():
    m = Fixed(0, seed=0)
    with pytest.raises(QrobustError, match="rule"):
        Ensemble([m], rule="median")
    ens = Ensemble([m, Fixed(1, seed=1)])
    with pytest.raises(QrobustError, match="mode"):
        ens.attack_target("whitebox", "pgd")
    with pytest.raises(QrobustError, match="attack"):
        ens.attack_target("legacy", "deepfool")
    with pytest.raises(QrobustError, match="at least one"):
        Ensemble([])
    with pytest.raises(QrobustError, match="input shapes"):
        Ensemble([create_model("mnistconv"), create_model("cifarconv")])


# ---------------------------------------------------------------- threat models and the composed attack

def test_one_threat_model_enumeration_and_adaptive_logits():
    from qrobust.cli.empir import register  # noqa: F401  (the CLI's --target choices come from it too)
    from qrobust.ensemble import THREAT_MODELS
    from qrobust.experiment.config import TARGETS

    assert TARGETS is THREAT_MODELS == ("legacy", "adaptive", "adaptive_logits")
    x = _x()
    a, b, fp = Fixed(1, seed=1), Fixed(1, seed=2), Fixed(2, seed=3)
    ens = Ensemble([a, b, fp], designated=2)
    y = ens.predict(x)
    ce = lambda out: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    z = x.clone().requires_grad_(True)  # oracle: CE on the mean of the members' logits
    F.cross_entropy(sum(m(z) for m in (a, b, fp)) / 3, y, reduction="none").sum().backward()
    target = ens.attack_target("adaptive_logits", "pgd")
    assert target.mode == "adaptive_logits" and target.output == "mean_logits"
    torch.testing.assert_close(_grad(target, x, ce), z.grad)
    same = ens.attack_target("adaptive", "pgd", combine="mean_logits")
    torch.testing.assert_close(_grad(same, x, ce), z.grad)
    with pytest.raises(QrobustError, match="adaptive_logits combines mean_logits"):
        ens.attack_target("adaptive_logits", "pgd", combine="mean_softmax")


def test_ensemble_attack_differentiates_the_target_and_is_scored_on_the_ensemble():
    from qrobust.attacks import FGSM, Attack
    from qrobust.ensemble import ensemble_attack, on_target
    from qrobust.evaluate import evaluate_attack

    x = _x(8)
    a, b, fp = Fixed(1, seed=1), Fixed(1, seed=2), Fixed(2, seed=3)
    ens = Ensemble([a, b, fp], designated=2)
    atk = ensemble_attack(ens, "FGM", "legacy", eps=0.3)
    assert isinstance(atk, Attack) and atk.name == "fgsm"
    target = ens.attack_target("legacy", "fgsm")
    ref = FGSM(eps=0.3, loss="ce_prob")(target, x, ens.predict(x))  # labels: the ensemble's own vote
    torch.testing.assert_close(atk(ens, x), ref)
    res = evaluate_attack(ens, atk, x, ens.predict(x), labels="pred", batch_size=8, keep_adv=True)
    assert res.adversarial_accuracy == (ens.predict(res.x_adv) == ens.predict(x)).float().mean().item()
    cfg = res.params
    assert cfg["ensemble_mode"] == "legacy" and cfg["target_output"] == target.output
    assert cfg["loss"] == "ce_prob" and cfg["target"] == target.description
    with pytest.raises(QrobustError, match="needs loss='ce_prob'"):
        on_target(FGSM(eps=0.3), target)  # legacy: the loss is part of EMPIR's threat model
    adaptive = on_target(FGSM(eps=0.3, loss="cw"), ens.attack_target("adaptive", "fgsm"))  # free loss
    assert adaptive.config()["loss"] == "cw"
