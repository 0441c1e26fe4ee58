"""Carlini-Wagner L2 (Carlini & Wagner 2017): tanh space, Adam, per-sample binary search over c.

Minimises ``||x' - x||_2^2 + c * f(x')`` with ``x' = tanh(w) * s + m`` (so ``x'`` always lies
inside the bounds) and ``f`` the hinge on the logit margin with confidence ``kappa``. Like
CleverHans' reference code (which both seeds ran), each forward pass serves both the loss and the
success test of the current iterate, and the best (smallest L2) successful iterate of each sample is
kept. After every binary step each sample's ``c`` follows the binary-search rule of
:func:`next_constants`. Unlike that code, the iterate left by the last Adam step is also tested (one
extra forward pass).

Two choices make the search strong for its iteration budget (docs/benchmarks.md, "CW-L2 vs
CleverHans 4 and ART"):

- ``warm_start`` (default on): the modifier and Adam's state carry over from one binary step to the
  next, so ``binary_steps x steps`` iterations act as one long run (CleverHans 4 does the same) instead
  of restarting from the clean image after every change of ``c``. At 5 x 100 iterations, lr 0.01,
  c0 0.01 on MNIST it takes success from 0.36 to 1.00.
- ``start_margin`` (default 1e-2): pixels at a bound start that fraction of the half-range inside it.
  The seeds' ``1e-6`` puts them at ``atanh(0.999999) = 7.25``, where tanh is flat: Adam moves ``w`` by
  about ``lr`` per step, so at ``lr = 0.01`` such a pixel cannot leave its bound within a few hundred
  iterations, and on MNIST almost every pixel is at a bound. ``1e-2`` (``atanh(0.99) = 2.65``) costs
  at most ``0.005`` per pixel at the start and lowered the mean L2 by ~2% in the benchmark.

The seeds' protocol, exactly: ``CWL2(c=10, steps=50, lr=0.1, binary_steps=1, start_margin=1e-6)``
(:data:`SEED_START_MARGIN`; with one binary step ``warm_start`` changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from qrobust.attacks.base import Attack, check_count, check_nonneg, check_positive
from qrobust.errors import QrobustError

NO_UPPER = 1e10  # upper bound of c before any success (CleverHans' value)
SEED_START_MARGIN = 1e-6  # the seeds' start: atanh(+-0.999999) for pixels at a bound


def next_constants(c: Tensor, lower: Tensor, upper: Tensor,
                   succeeded: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The binary-search rule, per sample: ``(c, lower, upper)`` for the next binary step.

    A success makes ``c`` an upper bound, a failure a lower bound; the next ``c`` is the midpoint once
    an upper bound is known, else ten times ``c`` (Carlini & Wagner's and CleverHans' rule).
    """
    upper = torch.where(succeeded, torch.minimum(upper, c), upper)
    lower = torch.where(succeeded, lower, torch.maximum(lower, c))
    known = upper < NO_UPPER / 10
    c = torch.where(known, (lower + upper) / 2, torch.where(succeeded, c, c * 10))
    return c, lower, upper


@dataclass
class CWTrace:
    """What a search found: ``adv`` (the original where nothing succeeded), ``l2`` (its L2 distance,
    ``inf`` where nothing succeeded), and per binary step the ``constants`` used and whether each
    sample ``succeeded`` in that step (both ``(binary_steps, n)``)."""

    adv: Tensor
    l2: Tensor
    constants: Tensor
    succeeded: Tensor


class _Best:
    """Each sample's smallest successful iterate so far (squared L2 kept, like the objective)."""

    def __init__(self, x: Tensor) -> None:
        self.adv = x.clone()
        self.l2sq = torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)

    def update(self, ok: Tensor, l2sq: Tensor, adv: Tensor) -> None:
        improved = ok & (l2sq < self.l2sq)
        if improved.any():
            self.adv[improved] = adv[improved]
            self.l2sq[improved] = l2sq[improved]


class CWL2(Attack):
    """CW-L2; the seeds: 1 binary step, 50 (EMPIR) / 100 (QNN-defense) iterations, lr 0.1, initial c 10,
    ``start_margin=1e-6`` (pass it: the default start differs).

    Returns, per sample, the successful adversarial example with the smallest L2 distance found, or
    the original image where none was found (:meth:`search` also returns the distances and the
    constants). ``abort_early``: stop a binary step when the total objective has not improved by 0.01%
    over the last ``steps // 10`` iterations (CleverHans' rule, for the batch as a whole).
    ``warm_start`` and ``start_margin``: see the module docstring.
    """

    name = "cw"
    uses_loss = False
    version: ClassVar[str] = "2"  # 2: warm start and start_margin 1e-2 by default (results changed)

    def __init__(self, c: float = 10.0, steps: int = 50, lr: float = 0.1, binary_steps: int = 1,
                 confidence: float = 0.0, abort_early: bool = True, *, targeted: bool = False,
                 eot_samples: int = 1, seed: int = 0, bounds: tuple[float, float] = (0.0, 1.0),
                 warm_start: bool = True, start_margin: float = 1e-2) -> None:
        super().__init__(loss="cw", targeted=targeted, eot_samples=eot_samples, seed=seed, bounds=bounds)
        self.c = check_positive("c", c)
        self.steps = check_count("steps", steps)
        self.lr = check_positive("lr", lr)
        self.binary_steps = check_count("binary_steps", binary_steps)
        self.confidence = check_nonneg("confidence", confidence)
        self.abort_early = bool(abort_early)
        self.warm_start = bool(warm_start)
        self.start_margin = check_positive("start_margin", start_margin)
        if self.start_margin >= 1:
            raise QrobustError(f"start_margin must be < 1 (a fraction of the half-range), got {start_margin}")

    # -- public --
    def search(self, model: nn.Module, x: Tensor, y: Tensor | int | None = None) -> CWTrace:
        """Run the attack and return the full :class:`CWTrace` (what ``attack(model, x, y)`` reduces to
        ``adv``); for studies of the constants and the distances."""
        x = self._check_input(x)
        if len(x) == 0:
            empty = x.new_zeros((self.binary_steps, 0))
            return CWTrace(x.clone(), x.new_zeros(0), empty, empty.bool())
        y = self._labels(model, x, y, torch.Generator().manual_seed(self.seed))
        trace = self._search(model, x, y)
        return CWTrace(trace.adv.detach(), trace.l2, trace.constants, trace.succeeded)

    # -- internals --
    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        return self._search(model, x, y).adv

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

    def _forward(self, model: nn.Module, x: Tensor) -> Tensor:
        """The output averaged over ``eot_samples`` passes, with its graph (``eot.mean_output`` has none)."""
        out = model(x)
        for _ in range(self.eot_samples - 1):
            out = out + model(x)
        return out / self.eot_samples if self.eot_samples > 1 else out

    def _search(self, model: nn.Module, x: Tensor, y: Tensor) -> CWTrace:
        lo, hi = self.bounds
        half, mid = (hi - lo) / 2, (hi + lo) / 2
        m = 1 - self.start_margin
        w0 = torch.atanh(((x - mid) / half).clamp(-m, m))
        c = torch.full((len(x),), self.c, device=x.device, dtype=x.dtype)
        lower, upper = torch.zeros_like(c), torch.full_like(c, NO_UPPER)
        best = _Best(x)
        constants, successes = [], []
        adam: list = []
        for bstep in range(self.binary_steps):
            if self.binary_steps >= 10 and bstep == self.binary_steps - 1:
                c = torch.where(upper < NO_UPPER, upper, c)  # CleverHans: last step retries the best c found
            if not adam or not self.warm_start:  # modifier, Adam's two moments, Adam's step count
                adam = [torch.zeros_like(x, requires_grad=True), torch.zeros_like(x), torch.zeros_like(x), 0]
            succeeded = self._optimize(model, x, y, w0, c, adam, best)
            constants.append(c)
            successes.append(succeeded)
            c, lower, upper = next_constants(c, lower, upper, succeeded)
        return CWTrace(best.adv, best.l2sq.sqrt(), torch.stack(constants), torch.stack(successes))

    def _optimize(self, model: nn.Module, x: Tensor, y: Tensor, w0: Tensor, c: Tensor, adam: list,
                  best: _Best) -> Tensor:
        """One binary step: up to ``steps`` Adam iterations at constants ``c``, continuing from the state
        in ``adam`` (updated in place); returns which samples succeeded at some iterate."""
        lo, hi = self.bounds
        half, mid = (hi - lo) / 2, (hi + lo) / 2
        modifier, m1, m2 = adam[0], adam[1], adam[2]
        kappa = self.confidence
        sign = 1.0 if self.targeted else -1.0  # margin = other - true; untargeted wants it >= kappa
        check_every = max(self.steps // 10, 1)
        succeeded = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        prev = float("inf")
        for it in range(self.steps):
            with torch.enable_grad():
                adv = torch.tanh(w0 + modifier) * half + mid
                out = self._forward(model, adv)
                l2sq = (adv - x).flatten(1).square().sum(1)
                true = out.gather(1, y[:, None]).squeeze(1)
                other = out.scatter(1, y[:, None], float("-inf")).amax(1)
                # untargeted: f = max(true - other + kappa, 0); targeted: max(other - true + kappa, 0)
                f = (sign * (other - true) + kappa).clamp(min=0)
                total = (l2sq + c * f).sum()
                (grad,) = torch.autograd.grad(total, modifier)
            adam[3] += 1
            self._adam_step(modifier, grad, m1, m2, adam[3])
            with torch.no_grad():
                ok = self._success(out.detach(), y, kappa)
                succeeded |= ok
                best.update(ok, l2sq.detach(), adv.detach())
            if self.abort_early and it % check_every == 0:
                value = total.item()
                if value > prev * 0.9999:
                    break
                prev = value
        with torch.no_grad():  # the last Adam step's iterate: one more forward, so it is not wasted
            adv = torch.tanh(w0 + modifier) * half + mid
            ok = self._success(self._forward(model, adv), y, kappa)
            succeeded |= ok
            best.update(ok, (adv - x).flatten(1).square().sum(1), adv)
        return succeeded
