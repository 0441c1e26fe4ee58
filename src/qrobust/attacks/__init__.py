"""Adversarial attacks: ``attack = PGD(eps=0.3, ...); x_adv = attack(model, x, y=None)``.

Every attack is built with its settings and called on any ``nn.Module`` returning class scores
(ensembles included), batched and device-agnostic; it never changes the model's train/eval mode.
See ``docs/dev/attacks_api.md``.
"""

from qrobust.attacks.base import Attack, is_success, random_targets
from qrobust.attacks.cw import CWL2
from qrobust.attacks.eot import EOT, input_gradient, mean_output
from qrobust.attacks.fgsm import FGSM, RandomEpsFGSM
from qrobust.attacks.jsma import JSMA
from qrobust.attacks.losses import LOSSES, ce_loss, ce_prob_loss, cw_loss, resolve_loss
from qrobust.attacks.pgd import BIM, PGD
from qrobust.attacks.registry import ATTACKS, attack_params, create_attack

__all__ = [
    "ATTACKS",
    "BIM",
    "CWL2",
    "EOT",
    "FGSM",
    "JSMA",
    "LOSSES",
    "PGD",
    "Attack",
    "RandomEpsFGSM",
    "attack_params",
    "ce_loss",
    "ce_prob_loss",
    "create_attack",
    "cw_loss",
    "input_gradient",
    "is_success",
    "mean_output",
    "random_targets",
    "resolve_loss",
]
