"""Accuracy, confidence intervals and batched prediction."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from qrobust.distributed import cat_batches, map_batches


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Argmax predictions, batched; ``model`` must already be in the wanted train/eval mode."""
    out = [model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    if len(x) == 0:
        return float("nan")
    return (predict(model, x, batch_size) == y).float().mean().item()


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); sane at 0% and 100%."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval always holds p; min/max keep rounding (1e-18 below 0 at p = 0) from leaving it
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


# -- attack evaluation --

L0_TOLERANCE = 0.5 / 255  # a change smaller than half a grey level vanishes when the image is saved as uint8


@dataclass
class AttackResult:
    """What one attack did to one model on one set of images.

    ``success_rate`` is over the *attacked* samples: those the model classified as the attack label
    (untargeted; all of them with ``labels="pred"``) or not already as the target (targeted).
    The perturbation norms are means over the successful adversarial examples (``nan`` if none);
    ``*_all`` versions average over every attacked sample. L0 counts changed pixel values (elements)
    with ``|delta| > L0_TOLERANCE``; L2 and Linf are in [0, 1] pixel units.
    """

    attack: str
    params: dict[str, Any]
    n: int
    n_attacked: int
    labels: str
    clean_accuracy: float
    adversarial_accuracy: float
    success_rate: float
    mean_l0: float
    mean_l2: float
    mean_linf: float
    mean_l0_all: float
    mean_l2_all: float
    mean_linf_all: float
    seconds: float
    clean_ci95: tuple[float, float] = (float("nan"), float("nan"))
    adversarial_ci95: tuple[float, float] = (float("nan"), float("nan"))
    success_ci95: tuple[float, float] = (float("nan"), float("nan"))
    x_adv: Tensor | None = field(default=None, repr=False)
    targets: Tensor | None = field(default=None, repr=False)
    adv_correct: Tensor | None = field(default=None, repr=False)  # per image: adversarial prediction == y

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict_shallow(self).items() if k not in ("x_adv", "targets", "adv_correct")}
        for k in ("clean_ci95", "adversarial_ci95", "success_ci95"):
            out[k] = list(out[k])
        return out


def asdict_shallow(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` without deep-copying tensors."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def perturbation_norms(x: Tensor, x_adv: Tensor, l0_tolerance: float = L0_TOLERANCE
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample L0 (changed elements), L2 and Linf of ``x_adv - x``."""
    d = (x_adv - x).flatten(1)
    linf = d.abs().amax(1) if d.shape[1] else d.sum(1)
    return (d.abs() > l0_tolerance).sum(1).float(), d.norm(dim=1), linf


def _mean(values: Tensor, mask: Tensor) -> float:
    return values[mask].mean().item() if mask.any() else float("nan")


def _goal_fn(model: nn.Module, attack: Any, x: Tensor, y: Tensor, labels: str,
             targets: Tensor | int | None) -> Callable[[int, int, Tensor], Tensor]:
    """``goal(start, stop, pred)``: what the images of a batch are attacked towards (the untargeted label,
    ``pred`` or ``y``, or the target class). Random targets are drawn once for all images (seeded by
    ``attack.seed``), so a batch's targets do not depend on which process attacks it."""
    from qrobust.attacks.base import random_targets

    if not getattr(attack, "targeted", False):
        return (lambda s, e, pred: pred) if labels == "pred" else (lambda s, e, pred: y[s:e])
    if targets is None:
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
        gen = torch.Generator().manual_seed(int(getattr(attack, "seed", 0)))
        # random_targets adds a random shift in [1, C) to each label; draw the shifts of all images at once
        shift = random_targets(torch.zeros(len(x), dtype=torch.long), num_classes, gen).to(x.device)
        return lambda s, e, pred: (pred + shift[s:e]) % num_classes
    if isinstance(targets, int):
        return lambda s, e, pred: torch.full_like(pred, targets)
    goal = targets.to(device=x.device, dtype=torch.long)
    return lambda s, e, pred: goal[s:e]


def _attack_batches(model: nn.Module, attack: Callable[..., Tensor], x: Tensor,
                    goal_of: Callable[[int, int, Tensor], Tensor], batch_size: int, keep_adv: bool,
                    progress: Callable[[int, int], None] | None) -> dict[str, Tensor]:
    """Per image: clean and adversarial predictions, goal, perturbation norms (and ``x_adv``).

    The batches are sharded over torchrun's ranks (one process: all of them, in order) and the global
    RNG is reseeded per batch from ``(attack.seed, batch index)``, so dropout masks drawn during a batch
    do not depend on where it ran (:func:`qrobust.distributed.map_batches`).
    """
    def batch(s: int, e: int) -> dict[str, Tensor]:
        xb = x[s:e]
        with torch.no_grad():
            pred_b = model(xb).argmax(1)
        goal_b = goal_of(s, e, pred_b)
        adv = attack(model, xb, goal_b).detach()
        with torch.no_grad():
            out = {"pred": pred_b, "goal": goal_b, "pred_adv": model(adv).argmax(1)}
        out["l0"], out["l2"], out["linf"] = perturbation_norms(xb, adv)
        return out | ({"x_adv": adv} if keep_adv else {})

    outs = map_batches(batch, len(x), batch_size, seed=int(getattr(attack, "seed", 0)), device=x.device,
                       progress=progress)
    if not outs:
        empty = torch.empty(0, device=x.device)
        return {"pred": empty.long(), "goal": empty.long(), "pred_adv": empty.long(), "l0": empty,
                "l2": empty, "linf": empty} | ({"x_adv": x.clone()} if keep_adv else {})
    return {k: cat_batches(outs, k) for k in outs[0]}


def evaluate_attack(
    model: nn.Module,
    attack: Callable[..., Tensor],
    x: Tensor,
    y: Tensor,
    *,
    labels: str = "pred",
    targets: Tensor | int | None = None,
    batch_size: int = 500,
    keep_adv: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> AttackResult:
    """Run ``attack`` on ``(x, y)`` in batches and measure accuracy, success and perturbation size.

    ``labels``: what an untargeted attack moves away from: ``"pred"`` (the model's clean predictions,
    as both seeds did) or ``"true"``. A targeted attack (``attack.targeted``) aims at ``targets``
    (tensor or one class); ``None`` draws a random class different from the clean prediction,
    seeded by ``attack.seed``. The model's train/eval mode is left as the caller set it. Under torchrun
    the batches are sharded over the ranks and every rank returns the whole result, image by image what
    one process computes (:func:`qrobust.distributed.map_batches`); ``seconds`` is the wall time.
    """
    from qrobust.errors import QrobustError

    if labels not in ("pred", "true"):
        raise QrobustError(f"labels must be 'pred' or 'true', got {labels!r}")
    if batch_size <= 0:
        raise QrobustError(f"batch size must be positive, got {batch_size}")
    if len(x) != len(y):
        raise QrobustError(f"{len(x)} images but {len(y)} labels")
    y = y.to(x.device)
    targeted = bool(getattr(attack, "targeted", False))
    t0 = time.perf_counter()
    per = _attack_batches(model, attack, x, _goal_fn(model, attack, x, y, labels, targets), batch_size,
                          keep_adv, progress)
    seconds = time.perf_counter() - t0
    pred, goal, pred_adv, l0, l2, linf = (per[k] for k in ("pred", "goal", "pred_adv", "l0", "l2", "linf"))
    x_adv = per.get("x_adv")
    attacked = (pred != goal) if targeted else (pred == goal)
    success = attacked & ((pred_adv == goal) if targeted else (pred_adv != goal))
    n, n_att = len(x), int(attacked.sum())
    clean_ok, adv_ok, n_succ = int((pred == y).sum()), int((pred_adv == y).sum()), int(success.sum())
    return AttackResult(
        attack=getattr(attack, "name", type(attack).__name__),
        params=attack.config() if hasattr(attack, "config") else {},
        n=n, n_attacked=n_att, labels=labels,
        clean_accuracy=clean_ok / n if n else float("nan"),
        adversarial_accuracy=adv_ok / n if n else float("nan"),
        success_rate=n_succ / n_att if n_att else float("nan"),
        mean_l0=_mean(l0, success), mean_l2=_mean(l2, success), mean_linf=_mean(linf, success),
        mean_l0_all=_mean(l0, attacked), mean_l2_all=_mean(l2, attacked), mean_linf_all=_mean(linf, attacked),
        seconds=seconds,
        clean_ci95=wilson_interval(clean_ok, n), adversarial_ci95=wilson_interval(adv_ok, n),
        success_ci95=wilson_interval(n_succ, n_att),
        x_adv=x_adv, targets=goal if targeted else None, adv_correct=pred_adv == y,
    )
