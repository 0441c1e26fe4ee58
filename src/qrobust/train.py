"""Training loop (Adam), with EMPIR label smoothing, optional adversarial training, and resume.

Deterministic for a given seed on a given device. With ``state_dir`` the loop saves its full
state (weights, optimizer, RNG, history) after every epoch, atomically, and resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qrobust.data import Split
from qrobust.errors import QrobustError
from qrobust.evaluate import accuracy
from qrobust.utils import atomic_write_json

Adversary = Callable[[nn.Module, Tensor, Tensor], Tensor]


LR_SCHEDULES = ("constant", "cosine", "cyclic")


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
        from qrobust.adversary import METHODS

        if self.adv_method and self.adv_method not in METHODS:
            raise QrobustError(f"adversarial training method must be one of {', '.join(METHODS)} (or empty "
                               f"for none), got {self.adv_method!r}")
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


def smoothed_targets(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """EMPIR's label smoothing: one-hot clipped to [s / (K - 1), 1 - s]."""
    low = smoothing / (num_classes - 1)
    return F.one_hot(y, num_classes).float().clamp(low, 1.0 - smoothing)


def _loss(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    if smoothing == 0:
        return F.cross_entropy(logits, y)
    target = smoothed_targets(y, logits.shape[1], smoothing)
    return -(target * F.log_softmax(logits, 1)).sum(1).mean()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam with the fused kernel where the device has one (7x faster on CPU for the 9M-weight FC)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps)


def _fingerprint(model: nn.Module, config: TrainConfig, data: Split | None = None,
                 adversary: Adversary | None = None) -> str:
    """What must not change between an interrupted run and its resumption (``epochs`` may grow): the
    model, every training setting, the training data (a hash of the arrays), the adversarial-training
    attack and the qrobust version. Anything else resumes someone else's run."""
    import qrobust

    arch = getattr(model, "qrobust_config", None) or {
        "class": type(model).__name__, "shapes": {k: list(v.shape) for k, v in model.state_dict().items()}}
    # A constant learning rate lets a finished run be extended by more epochs; a schedule cannot.
    settings = {k: v for k, v in asdict(config).items() if k != "epochs" or config.lr_schedule != "constant"}
    attack = getattr(adversary, "attack", adversary)
    adv = None
    if adversary is not None:
        name = getattr(attack, "__qualname__", type(attack).__qualname__)  # never a repr with an address
        adv = attack.config() if hasattr(attack, "config") else name
    return json.dumps({"model": arch, "train": settings, "data": None if data is None else data.digest(),
                       "adversary": adv, "version": qrobust.__version__}, sort_keys=True, default=str)


def _save_state(state_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                result: TrainResult, epoch: int, fingerprint: str,
                extra: dict[str, Tensor] | None = None) -> None:
    """One safetensors file holds weights, optimizer, RNG, progress and ``extra`` tensors (the CO guard's
    best weights), replaced atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(extra or {})
    for i, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"epoch": epoch, **result.as_dict()}
    tmp = state_dir / "train_state.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta), "fingerprint": fingerprint})
    os.replace(tmp, state_dir / "train_state.safetensors")
    atomic_write_json(state_dir / "train_state.json", meta)  # human-readable copy; the blob is authoritative


def _load_state(state_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                fingerprint: str, extra: dict[str, Tensor] | None = None) -> tuple[int, TrainResult]:
    """Restore a saved run; tensors outside model/opt/rng go into ``extra`` (filled in place)."""
    meta_path, blob_path = state_dir / "train_state.json", state_dir / "train_state.safetensors"
    if not blob_path.is_file():
        return 0, TrainResult()
    try:
        with safe_open(str(blob_path), framework="pt") as fh:
            stored = fh.metadata() or {}
        tensors = load_file(str(blob_path))
        meta = json.loads(stored["meta"]) if "meta" in stored else json.loads(meta_path.read_text())
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise QrobustError(f"training state in {state_dir} is unreadable ({exc}); delete that folder to "
                           "start over") from exc
    if stored.get("fingerprint", fingerprint) != fingerprint:
        raise QrobustError(f"{state_dir} holds an interrupted run of a different model or training "
                           "settings (model, training data, adversarial training or qrobust version differ); "
                           "rerun with the original settings to resume, or delete that folder to start over")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt_sd["state"] = state
    opt.load_state_dict(opt_sd)
    for group in opt.param_groups:  # moments in the parameters' memory layout (channels-last on CPU):
        for p in group["params"]:  # the fused Adam kernel walks them in memory order
            for name, v in opt.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    opt.state[p][name] = torch.empty_like(p).copy_(v)
    gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    result = TrainResult([EpochRecord(**r) for r in meta["history"]], meta.get("co_guard"))
    if extra is not None:
        extra.update({k: v for k, v in tensors.items() if not k.startswith(("model.", "opt.", "rng."))})
    return int(meta["epoch"]), result


def to_training_layout(model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    """Move ``model`` to ``device``; on CPU optionally to channels-last memory (``train`` restores it).

    NHWC convolutions and pooling run faster on CPU (oneDNN): 1.5x for CIFARconv, whose NCHW 3x3/2 max
    pooling alone took a quarter of the step, 5-15% for the MNIST nets. Same values up to float rounding.
    """
    model.to(device)
    if channels_last and device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, config: TrainConfig,
               adversary: Adversary | None = None, objective: Any = None) -> tuple[float, Tensor]:
    """One optimizer step on one batch; returns (loss, clean logits). The unit the speed benchmark times.

    With ``adversary`` the loss mixes in CE(x_adv) with weight ``config.adv_weight``; an ``objective``
    (a method of :mod:`qrobust.adversary`) gives the loss and the logits for the metrics itself.
    """
    if objective is not None:
        loss, logits = objective(model, x, y)
    elif adversary is not None and config.adv_weight == 1.0:  # Madry: the clean pass only feeds the metrics
        with torch.no_grad():
            logits = model(x)
        loss = None
    else:
        logits = model(x)
        loss = _loss(logits, y, config.label_smoothing)
    if adversary is not None:
        model.eval()
        x_adv = adversary(model, x, y).detach()
        model.train()
        adv_loss = _loss(model(x_adv), y, config.label_smoothing)
        w = config.adv_weight
        loss = adv_loss if loss is None else (1 - w) * loss + w * adv_loss
    value = loss.item()
    if math.isfinite(value):  # a diverged step is reported by the caller, not applied
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return value, logits.detach()


def _resume(sdir: Path | None, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
            fingerprint: str, guard: Any) -> tuple[int, TrainResult]:
    """(first epoch to train, result so far): restored from ``sdir`` when it holds this run's state."""
    if sdir is None:
        return 0, TrainResult()
    try:
        sdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QrobustError(f"cannot create training-state folder {sdir}: {exc.strerror}") from exc
    extra: dict[str, Tensor] = {}
    start, result = _load_state(sdir, model, opt, gen, fingerprint, extra)
    if guard is not None:
        guard.load(extra, result.co_guard or {})
    return start, result


def _run_epoch(model: nn.Module, opt: torch.optim.Optimizer, batches: Any, config: TrainConfig, epoch: int,
               steps_per_epoch: int, adv: Adversary | None, obj: Any, guard: Any) -> tuple[float, int, int]:
    """One epoch of steps; returns (summed loss, correct, images seen). Stops early when the
    catastrophic-overfitting guard fires (it has then restored the best weights)."""
    total_loss, correct, seen = 0.0, 0, 0
    for i, (x, y) in enumerate(batches):
        step = epoch * steps_per_epoch + i
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step, config.epochs * steps_per_epoch)
        if obj is not None:
            obj.at(step, steps_per_epoch)
        loss, logits = train_step(model, opt, x, y, config, adv, obj)
        if not math.isfinite(loss):
            raise QrobustError(f"training diverged: loss is {loss} in epoch {epoch + 1}; lower "
                               f"--lr (now {config.lr}) or check the data")
        total_loss += loss * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        if obj is not None and guard is not None and guard.due(step + 1, i + 1 == steps_per_epoch) \
                and guard.check(model, step + 1):
            break
    return total_loss, correct, seen


def train(
    model: nn.Module,
    train_split: Split,
    test_split: Split | None,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    adversary: Adversary | None = None,
    state_dir: str | os.PathLike | None = None,
    progress: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place and return per-epoch metrics.

    ``adversary(model, x, y) -> x_adv`` enables adversarial training from ``config.adv_start_epoch``
    on, with loss (CE(x) + CE(x_adv)) / 2; so does ``config.adv_method`` (:mod:`qrobust.adversary`,
    with its catastrophic-overfitting guard ``config.co_guard``).
    """
    config.validate()
    device = torch.device(device)
    to_training_layout(model, device, config.channels_last)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    opt = make_optimizer(model, config)
    data = train_split.head(config.max_train) if config.max_train else train_split
    objective = guard = None
    if config.adv_method or config.co_guard:  # imported here: qrobust.adversary imports this module
        from qrobust.adversary import setup_training

        objective, guard, data = setup_training(config, data, gen, device, adversary)
    sdir = Path(state_dir) if state_dir is not None else None
    fingerprint = _fingerprint(model, config, data, adversary) if sdir is not None else ""
    start, result = _resume(sdir, model, opt, gen, fingerprint, guard)
    x_test = y_test = None
    if test_split is not None:
        x_test, y_test = test_split.tensors(device)
    steps_per_epoch = -(-len(data) // config.batch_size)
    for epoch in range(start, config.epochs if guard is None or not guard.stopped else start):
        t0 = time.perf_counter()
        model.train()
        batches = data.batches(config.batch_size, shuffle=True, generator=gen, device=device)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                           leave=False)
        adv = adversary if adversary is not None and epoch >= config.adv_start_epoch else None
        obj = objective if objective is not None and epoch >= config.adv_start_epoch else None
        total_loss, correct, seen = _run_epoch(model, opt, batches, config, epoch, steps_per_epoch, adv, obj,
                                               guard)
        seconds = time.perf_counter() - t0
        model.eval()
        test_acc = accuracy(model, x_test, y_test) if x_test is not None else float("nan")
        record = EpochRecord(epoch + 1, total_loss / max(seen, 1), correct / max(seen, 1), test_acc, seconds,
                             seen / seconds if seconds > 0 else float("nan"))
        result.history.append(record)
        extra = {}
        if guard is not None:
            extra, result.co_guard = guard.state()
        if sdir is not None:
            _save_state(sdir, model, opt, gen, result, epoch + 1, fingerprint, extra)
        if on_epoch is not None:
            on_epoch(record)
        if guard is not None and guard.stopped:
            break
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return result
