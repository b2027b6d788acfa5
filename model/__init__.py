"""Segmentation models selected by name from the config.

``build_model(cfg)`` builds ``cfg.arch`` (``pyconvsegnet`` | ``psp`` | anything registered) on
``cfg.backbone_net`` (``resnet`` | ``pyconvresnet`` | ``pyconvhgresnet`` | anything registered).
Every module of this package is imported below, so a new backbone or head is one new file in
``model/`` with a ``@register_backbone`` / ``@register_arch`` decorator (see ``model/registry.py``).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from . import backbones, segmentation  # noqa: F401  (built-in registrations)
from .backbones import OUTPUT_STRIDES
from .registry import ARCHITECTURES, BACKBONES, register_arch, register_backbone, registered_archs, registered_backbones
from .segmentation import ZOOM_FACTORS, SegmentationModel, output_size


def _import_all_submodules() -> None:
    """Import every module of this package so that their registrations run."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all_submodules()

_MISSING = object()


def _cfg_value(cfg: Any, key: str, default: Any = _MISSING) -> Any:
    """``cfg.key`` for a CfgNode / namespace, ``cfg[key]`` for a plain mapping."""
    if isinstance(cfg, dict):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    if value is _MISSING:
        raise ValueError(f"model config needs the key '{key}'")
    return value


def build_model(cfg: Any) -> nn.Module:
    """Build the segmentation model described by ``cfg``, freshly initialised.

    Reads ``arch``, ``backbone_net``, ``layers``, ``classes``, ``zoom_factor`` (default 8) and
    ``backbone_output_stride`` (default 8). Weights are the caller's business: training loads the
    ImageNet backbone of ``cfg.pretrained`` with ``util.runtime.checkpoint_io.load_pretrained_backbone``,
    testing a checkpoint with ``util.runtime.checkpoint_io.load_model_weights``.

    Raises:
        ValueError: unknown arch/backbone (the message lists the registered names) or bad values.
    """
    arch = ARCHITECTURES.get(_cfg_value(cfg, "arch"))
    make_backbone = BACKBONES.get(_cfg_value(cfg, "backbone_net"))
    backbone = make_backbone(layers=_cfg_value(cfg, "layers"),
                             output_stride=_cfg_value(cfg, "backbone_output_stride", 8))
    return arch(backbone=backbone, classes=_cfg_value(cfg, "classes"), zoom_factor=_cfg_value(cfg, "zoom_factor", 8))


__all__ = ["ARCHITECTURES", "BACKBONES", "OUTPUT_STRIDES", "ZOOM_FACTORS", "build_model", "register_arch",
           "register_backbone", "registered_archs", "registered_backbones", "SegmentationModel", "output_size"]
