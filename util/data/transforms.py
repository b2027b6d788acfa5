"""Paired image/label transforms for semantic segmentation training and validation.

Every transform is a callable ``t(image, label) -> (image, label)``:

* ``image``: float32 numpy array, HWC, RGB, values in 0..255 (before ``ToTensor``);
* ``label``: integer numpy array, HW, class ids with ``ignore_label`` (255) for "don't care".

After ``ToTensor`` the image is a ``torch.FloatTensor`` (C, H, W) and the label a ``torch.LongTensor``
(H, W); ``Normalize`` works on those tensors.

Labels are only ever moved with nearest-neighbour sampling and padded with ``ignore_label``, so every label
value after the transforms is a value of the input label or ``ignore_label``.

All randomness comes from Python's ``random`` module, so seeding ``random`` per sample (as
``util.data.dataset.SegDataset`` does) makes augmentation reproducible.
"""

from __future__ import annotations

import math
import numbers
import random
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from util.config import register_keys, require
from util.registry import Registry

# ImageNet statistics on the 0..255 scale, RGB order (the release's constants).
MEAN: list[float] = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD: list[float] = [0.229 * 255, 0.224 * 255, 0.225 * 255]

# Integer label types OpenCV warps/resizes without silent conversion.
_CV_LABEL_DTYPES = (np.uint8, np.uint16, np.int16, np.int32)

__all__ = [
    "MEAN", "STD", "Compose", "RandScale", "RandRotate", "RandomGaussianBlur", "RandomHorizontalFlip",
    "Crop", "ToTensor", "Normalize", "PhotometricDistortion", "TRAIN_TRANSFORMS", "register_train_transform",
    "build_train_transform", "build_val_transform",
]


def _check_pair(image, label, where: str) -> None:
    """Raise ValueError unless image is HW or HWC and label is HW with the same height and width."""
    if not isinstance(image, np.ndarray) or not isinstance(label, np.ndarray):
        raise ValueError(f"{where}: expected numpy arrays, got image {type(image).__name__} "
                         f"and label {type(label).__name__}")
    if image.ndim not in (2, 3):
        raise ValueError(f"{where}: image must be HxW or HxWxC, got shape {image.shape}")
    if label.ndim != 2:
        raise ValueError(f"{where}: label must be HxW (one class id per pixel), got shape {label.shape}")
    if image.shape[:2] != label.shape:
        raise ValueError(f"{where}: image is {image.shape[0]}x{image.shape[1]} but label is "
                         f"{label.shape[0]}x{label.shape[1]}")


def _cv_label(label: np.ndarray) -> np.ndarray:
    """Return the label in an integer dtype that OpenCV handles without changing values."""
    if label.dtype in _CV_LABEL_DTYPES:
        return label
    if not np.issubdtype(label.dtype, np.integer) and label.dtype != np.bool_:
        raise ValueError(f"label must have an integer dtype, got {label.dtype}")
    if label.size and (label.min() < np.iinfo(np.int32).min or label.max() > np.iinfo(np.int32).max):
        raise ValueError("label values do not fit in int32")
    return label.astype(np.int32)


def _keep_channel_axis(result: np.ndarray, original: np.ndarray) -> np.ndarray:
    """OpenCV drops a trailing channel axis of size 1; put it back so shapes stay HWC."""
    if original.ndim == 3 and result.ndim == 2:
        return result[:, :, None]
    return result


def _border_value(padding: Sequence[float] | float, channels: int) -> list[float]:
    """Per-channel constant for cv2 borders (cv2 takes at most 4 values)."""
    if isinstance(padding, numbers.Number):
        return [float(padding)] * min(channels, 4)
    values = [float(v) for v in padding]
    if len(values) != channels:
        raise ValueError(f"padding has {len(values)} values but the image has {channels} channels")
    if channels > 4:
        raise ValueError("padding with per-channel values supports at most 4 channels")
    return values


def _pair(value, name: str) -> tuple[float, float]:
    if isinstance(value, numbers.Number):
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    values = tuple(value)
    if len(values) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    low, high = float(values[0]), float(values[1])
    if low > high:
        raise ValueError(f"{name} must have min <= max, got {value!r}")
    return low, high


class Compose:
    """Apply transforms in order; checks the input pair once so errors name the real problem."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, label):
        if isinstance(image, np.ndarray):
            _check_pair(image, label, "transform input")
        for transform in self.transforms:
            image, label = transform(image, label)
        return image, label

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandScale:
    """Resize by a factor drawn uniformly from ``scale``; image bilinear, label nearest.

    ``aspect_ratio`` (optional (min, max)) additionally stretches width/height by sqrt(ratio)/1/sqrt(ratio),
    ratio drawn uniformly (the release's option; off by default).
    """

    def __init__(self, scale=(0.5, 2.0), aspect_ratio=None):
        self.scale = _pair(scale, "scale")
        if self.scale[0] <= 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        self.aspect_ratio = None if aspect_ratio is None else _pair(aspect_ratio, "aspect_ratio")
        if self.aspect_ratio is not None and self.aspect_ratio[0] <= 0:
            raise ValueError(f"aspect_ratio must be positive, got {aspect_ratio!r}")

    def __call__(self, image, label):
        factor = random.uniform(*self.scale)
        factor_x = factor_y = factor
        if self.aspect_ratio is not None:
            ratio = math.sqrt(random.uniform(*self.aspect_ratio))
            factor_x, factor_y = factor * ratio, factor / ratio
        height, width = label.shape[:2]
        size = (max(1, int(round(width * factor_x))), max(1, int(round(height * factor_y))))  # cv2: (w, h)
        new_image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        new_label = cv2.resize(_cv_label(label), size, interpolation=cv2.INTER_NEAREST)
        return _keep_channel_axis(new_image, image), new_label

    def __repr__(self) -> str:
        return f"RandScale(scale={self.scale}, aspect_ratio={self.aspect_ratio})"


class RandRotate:
    """With probability ``p`` rotate about the centre by an angle (degrees) drawn uniformly from ``rotate``.

    The image is sampled bilinearly with ``padding`` (per-channel, default the mean colour) outside the
    source; the label nearest-neighbour with ``ignore_label`` outside, so labels are never interpolated.
    """

    def __init__(self, rotate=(-10, 10), padding=MEAN, ignore_label: int = 255, p: float = 0.5):
        self.rotate = _pair(rotate, "rotate")
        self.padding = padding
        self.ignore_label = int(ignore_label)
        self.p = float(p)

    def __call__(self, image, label):
        if random.random() < self.p:
            angle = random.uniform(*self.rotate)
            height, width = label.shape[:2]
            matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
            channels = 1 if image.ndim == 2 else image.shape[2]
            new_image = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_CONSTANT,
                                       borderValue=_border_value(self.padding, channels))
            label = cv2.warpAffine(_cv_label(label), matrix, (width, height), flags=cv2.INTER_NEAREST,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=self.ignore_label)
            image = _keep_channel_axis(new_image, image)
        return image, label

    def __repr__(self) -> str:
        return f"RandRotate(rotate={self.rotate}, ignore_label={self.ignore_label}, p={self.p})"


class RandomGaussianBlur:
    """With probability ``p`` blur the image with a ``radius`` x ``radius`` Gaussian kernel (label untouched)."""

    def __init__(self, radius: int = 5, p: float = 0.5):
        if radius < 1 or radius % 2 == 0:
            raise ValueError(f"radius must be a positive odd kernel size, got {radius}")
        self.radius = int(radius)
        self.p = float(p)

    def __call__(self, image, label):
        if random.random() < self.p:
            blurred = cv2.GaussianBlur(image, (self.radius, self.radius), 0)
            image = _keep_channel_axis(blurred, image)
        return image, label

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(radius={self.radius}, p={self.p})"


class RandomHorizontalFlip:
    """With probability ``p`` mirror image and label left-right."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image, label):
        if random.random() < self.p:
            image = np.ascontiguousarray(image[:, ::-1])
            label = np.ascontiguousarray(label[:, ::-1])
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Crop:
    """Crop to ``size`` = (h, w) (or an int for a square), at a random or the centre position.

    Where the image is smaller than the crop it is first padded, split evenly around it
    (top = pad_h // 2, bottom = the rest; likewise left/right), image with ``padding`` and
    label with ``ignore_label``.
    """

    def __init__(self, size, crop_type: str = "center", padding=MEAN, ignore_label: int = 255):
        if isinstance(size, numbers.Number):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"crop size must be a positive int or (h, w), got {size!r}")
        if crop_type not in ("rand", "center"):
            raise ValueError(f"crop_type must be 'rand' or 'center', got {crop_type!r}")
        self.crop_h, self.crop_w = size
        self.crop_type = crop_type
        self.padding = padding
        self.ignore_label = int(ignore_label)

    def __call__(self, image, label):
        height, width = label.shape[:2]
        pad_h = max(self.crop_h - height, 0)
        pad_w = max(self.crop_w - width, 0)
        if pad_h > 0 or pad_w > 0:
            if self.padding is None:
                raise ValueError(f"image {height}x{width} is smaller than the crop "
                                 f"{self.crop_h}x{self.crop_w} and no padding value was given")
            top, left = pad_h // 2, pad_w // 2
            bottom, right = pad_h - top, pad_w - left
            channels = 1 if image.ndim == 2 else image.shape[2]
            padded = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                        value=_border_value(self.padding, channels))
            image = _keep_channel_axis(padded, image)
            label = cv2.copyMakeBorder(_cv_label(label), top, bottom, left, right, cv2.BORDER_CONSTANT,
                                       value=self.ignore_label)
            height, width = label.shape[:2]
        if self.crop_type == "rand":
            top = random.randint(0, height - self.crop_h)
            left = random.randint(0, width - self.crop_w)
        else:
            top = (height - self.crop_h) // 2
            left = (width - self.crop_w) // 2
        image = image[top:top + self.crop_h, left:left + self.crop_w]
        label = label[top:top + self.crop_h, left:left + self.crop_w]
        return np.ascontiguousarray(image), np.ascontiguousarray(label)

    def __repr__(self) -> str:
        return (f"Crop(size=({self.crop_h}, {self.crop_w}), crop_type={self.crop_type!r}, "
                f"ignore_label={self.ignore_label})")


class ToTensor:
    """numpy HWC float image -> FloatTensor (C, H, W); numpy HW integer label -> LongTensor (H, W).

    A 2-D image gets a channel axis of size 1.
    """

    def __call__(self, image, label):
        _check_pair(image, label, "ToTensor")
        if image.ndim == 2:
            image = image[:, :, None]
        if not np.issubdtype(label.dtype, np.integer) and label.dtype != np.bool_:
            raise ValueError(f"ToTensor: label must have an integer dtype, got {label.dtype}")
        image_tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
        label_tensor = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
        return image_tensor, label_tensor

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """(image - mean) / std per channel, on the (C, H, W) tensor from ``ToTensor``. ``std=None`` only subtracts."""

    def __init__(self, mean=MEAN, std=STD):
        self.mean = [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        if self.std is not None:
            if len(self.std) != len(self.mean):
                raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
            if any(s == 0 for s in self.std):
                raise ValueError("std values must be non-zero")

    def __call__(self, image, label):
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise ValueError("Normalize expects the (C, H, W) tensor produced by ToTensor; "
                             "put ToTensor before Normalize")
        if image.shape[0] != len(self.mean):
            raise ValueError(f"Normalize: image has {image.shape[0]} channels but mean has {len(self.mean)}")
        mean = torch.tensor(self.mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        image = image - mean
        if self.std is not None:
            std = torch.tensor(self.std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
            image = image / std
        return image, label

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class PhotometricDistortion:
    """Brightness, contrast, saturation and hue jitter of the image (the label is untouched), as
    mmsegmentation's PhotoMetricDistortion: each of the four with probability 1/2, in a random
    order; brightness adds ``uniform(-brightness, brightness)``, contrast and saturation multiply
    by ``uniform(*contrast)`` / ``uniform(*saturation)``, hue turns by ``uniform(-hue, hue)``
    degrees; values are clipped to 0..255 after each step. For 3-channel RGB float images.
    """

    def __init__(self, brightness: float = 32.0, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue: float = 36.0):
        self.brightness = float(brightness)
        self.contrast = _pair(contrast, "contrast")
        self.saturation = _pair(saturation, "saturation")
        self.hue = float(hue)

    def _brightness(self, image):
        return image + random.uniform(-self.brightness, self.brightness)

    def _contrast(self, image):
        return image * random.uniform(*self.contrast)

    def _in_hsv(self, image, channel: int, change):
        # float32 HSV: hue in degrees [0, 360), saturation and value in [0, 1]
        hsv = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.float32) / 255.0, cv2.COLOR_RGB2HSV)
        hsv[:, :, channel] = change(hsv[:, :, channel])
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0

    def _saturation(self, image):
        factor = random.uniform(*self.saturation)
        return self._in_hsv(image, 1, lambda s: np.clip(s * factor, 0.0, 1.0))

    def _hue(self, image):
        shift = random.uniform(-self.hue, self.hue)
        return self._in_hsv(image, 0, lambda h: np.mod(h + shift, 360.0))

    def __call__(self, image, label):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"PhotometricDistortion needs an HxWx3 RGB image, got shape {image.shape}")
        steps = [self._brightness, self._contrast, self._saturation, self._hue]
        random.shuffle(steps)
        image = image.astype(np.float32, copy=False)
        for step in steps:
            if random.random() < 0.5:
                image = np.clip(step(image), 0.0, 255.0).astype(np.float32, copy=False)
        return image, label

    def __repr__(self) -> str:
        return (f"PhotometricDistortion(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue})")


# ---------------------------------------------------------------------------------------------
# The training pipeline: registered steps, each ``builder(cfg) -> transform or None (off)``, run
# in registration order, then ToTensor and Normalize. The release's five steps come first.

TRAIN_TRANSFORMS = Registry("training transform", "build_train_transform")
register_train_transform = TRAIN_TRANSFORMS.register


def _check_keys(cfg) -> None:
    require(cfg.scale_min > 0 and cfg.scale_min <= cfg.scale_max,
            f"need 0 < scale_min <= scale_max, got {cfg.scale_min} and {cfg.scale_max}")
    require(cfg.rotate_min <= cfg.rotate_max,
            f"need rotate_min <= rotate_max, got {cfg.rotate_min} and {cfg.rotate_max}")


# Degrees as floats: a YAML "-10" loads as -10.0, and "rotate_min -7.5" is accepted.
register_keys("TRAIN", {"scale_min": 0.5, "scale_max": 2.0, "rotate_min": -10.0, "rotate_max": 10.0,
                        "photometric": False}, check=_check_keys)


@register_train_transform("scale")
def _scale(cfg):
    return RandScale((cfg.scale_min, cfg.scale_max))


@register_train_transform("rotate")
def _rotate(cfg):
    return RandRotate((cfg.rotate_min, cfg.rotate_max), padding=MEAN, ignore_label=cfg.ignore_label)


@register_train_transform("blur")
def _blur(cfg):
    return RandomGaussianBlur()


@register_train_transform("flip")
def _flip(cfg):
    return RandomHorizontalFlip()


@register_train_transform("crop")
def _crop(cfg):
    return Crop((cfg.train_h, cfg.train_w), crop_type="rand", padding=MEAN, ignore_label=cfg.ignore_label)


@register_train_transform("photometric")
def _photometric(cfg):
    # After the crop: jitters train_h x train_w pixels instead of an up to 2x scaled image (the
    # mean-colour padding of a small image is jittered with it; its label is ignore anyway).
    return PhotometricDistortion() if cfg.photometric else None


def build_train_transform(cfg) -> Compose:
    """The training augmentation: every registered step that ``cfg`` switches on (the release's
    scale, rotate, blur, flip, random crop; ``photometric``; a user's), then to tensor, normalise."""
    steps = [builder(cfg) for _, builder in TRAIN_TRANSFORMS.items()]
    return Compose([step for step in steps if step is not None] + [ToTensor(), Normalize(mean=MEAN, std=STD)])


def build_val_transform(cfg) -> Compose:
    """Validation during training: centre crop train_h x train_w (mean / ignore padding), to tensor, normalise."""
    return Compose([
        Crop((cfg.train_h, cfg.train_w), crop_type="center", padding=MEAN, ignore_label=cfg.ignore_label),
        ToTensor(),
        Normalize(mean=MEAN, std=STD),
    ])
