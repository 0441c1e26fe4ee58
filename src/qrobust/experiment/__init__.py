"""Experiments from one TOML file: config schema, SQLite result store, cached and resumable runner
(models: models.py, units and keys: plan.py, computing a unit: units.py, reading a store back: results.py)."""

from qrobust.experiment.config import (
    AttackSpec,
    DatasetSpec,
    DetectionSpec,
    EnsembleSpec,
    ExperimentConfig,
    ModelSpec,
    load_config,
    parse_config,
)
from qrobust.experiment.plan import Unit
from qrobust.experiment.runner import Runner, RunSummary, run_experiment
from qrobust.experiment.store import ResultStore, canonical_json, stable_hash

__all__ = [
    "AttackSpec",
    "DatasetSpec",
    "DetectionSpec",
    "EnsembleSpec",
    "ExperimentConfig",
    "ModelSpec",
    "ResultStore",
    "RunSummary",
    "Runner",
    "Unit",
    "canonical_json",
    "load_config",
    "parse_config",
    "run_experiment",
    "stable_hash",
]
