"""Name -> builder registries for backbones and segmentation architectures.

(The same :class:`util.registry.Registry` holds the losses of util/engine/losses.py, the LR schedules of
util/engine/optim.py and the training transforms of util/data/transforms.py.)

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

from typing import List

from util.registry import Registry

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
