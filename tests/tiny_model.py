"""A test-only network for the tests whose subject is the pipeline (training, resuming, testing, processes),
not the network: backbone ``test_tiny`` and architecture ``test_tiny_seg``, registered through the project's
registries like any user's file.

A config selects them with ``custom_imports: [<this file>]`` (:data:`TINY_MODEL_KEYS` in a YAML,
:data:`TINY_MODEL_OPTS` on a command line), so the processes a test starts (``tool/train.py``, torchrun, spawn)
register them too. About 2,600 parameters: a checkpoint is
kilobytes, a training step on a 65x65 crop milliseconds. Same interface as the real ones: ``layer0..layer4``
(the backbone's output stride 8/16/32 by striding or dilating layer3 and layer4), a head on layer4 ending in
``cls`` (its last layer a 1x1 convolution to the classes) and an auxiliary classifier ``aux`` on layer3, with
BatchNorm throughout (SyncBatchNorm, folding and the running statistics behave as in the real network).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from torch import nn

from model.registry import register_arch, register_backbone
from model.segmentation import SegmentationModel, auxiliary_classifier, conv_bn_relu

BACKBONE = "test_tiny"
ARCH = "test_tiny_seg"
# The config keys that select this network: the file imports itself in every process that reads the config.
TINY_MODEL_KEYS = {"custom_imports": [str(Path(__file__).resolve())], "arch": ARCH, "backbone_net": BACKBONE}
# The same as command-line overrides (KEY VALUE ...), for a repository config.
TINY_MODEL_OPTS = ["custom_imports", str(Path(__file__).resolve()), "arch", ARCH, "backbone_net", BACKBONE]

# output stride -> (stride, dilation) of layer3 and of layer4
_LAYER3_LAYER4 = {8: ((1, 2), (1, 4)), 16: ((2, 1), (1, 2)), 32: ((2, 1), (2, 1))}


def _stage(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation,
                                   bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class TinyBackbone(nn.Module):
    """Five 3x3 convolution stages: stride 4 after layer0 (convolution and max pooling, as the ResNet stem),
    8 after layer2, then ``output_stride`` after layer4; ``width`` channels up to layer2, twice that after."""

    def __init__(self, output_stride: int = 8, width: int = 4):
        super().__init__()
        (stride3, dilation3), (stride4, dilation4) = _LAYER3_LAYER4[output_stride]
        self.layer0 = nn.Sequential(*_stage(3, width, stride=2), nn.MaxPool2d(3, stride=2, padding=1))
        self.layer1 = _stage(width, width)
        self.layer2 = _stage(width, width, stride=2)
        self.layer3 = _stage(width, 2 * width, stride3, dilation3)
        self.layer4 = _stage(2 * width, 2 * width, stride4, dilation4)
        self.layer3_channels = self.layer4_channels = 2 * width
        self.output_stride = output_stride


@register_backbone(BACKBONE)
def build_test_tiny(layers: int = 50, output_stride: int = 8) -> TinyBackbone:
    """``layers`` is accepted and ignored: the tiny backbone has one depth."""
    return TinyBackbone(output_stride=output_stride)


@register_arch(ARCH)
class TinySegNet(SegmentationModel):
    """``head`` (3x3 convolution, BN, ReLU) -> ``cls`` (dropout, 1x1 convolution); ``aux`` on layer3."""

    def __init__(self, backbone: nn.Module, classes: int, zoom_factor: int = 8, dropout: float = 0.1,
                 channels: int = 8):
        super().__init__(backbone, classes, zoom_factor)
        self.head = nn.Sequential(*conv_bn_relu(self.layer4_channels, channels, 3))
        self.aux = auxiliary_classifier(self.layer3_channels, classes, hidden=channels, dropout=dropout)
        self.cls = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, classes, kernel_size=1))

    def decode(self, features):
        return self.cls(self.head(features))

    def head_modules(self) -> List[nn.Module]:
        return [self.head, self.cls, self.aux]
