"""Segmentation architectures: PyConvSegNet (``arch: pyconvsegnet``) and PSPNet (``arch: psp``).

Both put a context head on layer4 of a backbone and an auxiliary classifier on layer3. The
backbone's ``layer0..layer4`` become direct children of the model so that state-dict keys are
exactly the release's (``layer0.*``, ``pyconvhead.*`` / ``ppm.*``, ``cls.*``, ``aux.*``).

Shapes: input ``(N, 3, H, W)`` with ``(H - 1) % 8 == 0 and (W - 1) % 8 == 0``; logits
``(N, classes, (H - 1) / 8 * zoom + 1, (W - 1) / 8 * zoom + 1)``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .pyconv import PyConv
from .registry import register_arch

ZOOM_FACTORS = (1, 2, 4, 8)


def output_size(height: int, width: int, zoom_factor: int) -> Tuple[int, int]:
    """Logit size for an input of ``height x width`` (both ``8k + 1``)."""
    if (height - 1) % 8 != 0 or (width - 1) % 8 != 0:
        raise ValueError(f"input height and width must satisfy (size - 1) % 8 == 0 (e.g. 65, 473, 713), "
                         f"got {height}x{width}")
    return (height - 1) // 8 * zoom_factor + 1, (width - 1) // 8 * zoom_factor + 1


def resize_to(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=True) resize, skipped when ``x`` already has ``size``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def pyconv4(channels: int) -> PyConv:
    """The head's 4-level PyConv: kernels 3/5/7/9, groups 1/4/8/16, a quarter of the channels each."""
    return PyConv(channels, [channels // 4] * 4, kernels=(3, 5, 7, 9), groups=(1, 4, 8, 16))


def auxiliary_classifier(in_channels: int, classes: int, hidden: int = 256, dropout: float = 0.1) -> nn.Sequential:
    """The layer3 classifier used for the auxiliary training loss."""
    return nn.Sequential(*conv_bn_relu(in_channels, hidden, 3), nn.Dropout2d(dropout),
                         nn.Conv2d(hidden, classes, kernel_size=1))


class SegmentationModel(nn.Module):
    """Backbone stages + a head on layer4 (``decode``) + ``aux`` on layer3.

    eval mode: ``model(x) -> logits``; train mode: ``model(x) -> (logits, aux_logits)``, both at
    the same size. Subclasses build their head in ``__init__`` and implement :meth:`decode`.
    """

    def __init__(self, backbone: nn.Module, classes: int, zoom_factor: int = 8):
        super().__init__()
        if zoom_factor not in ZOOM_FACTORS:
            raise ValueError(f"zoom_factor must be one of {list(ZOOM_FACTORS)}, got {zoom_factor}")
        if not isinstance(classes, int) or classes < 1:
            raise ValueError(f"classes must be a positive integer, got {classes!r}")
        self.zoom_factor = zoom_factor
        self.classes = classes
        self.backbone_output_stride = getattr(backbone, "output_stride", None)
        # Children of the model itself (not of a `backbone` submodule): the release's key names.
        for name in ("layer0", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(backbone, name))
        self.layer3_channels = backbone.layer3_channels
        self.layer4_channels = backbone.layer4_channels

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """layer4 features -> logits at feature resolution."""
        raise NotImplementedError

    def head_modules(self) -> List[nn.Module]:
        """Modules trained with the larger learning rate (head, classifier, auxiliary)."""
        raise NotImplementedError

    def backbone_modules(self) -> List[nn.Module]:
        return [self.layer0, self.layer1, self.layer2, self.layer3, self.layer4]

    def classifier_layers(self) -> List[str]:
        """Names of the final layers that output one channel per class, of the main head and the auxiliary
        classifier (``cls.1``, ``aux.4``): the layers fine-tuning on another number of classes replaces.
        Found as the last convolution of each of :meth:`head_modules`, so a registered head needs nothing more."""
        names = {module: name for name, module in self.named_modules()}
        found = []
        for head in self.head_modules():
            convolutions = [module for module in head.modules() if isinstance(module, nn.Conv2d)]
            if convolutions and convolutions[-1].out_channels == self.classes:
                found.append(names[convolutions[-1]])
        return found

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        size = output_size(x.shape[-2], x.shape[-1], self.zoom_factor)
        x = self.layer2(self.layer1(self.layer0(x)))
        layer3 = self.layer3(x)
        logits = self._zoom(self.decode(self.layer4(layer3)), size)
        if self.training:
            # The auxiliary logits always match the main ones, so one target serves both losses.
            return logits, resize_to(self.aux(layer3), tuple(logits.shape[-2:]))
        return logits

    def _zoom(self, logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        # As in the release, zoom_factor 1 means "no upsampling": the logits stay at the feature
        # resolution (which is the (H-1)/8+1 grid at output stride 8, coarser at 16 and 32).
        return logits if self.zoom_factor == 1 else resize_to(logits, size)


class LocalPyConvBlock(nn.Module):
    """Local context: 1x1 reduce, PyConv4, 1x1 (``layers``)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.layers = nn.Sequential(*conv_bn_relu(in_channels, channels), pyconv4(channels),
                                    nn.BatchNorm2d(channels), nn.ReLU(inplace=True), *conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GlobalPyConvBlock(nn.Module):
    """Global context: the same on a ``bins x bins`` average-pooled map, upsampled back (``features``)."""

    def __init__(self, in_channels: int, channels: int, bins: int = 9):
        super().__init__()
        self.features = nn.Sequential(nn.AdaptiveAvgPool2d(bins), *conv_bn_relu(in_channels, channels),
                                      pyconv4(channels), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                      *conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.features(x), size=x.shape[-2:], mode="bilinear", align_corners=True)


class MergeLocalGlobal(nn.Module):
    """3x3 conv on the concatenated local and global context (``features``)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.features = nn.Sequential(*conv_bn_relu(in_channels, channels, 3))

    def forward(self, local_context: torch.Tensor, global_context: torch.Tensor) -> torch.Tensor:
        return self.features(torch.cat([local_context, global_context], dim=1))


class PyConvHead(nn.Module):
    """The PyConvSegNet head: local and global pyramidal context, merged; output ``out_channels``."""

    def __init__(self, in_channels: int = 2048, channels: int = 512, out_channels: int = 256):
        super().__init__()
        self.local_context = LocalPyConvBlock(in_channels, channels)
        self.global_context = GlobalPyConvBlock(in_channels, channels)
        self.merge_context = MergeLocalGlobal(2 * channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge_context(self.local_context(x), self.global_context(x))


@register_arch("pyconvsegnet")
class PyConvSegNet(SegmentationModel):
    """PyConvSegNet: ``pyconvhead`` -> ``cls`` (dropout, 1x1 conv); ``aux`` on layer3."""

    def __init__(self, backbone: nn.Module, classes: int, zoom_factor: int = 8, dropout: float = 0.1):
        super().__init__(backbone, classes, zoom_factor)
        head_channels = 256
        self.pyconvhead = PyConvHead(self.layer4_channels, 512, head_channels)
        # Registered before `cls`, as in the release, so the key order matches its checkpoints.
        self.aux = auxiliary_classifier(self.layer3_channels, classes, dropout=dropout)
        self.cls = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(head_channels, classes, kernel_size=1))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return self.cls(self.pyconvhead(features))

    def head_modules(self) -> List[nn.Module]:
        return [self.pyconvhead, self.cls, self.aux]


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling: ``x`` concatenated with upsampled pooled context at each bin size."""

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_relu(in_channels, channels)) for b in bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(f(x), size=size, mode="bilinear", align_corners=True) for f in self.features]
        return torch.cat([x] + pooled, dim=1)


@register_arch("psp")
class PSPNet(SegmentationModel):
    """PSPNet baseline: ``ppm`` -> ``cls`` (3x3 conv, BN, ReLU, dropout, 1x1 conv); ``aux`` on layer3."""

    def __init__(self, backbone: nn.Module, classes: int, zoom_factor: int = 8, dropout: float = 0.1,
                 bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__(backbone, classes, zoom_factor)
        in_channels = self.layer4_channels
        reduction = in_channels // len(bins)
        self.ppm = PyramidPooling(in_channels, reduction, bins)
        self.cls = nn.Sequential(*conv_bn_relu(in_channels + reduction * len(bins), 512, 3), nn.Dropout2d(dropout),
                                 nn.Conv2d(512, classes, kernel_size=1))
        self.aux = auxiliary_classifier(self.layer3_channels, classes, dropout=dropout)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return self.cls(self.ppm(features))

    def head_modules(self) -> List[nn.Module]:
        return [self.ppm, self.cls, self.aux]
