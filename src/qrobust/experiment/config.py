"""The experiment file: one TOML document describing data, models, ensembles, attacks and detection.

Parsed with :mod:`tomllib` and validated up front, so a typo fails in a second with a message that
names the offending key (``quickstart.toml: attacks[1].eps: must be a number or list of numbers >= 0``)
instead of an hour into a run. Every option's type is checked, model options and ensemble rules are
tried, and every name that becomes a file name (experiment, attack labels) is checked to be safe and
distinct, so ``qrobust run --check`` refuses what ``qrobust run`` would. The schema (specs, checker,
overrides) lives in :mod:`qrobust.experiment.spec`. See ``docs/experiments.md`` for the reference.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import tomllib

from qrobust.errors import QrobustError
from qrobust.experiment.spec import (  # noqa: F401 - re-exported: the config's public names
    ATTACK_RESERVED,
    DEFAULT_TARGETS,
    LABELS,
    SANITY_DEFAULTS,
    TARGETS,
    UNBOUNDED_EPS,
    AttackSpec,
    Checker,
    DatasetSpec,
    DetectionSpec,
    EnsembleSpec,
    ExperimentConfig,
    ModelSpec,
    apply_override,
    assign,
    parse_value,
    train_keys,
    train_table,
)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, **cli: Any) -> ExperimentConfig:
    """Read and validate an experiment file; ``overrides`` are ``--set KEY=VALUE`` strings.

    Keyword arguments ``data``, ``data_root``, ``output``, ``device``, ``samples``, ``only`` mirror the CLI
    flags and win over the file (``None`` leaves the file's value).
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
    only: list[str] | None = None,
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
        ("only", only),
    ):
        if value is not None:
            raw[key] = value
    c = Checker(source)
    top = ("name", "output", "seed", "samples", "batch_size", "device", "data", "data_root", "zoo", "train",
           "datasets", "models", "ensembles", "attacks", "detection", "sanity", "only")
    c.unknown(raw, top, "")
    name = c.string(raw.get("name", default_name), "name", ident=True)  # runs/<name>: a safe file name
    output = c.string(raw.get("output", str(Path("runs") / name)), "output")
    seed = c.integer(raw.get("seed", 0), "seed")
    n_samples = c.integer(raw.get("samples", 1000), "samples", minimum=1)
    batch_size = c.integer(raw.get("batch_size", 500), "batch_size", minimum=1)
    device = c.string(raw.get("device", "auto"), "device")
    data_root = c.string(raw["data_root"], "data_root") if raw.get("data_root") is not None else None
    zoo = c.string(raw["zoo"], "zoo") if raw.get("zoo") is not None else None
    train = train_table(c, raw.get("train", {}), "train")

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
    if raw.get("only") is not None:
        models, ensembles, attacks, detection = _select(c, c.names(raw["only"], "only"), models, ensembles,
                                                        attacks, detection)
    return ExperimentConfig(name, source, output, seed, n_samples, batch_size, device, data_root, zoo, train,
                            datasets, models, ensembles, attacks, detection, sanity, raw)


def _datasets(c: Checker, raw: dict[str, Any]) -> dict[str, DatasetSpec]:
    out: dict[str, DatasetSpec] = {}
    if "datasets" in raw:
        if "data" in raw:
            raise c.fail("data", 'give either data = "..." or [datasets.<id>] tables, not both')
        table = c.table(raw["datasets"], "datasets")
        for key, value in table.items():
            path = f"datasets.{key}"
            c.string(key, path, ident=True)
            spec = c.table(value, path)
            c.unknown(spec, ("source", "train_samples", "image_size"), path)
            if "source" not in spec:
                raise c.fail(
                    f"{path}.source", "missing; digits, mnist, cifar10, a .npz path or an ImageFolder"
                )
            train_samples, size = spec.get("train_samples"), spec.get("image_size")
            out[key] = DatasetSpec(
                key,
                c.string(spec["source"], f"{path}.source"),
                c.integer(train_samples, f"{path}.train_samples", minimum=1)
                if train_samples is not None
                else None,
                c.integer(size, f"{path}.image_size", minimum=16) if size is not None else None,
            )
    else:
        source = c.string(raw.get("data", "digits"), "data")
        out["data"] = DatasetSpec("data", source)
    if not out:
        raise c.fail("datasets", "define at least one dataset")
    return out


def _models(c: Checker, value: Any, datasets: dict[str, DatasetSpec]) -> list[ModelSpec]:
    out: list[ModelSpec] = []
    seen: set[str] = set()
    for path, t in c.tables(value, "models"):
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
        {"arch": _arch, "recipe": _recipe, "checkpoint": _checkpoint}[sources[0]](c, t, spec, path)
        out.append(spec)
    return out


def _arch(c: Checker, t: dict[str, Any], spec: ModelSpec, path: str) -> None:
    """A model trained here: its options are typed like the family's defaults and the model is built
    once (milliseconds), so a bad value fails now rather than after other models have trained."""
    from qrobust.models import create_model, get_entry

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
    for k, v in spec.options.items():
        c.like(v, accepted[k], f"{path}.options.{k}")
    try:
        create_model(spec.arch, **spec.options)
    except (QrobustError, TypeError, ValueError) as exc:
        raise c.fail(f"{path}.options", str(exc)) from exc
    spec.train = train_table(c, t.get("train", {}), f"{path}.train")


def _recipe(c: Checker, t: dict[str, Any], spec: ModelSpec, path: str) -> None:
    from qrobust.recipes import RECIPES

    spec.recipe = c.string(t["recipe"], f"{path}.recipe")
    if spec.recipe not in RECIPES:
        raise c.fail(f"{path}.recipe", f"unknown recipe {spec.recipe!r}; known: {', '.join(sorted(RECIPES))}")
    if "options" in t:
        raise c.fail(f"{path}.options", "a recipe fixes the model; use arch = ... to change options")
    spec.train = train_table(c, t.get("train", {}), f"{path}.train")


def _checkpoint(c: Checker, t: dict[str, Any], spec: ModelSpec, path: str) -> None:
    spec.checkpoint = c.string(t["checkpoint"], f"{path}.checkpoint")
    if spec.checkpoint.startswith("zoo:"):  # a pretrained recipe (qrobust.zoo)
        from qrobust.recipes import RECIPES

        if spec.checkpoint[4:] not in RECIPES:
            raise c.fail(f"{path}.checkpoint", f"unknown recipe {spec.checkpoint[4:]!r}; known: "
                         f"{', '.join(sorted(RECIPES))}")
    for k in ("options", "train"):
        if k in t:
            raise c.fail(f"{path}.{k}", "a checkpoint is already trained; remove this key")


def _ensembles(c: Checker, value: Any, models: list[ModelSpec]) -> list[EnsembleSpec]:
    names = {m.name for m in models}
    out: list[EnsembleSpec] = []
    for path, t in c.tables(value, "ensembles"):
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
        options = _ensemble_options(c, t.get("options", {}), len(members), f"{path}.options")
        label = c.string(t.get("label", name), f"{path}.label")
        out.append(EnsembleSpec(name, members, targets, options, label))
    return out


def _ensemble_options(c: Checker, value: Any, members: int, path: str) -> dict[str, Any]:
    """``rule`` and ``designated`` of :class:`qrobust.ensemble.Ensemble`, checked before any member trains."""
    from qrobust.ensemble import RULES

    options = dict(c.table(value, path))
    c.unknown(options, ("rule", "designated"), path)
    if "rule" in options and options["rule"] not in RULES:
        raise c.fail(f"{path}.rule", f"unknown ensemble rule {options['rule']!r}; use one of "
                     f"{', '.join(RULES)}")
    if "designated" in options:
        d = options["designated"]
        if isinstance(d, bool) or not isinstance(d, int) or not -members <= d < members:
            raise c.fail(f"{path}.designated", f"must be a member index from 0 to {members - 1}, got {d!r}")
    return options


def file_key(label: str) -> str:
    """How a label names a file: lower case, runs of other characters as one ``_`` (the report's plots)."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "x"


def _eps_list(c: Checker, value: Any, path: str) -> list[float]:
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


def _attacks(c: Checker, value: Any, targets: list[str]) -> list[AttackSpec]:
    out: list[AttackSpec] = []
    labels: set[str] = set()
    for path, t in c.tables(value, "attacks"):
        if "name" not in t:
            raise c.fail(f"{path}.name", "missing; one of fgsm, bim, pgd, cw, jsma")
        name = c.string(t["name"], f"{path}.name").lower()
        label = c.string(t.get("label", name.upper()), f"{path}.label")
        key = file_key(label)  # the report names plot files after the label
        if key in labels or key == "clean":
            raise c.fail(f"{path}.label", f"{label!r} is used twice (labels are compared ignoring case and "
                         "punctuation, as they name the report's files); give each attack a distinct label")
        labels.add(key)
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


def _check_attack(c: Checker, name: str, params: dict[str, Any], eps: float | None, path: str) -> None:
    """Build the attack once so unknown parameters fail now, with the key path (skipped if not installed)."""
    try:
        from qrobust.attacks import create_attack
    except ImportError:
        return
    from qrobust.attacks import attack_params

    try:
        defaults = attack_params(name)
    except QrobustError as exc:
        raise c.fail(path, str(exc)) from exc
    for k, v in params.items():
        if k in defaults:
            c.like(v, defaults[k], f"{path}.{k}")
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
    c: Checker, value: Any, models: list[ModelSpec], attacks: list[AttackSpec]
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


def _select(
    c: Checker, only: list[str], models: list[ModelSpec], ensembles: list[EnsembleSpec],
    attacks: list[AttackSpec], detection: DetectionSpec | None,
) -> tuple[list[ModelSpec], list[EnsembleSpec], list[AttackSpec], DetectionSpec | None]:
    """Restrict an experiment to the named models and ensembles (``only``, ``qrobust run --only``), so
    part of a grid can run where only some checkpoints exist or on another machine. Result keys do not
    depend on the selection: the parts' stores merge, and the full file finds every result again."""
    known = [m.name for m in models] + [e.name for e in ensembles]
    for name in only:
        if name not in known:
            raise c.fail("only", f"{name!r} is not a model or ensemble of this file; known: "
                                 f"{', '.join(known)}")
    ensembles = [e for e in ensembles if e.name in only]
    keep = set(only) | {m for e in ensembles for m in e.members}
    models = [m for m in models if m.name in keep]
    kept: list[AttackSpec] = []
    for a in attacks:
        if a.models is not None:
            a = dataclasses.replace(a, models=[m for m in a.models if m in keep])
            if not a.models:
                continue
        kept.append(a)
    if detection is not None:
        labels = {a.label for a in kept}
        detection = dataclasses.replace(detection, models=[m for m in detection.models if m in keep],
                                        attacks=[a for a in detection.attacks if a in labels])
        if not detection.models or not detection.attacks:
            detection = None
    return models, ensembles, kept, detection
