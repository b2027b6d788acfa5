"""The embedded demo: generated data in ADE20K's raw layout -> prepare_ade20k -> train.py -> test.py.

The full demo (tool/quickstart.sh) trains for minutes; here the same pipeline runs on a few tiny
images for one short epoch, so every piece the quickstart uses is exercised in seconds.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from util.config import load_cfg
from util.data.dataset import read_colors, read_list, read_names
from util.runtime.runs import resolve_test_paths

from conftest import REPO_ROOT
from tiny_runs import load_script

DEMO_CONFIG = REPO_ROOT / "config" / "demo" / "demo_pyconvresnet50_pyconvsegnet.yaml"


def load_tool(name: str):
    """tool/NAME.py as a module (tool/ is not a package); NAME may include a subfolder."""
    return load_script(f"tool/{name}.py", f"{name.replace('/', '_')}_under_test")


def file_digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A tiny generated demo dataset (6 training, 2 validation images of 48x64), prepared."""
    out = tmp_path_factory.mktemp("demo")
    assert load_tool("dataset_converters/make_demo_data").main(
        [str(out), "--train", "6", "--val", "2", "--size", "48", "64", "--seed", "3"]) == 0
    root = out / "ADEChallengeData2016"
    assert load_tool("dataset_converters/prepare_ade20k").main([str(root), "--workers", "1"]) == 0
    return root


def test_generated_data_is_deterministic(tmp_path):
    make = load_tool("dataset_converters/make_demo_data")
    for name in ("a", "b"):
        assert make.main([str(tmp_path / name), "--train", "3", "--val", "2", "--size", "40", "56"]) == 0
    first, second = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert len(first) == 10 and first == second
    # More images keep the first ones unchanged (each image depends only on seed, split and index).
    assert make.main([str(tmp_path / "c"), "--train", "4", "--val", "2", "--size", "40", "56"]) == 0
    third = file_digests(tmp_path / "c")
    assert all(third[name] == digest for name, digest in first.items())
    # Another seed gives other images.
    assert make.main([str(tmp_path / "d"), "--train", "3", "--val", "2", "--size", "40", "56", "--seed", "1"]) == 0
    assert file_digests(tmp_path / "d") != first


def test_generated_data_follows_the_raw_ade20k_convention(demo_root):
    images = sorted((demo_root / "images" / "training").glob("ADE_train_*.jpg"))
    labels = sorted((demo_root / "annotations" / "training").glob("ADE_train_*.png"))
    assert [p.stem for p in images] == [p.stem for p in labels] and len(images) == 6
    assert len(list((demo_root / "images" / "validation").glob("ADE_val_*.jpg"))) == 2
    values = set()
    for image_path, label_path in zip(images, labels):
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8
        assert label.shape == (48, 64) and label.dtype == np.uint8
        values |= set(np.unique(label).tolist())
    # 0 = "other" (the boundary bands), 1 = background, 2..4 = the shapes: nothing else.
    assert values <= {0, 1, 2, 3, 4}
    assert {0, 1} <= values and len(values & {2, 3, 4}) >= 2


def test_prepare_ade20k_makes_zero_based_labels_and_lists(demo_root):
    entries = read_list(demo_root / "list" / "training.txt", demo_root, "train")
    assert len(entries) == 6 and len(read_list(demo_root / "list" / "validation.txt", demo_root, "val")) == 2
    image_path, label_path = entries[0]
    raw = cv2.imread(str(demo_root / "annotations" / "training" / Path(label_path).name), cv2.IMREAD_UNCHANGED)
    converted = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    assert np.array_equal(converted[raw == 0], np.full((raw == 0).sum(), 255, dtype=np.uint8))
    assert np.array_equal(converted[raw > 0], raw[raw > 0] - 1)


def test_demo_config_matches_the_demo_data_and_tools():
    cfg = load_cfg(str(DEMO_CONFIG))
    assert cfg.data_root == "data/demo/ADEChallengeData2016"
    assert cfg.train_list == "data/demo/ADEChallengeData2016/list/training.txt"
    assert cfg.test_list == cfg.val_list == "data/demo/ADEChallengeData2016/list/validation.txt"
    names = read_names(REPO_ROOT / cfg.names_path, cfg.classes)
    assert names == ["background", "disc", "rectangle", "triangle"]
    assert read_colors(REPO_ROOT / cfg.colors_path, cfg.classes).shape == (4, 3)
    # test.sh evaluates the checkpoint train.sh writes last, and writes the results beside the run.
    assert cfg.save_path == "exp/demo/pyconvresnet50_pyconvsegnet/model"
    assert not cfg.model_path and not cfg.save_folder
    resolve_test_paths(cfg)
    assert cfg.model_path == f"{cfg.save_path}/train_epoch_{cfg.epochs}.pth"
    assert cfg.save_folder == f"exp/demo/pyconvresnet50_pyconvsegnet/result/epoch_{cfg.epochs}/val/ss"
    assert not cfg.pretrained and cfg.arch == "pyconvsegnet" and cfg.backbone_net == "pyconvresnet"


def test_quickstart_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO_ROOT / "tool" / "quickstart.sh")], check=True)


def test_shell_scripts_import_what_exists():
    """The project's Python names that the shell scripts import inline (``python -c "from util... import
    ..."``) exist: a module move would otherwise break a script only at its end, after minutes of work."""
    imports = [(script.name, module, name.strip())
               for script in sorted((REPO_ROOT / "tool").glob("*.sh"))
               for module, names in re.findall(r"from ((?:util|model)[\w.]*) import ([\w, ]+)", script.read_text())
               for name in names.split(",")]
    assert any(script == "quickstart.sh" for script, _, _ in imports)  # the pattern still finds its import
    for script, module, name in imports:
        try:
            found = hasattr(importlib.import_module(module), name)
        except ImportError:
            found = False
        assert found, f"tool/{script}: from {module} import {name}"


@pytest.mark.slow
def test_short_training_and_evaluation_write_metrics(demo_root, tmp_path):
    """One epoch of three steps (33x33 crops, batch 2) through train.py, then test.py on whole images."""
    data = [
        "data_root", str(demo_root),
        "train_list", str(demo_root / "list" / "training.txt"),
        "val_list", str(demo_root / "list" / "validation.txt"),
        "test_list", str(demo_root / "list" / "validation.txt"),
        "colors_path", str(REPO_ROOT / "config" / "demo" / "demo_colors.txt"),
        "names_path", str(REPO_ROOT / "config" / "demo" / "demo_names.txt"),
    ]
    save_path = tmp_path / "model"
    summary = load_tool("train").main([
        "--config", str(DEMO_CONFIG), *data, "train_h", "33", "train_w", "33", "batch_size", "2", "workers", "0",
        "epochs", "1", "save_freq", "1", "print_freq", "1", "save_path", str(save_path), "device", "cpu"])
    assert summary["epochs"] == 1 and np.isfinite(summary["train"]["loss"])
    checkpoint = save_path / "train_epoch_1.pth"
    assert checkpoint.is_file()

    save_folder = tmp_path / "result"
    assert load_tool("test").main([
        "--config", str(DEMO_CONFIG), *data, "model_path", str(checkpoint), "save_folder", str(save_folder),
        "base_size", "64", "test_h", "33", "test_w", "33", "device", "cpu"]) == 0
    metrics = json.loads((save_folder / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["names"] == ["background", "disc", "rectangle", "triangle"]
    assert 0.0 <= metrics["allAcc"] <= 1.0 and len(metrics["iou"]) == 4
    colour = sorted((save_folder / "color").glob("*.png"))
    gray = sorted((save_folder / "gray").glob("*.png"))
    assert [p.name for p in colour] == [p.name for p in gray] == ["ADE_val_00000001.png", "ADE_val_00000002.png"]
    assert cv2.imread(str(colour[0])).shape == (48, 64, 3)

    # The README's demo picture (figure/predictions_demo.png) is drawn from the same checkpoint and settings.
    make_predictions = load_script("figure/make_predictions.py", "make_predictions_under_test")
    picture = tmp_path / "predictions.png"
    assert make_predictions.main([
        "--config", str(DEMO_CONFIG), "--model", str(checkpoint), "--num", "2", "--tile-height", "48",
        "--output", str(picture), *data, "base_size", "64", "test_h", "33", "test_w", "33", "device", "cpu"]) == 0
    grid = cv2.imread(str(picture))
    assert grid.shape[0] > 2 * 48 and grid.shape[1] >= 3 * 64  # 2 rows of image | ground truth | prediction
