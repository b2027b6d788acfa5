"""Name -> builder registries for backbones and segmentation architectures.

(The same :class:`Registry` holds the losses of util/engine/losses.py, the LR schedules of util/engine/optim.py
and the training transforms of util/data/transforms.py.)

A YAML selects a backbone with ``backbone_net`` and an architecture with ``arch``; both names are
looked up here. Adding one is a new module inside ``model/`` (imported automatically by
``model/__init__.py``) with a single decorator:

    @register_backbone("mynet")
    def build_mynet(layers: int, output_stride: int = 8) -> nn.Module: ...
        # returns a module with layer0..layer4 and attributes layer3_channels / layer4_channels
    build_mynet.supported_layers = (18, 34)  # optional: the config rejects other ``layers`` up front

    @register_arch("myhead")
    class MyHeadNet(SegmentationModel): ...
        # constructed as MyHeadNet(backbone=..., classes=..., zoom_factor=...)

The registries are filled once, at import time, and only read afterwards.
"""
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


BACKBONES = Registry("backbone", "backbone_net")
ARCHITECTURES = Registry("architecture", "arch")

register_backbone = BACKBONES.register
register_arch = ARCHITECTURES.register


def registered_backbones() -> List[str]:
    """Names accepted by ``backbone_net``."""
    return BACKBONES.names()


def registered_archs() -> List[str]:
    """Names accepted by ``arch``."""
    return ARCHITECTURES.names()
