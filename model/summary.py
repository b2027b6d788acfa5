"""Parameter counts and FLOPs of a config's model, built on the ``meta`` device (shapes only).

Shared by ``tool/analysis_tools/summary.py`` (the printed summary) and ``tool/analysis_tools/benchmark.py``
(the GFLOP that utilisation is computed from). FLOP = 2 x multiply-accumulates, counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; not BN, ReLU,
pooling or interpolation).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn


def count_parameters(modules: Sequence[nn.Module]) -> int:
    """Number of distinct parameters (shared ones counted once) of ``modules``."""
    seen = {}
    for module in modules:
        for param in module.parameters():
            seen[id(param)] = param.numel()
    return sum(seen.values())


def summarize(cfg, height: Optional[int] = None, width: Optional[int] = None,
              device: str = "meta") -> Dict[str, Any]:
    """Build ``cfg``'s model and measure it on a ``height x width`` crop (default train_h x train_w).

    Returns a dict with ``parameters`` (total), ``backbone_parameters``, ``head_parameters``
    (head + classifier + aux: the 10x-lr groups), ``gflop`` (eval forward, 2*MAC convention, batch 1),
    ``gflop_by_module`` (top-level children), ``output_stride``, ``feature_size`` (layer4's h x w),
    ``output_size`` (logits' h x w), ``input_size``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from model import build_model

    height = int(height if height is not None else cfg.train_h)
    width = int(width if width is not None else cfg.train_w)
    with torch.device(device):
        model = build_model(cfg)
    model.eval()
    image = torch.zeros(1, 3, height, width, device=device)

    feature_shape: List[Any] = []
    hook = model.layer4.register_forward_hook(lambda module, inputs, output: feature_shape.append(output.shape))
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            logits = model(image)
    finally:
        hook.remove()

    # The counter keys modules by dotted path under the model's class name; keep the direct children.
    flops_by_path = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    root = type(model).__name__
    by_module = {name: flops_by_path[f"{root}.{name}"] / 1e9 for name, _ in model.named_children()
                 if f"{root}.{name}" in flops_by_path}  # `aux` runs in training only
    feature_h, feature_w = int(feature_shape[0][-2]), int(feature_shape[0][-1])
    return {
        "name": f"{cfg.arch} on {cfg.backbone_net}{cfg.layers}",
        "classes": int(cfg.classes),
        "input_size": (height, width),
        "parameters": count_parameters([model]),
        "backbone_parameters": count_parameters(model.backbone_modules()),
        "head_parameters": count_parameters(model.head_modules()),
        "gflop": counter.get_total_flops() / 1e9,
        "gflop_by_module": by_module,
        "output_stride": getattr(model, "backbone_output_stride", None),
        "feature_size": (feature_h, feature_w),
        "output_size": (int(logits.shape[-2]), int(logits.shape[-1])),
        "zoom_factor": int(cfg.zoom_factor),
    }
