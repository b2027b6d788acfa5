"""What both command lines (benchmark.py, check_bf16.py) do around their jobs: read the config,
pick the device, tune the allocator as the tools do, describe the machine and the model, and write
the JSON (stdout, ``--output``) and the Markdown table (``--markdown``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

from .measure import machine_info
from .workload import load_weights_or_warn


def add_common_options(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (KEY VALUE overrides follow the options)")
    parser.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cfg.device, else auto)")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help="also write a Markdown table of the main numbers to FILE (for docs/performance.md)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc as it is "
                             "(the tools apply util.runtime.perf.keep_freed_memory_for_reuse)")


def split_overrides(parser, argv) -> Tuple[object, list]:
    """(args, KEY VALUE overrides); an unknown ``--option`` is a command-line error."""
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        parser.error(f"unknown option(s) {unknown}; config overrides are given as KEY VALUE")
    return args, overrides


def start(args, overrides: Sequence[str]):
    """(cfg, device, allocator tuned?) as tool/train.py and tool/test.py start (measure what they run)."""
    from util.config import load_cfg
    from util.runtime.distributed import select_device
    from util.runtime.perf import keep_freed_memory_for_reuse

    cfg = load_cfg(args.config, list(overrides))
    malloc_tuned = False if args.default_malloc else keep_freed_memory_for_reuse()
    device = select_device(args.device or cfg.get("device"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as tool/test.py and tool/train.py
    return cfg, device, malloc_tuned


def describe(cfg, args, overrides, device: torch.device, malloc_tuned: bool) -> Dict:
    return {"config": args.config, "overrides": list(overrides),
            "machine": {**machine_info(device), "malloc_keeps_freed_memory": malloc_tuned},
            "model": {"arch": cfg.arch, "backbone": cfg.backbone_net, "layers": cfg.layers,
                      "classes": cfg.classes, "output_stride": cfg.backbone_output_stride},
            "warnings": []}


def benchmark_model(cfg, result: Dict) -> nn.Module:
    """The model the jobs time: seed 0, the weights of ``model_path`` when it exists (else random, with a warning)."""
    from model import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    result["model"]["weights"] = load_weights_or_warn(cfg, model, result["warnings"]) or "random"
    result["model"]["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return model


def write_outputs(result: Dict, args, table: Callable[[Dict], str]) -> None:
    text = json.dumps(result, indent=2)
    for path, content in ((args.output, text), (args.markdown, table(result) if args.markdown else "")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content + "\n", encoding="utf-8")
    print(text)
