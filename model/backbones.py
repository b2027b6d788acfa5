"""Bottleneck backbones: ResNet, PyConvResNet and PyConvHGResNet with a chosen output stride.

Every backbone exposes ``layer0`` (the stem) and ``layer1 .. layer4`` (the four stages); parameter
names match the release (and, through the ``conv1/bn1 -> layer0.0/layer0.1`` renaming done by
``util.runtime.checkpoint_io.load_pretrained_backbone``, the ImageNet classification checkpoints).

Output stride. ``output_stride`` 32 is the classification network. Smaller output strides replace
the stride of the last stages by dilation, exactly as the release did (which is *not* torchvision's
``replace_stride_with_dilation``: here every block of a dilated stage, the first included, uses
the stage's dilation):

====  =========================================  =========================================
OS    layer3                                     layer4
====  =========================================  =========================================
32    stride 2, dilation 1                       stride 2, dilation 1
16    stride 2, dilation 1                       stride 1, dilation 2
8     stride 1, dilation 2                       stride 1, dilation 4
====  =========================================  =========================================

A k x k level gets padding ``dilation * (k // 2)``. The first block of a stage whose stride was
removed keeps its shortcut *structure* (for PyConv backbones the 3x3 max-pool, for ResNet the
1x1 conv) but with stride 1. Everything is decided at construction time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .pyconv import level_conv, pyconv_or_conv, split_channels
from .registry import register_backbone

# Blocks per stage for each supported depth (the same for all three families).
STAGE_BLOCKS: Dict[int, Tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
OUTPUT_STRIDES = (8, 16, 32)

# PyConv levels per stage: kernel sizes and the fraction (1/d) of the stage width each level gets.
PYCONV_KERNELS = ((3, 5, 7, 9), (3, 5, 7), (3, 5), (3,))
PYCONV_SPLITS = ((4, 4, 4, 4), (4, 4, 2), (2, 2), (1,))
PYCONVRESNET_GROUPS = ((1, 4, 8, 16), (1, 4, 8), (1, 4), (1,))
PYCONVHGRESNET_GROUPS = ((32, 32, 32, 32), (32, 64, 64), (32, 64), (32,))


@dataclass(frozen=True)
class StagePlan:
    """How a stage's first block moves over the image.

    Attributes:
        downsamples: the stage downsamples in the classification network (it has a strided
            shortcut, whose modules are kept even when dilation removes the stride).
        stride: the stride actually used by the first block.
        dilation: dilation of the k x k convolutions of every block of the stage.
    """
    downsamples: bool
    stride: int
    dilation: int


def stage_plans(output_stride: int, first_stage_stride: int) -> List[StagePlan]:
    """The four stages' plans for ``output_stride`` (see the module docstring)."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"backbone output stride must be one of {list(OUTPUT_STRIDES)}, got {output_stride}")
    dilated = {32: (1, 1), 16: (1, 2), 8: (2, 4)}[output_stride]  # dilation of layer3, layer4
    plans = [StagePlan(first_stage_stride != 1, first_stage_stride, 1), StagePlan(True, 2, 1)]
    for dilation in dilated:
        plans.append(StagePlan(True, 2 if dilation == 1 else 1, dilation))
    return plans


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce -> k x k (``conv2``, plain or pyramidal) -> 1x1 expand, plus the shortcut."""

    def __init__(self, in_channels: int, width: int, out_channels: int, conv2: nn.Module,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv2
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# (in_channels, width, stride, dilation) -> the block's k x k conv
Conv2Factory = Callable[[int, int, int, int], nn.Module]
# (in_channels, out_channels, plan) -> shortcut module or None
ShortcutFactory = Callable[[int, int, StagePlan], Optional[nn.Module]]


class Backbone(nn.Module):
    """Stem ``layer0`` and four bottleneck stages ``layer1..layer4``: a container without a
    forward of its own, since the segmentation model adopts the stages and runs them itself.

    Args:
        stem: the ``layer0`` module (stride 2 or 4).
        widths: inner width of the bottlenecks of each stage.
        expansion: stage output channels = width * expansion.
        blocks: number of bottlenecks per stage.
        plans: per-stage stride/dilation (see :func:`stage_plans`).
        conv2_factories: per stage, builds the k x k conv of a block.
        shortcut_factory: builds the first block's shortcut.
        stem_channels: channels out of the stem.
    """

    def __init__(self, stem: nn.Module, widths: Sequence[int], expansion: int, blocks: Sequence[int],
                 plans: Sequence[StagePlan], conv2_factories: Sequence[Conv2Factory],
                 shortcut_factory: ShortcutFactory, stem_channels: int = 64):
        super().__init__()
        self.layer0 = stem
        in_channels = stem_channels
        stage_channels = []
        for index, (width, count, plan, make_conv2) in enumerate(
                zip(widths, blocks, plans, conv2_factories), start=1):
            out_channels = width * expansion
            layers = [Bottleneck(in_channels, width, out_channels, make_conv2(width, width, plan.stride, plan.dilation),
                                 shortcut_factory(in_channels, out_channels, plan))]
            for _ in range(1, count):
                layers.append(Bottleneck(out_channels, width, out_channels,
                                         make_conv2(width, width, 1, plan.dilation)))
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            in_channels = out_channels
            stage_channels.append(out_channels)
        self.layer3_channels = stage_channels[2]
        self.layer4_channels = stage_channels[3]
        self.output_stride = _total_stride(stem, plans)
        initialize_backbone(self)


def _total_stride(stem: nn.Module, plans: Sequence[StagePlan]) -> int:
    stride = 1
    for module in stem.modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            s = module.stride
            stride *= s[0] if isinstance(s, tuple) else s
    for plan in plans:
        stride *= plan.stride
    return stride


def initialize_backbone(module: nn.Module) -> None:
    """He (fan-out) init for convolutions, identity BN, as torchvision and the PyConv release do."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _stage_blocks(family: str, layers: int) -> Tuple[int, int, int, int]:
    if layers not in STAGE_BLOCKS:
        raise ValueError(f"{family} supports layers {sorted(STAGE_BLOCKS)}, got {layers}")
    return STAGE_BLOCKS[layers]


# ---------------------------------------------------------------------------------------------
# ResNet


def _resnet_conv2(in_channels: int, width: int, stride: int, dilation: int) -> nn.Module:
    return level_conv(in_channels, width, 3, 1, stride, dilation)


def _resnet_shortcut(in_channels: int, out_channels: int, plan: StagePlan) -> Optional[nn.Module]:
    if plan.downsamples or in_channels != out_channels:
        return nn.Sequential(conv1x1(in_channels, out_channels, plan.stride), nn.BatchNorm2d(out_channels))
    return None


@register_backbone("resnet")
def build_resnet(layers: int = 50, output_stride: int = 8) -> Backbone:
    """torchvision-style ResNet-50/101/152; ``layer0 = (conv1 7x7/2, bn1, relu, maxpool 3x3/2)``."""
    stem = nn.Sequential(nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                         nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    return Backbone(stem, widths=(64, 128, 256, 512), expansion=4, blocks=_stage_blocks("resnet", layers),
                    plans=stage_plans(output_stride, first_stage_stride=1),
                    conv2_factories=[_resnet_conv2] * 4, shortcut_factory=_resnet_shortcut)


# ---------------------------------------------------------------------------------------------
# PyConvResNet / PyConvHGResNet


def _pyconv_shortcut(in_channels: int, out_channels: int, plan: StagePlan) -> Optional[nn.Module]:
    # The release downsamples the shortcut with a 3x3 max-pool before the 1x1 conv; when dilation
    # removes the stride the max-pool stays (stride 1) and still smooths the shortcut.
    if plan.downsamples and in_channels != out_channels:
        return nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=plan.stride, padding=1),
                             conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels))
    if in_channels != out_channels:
        return nn.Sequential(conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels))
    if plan.downsamples:
        return nn.MaxPool2d(kernel_size=3, stride=plan.stride, padding=1)
    return None


def _pyconv_conv2_factory(stage: int, groups: Sequence[Sequence[int]]) -> Conv2Factory:
    kernels, divisors, stage_groups = PYCONV_KERNELS[stage], PYCONV_SPLITS[stage], groups[stage]

    def make(in_channels: int, width: int, stride: int, dilation: int) -> nn.Module:
        return pyconv_or_conv(in_channels, split_channels(width, divisors), kernels, stage_groups, stride, dilation)

    return make


def _build_pyconv_family(family: str, layers: int, output_stride: int, widths: Sequence[int], expansion: int,
                         groups: Sequence[Sequence[int]]) -> Backbone:
    # No max-pool in the stem: the first stage downsamples instead.
    stem = nn.Sequential(nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                         nn.ReLU(inplace=True))
    return Backbone(stem, widths=widths, expansion=expansion, blocks=_stage_blocks(family, layers),
                    plans=stage_plans(output_stride, first_stage_stride=2),
                    conv2_factories=[_pyconv_conv2_factory(stage, groups) for stage in range(4)],
                    shortcut_factory=_pyconv_shortcut)


@register_backbone("pyconvresnet")
def build_pyconvresnet(layers: int = 50, output_stride: int = 8) -> Backbone:
    """PyConvResNet-50/101/152 (expansion 4, pyramidal 3x3 convolutions)."""
    return _build_pyconv_family("pyconvresnet", layers, output_stride, widths=(64, 128, 256, 512), expansion=4,
                                groups=PYCONVRESNET_GROUPS)


@register_backbone("pyconvhgresnet")
def build_pyconvhgresnet(layers: int = 50, output_stride: int = 8) -> Backbone:
    """PyConvHGResNet-50/101/152 (expansion 2, doubled widths, high group counts)."""
    return _build_pyconv_family("pyconvhgresnet", layers, output_stride, widths=(128, 256, 512, 1024), expansion=2,
                                groups=PYCONVHGRESNET_GROUPS)


# The depths each built-in family can build (the config check reads this, see model/registry.py).
for _builder in (build_resnet, build_pyconvresnet, build_pyconvhgresnet):
    _builder.supported_layers = tuple(STAGE_BLOCKS)
