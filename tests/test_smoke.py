"""The whole path in the fast tier, in-process, on the tiny network: train, resume, test, read the metrics back."""
import json

import numpy as np
import pytest
import torch

from tiny_runs import write_tiny_config


def test_train_resume_auto_test_and_metrics(tmp_path, train_tool, test_tool, one_thread, capsys):
    """A run of 1 epoch (2 iterations), continued to 2 epochs by ``resume auto``; tool/test.py scores the final
    checkpoint on the 4 images; its metrics.json agrees with the labels it scored."""
    config = write_tiny_config(tmp_path, epochs=2, resume="auto")
    model_dir = tmp_path / "model"
    first = train_tool.main(["--config", str(config), "epochs", "1"])
    assert first["epochs"] == 1 and np.isfinite(first["train"]["loss"])
    epoch_1 = torch.load(model_dir / "train_epoch_1.pth", weights_only=True)

    second = train_tool.main(["--config", str(config)])
    assert second["epochs"] == 2 and np.isfinite(second["train"]["loss"])
    assert f"resumed from {model_dir / 'train_epoch_1.pth'}: 1 epoch(s) done" in capsys.readouterr().out
    epoch_2 = torch.load(model_dir / "train_epoch_2.pth", weights_only=True)
    assert epoch_2["epoch"] == 2 and epoch_2["scheduler"]["last_epoch"] == 4  # 2 + 2 iterations
    changed = [key for key, value in epoch_2["state_dict"].items()
               if value.is_floating_point() and not torch.equal(value, epoch_1["state_dict"][key])]
    assert changed and all(torch.isfinite(value).all() for value in epoch_2["state_dict"].values()
                           if value.is_floating_point())

    # test.py finds the run's last checkpoint from the config and writes beside the run
    assert test_tool.main(["--config", str(config), "test_list", str(tmp_path / "data" / "list.txt")]) == 0
    metrics = json.loads((tmp_path / "result" / "epoch_2" / "val" / "ss" / "metrics.json").read_text())
    assert metrics["model_path"] == str(model_dir / "train_epoch_2.pth") and metrics["num_images"] == 4
    scored = np.array(metrics["confusion_matrix"])
    assert scored.shape == (3, 3) and scored.sum() == 4 * (48 - 4) * 56  # every pixel but the 4 void rows
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["allAcc"] == pytest.approx(np.trace(scored) / scored.sum())
