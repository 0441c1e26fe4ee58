"""A registry of model families and one factory (timm-style ``create_model``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from qrobust.errors import QrobustError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    description: str

    def params(self) -> dict[str, Any]:
        """Keyword arguments the builder accepts, with their defaults."""
        sig = inspect.signature(self.builder)
        return {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, input_shape: tuple[int, int, int], description: str):
    """Decorator: register a builder whose options are all keyword-only."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, input_shape, description)
        return fn

    return wrap


def list_models() -> list[ModelEntry]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise QrobustError(f"unknown model {name!r}; known models: {known} (see `qrobust models`)")
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, untrained. The model remembers how it was built in ``model.qrobust_config``.

    With trained weights: ``qrobust.create_model(name, pretrained=True)`` (:func:`qrobust.zoo.create_model`).
    """
    entry = get_entry(name)
    accepted = entry.params()
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise QrobustError(
            f"model {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or 'nothing'}"
        )
    model = entry.builder(**kwargs)
    config = {**accepted, **kwargs}
    model.qrobust_config = {"name": name, "kwargs": config, "input_shape": list(entry.input_shape)}
    return model
