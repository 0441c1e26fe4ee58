"""The experiment file: one TOML document describing data, models, ensembles, attacks and detection.

Parsed with :mod:`tomllib` and validated up front, so a typo fails in a second with a message that
names the offending key (``quickstart.toml: attacks[1].eps: must be a number or list of numbers >= 0``)
instead of an hour into a run. See ``docs/experiments.md`` for the reference.
"""

from __future__ import annotations

import copy
import math
import os
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


class _Checker:
    """Collects the file name so every message starts with ``file: key.path:``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> QrobustError:
        return QrobustError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

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

    def number(self, value: Any, path: str, *, minimum: float = 0.0) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < minimum
        ):
            raise self.fail(path, f"must be a number >= {minimum:g}, got {value!r}")
        return float(value)

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


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, **cli: Any) -> ExperimentConfig:
    """Read and validate an experiment file; ``overrides`` are ``--set KEY=VALUE`` strings.

    Keyword arguments ``data``, ``data_root``, ``output``, ``device``, ``samples`` mirror the CLI flags
    and win over the file (``None`` leaves the file's value).
    """
    path = Path(path)
    if not path.is_file():
        raise QrobustError(f"experiment file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise QrobustError(f"{path.name}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise QrobustError(f"{path.name}: not a UTF-8 text file") from exc
    return parse_config(raw, source=path.name, default_name=path.stem, overrides=overrides, **cli)


def parse_config(
    raw: dict[str, Any],
    *,
    source: str = "<config>",
    default_name: str = "experiment",
    overrides: list[str] | None = None,
    data: str | None = None,
    data_root: str | None = None,
    output: str | None = None,
    device: str | None = None,
    samples: int | None = None,
) -> ExperimentConfig:
    raw = copy.deepcopy(raw)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    if data is not None:
        assign(raw, "data", data)
    for key, value in (
        ("data_root", data_root),
        ("output", output),
        ("device", device),
        ("samples", samples),
    ):
        if value is not None:
            raw[key] = value
    c = _Checker(source)
    top = (
        "name",
        "output",
        "seed",
        "samples",
        "batch_size",
        "device",
        "data",
        "data_root",
        "zoo",
        "train",
        "datasets",
        "models",
        "ensembles",
        "attacks",
        "detection",
        "sanity",
    )
    c.unknown(raw, top, "")
    name = c.string(raw.get("name", default_name), "name")
    output = c.string(raw.get("output", str(Path("runs") / name)), "output")
    seed = c.integer(raw.get("seed", 0), "seed")
    n_samples = c.integer(raw.get("samples", 1000), "samples", minimum=1)
    batch_size = c.integer(raw.get("batch_size", 500), "batch_size", minimum=1)
    device = c.string(raw.get("device", "auto"), "device")
    data_root = c.string(raw["data_root"], "data_root") if raw.get("data_root") is not None else None
    zoo = c.string(raw["zoo"], "zoo") if raw.get("zoo") is not None else None
    train = _train_table(c, raw.get("train", {}), "train")

    datasets = _datasets(c, raw)
    models = _models(c, raw.get("models", []), datasets)
    ensembles = _ensembles(c, raw.get("ensembles", []), models)
    targets = [m.name for m in models] + [e.name for e in ensembles]
    attacks = _attacks(c, raw.get("attacks", []), targets)
    detection = _detection(c, raw.get("detection"), models, attacks)
    sanity = dict(SANITY_DEFAULTS)
    if "sanity" in raw:
        table = c.table(raw["sanity"], "sanity")
        c.unknown(table, tuple(SANITY_DEFAULTS), "sanity")
        for k, v in table.items():
            sanity[k] = c.number(v, f"sanity.{k}")
    if not models:
        raise c.fail("models", "the experiment needs at least one [[models]] entry")
    return ExperimentConfig(
        name,
        source,
        output,
        seed,
        n_samples,
        batch_size,
        device,
        data_root,
        zoo,
        train,
        datasets,
        models,
        ensembles,
        attacks,
        detection,
        sanity,
        raw,
    )


def train_keys() -> tuple[str, ...]:
    """The keys of a ``train`` table: :class:`qrobust.train.TrainConfig`'s fields, so they cannot drift."""
    from qrobust.train import TrainConfig

    return tuple(f.name for f in fields(TrainConfig))


_AT_LEAST_ONE = ("batch_size", "max_train")
_POSITIVE = ("lr", "adam_eps")


def _train_table(c: _Checker, value: Any, path: str) -> dict[str, Any]:
    """Check each key by its :class:`TrainConfig` field type, then by ``TrainConfig.validate``."""
    from qrobust.train import TrainConfig

    table = c.table(value, path)
    c.unknown(table, train_keys(), path)
    types = get_type_hints(TrainConfig)
    out: dict[str, Any] = {}
    for k, v in table.items():
        kind = types[k]
        if kind is str:
            out[k] = c.string(v, f"{path}.{k}")
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


def _datasets(c: _Checker, raw: dict[str, Any]) -> dict[str, DatasetSpec]:
    out: dict[str, DatasetSpec] = {}
    if "datasets" in raw:
        if "data" in raw:
            raise c.fail("data", 'give either data = "..." or [datasets.<id>] tables, not both')
        table = c.table(raw["datasets"], "datasets")
        for key, value in table.items():
            path = f"datasets.{key}"
            c.string(key, path, ident=True)
            spec = c.table(value, path)
            c.unknown(spec, ("source", "train_samples"), path)
            if "source" not in spec:
                raise c.fail(
                    f"{path}.source", "missing; digits, mnist, cifar10, a .npz path or an ImageFolder"
                )
            train_samples = spec.get("train_samples")
            out[key] = DatasetSpec(
                key,
                c.string(spec["source"], f"{path}.source"),
                c.integer(train_samples, f"{path}.train_samples", minimum=1)
                if train_samples is not None
                else None,
            )
    else:
        source = c.string(raw.get("data", "digits"), "data")
        out["data"] = DatasetSpec("data", source)
    if not out:
        raise c.fail("datasets", "define at least one dataset")
    return out


def _models(c: _Checker, value: Any, datasets: dict[str, DatasetSpec]) -> list[ModelSpec]:
    if not isinstance(value, list):
        raise c.fail("models", "must be an array of tables ([[models]])")
    out: list[ModelSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        path = f"models[{i}]"
        t = c.table(item, path)
        c.unknown(t, ("name", "label", "arch", "options", "train", "recipe", "checkpoint", "dataset"), path)
        if "name" not in t:
            raise c.fail(f"{path}.name", "missing; every model needs a unique name used in the report")
        name = c.string(t["name"], f"{path}.name", ident=True)
        if name in seen:
            raise c.fail(f"{path}.name", f"{name!r} is used twice; names must be unique")
        seen.add(name)
        sources = [k for k in ("arch", "recipe", "checkpoint") if k in t]
        if len(sources) != 1:
            raise c.fail(
                path,
                'give exactly one of arch = "..." (train here), recipe = "..." (a named '
                f'recipe) or checkpoint = "path"; got {", ".join(sources) or "none"}',
            )
        ds = t.get("dataset")
        if ds is None:
            if len(datasets) != 1:
                raise c.fail(f"{path}.dataset", f"missing; choose one of {', '.join(datasets)}")
            ds = next(iter(datasets))
        elif ds not in datasets:
            raise c.fail(f"{path}.dataset", f"unknown dataset {ds!r}; defined: {', '.join(datasets)}")
        spec = ModelSpec(name=name, dataset=ds, label=c.string(t.get("label", name), f"{path}.label"))
        if "arch" in t:
            from qrobust.models import get_entry

            spec.arch = c.string(t["arch"], f"{path}.arch")
            try:
                accepted = get_entry(spec.arch).params()
            except QrobustError as exc:
                raise c.fail(f"{path}.arch", str(exc)) from exc
            spec.options = dict(c.table(t.get("options", {}), f"{path}.options"))
            bad = sorted(set(spec.options) - set(accepted))
            if bad:
                raise c.fail(
                    f"{path}.options.{bad[0]}",
                    f"{spec.arch} does not take this option; it takes: {', '.join(sorted(accepted))}",
                )
            spec.train = _train_table(c, t.get("train", {}), f"{path}.train")
        elif "recipe" in t:
            from qrobust.recipes import RECIPES

            spec.recipe = c.string(t["recipe"], f"{path}.recipe")
            if spec.recipe not in RECIPES:
                raise c.fail(
                    f"{path}.recipe", f"unknown recipe {spec.recipe!r}; known: {', '.join(sorted(RECIPES))}"
                )
            for k in ("options",):
                if k in t:
                    raise c.fail(f"{path}.{k}", "a recipe fixes the model; use arch = ... to change options")
            spec.train = _train_table(c, t.get("train", {}), f"{path}.train")
        else:
            spec.checkpoint = c.string(t["checkpoint"], f"{path}.checkpoint")
            if spec.checkpoint.startswith("zoo:"):  # a pretrained recipe (qrobust.zoo)
                from qrobust.recipes import RECIPES

                if spec.checkpoint[4:] not in RECIPES:
                    raise c.fail(f"{path}.checkpoint", f"unknown recipe {spec.checkpoint[4:]!r}; known: "
                                 f"{', '.join(sorted(RECIPES))}")
            for k in ("options", "train"):
                if k in t:
                    raise c.fail(f"{path}.{k}", "a checkpoint is already trained; remove this key")
        out.append(spec)
    return out


def _ensembles(c: _Checker, value: Any, models: list[ModelSpec]) -> list[EnsembleSpec]:
    if not isinstance(value, list):
        raise c.fail("ensembles", "must be an array of tables ([[ensembles]])")
    names = {m.name for m in models}
    out: list[EnsembleSpec] = []
    for i, item in enumerate(value):
        path = f"ensembles[{i}]"
        t = c.table(item, path)
        c.unknown(t, ("name", "label", "members", "targets", "options"), path)
        if "name" not in t:
            raise c.fail(f"{path}.name", "missing")
        name = c.string(t["name"], f"{path}.name", ident=True)
        if name in names:
            raise c.fail(f"{path}.name", f"{name!r} is already the name of a model or ensemble")
        names.add(name)
        if "members" not in t:
            raise c.fail(
                f"{path}.members", 'missing; list the member model names, e.g. ["a4w2_1", "a4w2_2", "fp"]'
            )
        members = c.names(t["members"], f"{path}.members")
        if len(members) < 2:
            raise c.fail(f"{path}.members", "an ensemble needs at least two members")
        for m in members:
            if m not in {x.name for x in models}:
                raise c.fail(
                    f"{path}.members",
                    f"{m!r} is not a model name; models: {', '.join(x.name for x in models)}",
                )
        datasets = {next(x for x in models if x.name == m).dataset for m in members}
        if len(datasets) > 1:
            raise c.fail(
                f"{path}.members", f"members come from different datasets ({', '.join(sorted(datasets))})"
            )
        targets = c.names(t.get("targets", list(DEFAULT_TARGETS)), f"{path}.targets")
        bad = [x for x in targets if x not in TARGETS]
        if bad:
            raise c.fail(f"{path}.targets", f"unknown target {bad[0]!r}; use {', '.join(TARGETS)}")
        out.append(
            EnsembleSpec(
                name,
                members,
                targets,
                dict(c.table(t.get("options", {}), f"{path}.options")),
                c.string(t.get("label", name), f"{path}.label"),
            )
        )
    return out


def _eps_list(c: _Checker, value: Any, path: str) -> list[float]:
    msg = "must be a number or list of numbers >= 0"
    values = value if isinstance(value, list) else [value]
    if not values:
        raise c.fail(path, msg)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise c.fail(path, msg + f", got {value!r}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise c.fail(path, f"lists the same eps twice: {value!r}")
    return sorted(out)


def _attacks(c: _Checker, value: Any, targets: list[str]) -> list[AttackSpec]:
    if not isinstance(value, list):
        raise c.fail("attacks", "must be an array of tables ([[attacks]])")
    out: list[AttackSpec] = []
    labels: set[str] = set()
    for i, item in enumerate(value):
        path = f"attacks[{i}]"
        t = c.table(item, path)
        if "name" not in t:
            raise c.fail(f"{path}.name", "missing; one of fgsm, bim, pgd, cw, jsma")
        name = c.string(t["name"], f"{path}.name").lower()
        label = c.string(t.get("label", name.upper()), f"{path}.label")
        if label in labels or label.lower() == "clean":
            raise c.fail(f"{path}.label", f"{label!r} is used twice; give each attack a unique label")
        labels.add(label)
        eps: list[float | None]
        if "eps" in t:
            eps = list(_eps_list(c, t["eps"], f"{path}.eps"))
        elif name in ("cw", "jsma"):
            eps = [None]  # unbounded L2 / L0 attacks: one run, no radius
        else:
            raise c.fail(f"{path}.eps", "missing; " + "must be a number or list of numbers >= 0")
        finite = [e for e in eps if e is not None]
        if "table_eps" in t:
            table_eps = c.number(t["table_eps"], f"{path}.table_eps")
            if table_eps not in finite:
                raise c.fail(f"{path}.table_eps", f"{t['table_eps']} is not one of eps = {finite}")
        else:
            bounded = [e for e in finite if 0 < e < UNBOUNDED_EPS]
            table_eps = max(bounded) if bounded else (max(finite) if finite else None)
        models = c.names(t["models"], f"{path}.models") if "models" in t else None
        for m in models or []:
            if m not in targets:
                raise c.fail(
                    f"{path}.models", f"{m!r} is not a model or ensemble; known: {', '.join(targets)}"
                )
        tg = c.names(t["targets"], f"{path}.targets") if "targets" in t else None
        for x in tg or []:
            if x not in TARGETS:
                raise c.fail(f"{path}.targets", f"unknown target {x!r}; use {', '.join(TARGETS)}")
        samples = c.integer(t["samples"], f"{path}.samples", minimum=1) if "samples" in t else None
        labels_mode = t.get("labels", "pred")
        if labels_mode not in LABELS:
            raise c.fail(
                f"{path}.labels",
                f'must be "pred" (the model\'s own predictions, as the seeds did) or '
                f'"true", got {labels_mode!r}',
            )
        params = {k: v for k, v in t.items() if k not in ATTACK_RESERVED}
        _check_attack(c, name, params, finite[0] if finite else None, path)
        out.append(AttackSpec(name, label, eps, table_eps, params, models, tg, samples, labels_mode))
    return out


def _check_attack(c: _Checker, name: str, params: dict[str, Any], eps: float | None, path: str) -> None:
    """Build the attack once so unknown parameters fail now, with the key path (skipped if not installed)."""
    try:
        from qrobust.attacks import create_attack
    except ImportError:
        return
    kwargs = dict(params)
    if eps is not None:
        kwargs["eps"] = eps
    try:
        create_attack(name, **kwargs)
    except QrobustError as exc:
        raise c.fail(path, str(exc)) from exc
    except TypeError as exc:
        raise c.fail(path, f"bad parameters for {name}: {exc}") from exc


def _detection(
    c: _Checker, value: Any, models: list[ModelSpec], attacks: list[AttackSpec]
) -> DetectionSpec | None:
    if value is None:
        return None
    t = c.table(value, "detection")
    c.unknown(t, ("models", "attacks", "mc_samples", "samples", "eps"), "detection")
    if "models" not in t:
        raise c.fail("detection.models", "missing; list the models with dropout on at inference")
    names = c.names(t["models"], "detection.models")
    for m in names:
        if m not in {x.name for x in models}:
            raise c.fail("detection.models", f"{m!r} is not a model name (ensembles are not supported here)")
    labels = [a.label for a in attacks]
    att = c.names(t.get("attacks", labels), "detection.attacks")
    for a in att:
        if a not in labels:
            raise c.fail("detection.attacks", f"{a!r} is not an attack label; labels: {', '.join(labels)}")
    mc = c.integer(t.get("mc_samples", 50), "detection.mc_samples", minimum=2)
    samples = c.integer(t["samples"], "detection.samples", minimum=2) if "samples" in t else None
    eps = c.number(t["eps"], "detection.eps") if "eps" in t else None
    return DetectionSpec(names, att, mc, samples, eps)
