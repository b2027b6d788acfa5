"""Training-time validation (tool/train.py, util/engine/validation.py): the test protocol of tool/test.py on whole
images, split across processes, bounded by val_every / val_max_images; Ctrl-C. CPU, tiny."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from util.data import dataset
from util.engine import training, validation
from util.evaluation import whole_images

from conftest import REPO_ROOT
from tiny_runs import REAL_MODEL_KEYS, write_tiny_config


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def test_evenly_spaced_subset_is_fixed_and_spread():
    assert dataset.evenly_spaced_subset(101, 5) == [0, 25, 50, 75, 100]
    assert dataset.evenly_spaced_subset(10, 0) == list(range(10))
    assert dataset.evenly_spaced_subset(3, 7) == [0, 1, 2]
    assert dataset.evenly_spaced_subset(10, 1) == [0]
    assert len(dataset.evenly_spaced_subset(10, 9)) == 9


def test_whole_image_validation_equals_test_tool(tmp_path, train_tool, test_tool, one_thread):
    """The confusion matrix of the training-time validation (whole images, two scales, flip) is the
    one tool/test.py computes from the saved checkpoint with the same settings, entry for entry."""
    config = write_tiny_config(tmp_path, evaluate=True, epochs=1, val_mode="whole", val_scales=[1.0, 0.75],
                               val_flip=True)
    summary = train_tool.main(["--config", str(config)])
    during_training = summary["val"]["confusion_matrix"].tolist()
    assert summary["val"]["num_images"] == 4 and sum(map(sum, during_training)) > 0
    # Epoch 1 is both the final and the best model: both end-of-training results are that validation's.
    assert summary["end"]["final"]["mIoU"] == summary["end"]["best"]["mIoU"] == summary["val"]["mIoU"]

    data = tmp_path / "data"
    save_folder = tmp_path / "result"
    status = test_tool.main(["--config", str(config), "test_list", str(data / "list.txt"),
                             "model_path", str(tmp_path / "model" / "train_epoch_1.pth"),
                             "save_folder", str(save_folder), "scales", "[1.0, 0.75]", "flip", "True",
                             "best_mIoU_model_path", ""])
    assert status == 0
    metrics = json.loads((save_folder / "metrics.json").read_text())
    assert metrics["flip"] is True and metrics["scales"] == [1.0, 0.75]
    assert metrics["confusion_matrix"] == during_training
    assert metrics["mIoU"] == summary["val"]["mIoU"]

    # Without flip tool/test.py predicts differently (one forward per window): the key is honoured.
    status = test_tool.main(["--config", str(config), "test_list", str(data / "list.txt"),
                             "model_path", str(tmp_path / "model" / "train_epoch_1.pth"),
                             "save_folder", str(tmp_path / "noflip"), "flip", "False", "best_mIoU_model_path", ""])
    assert status == 0 and json.loads((tmp_path / "noflip" / "metrics.json").read_text())["flip"] is False


VALIDATE_SCRIPT = """
import json, sys
sys.path[:0] = [{tests!r}, {repo!r}]
import torch
from util.engine import validation
from util.runtime import distributed
from util.config import load_cfg
from util.data.dataset import SegDataset
from util.runtime.log import get_logger
from model import build_model
from util.runtime.checkpoint_io import load_model_weights

cfg = load_cfg({config!r}, ["val_scales", "[1.0, 0.75]", "val_flip", "True"])
ctx = distributed.init_distributed(cfg)
model = build_model(cfg)
load_model_weights(model, {checkpoint!r})
model = model.to(memory_format=torch.channels_last)
entries = SegDataset("val", cfg.data_root, cfg.val_list).entries
stats = validation.validate_whole_images(cfg, ctx, model, entries, get_logger(rank=ctx.rank), "Val")
if ctx.is_main:
    with open({out!r} + f".{{ctx.world_size}}.json", "w") as f:
        json.dump({{"cm": stats["confusion_matrix"].tolist(), "n": stats["num_images"]}}, f)
distributed.cleanup()
"""


@pytest.mark.slow
def test_two_processes_validate_like_one(tmp_path):
    """validate_whole_images in 2 Gloo processes (each takes every other image) sums to the same
    confusion matrix as one process."""
    pytest.importorskip("torch.distributed.run")
    config = write_tiny_config(tmp_path, evaluate=True, epochs=1, val_flip=True)
    result = subprocess.run([sys.executable, "tool/train.py", "--config", str(config)], cwd=REPO_ROOT, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    script = tmp_path / "validate.py"
    out = str(tmp_path / "cm")
    script.write_text(VALIDATE_SCRIPT.format(tests=str(REPO_ROOT / "tests"), repo=str(REPO_ROOT), config=str(config),
                                             out=out, checkpoint=str(tmp_path / "model" / "train_epoch_1.pth")))
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2"]):
        result = subprocess.run([*launcher, str(script)], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    one = json.loads(Path(out + ".1.json").read_text())
    two = json.loads(Path(out + ".2.json").read_text())
    assert one["n"] == two["n"] == 4
    assert one["cm"] == two["cm"] and sum(map(sum, one["cm"])) > 0
    assert "Val: [2/2]" in result.stdout  # rank 0's share: 2 of the 4 images, with progress


def test_val_every_2_validates_at_epochs_2_and_4_and_the_last(tmp_path, monkeypatch, train_tool):
    config = write_tiny_config(tmp_path, evaluate=True, epochs=5, val_every=2)
    titles = []

    def fake_train(*args, **kwargs):
        return {"loss": 1.0, "main_loss": 1.0, "aux_loss": 0.0, "mIoU": 0.1, "mAcc": 0.1, "allAcc": 0.1}

    def fake_evaluate(*args, title, **kwargs):
        titles.append(title)
        value = 0.1 * len(titles)
        return {"mIoU": value, "mAcc": value, "allAcc": value, "num_images": 4}

    monkeypatch.setattr(training, "train_iterations", fake_train)
    monkeypatch.setattr(whole_images, "evaluate_images", fake_evaluate)
    summary = train_tool.main(["--config", str(config)])
    # The last epoch (5) is always validated; it is also the best, so the end reuses its result.
    assert titles == ["Val epoch [2/5]", "Val epoch [4/5]", "Val epoch [5/5]"]
    assert summary["best_mIoU"] == pytest.approx(0.3)
    assert torch.load(tmp_path / "model" / "best_mIoU.pth", weights_only=True)["epoch"] == 5


def test_crop_mode_and_a_subset(tmp_path, monkeypatch, train_tool):
    """val_mode crop scores centre crops of val_max_images images; the end of training still reports
    the whole-image result of the final and the best model."""
    config = write_tiny_config(tmp_path, evaluate=True, epochs=1, val_mode="crop", val_max_images=2)
    monkeypatch.setattr(training, "train_iterations", lambda *a, **k: {
        "loss": 1.0, "main_loss": 1.0, "aux_loss": 0.0, "mIoU": 0.1, "mAcc": 0.1, "allAcc": 0.1})
    summary = train_tool.main(["--config", str(config)])
    assert "loss" in summary["val"] and 0.0 <= summary["val"]["mIoU"] <= 1.0
    assert summary["end"]["final"]["num_images"] == 2  # whole images, the same fixed subset
    assert summary["end"]["best"]["mIoU"] == summary["end"]["final"]["mIoU"]


def test_ctrl_c_during_validation_keeps_the_epoch_and_resume_validates_it(tmp_path, monkeypatch, capsys,
                                                                           train_tool):
    """Issue 24 item 2: a Ctrl-C while epoch 1 is validated (save_freq 2: epoch 1 is not due) leaves
    train_epoch_1.pth; resume auto validates epoch 1 without training it again, then trains epoch 2."""
    config = write_tiny_config(tmp_path, evaluate=True, epochs=2, save_freq=2, resume="auto")
    trained, titles = [], []

    def fake_train(*args, **kwargs):
        trained.append(1)
        return {"loss": 1.0, "main_loss": 1.0, "aux_loss": 0.0, "mIoU": 0.1, "mAcc": 0.1, "allAcc": 0.1}

    def fake_evaluate(*args, title, **kwargs):
        titles.append(title)
        value = 0.5 if title == "Val epoch [1/2]" else 0.3
        return {"mIoU": value, "mAcc": value, "allAcc": value, "num_images": 4}

    def interrupted_validation(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_iterations", fake_train)
    monkeypatch.setattr(whole_images, "evaluate_images", fake_evaluate)
    with monkeypatch.context() as patch:
        patch.setattr(validation, "validate", interrupted_validation)
        assert train_tool.main(["--config", str(config)]) == 130
    model_dir = tmp_path / "model"
    assert f"newest checkpoint {model_dir / 'train_epoch_1.pth'}" in capsys.readouterr().err
    saved = torch.load(model_dir / "train_epoch_1.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["validation_pending"] and trained == [1]

    summary = train_tool.main(["--config", str(config)])  # resume auto
    output = capsys.readouterr().out
    assert "1 epoch(s) done" in output and "was saved before its validation finished: validating epoch 1" in output
    assert trained == [1, 1] and titles[:2] == ["Val epoch [1/2]", "Val epoch [2/2]"]  # epoch 2 trained once
    assert summary["best_mIoU"] == 0.5
    assert torch.load(model_dir / "best_mIoU.pth", weights_only=True)["epoch"] == 1
    resaved = torch.load(model_dir / "train_epoch_1.pth", weights_only=True)
    assert "validation_pending" not in resaved and resaved["best_mIoU"] == 0.5
    assert torch.load(model_dir / "train_epoch_2.pth", weights_only=True)["best_mIoU"] == 0.5


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    """SIGINT during training: no traceback, one line with where it stopped, the newest checkpoint
    and the command that resumes; exit status 130. The printed command then finishes the run."""
    # ResNet-50: its steps last long enough for the signal to land in epoch 2 on a busy machine.
    config = write_tiny_config(tmp_path, epochs=3, print_freq=1, **REAL_MODEL_KEYS)
    # A shell that starts pytest in the background ignores SIGINT for it, and the child would inherit that.
    process = subprocess.Popen([sys.executable, "-u", "tool/train.py", "--config", str(config)], cwd=REPO_ROOT,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stdout:  # wait until epoch 2 trains (train_epoch_1.pth exists)
        lines.append(line)
        if "Epoch: [2/3][1/2]" in line:
            # Right after this line rank 0 writes TensorBoard scalars: the interrupt lands in the writer
            # (a KeyboardInterrupt there must not break its queue and hang close()).
            process.send_signal(signal.SIGINT)
            break
    try:
        stdout, stderr = process.communicate(timeout=600)  # a step in progress finishes first (slow when busy)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail("the interrupted run did not exit:\n" + "".join(lines) + stdout + stderr)
    assert process.returncode == 130, "".join(lines) + stdout + stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    message = stderr.strip()
    assert message.startswith("interrupted while training epoch 2/3;"), message
    assert f"newest checkpoint {tmp_path / 'model' / 'train_epoch_1.pth'}" in message
    command = message.split("resume with: ", 1)[1]
    assert command.endswith("resume auto") and str(config) in command

    import shlex

    argv = shlex.split(command)
    assert argv[0] == "python"
    result = subprocess.run([sys.executable, *argv[1:]], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and (tmp_path / "model" / "train_epoch_3.pth").is_file()


@pytest.mark.parametrize("val_mode, val_max_images, said", [
    ("whole", 25, "all 4 images of val_list"), ("crop", 25, "all 4 images of val_list"),
    ("whole", 2, "2 evenly spaced of the 4 images of val_list")])
def test_log_says_how_many_images_are_validated(tmp_path, monkeypatch, train_tool, val_mode, val_max_images, said):
    """val_max_images only bounds the subset: the log names the number of images actually validated."""
    config = write_tiny_config(tmp_path, evaluate=True, epochs=1, val_mode=val_mode, val_max_images=val_max_images)
    monkeypatch.setattr(training, "train_iterations", lambda *a, **k: {
        "loss": 1.0, "main_loss": 1.0, "aux_loss": 0.0, "mIoU": 0.1, "mAcc": 0.1, "allAcc": 0.1})
    monkeypatch.setattr(whole_images, "evaluate_images", lambda entries, *a, **k: {
        "mIoU": 0.1, "mAcc": 0.1, "allAcc": 0.1, "num_images": len(entries)})
    train_tool.main(["--config", str(config)])
    log = next((tmp_path / "model").glob("train-*.log")).read_text()
    for start in ("validation every 1 epoch(s) on", "Val result at epoch [1/1] (", "Whole-image validation of the"):
        lines = [line for line in log.splitlines() if start in line]
        assert lines and all(said in line for line in lines), (start, lines)
    assert "evenly spaced images" not in log


@pytest.mark.parametrize("val_mode", ["whole", "crop"])
def test_each_validation_writes_preview_images(tmp_path, monkeypatch, train_tool, val_mode):
    """Both validation modes put image | ground truth | prediction panels into TensorBoard at every
    validation (crop mode: the validated centre crops)."""
    import tensorboardX

    images = []

    class RecordingWriter:
        def __init__(self, *args, **kwargs):
            pass

        def add_image(self, tag, panel, step, dataformats):
            images.append((tag, step, panel.shape, panel.dtype))

        def add_scalar(self, *args, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tensorboardX, "SummaryWriter", RecordingWriter)
    monkeypatch.setattr(training, "train_iterations", lambda *a, **k: {
        "loss": 1.0, "main_loss": 1.0, "aux_loss": 0.0, "mIoU": 0.1, "mAcc": 0.1, "allAcc": 0.1})
    config = write_tiny_config(tmp_path, evaluate=True, epochs=2, val_mode=val_mode, train_h=33, train_w=33)
    train_tool.main(["--config", str(config)])
    height, width = (33, 33) if val_mode == "crop" else (48, 56)  # the crop, or make_dataset's whole image
    assert sorted((tag, step) for tag, step, _, _ in images) == [
        (f"val_preview/{index}", step) for index in (0, 2, 3) for step in (1, 2)]  # 3 evenly spaced of 4, each epoch
    assert {(shape, dtype) for _, _, shape, dtype in images} == {((height, 3 * width, 3), np.dtype(np.uint8))}
