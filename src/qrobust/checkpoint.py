"""Safe checkpoints: ``model.safetensors`` plus ``config.json``; loading never unpickles.

The JSON records how to rebuild the model (registry name and options), the SHA-256 of the
weights, and what produced them. A checkpoint directory is written to a temporary sibling and
renamed into place, so a crash never leaves half a checkpoint, and an existing one is only
replaced when the caller asks for it. :func:`train_to_checkpoint` is the one way to train a model
into a checkpoint (CLI, recipes, experiments): train resumably, save atomically, drop the train state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import qrobust
from qrobust.errors import QrobustError
from qrobust.models import create_model
from qrobust.utils import show_progress

if TYPE_CHECKING:
    from qrobust.data import Dataset, Split
    from qrobust.train import Adversary, EpochRecord, TrainConfig, TrainResult

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "qrobust-checkpoint/1"


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, info: dict[str, Any] | None = None,
                    *, overwrite: bool = False) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/config.json`` atomically."""
    directory = Path(directory)
    cfg = getattr(model, "qrobust_config", None)
    if cfg is None:
        raise QrobustError("model was not built with qrobust.models.create_model, so it cannot be rebuilt "
                           "on load")
    if directory.exists() and not overwrite:
        raise QrobustError(f"checkpoint {directory} already exists; pass --force (overwrite=True) to replace "
                           "it")
    parent = directory.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}.", suffix=".tmp"))
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary shareable directory
    except OSError as exc:
        raise QrobustError(f"cannot write checkpoint into {parent}: {exc.strerror}; choose another "
                           "--out") from exc
    try:
        # The weights carry their own model description too, so a config.json edited or swapped to
        # describe a different model (same tensor shapes, other bits) is detected on load.
        meta = {"format": FORMAT, "model": json.dumps(cfg, sort_keys=True)}
        blob = st_save(_state_tensors(model), metadata=meta)
        (tmp / WEIGHTS).write_bytes(blob)
        config = {
            **(info or {}),  # first, so caller info can never shadow the fields below
            "format": FORMAT,
            "qrobust_version": qrobust.__version__,
            "model": cfg,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            old = parent / f".{directory.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise QrobustError(f"checkpoint {directory} does not exist (expected a directory with {WEIGHTS} and "
                           f"{CONFIG})")
    path = directory / CONFIG
    if not path.is_file():
        raise QrobustError(f"checkpoint {directory} has no {CONFIG}; it was not written by qrobust")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QrobustError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise QrobustError(f"{path} is not a qrobust checkpoint description (format {FORMAT!r} expected)")
    spec = config["model"]
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
            and isinstance(spec.get("kwargs", {}), dict)):
        raise QrobustError(f"{path}: field 'model' must be {{\"name\": str, \"kwargs\": {{...}}}}, got "
                           f"{spec!r}; the checkpoint is corrupt")
    return config


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header size, then JSON)."""
    try:
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + size])
        meta = header.get("__metadata__") or {}
        return meta if isinstance(meta, dict) else {}
    except (ValueError, AttributeError):
        return {}


def load_checkpoint(directory: str | os.PathLike, device: torch.device | str = "cpu",
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from ``config.json`` and load verified weights; returns ``(model, config)``."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise QrobustError(f"checkpoint {directory} has no {WEIGHTS}")
    blob = weights.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if config.get("weights_sha256") not in (None, digest):
        raise QrobustError(f"{weights} does not match the SHA-256 recorded in {CONFIG}; the file is corrupt "
                           "or was replaced. Retrain or restore the checkpoint")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise QrobustError(f"{weights} is not a valid safetensors file ({exc})") from exc
    spec = config["model"]
    saved_spec = _safetensors_metadata(blob).get("model")
    if saved_spec is not None:
        try:
            saved = json.loads(saved_spec)
        except ValueError:
            saved = None
        if saved != spec:
            raise QrobustError(
                f"{CONFIG} in {directory} describes {spec.get('name')} {spec.get('kwargs', {})} but the "
                f"weights were saved for {saved_spec}; restore the original {CONFIG} or retrain"
            )
    model = create_model(spec["name"], **spec.get("kwargs", {}))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}")
        if wrong:
            parts.append("; ".join(f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                                   for k in wrong[:5]))
        raise QrobustError(f"weights in {directory} do not match the model described in {CONFIG} "
                           f"({spec['name']} {spec.get('kwargs', {})}): {'; '.join(parts)}")
    model.load_state_dict(tensors)
    model.to(device).eval()
    return model, config


def check_model_data(model: nn.Module, data: Dataset) -> None:
    """Refuse a dataset whose image shape or label range does not fit the model, before any training."""
    spec = getattr(model, "qrobust_config", None) or {}
    name = spec.get("name", type(model).__name__)
    shape = tuple(spec.get("input_shape", data.image_shape))
    if tuple(data.image_shape) != shape:
        raise QrobustError(f"dataset {data.name} has images of shape {data.image_shape} but {name} "
                           f"expects {shape}; pick a matching model (--model) or dataset (--data)")
    for split in (data.train, data.test):
        if len(split) == 0:
            raise QrobustError(f"{split.name} holds no images; use a dataset with training and test images")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        classes = model(data.test.head(1).tensors()[0]).shape[1]
    model.train(was_training)
    for split in (data.train, data.test):
        if split.num_classes > classes:
            raise QrobustError(f"{split.name} has labels up to {split.num_classes - 1} but {name} "
                               f"predicts {classes} classes (0-{classes - 1}); use a dataset with at most "
                               f"{classes} classes")


def train_state_dir(directory: str | os.PathLike) -> Path:
    """Where an unfinished training of ``directory`` keeps its per-epoch state (a hidden sibling)."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}.train-state"


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
    from qrobust.train import train

    directory = Path(directory)
    if directory.exists() and not overwrite:  # before hours of training, not after
        raise QrobustError(f"checkpoint {directory} already exists; pass --force (overwrite=True) to replace "
                           "it")
    check_model_data(model, data)
    test = data.test if test is None else test
    state = train_state_dir(directory)
    result = train(model, data.train, test, config, device=device, adversary=adversary, state_dir=state,
                   progress=show_progress(progress), on_epoch=on_epoch)
    record = {"train": asdict(config), **(info or {}), **result.as_dict(), "test_samples": len(test)}
    save_checkpoint(directory, model, record, overwrite=overwrite)
    shutil.rmtree(state, ignore_errors=True)
    return result
