"""Reading a run's store for a results page: the newest record per cell, and a provenance stamp.

Reproduction pages (``scripts/reproduce_*.py``) render tables from the store a ``qrobust run`` wrote;
these helpers are what they share, so every page says the same things about where its numbers came from.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from qrobust.errors import QrobustError
from qrobust.experiment.store import ResultStore
from qrobust.version import __version__

Cell = tuple[str, str, str, str | None, float | None]  # kind, target, attack label, mode, eps


def cell_of(record: dict[str, Any]) -> Cell:
    eps = record.get("eps")
    return (record["kind"], record["target"], record["attack"], record.get("mode"),
            None if eps is None else round(float(eps), 6))


def latest_records(store_path: str | os.PathLike) -> dict[Cell, dict[str, Any]]:
    """The newest stored record of every cell (kind, target, attack, mode, eps) of the store.

    A store keeps every result it ever held (other sample counts, older checkpoints); a page shows
    the last one computed, and prints its ``n``.
    """
    path = Path(store_path)
    if not path.is_file():
        raise QrobustError(f"no result store at {path}; run the experiment first (qrobust run <config>) or "
                           "pass --run <output dir of that run>")
    with ResultStore(path) as store:
        records = store.results()  # oldest first
    return {cell_of(r): r for r in records}


def code_version(repo: str | os.PathLike | None = None) -> str:
    """``qrobust <version>`` plus ``git describe`` of the working tree when there is one."""
    where = Path(repo) if repo is not None else Path(__file__).resolve().parents[3]
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=where,
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    return f"qrobust {__version__}" + (f", git {described}" if described else "")


def stamp(command: str, store_path: str | os.PathLike, records: dict[Cell, dict[str, Any]]) -> str:
    """One line: the command that rendered the page, when, the code version, and when the cells ran."""
    times = [r["created_at"] for r in records.values() if r.get("created_at")]
    ran = ""
    if times:
        lo, hi = (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)) for t in (min(times), max(times)))
        ran = f"; cells computed {lo}" + (f" to {hi}" if hi != lo else "")
    versions = sorted({str(r.get("qrobust_version")) for r in records.values() if r.get("qrobust_version")})
    return (f"Rendered by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
            f"({code_version()}) from the store `{store_path}`{ran}"
            + (f" by qrobust {', '.join(versions)}" if versions else "") + ".")


def attack_settings_lines(records: dict[Cell, dict[str, Any]], skip: set[str]) -> list[str]:
    """One markdown bullet per attack: its settings as stored in its records' ``attack_config`` (what the
    code ran), leaving out the keys in ``skip`` (those a page shows elsewhere)."""
    seen: dict[str, str] = {}
    for r in records.values():
        if r["kind"] == "attack" and r["attack"] not in seen:
            cfg = r.get("attack_config", {})
            kept = [(k, v) for k, v in sorted(cfg.items()) if k not in skip and v is not None]
            seen[r["attack"]] = ", ".join(f"{k} {v}" for k, v in kept)
    return [f"- {label}: {text}" for label, text in seen.items()]
