"""Attacks on randomized models that see Monte-Carlo copies: batched EOT-PGD, detector-aware PGD, and any
attack on the Monte-Carlo mean.

All are :class:`~qrobust.attacks.compose.OnView` compositions of public attacks with views of
:mod:`qrobust.mc`, built from the attack's own settings (so ``create_attack("eot_pgd", ...)`` and TOML
work). PGD runs on :class:`~qrobust.mc.MCView`, whose forward returns the logits of K stochastic copies
as (B, K, C), computed batched (deterministic prefix once, stochastic suffix K times, per-copy weights
for stochastic-weight layers). A loss callable then sees all K copies of each input:

* :func:`eot_ce_loss` - mean over the copies of the cross-entropy: its gradient is the EOT gradient
  (the average of K per-pass gradients, Athalye et al. 2018), i.e. what ``eot_samples=K`` computes
  with K sequential passes, here in one batched pass;
* :func:`detector_aware_loss` - adversarial margin of the Monte-Carlo mean prediction, capped at
  ``kappa``, minus ``lam`` times QNN-defense's uncertainty score (:func:`~qrobust.mc.predictive_variance`
  of the K copies). Once an input is misclassified with margin ``kappa`` only the variance term is
  left, so the remaining steps drive the detector's score down while staying adversarial.

``mc_samples`` is K (not ``samples``, which an experiment config uses for the number of images). Without
labels these attacks move away from the group prediction of K copies (QNN-defense's decision).
:func:`on_mc_mean` instead runs any attack (CW-L2, JSMA, ...) on :class:`~qrobust.mc.MCAverage`, the log
mean softmax of K copies.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.attacks.base import Attack, check_count, check_nonneg
from qrobust.attacks.compose import OnView
from qrobust.attacks.losses import margin
from qrobust.attacks.pgd import PGD
from qrobust.errors import QrobustError
from qrobust.mc import MCAverage, MCView, group_prediction, log_mean_softmax, mc_probs, predictive_variance


def _check_view(outputs: Tensor) -> Tensor:
    if outputs.dim() != 3:
        raise QrobustError(f"this loss expects Monte-Carlo outputs (B, K, C) from MCView, got "
                           f"{tuple(outputs.shape)}")
    return outputs


def eot_ce_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy averaged over the K copies, per sample: the EOT objective."""
    b, k, c = _check_view(outputs).shape
    ce = F.cross_entropy(outputs.reshape(b * k, c), y.repeat_interleave(k), reduction="none")
    return ce.view(b, k).mean(1)


def detector_aware_loss(lam: float = 10.0, kappa: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """``min(margin(log mean softmax, y), kappa) - lam * predictive_variance`` (ascended by PGD)."""
    lam, kappa = check_nonneg("lam", lam), check_nonneg("kappa", kappa)

    def loss(outputs: Tensor, y: Tensor) -> Tensor:
        mean = log_mean_softmax(_check_view(outputs), 1)
        return margin(mean, y).clamp(max=kappa) - lam * predictive_variance(torch.softmax(outputs, -1), 1)

    loss.__name__ = f"detector_aware(lam={lam:g},kappa={kappa:g})"
    return loss


@torch.no_grad()
def mc_predictions(model: nn.Module, x: Tensor, samples: int, batch_size: int = 100) -> Tensor:
    """QNN-defense's group prediction of ``samples`` Monte-Carlo copies: these attacks' default labels."""
    return group_prediction(mc_probs(model, x, samples, batch_size=batch_size))


class _MCPGD(OnView):
    """PGD with a loss over K copies, run on :class:`~qrobust.mc.MCView`; labels: the group prediction."""

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor], *, eps: float, alpha: float, steps: int,
                 random_start: bool, mc_samples: int, seed: int, strategy: str) -> None:
        samples = check_count("mc_samples", mc_samples)
        pgd = PGD(eps=eps, alpha=alpha, steps=steps, random_start=random_start, loss=loss, seed=seed)
        super().__init__(pgd, partial(MCView, samples=samples, strategy=strategy),
                         labels=partial(mc_predictions, samples=samples), name=self.name,
                         info={"mc_samples": samples})
        self.mc_samples, self.strategy = samples, strategy


class EOTPGD(_MCPGD):
    """PGD (FGSM with ``steps=1, alpha=eps, random_start=False``) on the EOT gradient over K copies,
    computed batched. Equivalent in expectation to ``PGD(eot_samples=K)``; faster on models whose
    randomness sits after a deterministic prefix."""

    name = "eot_pgd"

    def __init__(self, eps: float = 0.3, alpha: float = 0.01, steps: int = 40, random_start: bool = True, *,
                 mc_samples: int = 10, seed: int = 0, strategy: str = "auto") -> None:
        super().__init__(eot_ce_loss, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                         mc_samples=mc_samples, seed=seed, strategy=strategy)


class DetectorAwarePGD(_MCPGD):
    """PGD that fools the Monte-Carlo prediction AND lowers QNN-defense's uncertainty score.

    Loss per input: ``min(margin, kappa) - lam * variance`` with the margin of the log mean softmax over
    K copies and the variance estimated from the same K copies; see the module docstring.
    """

    name = "detector_aware_pgd"

    def __init__(self, eps: float = 0.3, alpha: float = 0.01, steps: int = 40, random_start: bool = True, *,
                 mc_samples: int = 10, lam: float = 10.0, kappa: float = 1.0, seed: int = 0,
                 strategy: str = "auto") -> None:
        super().__init__(detector_aware_loss(lam, kappa), eps=eps, alpha=alpha, steps=steps,
                         random_start=random_start, mc_samples=mc_samples, seed=seed, strategy=strategy)
        self.info.update(lam=lam, kappa=kappa)
        self.lam, self.kappa = lam, kappa


def on_mc_mean(attack: Attack, samples: int, strategy: str = "auto") -> OnView:
    """``attack`` run on the log mean softmax of ``samples`` Monte-Carlo copies
    (:class:`~qrobust.mc.MCAverage`), labels from that mean; named ``<attack>_eot``. For attacks without
    a loss over copies (CW-L2, JSMA)."""
    samples = check_count("samples", samples)
    return OnView(attack, partial(MCAverage, samples=samples, strategy=strategy), labels="view",
                  name=f"{attack.name}_eot", info={"mc_samples": samples})


__all__ = ["EOTPGD", "DetectorAwarePGD", "detector_aware_loss", "eot_ce_loss", "mc_predictions", "on_mc_mean"]
