"""``create_attack(name, **params)``: build an attack by name; clear errors for wrong names or settings."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from qrobust.attacks.apgd import APGD, APGDT
from qrobust.attacks.base import Attack
from qrobust.attacks.cw import CWL2
from qrobust.attacks.detector_aware import EOTPGD, DetectorAwarePGD
from qrobust.attacks.fgsm import FGSM, RandomEpsFGSM
from qrobust.attacks.jsma import JSMA
from qrobust.attacks.pgd import BIM, PGD
from qrobust.attacks.square import Square
from qrobust.errors import QrobustError

ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "bim": BIM,
    "pgd": PGD,
    "cw": CWL2,
    "jsma": JSMA,
    "fgsm_random": RandomEpsFGSM,
    "eot_pgd": EOTPGD,
    "detector_aware_pgd": DetectorAwarePGD,
    "apgd": APGD,
    "apgdt": APGDT,
    "square": Square,
}
# Attacks defined above this layer: suites that compose attacks with ensembles and the Monte-Carlo engine,
# which use this registry themselves. Each registers itself on import (register_attack); the registry
# imports its module on first use, so ``create_attack("worst_case")`` works like any other name.
DEFERRED = {"worst_case": "qrobust.suite"}
# THE alias table: other spellings, including the seeds' CleverHans class names, keyed without case,
# "-", "_" or spaces (see canonical_name).
ALIASES = {"cwl2": "cw", "carliniwagnerl2": "cw", "ifgsm": "bim", "basiciter": "bim",
           "basiciterativemethod": "bim", "fgm": "fgsm", "fastgradientmethod": "fgsm", "madryetal": "pgd",
           "saliencymapmethod": "jsma"}
# Both seeds' ``--attack`` codes (QNN-defense's and EMPIR's mnist_attack.py share the enum).
SEED_CODES = {0: "cw", 1: "jsma", 2: "fgsm", 3: "pgd", 4: "bim"}


def _squash(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch not in "-_ ")


def register_attack(name: str, cls: type[Attack]) -> None:
    """Make ``cls`` available to :func:`create_attack` (and TOML, the CLI) as ``name``."""
    ATTACKS[name] = cls


def attack_names() -> list[str]:
    """Every registered attack name, the deferred ones included."""
    return [*ATTACKS, *(k for k in DEFERRED if k not in ATTACKS)]


def attack_class(name: str) -> type[Attack]:
    """The class registered as ``name`` (an alias is fine), importing a deferred one's module."""
    key = canonical_name(name)
    if key not in ATTACKS:
        importlib.import_module(DEFERRED[key])
    return ATTACKS[key]


def attack_params(name: str) -> dict[str, Any]:
    """The settings attack ``name`` accepts, with their defaults."""
    cls = attack_class(name)
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def canonical_name(name: str) -> str:
    """The registry name of attack ``name``: ``PGD``, ``MadryEtAl``, ``CW-L2``, ``eot-pgd``... -> ``pgd``,
    ``pgd``, ``cw``, ``eot_pgd``."""
    key = _squash(name)
    key = ALIASES.get(key, key)
    for known in attack_names():
        if _squash(known) == key:
            return known
    raise QrobustError(f"unknown attack {name!r}; known attacks: {', '.join(attack_names())}")


def seed_attack_name(text: str | int) -> str:
    """A seed's ``--attack`` value: its integer code (0=CW-L2, 1=JSMA, 2=FGSM, 3=PGD/MadryEtAl, 4=BIM) or
    the name of one of those five attacks."""
    key = str(text).strip()
    name = SEED_CODES.get(int(key)) if key.isdigit() else None
    if name is None and not key.isdigit():
        try:
            name = canonical_name(key)
        except QrobustError:
            name = None
    if name not in SEED_CODES.values():
        raise QrobustError(f"unknown attack {text!r}: use 0=CW-L2, 1=JSMA, 2=FGSM, 3=PGD (MadryEtAl), 4=BIM, "
                           "or one of cw, jsma, fgsm, pgd, bim")
    return name


def create_attack(name: str, **params: Any) -> Attack:
    """Build attack ``name`` (any key of :data:`ATTACKS` or an alias) with ``params``."""
    key = canonical_name(name)
    accepted = attack_params(key)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise QrobustError(f"attack {key!r} does not take {', '.join(unknown)}; "
                           f"it takes: {', '.join(accepted)}")
    try:
        return attack_class(key)(**params)
    except TypeError as exc:  # e.g. a non-numeric value where a number belongs
        raise QrobustError(f"bad settings for attack {key!r}: {exc}") from exc
