"""Adversarial training: seed-A flag mapping, the training attacks and methods (FGSM-RS, PGD, TRADES),
the catastrophic-overfitting guard, resume, quantization-aware adversarial training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from qrobust import adversary as adv_mod
from qrobust.adversary import COGuard, make_objective, trades_loss
from qrobust.attacks import PGD, RandomEpsFGSM
from qrobust.cli import build_parser
from qrobust.cli.adv import adv_settings, build_adversary, make_adversary
from qrobust.data import Split
from qrobust.errors import QrobustError
from qrobust.evaluate import evaluate_attack
from qrobust.train import TrainConfig, make_optimizer, train, train_step


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


def test_cli_flags_become_train_config_fields():
    cfg = TrainConfig(**adv_settings(_parse("--adv", "fgsm-rs", "--co-guard", "--adv-eps-ramp", "1")))
    cfg.validate()
    assert (cfg.adv_method, cfg.adv_weight, cfg.co_guard, cfg.adv_eps_ramp) == ("fgsm_rs", 1.0, True, 1.0)
    assert adv_mod.default_alpha(cfg) == pytest.approx(0.375)  # Wong et al.: 1.25 eps at eps 0.3
    seed_a = TrainConfig(**adv_settings(_parse("--adv", "1", "--adv-start-epoch", "2", "--epochs", "4")))
    assert (seed_a.adv_method, seed_a.adv_steps, seed_a.adv_alpha) == ("pgd", 40, 0.01)
    assert seed_a.adv_weight == 0.5 and seed_a.adv_start_epoch == 2
    trades = TrainConfig(**adv_settings(_parse("--adv", "trades", "--trades-beta", "3")))
    assert (trades.adv_method, trades.trades_beta, trades.adv_steps) == ("trades", 3.0, 10)
    assert adv_settings(_parse()) == {"adv_start_epoch": 0, "adv_weight": 0.5}  # clean training as before
    with pytest.raises(QrobustError, match="adversarial training method"):
        TrainConfig(adv_method="free").validate()
    with pytest.raises(QrobustError, match="set adv_method"):
        train(_mlp(), _blobs(300, 0), None, TrainConfig(epochs=1, co_guard=True))


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


# -- the methods on a tiny problem --------------------------------------------------------------------

def _blobs(n: int, seed: int) -> Split:
    """Two classes: one robust feature (class shift 0.15, noise 0.1) and nine non-robust ones (shift
    0.04 each, noise 0.04): together nearly separable, but an L-inf eps of 0.1 flips every non-robust one."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    s = y.float() * 2 - 1
    robust = 0.5 + 0.15 * s + 0.1 * torch.randn(n, generator=g)
    weak = 0.5 + 0.04 * s[:, None] + 0.04 * torch.randn(n, 9, generator=g)
    x = torch.cat([robust[:, None], weak], 1).clamp(0, 1)
    return Split((x * 255).round().to(torch.uint8).view(n, 1, 1, 10), y)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))


def _robust_accuracy(model: nn.Module, split: Split, eps: float = 0.1) -> float:
    x, y = split.tensors()
    model.eval()
    x_adv = PGD(eps=eps, alpha=eps / 5, steps=20)(model, x, y)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


BLOB_CFG = {"epochs": 10, "batch_size": 64, "lr": 1e-2}


def test_fgsm_rs_raises_pgd_accuracy_over_clean_training():
    train_split, test_split = _blobs(2000, 0), _blobs(500, 1)
    clean = _mlp()
    train(clean, train_split, None, TrainConfig(**BLOB_CFG))
    robust = _mlp()
    cfg = TrainConfig(**BLOB_CFG, adv_method="fgsm_rs", adv_eps=0.1, adv_weight=1.0)
    train(robust, train_split, None, cfg)
    r_clean, r_robust = _robust_accuracy(clean, test_split), _robust_accuracy(robust, test_split)
    assert r_robust > r_clean + 0.15, (r_clean, r_robust)  # measured 0.41 -> 0.67


def test_trades_loss_equals_hand_computed_value():
    clean = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    adv = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    e = math.e
    p1, p2 = e / (e + 1), e**2 / (e**2 + 1)  # softmax of the clean logits, true class
    ce = (-math.log(p1) - math.log(p2)) / 2
    kl1 = p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5)  # adversarial softmax = (0.5, 0.5)
    kl2 = (1 - p2) * math.log((1 - p2) / 0.5) + p2 * math.log(p2 / 0.5)
    expected = ce + 2.0 * (kl1 + kl2) / 2
    assert trades_loss(clean, adv, y, beta=2.0).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.65889, abs=1e-4)  # the same by pencil: 0.22009 + 2 * 0.21940


@pytest.mark.parametrize("method", ["fgsm_rs", "pgd", "trades", "fgsm", "fgsm_random"])
def test_method_attack_stays_in_the_ball_and_skips_weight_gradients(method):
    model = _mlp()
    x, y = _blobs(64, 2).tensors()
    cfg = TrainConfig(adv_method=method, adv_eps=0.1, adv_steps=3, adv_weight=1.0)
    obj = make_objective(cfg, torch.Generator().manual_seed(0))
    x_adv = obj.perturb(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()
    assert all(p.grad is None for p in model.parameters())  # input gradient only
    loss, logits = obj(model, x, y)
    assert loss.requires_grad and logits.shape == (64, 2)


def test_eps_ramp_is_a_function_of_the_step():
    cfg = TrainConfig(adv_method="fgsm_rs", adv_eps=0.3, adv_eps_ramp=2.0, adv_start_epoch=1)
    obj = make_objective(cfg, torch.Generator())
    obj.at(10 + 4, 10)  # 5th step of the first adversarial epoch, ramp over 20 steps
    assert obj.eps == pytest.approx(0.3 * 5 / 20) and obj.alpha == pytest.approx(0.375 * 5 / 20)
    obj.at(100, 10)
    assert obj.eps == pytest.approx(0.3)


def test_cyclic_lr_schedule_peaks_at_two_fifths():
    cfg = TrainConfig(lr=5e-3, lr_schedule="cyclic")
    lrs = [cfg.lr_at(i, 100) for i in range(100)]
    assert max(lrs) == pytest.approx(5e-3) and lrs.index(max(lrs)) == 39 and lrs[-1] == 0.0


# -- the catastrophic-overfitting guard ----------------------------------------------------------------

def test_co_guard_stops_and_restores_the_best_weights(monkeypatch, tmp_path):
    seen = []
    accs = iter([0.5, 0.6, 0.55, 0.1, 0.9, 0.9])  # collapses at the 4th check (0.6 -> 0.1)

    def fake_pgd_accuracy(self, model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(accs)

    monkeypatch.setattr(COGuard, "pgd_accuracy", fake_pgd_accuracy)
    model = _mlp()
    cfg = TrainConfig(**{**BLOB_CFG, "epochs": 3}, adv_method="fgsm_rs", adv_eps=0.1, adv_weight=1.0,
                      co_guard=True, co_guard_every=5, co_guard_samples=100)
    result = train(model, _blobs(600, 0), None, cfg, state_dir=tmp_path)  # 8 steps an epoch
    assert result.co_guard["stopped_at_step"] == 20 and result.co_guard["best_pgd_accuracy"] == 0.6
    assert len(result.history) == 3  # the 20th step is the 4th of epoch 3: stopped inside it
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[1][k])  # the weights of the best (2nd) check
    assert not torch.equal(seen[3]["1.weight"], seen[1]["1.weight"])
    # a resumed run of a stopped training does not train on
    again = _mlp()
    longer = TrainConfig(**{**vars(cfg), "epochs": 5})
    result2 = train(again, _blobs(600, 0), None, longer, state_dir=tmp_path)
    assert len(result2.history) == 3 and torch.equal(again.state_dict()["1.weight"], seen[1]["1.weight"])


def test_co_guard_real_check_runs_and_records(tmp_path):
    cfg = TrainConfig(**{**BLOB_CFG, "epochs": 2}, adv_method="fgsm_rs", adv_eps=0.1, adv_weight=1.0,
                      co_guard=True, co_guard_samples=100)
    result = train(_mlp(), _blobs(600, 0), None, cfg)
    checks = result.co_guard["checks"]
    assert [c["step"] for c in checks] == [8, 16] and all(0 <= c["pgd_accuracy"] <= 1 for c in checks)
    assert result.co_guard["stopped_at_step"] is None and result.co_guard["held_out"] == 100


# -- resume, quantization-aware adversarial training ----------------------------------------------------

class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["fgsm_rs", "trades"])
def test_resume_mid_run_gives_identical_weights(method, tmp_path):
    data = _blobs(400, 0)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-2, adv_method=method, adv_eps=0.1, adv_steps=2,
                      adv_weight=1.0, adv_eps_ramp=1.5, co_guard=True, co_guard_samples=64)
    whole = _mlp()
    train(whole, data, None, cfg)

    def stop_after_first(record):
        if record.epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train(_mlp(), data, None, cfg, state_dir=tmp_path, on_epoch=stop_after_first)
    resumed = _mlp()
    result = train(resumed, data, None, cfg, state_dir=tmp_path)
    assert [r.epoch for r in result.history] == [1, 2, 3] and len(result.co_guard["checks"]) == 3
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_quantized_a4w2_adversarial_training_gradients_flow(digits):
    from qrobust.models import create_model

    torch.manual_seed(0)
    model = create_model("mnistconv", wbits=2, abits=4)
    cfg = TrainConfig(batch_size=32, adv_method="fgsm_rs", adv_eps=0.3, adv_weight=1.0)
    x, y = digits.train.head(32).tensors()
    obj = make_objective(cfg, torch.Generator().manual_seed(0))
    x_adv = obj.perturb(model, x, y)
    assert (x_adv - x).abs().amax() > 0.05  # the STE passes an input gradient through the quantizers
    opt = make_optimizer(model, cfg)
    before = copy.deepcopy(model.state_dict())
    model.train()
    loss, _ = train_step(model, opt, x, y, cfg, objective=obj)
    assert math.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # weight gradients through the STE
    assert all(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    result = train(model, digits.train, None, TrainConfig(epochs=1, batch_size=64, max_train=256,
                                                          adv_method="pgd", adv_steps=2, adv_weight=1.0))
    assert math.isfinite(result.history[0].loss)
