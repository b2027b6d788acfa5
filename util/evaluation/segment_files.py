"""Segment what a user has: one image, a folder of images, or a video, with one network and the same
sliding-window settings (util/evaluation/inference.py). tool/demo.py is its command line.

* an image: ``NAME_gray.png`` (class ids), ``NAME_color.png`` and ``NAME_overlay.png`` in the output folder;
* a folder: the same three files for every image in it and in its sub-folders (sorted by path), each
  in the output folder's mirror of its sub-folder (``photos/street/a.jpg`` -> ``OUT/street/a_gray.png``);
  hidden folders and the output folder itself (when it lies inside the input) are not read;
* a video ``NAME.EXT``: ``NAME_EXT_overlay.mp4`` (``clip.avi`` -> ``clip_avi_overlay.mp4``: videos of one
  name and another container do not overwrite each other's overlay), every frame blended with its colour
  map, at the video's frame rate; a video that ends before the frame count its container reports (a
  truncated file) is a warning.

Long inputs log ``[done/total]`` progress lines with the time per item and an ETA.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np
import torch

from util.data.dataset import load_image
from util.errors import DataError
from util.evaluation.visualize import colorize, overlay, save_gray, save_rgb
from util.runtime.log import ProgressLine

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


def input_kind(path: str) -> str:
    """``"folder"``, ``"video"`` or ``"image"`` (by extension; anything else is read as an image)."""
    if os.path.isdir(path):
        return "folder"
    if not os.path.exists(path):
        raise DataError(f"input not found: {path} (give an image, a folder of images or a video)")
    return "video" if Path(path).suffix.lower() in VIDEO_EXTENSIONS else "image"


def folder_images(folder: str, skip: Optional[Path] = None) -> List[Path]:
    """The image files in ``folder`` and its sub-folders, sorted by path; an error when there are none.
    Hidden folders and ``skip`` (the output folder, when it lies inside ``folder``) are not read."""
    skip_path = Path(skip).resolve() if skip is not None else None
    images = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")
                             and (skip_path is None or Path(directory, name).resolve() != skip_path)]
        images += [Path(directory, name) for name in files if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder} or its sub-folders")
    return sorted(images)


def segment(predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray, palette: np.ndarray,
            alpha: float):
    """(gray, colour, overlay) of one HxWx3 RGB float image; ``predict`` maps it to HxW class ids."""
    gray = predict(image)
    color = colorize(gray, palette)
    return gray, color, overlay(image, color, alpha)


def segment_image(predict, image_path: Path, output: Path, palette: np.ndarray, alpha: float) -> Dict[str, Path]:
    """Write NAME_{gray,color,overlay}.png of one image; returns the paths and the class-id map."""
    gray, color, blended = segment(predict, load_image(image_path), palette, alpha)
    paths = {kind: output / f"{image_path.stem}_{kind}.png" for kind in ("gray", "color", "overlay")}
    save_gray(paths["gray"], gray)
    save_rgb(paths["color"], color)
    save_rgb(paths["overlay"], blended)
    return {**paths, "class_ids": gray}


def segment_folder(predict, images: List[Path], output: Path, palette: np.ndarray, alpha: float,
                   logger, root: Optional[Path] = None) -> List[Dict[str, Path]]:
    """:func:`segment_image` for every image, with progress; two images of one name are refused up front.
    With ``root`` (the folder the images were found in), each image's outputs go to ``output``'s mirror of
    its sub-folder of ``root``; without it, all to ``output``."""
    targets = [output / path.parent.relative_to(root) if root is not None else output for path in images]
    stems: Dict[Path, Path] = {}
    for path, target in zip(images, targets):
        if target / path.stem in stems:
            raise DataError(f"{stems[target / path.stem]} and {path} would write the same output names")
        stems[target / path.stem] = path
    progress = ProgressLine("Demo", len(images), logger, unit="image")
    results = []
    for done, (path, target) in enumerate(zip(images, targets), 1):
        target.mkdir(parents=True, exist_ok=True)
        results.append(segment_image(predict, path, target, palette, alpha))
        progress.update(done)
    return results


def video_overlay_name(video_path: str) -> str:
    """``clip.mp4`` -> ``clip_mp4_overlay.mp4``: the input's suffix stays in the name, as the output is always mp4."""
    path = Path(video_path)
    return f"{path.stem}_{path.suffix.lstrip('.').lower()}_overlay.mp4" if path.suffix else f"{path.name}_overlay.mp4"


def segment_video(predict, video_path: str, output: Path, palette: np.ndarray, alpha: float, logger) -> Path:
    """Write ``output/NAME_EXT_overlay.mp4`` (:func:`video_overlay_name`): every frame blended with its colour
    map (same size and frame rate)."""
    capture = cv2.VideoCapture(str(video_path))
    if not capture.isOpened():
        raise DataError(f"cannot open video {video_path} (OpenCV could not decode it)")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # some containers do not say
    output.mkdir(parents=True, exist_ok=True)
    path = output / video_overlay_name(video_path)
    temporary = path.with_name(f".{path.name}.tmp.mp4")  # renamed when complete: no half video on a crash
    writer = None
    progress = ProgressLine("Video", total, logger, unit="frame")
    done = 0
    try:
        while True:
            ok, frame_bgr = capture.read()
            if not ok:
                break
            frame = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
            _, _, blended = segment(predict, frame, palette, alpha)
            if writer is None:
                height, width = blended.shape[:2]
                writer = cv2.VideoWriter(str(temporary), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
                if not writer.isOpened():
                    raise OSError(f"could not write video {path} (OpenCV has no mp4v encoder here)")
            writer.write(cv2.cvtColor(blended, cv2.COLOR_RGB2BGR))
            done += 1
            progress.update(done)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if done == 0:
        raise DataError(f"video {video_path} has no readable frames")
    if total is None or done != total:
        progress.update(done, last=True)
    if total is not None and done < total:
        logger.warning(f"video {video_path} ended after {done} of the {total} frames its container reports "
                       f"(a truncated or damaged file?): the overlay has {done} frames")
    os.replace(temporary, path)
    return path


def model_predictor(model, kwargs: dict) -> Callable[[np.ndarray], np.ndarray]:
    """``image -> class ids`` with util.evaluation.inference's multi-scale sliding windows (the tools' settings)."""
    from util.evaluation.inference import predict_multiscale

    def predict(image: np.ndarray) -> np.ndarray:
        return predict_multiscale(model, image, **kwargs).to("cpu", torch.uint8).numpy()

    return predict
