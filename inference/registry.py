"""A registry of named factories whose modules are imported on first use.

Model architectures (:mod:`spine_node.inference.models`) and pipelines (:mod:`spine_node.inference.pipelines`)
both register themselves by name from modules that are only imported when a name is
first looked up, so importing the package stays cheap (no torch until it is needed).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Factories of one ``kind`` ("architecture", "pipeline") by name."""

    def __init__(self, kind: str, modules: tuple[str, ...]) -> None:
        self.kind = kind
        self.modules = modules  # imported on first lookup; they call register()
        self._factories: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register ``factory`` as ``name`` (twice with another factory is an error)."""

        def decorate(factory: F) -> F:
            if self._factories.get(name, factory) is not factory:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._factories[name] = factory
            return factory

        return decorate

    def _load_all(self) -> None:
        for module in self.modules:
            importlib.import_module(module)

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self._factories)

    def factory(self, name: str) -> F:
        self._load_all()
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None
