"""Torch model architectures, registered by name.

A model card's ``architecture`` entry (``{name: ..., kwargs: {...}}``) names one of these;
the torch reference backend builds it with :func:`architecture` and loads ``model.pt``
into it. Architecture modules register themselves with :func:`register` and are listed
in ``_MODULES`` so they are imported on first use.

Importing this package does not import torch; the architecture modules do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spine_node.inference.registry import Registry

if TYPE_CHECKING:
    from torch import nn

Factory = Callable[..., "nn.Module"]

_ARCHITECTURES: Registry[Factory] = Registry(
    "architecture", ("spine_node.inference.models.ct", "spine_node.inference.models.xray"))
register = _ARCHITECTURES.register
names = _ARCHITECTURES.names


def architecture(name: str, **kwargs: Any) -> nn.Module:
    """Build the architecture registered as ``name`` with ``kwargs`` (untrained weights)."""
    return _ARCHITECTURES.factory(name)(**kwargs)
