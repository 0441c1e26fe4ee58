"""The units of an experiment and their cache keys.

A run is a list of *units*: for every model/ensemble row the clean accuracy, every attack x eps (x
ensemble threat model), and every detection setting. Each unit has a key — the SHA-256 of everything
that produced it (model hash, attack settings, samples, seed, data fingerprint, and the version of the
attack / detection code, see :func:`code_versions`) — so a rerun skips what is stored already.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qrobust.errors import QrobustError
from qrobust.experiment.config import AttackSpec, ExperimentConfig
from qrobust.experiment.models import Models
from qrobust.experiment.store import ResultStore, stable_hash

# Version of the detection pipeline (MC sampling, statistics, held-out split, ROC): bump it when a
# change alters detection results, so stored detection cells are recomputed and nothing else.
# "2": QNN-defense's protocol as `qrobust detect` runs it: with labels = "pred" attacks label each batch,
# Monte-Carlo passes from two generators (seed + 1 clean, seed + 2 adversarial) instead of one stream,
# 1000 bootstrap resamples.
# "3": batches sharded over torchrun's ranks: Monte-Carlo passes from generators seeded per batch
# (seed + 1 / seed + 2, batch index), the global RNG reseeded per attack batch (qrobust.distributed).
DETECTION_VERSION = "3"
# Version of the batched evaluation of attacks on RANDOMIZED models (dropout kept on, stochastic weights):
# "2": the global RNG is reseeded per batch from (attack seed, batch index), so N torchrun ranks give the
# per-image results of one process. Deterministic models' results did not change, so their keys do not
# carry it.
STOCHASTIC_EVAL_VERSION = "2"


def code_versions(attack: Any, *, detection: bool = False, stochastic: bool = False) -> dict[str, Any]:
    """The versions of the code computing a cell, for its cache key (``Attack.version``,
    :data:`DETECTION_VERSION` for detection cells, :data:`STOCHASTIC_EVAL_VERSION` for cells of randomized
    models): bumping one recomputes exactly the cells it computes.

    Versions still at "1" are left out, so keys (and stores) from before versioning stay valid.
    """
    versions = {"attack": str(getattr(attack, "version", "1"))}
    if detection:
        versions["detection"] = DETECTION_VERSION
    if stochastic:
        versions["evaluation"] = STOCHASTIC_EVAL_VERSION
    versions = {k: v for k, v in versions.items() if v != "1"}
    return {"code": versions} if versions else {}


@dataclass
class Unit:
    """One cacheable piece of work."""

    key: str
    kind: str  # clean | attack | detection
    target: str  # model or ensemble name
    row: str  # report row label
    attack: str  # attack label ("clean" for clean accuracy)
    eps: float | None = None
    mode: str | None = None  # ensemble threat model: legacy | adaptive | adaptive_logits
    spec: AttackSpec | None = None
    samples: int = 0
    describe: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        eps = "" if self.eps is None else f" eps={self.eps:g}"
        return f"{self.kind} {self.row} {self.attack if self.kind != 'clean' else ''}{eps}".replace("  ", " ")


def attack_settings(
    cfg: ExperimentConfig, models: Models, spec: AttackSpec, eps: float | None, mode: str | None, target: str
) -> dict[str, Any]:
    """The settings ``create_attack`` gets for one cell: the spec's, the experiment seed, the cell's eps,
    and in an ensemble threat model the loss its target prescribes."""
    from qrobust.attacks import attack_params

    params = {**spec.params}
    params.setdefault("seed", cfg.seed)
    if eps is not None:
        params["eps"] = eps
    if mode is not None and "loss" in attack_params(spec.name):
        ens = models.models[target]
        if mode == "legacy" or "loss" not in params:
            params["loss"] = ens.attack_target(mode, spec.name).loss
    return params


class Planner:
    """Builds the unit list of one experiment (the models must be loaded: keys hold their hashes)."""

    def __init__(self, cfg: ExperimentConfig, models: Models) -> None:
        self.cfg = cfg
        self.models = models
        self._fps: dict[tuple[str, int], str] = {}

    def data_fp(self, ds: str, n: int) -> str:
        if (ds, n) not in self._fps:
            self._fps[(ds, n)] = self.models.test_tensors(ds, n)[2]
        return self._fps[(ds, n)]

    def units(self, store: ResultStore) -> list[Unit]:
        """Every unit of the grid with its key (loads or trains the models, which the keys depend on)."""
        cfg = self.cfg
        self.models.load_all(store)
        labels = {m.name: m.label for m in cfg.models} | {e.name: e.label for e in cfg.ensembles}
        detected = set(cfg.detection.models) if cfg.detection is not None else set()
        units: list[Unit] = []
        for t in [m.name for m in cfg.models] + [e.name for e in cfg.ensembles]:
            attacked = [a for a in cfg.attacks if a.applies_to(t)]
            if not attacked and t not in detected:
                continue
            units.append(self.clean_unit(t, labels[t]))
            for a in attacked:
                units += self.attack_units(t, labels[t], a)
        if cfg.detection is not None:
            units += self.detection_units(store)
        check_distinct(cfg, units)
        return units

    def clean_unit(self, target: str, label: str) -> Unit:
        n = self.cfg.samples
        described = {
            "kind": "clean",
            "model": self.models.hashes[target],
            "samples": n,
            "seed": self.cfg.seed,
            "data": self.data_fp(self.models.dataset_of(target), n),
        }
        return Unit(stable_hash(described), "clean", target, label, "clean", samples=n)

    def attack_units(self, target: str, label: str, a: AttackSpec) -> list[Unit]:
        """One unit per eps and ensemble threat model of attack ``a`` on ``target``."""
        cfg = self.cfg
        modes: list[str | None] = [None]
        if self.models.is_ensemble(target):
            modes = [m for m in cfg.ensemble(target).targets if a.targets is None or m in a.targets]
        n = a.samples or cfg.samples
        units = []
        for mode in modes:
            row = label if mode is None else f"{label} [{mode}]"
            ds = self.models.dataset_of(target)
            units += [self.cell(target, row, a, eps, mode, n, self.data_fp(ds, n), {"mode": mode})
                      for eps in a.eps]
        return units

    def cell(self, target: str, row: str, a: AttackSpec, eps: float | None, mode: str | None, n: int,
             data: str, extra: dict[str, Any], *, kind: str = "attack") -> Unit:
        """An attack or detection unit, keyed by everything that produces it (see the module docstring)."""
        from qrobust.attacks import create_attack
        from qrobust.mc import is_stochastic

        atk = create_attack(a.name, **attack_settings(self.cfg, self.models, a, eps, mode, target))
        atk_cfg = atk.config()
        described = {
            "kind": kind,
            "model": self.models.hashes[target],
            "attack": atk_cfg,
            "labels": a.labels,
            "samples": n,
            "seed": self.cfg.seed,
            "data": data,
            **extra,
            **code_versions(atk, detection=kind == "detection",
                            stochastic=is_stochastic(self.models.models[target])),
        }
        return Unit(stable_hash(described), kind, target, row, a.label, eps, mode, a, n,
                    {"attack_config": atk_cfg})

    def detection_units(self, store: ResultStore) -> list[Unit]:
        """One unit per detected model x detection attack that attacks it (at ``detection.eps`` or the table
        eps); an attack's ``models`` list restricts its detection cells too."""
        from qrobust.mc import is_stochastic

        cfg, det = self.cfg, self.cfg.detection
        assert det is not None
        units = []
        for name in det.models:
            if not is_stochastic(self.models.load(cfg.model(name), store)):
                raise QrobustError(
                    f"{cfg.source}: detection.models: {name!r} is deterministic at inference "
                    "(no dropout kept on, no stochastic weights), so Monte-Carlo detection "
                    "has nothing to measure; use a model with options.mc_dropout = true "
                    "and dropout > 0"
                )
            for label in det.attacks:
                a = cfg.attack(label)
                if not a.applies_to(name):
                    continue  # an attack restricted to other models gets no detection cell here either
                eps = det.eps if det.eps is not None else a.table_eps
                n = det.samples or a.samples or cfg.samples
                data = self.models.test_tensors(cfg.model(name).dataset, n)[2]
                units.append(self.cell(name, cfg.model(name).label, a, eps, None, n, data,
                                       {"mc_samples": det.mc_samples}, kind="detection"))
        return units


def check_distinct(cfg: ExperimentConfig, units: list[Unit]) -> None:
    """Refuse two rows that would produce the same result (same key): the store holds one per key."""
    seen: dict[str, Unit] = {}
    for u in units:
        if u.key in seen:
            first = seen[u.key]
            raise QrobustError(
                f"{cfg.source}: {first.row!r} and {u.row!r} would produce the same result "
                f"({u.title.strip()}): they are the same model (same weights, or same architecture, "
                "training and data) evaluated the same way; remove one of them"
            )
        seen[u.key] = u


def plan(cfg: ExperimentConfig, models: Models, store: ResultStore) -> list[Unit]:
    """Every unit of ``cfg`` with its key; see :class:`Planner`."""
    return Planner(cfg, models).units(store)
