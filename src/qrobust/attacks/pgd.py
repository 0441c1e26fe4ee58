"""L-inf Projected Gradient Descent (Madry et al. 2018) and the Basic Iterative Method (Kurakin et al. 2017).

The inner loop is one forward + one backward pass w.r.t. the input per step and a few in-place
tensor operations; nothing else (no loss bookkeeping, no extra forward) unless restarts need it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qrobust.attacks.base import LinfAttack, check_count, check_nonneg
from qrobust.attacks.eot import input_gradient, mean_output
from qrobust.attacks.losses import check_per_sample


class PGD(LinfAttack):
    """``steps`` signed-gradient steps of size ``alpha``, projected on the eps ball and the bounds.

    ``random_start``: start from a uniform point of the eps ball. ``restarts > 1``: samples the attack
    has not fooled yet are attacked again from a fresh random start; per sample the first successful
    restart is kept, otherwise the one with the highest final loss (lowest when targeted).
    """

    name = "pgd"

    def __init__(self, eps: float = 0.3, alpha: float = 0.01, steps: int = 40, random_start: bool = True,
                 restarts: int = 1, *, loss: Any = "ce", targeted: bool = False, eot_samples: int = 1,
                 seed: int = 0, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(eps, loss=loss, targeted=targeted, eot_samples=eot_samples, seed=seed, bounds=bounds)
        self.alpha = check_nonneg("alpha", alpha)
        self.steps = check_count("steps", steps)
        self.random_start = bool(random_start)
        self.restarts = check_count("restarts", restarts)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        lo, hi = self._box(x)
        if self.restarts == 1:
            return self._attack_once(model, x, y, lo, hi, generator)
        result = torch.empty_like(x)
        best = torch.empty(len(x), device=x.device, dtype=x.dtype)
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        todo = torch.arange(len(x), device=x.device)
        sign = -1.0 if self.targeted else 1.0
        for r in range(self.restarts):
            xs, ys = x[todo], y[todo]
            adv = self._attack_once(model, xs, ys, lo[todo], hi[todo], generator)
            out = mean_output(model, adv, self.eot_samples)
            with torch.no_grad():
                loss = sign * check_per_sample(self.loss_fn(out, ys), len(ys))
            success = self._success(out, ys)
            better = success | (loss > best[todo]) if r else torch.ones_like(success)
            result[todo[better]] = adv[better]
            best[todo[better]] = loss[better]
            done[todo[success]] = True
            todo = todo[~success]
            if len(todo) == 0 or not self.random_start:
                break  # a deterministic start would only repeat the same run
        return result

    def _attack_once(self, model: nn.Module, x: Tensor, y: Tensor, lo: Tensor, hi: Tensor,
                     generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            if self.random_start and self.eps > 0:
                noise = torch.empty(x.shape, dtype=x.dtype).uniform_(-self.eps, self.eps, generator=generator)
                adv = torch.minimum(torch.maximum(x + noise.to(x.device), lo), hi)
            else:
                adv = x.clone()
            step = -self.alpha if self.targeted else self.alpha
            for _ in range(self.steps):
                grad, _, _ = input_gradient(model, adv, y, self.loss_fn, self.eot_samples)
                adv.add_(grad.sign_(), alpha=step)
                torch.maximum(adv, lo, out=adv)
                torch.minimum(adv, hi, out=adv)
        return adv


class BIM(PGD):
    """PGD without random start (Kurakin et al.'s iterative FGSM); EMPIR: eps 0.3, 0.01 x 40."""

    name = "bim"

    def __init__(self, eps: float = 0.3, alpha: float = 0.01, steps: int = 40, *, loss: Any = "ce",
                 targeted: bool = False, eot_samples: int = 1, seed: int = 0,
                 bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(eps, alpha, steps, random_start=False, restarts=1, loss=loss, targeted=targeted,
                         eot_samples=eot_samples, seed=seed, bounds=bounds)
