"""Small shared helpers: devices, seeding, atomic file writes, logging and progress output."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
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
    """Write a file so that readers see either the old or the new content, never a torn one.

    A full disk or a read-only folder becomes a :class:`QrobustError` naming the file; the old
    content, if any, stays intact.
    """
    path = Path(path)
    if path.is_dir():
        raise QrobustError(f"cannot write {path}: it is a directory; give a file name")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise QrobustError(f"cannot write {path}: {exc.strerror or exc}; {_remedy(exc)}") from exc
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _remedy(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space or choose an output on another disk (the previous file is intact)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose a writable output or fix the folder's permissions"
    return "choose another output"


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error that escaped: what failed, on what, and what to change."""
    where = f" {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}; {_remedy(exc)}"


def check_output_file(path: str | os.PathLike | None, flag: str) -> Path | None:
    """Refuse, before computing, an output file that is a directory or lies in an unwritable folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise QrobustError(f"{flag} {path} is a directory; give a file name (e.g. {path / 'result.json'})")
    check_writable_dir(path.parent, flag=flag)
    return path


def check_free_space(folder: str | os.PathLike, need: int, what: str) -> None:
    """Refuse up front when ``folder``'s disk cannot hold ``need`` bytes (estimated), instead of failing
    after the computation."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell; the write itself reports a full disk clearly
    if free < need:
        raise QrobustError(f"{what} needs about {need / 2**20:.0f} MB but {folder} has {free / 2**20:.0f} MB "
                           "free; free disk space or choose an output on another disk")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(need: int, what: str, remedy: str) -> None:
    """Refuse a setting whose arrays cannot fit in memory, before allocating them."""
    avail = available_memory()
    if avail is not None and need > avail:
        raise QrobustError(f"{what} needs about {need / 2**30:.1f} GB of memory but {avail / 2**30:.1f} GB "
                           f"is available; {remedy}")


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """One writer per output folder: an OS lock (``flock``) on ``folder/.qrobust.lock``, released when the
    process exits or dies, so a second run on the same output refuses at once with a clear message."""
    folder = Path(folder)
    lock = folder / ".qrobust.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): single-writer is the user's job
        yield lock
        return
    try:
        fh = open(lock, "a+")  # noqa: SIM115 - held for the whole block
    except OSError as exc:
        raise QrobustError(f"cannot create {lock}: {exc.strerror}; {_remedy(exc)}") from exc
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise QrobustError(f"{what} {folder} is in use by another qrobust run ({holder}); wait for it to "
                               "finish or choose another output (--out)") from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield lock
    finally:
        fh.close()  # closing releases the lock


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``path`` if needed and make sure we can write there, with a message that says why not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QrobustError(f"output directory {path} exists but is a file; choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QrobustError(f"cannot create output directory {path}: {exc.strerror}; choose another "
                           f"{flag}") from exc
    try:  # a real write: os.access() says yes to root even on read-only file systems
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise QrobustError(f"output directory {path} is not writable ({exc.strerror}); choose another {flag} "
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
