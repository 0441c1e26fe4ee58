"""What every attack shares: settings validation, labels/targets, bounds, success test, seeding.

An attack is built with its settings and called as ``attack(model, x, y=None) -> x_adv``. It never
switches the model's train/eval mode (the caller decides whether dropout stays on), works on any
``nn.Module`` that returns class scores, and is reproducible: without an explicit ``generator`` a
call draws its randomness from ``torch.Generator().manual_seed(seed)``, so the same attack on the
same inputs gives the same result.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from qrobust.attacks.eot import mean_output
from qrobust.attacks.losses import LossFn, resolve_loss
from qrobust.errors import QrobustError

Bounds = tuple[float, float]


def check_nonneg(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise QrobustError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise QrobustError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_positive(name: str, value: float) -> float:
    value = check_nonneg(name, value)
    if value == 0:
        raise QrobustError(f"{name} must be > 0, got 0")
    return value


def check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise QrobustError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    if value < minimum:
        raise QrobustError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bounds(bounds: Bounds) -> Bounds:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError) as exc:
        raise QrobustError(f"bounds must be a pair (min, max), got {bounds!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise QrobustError(f"bounds must be finite with min < max, got {bounds!r}")
    return lo, hi


def random_targets(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A uniformly random class different from each label (CleverHans' / ART's untargeted JSMA)."""
    if num_classes < 2:
        raise QrobustError("a random target needs at least 2 classes")
    shift = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
    return (labels + shift) % num_classes


def is_success(outputs: Tensor, y: Tensor, targeted: bool, confidence: float = 0.0) -> Tensor:
    """Per-sample success: argmax != y (untargeted) or == y (targeted), by a margin of ``confidence``."""
    if confidence:
        outputs = outputs.clone()
        shift = outputs.new_full((len(y), 1), -confidence if targeted else confidence)
        outputs.scatter_add_(1, y[:, None], shift)
    pred = outputs.argmax(1)
    return pred == y if targeted else pred != y


class Attack:
    """Base class: subclasses set ``name`` and implement ``_run(model, x, y, generator)``."""

    name: ClassVar[str] = "attack"
    # Bump (by hand) when a change alters this attack's results: experiment caches key on it, so its
    # stored cells are recomputed and nothing else.
    version: ClassVar[str] = "1"
    uses_loss: ClassVar[bool] = True  # False: fixed objective (CW, JSMA), ``loss`` is not recorded

    def __init__(self, *, loss: str | LossFn = "ce", targeted: bool = False, eot_samples: int = 1,
                 seed: int = 0, bounds: Bounds = (0.0, 1.0)) -> None:
        self.loss = loss
        self.loss_fn = resolve_loss(loss)
        self.targeted = bool(targeted)
        self.eot_samples = check_count("eot_samples", eot_samples)
        self.seed = check_count("seed", seed, minimum=0)
        self.bounds = check_bounds(bounds)

    # -- public --
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor | int | None = None, *,
                 generator: torch.Generator | None = None) -> Tensor:
        """Return adversarial examples for ``x`` (same shape, inside the budget and the bounds).

        ``y``: true labels to move away from (untargeted) or target classes (targeted); an int means the
        same class for every sample. ``None``: the model's own predictions (what both seeds did), or,
        for a targeted attack, a random class different from the prediction.
        """
        if not isinstance(model, nn.Module) and not callable(model):
            raise QrobustError("model must be a torch.nn.Module (or callable) returning class scores")
        x = self._check_input(x)
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        if len(x) == 0:
            return x.clone()
        y = self._labels(model, x, y, gen)
        return self._run(model, x, y, gen).detach()

    def config(self) -> dict[str, Any]:
        """Settings that reproduce this attack (recorded next to every result)."""
        params = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "loss_fn"}
        if not self.uses_loss:
            params.pop("loss", None)
        elif callable(params.get("loss")):
            params["loss"] = getattr(params["loss"], "__name__", repr(params["loss"]))
        params["bounds"] = list(self.bounds)
        return {"attack": self.name, **params}

    def __repr__(self) -> str:
        cfg = self.config()
        cfg.pop("attack")
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"

    # -- helpers for subclasses --
    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise QrobustError("x must be a floating-point tensor of images (N, C, H, W) with pixels in the "
                               "bounds")
        if x.dim() < 2:
            raise QrobustError(f"x must be a batch (N, ...), got shape {tuple(x.shape)}")
        lo, hi = self.bounds
        if x.numel():
            xmin, xmax = torch.aminmax(x)
            if not (xmin >= lo - 1e-6 and xmax <= hi + 1e-6):
                raise QrobustError(f"input pixels must lie in the attack bounds [{lo}, {hi}], got "
                                   f"[{xmin.item():.4g}, {xmax.item():.4g}] (NaN/inf are refused too)")
        return x.detach()

    def _labels(self, model: nn.Module, x: Tensor, y: Tensor | int | None, gen: torch.Generator) -> Tensor:
        if y is None:
            out = mean_output(model, x, self.eot_samples)
            pred = out.argmax(1)
            return random_targets(pred, out.shape[1], gen) if self.targeted else pred
        if isinstance(y, int):
            return torch.full((len(x),), y, dtype=torch.long, device=x.device)
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise QrobustError(f"y must hold one class index per sample ({x.shape[0]}), got "
                               f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
        if y.is_floating_point():
            raise QrobustError("y must hold integer class indices, not one-hot or probabilities")
        return y.to(device=x.device, dtype=torch.long)

    def _clip(self, x: Tensor) -> Tensor:
        return x.clamp_(*self.bounds)

    def _success(self, outputs: Tensor, y: Tensor, confidence: float = 0.0) -> Tensor:
        return is_success(outputs, y, self.targeted, confidence)


class LinfAttack(Attack):
    """Shared helpers of the L-inf gradient-sign family (FGSM, BIM, PGD)."""

    def __init__(self, eps: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.eps = check_nonneg("eps", eps)

    def _box(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-pixel lower/upper limits: the eps ball intersected with the bounds."""
        lo, hi = self.bounds
        return (x - self.eps).clamp_(min=lo), (x + self.eps).clamp_(max=hi)
