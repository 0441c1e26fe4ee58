"""qrobust: adversarial robustness of quantized neural networks.

Models take pixels in [0, 1] and return logits; every attack works in pixel space. The top level
re-exports each concept from its one home in the library, so these two lines are equivalent::

    from qrobust import PGD
    from qrobust.attacks import PGD

Three lines attack a quantized model (a zoo recipe or a checkpoint folder)::

    import qrobust
    model = qrobust.load("mnistconv_a4w2_m1")
    x_adv = qrobust.PGD(eps=0.3, alpha=0.01, steps=40)(model, x)

Names are imported on first use (PEP 562), so ``import qrobust`` stays fast and does not import torch.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from qrobust.errors import QrobustError
from qrobust.version import __version__

# name -> module that defines it (its one home). The TYPE_CHECKING block below lists the same imports
# for type checkers and IDEs; tests/test_docs.py checks that both agree with __all__.
_EXPORTS: dict[str, str] = {
    # models, checkpoints, the zoo, data, training
    "create_model": "qrobust.zoo",
    "list_models": "qrobust.models",
    "load_checkpoint": "qrobust.checkpoint",
    "save_checkpoint": "qrobust.checkpoint",
    "resolve_checkpoint": "qrobust.zoo",
    "RECIPES": "qrobust.recipes",
    "load_dataset": "qrobust.data",
    "TrainConfig": "qrobust.train",
    "train_to_checkpoint": "qrobust.train",
    "resolve_device": "qrobust.utils",
    # attacks
    "Attack": "qrobust.attacks",
    "ATTACKS": "qrobust.attacks",
    "create_attack": "qrobust.attacks",
    "attack_params": "qrobust.attacks",
    "FGSM": "qrobust.attacks",
    "RandomEpsFGSM": "qrobust.attacks",
    "BIM": "qrobust.attacks",
    "PGD": "qrobust.attacks",
    "CWL2": "qrobust.attacks",
    "JSMA": "qrobust.attacks",
    "APGD": "qrobust.attacks",
    "APGDT": "qrobust.attacks",
    "Square": "qrobust.attacks",
    "EOT": "qrobust.attacks",
    "EOTPGD": "qrobust.attacks",
    "DetectorAwarePGD": "qrobust.attacks",
    "OnView": "qrobust.attacks",
    "on_mc_mean": "qrobust.attacks",
    "WorstCase": "qrobust.suite",
    "WorstCaseReport": "qrobust.suite",
    "worst_case": "qrobust.suite",
    # ensembles (EMPIR) and their threat models
    "Ensemble": "qrobust.ensemble",
    "THREAT_MODELS": "qrobust.ensemble",
    "ensemble_attack": "qrobust.ensemble",
    "on_target": "qrobust.ensemble",
    # evaluation
    "accuracy": "qrobust.evaluate",
    "predict": "qrobust.evaluate",
    "evaluate_attack": "qrobust.evaluate",
    "AttackResult": "qrobust.evaluate",
    "wilson_interval": "qrobust.evaluate",
    # Monte-Carlo inference and detection
    "mc_logits": "qrobust.mc",
    "mc_probs": "qrobust.mc",
    "MCAverage": "qrobust.mc",
    "MCView": "qrobust.mc",
    "run_detection": "qrobust.detect",
    "evaluate_detection": "qrobust.detect",
    "DetectionRun": "qrobust.detect",
    "DetectionReport": "qrobust.detect",
    "roc_points": "qrobust.detect",
    # experiment files
    "load_config": "qrobust.experiment",
    "run_experiment": "qrobust.experiment",
    "ExperimentConfig": "qrobust.experiment",
    "RunSummary": "qrobust.experiment",
}

if TYPE_CHECKING:  # pragma: no cover - what type checkers and IDEs see; the same names as _EXPORTS
    import torch
    from torch import nn

    from qrobust.attacks import (
        APGD,
        APGDT,
        ATTACKS,
        BIM,
        CWL2,
        EOT,
        EOTPGD,
        FGSM,
        JSMA,
        PGD,
        Attack,
        DetectorAwarePGD,
        OnView,
        RandomEpsFGSM,
        Square,
        attack_params,
        create_attack,
        on_mc_mean,
    )
    from qrobust.checkpoint import load_checkpoint, save_checkpoint
    from qrobust.data import load_dataset
    from qrobust.detect import DetectionReport, DetectionRun, evaluate_detection, roc_points, run_detection
    from qrobust.ensemble import THREAT_MODELS, Ensemble, ensemble_attack, on_target
    from qrobust.evaluate import AttackResult, accuracy, evaluate_attack, predict, wilson_interval
    from qrobust.experiment import ExperimentConfig, RunSummary, load_config, run_experiment
    from qrobust.mc import MCAverage, MCView, mc_logits, mc_probs
    from qrobust.models import list_models
    from qrobust.recipes import RECIPES
    from qrobust.suite import WorstCase, WorstCaseReport, worst_case
    from qrobust.train import TrainConfig, train_to_checkpoint
    from qrobust.utils import resolve_device
    from qrobust.zoo import create_model, resolve_checkpoint


def load(name_or_path: str | os.PathLike, device: torch.device | str = "cpu", *,
         train_missing: bool = False) -> nn.Module:
    """The model of a checkpoint folder, a zoo recipe name or ``zoo:<recipe>``, in eval mode.

    One line over :func:`qrobust.zoo.resolve_checkpoint` and :func:`qrobust.checkpoint.load_checkpoint`
    (which also returns the checkpoint's ``config.json``). ``train_missing=True`` trains a recipe that
    is not in the zoo yet (minutes to hours: see ``docs/results/training.md``).
    """
    from qrobust.checkpoint import load_checkpoint
    from qrobust.zoo import resolve_checkpoint

    return load_checkpoint(resolve_checkpoint(name_or_path, train_missing=train_missing, device=device),
                           device)[0]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qrobust' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [  # written out (not built from _EXPORTS) so that type checkers see it
    "QrobustError", "__version__", "load",
    # models, checkpoints, the zoo, data, training
    "create_model", "list_models", "load_checkpoint", "save_checkpoint", "resolve_checkpoint", "RECIPES",
    "load_dataset", "TrainConfig", "train_to_checkpoint", "resolve_device",
    # attacks
    "Attack", "ATTACKS", "create_attack", "attack_params", "FGSM", "RandomEpsFGSM", "BIM", "PGD", "CWL2",
    "JSMA", "APGD", "APGDT", "Square", "EOT", "EOTPGD", "DetectorAwarePGD", "OnView", "on_mc_mean",
    "WorstCase", "WorstCaseReport", "worst_case",
    # ensembles
    "Ensemble", "THREAT_MODELS", "ensemble_attack", "on_target",
    # evaluation
    "accuracy", "predict", "evaluate_attack", "AttackResult", "wilson_interval",
    # Monte-Carlo inference and detection
    "mc_logits", "mc_probs", "MCAverage", "MCView", "run_detection", "evaluate_detection", "DetectionRun",
    "DetectionReport", "roc_points",
    # experiment files
    "load_config", "run_experiment", "ExperimentConfig", "RunSummary",
]
