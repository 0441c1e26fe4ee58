"""The experiment file's schema: the specs it parses into and the checker every key goes through.

Split from :mod:`qrobust.experiment.config` (which parses the sections): the dataclasses, the
constants, ``--set`` overrides, and :class:`Checker`, whose messages name the offending key
(``quickstart.toml: attacks[1].eps: ...``) and which checks each value's type before anything runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import tomllib

from qrobust.ensemble import THREAT_MODELS
from qrobust.errors import QrobustError

ATTACK_RESERVED = ("name", "label", "eps", "table_eps", "models", "targets", "samples", "labels")
LABELS = ("pred", "true")
# ensemble threat models: EMPIR's own gradients, the whole ensemble through its mean softmax (Tramer et
# al.), the whole ensemble through its mean logits (does not saturate on confident members)
TARGETS = THREAT_MODELS  # ensemble threat models, defined once in qrobust.ensemble
DEFAULT_TARGETS = ("legacy", "adaptive")
UNBOUNDED_EPS = 1.0  # L-inf radius that covers all of [0, 1]: any image can be reached
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


@dataclass
class DatasetSpec:
    id: str
    source: str
    train_samples: int | None = None  # first N training images (quick runs)
    image_size: int | None = None  # ImageFolder trees: image side (default 224; reduced resolution)


@dataclass
class ModelSpec:
    """One model: trained here (``arch``), a named recipe (``recipe``) or a checkpoint (``checkpoint``)."""

    name: str
    dataset: str
    arch: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    checkpoint: str | None = None
    label: str = ""

    @property
    def kind(self) -> str:
        return "arch" if self.arch else "recipe" if self.recipe else "checkpoint"


@dataclass
class EnsembleSpec:
    name: str
    members: list[str]
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass
class AttackSpec:
    name: str  # registry name for qrobust.attacks.create_attack
    label: str  # column label in the report
    eps: list[float | None]
    table_eps: float | None
    params: dict[str, Any]
    models: list[str] | None = None  # None = every model and ensemble
    targets: list[str] | None = None  # None = the ensemble's own targets
    samples: int | None = None
    labels: str = "pred"  # what an untargeted attack moves away from: the model's prediction or the truth

    @property
    def single_step(self) -> bool:
        return self.name == "fgsm"

    def applies_to(self, target: str) -> bool:
        """Does this attack run on model or ensemble ``target`` (its ``models`` list, if any)?"""
        return self.models is None or target in self.models


@dataclass
class DetectionSpec:
    models: list[str]
    attacks: list[str]  # attack labels
    mc_samples: int = 50
    samples: int | None = None
    eps: float | None = None  # default: each attack's table_eps


@dataclass
class ExperimentConfig:
    name: str
    source: str  # file name, for messages
    output: str
    seed: int
    samples: int
    batch_size: int
    device: str
    data_root: str | None
    zoo: str | None
    train: dict[str, Any]
    datasets: dict[str, DatasetSpec]
    models: list[ModelSpec]
    ensembles: list[EnsembleSpec]
    attacks: list[AttackSpec]
    detection: DetectionSpec | None
    sanity: dict[str, float]
    raw: dict[str, Any]

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def ensemble(self, name: str) -> EnsembleSpec:
        return next(e for e in self.ensembles if e.name == name)

    def attack(self, label: str) -> AttackSpec:
        return next(a for a in self.attacks if a.label == label)

    @property
    def output_dir(self) -> Path:
        return Path(self.output)


SANITY_DEFAULTS = {"near_zero": 0.05, "tolerance": 0.0, "unbounded_eps": UNBOUNDED_EPS}


class Checker:
    """Collects the file name so every message starts with ``file: key.path:``; one method per type."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> QrobustError:
        return QrobustError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def tables(self, value: Any, key: str) -> list[tuple[str, dict[str, Any]]]:
        """An array of tables (``[[key]]``) as (path, table) pairs, each checked to be a table."""
        if not isinstance(value, list):
            raise self.fail(key, f"must be an array of tables ([[{key}]])")
        return [(f"{key}[{i}]", self.table(item, f"{key}[{i}]")) for i, item in enumerate(value)]

    def table(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a table, got {_tname(value)}")
        return value

    def unknown(self, table: dict[str, Any], allowed: tuple[str, ...], path: str) -> None:
        extra = sorted(set(table) - set(allowed))
        if extra:
            where = f"{path}.{extra[0]}" if path else extra[0]
            raise self.fail(where, f"unknown key; allowed here: {', '.join(allowed)}")

    def string(self, value: Any, path: str, *, ident: bool = False) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"must be a non-empty string, got {_tname(value)}")
        if ident and not _ID.match(value):
            raise self.fail(path, f"{value!r} must be a simple name (letters, digits, _ . + -)")
        return value

    def integer(self, value: Any, path: str, *, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(path, f"must be a whole number >= {minimum}, got {value!r}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {value!r}")
        return value

    def number(self, value: Any, path: str, *, minimum: float = 0.0) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < minimum
        ):
            raise self.fail(path, f"must be a number >= {minimum:g}, got {value!r}")
        return float(value)

    def like(self, value: Any, default: Any, path: str) -> Any:
        """``value`` must have the type of the option's ``default`` (a bool for a flag, a whole number for
        a count, ...): a string where a flag belongs would pass the option through and misbehave later."""
        if default is None or isinstance(default, bool):
            if default is not None and not isinstance(value, bool):
                raise self.fail(path, f"must be true or false, got {_tname(value)}")
            return value
        if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(path, f"must be a whole number, got {_tname(value)}")
        if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise self.fail(path, f"must be a number, got {_tname(value)}")
        if isinstance(default, str) and not isinstance(value, str):
            raise self.fail(path, f"must be a string, got {_tname(value)}")
        if isinstance(default, tuple | list) and not isinstance(value, list):
            raise self.fail(path, f"must be a list, got {_tname(value)}")
        return value

    def names(self, value: Any, path: str) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise self.fail(path, f"must be a name or a non-empty list of names, got {value!r}")
        return list(value)


def _tname(value: Any) -> str:
    return {
        dict: "a table",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__) + (f" ({value!r})" if not isinstance(value, dict | list) else "")


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (``0.3``, ``[0.1, 0.2]``, ``true``, ``"x"``), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``key.path=value`` (``attacks.0.eps=[0.1]``, ``data=/path/mnist.npz``) to the parsed document."""
    if "=" not in assignment:
        raise QrobustError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set samples=100")
    key, text = assignment.split("=", 1)
    assign(raw, key.strip(), parse_value(text.strip()))


def assign(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted ``key`` (list elements by index) in the parsed document; ``data`` is a shorthand."""
    if key == "data":  # shorthand: the source of the (only) dataset
        datasets = raw.get("datasets")
        if isinstance(datasets, dict) and datasets:
            if len(datasets) != 1:
                raise QrobustError(
                    f"--set data=...: the experiment has {len(datasets)} datasets "
                    f"({', '.join(datasets)}); use --set datasets.<id>.source=..."
                )
            only = next(iter(datasets.values()))
            if isinstance(only, dict):
                only["source"] = value
                return
        raw["data"] = value
        return
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise QrobustError(f"--set {key}: {where}: no such list element (the list has {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise QrobustError(f"--set {key}: {'.'.join(parts[:i])} is not a table or list")


def train_keys() -> tuple[str, ...]:
    """The keys of a ``train`` table: :class:`~qrobust.train_config.TrainConfig`'s fields (cannot drift)."""
    from qrobust.train_config import TrainConfig

    return tuple(f.name for f in fields(TrainConfig))


_AT_LEAST_ONE = ("batch_size", "max_train")
_POSITIVE = ("lr", "adam_eps")


def train_table(c: Checker, value: Any, path: str) -> dict[str, Any]:
    """Check each key by its :class:`TrainConfig` field type, then by ``TrainConfig.validate``."""
    from qrobust.train_config import TrainConfig

    table = c.table(value, path)
    c.unknown(table, train_keys(), path)
    types = get_type_hints(TrainConfig)
    out: dict[str, Any] = {}
    for k, v in table.items():
        kind = types[k]
        if kind is str:
            out[k] = c.string(v, f"{path}.{k}")
        elif kind is bool:  # before int: a TOML true is no number of epochs
            out[k] = c.boolean(v, f"{path}.{k}")
        elif kind is int or int in get_args(kind):
            out[k] = c.integer(v, f"{path}.{k}", minimum=1 if k in _AT_LEAST_ONE else 0)
        else:
            out[k] = c.number(v, f"{path}.{k}")
            if k in _POSITIVE and out[k] <= 0:
                raise c.fail(f"{path}.{k}", f"must be positive, got {v}")
        try:  # one key at a time, so the message names it
            TrainConfig(**{k: out[k]}).validate()
        except QrobustError as exc:
            raise c.fail(f"{path}.{k}", str(exc)) from exc
    return out
