"""Small shared helpers: devices, seeding, atomic file writes, logging and progress output."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qrobust.errors import QrobustError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``auto|cpu|cuda[:N]|mps`` to a torch device, failing clearly if it is not available."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QrobustError(f"--device {device}: CUDA is not available on this machine; use --device cpu or "
                           "auto")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise QrobustError(f"unknown device {device!r}; use auto, cpu or cuda") from exc


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and make sure we can write there, with a message that says why not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QrobustError(f"output directory {path} exists but is a file; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QrobustError(f"cannot create output directory {path}: {exc.strerror}; choose another "
                           "--out") from exc
    try:  # a real write: os.access() says yes to root even on read-only file systems
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise QrobustError(f"output directory {path} is not writable ({exc.strerror}); choose another --out "
                           "or fix its permissions") from exc
    return path


def update_marked_section(path: str | os.PathLike, section: str, body: str, title: str | None = None) -> None:
    """Replace (or append) the block between ``<!-- BEGIN section -->`` and ``<!-- END section -->``.

    Lets several benchmark/reproduction scripts share one markdown file without clobbering each other.
    """
    path = Path(path)
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else (f"# {title}\n\n" if title else "")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    atomic_write_text(path, text)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest and callers may swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Send the library's log records (``qrobust.*`` loggers) to stderr, one plain line each.

    The library only logs; the CLI and scripts call this so a user sees what is being trained where.
    Idempotent: calling it twice does not duplicate lines.
    """
    logger = logging.getLogger("qrobust")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def show_progress(requested: bool = True) -> bool:
    """Progress bars only on a terminal: a log file or CI would record every redraw, so there callers
    print one line per epoch or unit instead."""
    return bool(requested) and sys.stderr.isatty()
