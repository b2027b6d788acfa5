"""A user's own paths (util/runtime/runs.py): overrides that carry through train.py, test.py and the shell wrappers,
relative paths from another directory, records of how results were made, and messages that lead somewhere."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from util.config import load_cfg
from util.engine import training
from util.errors import CheckpointError, ConfigError
from util.evaluation import whole_images
from util.runtime.checkpoint_io import load_checkpoint_file
from util.runtime.runs import (
    RELEASED_WEIGHTS_HINT,
    checkpoint_path_problem,
    rebase_repository_paths,
    resolve_test_paths,
    results_folder,
    run_directory,
)

from test_docs import doc_section
from tiny_model import TINY_MODEL_OPTS
from tiny_runs import REPO_ROOT, make_dataset, write_tiny_config

TEST_KEYS = ["base_size", "64", "test_h", "65", "test_w", "65", "test_batch_size", "2", "device", "cpu"]


def fake_epoch(*args, **kwargs):
    """Stands in for training.train_iterations: these tests are about files and paths, not learning."""
    return {"loss": 1.0, "main_loss": 1.0, "aux_loss": 0.0, "mIoU": 0.1, "mAcc": 0.1, "allAcc": 0.1}


def test_results_folder_and_run_directory_follow_the_release_layout():
    assert run_directory("exp/demo/x/model") == os.path.normpath("exp/demo/x")
    assert run_directory("runs/plain") == os.path.normpath("runs/plain")
    assert results_folder("runs/a/model/train_epoch_4.pth", "val", [1.0]) == os.path.join("runs/a", "result",
                                                                                        "epoch_4", "val", "ss")
    assert results_folder("runs/a/model/best_mIoU.pth", "test", [0.5, 1.0]).endswith(
        os.path.join("result", "best_mIoU", "test", "ms"))


def test_each_model_file_gets_its_own_results_folder():
    """A checkpoint and its ONNX and TorchScript exports (one stem) are evaluated into three folders."""
    folders = [results_folder(f"runs/a/model/best_mIoU{suffix}", "val", [1.0])
               for suffix in (".pth", ".onnx", ".torchscript")]
    assert [Path(folder).parts[-3] for folder in folders] == ["best_mIoU", "best_mIoU_onnx", "best_mIoU_torchscript"]


def test_overrides_carry_through_training_testing_and_rescoring(tmp_path, monkeypatch, train_tool, test_tool,
                                                                 one_thread):
    """Another save_path and epochs on the command line: the run's files go to that save_path, tool/test.py
    with the same overrides finds the run's checkpoint and writes beside it, and re-scoring keeps the record."""
    config = write_tiny_config(tmp_path)  # the YAML's own save_path is tmp_path/model
    list_path = str(tmp_path / "data" / "list.txt")
    run = tmp_path / "runs" / "demo" / "model"
    monkeypatch.setattr(training, "train_iterations", fake_epoch)
    train_tool.main(["--config", str(config), "save_path", str(run), "epochs", "1"])

    # the checkpoints, the log and the effective config all go to the overridden save_path
    assert not (tmp_path / "model").exists()
    assert (run / "train_epoch_1.pth").is_file()
    logs, copies = sorted(run.glob("train-*.log")), sorted(run.glob("train-*.yaml"))
    assert len(logs) == 1 and len(copies) == 1
    assert f"run in {run}" in logs[0].read_text()
    effective = load_cfg(str(copies[0]))
    assert effective.save_path == str(run) and effective.epochs == 1 and effective.manual_seed == 5

    # resuming a run that never validated says nothing about a best score
    train_tool.main(["--config", str(config), "save_path", str(run), "epochs", "2", "resume", "auto"])
    log_text = "\n".join(path.read_text() for path in run.glob("train-*.log"))
    assert "resumed from" in log_text
    assert "best mIoU" not in log_text and "best validation" not in log_text

    # test.py with the same overrides finds the run's checkpoint and writes beside the run
    assert test_tool.main(["--config", str(config), "save_path", str(run), "epochs", "2", "test_list", list_path,
                           "scales", "[0.75,1.0]", *TEST_KEYS]) == 0
    folder = tmp_path / "runs" / "demo" / "result" / "epoch_2" / "val" / "ms"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["model_path"] == str(run / "train_epoch_2.pth") and metrics["scales"] == [0.75, 1.0]
    assert len(list(folder.glob("test-*.log"))) == 1

    # re-scoring those predictions keeps the record of how they were made
    assert test_tool.main(["--config", str(config), "test_list", list_path, "has_prediction", "True",
                           "save_folder", str(folder), "scales", "[1.0]", *TEST_KEYS]) == 0
    rescored = json.loads((folder / "metrics.json").read_text())
    assert rescored["has_prediction"] is True
    assert rescored["model_path"] == str(run / "train_epoch_2.pth") and rescored["scales"] == [0.75, 1.0]
    assert rescored["confusion_matrix"] == metrics["confusion_matrix"]


@pytest.mark.slow
def test_shell_wrappers_from_another_directory_with_relative_paths(tmp_path):
    """sh tool/train.sh / tool/test.sh from the user's own directory; the repository's config
    keeps its repository paths (names, colours), the user's relative paths are the user's."""
    make_dataset(tmp_path / "data", classes=4)
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    data = ["data_root", "data", "train_list", "data/list.txt", "save_path", "run1/model", "epochs", "1"]
    small = [*TINY_MODEL_OPTS, "train_h", "65", "train_w", "65",
             "batch_size", "2", "workers", "0", "print_freq", "1", "device", "cpu"]
    train = subprocess.run(["sh", str(REPO_ROOT / "tool" / "train.sh"), "demo", "pyconvresnet50_pyconvsegnet",
                            *data, *small], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert (tmp_path / "run1" / "model" / "train_epoch_1.pth").is_file()
    assert list((tmp_path / "run1" / "model").glob("train-*.log"))

    test = subprocess.run(["sh", str(REPO_ROOT / "tool" / "test.sh"), "demo", "pyconvresnet50_pyconvsegnet",
                           *data, *small, "test_list", "data/list.txt", "model_path", "run1/model/train_epoch_1.pth",
                           *TEST_KEYS], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert test.returncode == 0, test.stdout[-2000:] + test.stderr[-2000:]
    metrics = json.loads((tmp_path / "run1" / "result" / "epoch_1" / "val" / "ss" / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and metrics["names"] == ["background", "disc", "rectangle", "triangle"]
    assert not (REPO_ROOT / "run1").exists()


def test_repository_config_paths_are_the_repositorys_from_any_directory(tmp_path, monkeypatch):
    demo = REPO_ROOT / "config" / "demo" / "demo_pyconvresnet50_pyconvsegnet.yaml"
    monkeypatch.chdir(tmp_path)
    cfg = load_cfg(str(demo), ["save_path", "mine/model"])
    assert cfg.colors_path == str(REPO_ROOT / "config" / "demo" / "demo_colors.txt")
    assert cfg.data_root == str(REPO_ROOT / "data" / "demo" / "ADEChallengeData2016")
    assert cfg.save_path == "mine/model"  # typed by the user: relative to the user's directory
    own = tmp_path / "own.yaml"
    own.write_text("TRAIN:\n  save_path: exp/x/model\n")
    cfg = load_cfg(str(own))
    rebase_repository_paths(cfg, str(own), [])
    assert cfg.save_path == "exp/x/model"  # a user's own YAML: relative to where it is run, as in the release


def test_a_rejected_config_writes_nothing(tmp_path, train_tool):
    """A typo, a bad value or a missing file leaves no directory, log or config copy."""
    config = write_tiny_config(tmp_path)
    for overrides, expected in ((["epochz", "1"], "did you mean 'epochs'"),
                                (["epochs", "0"], "epochs must be"),
                                (["pretrained", str(tmp_path / "none.pth")], "pretrained")):
        with pytest.raises(ConfigError, match=expected):
            train_tool.main(["--config", str(config), *overrides])
        assert not (tmp_path / "model").exists()


def test_a_fresh_run_into_another_runs_folder_is_refused_unless_overwrite_run(tmp_path, monkeypatch, train_tool):
    """Issue 24 item 1: a new run (no resume) into a save_path holding another run's checkpoints is refused before
    anything is written, with the ways on; overwrite_run True removes the old run's checkpoints and events."""
    monkeypatch.setattr(training, "train_iterations", fake_epoch)
    config = write_tiny_config(tmp_path, epochs=3, keep_checkpoints=3, evaluate=True)
    monkeypatch.setattr(whole_images, "evaluate_images", lambda *args, **kwargs: dict(
        mIoU=0.5, mAcc=0.5, allAcc=0.5, iou=[0.5] * 3, acc=[0.5] * 3, num_images=4))
    train_tool.main(["--config", str(config)])
    model_dir = tmp_path / "model"
    before = {path.name: path.stat().st_mtime_ns for path in model_dir.iterdir()}
    assert {"train_epoch_3.pth", "best_mIoU.pth"} <= set(before)

    with pytest.raises(ConfigError) as refused:
        train_tool.main(["--config", str(config), "epochs", "2", "base_lr", "0.02"])
    message = str(refused.value)
    assert "\n" not in message and str(model_dir) in message and "train_epoch_3.pth" in message
    assert "'resume auto'" in message and "another save_path" in message and "overwrite_run True" in message
    assert {path.name: path.stat().st_mtime_ns for path in model_dir.iterdir()} == before  # nothing written
    with pytest.raises(ConfigError, match="give only one of them"):
        train_tool.main(["--config", str(config), "resume", "auto", "overwrite_run", "True"])

    train_tool.main(["--config", str(config), "epochs", "2", "overwrite_run", "True", "evaluate", "False"])
    left = {path.name for path in model_dir.iterdir() if not path.name.startswith("train-")}
    events = {name for name in left if name.startswith("events.out.tfevents.")}  # the old run's: in the log below
    assert left - events == {"train_epoch_1.pth", "train_epoch_2.pth"}  # no train_epoch_3.pth, no best_mIoU.pth
    newest_log = max(model_dir.glob("train-*.log"), key=lambda path: path.stat().st_mtime_ns).read_text()
    assert re.search(r"overwrite_run True: removed the previous run's train_epoch_1\.pth, train_epoch_2\.pth, "
                     r"train_epoch_3\.pth, best_mIoU\.pth, events\.out\.tfevents\.\S+ from ", newest_log)


def test_directories_given_as_checkpoints_say_so(tmp_path, train_tool, test_tool):
    """A directory as weight, resume, pretrained or model_path is named as one, with the
    checkpoints of a run directory listed."""
    config = write_tiny_config(tmp_path)
    run = tmp_path / "old_run"
    run.mkdir()
    for name in ("train_epoch_3.pth", "train_epoch_4.pth", "best_mIoU.pth"):
        (run / name).write_bytes(b"x")
    for key in ("weight", "resume", "pretrained"):
        with pytest.raises(ConfigError) as error:
            train_tool.main(["--config", str(config), key, str(run)])
        message = str(error.value)
        assert "is a directory" in message and "train_epoch_4.pth" in message and "best_mIoU.pth" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        test_tool.main(["--config", str(config), "test_list", str(tmp_path / "data" / "list.txt"),
                        "model_path", str(empty), "save_folder", str(tmp_path / "out"), *TEST_KEYS])
    assert not (tmp_path / "model").exists()


def test_missing_imagenet_file_says_where_it_comes_from(tmp_path, train_tool):
    """A missing ImageNet file names where the weights come from."""
    config = write_tiny_config(tmp_path)
    with pytest.raises(ConfigError) as error:
        train_tool.main(["--config", str(config), "pretrained", "initmodel/resnet50.pth"])
    message = str(error.value)
    assert "ImageNet" in message and "Released weights" in message and "pretrained ''" in message
    # The hint names a page and a section of the docs ("FILE, section 'NAME'"): both must exist.
    page, section = re.fullmatch(r"(\S+), section '([^']+)'", RELEASED_WEIGHTS_HINT).groups()
    assert "download" in doc_section(page, section)


def test_exported_files_are_named_as_such_and_hints_only_where_they_apply(tmp_path, train_tool):
    """An exported network as weight, resume or pretrained says what it is and where it can be used; a missing
    one as model_path says how it is made; the released weights are pointed to only for a file that is not a
    run's own checkpoint."""
    config = write_tiny_config(tmp_path)
    for suffix in (".onnx", ".torchscript"):
        exported = tmp_path / f"model{suffix}"
        exported.write_bytes(b"an exported network")
        for key in ("weight", "resume", "pretrained"):
            with pytest.raises(ConfigError) as error:
                train_tool.main(["--config", str(config), key, str(exported)])
            message = str(error.value)
            assert message.startswith(f"{key} {exported} is an exported network ({suffix} file")
            assert "give it as model_path to tool/test.py or tool/demo.py" in message and "corrupt" not in message
        with pytest.raises(CheckpointError, match=r"is an exported network .* not a checkpoint \(\.pth\)"):
            load_checkpoint_file(exported)
    assert not (tmp_path / "model").exists()
    missing = checkpoint_path_problem("model_path", str(tmp_path / "none.onnx"))
    assert "tool/deployment/export.py" in missing and "--format onnx" in missing and "ADE20K" not in missing
    run_file = checkpoint_path_problem("model_path", str(tmp_path / "model" / "train_epoch_2.pth"))
    assert run_file == f"model_path file not found: {tmp_path / 'model' / 'train_epoch_2.pth'}"
    assert "released ADE20K" in checkpoint_path_problem("weight", str(tmp_path / "pyconvresnet50_ade20k.pth"))


def test_a_run_checkpoint_for_other_epochs_lists_what_the_run_has(tmp_path, test_tool):
    config = write_tiny_config(tmp_path)
    run = tmp_path / "model"
    run.mkdir()
    (run / "train_epoch_1.pth").write_bytes(b"x")
    cfg = load_cfg(str(config))
    assert resolve_test_paths(cfg)[0].startswith(f"model_path {run / 'train_epoch_2.pth'}")
    with pytest.raises(CheckpointError) as error:
        test_tool.main(["--config", str(config), "test_list", str(tmp_path / "data" / "list.txt"), *TEST_KEYS])
    assert "train_epoch_1.pth" in str(error.value) and "epochs" in str(error.value)


def test_fine_tuning_a_checkpoint_of_another_class_count(tmp_path, monkeypatch, train_tool, one_thread):
    """weight PATH from a 5-class model for a 3-class run loads and says what it re-initialised."""
    import torch

    from model import build_model
    from util.runtime.checkpoint_io import add_module_prefix

    source_cfg = load_cfg(str(write_tiny_config(tmp_path)), ["classes", "5"])
    source = build_model(source_cfg)
    torch.save({"state_dict": add_module_prefix(source.state_dict()), "epoch": 100}, tmp_path / "ade20k.pth")
    config = write_tiny_config(tmp_path)
    monkeypatch.setattr(training, "train_iterations", fake_epoch)
    train_tool.main(["--config", str(config), "weight", str(tmp_path / "ade20k.pth"), "epochs", "1"])
    log_text = next((tmp_path / "model").glob("train-*.log")).read_text()
    assert "cls.1, aux.4 re-initialised" in log_text
    saved = torch.load(tmp_path / "model" / "train_epoch_1.pth", weights_only=True)["state_dict"]
    for key, value in source.state_dict().items():  # every tensor but the two classifiers came from the file
        if not key.startswith(("cls.1.", "aux.4.")):
            assert torch.equal(saved[f"module.{key}"], value), key
    assert saved["module.cls.1.weight"].shape[0] == 3


def test_a_typed_path_missing_here_but_in_the_repository_is_named(tmp_path, monkeypatch, test_tool):
    """The 'Your own data' mistake: training from the repository root writes exp/...; model_path exp/... typed
    in another directory is relative to that directory (the rule), and the error names the repository's file."""
    config = write_tiny_config(tmp_path)
    run = REPO_ROOT / "exp" / f"test_twin_{tmp_path.name}" / "model"
    typed = os.path.relpath(run / "train_epoch_2.pth", REPO_ROOT)
    made_exp = not run.parents[1].exists()
    run.mkdir(parents=True)
    try:
        (run / "train_epoch_2.pth").write_bytes(b"x")
        monkeypatch.chdir(tmp_path)
        with pytest.raises(CheckpointError) as error:
            test_tool.main(["--config", str(config), "test_list", str(tmp_path / "data" / "list.txt"),
                            "model_path", typed, *TEST_KEYS])
        message = str(error.value)
        assert message.startswith(f"model_path file not found: {typed} (relative to the current directory {tmp_path}")
        assert f"the repository holds {run / 'train_epoch_2.pth'}" in message
        assert not (tmp_path / "exp").exists()  # nothing was written for a refused path
        monkeypatch.chdir(REPO_ROOT)  # from the repository root the typed path is that file
        assert checkpoint_path_problem("model_path", typed) is None
    finally:
        shutil.rmtree(run.parents[1] if made_exp else run.parent)
