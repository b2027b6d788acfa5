"""Pyramidal convolution (PyConv, Duta et al. 2020).

A PyConv applies several convolutions with growing kernel sizes (and growing group counts, so the
cost stays moderate) to the same input in parallel and concatenates their outputs along channels.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn


class PyConv(nn.Module):
    """Parallel grouped convolutions ``conv2_1 .. conv2_N`` whose outputs are concatenated.

    The level names match the release so that, used as the ``conv2`` of a bottleneck, the
    state-dict keys are ``layerX.Y.conv2.conv2_1.weight`` etc.

    Args:
        in_channels: input channels (shared by all levels).
        out_channels: output channels of each level; the output has ``sum(out_channels)``.
        kernels: kernel size of each level (odd).
        groups: group count of each level.
        stride: stride of every level.
        dilation: dilation of every level; padding is ``dilation * (k // 2)`` so that all
            levels produce the same spatial size.
    """

    def __init__(self, in_channels: int, out_channels: Sequence[int], kernels: Sequence[int],
                 groups: Sequence[int], stride: int = 1, dilation: int = 1):
        super().__init__()
        if not (len(out_channels) == len(kernels) == len(groups)) or len(kernels) == 0:
            raise ValueError(f"PyConv needs one out_channels/kernel/groups entry per level, got "
                             f"{list(out_channels)}, {list(kernels)}, {list(groups)}")
        for level, (channels, kernel, group) in enumerate(zip(out_channels, kernels, groups), start=1):
            self.add_module(f"conv2_{level}", level_conv(in_channels, channels, kernel, group, stride, dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([level(x) for level in self.children()], dim=1)


def level_conv(in_channels: int, out_channels: int, kernel: int, groups: int = 1, stride: int = 1,
               dilation: int = 1) -> nn.Conv2d:
    """A bias-free k x k convolution that keeps the spatial size at stride 1 (for odd k)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=kernel, stride=stride,
                     padding=dilation * (kernel // 2), dilation=dilation, groups=groups, bias=False)


def split_channels(total: int, divisors: Sequence[int]) -> List[int]:
    """Per-level channel counts ``total // d`` for each divisor, checked to add up to ``total``.

    E.g. ``split_channels(128, [4, 4, 2]) == [32, 32, 64]`` (the release's 1/4, 1/4, 1/2 split).
    """
    channels = [total // d for d in divisors]
    if sum(channels) != total or any(total % d for d in divisors):
        raise ValueError(f"cannot split {total} channels as 1/{' + 1/'.join(map(str, divisors))}")
    return channels


def pyconv_or_conv(in_channels: int, out_channels: Sequence[int], kernels: Sequence[int],
                   groups: Sequence[int], stride: int = 1, dilation: int = 1) -> nn.Module:
    """A PyConv, or a plain ``nn.Conv2d`` when there is a single level (as the release's layer4)."""
    if len(kernels) == 1:
        return level_conv(in_channels, out_channels[0], kernels[0], groups[0], stride, dilation)
    return PyConv(in_channels, out_channels, kernels, groups, stride, dilation)
