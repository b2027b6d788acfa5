"""Colour maps, overlays and PNG writing for segmentation outputs (RGB in memory, BGR only at cv2 I/O).

Palettes and class names are read by ``util.data.dataset.read_colors`` / ``read_names``;
:func:`config_palette` and :func:`config_class_names` pick them (or defaults) for a config.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

PathLike = Union[str, os.PathLike]


def default_palette(num_classes: int) -> np.ndarray:
    """A (num_classes, 3) uint8 RGB palette of well-separated colours (the PASCAL VOC bit-spreading
    scheme), for datasets without a ``colors_path``."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for class_id in range(num_classes):
        value, shift = class_id, 7
        red = green = blue = 0
        while value:
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
            shift -= 1
        palette[class_id] = (red, green, blue)
    return palette


def colorize(gray: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB image of a class-id map.

    Args:
        gray: HxW integer class ids.
        palette: (K, 3) uint8 RGB colours of classes 0..K-1.
    Ids outside 0..K-1 (e.g. 255 = ignore) are drawn black.
    """
    gray = np.asarray(gray)
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    ids = gray.astype(np.int64)
    known = (ids >= 0) & (ids < len(palette))
    if not len(palette):
        return np.zeros(gray.shape + (3,), dtype=np.uint8)
    color = palette[np.where(known, ids, 0)]
    color[~known] = 0
    return color


def overlay(image_rgb: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * color`` as uint8 RGB (image may be float 0..255 or uint8)."""
    image = np.asarray(image_rgb, dtype=np.float32)
    color = np.asarray(color, dtype=np.float32)
    if image.shape != color.shape:
        raise ValueError(f"image {image.shape} and colour map {color.shape} differ in shape")
    blended = (1.0 - alpha) * image + alpha * color
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def config_palette(cfg) -> np.ndarray:
    """The (classes, 3) RGB palette of ``cfg.colors_path``, or :func:`default_palette`."""
    from util.data.dataset import read_colors

    return read_colors(cfg.colors_path, cfg.classes) if cfg.colors_path else default_palette(cfg.classes)


def config_class_names(cfg) -> list:
    """The class names of ``cfg.names_path``, or the class ids as strings."""
    from util.data.dataset import read_names

    return read_names(cfg.names_path, cfg.classes) if cfg.names_path else [str(c) for c in range(cfg.classes)]


def _write(path: PathLike, array: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write image {path}")


def save_gray(path: PathLike, gray: np.ndarray) -> None:
    """Write class ids as a single-channel uint8 PNG (ids must be 0..255)."""
    gray = np.asarray(gray)
    if gray.size and (gray.min() < 0 or gray.max() > 255):
        raise ValueError("class ids must fit in uint8 to be written as a gray PNG")
    _write(path, gray.astype(np.uint8))


def save_rgb(path: PathLike, image_rgb: np.ndarray) -> None:
    """Write an HxWx3 uint8 RGB image (converted to cv2's BGR order)."""
    _write(path, cv2.cvtColor(np.ascontiguousarray(image_rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR))
