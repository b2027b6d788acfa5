"""tool/test.py end to end on a tiny synthetic dataset (and 2 real CamVid images), tool/test.sh, tool/demo.py."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from util.config import load_cfg

from conftest import REPO_ROOT
from tiny_model import TINY_MODEL_KEYS

CLASSES = 3
IMAGE_SIZES = [(60, 80), (80, 60), (50, 50), (70, 90)]  # (h, w): padded, multi-window, portrait, landscape


def _independent_metrics(gray_maps, labels, num_classes):
    """Scores computed directly with numpy, without util.evaluation.metrics."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for gray, label in zip(gray_maps, labels):
        keep = label != 255
        cm += np.bincount(label[keep].astype(np.int64) * num_classes + gray[keep], minlength=num_classes ** 2
                          ).reshape(num_classes, num_classes)
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = [inter[c] / union[c] if union[c] else None for c in range(num_classes)]
    acc = [inter[c] / cm[c].sum() if cm[c].sum() else None for c in range(num_classes)]
    return dict(iou=iou, acc=acc, mIoU=np.mean([v for v in iou if v is not None]),
                mAcc=np.mean([v for v in acc if v is not None]), allAcc=inter.sum() / cm.sum(), cm=cm)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 4-image dataset, its list, names/colors, a config and a release-format checkpoint."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    lines = []
    for index, (h, w) in enumerate(IMAGE_SIZES):
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        label = rng.integers(0, CLASSES, size=(h, w)).astype(np.uint8)
        label[: h // 6] = 255
        (root / "images").mkdir(exist_ok=True)
        (root / "annotations").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "images" / f"img{index}.png"), image)
        cv2.imwrite(str(root / "annotations" / f"img{index}.png"), label)
        lines.append(f"images/img{index}.png annotations/img{index}.png")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    (root / "test.txt").write_text("\n".join(line.split()[0] for line in lines) + "\n")
    (root / "names.txt").write_text("alpha\nbeta\ngamma\n")
    (root / "colors.txt").write_text("255 0 0\n0 255 0\n0 0 255\n")

    config = {
        "DATA": {"data_root": str(root), "classes": CLASSES},
        # The test-only network of tests/tiny_model.py: the subject is tool/test.py, not the network.
        "TRAIN": {**TINY_MODEL_KEYS, "train_h": 65, "train_w": 65},
        "TEST": {"test_list": str(root / "val.txt"), "split": "val", "base_size": 96, "test_h": 65,
                 "test_w": 65, "scales": [1.0], "test_batch_size": 3, "device": "cpu",
                 "model_path": str(root / "model.pth"), "save_folder": str(root / "out"),
                 "colors_path": str(root / "colors.txt"), "names_path": str(root / "names.txt"),
                 "best_mIoU_model_path": None},
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    from model import build_model

    torch.manual_seed(0)
    model = build_model(load_cfg(str(config_path)))
    with torch.no_grad():  # calibrate the random classifier so that every class wins somewhere
        model.eval()
        model.cls[-1].weight.mul_(20.0)
        logits = model(torch.randn(2, 3, 65, 65))
        model.cls[-1].bias.sub_(logits.mean(dim=(0, 2, 3)))
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 1},
               root / "model.pth")
    return root


def _argv(root, *overrides):
    return ["--config", str(root / "config.yaml"), *[str(o) for o in overrides]]


def _check_outputs_and_metrics(root, save_folder, num_classes=CLASSES, names=None, with_color=True):
    entries = [line.split() for line in (root / "val.txt").read_text().split("\n") if line]
    grays, labels = [], []
    for image_rel, label_rel in entries:
        name = Path(image_rel).stem
        gray = cv2.imread(str(save_folder / "gray" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(root / label_rel), cv2.IMREAD_UNCHANGED)
        assert gray.dtype == np.uint8 and gray.shape == label.shape
        if with_color:
            color = cv2.imread(str(save_folder / "color" / f"{name}.png"), cv2.IMREAD_COLOR)
            assert color.shape == label.shape + (3,)
        assert gray.max() < num_classes
        grays.append(gray)
        labels.append(label)
    metrics = json.loads((save_folder / "metrics.json").read_text())
    expected = _independent_metrics(grays, labels, num_classes)
    assert metrics["num_images"] == len(entries)
    assert metrics["confusion_matrix"] == expected["cm"].tolist()
    for key in ("iou", "acc"):
        for got, want in zip(metrics[key], expected[key]):
            assert (got is None and want is None) or got == pytest.approx(want, abs=1e-12)
    for key in ("mIoU", "mAcc", "allAcc"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12)
    if names is not None:
        assert metrics["names"] == names
    return metrics, grays


def test_end_to_end_val_best_model_and_has_prediction(synthetic):
    from tool.test import main

    out, best = synthetic / "out", synthetic / "best"
    assert main(_argv(synthetic, "best_mIoU_model_path", synthetic / "model.pth",
                      "best_mIoU_save_folder", best)) == 0
    metrics, grays = _check_outputs_and_metrics(synthetic, out, names=["alpha", "beta", "gamma"])
    assert len({int(v) for g in grays for v in np.unique(g)}) >= 2, "degenerate prediction: test is too weak"
    assert metrics["scales"] == [1.0] and metrics["crop_size"] == [65, 65] and metrics["split"] == "val"
    best_metrics, _ = _check_outputs_and_metrics(synthetic, best)
    assert best_metrics["confusion_matrix"] == metrics["confusion_matrix"]

    # The written colour map is the palette of the gray map.
    gray0 = grays[0]
    color0 = cv2.cvtColor(cv2.imread(str(out / "color" / "img0.png")), cv2.COLOR_BGR2RGB)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    assert np.array_equal(color0, palette[gray0])

    # has_prediction: score edited gray maps without any model (model_path does not even exist).
    scored = synthetic / "scored"
    shutil.copytree(out / "gray", scored / "gray")
    edited = np.zeros_like(gray0)
    cv2.imwrite(str(scored / "gray" / "img0.png"), edited)
    assert main(_argv(synthetic, "has_prediction", "True", "model_path", synthetic / "missing.pth",
                      "save_folder", scored)) == 0
    rescored, _ = _check_outputs_and_metrics(synthetic, scored, with_color=False)
    assert rescored["confusion_matrix"] != metrics["confusion_matrix"]
    assert rescored["model_path"] is None and not (scored / "color").exists()


def test_test_split_index_range_and_errors(synthetic):
    from tool.test import main
    from util.errors import CheckpointError

    out = synthetic / "test_split"
    assert main(_argv(synthetic, "split", "test", "test_list", synthetic / "test.txt", "save_folder", out,
                      "index_start", 1, "index_step", 2)) == 0
    assert sorted(p.name for p in (out / "gray").iterdir()) == ["img1.png", "img2.png"]
    assert sorted(p.name for p in (out / "color").iterdir()) == ["img1.png", "img2.png"]
    assert not (out / "metrics.json").exists()
    with pytest.raises(CheckpointError, match="missing.pth"):
        main(_argv(synthetic, "model_path", synthetic / "missing.pth", "save_folder", synthetic / "x"))
    assert not (synthetic / "x").exists()


def _run(cmd, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_two_process_torchrun_equals_single_process(synthetic):
    """Two processes (Gloo, CPU) split the images; the summed confusion matrix equals one process's.
    Both runs use one thread per process so the convolutions compute identically."""
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    single, double = synthetic / "single", synthetic / "double"
    result = _run([sys.executable, "tool/test.py", *_argv(synthetic, "save_folder", single)])
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "tool/test.py", *_argv(synthetic, "save_folder", double)])
    assert result.returncode == 0, result.stdout + result.stderr
    one = json.loads((single / "metrics.json").read_text())
    two = json.loads((double / "metrics.json").read_text())
    assert one == two
    for name in ("img0", "img1", "img2", "img3"):
        assert np.array_equal(cv2.imread(str(single / "gray" / f"{name}.png"), cv2.IMREAD_UNCHANGED),
                              cv2.imread(str(double / "gray" / f"{name}.png"), cv2.IMREAD_UNCHANGED))
    assert "Eval result" in result.stdout and "2 process(es)" in result.stdout


def test_camvid_two_val_images(camvid_root, synthetic, tmp_path):
    from model import build_model
    from tool.test import main

    overrides = ["data_root", camvid_root, "test_list", camvid_root / "val.txt", "classes", 11,
                 "names_path", REPO_ROOT / "config/camvid/camvid_names.txt",
                 "colors_path", REPO_ROOT / "config/camvid/camvid_colors.txt",
                 "index_step", 2, "save_folder", tmp_path / "out", "model_path", tmp_path / "camvid.pth"]
    torch.manual_seed(1)
    model = build_model(load_cfg(str(synthetic / "config.yaml"), [str(o) for o in overrides]))
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "camvid.pth")
    assert main(_argv(synthetic, *overrides)) == 0

    val_lines = [line.split() for line in (camvid_root / "val.txt").read_text().splitlines() if line.strip()][:2]
    grays, labels = [], []
    for image_rel, label_rel in val_lines:
        gray = cv2.imread(str(tmp_path / "out" / "gray" / f"{Path(image_rel).stem}.png"), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(camvid_root / label_rel), cv2.IMREAD_UNCHANGED)
        assert gray.shape == label.shape == (360, 480)
        grays.append(gray)
        labels.append(label)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    expected = _independent_metrics(grays, labels, 11)
    assert metrics["num_images"] == 2 and metrics["names"][0] == "sky" and len(metrics["iou"]) == 11
    assert metrics["confusion_matrix"] == expected["cm"].tolist()
    assert metrics["mIoU"] == pytest.approx(expected["mIoU"]) and metrics["allAcc"] == pytest.approx(expected["allAcc"])


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_test_sh_usage_and_invocation(tmp_path, shell):
    """The wrapper under POSIX sh (dash rejects bash-only syntax), run from another directory: the repository's
    config, the user's KEY VALUE pairs passed unchanged (so relative paths stay the user's)."""
    if not shutil.which(shell):
        pytest.skip(f"{shell} not installed")
    usage = subprocess.run([shell, str(REPO_ROOT / "tool/test.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    asked = subprocess.run([shell, str(REPO_ROOT / "tool/test.sh"), "--help"], capture_output=True, text=True)
    assert asked.returncode == 0 and "usage" in asked.stderr
    repo = tmp_path / "repo"
    (repo / "tool").mkdir(parents=True)
    for name in ("test.sh", "wrapper_common.sh"):  # the wrapper and what it sources
        shutil.copy(REPO_ROOT / "tool" / name, repo / "tool" / name)
    (repo / "config/toy").mkdir(parents=True)
    (repo / "config/toy/toy_net.yaml").write_text("DATA:\n  classes: 3\n")
    stub = tmp_path / "stub.sh"
    stub.write_text("#!/bin/sh\necho \"ARGS $*\"\n")
    stub.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([shell, str(repo / "tool/test.sh"), "toy", "net", "scales", "[1.0]", "model_path",
                             "run1/model/train_epoch_2.pth"], cwd=elsewhere,
                            env=dict(os.environ, PYTHON=str(stub)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (f"ARGS -u {repo / 'tool/test.py'} --config {repo / 'config/toy/toy_net.yaml'} scales [1.0] "
            f"model_path run1/model/train_epoch_2.pth") in result.stdout
    assert list(elsewhere.iterdir()) == [] and not (repo / "exp").exists()
    missing = subprocess.run([shell, str(repo / "tool/test.sh"), "toy", "nope"], capture_output=True, text=True)
    assert missing.returncode == 2 and "config not found" in missing.stderr
    # Where only python3 exists (stock Ubuntu outside a venv) and PYTHON is unset, the wrapper runs python3.
    only = tmp_path / "only_python3"
    only.mkdir()
    for tool in (shell, "dirname"):
        (only / tool).symlink_to(shutil.which(tool))
    (only / "python3").symlink_to(stub)
    bare = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    result = subprocess.run([shell, str(repo / "tool/test.sh"), "toy", "net"], cwd=elsewhere,
                            env=dict(bare, PATH=str(only)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"ARGS -u {repo / 'tool/test.py'} --config {repo / 'config/toy/toy_net.yaml'}" in result.stdout


def test_demo_writes_three_pngs(synthetic, tmp_path):
    from tool.demo import main

    assert main(_argv(synthetic, "--image", synthetic / "images/img0.png", "--output", tmp_path)) == 0
    from util.evaluation.inference import inference_kwargs, load_inference_model, predict_multiscale

    gray = cv2.imread(str(tmp_path / "img0_gray.png"), cv2.IMREAD_UNCHANGED)
    cfg = load_cfg(str(synthetic / "config.yaml"))
    model = load_inference_model(cfg, cfg.model_path, torch.device("cpu"))
    image = cv2.cvtColor(cv2.imread(str(synthetic / "images/img0.png")), cv2.COLOR_BGR2RGB).astype(np.float32)
    assert np.array_equal(gray, predict_multiscale(model, image, **inference_kwargs(cfg)).numpy())
    for kind in ("color", "overlay"):
        assert cv2.imread(str(tmp_path / f"img0_{kind}.png")).shape == (60, 80, 3)


def test_demo_on_a_folder_and_on_a_video(synthetic, tmp_path, capsys):
    """A folder gives the three PNGs per image, a video an overlay video of every frame,
    both with progress lines; the same network and windows as for one image."""
    from tool.demo import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for index in (0, 1, 2):  # one colour, one gray, one more colour image
        image = cv2.imread(str(synthetic / f"images/img{index}.png"))
        if index == 1:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        cv2.imwrite(str(folder / f"p{index}.png"), image)
    (folder / "notes.txt").write_text("not an image")
    assert main(_argv(synthetic, "--image", folder, "--output", tmp_path / "out")) == 0
    for index in (0, 1, 2):
        for kind in ("gray", "color", "overlay"):
            assert (tmp_path / "out" / f"p{index}_{kind}.png").is_file()
    single = tmp_path / "single"
    assert main(_argv(synthetic, "--image", folder / "p0.png", "--output", single)) == 0
    assert np.array_equal(cv2.imread(str(single / "p0_gray.png"), cv2.IMREAD_UNCHANGED),
                          cv2.imread(str(tmp_path / "out" / "p0_gray.png"), cv2.IMREAD_UNCHANGED))
    assert "Demo: [3/3]" in capsys.readouterr().out

    video = tmp_path / "clip.mp4"
    frames = [cv2.imread(str(synthetic / "images/img0.png")) for _ in range(3)]
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    assert main(_argv(synthetic, "--image", video, "--output", tmp_path / "video_out")) == 0
    result = cv2.VideoCapture(str(tmp_path / "video_out" / "clip_mp4_overlay.mp4"))
    assert int(result.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    ok, first = result.read()
    assert ok and first.shape == (height, width, 3)
    assert "Video: [3/3]" in capsys.readouterr().out
    assert not list((tmp_path / "video_out").glob(".*tmp*"))


def test_demo_mirrors_sub_folders_and_warns_on_a_truncated_video(synthetic, tmp_path, capsys):
    """A folder's sub-folders are segmented into the same tree (one name in two folders is no clash; the
    output folder inside the input is not read again); a video shorter than its container says is a warning."""
    from tool.demo import main

    folder = tmp_path / "photos"
    (folder / "street").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    image = cv2.imread(str(synthetic / "images/img0.png"))
    for path in (folder / "p0.png", folder / "street" / "p0.png", folder / "street" / "p1.png",
                 folder / ".hidden" / "p2.png"):
        cv2.imwrite(str(path), image)
    for run in range(2):  # the second run finds the first one's outputs inside the input folder
        assert main(_argv(synthetic, "--image", folder, "--output", folder / "out")) == 0
        assert "Demo: [3/3]" in capsys.readouterr().out, run
    written = sorted(str(p.relative_to(folder / "out")) for p in (folder / "out").rglob("*.png"))
    assert written == sorted(f"{name}_{kind}.png" for name in ("p0", "street/p0", "street/p1")
                             for kind in ("gray", "color", "overlay"))

    frames = 6
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, image.shape[1::-1])
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for _ in range(frames):  # noise: every JPEG frame is large, so a cut drops whole frames
        writer.write(rng.integers(0, 256, image.shape, dtype=np.uint8))
    writer.release()
    data = video.read_bytes()
    video.write_bytes(data[:int(len(data) * 0.6)])
    assert int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT)) == frames
    assert main(_argv(synthetic, "--image", video, "--output", tmp_path / "video_out")) == 0
    out = capsys.readouterr().out
    read = int(cv2.VideoCapture(str(tmp_path / "video_out" / "clip_avi_overlay.mp4")).get(cv2.CAP_PROP_FRAME_COUNT))
    assert 0 < read < frames
    assert (f"video {video} ended after {read} of the {frames} frames its container reports "
            f"(a truncated or damaged file?)") in out


@pytest.mark.parametrize("model_path, recorded", [("run/model.onnx", "fp32"), ("run/model.torchscript", "fp32"),
                                                  ("run/train_epoch_2.pth", "bf16")])
def test_prediction_record_states_the_precision_that_ran(synthetic, model_path, recorded):
    """An exported file computes in float32 whatever ``precision`` says: predictions.json and metrics.json
    record fp32 for it, and the config's precision for a checkpoint."""
    from util.evaluation.inference import inference_kwargs
    from util.evaluation.scoring import prediction_record

    cfg = load_cfg(str(synthetic / "config.yaml"), ["precision", "bf16"])
    assert prediction_record(cfg, model_path, inference_kwargs(cfg))["precision"] == recorded


def test_a_save_folder_of_another_model_is_replaced_with_a_warning(synthetic, tmp_path, capsys):
    """Two models evaluated into one save_folder: the second run says it replaces the first one's results."""
    from tool.test import main

    other = tmp_path / "other.pth"
    shutil.copy(synthetic / "model.pth", other)
    folder = tmp_path / "shared_folder"
    for model_path in (synthetic / "model.pth", synthetic / "model.pth", other):
        assert main(_argv(synthetic, "model_path", model_path, "save_folder", folder)) == 0
        warnings = [line for line in capsys.readouterr().out.splitlines() if "this run replaces them" in line]
        if model_path == other:  # another file: said once, naming both
            assert len(warnings) == 1 and str(synthetic / "model.pth") in warnings[0] and str(other) in warnings[0]
        else:  # the same model again (or a fresh folder): nothing to say
            assert warnings == []
    assert json.loads((folder / "predictions.json").read_text())["model_path"] == str(other)


def test_demo_video_overlays_keep_the_input_suffix(synthetic, tmp_path):
    """clip.mp4 and clip.avi into one output folder: two overlay videos, neither overwritten."""
    from tool.demo import main

    frame = cv2.imread(str(synthetic / "images/img0.png"))
    for suffix, codec in ((".mp4", "mp4v"), (".avi", "MJPG")):
        writer = cv2.VideoWriter(str(tmp_path / f"clip{suffix}"), cv2.VideoWriter_fourcc(*codec), 5.0,
                                 frame.shape[1::-1])
        for _ in range(2):
            writer.write(frame)
        writer.release()
        assert main(_argv(synthetic, "--image", tmp_path / f"clip{suffix}", "--output", tmp_path / "out")) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip_avi_overlay.mp4", "clip_mp4_overlay.mp4"]
