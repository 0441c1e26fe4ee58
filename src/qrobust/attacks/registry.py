"""``create_attack(name, **params)``: build an attack by name; clear errors for wrong names or settings."""

from __future__ import annotations

import inspect
from typing import Any

from qrobust.attacks.base import Attack
from qrobust.attacks.cw import CWL2
from qrobust.attacks.fgsm import FGSM, RandomEpsFGSM
from qrobust.attacks.jsma import JSMA
from qrobust.attacks.pgd import BIM, PGD
from qrobust.errors import QrobustError

ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "bim": BIM,
    "pgd": PGD,
    "cw": CWL2,
    "jsma": JSMA,
    "fgsm_random": RandomEpsFGSM,
}
_ALIASES = {"cwl2": "cw", "cw_l2": "cw", "cw-l2": "cw", "fgsm-random": "fgsm_random", "ifgsm": "bim"}


def attack_params(name: str) -> dict[str, Any]:
    """The settings attack ``name`` accepts, with their defaults."""
    cls = ATTACKS[_canonical(name)]
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _canonical(name: str) -> str:
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in ATTACKS:
        raise QrobustError(f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)}")
    return key


def create_attack(name: str, **params: Any) -> Attack:
    """Build attack ``name`` (fgsm, bim, pgd, cw, jsma, fgsm_random) with ``params``."""
    key = _canonical(name)
    accepted = attack_params(key)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise QrobustError(f"attack {key!r} does not take {', '.join(unknown)}; "
                           f"it takes: {', '.join(accepted)}")
    try:
        return ATTACKS[key](**params)
    except TypeError as exc:  # e.g. a non-numeric value where a number belongs
        raise QrobustError(f"bad settings for attack {key!r}: {exc}") from exc
