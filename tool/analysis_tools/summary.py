"""Print a model summary for a config: parameters, GFLOP per crop, output stride and feature sizes.

    python tool/analysis_tools/summary.py --config config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml [KEY VALUE ...]
    python tool/analysis_tools/summary.py --config config/demo/demo_pyconvresnet50_pyconvsegnet.yaml \\
        train_h 129 train_w 129

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
from typing import Any, Dict, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.summary import summarize  # noqa: E402
from util.config import parse_cli  # noqa: E402
from util.runtime.cli import run_cli  # noqa: E402


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
    sys.exit(run_cli(main))  # (no allocator tuning: the meta device allocates nothing)
