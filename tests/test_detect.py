"""Monte-Carlo sampling (qrobust.mc), uncertainty statistics and detection metrics (qrobust.detect)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from qrobust.detect import (
    detection_metrics,
    evaluate_detection,
    mc_accuracy,
    rank_auc,
    roc_points,
    seed_lr_score,
    tpr_at_fpr,
    uncertainty,
)
from qrobust.errors import QrobustError
from qrobust.mc import MCAverage, is_stochastic, keep_mask, mc_logits, mc_probs, predictive_variance
from qrobust.models import create_model


def _model(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kw).eval()


@pytest.fixture(scope="module")
def x_small() -> torch.Tensor:
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- statistics against hand computation


def test_uncertainty_hand_computed():
    # Two inputs, T = 2 passes, 2 classes.
    probs = torch.tensor([[[0.8, 0.2], [0.5, 0.5]],
                          [[0.6, 0.4], [0.5, 0.5]]])
    s = uncertainty(probs)
    # Input 0: per-class values {0.8, 0.6} and {0.2, 0.4}: population variance 0.01 each -> mean 0.01.
    assert s["seed_variance"][0].item() == pytest.approx(0.01)
    assert s["pred_var"][0].item() == pytest.approx(0.01)
    # Mean softmax (0.7, 0.3): entropy; MI = H(mean) - mean of the per-pass entropies.
    h = lambda *p: -sum(q * math.log(q) for q in p)  # noqa: E731
    assert s["entropy"][0].item() == pytest.approx(h(0.7, 0.3))
    assert s["mutual_info"][0].item() == pytest.approx(h(0.7, 0.3) - (h(0.8, 0.2) + h(0.6, 0.4)) / 2)
    # Input 1 never changes: no variance, no mutual information, entropy log 2.
    assert s["seed_variance"][1].item() == 0 and s["mutual_info"][1].item() == pytest.approx(0, abs=1e-12)
    assert s["entropy"][1].item() == pytest.approx(math.log(2))


def test_seed_variance_matches_numpy_like_the_seed():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=(50, 7))
    ours = uncertainty(torch.from_numpy(p))["seed_variance"].numpy()
    np.testing.assert_allclose(ours, p.var(axis=0).mean(axis=1), rtol=1e-12)  # model_eval_multi_run
    # The one variance score, along any copy axis (attacks use (B, K, C)); differentiable.
    pt = torch.from_numpy(p).requires_grad_(True)
    np.testing.assert_allclose(predictive_variance(pt.transpose(0, 1), dim=1).detach().numpy(), ours,
                               rtol=1e-12)
    predictive_variance(pt).sum().backward()
    assert pt.grad is not None and pt.grad.abs().sum() > 0


def test_mc_accuracy_group_vs_single_pass():
    # Pass 0 says class 0 (0.6), pass 1 says class 1 (0.9): the single passes disagree, the sum says 1.
    probs = torch.tensor([[[0.6, 0.4]], [[0.1, 0.9]]])
    acc = mc_accuracy(probs, torch.tensor([1]))
    assert acc == {"single_pass": 0.5, "last_pass": 1.0, "group": 1.0}


# ---------------------------------------------------------------- detection metrics


def test_auc_hand_computed_tiny_case():
    # 2 clean, 2 adversarial: pairs (pos > neg): 0.9>0.1, 0.9>0.5, 0.4>0.1, 0.4<0.5 -> 3/4.
    neg, pos = np.array([0.1, 0.5]), np.array([0.4, 0.9])
    assert rank_auc(neg, pos) == pytest.approx(0.75)
    assert detection_metrics(neg, pos, bootstrap=0)["auc"] == pytest.approx(0.75)
    # A tie counts one half.
    assert rank_auc(np.array([0.3]), np.array([0.3])) == pytest.approx(0.5)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    neg = rng.integers(0, 20, 300) / 20.0
    pos = rng.integers(3, 25, 200) / 20.0
    ref = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[neg, pos])
    assert rank_auc(neg, pos) == pytest.approx(ref, abs=1e-12)
    m = detection_metrics(neg, pos, bootstrap=200, seed=1)
    assert m["auc"] == pytest.approx(ref, abs=1e-12)
    assert m["auc_ci95"][0] < ref < m["auc_ci95"][1]


def test_perfectly_separable_auc_one_and_tpr():
    neg, pos = np.linspace(0, 1, 40), np.linspace(2, 3, 30)
    m = detection_metrics(neg, pos, bootstrap=50)
    assert m["auc"] == 1.0 and m["tpr@0.05fpr"] == 1.0 and m["auc_ci95"] == [1.0, 1.0]
    assert seed_lr_score(np.zeros(20), np.ones(20)) == 1.0


def test_tpr_at_fpr_hand_computed():
    neg = np.arange(20, dtype=float)  # threshold above 18 flags 1/20 = 5% of the clean inputs
    pos = np.array([18.5, 19.5, 30.0, 0.5])
    assert tpr_at_fpr(neg, pos, 0.05) == pytest.approx(0.75)  # 18.5, 19.5, 30 above 18
    assert tpr_at_fpr(neg, pos, 0.0) == pytest.approx(0.5)  # only 19.5 and 30 beat every clean score


def test_seed_lr_score_is_training_accuracy_at_chance_for_identical_scores():
    assert seed_lr_score(np.full(10, 0.01), np.full(10, 0.01)) == pytest.approx(0.5)


# ---------------------------------------------------------------- Monte-Carlo sampling


def test_dropout_off_gives_identical_samples_and_zero_uncertainty(x_small):
    m = _model("qnn_fp", dropout=0.5, mc_dropout=False)  # eval mode: dropout off
    assert not is_stochastic(m)
    for strategy in ("auto", "loop"):
        p = mc_probs(m, x_small, 8, strategy=strategy)
        assert p.shape == (8, 6, 10)
        assert torch.equal(p, p[:1].expand_as(p))
        s = uncertainty(p)
        for k in ("seed_variance", "mutual_info", "pred_var"):  # the spread across passes
            assert torch.all(s[k].abs() < 1e-12), k
        # Predictive entropy is not a Monte-Carlo spread: it equals the single-pass entropy.
        torch.testing.assert_close(s["entropy"], -(p[0].double() * p[0].double().log()).sum(1))
    with torch.no_grad():
        np.testing.assert_allclose(p[0], torch.softmax(m(x_small), 1), atol=1e-6)


@pytest.mark.parametrize("name,kw", [("qnn_fp", {"dropout": 0.5}), ("qnn_kbit", {"bits": 3, "dropout": 0.3}),
                                     ("qnn_rbnn", {}), ("qnn_rbnn", {"dropout": 0.5})])
def test_batched_equals_loop_exactly_with_generator(name, kw, x_small):
    m = _model(name, **kw)
    assert is_stochastic(m)
    outs = {s: mc_logits(m, x_small, 5, strategy=s, generator=torch.Generator().manual_seed(7), batch_size=4)
            for s in ("suffix", "repeat", "loop")}
    assert outs["suffix"].shape == (5, 6, 10)
    torch.testing.assert_close(outs["suffix"], outs["loop"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["repeat"], outs["loop"], atol=1e-4, rtol=1e-4)
    # The copies really differ (independent masks / weights per copy), and a new seed gives new samples.
    assert (outs["suffix"][0] - outs["suffix"][1]).abs().max() > 1e-3
    other = mc_logits(m, x_small, 5, generator=torch.Generator().manual_seed(8))
    assert (other - outs["suffix"]).abs().max() > 1e-3


def test_rbnn_batched_equals_plain_passes_with_layer_generator(x_small):
    """Oracle: T ordinary forward passes of the model, each drawing one weight from the layer's generator."""
    m = _model("qnn_rbnn")
    wq = m.features[3].conv.weight_quant
    wq.generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        plain = torch.stack([m(x_small) for _ in range(6)])
    wq.generator = torch.Generator().manual_seed(11)
    batched = mc_logits(m, x_small, 6, batch_size=6)
    wq.generator = None
    torch.testing.assert_close(batched, plain, atol=1e-4, rtol=1e-4)


def test_batched_dropout_matches_plain_loop_in_distribution():
    """Oracle: the model's own MCDropout called T times (global RNG); compare moments over many samples."""
    m = _model("qnn_fp", dropout=0.5)
    with torch.no_grad():
        m.head[-1].weight.mul_(300.0)  # confident, spread-out softmaxes instead of near-uniform ones
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    with torch.no_grad():
        plain = torch.softmax(torch.stack([m(x) for _ in range(300)]), -1)
    batched = mc_probs(m, x, 300, generator=torch.Generator().manual_seed(0))
    assert batched.shape == plain.shape
    n = plain.shape[0]
    se = ((batched.var(0) + plain.var(0)) / n).sqrt()  # standard error of the difference of the means
    assert torch.all((batched.mean(0) - plain.mean(0)).abs() <= 5 * se + 1e-3)
    # spreads agree within 4 standard errors of a std estimate; softmax outputs are far from normal
    # (mostly near 0 or 1), so the error uses the sample fourth moment: SE(var) = sqrt((m4 - var^2) / n)

    def se_std(p):
        c = p - p.mean(0)
        var = (c**2).mean(0)
        return ((c**4).mean(0) - var**2).clamp_min(0).div(n).sqrt() / (2 * var.sqrt() + 1e-12)

    se = (se_std(batched) ** 2 + se_std(plain) ** 2).sqrt()
    assert torch.all((batched.std(0) - plain.std(0)).abs() <= 4 * se + 2e-3)
    assert plain.std(0).max() > 0.05  # the check is not vacuous


def test_keep_mask_rates():
    g = torch.Generator().manual_seed(0)
    for keep in (0.5, 0.25, 0.7):
        m = keep_mask((400, 500), keep, g, torch.device("cpu"))
        assert m.dtype == torch.bool and m.shape == (400, 500)
        assert abs(m.float().mean().item() - keep) < 0.005


def test_mc_average_is_differentiable_and_bad_arguments_fail(x_small):
    m = _model("qnn_fp", dropout=0.5)
    x = x_small.clone().requires_grad_(True)
    out = MCAverage(m, 4)(x)
    assert out.shape == (6, 10)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(QrobustError, match="positive integer"):
        mc_logits(m, x_small, 0)
    with pytest.raises(QrobustError, match="strategy"):
        mc_logits(m, x_small, 3, strategy="fast")


def test_evaluate_detection_end_to_end(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 60
    y = torch.randint(0, 10, (n,), generator=g)
    clean = torch.full((20, n, 10), 0.01)
    clean[:, torch.arange(n), y] = 0.91
    noise = torch.rand(20, n, 10, generator=g)
    adv = torch.softmax(noise * 3, -1)  # wrong-ish and uncertain
    rep, per = evaluate_detection(clean, adv, y, bootstrap=50)
    d = rep.as_dict()
    assert d["clean_accuracy"]["group"] == 1.0
    assert d["heldout_all"]["seed_variance"]["auc"] == 1.0  # clean inputs have zero variance
    assert d["n_heldout"] == 30 and rep.seed_lr_score > 0.9
    assert d["heldout_success"]["seed_variance"]["n_pos"] == int(per["success"][per["heldout"]].sum())
    from qrobust.report.plots import roc_plot

    curves = {"var": roc_points(per["clean_seed_variance"], per["adv_seed_variance"]),
              "empty": roc_points(per["clean_seed_variance"][:0], per["adv_seed_variance"])}
    assert curves["var"]["auc"] == 1.0 and curves["empty"] is None
    png = roc_plot(tmp_path / "roc.png", curves, "t", mark_fpr=0.05)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert roc_plot(tmp_path / "none.png", {"empty": None}, "t") is None


def test_auto_falls_back_to_repeat_when_branches_mix_batch_sizes(x_small):
    """A deterministic branch beside a stochastic one cannot share the prefix: auto repeats the input."""

    class Mix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stoch = _model("qnn_fp", dropout=0.5)
            self.det = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))

        def forward(self, x):
            return self.stoch(x) + self.det(x)

    m = Mix().eval()
    with pytest.raises(RuntimeError):
        mc_logits(m, x_small, 4, strategy="suffix")
    out = mc_logits(m, x_small, 4, generator=torch.Generator().manual_seed(0))
    ref = mc_logits(m, x_small, 4, strategy="repeat", generator=torch.Generator().manual_seed(0))
    assert out.shape == ref.shape == (4, 6, 10)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_binary_matmul_is_exact_or_declines():
    from qrobust.mc import BF16_EXACT_INT, _fast_bf16, binary_matmul

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-1, 2, (64, 300), generator=g).float()  # {-1, 0, 1}
    b = torch.randint(-1, 2, (300, 500), generator=g).float()
    out = binary_matmul(a, b)
    if not _fast_bf16(a.device):
        assert out is None  # float32 is used instead
        return
    assert out is not None and torch.equal(out.float(), a @ b)  # bit-exact, not just close
    # sums above 256 cannot all be stored exactly in bfloat16: declined, the caller uses float32
    ones = torch.ones(4, BF16_EXACT_INT + 1)  # a true 257 would be stored as 256
    assert binary_matmul(ones, ones.T.contiguous()) is None
    k = BF16_EXACT_INT - 1
    wide = torch.cat([ones[:, :k], torch.zeros(4, 300)], 1)  # K > 256 but every sum is 255: exact
    res = binary_matmul(wide, wide.T.contiguous())
    assert res is not None and torch.equal(res.float(), torch.full((4, 4), float(k)))


def test_rbnn_inference_without_grad_equals_plain_passes_exactly(x_small):
    """The no-grad path (bfloat16 product of sign inputs and +-1 weights) equals T float32 passes."""
    m = _model("qnn_rbnn")
    wq = m.features[3].conv.weight_quant
    with torch.no_grad():
        wq.generator = torch.Generator().manual_seed(5)
        plain = torch.stack([m(x_small) for _ in range(8)])
        wq.generator = torch.Generator().manual_seed(5)
        batched = mc_logits(m, x_small, 8, batch_size=6)
    wq.generator = None
    torch.testing.assert_close(batched, plain, atol=1e-5, rtol=1e-5)


def test_mc_attacks_can_be_named_in_an_experiment_config():
    """EOT-PGD and detector-aware PGD are registry attacks, so a TOML config can express seed A's protocol."""
    from qrobust.attacks import EOTPGD, DetectorAwarePGD, create_attack
    from qrobust.experiment import parse_config

    cfg = parse_config({
        "data": "digits",
        "models": [{"name": "mcd", "arch": "qnn_fp", "options": {"dropout": 0.5}}],
        "attacks": [{"name": "eot_pgd", "eps": 0.3, "mc_samples": 4, "steps": 5},
                    {"name": "detector_aware_pgd", "eps": 0.3, "mc_samples": 4, "lam": 10.0}],
    })
    built = [create_attack(a.name, **a.params, eps=0.3) for a in cfg.attacks]
    assert isinstance(built[0], EOTPGD) and built[0].mc_samples == 4 and built[0].attack.steps == 5
    assert isinstance(built[1], DetectorAwarePGD) and built[1].lam == 10.0
    with pytest.raises(QrobustError, match="does not take"):
        parse_config({"data": "digits", "models": [{"name": "m", "arch": "qnn_fp"}],
                      "attacks": [{"name": "eot_pgd", "eps": 0.3, "lam": 1.0}]})


def test_attacks_use_the_mc_engine_without_importing_detection():
    import subprocess
    import sys

    code = "import sys, qrobust.attacks; print('qrobust.mc' in sys.modules, 'qrobust.detect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
