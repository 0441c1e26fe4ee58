"""Training loop (Adam), with EMPIR label smoothing, optional adversarial training, and resume.

:func:`train_to_checkpoint` is the one way to train a model into a checkpoint (CLI, recipes, experiments):
train resumably, save atomically, drop the train state.

Deterministic for a given seed on a given device. With ``state_dir`` the loop saves its full
state (weights, optimizer, RNG, history) after every epoch, atomically, and resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qrobust import distributed as dist
from qrobust.adversary import setup_training, training_loss
from qrobust.checkpoint import (
    check_checkpoint_target,
    check_model_data,
    checkpoint_bytes,
    save_checkpoint,
    train_state_dir,
)
from qrobust.data import Dataset, Split
from qrobust.errors import QrobustError
from qrobust.evaluate import accuracy
from qrobust.train_config import Adversary, EpochRecord, TrainConfig, TrainResult
from qrobust.utils import atomic_write_json, check_free_space, show_progress
from qrobust.version import __version__


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
                       "adversary": adv, "version": __version__}, sort_keys=True, default=str)


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
        loss = training_loss(logits, y, config.label_smoothing)
    if adversary is not None:
        model.eval()
        x_adv = adversary(model, x, y).detach()
        model.train()
        adv_loss = training_loss(model(x_adv), y, config.label_smoothing)
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
    # under torchrun: DistributedDataParallel, gradients averaged over the ranks
    net = dist.ddp_model(model, device, adversarial=bool(adversary or config.adv_method or config.co_guard))
    data = train_split.head(config.max_train) if config.max_train else train_split
    objective = guard = None
    if config.adv_method or config.co_guard:  # imported here: qrobust.adversary imports this module
        objective, guard, data = setup_training(config, data, gen, device, adversary)
    sdir = Path(state_dir) if state_dir is not None else None
    fingerprint = _fingerprint(model, config, data, adversary) if sdir is not None else ""
    start, result = _resume(sdir, model, opt, gen, fingerprint, guard)
    x_test = y_test = None
    if test_split is not None:
        x_test, y_test = test_split.tensors(device)
    steps_per_epoch = dist.steps_per_epoch(len(data), config.batch_size)
    for epoch in range(start, config.epochs if guard is None or not guard.stopped else start):
        t0 = time.perf_counter()
        model.train()
        batches = dist.train_batches(data, config, epoch=epoch, generator=gen, device=device)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                           leave=False)
        adv = adversary if adversary is not None and epoch >= config.adv_start_epoch else None
        obj = objective if objective is not None and epoch >= config.adv_start_epoch else None
        total_loss, correct, seen = dist.sum_over_ranks(*_run_epoch(net, opt, batches, config, epoch,
                                                                     steps_per_epoch, adv, obj, guard))
        seconds = time.perf_counter() - t0
        model.eval()
        test_acc = accuracy(model, x_test, y_test) if x_test is not None else float("nan")
        record = EpochRecord(epoch + 1, total_loss / max(seen, 1), correct / max(seen, 1), test_acc, seconds,
                             seen / seconds if seconds > 0 else float("nan"))
        result.history.append(record)
        extra = {}
        if guard is not None:
            extra, result.co_guard = guard.state()
        if sdir is not None and dist.is_main():  # under torchrun rank 0 writes the state
            _save_state(sdir, model, opt, gen, result, epoch + 1, fingerprint, extra)
        if on_epoch is not None:
            on_epoch(record)
        if guard is not None and guard.stopped:
            break
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return result


def train_to_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    test: Split | None = None,
    info: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    adversary: Adversary | None = None,
    progress: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``model`` on ``data.train`` and save it as checkpoint ``directory``.

    Interrupted? Call again with the same arguments: training resumes from the last finished epoch
    (state in :func:`train_state_dir`, removed once the checkpoint is written). ``test`` (default
    ``data.test``) gives the per-epoch test accuracy. ``info`` goes into ``config.json``; its
    ``train`` entry, if any, replaces the recorded training settings.
    """
    directory = check_checkpoint_target(directory, overwrite=overwrite)  # before hours of training
    check_model_data(model, data)
    check_free_space(directory.parent, checkpoint_bytes(model, with_state=True), f"checkpoint {directory}")
    test = data.test if test is None else test
    state = train_state_dir(directory)
    result = train(model, data.train, test, config, device=device, adversary=adversary, state_dir=state,
                   progress=show_progress(progress), on_epoch=on_epoch)
    record = {"train": asdict(config), **(info or {}), **result.as_dict(), "test_samples": len(test)}
    if dist.is_main():  # under torchrun rank 0 writes the checkpoint; the others wait for it
        save_checkpoint(directory, model, record, overwrite=overwrite)
        shutil.rmtree(state, ignore_errors=True)
    dist.barrier()
    return result
