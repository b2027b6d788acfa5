"""Print a model summary for a config: parameters, GFLOP per crop, output stride and feature sizes.

    python tool/summary.py --config config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml [KEY VALUE ...]
    python tool/summary.py --config config/demo/demo_pyconvresnet50_pyconvsegnet.yaml train_h 129 train_w 129

The model is built on PyTorch's ``meta`` device (shapes only: no memory, no weights, no data), so
any config can be summarised in seconds on any machine, including the 152-layer ones. FLOPs are
counted with ``torch.utils.flop_counter.FlopCounterMode`` for one eval-mode forward pass of a
``train_h x train_w`` crop (batch 1; the auxiliary branch is not run in eval mode). The convention
is FLOP = 2 x multiply-accumulates (a k x k convolution costs 2 * k * k * C_in / groups * C_out per
output pixel); only convolutions, matrix products and similar are counted, not BN, ReLU,
pooling or interpolation. Divide by 2 for the "MACs" some papers report.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from util.config import parse_cli  # noqa: E402


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
        model = build_model(cfg, load_pretrained=False)
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


def format_summary(info: Dict[str, Any]) -> str:
    h, w = info["input_size"]
    lines = [
        f"model:            {info['name']}, {info['classes']} classes",
        f"parameters:       {info['parameters']:,} total = {info['backbone_parameters']:,} backbone "
        f"(layer0-4) + {info['head_parameters']:,} head/cls/aux",
        f"crop:             {h}x{w}",
        f"GFLOP per crop:   {info['gflop']:.2f} (eval forward, batch 1, FLOP = 2 x multiply-accumulate)",
        f"output stride:    {info['output_stride']} (layer4 features {info['feature_size'][0]}x"
        f"{info['feature_size'][1]}; logits {info['output_size'][0]}x{info['output_size'][1]} "
        f"with zoom_factor {info['zoom_factor']})",
        "GFLOP by module:  " + ", ".join(f"{name} {value:.2f}" for name, value in info["gflop_by_module"].items())
        + " (aux: training only)",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    def add_flags(parser):
        parser.add_argument("--device", default="meta",
                            help="where to build the model: meta (default, shapes only) or cpu")

    args, cfg = parse_cli(argv, __doc__.split("\n\n")[0], add_flags)
    print(format_summary(summarize(cfg, device=args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
