"""GFLOP of the timed work, counted on the ``meta`` device (shapes only, instant)."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
from torch import nn


def forward_gflop(cfg, height: int, width: int) -> float:
    """GFLOP of one eval-mode forward of one ``height x width`` crop (as tool/analysis_tools/summary.py prints it)."""
    from model.summary import summarize

    return summarize(cfg, height, width)["gflop"]


def train_step_gflop(cfg, batch: int, height: int, width: int) -> Dict[str, float]:
    """GFLOP of one training step (train-mode forward with aux, backward), batch ``batch``.

    Forward: FlopCounterMode. Backward: for every convolution its grad-input (when the input needs a
    gradient: not for the stem, whose input is the image) and grad-weight products, each as many
    FLOP as the forward convolution. (``FlopCounterMode`` counts grouped-convolution backward
    ``groups`` times too high, so it is not used for the backward.)
    """
    from torch.utils.flop_counter import FlopCounterMode

    from model import build_model

    with torch.device("meta"):
        model = build_model(cfg).train()
    conv_flop: List[Tuple[float, bool]] = []

    def hook(module: nn.Conv2d, inputs, output) -> None:
        macs_per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        conv_flop.append((2.0 * output.numel() * macs_per_output, inputs[0].requires_grad))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(batch, 3, height, width, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    forward = counter.get_total_flops()
    backward = sum(flop * (2 if needs_input_grad else 1) for flop, needs_input_grad in conv_flop)
    # (The stem's input needs no gradient; all other convolutions see activations of parameters.)
    return {"forward": forward / 1e9, "backward": backward / 1e9, "total": (forward + backward) / 1e9}
