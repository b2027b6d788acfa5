"""tool/dataset_converters/make_submission.py on the split-test predictions of tool/test.py."""
import cv2
import numpy as np
import pytest
import torch
import yaml

from util.config import load_cfg
from util.runtime.cli import run_cli

from tiny_model import TINY_MODEL_KEYS
from tiny_runs import load_script

submission = load_script("tool/dataset_converters/make_submission.py", "make_submission")
SIZES = [(40, 56), (56, 40), (33, 33)]  # (h, w)
CLASSES = 5


@pytest.fixture
def test_set(tmp_path):
    """ADE20K-like test images (release_test/testing), their images-only list and a split-test config."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "release_test" / "testing"
    folder.mkdir(parents=True)
    names = [f"ADE_test_{index + 1:08d}" for index in range(len(SIZES))]
    for name, size in zip(names, SIZES):
        assert cv2.imwrite(str(folder / f"{name}.jpg"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    (tmp_path / "testing.txt").write_text("".join(f"release_test/testing/{n}.jpg\n" for n in names))
    config = {"DATA": {"data_root": str(tmp_path), "classes": CLASSES},
              "TRAIN": dict(TINY_MODEL_KEYS),
              "TEST": {"test_list": str(tmp_path / "testing.txt"), "split": "test", "base_size": 0, "test_h": 33,
                       "test_w": 33, "device": "cpu", "model_path": str(tmp_path / "model.pth"),
                       "save_folder": str(tmp_path / "result")}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, names


def test_predictions_of_test_py_become_the_benchmark_format(test_set, tmp_path, one_thread, test_tool):
    config, names = test_set
    from model import build_model

    torch.manual_seed(0)
    model = build_model(load_cfg(str(config)))
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "model.pth")
    assert run_cli(lambda: test_tool.main(["--config", str(config)])) == 0
    output = tmp_path / "submission"
    assert submission.main(["--config", str(config), "--output", str(output), "--workers", "1"]) == 0
    assert sorted(p.name for p in output.iterdir()) == [f"{n}.png" for n in names]
    for name, size in zip(names, SIZES):
        predicted = cv2.imread(str(tmp_path / "result" / "gray" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        submitted = cv2.imread(str(output / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert submitted.dtype == np.uint8 and submitted.shape == size  # the image's name and size
        assert np.array_equal(submitted, predicted + 1)  # 1-based, 0 ("other") never predicted
        assert submitted.min() >= 1 and submitted.max() <= CLASSES


def test_refuses_missing_and_wrongly_sized_predictions(test_set, tmp_path, capsys):
    config, names = test_set
    gray = tmp_path / "result" / "gray"
    gray.mkdir(parents=True)
    cv2.imwrite(str(gray / f"{names[0]}.png"), np.zeros(SIZES[0], np.uint8))
    cv2.imwrite(str(gray / f"{names[1]}.png"), np.zeros(SIZES[0], np.uint8))  # the first image's size
    output = tmp_path / "submission"
    assert run_cli(lambda: submission.main(["--config", str(config), "--output", str(output), "--workers", "1"])) == 1
    err = capsys.readouterr().err
    assert f"prediction {gray / (names[1] + '.png')} is 56x40 (WxH) but its image" in err and "is 40x56" in err
    assert f"prediction {gray / (names[2] + '.png')} for image" in err and "does not exist" in err
    assert "2 of 3 predictions" in err and not output.exists()
    # Class ids beyond the config's classes (another dataset's predictions) are refused too.
    cv2.imwrite(str(gray / f"{names[1]}.png"), np.zeros(SIZES[1], np.uint8))
    cv2.imwrite(str(gray / f"{names[2]}.png"), np.full(SIZES[2], CLASSES, np.uint8))
    assert run_cli(lambda: submission.main(["--config", str(config), "--output", str(output), "--workers", "1"])) == 1
    assert f"has class ids {CLASSES} >= classes {CLASSES}" in capsys.readouterr().err


def test_submission_ids():
    assert submission.submission_ids(np.array([[0, 149]], np.uint8)).tolist() == [[1, 150]]
