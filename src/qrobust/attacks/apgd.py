"""Auto-PGD (Croce & Hein 2020): PGD without a step size to tune, and its targeted variant APGD-T.

APGD starts with step ``2 eps``, adds momentum (0.75) and, at checkpoints at 22%, 22+19%, ... of the
budget (gaps shrinking by 3% of it, never below 6%), halves the step of each sample whose loss rose in at
most ``rho`` of the steps since the last checkpoint, or whose step was not halved last time and whose best
loss did not improve; a halved sample restarts from its best point. That removes the step-size tuning
that lets a weak PGD overstate robustness. Gradients come from ``input_gradient``, so ``eot_samples=K``
attacks a randomized net with the gradient expected over K passes. The last step needs only a forward
pass, so APGD-``steps`` costs ``steps`` forward+backward passes and one forward, each on the samples not
fooled yet (a fooled sample leaves the batch at once).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from qrobust.attacks.base import Attack, check_count, check_nonneg, is_success
from qrobust.attacks.eot import input_gradient, mean_output
from qrobust.attacks.losses import LossFn, check_per_sample
from qrobust.errors import QrobustError

NORMS = ("Linf", "L2")
MOMENTUM = 0.75  # the paper's alpha: weight of the new projected step against the previous move


def check_norm(norm: str) -> str:
    key = {"linf": "Linf", "inf": "Linf", "l2": "L2", "2": "L2"}.get(str(norm).lower())
    if key is None:
        raise QrobustError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return key


def per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped (N, 1, 1, ...) to broadcast against the batch."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class APGD(Attack):
    """Auto-PGD, ``norm`` "Linf" or "L2", ``steps`` iterations per restart, ``restarts`` random starts.

    Samples already fooled are not attacked again by later restarts. Per sample the result is the first
    point found that fools the model, otherwise the point of highest loss (lowest when targeted) over all
    restarts. ``loss``: "ce", "dlr" (scale-invariant, the paper's answer to gradient masking by large
    logits), "cw", or a callable ``(outputs, y) -> per-sample loss``.
    """

    name = "apgd"

    def __init__(self, eps: float = 0.3, steps: int = 100, norm: str = "Linf", restarts: int = 1,
                 rho: float = 0.75, *, loss: Any = "ce", targeted: bool = False, eot_samples: int = 1,
                 seed: int = 0, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(loss=loss, targeted=targeted, eot_samples=eot_samples, seed=seed, bounds=bounds)
        self.eps = check_nonneg("eps", eps)
        self.steps = check_count("steps", steps)
        self.norm = check_norm(norm)
        self.restarts = check_count("restarts", restarts)
        self.rho = check_nonneg("rho", rho)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        sign = -1.0 if self.targeted else 1.0
        return self._restarts(model, x, y, y, self.loss_fn, sign, self.targeted, generator)

    # -- shared with APGD-T --
    def _restarts(self, model: nn.Module, x: Tensor, y_loss: Tensor, y_goal: Tensor, loss_fn: LossFn,
                  sign: float, targeted: bool, generator: torch.Generator,
                  state: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """Run ``self.restarts`` APGD runs on the samples not fooled yet; ``state`` = (result, best
        objective, fooled) carried across calls (APGD-T's targets), updated in place."""
        if state is None:
            state = (x.clone(), x.new_full((len(x),), -math.inf), torch.zeros(len(x), dtype=torch.bool,
                                                                             device=x.device))
        result, best, fooled = state
        for _ in range(self.restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            adv, obj, ok = self._single(model, x[todo], y_loss[todo], y_goal[todo], loss_fn, sign, targeted,
                                        generator)
            keep = ok | (obj > best[todo])
            result[todo[keep]] = adv[keep]
            best[todo[keep]] = obj[keep]
            fooled[todo[ok]] = True
        return result

    def _start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """The paper's random start: a uniform/Gaussian direction scaled to the boundary of the ball."""
        if self.norm == "Linf":
            t = torch.rand(x.shape, dtype=x.dtype, generator=generator).mul_(2).sub_(1).to(x.device)
            t = t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        else:
            t = torch.randn(x.shape, dtype=x.dtype, generator=generator).to(x.device)
            t = t / per_sample_norm(t).clamp_min(1e-12)
        return (x + self.eps * t).clamp_(*self.bounds)

    def _project(self, x: Tensor, z: Tensor, box: tuple[Tensor, Tensor] | None) -> Tensor:
        """Into the eps ball around ``x`` and the bounds (in place on ``z``)."""
        if box is not None:
            return torch.minimum(torch.maximum(z, box[0], out=z), box[1], out=z)
        d = z.sub_(x)
        d.mul_((self.eps / per_sample_norm(d).clamp_min(1e-12)).clamp_(max=1.0))
        return d.add_(x).clamp_(*self.bounds)

    def _direction(self, grad: Tensor) -> Tensor:
        if self.norm == "Linf":
            return grad.sign_()
        return grad.div_(per_sample_norm(grad).add_(1e-12))

    def _checkpoint_gaps(self) -> tuple[int, int, int]:
        """(first gap, smallest gap, shrink per checkpoint) in steps: first after 22% of the steps, then
        gaps shrinking by 3% of them down to 6%."""
        return tuple(max(int(f * self.steps), 1) for f in (0.22, 0.06, 0.03))  # type: ignore[return-value]

    def _single(self, model: nn.Module, x: Tensor, y_loss: Tensor, y_goal: Tensor, loss_fn: LossFn,
                sign: float, targeted: bool, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """One APGD run. Returns (adv, best objective, fooled): adv is the first fooling point found,
        else the best-objective point. The objective is ``sign * loss`` (maximised). A sample leaves the
        batch once fooled (most fall in the first steps), so later steps only pay for those standing."""
        n, view = len(x), (-1, *([1] * (x.dim() - 1)))
        box = None
        if self.norm == "Linf":
            lo, hi = self.bounds
            box = ((x - self.eps).clamp_(min=lo), (x + self.eps).clamp_(max=hi))
        cur = self._start(x, generator)
        grad, loss, out = input_gradient(model, cur, y_loss, loss_fn, self.eot_samples)
        obj = sign * loss
        fool = is_success(out, y_goal, targeted)
        adv, adv_obj, fooled = cur.clone(), obj.clone(), fool.clone()  # results, by row of the input
        ids = torch.arange(n, device=x.device)  # rows of the samples still in the batch
        best_x, best_obj, best_grad = cur.clone(), obj.clone(), grad.clone()
        step = x.new_full((n,), 2 * self.eps)
        prev_x, prev_obj = cur.clone(), obj
        gap, gap_min, gap_decr = self._checkpoint_gaps()
        since, rises = 0, torch.zeros(n, device=x.device)
        best_at_check, halved_at_check = best_obj.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
        for i in range(self.steps):
            if fool.any():  # the fooled samples' points are recorded: drop them from the batch
                adv_obj[ids[fool]] = best_obj[fool]
                keep = ~fool
                x, y_loss, y_goal, cur, grad, prev_x, prev_obj, best_x, best_obj, best_grad, step, rises, \
                    best_at_check, halved_at_check, ids, fool = (t[keep] for t in (
                        x, y_loss, y_goal, cur, grad, prev_x, prev_obj, best_x, best_obj, best_grad, step,
                        rises, best_at_check, halved_at_check, ids, fool))
                box = None if box is None else (box[0][keep], box[1][keep])
                if len(ids) == 0:
                    break
            momentum = cur - prev_x
            prev_x = cur
            z = self._project(x, cur + (sign * step).view(view) * self._direction(grad), box)
            if i > 0:  # x + a (z - x) + (1 - a)(x - x_prev)
                z = self._project(x, z.sub_(cur).mul_(MOMENTUM).add_(cur).add_(momentum, alpha=1 - MOMENTUM),
                                  box)
            cur = z
            if i < self.steps - 1:
                grad, loss, out = input_gradient(model, cur, y_loss, loss_fn, self.eot_samples)
            else:  # the last point is only scored, its gradient would never be used
                out = mean_output(model, cur, self.eot_samples)
                loss = check_per_sample(loss_fn(out, y_loss), len(cur))
            obj = sign * loss
            fool = is_success(out, y_goal, targeted)
            adv[ids[fool]], fooled[ids[fool]] = cur[fool], True
            rises += obj > prev_obj
            prev_obj = obj
            better = obj > best_obj
            best_x[better], best_grad[better], best_obj[better] = cur[better], grad[better], obj[better]
            since += 1
            if since == gap and i < self.steps - 1:
                halve = (rises <= self.rho * gap) | (~halved_at_check & (best_at_check >= best_obj))
                halved_at_check, best_at_check = halve, best_obj.clone()
                if halve.any():
                    step[halve] /= 2
                    cur[halve], grad[halve] = best_x[halve], best_grad[halve]
                since, rises = 0, rises.zero_()
                gap = max(gap - gap_decr, gap_min)
        adv[ids[~fool]], adv_obj[ids] = best_x[~fool], best_obj
        return adv, adv_obj, fooled


class APGDT(APGD):
    """APGD-T: untargeted robustness tested by targeted APGD runs towards the ``n_target_classes``
    highest-scoring wrong classes of the clean input, one after the other, on the samples not fooled yet.

    Success is any misclassification (``y`` = labels to move away from). The default loss is the
    targeted DLR, which per target equals the paper's ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``
    as long as the sample is not fooled. ``restarts`` runs per target class.
    """

    name = "apgdt"

    def __init__(self, eps: float = 0.3, steps: int = 100, norm: str = "Linf", restarts: int = 1,
                 rho: float = 0.75, n_target_classes: int = 9, *, loss: Any = "dlr_targeted",
                 eot_samples: int = 1, seed: int = 0, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(eps, steps, norm, restarts, rho, loss=loss, targeted=False, eot_samples=eot_samples,
                         seed=seed, bounds=bounds)
        self.n_target_classes = check_count("n_target_classes", n_target_classes)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.pop("targeted", None)  # always untargeted success; the targets are internal
        return cfg

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        clean = mean_output(model, x, self.eot_samples)
        ranked = clean.scatter(1, y[:, None], -math.inf).argsort(1, descending=True)
        n_targets = min(self.n_target_classes, clean.shape[1] - 1)
        state = (x.clone(), x.new_full((len(x),), -math.inf),
                 torch.zeros(len(x), dtype=torch.bool, device=x.device))
        for k in range(n_targets):
            state[1].fill_(-math.inf)  # objectives of different targets are not comparable
            self._restarts(model, x, ranked[:, k], y, self.loss_fn, -1.0, False, generator, state)
        return state[0]
