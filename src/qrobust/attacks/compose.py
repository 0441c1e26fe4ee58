"""Attack a *view* of the model, score on the model: the one composition primitive.

Many threat models differentiate something other than the model they are scored on: an ensemble's
attack target (EMPIR's legacy gradient, or the whole ensemble), the Monte-Carlo mean of a randomized
model, K Monte-Carlo copies seen at once (EOT), a detector-aware objective over those copies.
:class:`OnView` wraps any attack so that ``OnView(attack, view)(model, x)`` runs ``attack`` on
``view(model)`` while the caller (``evaluate_attack``, ``run_detection``) keeps scoring ``x_adv`` on
``model``. Attacks that need a view build it from their own settings (see
:mod:`qrobust.attacks.detector_aware`), so they are plain registry attacks usable from TOML.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from qrobust.attacks.base import Attack
from qrobust.errors import QrobustError

View = nn.Module | Callable[[nn.Module], nn.Module]
LabelFn = Callable[[nn.Module, Tensor], Tensor]


class OnView(Attack):
    """Run ``attack`` on a view of the model it is called with; the result is meant for the model.

    ``view``: a function ``model -> module`` building the view at each call (e.g. a Monte-Carlo
    view), or a fixed module (e.g. an ensemble's attack target, which already holds the ensemble).
    ``labels`` (used when the caller gives no ``y``): ``"model"`` - the model's own prediction, as
    every attack does; ``"view"`` - the view's prediction; or a function ``(model, x) -> labels``
    (e.g. the group prediction of K Monte-Carlo copies). ``name`` and ``info`` go into :meth:`config`.
    Seed, bounds and targeting are the wrapped attack's, so a call draws the same randomness as the
    wrapped attack called alone.
    """

    name = "on_view"

    def __init__(self, attack: Attack, view: View, *, labels: str | LabelFn = "model",
                 name: str | None = None, info: dict[str, Any] | None = None) -> None:
        if not isinstance(attack, Attack):
            raise QrobustError(f"OnView composes a qrobust Attack, got {type(attack).__name__}")
        if not (isinstance(view, nn.Module) or callable(view)):
            raise QrobustError("view must be a module or a function model -> module")
        if not (callable(labels) or labels in ("model", "view")):
            raise QrobustError(f"labels must be 'model', 'view' or a function (model, x) -> labels, got "
                               f"{labels!r}")
        self.attack = attack
        self._view = view
        self._label_source = labels
        self.name = name or attack.name
        self.info = dict(info or {})
        # The wrapped attack's settings, read by Attack.__call__ and by callers (evaluate_attack).
        self.loss, self.loss_fn = attack.loss, attack.loss_fn
        self.targeted, self.eot_samples = attack.targeted, attack.eot_samples
        self.seed, self.bounds = attack.seed, attack.bounds
        self.version = getattr(attack, "version", "1")  # cache keys follow the wrapped attack's code

    def view(self, model: nn.Module) -> nn.Module:
        """The module the gradients come from when attacking ``model``."""
        return self._view if isinstance(self._view, nn.Module) else self._view(model)

    def config(self) -> dict[str, Any]:
        return {**self.attack.config(), "attack": self.name, **self.info}

    def _labels(self, model: nn.Module, x: Tensor, y: Tensor | int | None, gen: torch.Generator) -> Tensor:
        if y is None and callable(self._label_source):
            y = self._label_source(model, x)
        elif y is None and self._label_source == "view":
            model = self.view(model)
        return super()._labels(model, x, y, gen)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        return self.attack(self.view(model), x, y, generator=generator)


__all__ = ["LabelFn", "OnView", "View"]
