"""Training settings and records: what :func:`qrobust.train.train` is asked to do and what it reports.

Their own module because every layer that trains reads them: the training loop (``qrobust.train``), its
adversarial objectives (``qrobust.adversary``, below the loop), recipes, experiment files and the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from qrobust.errors import QrobustError

# A training attack: (model, x, y) -> x_adv (qrobust.adversary.make_adversary builds one from an Attack).
Adversary = Callable[[nn.Module, Tensor, Tensor], Tensor]


LR_SCHEDULES = ("constant", "cosine", "cyclic")
# The adversarial training methods of qrobust.adversary (its make_objective builds each one).
ADV_METHODS = ("fgsm_rs", "pgd", "trades", "fgsm", "fgsm_random")


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    adam_eps: float = 1e-8
    seed: int = 0
    label_smoothing: float = 0.0
    adv_start_epoch: int = 0  # QNN-defense: first 10 epochs clean, then (CE_clean + CE_adv) / 2
    max_train: int | None = None  # use only the first N training images (quick runs)
    lr_schedule: str = "constant"  # or "cosine": per-step cosine decay from lr to 0 over all epochs
    adv_weight: float = 0.5  # weight of CE(x_adv): QNN-defense 0.5 = (CE_clean + CE_adv) / 2; Madry 1.0
    channels_last: bool = False  # NHWC layout while training on CPU: faster, equal up to float rounding
    # Adversarial training methods of qrobust.adversary ("" = none; see its docstring for each setting)
    adv_method: str = ""  # fgsm_rs (Wong) | pgd (Madry) | trades | fgsm | fgsm_random (QNN-defense)
    adv_eps: float = 0.3  # L-inf budget of the training attack
    adv_alpha: float = 0.0  # attack step; 0 = the method's rule (fgsm_rs 1.25 eps, else 2.5 eps / steps)
    adv_steps: int = 10  # attack steps of pgd and trades
    adv_scale: float = 0.15  # fgsm_random: std of the half-normal per-example eps
    adv_eps_ramp: float = 0.0  # grow eps (and step) linearly from 0 over this many epochs
    trades_beta: float = 6.0  # TRADES' robust-term weight (Zhang et al.: 6)
    co_guard: bool = False  # stop on catastrophic overfitting (PGD check on a held-out batch)
    co_guard_drop: float = 0.2  # ... when its PGD accuracy falls this far below the best (Wong et al.: 0.2)
    co_guard_every: int = 0  # ... checked every N optimizer steps (0: at each epoch end)
    co_guard_samples: int = 256  # ... held-out training images (the last ones, not trained on)

    def validate(self) -> None:
        if self.epochs < 0:
            raise QrobustError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size <= 0:
            raise QrobustError(f"batch size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            raise QrobustError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise QrobustError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_train is not None and self.max_train <= 0:
            raise QrobustError(f"max_train must be positive, got {self.max_train}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise QrobustError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, "
                               f"got {self.lr_schedule!r}")
        if not 0 < self.adv_weight <= 1:
            raise QrobustError(f"adversarial loss weight must be in (0, 1], got {self.adv_weight}")
        self._validate_adv()

    def _validate_adv(self) -> None:
        if self.adv_method and self.adv_method not in ADV_METHODS:
            raise QrobustError(f"adversarial training method must be one of {', '.join(ADV_METHODS)} "
                               f"(or empty for none), got {self.adv_method!r}")
        for name in ("adv_eps", "adv_alpha", "adv_scale", "adv_eps_ramp", "trades_beta"):
            if not getattr(self, name) >= 0:
                raise QrobustError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.adv_steps < 1 or self.co_guard_every < 0 or self.co_guard_samples < 1:
            raise QrobustError(f"adv_steps and co_guard_samples must be >= 1 and co_guard_every >= 0, got "
                               f"{self.adv_steps}, {self.co_guard_samples}, {self.co_guard_every}")
        if not 0 < self.co_guard_drop <= 1:
            raise QrobustError(f"co_guard_drop must be in (0, 1], got {self.co_guard_drop}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based); a function of position so resume is exact."""
        if self.lr_schedule == "cosine" and total_steps > 0:
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
        if self.lr_schedule == "cyclic" and total_steps > 0:  # Wong et al.: 0 -> lr at 2/5 of training -> 0
            t = min(step + 1, total_steps) / total_steps
            return self.lr * (t / 0.4 if t <= 0.4 else (1.0 - t) / 0.6)
        return self.lr


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    train_accuracy: float
    test_accuracy: float
    seconds: float
    images_per_second: float


@dataclass
class TrainResult:
    history: list[EpochRecord] = field(default_factory=list)
    co_guard: dict[str, Any] | None = None  # the catastrophic-overfitting guard's checks (qrobust.adversary)

    @property
    def test_accuracy(self) -> float:
        return self.history[-1].test_accuracy if self.history else float("nan")

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.history)

    def as_dict(self) -> dict[str, Any]:
        out = {"history": [asdict(r) for r in self.history], "test_accuracy": self.test_accuracy,
               "train_seconds": self.seconds}
        return out if self.co_guard is None else {**out, "co_guard": self.co_guard}


__all__ = ["ADV_METHODS", "LR_SCHEDULES", "Adversary", "EpochRecord", "TrainConfig", "TrainResult"]
