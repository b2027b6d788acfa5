"""A training run's files: epoch checkpoints sorted and pruned, the resume target, content and checks."""
import pytest
import torch
from torch import nn


def _touch_epochs(folder, epochs):
    folder.mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
        (folder / f"train_epoch_{epoch}.pth").write_bytes(b"x")
    (folder / "best_mIoU.pth").write_bytes(b"x")
    (folder / "train_epoch_x.pth").write_bytes(b"x")  # not an epoch checkpoint


def test_epoch_checkpoints_sort_by_number_and_prune_keeps_best(tmp_path):
    from util.engine.checkpoints import prune_checkpoints
    from util.runtime.runs import checkpoint_path, list_epoch_checkpoints

    _touch_epochs(tmp_path, [2, 10, 9])
    assert [epoch for epoch, _ in list_epoch_checkpoints(tmp_path)] == [2, 9, 10]  # 10 after 9, not after 1
    assert list_epoch_checkpoints(tmp_path / "missing") == []
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_mIoU.pth", "train_epoch_10.pth", "train_epoch_x.pth"]
    assert checkpoint_path(tmp_path, 10) == str(tmp_path / "train_epoch_10.pth")


def test_find_resume_checkpoint(tmp_path):
    from util.engine.checkpoints import find_resume_checkpoint

    assert find_resume_checkpoint(None, tmp_path) is None and find_resume_checkpoint("", tmp_path) is None
    assert find_resume_checkpoint("auto", tmp_path) is None  # nothing saved yet: start from scratch
    _touch_epochs(tmp_path, [3, 12])
    assert find_resume_checkpoint("auto", tmp_path) == str(tmp_path / "train_epoch_12.pth")
    assert find_resume_checkpoint("some/file.pth", tmp_path) == "some/file.pth"


def test_training_checkpoint_round_trip_and_check(tmp_path):
    from util.config import load_cfg
    from util.engine.checkpoints import check_training_checkpoint, make_checkpoint, save_training_checkpoint
    from util.errors import CheckpointError
    from util.runtime.checkpoint_io import load_checkpoint_file

    model = nn.Sequential(nn.Conv2d(3, 2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    checkpoint = make_checkpoint(3, model, optimizer, scheduler, None, 0.25, load_cfg(None, []))
    path = tmp_path / "train_epoch_3.pth"
    save_training_checkpoint(checkpoint, path)
    loaded = load_checkpoint_file(path)
    check_training_checkpoint(loaded, str(path))
    assert loaded["epoch"] == 3 and loaded["best_mIoU"] == 0.25 and list(loaded["state_dict"]) == [
        "module.0.weight", "module.0.bias"]
    with pytest.raises(CheckpointError, match="not a training checkpoint.*use 'weight"):
        check_training_checkpoint({"state_dict": loaded["state_dict"]}, "weights.pth")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="could not write checkpoint .*resume auto"):
        save_training_checkpoint(checkpoint, blocker / "train_epoch_4.pth")  # parent is a file
