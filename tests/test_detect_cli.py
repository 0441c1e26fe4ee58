"""``qrobust detect`` (seed A's flags) and the Monte-Carlo attacks of qrobust.attacks.detector_aware."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from qrobust.attacks import EOTPGD, DetectorAwarePGD
from qrobust.attacks.detector_aware import detector_aware_loss, eot_ce_loss
from qrobust.checkpoint import save_checkpoint
from qrobust.cli import main
from qrobust.cli.detect import parse_attacks, recipe_from_seed_flags
from qrobust.detect import uncertainty
from qrobust.errors import QrobustError
from qrobust.mc import MCView, mc_probs, predictive_variance
from qrobust.models import create_model
from qrobust.models.common import MCDropout


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("qnn_fp", dropout=0.5)
    return save_checkpoint(tmp_path_factory.mktemp("zoo") / "qnn_fp_d05", model, {"dataset": "digits"})


@pytest.fixture(scope="module")
def small_dropout_net(digits):
    """A small MLP with dropout kept on, trained for a few hundred steps on the embedded digits (~2 s)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), MCDropout(0.5, always_on=True),
                        nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(3):
        for x, y in digits.train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return net.eval()


def test_seed_attack_codes_and_recipes():
    assert parse_attacks(["0", "1", "2,3", "4"]) == ["cw", "jsma", "fgsm", "pgd", "bim"]
    assert parse_attacks(["MadryEtAl", "fgsm"]) == ["pgd", "fgsm"]
    with pytest.raises(QrobustError, match="unknown attack"):
        parse_attacks(["5"])

    def ns(**kw):
        base = {"binary": False, "rand": False, "bit": 0, "dropout": None}
        return argparse.Namespace(**{**base, **kw})

    assert recipe_from_seed_flags(ns(dropout=0.5)) == "qnn_fp_d05"
    assert recipe_from_seed_flags(ns()) == "qnn_fp"
    assert recipe_from_seed_flags(ns(bit=3, dropout=0.5)) == "qnn_3bit_d05"
    assert recipe_from_seed_flags(ns(binary=True)) == "qnn_bnn"
    assert recipe_from_seed_flags(ns(binary=True, rand=True)) == "qnn_rbnn"
    with pytest.raises(QrobustError, match="--rand without --binary"):
        recipe_from_seed_flags(ns(rand=True))
    with pytest.raises(QrobustError, match="no trained recipe"):
        recipe_from_seed_flags(ns(bit=4, dropout=0.3))


def test_cli_detect_json_and_roc(ckpt, tmp_path, capsys, monkeypatch):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    import qrobust.detect

    runs = []  # the Monte-Carlo softmaxes the CLI measured: recompute its numbers from them
    real = qrobust.detect.run_detection

    def spy(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(qrobust.detect, "run_detection", spy)
    out = tmp_path / "r.json"
    rc = main(["detect", str(ckpt), "--attack", "2", "--measure_uncertainty", "-n", "30", "--mc", "6",
               "--bootstrap", "20", "--json", "--quiet", "--roc", str(tmp_path / "roc"), "--out", str(out)])
    assert rc == 0
    row = json.loads(capsys.readouterr().out)
    assert row["attack"] == "fgsm" and row["samples"] == 30 and row["mc"] == 6
    assert row["attack_config"]["eps"] == 0.3
    assert row["linf"] <= 0.3 + 1e-6
    (run,) = runs
    var_clean, var_adv = (p.double().var(0, unbiased=False).mean(-1).numpy() for p in (run.probs_clean,
                                                                                        run.probs_adv))
    held = run.per_input["heldout"]
    auc = roc_auc_score(np.r_[np.zeros(len(held)), np.ones(len(held))], np.r_[var_clean[held], var_adv[held]])
    assert row["detection_all"]["seed_variance"]["auc"] == pytest.approx(auc, abs=1e-12)
    assert row["detection_all"]["seed_variance"]["n_pos"] == len(held) == row["n_heldout"] == 15
    # seed A's LR score: default logistic regression on the raw variances of all 30 pairs, training accuracy
    feats, labels = np.r_[var_adv, var_clean].reshape(-1, 1), np.r_[np.ones(30), np.zeros(30)]
    lr = LogisticRegression().fit(feats, labels)
    assert row["seed_lr_score_training_accuracy"] == pytest.approx(lr.score(feats, labels), abs=1e-12)
    assert row["uncertainty_clean"]["seed_variance"] > 0  # dropout on at inference
    assert (tmp_path / "roc" / "roc_fgsm.png").is_file()
    assert json.loads(out.read_text())["results"][0]["attack"] == "fgsm"


def test_cli_detect_errors(ckpt, capsys):
    assert main(["detect", str(ckpt), "--bit", "3", "--attack", "2", "-n", "5"]) == 2
    assert "--bit 3 but the checkpoint is qnn_fp" in capsys.readouterr().err
    assert main(["detect", str(ckpt), "--attack", "9"]) == 2
    assert "unknown attack" in capsys.readouterr().err
    assert main(["detect", str(ckpt), "--attack", "1", "--detector-aware", "-n", "5"]) == 2
    assert "detector-aware" in capsys.readouterr().err


def test_cli_dropout_zero_turns_randomness_off(ckpt, capsys):
    rc = main(["detect", str(ckpt), "--attack", "2", "--dropout", "0", "-n", "10", "--mc", "3", "--json",
               "--quiet", "--bootstrap", "0"])
    assert rc == 0
    cap = capsys.readouterr()
    row = json.loads(cap.out)
    assert row["uncertainty_clean"]["seed_variance"] == 0.0 and "no randomness" in cap.err


def test_mcview_and_eot_loss_gradient_is_mean_of_per_copy_gradients(small_dropout_net, digits_test):
    x, _ = digits_test
    x = x[:8]
    view = MCView(small_dropout_net, 5)
    out = view(x)
    assert out.shape == (8, 5, 10)
    y = out.mean(1).argmax(1)
    # Same copies recomputed from the (B, K, C) logits one by one: the EOT loss is their mean CE.
    per_copy = torch.stack([nn.functional.cross_entropy(out[:, k], y, reduction="none") for k in range(5)], 1)
    torch.testing.assert_close(eot_ce_loss(out, y), per_copy.mean(1))
    torch.testing.assert_close(predictive_variance(torch.softmax(out, -1), 1),
                               uncertainty(torch.softmax(out, -1).transpose(0, 1))["seed_variance"].float())
    with pytest.raises(QrobustError, match=r"\(B, K, C\)"):
        eot_ce_loss(out[:, 0], y)
    loss = detector_aware_loss(lam=10.0, kappa=1.0)(out, y)
    assert loss.shape == (8,)


def test_detector_aware_attack_lowers_uncertainty(small_dropout_net, digits_test):
    """The detector-aware PGD must reach lower seed-A variance than the EOT PGD at similar success."""
    x, y = digits_test
    x, y = x[:40], y[:40]
    net = small_dropout_net
    eot = EOTPGD(eps=0.3, alpha=0.02, steps=20, mc_samples=8)(net, x)
    aware = DetectorAwarePGD(eps=0.3, alpha=0.02, steps=20, mc_samples=8, lam=10.0, kappa=2.0)(net, x)
    assert (aware - x).abs().max() <= 0.3 + 1e-6 and aware.min() >= 0 and aware.max() <= 1
    g = torch.Generator().manual_seed(0)
    p_eot, p_aw = mc_probs(net, eot, 50, generator=g), mc_probs(net, aware, 50, generator=g)
    clean = mc_probs(net, x, 50, generator=g)
    fooled_aw = (p_aw.sum(0).argmax(1) != clean.sum(0).argmax(1)).float().mean()
    assert fooled_aw > 0.7
    v_eot = uncertainty(p_eot)["seed_variance"].mean()
    v_aw = uncertainty(p_aw)["seed_variance"].mean()
    assert v_aw < 0.7 * v_eot


def test_eotpgd_equals_pgd_on_a_deterministic_model(digits_test):
    """No randomness: every copy is identical, the batched EOT gradient is the plain one, same result."""
    from qrobust.attacks import PGD

    x, _ = digits_test
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), MCDropout(0.5, always_on=False),
                        nn.Linear(32, 10)).eval()
    y = net(x[:16]).argmax(1)
    a = EOTPGD(eps=0.1, alpha=0.01, steps=5, mc_samples=4)(net, x[:16], y)
    b = PGD(eps=0.1, alpha=0.01, steps=5, random_start=True)(net, x[:16], y)
    torch.testing.assert_close(a, b)


def test_batched_eot_gradient_matches_sequential_eot(small_dropout_net, digits_test):
    """The batched EOT gradient and the attacks' sequential eot_samples estimate the same expectation."""
    from qrobust.attacks import ce_loss, input_gradient

    x, _ = digits_test
    x = x[:4]
    y = small_dropout_net(x).argmax(1)
    torch.manual_seed(1)
    seq, _, _ = input_gradient(small_dropout_net, x, y, ce_loss, samples=400)
    xr = x.clone().requires_grad_(True)
    eot_ce_loss(MCView(small_dropout_net, 400)(xr), y).sum().backward()
    cos = nn.functional.cosine_similarity(seq.flatten(1), xr.grad.flatten(1))
    assert torch.all(cos > 0.95), cos


def test_registered_eot_pgd_equals_the_composition_it_stands_for(small_dropout_net, digits_test):
    """create_attack("eot_pgd") = PGD with the EOT loss on the K-copy view, labels = group prediction of K
    copies (what EOTPGD computed before it became a registry attack), on a fixed seed."""
    from qrobust.attacks import PGD, create_attack
    from qrobust.mc import group_prediction

    x, _ = digits_test
    x = x[:24]
    net = small_dropout_net
    torch.manual_seed(5)
    ours = create_attack("eot_pgd", eps=0.2, alpha=0.02, steps=5, mc_samples=4, seed=3)(net, x)
    torch.manual_seed(5)
    y = group_prediction(mc_probs(net, x, 4, batch_size=100))
    ref = PGD(eps=0.2, alpha=0.02, steps=5, random_start=True, loss=eot_ce_loss, seed=3)(MCView(net, 4), x, y)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.manual_seed(5)
    aware = create_attack("detector_aware_pgd", eps=0.2, alpha=0.02, steps=5, mc_samples=4, lam=3.0)
    aware = aware(net, x, y)
    torch.manual_seed(5)
    ref = PGD(eps=0.2, alpha=0.02, steps=5, loss=detector_aware_loss(3.0, 1.0))(MCView(net, 4), x, y)
    torch.testing.assert_close(aware, ref, rtol=0, atol=0)


def test_attack_on_the_mc_mean_uses_the_mean_for_gradients_and_labels(small_dropout_net, digits_test):
    from qrobust.attacks import JSMA, on_mc_mean
    from qrobust.mc import MCAverage

    x, _ = digits_test
    x = x[:6]
    atk = on_mc_mean(JSMA(theta=1.0, gamma=0.05), 4)
    torch.manual_seed(1)
    ours = atk(small_dropout_net, x)
    torch.manual_seed(1)
    ref = JSMA(theta=1.0, gamma=0.05)(MCAverage(small_dropout_net, 4), x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert atk.config()["attack"] == "jsma_eot" and atk.config()["mc_samples"] == 4
