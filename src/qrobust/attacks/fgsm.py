"""Fast Gradient Sign Method (Goodfellow et al. 2015), and seed A's random-eps variant for training."""

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
    """FGSM with a per-example step ``eps_i = min(|N(0, scale)|, eps)``: seed A's ``--adv 2`` training attack.

    Seed A (after Kurakin et al. 2017) drew each example's epsilon from a half-normal distribution so
    that adversarial training sees a range of strengths; ``eps`` caps the draw (the seed's MAX_EPS).
    """

    name = "fgsm_random"

    def __init__(self, eps: float = 0.3, scale: float = 0.15, **kw: Any) -> None:
        super().__init__(eps, **kw)
        self.scale = check_positive("scale", scale)

    def _step_sizes(self, x: Tensor, generator: torch.Generator) -> Tensor:
        draw = torch.randn(x.shape[0], generator=generator).abs_().mul_(self.scale).clamp_(max=self.eps)
        return draw.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
