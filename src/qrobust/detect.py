"""Detecting adversarial inputs from Monte-Carlo uncertainty: per-input statistics, metrics, the pipeline.

QNN-defense detects adversarial inputs from the spread of T stochastic forward passes (dropout kept on at
inference, or stochastic binary weights). The passes come from the Monte-Carlo engine
:mod:`qrobust.mc` (batched; it sits below the attacks, this module above them); here they become
per-input statistics (:func:`uncertainty`), detection metrics on a held-out split
(:func:`evaluate_detection`), and the one attack-then-detect pipeline (:func:`run_detection`) that
``qrobust detect`` and the experiment runner both call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qrobust.distributed import batch_seed, map_batches
from qrobust.errors import QrobustError
from qrobust.mc import group_prediction, mc_probs, predictive_variance

STAT_NAMES = ("seed_variance", "entropy", "mutual_info", "pred_var")



# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def uncertainty(probs: Tensor) -> dict[str, Tensor]:
    """Per-input statistics of Monte-Carlo softmaxes ``probs`` (T, N, C); each value has shape (N,).

    * ``seed_variance``: QNN-defense's score, :func:`qrobust.mc.predictive_variance`;
    * ``entropy``: predictive entropy H[mean_t p_t] (nats);
    * ``mutual_info``: H[mean_t p_t] - mean_t H[p_t] (the epistemic part, >= 0);
    * ``pred_var``: variance across passes of the probability of the Monte-Carlo predicted class.
    """
    if probs.dim() != 3:
        raise QrobustError(f"expected Monte-Carlo probabilities of shape (T, N, classes), got "
                           f"{tuple(probs.shape)}")
    probs = probs.double()
    mean = probs.mean(0)
    var = probs.var(0, unbiased=False)
    pred = mean.argmax(1)
    ent = _entropy(mean)
    mi = (ent - _entropy(probs).mean(0)).clamp_min(0.0)
    return {
        "seed_variance": predictive_variance(probs),
        "entropy": ent,
        "mutual_info": mi,
        "pred_var": var.gather(1, pred[:, None])[:, 0],
    }


def mc_accuracy(probs: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy of a single pass (mean over passes, and the last pass as the seed logged it) and of
    the Monte-Carlo average ("group accuracy": argmax of the summed softmaxes)."""
    y = y.to(probs.device)
    per_pass = (probs.argmax(-1) == y[None]).double().mean(1)
    return {
        "single_pass": per_pass.mean().item(),
        "last_pass": per_pass[-1].item(),
        "group": (group_prediction(probs) == y).double().mean().item(),
    }


# ----------------------------------------------------------------------------------------------------
# Detection metrics
# ----------------------------------------------------------------------------------------------------


def _np(a: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64).reshape(-1)


def rank_auc(neg: np.ndarray | Tensor, pos: np.ndarray | Tensor) -> float:
    """ROC-AUC as the Mann-Whitney probability P(score_pos > score_neg) + 0.5 P(equal).

    Used for fast bootstrap resampling; equals scikit-learn's ``roc_auc_score`` (tested).
    """
    neg, pos = _np(neg), _np(pos)
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([neg, pos]))
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


def tpr_at_fpr(neg: np.ndarray | Tensor, pos: np.ndarray | Tensor, fpr: float = 0.05) -> float:
    """Largest true-positive rate over ROC points whose false-positive rate is <= ``fpr``
    (no interpolation: an operating point that really exists on the held-out data)."""
    from sklearn.metrics import roc_curve

    neg, pos = _np(neg), _np(pos)
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    f, t, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
    return float(t[f <= fpr + 1e-12].max())


def detection_metrics(neg: np.ndarray | Tensor, pos: np.ndarray | Tensor, *, fpr: float = 0.05,
                      bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """ROC-AUC (scikit-learn) and TPR at ``fpr`` for a score that should be higher on ``pos``,
    with a 95% percentile bootstrap interval for the AUC (negatives and positives resampled apart)."""
    from sklearn.metrics import roc_auc_score

    neg, pos = _np(neg), _np(pos)
    out: dict[str, Any] = {"n_neg": len(neg), "n_pos": len(pos)}
    if len(neg) == 0 or len(pos) == 0:
        return {**out, "auc": float("nan"), "auc_ci95": [float("nan")] * 2, f"tpr@{fpr:g}fpr": float("nan")}
    out["auc"] = float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))
    out[f"tpr@{fpr:g}fpr"] = tpr_at_fpr(neg, pos, fpr)
    if bootstrap:
        rng = np.random.default_rng(seed)
        aucs = [rank_auc(neg[rng.integers(0, len(neg), len(neg))], pos[rng.integers(0, len(pos), len(pos))])
                for _ in range(bootstrap)]
        out["auc_ci95"] = [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))]
    return out


def seed_lr_score(clean_var: np.ndarray | Tensor, adv_var: np.ndarray | Tensor) -> float:
    """QNN-defense's detection number: TRAINING accuracy of a 1-D logistic regression on the variance.

    ``LogisticRegression(random_state=0, solver='lbfgs')`` fitted and scored on the same points (no
    held-out split); the seed feeds all attacked inputs, failed attacks included. Kept only to compare
    with the seed's logs; the ROC-AUC on a held-out split is the number to trust.
    """
    from sklearn.linear_model import LogisticRegression

    c, a = _np(clean_var), _np(adv_var)
    feats = np.r_[a, c].reshape(-1, 1)
    labels = np.r_[np.ones(len(a)), np.zeros(len(c))]
    return float(LogisticRegression(random_state=0, solver="lbfgs").fit(feats, labels).score(feats, labels))


def heldout_split(n: int, fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held-out) over n inputs; a clean image and its adversarial version stay together."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return np.sort(perm[:k]), np.sort(perm[k:])


@dataclass
class DetectionReport:
    """Everything :func:`evaluate_detection` measured; ``as_dict`` is JSON-ready."""

    samples: int
    n: int
    clean_accuracy: dict[str, float]
    adv_accuracy: dict[str, float]
    mean_stats_clean: dict[str, float]
    mean_stats_adv: dict[str, float]
    seed_lr_score: float
    heldout_all: dict[str, dict[str, Any]]
    heldout_success: dict[str, dict[str, Any]]
    heldout_lr_accuracy: float
    attack_success: int
    n_heldout: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate_detection(
    probs_clean: Tensor, probs_adv: Tensor, y: Tensor, *, heldout_fraction: float = 0.5, seed: int = 0,
    fpr: float = 0.05, bootstrap: int = 1000,
) -> tuple[DetectionReport, dict[str, np.ndarray]]:
    """Compare Monte-Carlo statistics of clean inputs and of their adversarial versions.

    ROC-AUC / TPR are computed on a held-out half of the images (the score itself needs no fitting;
    the split keeps it comparable with the held-out logistic regression fitted on the other half):
    * ``heldout_all``: every attacked input vs every clean input;
    * ``heldout_success``: only images the model got right (group prediction) whose adversarial
      version it gets wrong, vs the clean versions of those same images.
    Returns the report and the per-input statistics (numpy) for plotting.
    """
    from sklearn.linear_model import LogisticRegression

    n = probs_clean.shape[1]
    if probs_adv.shape != probs_clean.shape or len(y) != n:
        raise QrobustError(f"clean and adversarial Monte-Carlo outputs must match: "
                           f"{tuple(probs_clean.shape)} vs {tuple(probs_adv.shape)} for {len(y)} labels")
    sc = {k: v.cpu().numpy() for k, v in uncertainty(probs_clean).items()}
    sa = {k: v.cpu().numpy() for k, v in uncertainty(probs_adv).items()}
    y = y.to(probs_clean.device)
    ok = (group_prediction(probs_clean) == y).cpu().numpy()
    fooled = (group_prediction(probs_adv) != y).cpu().numpy()
    success = ok & fooled
    fit, held = heldout_split(n, 1 - heldout_fraction, seed)
    held_s = held[success[held]]
    all_m = {k: detection_metrics(sc[k][held], sa[k][held], fpr=fpr, bootstrap=bootstrap, seed=seed)
             for k in STAT_NAMES}
    succ_m = {k: detection_metrics(sc[k][held_s], sa[k][held_s], fpr=fpr, bootstrap=bootstrap, seed=seed)
              for k in STAT_NAMES}
    # Honest counterpart of the seed's score: fit the 1-D logistic regression on one half, score the other.
    # The variance is standardized first (on the fit half): raw variances of ~1e-3 leave sklearn's
    # L2-regularized fit at a constant prediction (50%), which is what the seed's raw fit can show.
    f = np.r_[sa["seed_variance"][fit], sc["seed_variance"][fit]].reshape(-1, 1)
    mu, sd = f.mean(), f.std() or 1.0
    lab = np.r_[np.ones(len(fit)), np.zeros(len(fit))]
    lr = LogisticRegression(random_state=0, solver="lbfgs").fit((f - mu) / sd, lab)
    fh = (np.r_[sa["seed_variance"][held], sc["seed_variance"][held]].reshape(-1, 1) - mu) / sd
    heldout_lr = float(lr.score(fh, np.r_[np.ones(len(held)), np.zeros(len(held))]))
    report = DetectionReport(
        samples=probs_clean.shape[0], n=n,
        clean_accuracy=mc_accuracy(probs_clean, y), adv_accuracy=mc_accuracy(probs_adv, y),
        mean_stats_clean={k: float(v.mean()) for k, v in sc.items()},
        mean_stats_adv={k: float(v.mean()) for k, v in sa.items()},
        seed_lr_score=seed_lr_score(sc["seed_variance"], sa["seed_variance"]),
        heldout_all=all_m, heldout_success=succ_m, heldout_lr_accuracy=heldout_lr,
        attack_success=int(success.sum()), n_heldout=len(held),
    )
    curves = {"clean_" + k: v for k, v in sc.items()} | {"adv_" + k: v for k, v in sa.items()}
    curves["heldout"] = held
    curves["success"] = success
    return report, curves


def roc_points(neg: np.ndarray | Tensor, pos: np.ndarray | Tensor) -> dict[str, Any] | None:
    """ROC curve of a score that should be higher on ``pos``: ``{"fpr", "tpr", "auc"}`` (lists and a
    float), or None when either side is empty. What :func:`qrobust.report.plots.roc_plot` draws."""
    from sklearn.metrics import roc_auc_score, roc_curve

    neg, pos = _np(neg), _np(pos)
    if len(neg) == 0 or len(pos) == 0:
        return None
    labels, scores = np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr],
            "auc": float(roc_auc_score(labels, scores))}


# ----------------------------------------------------------------------------------------------------
# The pipeline: attack, Monte-Carlo passes on clean and adversarial inputs, detection report
# ----------------------------------------------------------------------------------------------------


@dataclass
class DetectionRun:
    """Result of :func:`run_detection`: the report, per-input statistics, adversarial inputs, timings;
    ``attack_result`` is the :class:`~qrobust.evaluate.AttackResult` when the attack ran with ``labels``."""

    report: DetectionReport
    per_input: dict[str, np.ndarray]
    x_adv: Tensor
    probs_clean: Tensor
    probs_adv: Tensor
    attack_seconds: float
    mc_seconds: float
    linf: float
    mean_l2: float
    attack_result: Any = None


def _attack_all(model: nn.Module, attack: Callable[..., Tensor], x: Tensor, y: Tensor, labels: str | None,
                batch: int, seed: int, progress: Callable[[int, int], None] | None) -> tuple[Tensor, Any]:
    """The adversarial inputs (and the attack result with ``labels``), batches sharded over the ranks."""
    if labels is not None:
        from qrobust.evaluate import evaluate_attack

        res = evaluate_attack(model, attack, x, y, labels=labels, batch_size=batch, keep_adv=True,
                              progress=progress)
        return res.x_adv, res
    advs = map_batches(lambda s, e: attack(model, x[s:e]).detach(), len(x), batch, seed=seed, device=x.device,
                       progress=progress)
    return torch.cat(advs), None


def mc_probs_batched(model: nn.Module, x: Tensor, samples: int, seed: int, batch: int) -> Tensor:
    """:func:`~qrobust.mc.mc_probs` over batches of ``batch`` inputs, each from its own generator seeded by
    ``(seed, batch index)`` (:func:`qrobust.distributed.batch_seed`): sharded over torchrun's ranks, the
    passes of an input are the same on any number of processes."""
    def one(s: int, e: int) -> Tensor:
        gen = torch.Generator().manual_seed(batch_seed(seed, s // batch))
        return mc_probs(model, x[s:e], samples, generator=gen)

    return torch.cat(map_batches(one, len(x), batch, device=x.device), dim=1)


def run_detection(
    model: nn.Module,
    attack: Callable[..., Tensor],
    x: Tensor,
    y: Tensor,
    *,
    samples: int = 50,
    attack_batch: int = 100,
    seed: int = 0,
    labels: str | None = None,
    mc_generator: torch.Generator | None = None,
    probs_clean: Tensor | None = None,
    bootstrap: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> DetectionRun:
    """Attack ``x`` (untargeted), then run ``samples`` Monte-Carlo passes on clean and adversarial inputs
    and measure detection (:func:`evaluate_detection`).

    ``labels=None``: each batch is attacked as ``attack(model, xb)``, with the attack's own labels (the
    model's prediction, or what a composed attack's view supplies) - QNN-defense's protocol, ``qrobust
    detect``. ``"pred"``/``"true"``: the attack runs through :func:`qrobust.evaluate.evaluate_attack`
    (kept in ``attack_result``) - the experiment runner's protocol. The global RNG is seeded from
    ``(seed, batch index)`` (with ``labels``: the attack's seed) before each attack batch (dropout masks
    of single-pass attacks). The
    Monte-Carlo passes draw, batch by batch, from generators seeded ``(seed + 1, batch index)`` (clean)
    and ``(seed + 2, batch index)`` (adversarial) (:func:`mc_probs_batched`), or, given ``mc_generator``,
    from that one stream, clean inputs first. Batches of ``attack_batch`` inputs are sharded over the ranks
    under torchrun (:mod:`qrobust.distributed`); ``mc_generator``'s single stream is not, and is computed
    whole on every rank. The model's mode is left as set (QNN-defense: ``eval()`` with
    dropout kept on by ``MCDropout``).
    """
    if len(x) != len(y):
        raise QrobustError(f"{len(x)} images but {len(y)} labels")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    x_adv, attack_result = _attack_all(model, attack, x, y, labels, attack_batch, seed, progress)
    t1 = time.perf_counter()
    if mc_generator is not None:
        if probs_clean is None:
            probs_clean = mc_probs(model, x, samples, generator=mc_generator)
        probs_adv = mc_probs(model, x_adv, samples, generator=mc_generator)
    else:
        if probs_clean is None:
            probs_clean = mc_probs_batched(model, x, samples, seed + 1, attack_batch)
        probs_adv = mc_probs_batched(model, x_adv, samples, seed + 2, attack_batch)
    t2 = time.perf_counter()
    report, per = evaluate_detection(probs_clean, probs_adv, y, seed=seed, bootstrap=bootstrap)
    d = (x_adv - x).flatten(1)
    return DetectionRun(report, per, x_adv, probs_clean, probs_adv, t1 - t0, t2 - t1,
                        float(d.abs().max()) if d.numel() else 0.0, float(d.norm(dim=1).mean()),
                        attack_result)
