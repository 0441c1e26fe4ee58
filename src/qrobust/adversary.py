"""Adversarial training: the training attacks, the training methods, and the catastrophic-overfitting guard.

Kept in the library (not the CLI) because scripts, recipes and experiments train adversarially too.
A method is chosen by ``TrainConfig.adv_method`` (so CLI flags, TOML ``train`` tables and recipes all
reach it) and built by :func:`make_objective`:

- ``fgsm_rs``: FGSM from a uniform random start in the eps ball, step ``alpha = 1.25 eps`` (Wong, Rice
  & Kolter 2020, "Fast is better than free"), loss ``CE(x_adv)`` with ``adv_weight = 1``;
- ``pgd``: ``adv_steps`` signed steps from a uniform random start (Madry et al. 2018), default step
  ``2.5 eps / steps``;
- ``trades``: ``CE(f(x), y) + beta KL(f(x) || f(x'))`` with ``x'`` maximizing the KL by PGD from
  ``x + 0.001 N(0, 1)`` (Zhang et al. 2019);
- ``fgsm`` / ``fgsm_random``: QNN-defense's ``--adv`` attacks (plain FGSM; FGSM at a random per-example eps).

QNN-defense's schedule is a setting of any method, not a method: ``adv_start_epoch`` clean epochs first, then
``(1 - w) CE(x) + w CE(x_adv)`` with ``w = adv_weight`` (QNN-defense 0.5, Madry / Wong 1.0; TRADES has its
own ``trades_beta``). ``adv_eps_ramp`` grows eps (and the step) linearly from 0 over that many epochs.

Choices, stated: the attack runs with the model in eval mode (dropout off, batch-norm running
statistics), as TRADES' reference code and QNN-defense did and so the attack's own passes never update
batch-norm statistics; Wong et al. and Madry et al. attacked in train mode, which for MNISTconv /
CIFARconv (no batch norm, no dropout by default) is the same computation. The attack computes the
input gradient only (``torch.autograd.grad`` w.r.t. the input), never the weights' gradients.
Quantized models are attacked and trained through the same DoReFa quantizers, whose straight-through
estimators carry both the input and the weight gradients.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.attacks import FGSM, PGD, Attack, RandomEpsFGSM
from qrobust.attacks.eot import input_gradient
from qrobust.data import Split
from qrobust.errors import QrobustError
from qrobust.train_config import ADV_METHODS, Adversary, TrainConfig

KINDS = ("fgsm", "fgsm-random", "pgd")


def smoothed_targets(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """EMPIR's label smoothing: one-hot clipped to [s / (K - 1), 1 - s]."""
    low = smoothing / (num_classes - 1)
    return F.one_hot(y, num_classes).float().clamp(low, 1.0 - smoothing)


def training_loss(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """Cross-entropy with EMPIR's label smoothing: the clean objective, and each method's loss on x_adv."""
    if smoothing == 0:
        return F.cross_entropy(logits, y)
    target = smoothed_targets(y, logits.shape[1], smoothing)
    return -(target * F.log_softmax(logits, 1)).sum(1).mean()


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


def default_alpha(config: TrainConfig) -> float:
    """The step of ``config``'s method at full eps: ``adv_alpha`` if set, else the method's published rule."""
    if config.adv_alpha > 0:
        return config.adv_alpha
    if config.adv_method == "fgsm_rs":
        return 1.25 * config.adv_eps  # Wong et al.: 0.375 at eps 0.3 (MNIST), 10/255 at 8/255 (CIFAR-10)
    return 2.5 * config.adv_eps / config.adv_steps  # Madry et al.'s rule, also used for TRADES' KL ascent


def _in_eval(model: nn.Module, fn, *args: Any) -> Tensor:
    """Run the attack ``fn`` with the model in eval mode, restoring its mode after (see module doc)."""
    mode = model.training
    model.eval()
    try:
        return fn(*args).detach()
    finally:
        model.train(mode)


class Objective:
    """One adversarial-training method: ``objective(model, x, y) -> (loss, logits for train metrics)``.

    Randomness (random starts) comes from ``generator``, which :func:`qrobust.train.train` saves in its
    resumable state, so an interrupted run resumes bit for bit.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: TrainConfig, generator: torch.Generator) -> None:
        self.config = config
        self.generator = generator
        self.frac = 1.0

    def at(self, step: int, steps_per_epoch: int) -> None:
        """Set the eps warm-up for optimizer step ``step`` (a function of position: resume is exact)."""
        ramp = self.config.adv_eps_ramp * steps_per_epoch
        done = step - self.config.adv_start_epoch * steps_per_epoch + 1
        self.frac = 1.0 if ramp <= 0 else min(1.0, max(done, 0) / ramp)

    @property
    def eps(self) -> float:
        return self.config.adv_eps * self.frac

    @property
    def alpha(self) -> float:
        return default_alpha(self.config) * self.frac

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Madry / Wong / QNN-defense: ``(1 - w) CE(x) + w CE(x_adv)``; at ``w = 1`` no clean pass at all, and
        the train metrics are those of the adversarial batch."""
        x_adv = _in_eval(model, self.perturb, model, x, y)
        w, smoothing = self.config.adv_weight, self.config.label_smoothing
        adv_logits = model(x_adv)
        loss = training_loss(adv_logits, y, smoothing)
        if w == 1.0:
            return loss, adv_logits.detach()
        logits = model(x)
        return (1 - w) * training_loss(logits, y, smoothing) + w * loss, logits.detach()


class AttackObjective(Objective):
    """A method whose inner maximization is one of qrobust's attacks on the cross-entropy."""

    def __init__(self, config: TrainConfig, generator: torch.Generator, attack: Attack) -> None:
        super().__init__(config, generator)
        self.attack = attack
        self.name = config.adv_method  # type: ignore[misc]

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        self.attack.eps = min(self.eps, getattr(self.attack, "cap", self.eps))
        if hasattr(self.attack, "alpha"):
            self.attack.alpha = self.alpha
        return self.attack(model, x, y, generator=self.generator)


def trades_kl(logits_clean: Tensor, logits_adv: Tensor) -> Tensor:
    """Per-sample ``KL(softmax f(x) || softmax f(x'))``: TRADES' robust term."""
    log_p = F.log_softmax(logits_clean, 1)
    return (log_p.exp() * (log_p - F.log_softmax(logits_adv, 1))).sum(1)


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float,
                smoothing: float = 0.0) -> Tensor:
    """Zhang et al. (2019) eq. 5: ``CE(f(x), y) + beta mean KL(f(x) || f(x'))``; gradients flow through
    both arguments of the KL, as in their reference code."""
    return training_loss(logits_clean, y, smoothing) + beta * trades_kl(logits_clean, logits_adv).mean()


class TradesObjective(Objective):
    name = "trades"

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """PGD on the KL to the clean prediction (labels unused), from ``x + 0.001 N(0, 1)`` as the paper."""
        eps, alpha = self.eps, self.alpha
        lo, hi = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
        with torch.no_grad():
            target = model(x)
            noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)
            adv = torch.minimum(torch.maximum(x + 0.001 * noise, lo), hi)
            for _ in range(self.config.adv_steps):
                grad, _, _ = input_gradient(model, adv, target, trades_kl)
                adv.add_(grad.sign_(), alpha=alpha)
                torch.maximum(adv, lo, out=adv)
                torch.minimum(adv, hi, out=adv)
        return adv

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = _in_eval(model, self.perturb, model, x, y)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            clean, adv = model(x), model(x_adv)  # batch norm: keep the two batches' statistics apart
        else:  # one pass for both: same values, one weight quantization
            clean, adv = model(torch.cat([x, x_adv])).split(len(x))
        loss = trades_loss(clean, adv, y, self.config.trades_beta, self.config.label_smoothing)
        return loss, clean.detach()


def make_objective(config: TrainConfig, generator: torch.Generator) -> Objective:
    """The method ``config.adv_method`` names, with its attack (see the module docstring)."""
    m, c = config.adv_method, config
    if m == "trades":
        return TradesObjective(c, generator)
    if m == "fgsm_rs":
        attack: Attack = PGD(eps=c.adv_eps, alpha=default_alpha(c), steps=1, random_start=True)
    elif m == "pgd":
        attack = PGD(eps=c.adv_eps, alpha=default_alpha(c), steps=c.adv_steps, random_start=True)
    elif m == "fgsm":
        attack = FGSM(eps=c.adv_eps)
    elif m == "fgsm_random":
        attack = RandomEpsFGSM(scale=c.adv_scale, eps=c.adv_eps)
        attack.cap = attack.eps  # type: ignore[attr-defined]  # the draw's cap: min(eps, 2 * scale)
    else:
        raise QrobustError(f"unknown adversarial training method {m!r}; use one of {', '.join(ADV_METHODS)}")
    return AttackObjective(c, generator, attack)


class COGuard:
    """Guard against catastrophic overfitting (Wong et al. 2020, sec. 5): every ``co_guard_every`` steps
    (0: at the end of each epoch) run PGD-10 (step eps / 4, random start) at the full eps on a fixed
    held-out batch; once its accuracy falls more than ``co_guard_drop`` below the best seen, stop and
    restore the best weights. Wong et al. compared with the previous check; the best is the stricter
    reference and gives the weights to restore. Its state rides in the resumable training state."""

    def __init__(self, config: TrainConfig, x: Tensor, y: Tensor) -> None:
        self.config, self.x, self.y = config, x, y
        self.attack = PGD(eps=config.adv_eps, alpha=config.adv_eps / 4, steps=10, random_start=True,
                          seed=config.seed)
        self.best = -1.0
        self.best_state: dict[str, Tensor] = {}
        self.checks: list[dict[str, float]] = []
        self.stopped_at: int | None = None

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def pgd_accuracy(self, model: nn.Module) -> float:
        """Robust accuracy of ``model`` on the held-out batch (patched in tests to force a collapse)."""
        x_adv = _in_eval(model, self.attack, model, self.x, self.y)
        mode = model.training
        model.eval()
        with torch.no_grad():
            acc = (model(x_adv).argmax(1) == self.y).float().mean().item()
        model.train(mode)
        return acc

    def check(self, model: nn.Module, step: int) -> bool:
        """Check after optimizer step ``step`` (1-based); True (and the best weights restored) = stop."""
        acc = self.pgd_accuracy(model)
        self.checks.append({"step": step, "pgd_accuracy": acc})
        if acc > self.best:
            self.best = acc
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif self.best - acc > self.config.co_guard_drop:
            model.load_state_dict(self.best_state)
            self.stopped_at = step
            return True
        return False

    def due(self, step: int, end_of_epoch: bool) -> bool:
        every = self.config.co_guard_every
        return end_of_epoch if every <= 0 else step % every == 0

    # -- resumable state (see qrobust.train._save_state) --
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"co_guard.best.{k}": v.cpu().contiguous() for k, v in self.best_state.items()}
        return tensors, {"best_pgd_accuracy": self.best, "stopped_at_step": self.stopped_at,
                         "checks": self.checks, "held_out": len(self.y)}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        prefix = "co_guard.best."
        self.best_state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.best = float(meta.get("best_pgd_accuracy", -1.0))
        self.stopped_at = meta.get("stopped_at_step")
        self.checks = list(meta.get("checks", []))


def setup_training(config: TrainConfig, data: Split, generator: torch.Generator, device: torch.device,
                   adversary: Adversary | None = None) -> tuple[Objective, COGuard | None, Split]:
    """What :func:`qrobust.train.train` needs for ``config.adv_method``: the objective, the guard (if
    ``co_guard``) and the training split without the guard's held-out images (its last ones)."""
    if adversary is not None:
        raise QrobustError("give either an adversary callable or config.adv_method, not both")
    if not config.adv_method:  # checked here, not in validate(): TOML tables validate key by key
        raise QrobustError("co_guard watches adversarial training: set adv_method too (e.g. fgsm_rs)")
    objective = make_objective(config, generator)
    if not config.co_guard:
        return objective, None, data
    n = config.co_guard_samples
    if n >= len(data):
        raise QrobustError(f"co_guard_samples ({n}) must be smaller than the training set ({len(data)}); "
                           "lower it or train on more images")
    x, y = Split(data.x[-n:], data.y[-n:], data.name).tensors(device)
    return objective, COGuard(config, x, y), Split(data.x[:-n], data.y[:-n], data.name)
