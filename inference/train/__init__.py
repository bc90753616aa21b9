"""Training recipes (torch), registered by name for ``spine-node train <name>``.

A recipe is a callable ``recipe(out_dir=None, data=None, seed=None, steps=None)`` that
trains a model (on the synthetic phantoms unless ``data`` names a dataset folder),
exports ``engines/<model-name>/model.onnx`` and writes its ``model.yaml``.
Importing this package imports torch; the node never does.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

Recipe = Callable[..., Any]

_RECIPES: dict[str, Recipe] = {}
# Modules that register recipes when imported.
_MODULES: tuple[str, ...] = ("inference.train.xray",)


def register_recipe(name: str) -> Callable[[Recipe], Recipe]:
    """Register a training recipe under ``name``."""

    def decorate(recipe: Recipe) -> Recipe:
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} registered twice")
        _RECIPES[name] = recipe
        return recipe

    return decorate


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(module)


def recipes() -> list[str]:
    _load_all()
    return sorted(_RECIPES)


def get(name: str) -> Recipe:
    _load_all()
    try:
        return _RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(sorted(_RECIPES)) or 'none'}"
                       ) from None
