"""Changing a built model's Monte-Carlo dropout afterwards (QNN-defense's ``--dropout`` at attack time)."""

from __future__ import annotations

from torch import nn

from qrobust.errors import QrobustError
from qrobust.models.common import MCDropout


def set_dropout(model: nn.Module, rate: float) -> int:
    """Set the rate of every :class:`MCDropout` layer and keep it on at inference; returns how many.

    QNN-defense chose the dropout of the attacked net per run, independent of how it was trained.
    """
    if not 0.0 <= rate < 1.0:
        raise QrobustError(f"dropout rate must be in [0, 1), got {rate}")
    n = 0
    for m in model.modules():
        if isinstance(m, MCDropout):
            m.p, m.always_on = float(rate), True
            n += 1
    if n == 0 and rate > 0:
        raise QrobustError("this model has no dropout layers to set a dropout rate on; use a model built "
                           "with dropout (e.g. qnn_* with dropout > 0)")
    return n
