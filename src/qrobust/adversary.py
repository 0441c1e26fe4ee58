"""Adversaries for adversarial training: the training attack, wrapped for :func:`qrobust.train.train`.

Kept in the library (not the CLI) because scripts and experiments train adversarially too. Seed A
trained with PGD (Madry et al.) and with FGSM at a random per-example eps ``|TN(0, s)|``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrobust.attacks import FGSM, PGD, Attack, RandomEpsFGSM
from qrobust.errors import QrobustError
from qrobust.train import Adversary

KINDS = ("fgsm", "fgsm-random", "pgd")


def make_attack(kind: str, *, eps: float = 0.3, alpha: float = 0.01, steps: int = 40,
                random_start: bool = True, scale: float = 0.15, seed: int = 0) -> Attack:
    """The training attack of ``kind`` (labels are the true training labels)."""
    if kind == "pgd":
        return PGD(eps=eps, alpha=alpha, steps=steps, random_start=random_start, seed=seed)
    if kind == "fgsm":
        return FGSM(eps=eps, seed=seed)
    if kind == "fgsm-random":
        return RandomEpsFGSM(scale=scale, eps=eps, seed=seed)
    raise QrobustError(f"unknown adversarial training attack {kind!r}; use one of {', '.join(KINDS)}")


def make_adversary(attack: Attack, seed: int = 0) -> Adversary:
    """Wrap an attack for :func:`qrobust.train.train`: one random stream across batches (reproducible
    for a seed, yet a fresh random start per batch), true labels."""
    gen = torch.Generator().manual_seed(seed)

    def adversary(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return attack(model, x, y, generator=gen)

    adversary.attack = attack  # type: ignore[attr-defined]
    return adversary
