"""The worst-case evaluator: survivors only, never weaker than one attack, vote-aware ensembles, EOT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qrobust.attacks import APGD, APGDT, Attack, Square, create_attack
from qrobust.attacks.losses import vote_scores
from qrobust.ensemble import Ensemble, VoteView, on_target
from qrobust.errors import QrobustError
from qrobust.evaluate import accuracy, evaluate_attack
from qrobust.models.common import MCDropout
from qrobust.suite import ENSEMBLE_SUITE, WorstCase, worst_case

FAST = {"steps": 10, "n_queries": 100, "n_target_classes": 2}


@pytest.fixture(scope="module")
def batch(digits_test):
    x, y = digits_test
    return x[:40], y[:40]


class _Recorder(Attack):
    """Runs ``inner`` and remembers which images it was given."""

    def __init__(self, inner: Attack) -> None:
        super().__init__(seed=inner.seed)
        self.inner, self.seen = inner, []

    def _run(self, model, x, y, generator):
        self.seen.append(x.clone())
        return self.inner(model, x, y, generator=generator)


def test_later_attacks_only_see_survivors(trained_mnistconv, batch):
    x, y = batch
    atk = WorstCase(eps=0.1, **FAST)
    real = atk.attacks
    recorders: list[_Recorder] = []

    def spy(model, num_classes):
        entries = real(model, num_classes)
        recorders.extend(_Recorder(a) for _, a, _ in entries)
        return [(n, r, v) for (n, _, v), r in zip(entries, recorders, strict=True)]

    atk.attacks = spy  # type: ignore[method-assign]
    x_adv = atk(trained_mnistconv, x, y)
    rep = atk.report
    pred = trained_mnistconv(x_adv).argmax(1)
    assert rep.suite == ["apgd_ce", "apgd_t", "square"]
    assert [b is None for b in rep.broken_by] == (pred == y).tolist()  # the returned images ARE the verdicts
    assert (x_adv - x).abs().amax() <= 0.1 + 1e-6
    gone: set[str] = {"clean"}
    for name, rec in zip(rep.suite, recorders, strict=True):
        alive = [i for i, b in enumerate(rep.broken_by) if b not in gone]
        assert len(rec.seen) == (1 if alive else 0)
        if alive:
            assert torch.equal(rec.seen[0], x[alive])
        assert rep.attacked[name] == len(alive)
        gone.add(name)
    assert rep.per_attack()[0]["broken"] > 0 and rep.robust_after("apgd_t") <= rep.robust_after("apgd_ce")


def test_worst_case_never_above_any_single_attack(trained_mnistconv, batch):
    x, y = batch
    rep = worst_case(trained_mnistconv, x, y, eps=0.1, batch_size=25, **FAST)
    x_adv = rep.x_adv
    assert rep.n == len(x) and rep.robust == int((trained_mnistconv(x_adv).argmax(1) == y).sum())
    singles = {"apgd_ce": APGD(eps=0.1, steps=10), "apgd_t": APGDT(eps=0.1, steps=10, n_target_classes=2),
               "square": Square(eps=0.1, n_queries=100)}
    for name, single in singles.items():
        alone = evaluate_attack(trained_mnistconv, single, x, y, labels="true", batch_size=25)
        assert rep.accuracy <= alone.adversarial_accuracy + 1e-9, name
    d = rep.as_dict()
    assert d["ci95"][0] <= d["worst_case_accuracy"] <= d["ci95"][1]
    assert d["per_attack"][-1]["robust_accuracy"] == d["worst_case_accuracy"]


def _weak_strong_ensemble() -> tuple[Ensemble, torch.Tensor, torch.Tensor]:
    """Two weak linear members (unit-scale random weights) and one confident one (logits x 30), kept on
    inputs where all three agree: the mean logits follow the confident member, while the vote falls as
    soon as the two weak ones agree on a wrong class."""
    g = torch.Generator().manual_seed(0)

    def member(scale: float) -> nn.Module:
        lin = nn.Linear(16, 3, bias=False)
        lin.weight.data = scale * torch.randn(3, 16, generator=g)
        return nn.Sequential(nn.Flatten(), lin)

    ens = Ensemble([member(1.0), member(1.0), member(30.0)]).eval()
    x = torch.rand(600, 1, 4, 4, generator=g)
    y = ens(x).argmax(1)
    keep = (torch.stack([m(x).argmax(1) for m in ens.members]) == y).all(0)
    return ens, x[keep], y[keep]


def test_vote_scores_by_hand():
    # 3 members, 1 sample, 3 classes: members 0 and 1 vote class 1 (margins 1 and 2), member 2 class 0
    logits = torch.tensor([[[0.0, 1.0, -1.0]], [[0.0, 2.0, 0.0]], [[5.0, 0.0, 0.0]]])
    s = vote_scores(logits)  # k = 2, kappa = 0
    # class 0: d = (-1, -2, 5) -> top-2 of min(d, 0) = 0 + (-1); class 1: d = (1, 2, -5) -> 0 + 0
    # class 2: d = (-2, -2, -5) -> -2 + -2
    assert s.tolist() == [[-1.0, 0.0, -4.0]]
    assert s.argmax(1).item() == 1  # a majority votes 1: the only class at 0
    with pytest.raises(QrobustError, match="k must be"):
        vote_scores(logits, k=4)


def test_vote_aware_objective_beats_the_mean_logits():
    ens, x, y = _weak_strong_ensemble()
    assert len(x) >= 40
    eps = 0.15
    mean_logits = on_target(APGD(eps=eps, steps=30), ens.attack_target("adaptive_logits", "pgd"))
    vote_aware = APGD(eps=eps, steps=30, loss="cw")
    acc_mean = accuracy(ens, mean_logits(ens, x, y), y)
    acc_vote = accuracy(ens, vote_aware(VoteView(ens), x, y), y)
    assert acc_vote <= acc_mean
    assert acc_vote <= acc_mean - 0.2, (acc_vote, acc_mean)  # on this construction, by a wide margin
    # Square scored by the vote-aware objective also breaks the vote, success judged on the vote
    acc_square = accuracy(ens, Square(eps=eps, n_queries=300, p_init=0.3)(VoteView(ens), x, y), y)
    assert acc_square <= acc_mean


def test_ensemble_suite_through_the_runner_path():
    ens, x, y = _weak_strong_ensemble()
    x, y = x[:30], y[:30]
    atk = on_target(create_attack("worst_case", eps=0.15, **FAST), ens.attack_target("legacy", "worst_case"))
    res = evaluate_attack(ens, atk, x, y, batch_size=15)
    report = res.params["report"]  # what the runner stores in the record's attack config
    assert report["suite"] == list(ENSEMBLE_SUITE) and report["n"] == 30
    assert res.params["ensemble_mode"] == "legacy"
    assert res.adversarial_accuracy == pytest.approx(report["worst_case_accuracy"])
    broken = sum(b not in (None, "clean") for b in report["broken_by"])
    assert broken == round(30 * (1 - res.adversarial_accuracy))


class _Randomized(nn.Module):
    """A trained net with dropout kept on over its logits: every pass differs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.net, self.drop = model, MCDropout(0.2, always_on=True)

    def forward(self, x):
        return self.drop(self.net(x))


def test_square_on_the_mc_mean_breaks_a_randomized_model(trained_mnistconv, batch):
    x, y = batch[0][:30], batch[1][:30]
    model = _Randomized(trained_mnistconv).eval()
    atk = WorstCase(eps=0.3, suite=["square"], n_queries=600, mc_samples=16)
    x_adv = atk(model, x, y)
    rep = atk.report
    assert rep.suite == ["square_eot"]
    assert rep.accuracy <= 0.5 * rep.robust_after(None) / rep.n
    from qrobust.mc import mc_probs

    torch.manual_seed(123)  # an independent Monte-Carlo mean with more copies mostly agrees (the points
    fresh = mc_probs(model, x_adv, 40).mean(0).argmax(1)  # found lie near a noisy decision boundary)
    broken = torch.tensor([b == "square_eot" for b in rep.broken_by])
    assert (fresh[broken] != y[broken]).float().mean() >= 0.6


def test_eot_suite_on_randomized_model_is_reproducible(trained_mnistconv, batch):
    x, y = batch[0][:20], batch[1][:20]
    model = _Randomized(trained_mnistconv).eval()
    state = torch.random.get_rng_state()
    rep1 = worst_case(model, x, y, eps=0.1, mc_samples=4, seed=3, **FAST)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is restored
    rep2 = worst_case(model, x, y, eps=0.1, mc_samples=4, seed=3, **FAST)
    assert rep1.suite == ["apgd_ce_eot", "apgd_t_eot", "square_eot"]
    assert torch.equal(rep1.x_adv, rep2.x_adv) and rep1.broken_by == rep2.broken_by
    assert rep1.accuracy < rep1.robust_after(None) / rep1.n


def test_settings_are_checked(trained_mnistconv, batch):
    with pytest.raises(QrobustError, match="unknown attack 'pgd'"):
        create_attack("worst_case", suite=["pgd"])
    with pytest.raises(QrobustError, match="at most once"):
        WorstCase(suite=["square", "square"])
    with pytest.raises(QrobustError, match="apply only to an ensemble"):
        WorstCase(suite=["apgd_vote"])(trained_mnistconv, batch[0][:2])
    with pytest.raises(QrobustError, match="does not take"):
        create_attack("worst-case", loss="ce")
    cfg = WorstCase(eps=0.2).config()
    assert cfg["attack"] == "worst_case" and "report" not in cfg and "loss" not in cfg


def test_summary_table_has_a_worst_case_column_shared_by_the_ensemble_rows():
    from qrobust.report import check_results, summary_table
    from qrobust.report.index import sanity_rows

    def rec(kind, row, attack, name, eps, acc, target="ens"):
        return {"kind": kind, "row": row, "target": target, "attack": attack, "attack_name": name, "eps": eps,
                "accuracy": acc, "n": 200}

    recs = [rec("clean", "E", "clean", None, None, 0.9),
            rec("attack", "E [legacy]", "PGD", "pgd", 0.3, 0.40),
            rec("attack", "E [adaptive]", "PGD", "pgd", 0.3, 0.12),
            rec("attack", "E [adaptive]", "WORST CASE", "worst_case", 0.3, 0.05)]
    sanity = check_results(sanity_rows(recs))
    table = summary_table(recs, [("PGD", 0.3), ("WORST CASE", 0.3)], sanity=sanity)
    assert table.columns == ["model", "bits", "clean", "PGD (0.3)", "average", "worst case (0.3)", "sanity"]
    by_row = {r[0]: r for r in table.rows}
    assert by_row["E [legacy]"][3:6] == ["40.00", "40.00", "5.00"]  # the worst case is not averaged
    assert by_row["E [adaptive]"][5] == "5.00"
    assert by_row["E [legacy]"][-1] == "**suspected gradient masking**"  # PGD 35 points above the worst case
    assert by_row["E [adaptive]"][-1] == "ok"  # 7 points: within the 10-point gap


def test_cli_prints_and_writes_the_report(trained_mnistconv, tmp_path, capsys):
    import json

    from qrobust.checkpoint import save_checkpoint
    from qrobust.cli import main

    ckpt = save_checkpoint(tmp_path / "m", trained_mnistconv, {"dataset": "digits"})
    out = tmp_path / "wc.json"
    argv = ["worst-case", str(ckpt), "-n", "12", "--data", "digits", "--eps", "0.1", "--steps", "5",
            "--queries", "20", "--target-classes", "2", "--json-out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["n"] == 12
    assert [r["attack"] for r in report["per_attack"]] == ["apgd_ce", "apgd_t", "square"]
    assert f"worst-case robust accuracy {report['worst_case_accuracy']:.4f}" in printed
    assert main(["worst-case", str(ckpt), "-n", "2", "--data", "digits", "--suite", "apgd_vote"]) == 2
    assert "apply only to an ensemble" in capsys.readouterr().err


def test_eot_loss_is_the_mean_loss_over_the_same_copies(trained_mnistconv, batch):
    from qrobust.attacks.losses import ce_loss
    from qrobust.mc import log_mean_softmax
    from qrobust.suite import MCCopies

    x, y = batch[0][:8], batch[1][:8]
    view = MCCopies(_Randomized(trained_mnistconv).eval(), 5)
    torch.manual_seed(0)
    out = view(x)
    copies = view.copies
    assert copies.shape == (5, 8, 10) and torch.allclose(out, log_mean_softmax(copies, 0))
    by_hand = torch.stack([ce_loss(copies[k], y) for k in range(5)]).mean(0)
    assert torch.allclose(view.eot_loss("ce")(out, y), by_hand)
    with pytest.raises(QrobustError, match="same batch"):
        view.eot_loss("ce")(out[:3], y[:3])
