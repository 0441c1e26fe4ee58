"""Fast Gradient Sign Method (Goodfellow et al. 2015), and QNN-defense's random-eps variant for training."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qrobust.attacks.base import LinfAttack, check_positive
from qrobust.attacks.eot import input_gradient


class FGSM(LinfAttack):
    """One signed-gradient step of size ``eps``: ``clip(x + eps * sign(grad loss))`` (minus when targeted)."""

    name = "fgsm"

    def __init__(self, eps: float = 0.3, *, loss: Any = "ce", targeted: bool = False, eot_samples: int = 1,
                 seed: int = 0, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(eps, loss=loss, targeted=targeted, eot_samples=eot_samples, seed=seed, bounds=bounds)

    def _step_sizes(self, x: Tensor, generator: torch.Generator) -> Tensor | float:
        return self.eps

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        grad, _, _ = input_gradient(model, x, y, self.loss_fn, self.eot_samples)
        step = self._step_sizes(x, generator)
        sign = grad.sign_()
        if self.targeted:
            sign.neg_()
        return self._clip(x + sign * step)


class RandomEpsFGSM(FGSM):
    """FGSM with a random step per example, ``eps_i = |TN(0, scale)|`` (normal truncated at 2 * scale).

    QNN-defense's ``--adv 2`` training attack (after Kurakin et al. 2017): each example sees a different
    strength. ``eps`` optionally caps the draw. QNN-defense itself used
    ``stddev = (MAX_EPS * 255) // 2 = 255``
    on [0, 1] images (a pixel-units slip), which turns almost every example into a sign image; pass
    ``scale=255`` to reproduce that literally.
    """

    name = "fgsm_random"

    def __init__(self, scale: float = 0.15, eps: float | None = None, *, loss: Any = "ce",
                 targeted: bool = False, eot_samples: int = 1, seed: int = 0,
                 bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        scale = check_positive("scale", scale)
        cap = 2 * scale if eps is None else min(float(eps), 2 * scale)
        super().__init__(cap, loss=loss, targeted=targeted, eot_samples=eot_samples, seed=seed, bounds=bounds)
        self.scale = scale

    def _step_sizes(self, x: Tensor, generator: torch.Generator) -> Tensor:
        z = torch.randn(x.shape[0], generator=generator)
        for _ in range(100):  # resample the tails, like tf.truncated_normal
            out = z.abs() > 2
            if not out.any():
                break
            z[out] = torch.randn(int(out.sum()), generator=generator)
        draw = z.clamp_(-2, 2).abs_().mul_(self.scale).clamp_(max=self.eps)
        return draw.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
