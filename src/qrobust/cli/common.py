"""Argument helpers shared by subcommands (device, data, checkpoints, bounded numbers)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qrobust.data import Dataset


def whole_number(text: str, minimum: int) -> int:
    """An argparse type body: ``text`` as an int >= ``minimum``, with the message argparse prints."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}" if minimum == 1
                                         else f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def nonneg_int(text: str) -> int:
    return whole_number(text, 0)


def bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bits must be a whole number from 1 to 32, got {text!r}") from exc
    if not 1 <= value <= 32:
        raise argparse.ArgumentTypeError(f"bits must be from 1 to 32 (32 = full precision), got {value}")
    return value


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N] (default: "
                                                    "auto)")


def add_data(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    p.add_argument("--data", default=default,
                   help="digits (embedded, offline), mnist, fashion-mnist, cifar10, a Keras-style .npz, or "
                        "an ImageFolder directory (default: %(default)s)")
    p.add_argument("--data-root", default=None,
                   help="folder searched for <name>.npz and used by torchvision (default: $QROBUST_DATA_DIR)")
    p.add_argument("--download", action="store_true", help="let torchvision download a named dataset")


def add_checkpoint(p: argparse.ArgumentParser) -> None:
    """The positional CHECKPOINT (anything :func:`checkpoint_path` resolves) and ``--train-missing``."""
    p.add_argument("checkpoint", help="checkpoint folder, recipe name or zoo:<recipe> (pretrained zoo)")
    add_train_missing(p)
    add_trust(p)


def add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-unverified", action="store_true",
                   help="load a checkpoint whose config.json lacks the weights' SHA-256 (hand-edited; "
                        "default: refuse)")


def load_model(args: argparse.Namespace, path: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """:func:`qrobust.checkpoint.load_checkpoint` with the command's ``--trust-unverified``."""
    from qrobust.checkpoint import load_checkpoint

    return load_checkpoint(path, device, trust_unverified=bool(getattr(args, "trust_unverified", False)))


def load_test_split(args: argparse.Namespace, model: nn.Module, config: dict, n: int, device: torch.device,
                    ) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """The test images a command evaluates, validated against the model before any computation:
    image shape, pixel range, and labels the model can predict (else accuracy is 0% by construction)."""
    from qrobust.checkpoint import check_labels
    from qrobust.data import check_images, folder_image_size, load_dataset
    from qrobust.errors import QrobustError

    spec = args.data or config.get("dataset", "digits")
    data = load_dataset(spec, root=args.data_root, download=args.download,
                        image_size=folder_image_size(spec, config["model"].get("input_shape")))
    test = data.test.head(n) if n else data.test
    if len(test) == 0:
        raise QrobustError(f"{test.name} holds no images; use a dataset with a test split")
    x, y = test.tensors(device)
    check_images(x, tuple(config["model"].get("input_shape", x.shape[1:])), f"dataset {data.name}")
    check_labels(model, test)
    return data, x, y


def add_train_missing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-missing", action="store_true",
                   help="train a recipe that is not in the zoo yet (default: error saying how to get it)")


def checkpoint_path(args: argparse.Namespace, text: str | None = None, *, flag: str | None = None,
                    hint: str = "") -> Path:
    """A checkpoint argument (default ``args.checkpoint``) resolved by
    :func:`qrobust.zoo.resolve_checkpoint`; a missing recipe is trained only with ``--train-missing``."""
    from qrobust.utils import resolve_device
    from qrobust.zoo import resolve_checkpoint

    train_missing = bool(getattr(args, "train_missing", False))
    return resolve_checkpoint(
        args.checkpoint if text is None else text, flag=flag, hint=hint, train_missing=train_missing,
        data_root=getattr(args, "data_root", None),
        device=resolve_device(getattr(args, "device", None) or "auto") if train_missing else "cpu",
        progress=not getattr(args, "quiet", False),
    )


def one_line_errors(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse report a bad argument in one line (no usage dump), exit code 2 like QrobustError."""

    def error(message: str) -> NoReturn:
        p.exit(2, f"error: {p.prog}: {message}; see `{p.prog} --help`\n")

    p.error = error  # type: ignore[method-assign]
    return p
