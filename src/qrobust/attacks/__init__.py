"""Adversarial attacks: ``attack = PGD(eps=0.3, ...); x_adv = attack(model, x, y=None)``.

Every attack is built with its settings and called on any ``nn.Module`` returning class scores
(ensembles included), batched and device-agnostic; it never changes the model's train/eval mode.
See ``docs/dev/attacks_api.md``. The per-image worst case over a suite of them is
:mod:`qrobust.suite` (one level up: it also composes ensembles and the Monte-Carlo engine).
"""

from qrobust.attacks.apgd import APGD, APGDT
from qrobust.attacks.base import Attack, is_success, random_targets
from qrobust.attacks.compose import OnView
from qrobust.attacks.cw import CWL2
from qrobust.attacks.detector_aware import EOTPGD, DetectorAwarePGD, on_mc_mean
from qrobust.attacks.eot import EOT, input_gradient, mean_output
from qrobust.attacks.fgsm import FGSM, RandomEpsFGSM
from qrobust.attacks.jsma import JSMA
from qrobust.attacks.losses import LOSSES, ce_loss, ce_prob_loss, cw_loss, resolve_loss
from qrobust.attacks.pgd import BIM, PGD
from qrobust.attacks.registry import (
    ATTACKS,
    attack_class,
    attack_names,
    attack_params,
    canonical_name,
    create_attack,
    register_attack,
    seed_attack_name,
)
from qrobust.attacks.square import Scored, Square

__all__ = [
    "APGD",
    "APGDT",
    "ATTACKS",
    "BIM",
    "CWL2",
    "EOT",
    "EOTPGD",
    "FGSM",
    "JSMA",
    "LOSSES",
    "PGD",
    "Attack",
    "DetectorAwarePGD",
    "OnView",
    "RandomEpsFGSM",
    "Scored",
    "Square",
    "attack_class",
    "attack_names",
    "attack_params",
    "canonical_name",
    "ce_loss",
    "ce_prob_loss",
    "create_attack",
    "cw_loss",
    "input_gradient",
    "is_success",
    "mean_output",
    "on_mc_mean",
    "random_targets",
    "register_attack",
    "resolve_loss",
    "seed_attack_name",
]
