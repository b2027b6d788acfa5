"""Name -> builder registries: the one mechanism behind every name a config selects (backbones and
architectures in model/registry.py, losses in util/engine/losses.py, learning-rate schedules in
util/engine/optim.py, training transforms in util/data/transforms.py)."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List, Tuple, TypeVar

T = TypeVar("T", bound=Callable)


class Registry:
    """A read-mostly mapping from a config name to a builder (function or class)."""

    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key
        self._entries: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``builder`` under ``name``; a name can be registered only once."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(builder: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not builder:
                raise ValueError(f"{self.kind} '{name}' is already registered "
                                 f"({existing.__module__}.{existing.__qualname__})")
            self._entries[name] = builder
            return builder

        return decorator

    def unregister(self, name: str) -> Callable:
        """Remove ``name`` and return its builder, e.g. to re-register an edited builder in a notebook."""
        if name not in self._entries:
            raise ValueError(f"{self.kind} '{name}' is not registered; registered: {', '.join(self.names())}")
        return self._entries.pop(name)

    def get(self, name: str) -> Callable:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            match = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ValueError(f"unknown {self.kind} '{name}' ({self.config_key}){hint}; registered: "
                             f"{', '.join(self.names())}") from None

    def names(self) -> List[str]:
        return sorted(self._entries)

    def items(self) -> List[Tuple[str, Callable]]:
        """``(name, builder)`` pairs in registration order (e.g. the steps of a pipeline)."""
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries
