"""Safe checkpoints: ``model.safetensors`` plus ``config.json``; loading never unpickles.

The JSON records how to rebuild the model (registry name and options), the SHA-256 of the
weights, and what produced them. A checkpoint directory is written to a temporary sibling and
renamed into place, so a crash never leaves half a checkpoint, and an existing one is only
replaced when the caller asks for it. :func:`qrobust.train.train_to_checkpoint` trains into one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from qrobust.errors import QrobustError
from qrobust.models import create_model
from qrobust.version import __version__

if TYPE_CHECKING:
    from qrobust.data import Dataset, Split

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "qrobust-checkpoint/1"


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 2**20  # a safetensors header is a few KB; anything this large is not one of ours


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _finite_json(obj: Any) -> Any:
    """NaN/inf -> null, so config.json stays valid JSON (``--epochs 0`` has no test accuracy)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_json(v) for v in obj]
    return obj


def is_checkpoint_dir(directory: str | os.PathLike) -> bool:
    """True for a folder qrobust wrote: only ``model.safetensors`` and a qrobust ``config.json``.

    ``--force`` replaces only such a folder; anything else (a thesis, a source tree, ``.``) is the
    user's and is never deleted.
    """
    directory = Path(directory)
    try:
        names = {e.name for e in os.scandir(directory)}
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return names <= {WEIGHTS, CONFIG} and isinstance(config, dict) and config.get("format") == FORMAT


def check_checkpoint_target(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output that exists (without ``overwrite``), that is not a checkpoint
    qrobust wrote (even with ``overwrite``), or whose parent is not writable; returns the resolved path."""
    from qrobust.utils import check_writable_dir

    directory = Path(directory).expanduser().resolve()  # `.` and symlinks: the real folder
    if directory.is_dir() and not any(directory.iterdir()):
        pass  # an empty folder: nothing to lose, nothing to ask
    elif directory.exists():
        if not directory.is_dir():
            raise QrobustError(f"output {directory} exists and is not a checkpoint folder; choose a new "
                               "--out (qrobust never replaces files it did not write)")
        if not is_checkpoint_dir(directory):
            raise QrobustError(f"output {directory} is an existing folder that is not a qrobust checkpoint; "
                               "--force only replaces checkpoints qrobust wrote. Choose a new --out (e.g. "
                               f"{directory / 'ckpt'})")
        if not overwrite:
            raise QrobustError(f"checkpoint {directory} already exists; pass --force (overwrite=True) to "
                               "replace it or choose another --out")
    check_writable_dir(directory.parent)
    return directory


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, info: dict[str, Any] | None = None,
                    *, overwrite: bool = False) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/config.json`` atomically."""
    cfg = getattr(model, "qrobust_config", None)
    if cfg is None:
        raise QrobustError("model was not built with qrobust.models.create_model, so it cannot be rebuilt "
                           "on load")
    directory = check_checkpoint_target(directory, overwrite=overwrite)
    parent = directory.parent
    try:
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
        config = {
            **(info or {}),  # first, so caller info can never shadow the fields below
            "format": FORMAT,
            "qrobust_version": __version__,
            "model": cfg,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
        text = json.dumps(_finite_json(config), indent=2, sort_keys=True, allow_nan=False) + "\n"
        (tmp / WEIGHTS).write_bytes(blob)
        (tmp / CONFIG).write_text(text)
        if directory.exists():
            old = parent / f".{directory.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QrobustError(f"cannot write checkpoint {directory}: {exc.strerror or exc}; nothing was "
                           "replaced. Free disk space or choose another --out") from exc
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
    if path.stat().st_size > _MAX_HEADER:
        raise QrobustError(f"{path} is {path.stat().st_size} bytes, far too large for a checkpoint "
                           "description; the checkpoint is corrupt")
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


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file, checked against the file size, without reading the tensors.

    A 40 GB file that is not the model's weights is refused after reading a few KB, not 40 GB.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or not 2 <= n <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"header size {n} does not fit a {size}-byte file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, t in header.items():
            if name == "__metadata__":
                continue
            begin, stop = t["data_offsets"]
            count = math.prod(t["shape"]) * _DTYPE_BYTES[t["dtype"]]
            if stop - begin != count or begin < 0:
                raise ValueError(f"tensor {name}: {stop - begin} bytes for shape {t['shape']} {t['dtype']}")
            end = max(end, stop)
        if 8 + n + end != size:
            raise ValueError(f"the header describes {8 + n + end} bytes but the file has {size}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QrobustError(f"{path} is not a valid safetensors file ({exc}); the checkpoint is corrupt. "
                           "Retrain or restore it") from exc
    return header


def _check_header(directory: Path, header: dict[str, Any], model: nn.Module, spec: dict[str, Any]) -> None:
    """The weights must be for this model: its description and its tensor names and shapes."""
    meta = header.get("__metadata__") or {}
    saved_spec = meta.get("model") if isinstance(meta, dict) else None
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
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}")
        if wrong:
            parts.append("; ".join(f"{k}: file {found[k]} vs model {expected[k]}" for k in wrong[:5]))
        raise QrobustError(f"weights in {directory} do not match the model described in {CONFIG} "
                           f"({spec['name']} {spec.get('kwargs', {})}): {'; '.join(parts)}")


def load_checkpoint(directory: str | os.PathLike, device: torch.device | str = "cpu", *,
                    trust_unverified: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from ``config.json`` and load verified weights; returns ``(model, config)``.

    Checks, in order: the description; the file size against the model's (a 40 GB file is refused
    unread); the SHA-256 recorded at save time (required: qrobust always writes it, so only a
    hand-edited checkpoint lacks it; ``trust_unverified=True`` / ``--trust-unverified`` loads one
    anyway); the safetensors header against the file size and the model's tensor names and shapes;
    finally that every weight is finite.
    """
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise QrobustError(f"checkpoint {directory} has no {WEIGHTS}")
    recorded = config.get("weights_sha256")
    if recorded is None and not trust_unverified:
        raise QrobustError(f"{directory / CONFIG} records no weights_sha256, so the weights cannot be "
                           "verified (qrobust always records it; the checkpoint was edited by hand). "
                           "Restore the original checkpoint, or pass --trust-unverified if you know where "
                           "it came from")
    spec = config["model"]
    model = create_model(spec["name"], **spec.get("kwargs", {}))
    size, need = weights.stat().st_size, checkpoint_bytes(model)
    if size > need + _MAX_HEADER:  # never read gigabytes that cannot be this model's weights
        raise QrobustError(f"{weights} is {size / 2**20:.0f} MB but the weights of {spec['name']} take "
                           f"{need / 2**20:.0f} MB; it is not this checkpoint's weights file. Retrain or "
                           "restore the checkpoint")
    blob = weights.read_bytes()
    if recorded is not None and recorded != hashlib.sha256(blob).hexdigest():
        raise QrobustError(f"{weights} does not match the SHA-256 recorded in {CONFIG}; the file is corrupt "
                           "or was replaced. Retrain or restore the checkpoint")
    _check_header(directory, read_safetensors_header(weights), model, spec)
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise QrobustError(f"{weights} is not a valid safetensors file ({exc})") from exc
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise QrobustError(f"{weights} holds NaN or infinite values in {', '.join(bad[:5])}; the model is "
                           "broken (diverged training or a damaged file). Retrain or restore it")
    model.load_state_dict(tensors)
    model.to(device).eval()
    return model, config


def model_classes(model: nn.Module, split: Split) -> int:
    """How many classes ``model`` predicts (one forward pass on one image of ``split``)."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        classes = model(split.head(1).tensors(device)[0]).shape[1]
    model.train(was_training)
    return int(classes)


def check_labels(model: nn.Module, split: Split, classes: int | None = None) -> None:
    """Refuse labels the model cannot predict: accuracy on them is 0% by construction, not a result."""
    if len(split) == 0:
        raise QrobustError(f"{split.name} holds no images; use a dataset with a test split")
    spec = getattr(model, "qrobust_config", None) or {}
    name = spec.get("name", type(model).__name__)
    classes = model_classes(model, split) if classes is None else classes
    if split.num_classes > classes:
        raise QrobustError(f"{split.name} has labels up to {split.num_classes - 1} but {name} "
                           f"predicts {classes} classes (0-{classes - 1}); use a dataset whose labels "
                           "match the model's classes")


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
    classes = model_classes(model, data.test)
    for split in (data.train, data.test):
        check_labels(model, split, classes)


def checkpoint_bytes(model: nn.Module, *, with_state: bool = False) -> int:
    """Disk a checkpoint needs; the train state adds Adam's two moments and a copy being replaced."""
    n = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    return n * (5 if with_state else 1) + 2**20


def train_state_dir(directory: str | os.PathLike) -> Path:
    """Where an unfinished training of ``directory`` keeps its per-epoch state (a hidden sibling)."""
    directory = Path(directory).expanduser().resolve()  # `--out .` has no name until resolved
    return directory.parent / f".{directory.name}.train-state"
