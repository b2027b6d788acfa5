"""Generate the demo dataset: small synthetic scenes in ADE20K's raw on-disk layout.

    python tool/dataset_converters/make_demo_data.py data/demo [--train 240 --val 24 --size 128 128 --seed 0]

writes::

    OUT_DIR/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_NNNNNNNN.jpg
    OUT_DIR/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_NNNNNNNN.png

with ADE20K's raw label convention: 0 = "other" (not labelled), 1..4 the classes below. Then
``python tool/dataset_converters/prepare_ade20k.py OUT_DIR/ADEChallengeData2016`` makes the 0-based
labels and lists, exactly as for the real ADE20K.

Each scene is a textured background (class 1) with a few coloured shapes drawn over it:
red-ish discs (2), green-ish rectangles (3) and blue-ish triangles (4), with per-shape colour jitter,
pixel noise and occlusions. A 1-2 pixel band of label 0 ("other") runs along every class boundary,
so training and evaluation exercise the ignore label. Shapes and colours are easy enough that
PyConvResNet-50 learns them from scratch in a few CPU minutes.

Deterministic: every image is a function of (seed, split, index) only, so the files are identical
on every run and machine (given the same OpenCV JPEG encoder), and ``--train 500`` starts with the
same 240 images as ``--train 240``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

CLASS_NAMES = ("background", "disc", "rectangle", "triangle")  # raw labels 1..4
OTHER = 0  # ADE20K's raw "other": becomes the ignore label 255 after prepare_ade20k
BACKGROUND, DISC, RECTANGLE, TRIANGLE = 1, 2, 3, 4
SPLITS = {"training": "train", "validation": "val"}  # ADE20K folder -> file name part
JPEG_QUALITY = 95


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """A generator owned by one image: independent of how many images are made or in which order."""
    return np.random.default_rng([int(seed), sorted(SPLITS).index(split), int(index)])


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], HxW: a random ``cells x cells`` grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC), -1.0, 1.0)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Textured, low-saturation background (gray / beige / slate), float32 HxWx3 RGB."""
    base = rng.uniform(70, 190)
    tint = rng.uniform(-18, 18, size=3)  # a slight colour cast, never a saturated colour
    texture = _smooth_noise(rng, height, width, cells=int(rng.integers(3, 9)))[..., None] * rng.uniform(15, 35)
    return np.broadcast_to(base + tint, (height, width, 3)) + texture


def _object_colour(rng: np.random.Generator, class_id: int) -> np.ndarray:
    """A saturated colour whose dominant channel identifies the class (red disc, green rectangle, blue triangle)."""
    dominant = {DISC: 0, RECTANGLE: 1, TRIANGLE: 2}[class_id]
    colour = rng.uniform(0, 70, size=3)
    colour[dominant] = rng.uniform(170, 255)
    return colour


def _draw_shape(rng: np.random.Generator, class_id: int, height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of one randomly placed and sized shape of ``class_id``."""
    mask = np.zeros((height, width), dtype=np.uint8)
    short = min(height, width)
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    if class_id == DISC:
        radius = int(rng.uniform(0.12, 0.26) * short)
        cv2.circle(mask, (cx, cy), radius, 1, thickness=-1)
    elif class_id == RECTANGLE:
        half_w, half_h = (rng.uniform(0.12, 0.27, size=2) * short).astype(int)
        cv2.rectangle(mask, (cx - half_w, cy - half_h), (cx + half_w, cy + half_h), 1, thickness=-1)
    else:
        size = rng.uniform(0.17, 0.34) * short
        angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.0, 4.0]) * np.pi / 3
        corners = np.stack([cx + size * np.cos(angles), cy + size * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    return mask.astype(bool)


def make_scene(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 HxWx3 RGB image, uint8 HxW raw label with 0 = other, 1..4 classes)."""
    image = _background(rng, height, width)
    label = np.full((height, width), BACKGROUND, dtype=np.uint8)
    for _ in range(int(rng.integers(3, 7))):
        class_id = int(rng.choice([DISC, RECTANGLE, TRIANGLE]))
        mask = _draw_shape(rng, class_id, height, width)
        if not mask.any():
            continue
        shading = _smooth_noise(rng, height, width, cells=3)[..., None] * 20.0  # uneven lighting
        image = np.where(mask[..., None], _object_colour(rng, class_id) + shading, image)
        label[mask] = class_id
    # "other" along every boundary between classes: pixels whose 3x3 neighbourhood holds two labels.
    kernel = np.ones((3, 3), dtype=np.uint8)
    boundary = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    label[boundary] = OTHER
    image = image + rng.normal(0.0, rng.uniform(3, 10), size=image.shape)  # sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def write_split(root: Path, split: str, count: int, size: Tuple[int, int], seed: int) -> None:
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    height, width = size
    for index in range(count):
        image, label = make_scene(_sample_rng(seed, split, index), height, width)
        name = f"ADE_{SPLITS[split]}_{index + 1:08d}"
        ok_image = cv2.imwrite(str(image_dir / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        ok_label = cv2.imwrite(str(label_dir / f"{name}.png"), label)
        if not (ok_image and ok_label):
            raise OSError(f"could not write {name} into {root}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="output folder; the data goes to OUT_DIR/ADEChallengeData2016")
    parser.add_argument("--train", type=int, default=240, help="training images (default 240)")
    parser.add_argument("--val", type=int, default=24, help="validation images (default 24)")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"),
                        help="image height and width in pixels (default 128 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.train < 1 or args.val < 1:
        parser.error("--train and --val must be >= 1")
    if min(args.size) < 16:
        parser.error("--size must be at least 16 x 16 pixels")
    root = args.out_dir / "ADEChallengeData2016"
    for split, count in (("training", args.train), ("validation", args.val)):
        write_split(root, split, count, tuple(args.size), args.seed)
    print(f"wrote {args.train} training and {args.val} validation images ({args.size[0]}x{args.size[1]}, "
          f"classes {', '.join(f'{i + 1}={n}' for i, n in enumerate(CLASS_NAMES))}, 0=other) to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
