"""Attacks on randomized models that see K Monte-Carlo copies at once: batched EOT and a detector-aware PGD.

Both are built on the public attack API (:class:`~qrobust.attacks.PGD` with a loss callable): the model
is wrapped in :class:`MCView`, whose forward returns the logits of K stochastic copies as (B, K, C),
computed batched by :func:`qrobust.detect.mc_logits` (deterministic prefix once, stochastic suffix K
times, per-copy weights for stochastic-weight layers). A loss callable then sees all K copies of each
input:

* :func:`eot_ce_loss` - mean over the copies of the cross-entropy: its gradient is the EOT gradient
  (the average of K per-pass gradients, Athalye et al. 2018), i.e. what ``eot_samples=K`` computes
  with K sequential passes, here in one batched pass;
* :func:`detector_aware_loss` - adversarial margin of the Monte-Carlo mean prediction, capped at
  ``kappa``, minus ``lam`` times seed A's uncertainty score (mean per-class variance of the softmax
  across the copies). Once an input is misclassified with margin ``kappa`` only the variance term
  is left, so the remaining steps drive the detector's score down while staying adversarial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.attacks.base import check_count, check_nonneg
from qrobust.attacks.losses import margin
from qrobust.attacks.pgd import PGD
from qrobust.errors import QrobustError


class MCView(nn.Module):
    """``forward(x) -> (B, K, C)``: logits of ``samples`` Monte-Carlo copies of a randomized model."""

    def __init__(self, model: nn.Module, samples: int, strategy: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.samples = check_count("samples", samples)
        self.strategy = strategy

    def forward(self, x: Tensor) -> Tensor:
        from qrobust.detect import mc_logits

        out = mc_logits(self.model, x, self.samples, strategy=self.strategy, batch_size=x.shape[0])
        return out.transpose(0, 1)


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


def mc_mean_log_probs(outputs: Tensor) -> Tensor:
    """log of the mean softmax over the copies (the Monte-Carlo / "group" prediction), (B, C)."""
    return torch.log(torch.softmax(_check_view(outputs), -1).mean(1).clamp_min(1e-12))


def seed_variance(outputs: Tensor) -> Tensor:
    """Seed A's score per sample: mean over classes of the variance of the softmax across copies."""
    return torch.softmax(_check_view(outputs), -1).var(1, unbiased=False).mean(-1)


def detector_aware_loss(lam: float = 10.0, kappa: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """``min(margin(log mean softmax, y), kappa) - lam * seed_variance`` (ascended by PGD)."""
    lam, kappa = check_nonneg("lam", lam), check_nonneg("kappa", kappa)

    def loss(outputs: Tensor, y: Tensor) -> Tensor:
        return margin(mc_mean_log_probs(outputs), y).clamp(max=kappa) - lam * seed_variance(outputs)

    loss.__name__ = f"detector_aware(lam={lam:g},kappa={kappa:g})"
    return loss


@torch.no_grad()
def mc_predictions(model: nn.Module, x: Tensor, samples: int, batch_size: int = 100) -> Tensor:
    """Argmax of the summed softmax over ``samples`` copies (seed A's group prediction)."""
    from qrobust.detect import mc_probs

    return mc_probs(model, x, samples, batch_size=batch_size).sum(0).argmax(-1)


class _MCPGD:
    """PGD run on :class:`MCView` with a loss over the copies; labels default to the MC prediction."""

    name = "mc_pgd"

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor], *, eps: float, alpha: float, steps: int,
                 random_start: bool, samples: int, seed: int, strategy: str) -> None:
        self.samples = check_count("samples", samples)
        self.strategy = strategy
        self.targeted = False
        self.seed = seed
        self.pgd = PGD(eps=eps, alpha=alpha, steps=steps, random_start=random_start, loss=loss, seed=seed)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> Tensor:
        if y is None:
            y = mc_predictions(model, x, self.samples)
        return self.pgd(MCView(model, self.samples, self.strategy), x, y, generator=generator)

    def config(self) -> dict[str, Any]:
        cfg = self.pgd.config()
        return {**cfg, "attack": self.name, "mc_samples": self.samples}


class EOTPGD(_MCPGD):
    """PGD (FGSM with ``steps=1, alpha=eps, random_start=False``) on the EOT gradient over K copies,
    computed batched. Equivalent in expectation to ``PGD(eot_samples=K)``; faster on models whose
    randomness sits after a deterministic prefix."""

    name = "eot_pgd"

    def __init__(self, eps: float = 0.3, alpha: float = 0.01, steps: int = 40, random_start: bool = True, *,
                 samples: int = 10, seed: int = 0, strategy: str = "auto") -> None:
        super().__init__(eot_ce_loss, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                         samples=samples, seed=seed, strategy=strategy)


class DetectorAwarePGD(_MCPGD):
    """PGD that fools the Monte-Carlo prediction AND lowers seed A's uncertainty score.

    Loss per input: ``min(margin, kappa) - lam * variance`` with the margin of the log mean softmax over
    K copies and the variance estimated from the same K copies; see the module docstring.
    """

    name = "detector_aware_pgd"

    def __init__(self, eps: float = 0.3, alpha: float = 0.01, steps: int = 40, random_start: bool = True, *,
                 samples: int = 10, lam: float = 10.0, kappa: float = 1.0, seed: int = 0,
                 strategy: str = "auto") -> None:
        super().__init__(detector_aware_loss(lam, kappa), eps=eps, alpha=alpha, steps=steps,
                         random_start=random_start, samples=samples, seed=seed, strategy=strategy)
        self.lam, self.kappa = lam, kappa

    def config(self) -> dict[str, Any]:
        return {**super().config(), "lam": self.lam, "kappa": self.kappa}


__all__ = ["EOTPGD", "DetectorAwarePGD", "MCView", "detector_aware_loss", "eot_ce_loss", "mc_mean_log_probs",
           "mc_predictions", "seed_variance"]
