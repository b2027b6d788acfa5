"""Helpers for tests that run the real tools on a tiny generated dataset (imported by test modules).

Kept apart from conftest.py, which holds fixtures only: these are plain functions with arguments.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Tuple

import cv2
import numpy as np
import yaml

from util.config import CfgNode, load_cfg

from conftest import REPO_ROOT
from tiny_model import TINY_MODEL_KEYS

# The real network at its cheapest (ResNet-50, output stride 32: layer4 at 3x3 on a 65x65 crop), for the tests
# whose subject is the network itself: ``write_tiny_config(tmp_path, **REAL_MODEL_KEYS)``.
REAL_MODEL_KEYS = dict(arch="pyconvsegnet", backbone_net="resnet", layers=50, backbone_output_stride=32)

def make_cfg(validate: bool = True, **keys) -> CfgNode:
    """The schema's defaults with ``keys`` set, built by the config loader (type checks and, with
    ``validate``, every key's check): tests hold no copy of a default."""
    return load_cfg(None, [item for pair in keys.items() for item in pair], validate=validate)


def load_script(relative_path: str, module_name: str) -> ModuleType:
    """A script of the repository (``tool/train.py``, ...) as a module; tool/ is not a package."""
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as an import would (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def make_dataset(root: Path, count: int = 4, classes: int = 3, seed: int = 0, size: Tuple[int, int] = (48, 56),
                 image_ext: str = "jpg", void_rows: int = 4) -> Path:
    """``count`` random images of ``size`` (H, W) with PNG labels and their list file.

    The top ``void_rows`` rows of every label are 255 (ignored), as padding would be.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        label = rng.integers(0, classes, size, dtype=np.uint8)
        label[:void_rows] = 255
        cv2.imwrite(str(root / "images" / f"{i}.{image_ext}"), image)
        cv2.imwrite(str(root / "labels" / f"{i}.png"), label)
        lines.append(f"images/{i}.{image_ext} labels/{i}.png")
    list_path = root / "list.txt"
    list_path.write_text("\n".join(lines) + "\n")
    return list_path


def write_tiny_config(tmp_path: Path, dataset: dict = None, **train_keys) -> Path:
    """A tiny CPU training config on a fresh ``make_dataset(**dataset)`` under ``tmp_path/data``.

    The test-only network of tests/tiny_model.py (named in ``custom_imports``, so every process that reads
    the config has it; ``REAL_MODEL_KEYS`` select ResNet-50 instead), 3 classes, 2 epochs of 2 iterations
    (4 images, batch 2), no evaluation (when enabled: whole images at their own size, one 65x65 window
    each); ``train_keys`` override any TRAIN key.
    """
    data_root = tmp_path / "data"
    list_path = make_dataset(data_root, **(dataset or {}))
    train = dict(TINY_MODEL_KEYS, train_h=65, train_w=65, batch_size=2, batch_size_val=2, workers=0, epochs=2,
                 manual_seed=5, print_freq=1, save_path=str(tmp_path / "model"), evaluate=False)
    train.update(train_keys)
    body = {"DATA": dict(data_root=str(data_root), train_list=str(list_path), val_list=str(list_path), classes=3),
            "TRAIN": train,
            "TEST": dict(device="cpu", base_size=0, test_h=65, test_w=65, test_batch_size=2)}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path
