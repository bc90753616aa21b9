"""Model architectures (torch), registered by family name.

Importing this package imports torch; the node never does. ``build(name, **kwargs)``
makes a fresh (untrained) model of a registered family; families register themselves
with :func:`register_architecture` when their module is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
# Modules that register architectures when imported.
_MODULES: tuple[str, ...] = ("inference.models.xray",)


def register_architecture(name: str) -> Callable[[Any], Any]:
    """Register a model class (or factory) under ``name``."""

    def decorate(factory: Any) -> Any:
        if name in _ARCHITECTURES:
            raise ValueError(f"architecture {name!r} registered twice")
        _ARCHITECTURES[name] = factory
        return factory

    return decorate


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(module)


def architectures() -> list[str]:
    _load_all()
    return sorted(_ARCHITECTURES)


def build(name: str, **kwargs: Any) -> nn.Module:
    """A new model of family ``name``; ``kwargs`` go to its constructor."""
    _load_all()
    try:
        factory = _ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: "
                       f"{', '.join(sorted(_ARCHITECTURES)) or 'none'}") from None
    return factory(**kwargs)
