"""Torch model architectures, registered by name.

A model card's ``architecture`` entry (``{name: ..., kwargs: {...}}``) names one of these;
the torch reference backend builds it with :func:`architecture` and loads ``model.pt``
into it. Architecture modules register themselves with :func:`register` and are listed
in ``_MODULES`` so they are imported on first use.

Importing this package does not import torch; the architecture modules do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

Factory = Callable[..., "nn.Module"]

_REGISTRY: dict[str, Factory] = {}
# Modules that register architectures when imported.
_MODULES: tuple[str, ...] = ()


def register(name: str) -> Callable[[Factory], Factory]:
    """Register a module factory (a class or function returning ``nn.Module``) as ``name``."""

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"architecture {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(module)


def names() -> list[str]:
    """Registered architecture names."""
    _load_all()
    return sorted(_REGISTRY)


def architecture(name: str, **kwargs: Any) -> nn.Module:
    """Build the architecture registered as ``name`` with ``kwargs`` (untrained weights)."""
    _load_all()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"unknown architecture {name!r}; known: {known}") from None
    return factory(**kwargs)
