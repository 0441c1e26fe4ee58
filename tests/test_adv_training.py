"""Adversarial training: seed-A flag mapping, the training attacks, and that it buys robustness."""

from __future__ import annotations

import pytest
import torch

from qrobust.attacks import PGD, RandomEpsFGSM
from qrobust.cli import build_parser
from qrobust.cli.adv import build_adversary, make_adversary
from qrobust.errors import QrobustError
from qrobust.evaluate import evaluate_attack


def _parse(*extra: str):
    return build_parser().parse_args(["train", "--model", "mnistconv", "--out", "/tmp/unused", *extra])


def test_adv_flags_and_seed_a_mapping():
    assert _parse("--adv", "1").adv == "pgd"
    assert _parse("--adv", "2").adv == "fgsm-random"
    args = _parse("--adv", "pgd", "--adv-eps", "0.2", "--adv-alpha", "0.05", "--adv-steps", "7",
                  "--adv-start-epoch", "3", "--epochs", "5")
    adversary = build_adversary(args)
    atk = adversary.attack
    assert isinstance(atk, PGD) and (atk.eps, atk.alpha, atk.steps) == (0.2, 0.05, 7)
    assert args.adv_description["kind"] == "pgd" and args.adv_description["start_epoch"] == 3
    with pytest.raises(SystemExit):
        _parse("--adv", "3")
    with pytest.raises(QrobustError, match="no adversarial epoch"):
        build_adversary(_parse("--adv", "fgsm", "--adv-start-epoch", "15"))


def test_random_eps_fgsm_draws_per_example(trained_mnistconv, digits_test):
    x, y = digits_test
    x, y = x[:64], y[:64]
    atk = RandomEpsFGSM(scale=0.1, eps=0.3)
    gen = torch.Generator().manual_seed(0)
    steps = atk._step_sizes(x, gen).flatten()
    assert steps.min() >= 0 and steps.max() <= 0.2 + 1e-7  # truncated at 2 * scale
    assert steps.std() > 0.02  # really one eps per example
    x_adv = atk(trained_mnistconv, x, y)
    linf = (x_adv - x).abs().flatten(1).amax(1)
    assert (linf <= 0.2 + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    # a stream generator gives a fresh draw per batch, reproducibly
    adv = make_adversary(atk, seed=4)
    a1, a2 = adv(trained_mnistconv, x, y), adv(trained_mnistconv, x, y)
    assert not torch.equal(a1, a2)
    assert torch.equal(make_adversary(atk, seed=4)(trained_mnistconv, x, y), a1)


@pytest.mark.slow
def test_pgd_training_buys_robustness(trained_mnistconv, digits, digits_test):
    """Seed A's schedule: clean epochs (the fixture's 2), then (CE_clean + CE_adv) / 2 with PGD-3."""
    import copy

    from qrobust.train import TrainConfig, train

    model = copy.deepcopy(trained_mnistconv)
    train(model, digits.train, None, TrainConfig(epochs=1, batch_size=64, seed=0, max_train=2000),
          adversary=make_adversary(PGD(eps=0.2, alpha=0.1, steps=3), seed=1))
    model.eval()
    x, y = digits_test
    attack = PGD(eps=0.15, alpha=0.03, steps=10)
    robust = evaluate_attack(model, attack, x, y, labels="true")
    plain = evaluate_attack(trained_mnistconv, attack, x, y, labels="true")
    assert robust.clean_accuracy > 0.8
    assert robust.adversarial_accuracy > plain.adversarial_accuracy + 0.1
