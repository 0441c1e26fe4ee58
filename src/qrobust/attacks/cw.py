"""Carlini-Wagner L2 (Carlini & Wagner 2017): tanh space, Adam, per-sample binary search over c.

Minimises ``||x' - x||_2^2 + c * f(x')`` with ``x' = tanh(w) * s + m`` (so ``x'`` always lies
inside the bounds) and ``f`` the hinge on the logit margin with confidence ``kappa``. Like
CleverHans' reference code (which both seeds ran), each forward pass serves both the loss and the
success test of the current iterate, the best (smallest L2) successful iterate of each sample is
kept, and after every binary step ``c`` is halved towards the last success or multiplied by 10.
Unlike that code, the iterate left by the last Adam step is also tested (one extra forward pass).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrobust.attacks.base import Attack, check_count, check_nonneg, check_positive


class CWL2(Attack):
    """CW-L2; the seeds: 1 binary step, 50 (EMPIR) / 100 (seed A) iterations, lr 0.1, initial c 10.

    Returns, per sample, the successful adversarial example with the smallest L2 distance found, or
    the original image where none was found. ``abort_early``: stop a binary step when the total
    objective has not improved by 0.01% over the last ``steps // 10`` iterations (CleverHans' rule,
    for the batch as a whole).
    """

    name = "cw"
    uses_loss = False

    def __init__(self, c: float = 10.0, steps: int = 50, lr: float = 0.1, binary_steps: int = 1,
                 confidence: float = 0.0, abort_early: bool = True, *, targeted: bool = False,
                 eot_samples: int = 1, seed: int = 0, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(loss="cw", targeted=targeted, eot_samples=eot_samples, seed=seed, bounds=bounds)
        self.c = check_positive("c", c)
        self.steps = check_count("steps", steps)
        self.lr = check_positive("lr", lr)
        self.binary_steps = check_count("binary_steps", binary_steps)
        self.confidence = check_nonneg("confidence", confidence)
        self.abort_early = bool(abort_early)

    def _adam_step(self, param: Tensor, grad: Tensor, m1: Tensor, m2: Tensor, t: int) -> None:
        """torch.optim.Adam's update (betas 0.9/0.999, eps 1e-8), in place.

        Written out because the first ``torch.optim`` step imports TorchDynamo: ~10 s and ~170 MB once
        per process, more than a whole CW run on MNIST.
        """
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        with torch.no_grad():
            m1.mul_(beta1).add_(grad, alpha=1 - beta1)
            m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (m2 / (1 - beta2**t)).sqrt_().add_(eps)
            param.addcdiv_(m1, denom, value=-self.lr / (1 - beta1**t))

    @staticmethod
    def _keep_best(ok: Tensor, l2: Tensor, adv: Tensor, best_l2: Tensor, best_adv: Tensor) -> Tensor:
        """Store in ``best_adv`` the successful iterates closer than each sample's best so far; return the
        updated best squared L2."""
        improved = ok & (l2 < best_l2)
        if not improved.any():
            return best_l2
        best_adv[improved] = adv[improved]
        return torch.where(improved, l2, best_l2)

    def _forward(self, model: nn.Module, x: Tensor) -> Tensor:
        out = model(x)
        for _ in range(self.eot_samples - 1):
            out = out + model(x)
        return out / self.eot_samples if self.eot_samples > 1 else out

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        lo, hi = self.bounds
        half, mid = (hi - lo) / 2, (hi + lo) / 2
        n = len(x)
        w0 = torch.atanh(((x - mid) / half).clamp_(-1 + 1e-6, 1 - 1e-6))
        c = torch.full((n,), self.c, device=x.device, dtype=x.dtype)
        lower = torch.zeros_like(c)
        upper = torch.full_like(c, 1e10)
        best_l2 = torch.full_like(c, float("inf"))
        best_adv = x.clone()
        kappa = self.confidence
        sign = 1.0 if self.targeted else -1.0  # margin = other - true; untargeted wants it >= kappa
        check_every = max(self.steps // 10, 1)
        for bstep in range(self.binary_steps):
            if self.binary_steps >= 10 and bstep == self.binary_steps - 1:
                c = torch.where(upper < 1e10, upper, c)  # CleverHans: last step retries the best c found
            modifier = torch.zeros_like(x, requires_grad=True)
            m1, m2 = torch.zeros_like(x), torch.zeros_like(x)  # Adam moments
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = float("inf")
            for it in range(self.steps):
                with torch.enable_grad():
                    adv = torch.tanh(w0 + modifier) * half + mid
                    out = self._forward(model, adv)
                    l2 = (adv - x).flatten(1).square().sum(1)
                    true = out.gather(1, y[:, None]).squeeze(1)
                    other = out.scatter(1, y[:, None], float("-inf")).amax(1)
                    # untargeted: f = max(true - other + kappa, 0); targeted: max(other - true + kappa, 0)
                    f = (sign * (other - true) + kappa).clamp(min=0)
                    loss = l2 + c * f
                    total = loss.sum()
                    (grad,) = torch.autograd.grad(total, modifier)
                self._adam_step(modifier, grad, m1, m2, it + 1)
                with torch.no_grad():
                    ok = self._success(out.detach(), y, kappa)
                    succeeded |= ok
                    best_l2 = self._keep_best(ok, l2.detach(), adv.detach(), best_l2, best_adv)
                if self.abort_early and it % check_every == 0:
                    value = total.item()
                    if value > prev * 0.9999:
                        break
                    prev = value
            with torch.no_grad():  # the last Adam step's iterate: one more forward, so it is not wasted
                adv = torch.tanh(w0 + modifier) * half + mid
                ok = self._success(self._forward(model, adv), y, kappa)
                succeeded |= ok
                best_l2 = self._keep_best(ok, (adv - x).flatten(1).square().sum(1), adv, best_l2, best_adv)
            # binary search on c, per sample
            upper = torch.where(succeeded, torch.minimum(upper, c), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, c))
            c = torch.where(succeeded | (upper < 1e9), (lower + upper) / 2, c * 10)
        return best_adv
