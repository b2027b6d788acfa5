"""Pyramidal convolution (PyConv, Duta et al. 2020).

A PyConv applies several convolutions with growing kernel sizes (and growing group counts, so the
cost stays moderate) to the same input in parallel and concatenates their outputs along channels.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
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


class SingleOutputGroupConv2d(nn.Conv2d):
    """A grouped convolution with one output channel per group and several inputs per group
    (e.g. PyConvResNet layer1's 9x9 level: 64 -> 16 channels in 16 groups of 4 -> 1), computed as
    a depthwise convolution followed by a sum over each group's channels.

    Same parameters (``weight`` of shape (groups, in/groups, k, k)) and the same function up to
    float summation order: the depthwise kernel ``c`` is ``weight.view(in, 1, k, k)[c]``, i.e.
    input channel ``c`` of group ``c // (in/groups)``. Why: oneDNN (PyTorch's CPU convolutions)
    has no fast kernel for groups of several inputs and one output and runs them at a small
    fraction of the machine's rate, while its depthwise kernels are well optimised. What that is
    worth depends on the CPU and the network (PyConvHGResNet has many such levels, PyConvResNet
    one); the benchmark (docs/performance.md) measures it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_per_group = self.in_channels // self.groups
        depthwise = F.conv2d(x, self.weight.reshape(self.in_channels, 1, *self.kernel_size), None, self.stride,
                             self.padding, self.dilation, self.in_channels)
        n, _, height, width = depthwise.shape
        if depthwise.is_contiguous(memory_format=torch.channels_last) and not depthwise.is_contiguous():
            # Channels innermost: the group sum reads contiguous runs, the result stays channels_last.
            out = depthwise.permute(0, 2, 3, 1).reshape(n, height, width, self.groups, in_per_group).sum(-1)
            out = out.permute(0, 3, 1, 2)
        else:
            out = depthwise.reshape(n, self.groups, in_per_group, height, width).sum(2)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


def level_conv(in_channels: int, out_channels: int, kernel: int, groups: int = 1, stride: int = 1,
               dilation: int = 1) -> nn.Conv2d:
    """A bias-free k x k convolution that keeps the spatial size at stride 1 (for odd k).

    Groups of several inputs and one output use :class:`SingleOutputGroupConv2d` (same weights,
    same function, faster on the CPU)."""
    conv_class = nn.Conv2d
    if groups > 1 and out_channels == groups and in_channels > groups:
        conv_class = SingleOutputGroupConv2d
    return conv_class(in_channels, out_channels, kernel_size=kernel, stride=stride,
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
