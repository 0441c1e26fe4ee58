"""The embedded result store: one SQLite file per output directory, keyed by content hashes.

Each finished unit of work (a trained model, a clean or adversarial accuracy, a detection run) is
written in its own transaction under a unique key, a hash of everything that produced it — including
the version of the code that computed it (``Attack.version``, the detection pipeline's version), so a
result computed before a change to that code is not reused after it. A rerun
skips keys already present; a run killed at any point (even SIGKILL) loses at most the unit in
flight, because SQLite's write-ahead log makes each committed transaction durable and atomic.
Plain ``INSERT`` (not ``INSERT OR REPLACE``) makes a duplicate a loud error, never a silent redo.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from qrobust.errors import QrobustError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    spec TEXT NOT NULL,
    info TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    attack TEXT NOT NULL,
    eps REAL,
    accuracy REAL,
    n INTEGER NOT NULL,
    record TEXT NOT NULL,
    seconds REAL NOT NULL,
    created_at REAL NOT NULL
);
"""


def canonical_json(obj: Any) -> str:
    """Deterministic JSON for hashing: sorted keys, no spaces, floats normalized (0 and 0.0 agree)."""
    return json.dumps(_normalize(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _normalize(obj: Any) -> Any:
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return repr(obj)
        return int(obj) if obj.is_integer() else obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, dict):
        return {str(k): _normalize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_normalize(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot hash {type(obj).__name__}: {obj!r}")


def stable_hash(obj: Any) -> str:
    """SHA-256 (hex) of :func:`canonical_json` — the cache key of whatever ``obj`` describes."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


class ResultStore:
    """SQLite (WAL) store of trained models and results; use as a context manager."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise QrobustError(
                f"cannot open the result store {self.path}: {exc}; choose another output"
            ) from exc
        try:
            self._check_own()  # read-only: a database that is not ours is refused untouched
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_SCHEMA)
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise QrobustError(
                    f"{self.path} was written by another qrobust store format ({row[0]}); "
                    "use a fresh output directory"
                )
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise QrobustError(
                f"{self.path} is not a qrobust result store ({exc}); use another output"
            ) from exc

    def _check_own(self) -> None:
        try:
            _refuse_foreign(self.conn, self.path)
        except QrobustError:
            self.conn.close()
            raise

    @classmethod
    def verify(cls, path: str | os.PathLike) -> None:
        """Refuse, without creating or changing anything, a file at ``path`` that this store would refuse
        (another program's database, another store format, not SQLite): ``qrobust run --check``."""
        path = Path(path)
        if not path.exists():
            return
        if path.is_dir():
            raise QrobustError(f"{path} is a directory, not a result store; use another output")
        try:
            # read-only and immutable: no -wal / -shm files appear beside it
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        except sqlite3.Error as exc:
            raise QrobustError(f"cannot open the result store {path}: {exc}; choose another output") from exc
        try:
            if _refuse_foreign(conn, path):
                row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if int(row[0]) != SCHEMA_VERSION:
                    raise QrobustError(f"{path} was written by another qrobust store format ({row[0]}); use "
                                       "a fresh output directory")
        except sqlite3.DatabaseError as exc:
            raise QrobustError(f"{path} is not a qrobust result store ({exc}); use another output") from exc
        finally:
            conn.close()

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    # -- models ----------------------------------------------------------------------------------
    def get_model(self, key: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT key, name, path, spec, info, created_at FROM models WHERE key=?", (key,)
        ).fetchone()
        if row is None:
            return None
        return {
            "key": row[0],
            "name": row[1],
            "path": row[2],
            "spec": json.loads(row[3]),
            "info": json.loads(row[4]),
            "created_at": row[5],
        }

    def put_model(self, key: str, name: str, path: str, spec: dict[str, Any], info: dict[str, Any]) -> None:
        with self._transaction():
            self.conn.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?)",
                (
                    key,
                    name,
                    path,
                    json.dumps(spec, sort_keys=True),
                    json.dumps(info, sort_keys=True),
                    time.time(),
                ),
            )

    # -- results ---------------------------------------------------------------------------------
    def has_result(self, key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM results WHERE key=?", (key,)).fetchone() is not None

    def put_result(self, record: dict[str, Any]) -> None:
        """Insert one finished unit; ``record`` needs key, kind, target, attack, eps, accuracy, n, seconds."""
        with self._transaction():
            self.conn.execute(
                "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record["key"],
                    record["kind"],
                    record["target"],
                    record["attack"],
                    record.get("eps"),
                    record.get("accuracy"),
                    int(record["n"]),
                    json.dumps(record, sort_keys=True),
                    float(record.get("seconds", 0.0)),
                    time.time(),
                ),
            )

    def get_result(self, key: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT record, created_at FROM results WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        return {**json.loads(row[0]), "created_at": row[1]}

    def results(self, keys: list[str] | None = None) -> list[dict[str, Any]]:
        """All stored results, or those with the given keys (in that order, missing ones skipped)."""
        if keys is None:
            rows = self.conn.execute("SELECT record, created_at FROM results ORDER BY created_at").fetchall()
            return [{**json.loads(r), "created_at": t} for r, t in rows]
        out = []
        for key in keys:
            rec = self.get_result(key)
            if rec is not None:
                out.append(rec)
        return out

    def count(self, table: str = "results") -> int:
        if table not in ("results", "models"):
            raise ValueError(table)
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def _transaction(self):
        return _Tx(self.conn)


def _refuse_foreign(conn: sqlite3.Connection, path: Path) -> bool:
    """Refuse an existing SQLite database that some other program wrote (other tables, or no
    ``meta.schema`` row), before anything creates tables or switches its journal mode. Returns whether
    the file already is a store (False: new or empty)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return False
    ours = tables <= {"meta", "models", "results"} and "meta" in tables and conn.execute(
        "SELECT 1 FROM meta WHERE key='schema'").fetchone() is not None
    if not ours:
        raise QrobustError(
            f"{path} is an SQLite database that qrobust did not write (tables: "
            f"{', '.join(sorted(tables)[:5])}); it was left untouched. Choose another output (--out)"
        )
    return True


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK``): one unit, all or nothing."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
