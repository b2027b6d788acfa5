"""tool/dataset_converters/prepare_ade20k.py on a generated ADEChallengeData2016-like tree."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from util.data.preparation import TEMP_MARKER

from conftest import REPO_ROOT
from tiny_runs import load_script

TOOL = REPO_ROOT / "tool" / "dataset_converters" / "prepare_ade20k.py"


prepare = load_script("tool/dataset_converters/prepare_ade20k.py", "prepare_ade20k")


def make_raw_tree(root: Path, counts=(("training", 4), ("validation", 2))) -> dict:
    """Random 40x50 images and raw labels with values 0..150 (0 and 150 always present)."""
    rng = np.random.default_rng(0)
    raw_labels = {}
    for split, count in counts:
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for index in range(count):
            name = f"ADE_{split[:5]}_{index:08d}"
            image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
            raw = rng.integers(0, 151, (40, 50)).astype(np.uint8)
            raw[0, 0], raw[0, 1] = 0, 150
            assert cv2.imwrite(str(root / "images" / split / f"{name}.jpg"), image)
            assert cv2.imwrite(str(root / "annotations" / split / f"{name}.png"), raw)
            raw_labels[(split, name)] = raw
    return raw_labels


def run(root: Path, capsys, workers=1):
    code = prepare.main([str(root), "--workers", str(workers)])
    return code, capsys.readouterr().err


def read_list_lines(root: Path, split: str) -> list[str]:
    return (root / "list" / f"{split}.txt").read_text().splitlines()


def output_mtimes(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in list((root / "annotations_0based").rglob("*")) +
            list((root / "list").glob("*")) if p.is_file()}


def test_labels_are_shifted_and_lists_written(tmp_path, capsys):
    raw_labels = make_raw_tree(tmp_path)
    code, log = run(tmp_path, capsys)
    assert code == 0, log
    for split, count in (("training", 4), ("validation", 2)):
        lines = read_list_lines(tmp_path, split)
        assert len(lines) == count and lines == sorted(lines)
        for line in lines:
            image_rel, label_rel = line.split(" ")
            assert image_rel.startswith(f"images/{split}/") and label_rel.startswith(f"annotations_0based/{split}/")
            assert (tmp_path / image_rel).is_file()
            label = cv2.imread(str(tmp_path / label_rel), cv2.IMREAD_UNCHANGED)
            raw = raw_labels[(split, Path(label_rel).stem)]
            expected = np.where(raw == 0, 255, raw.astype(np.int16) - 1).astype(np.uint8)
            assert label.dtype == np.uint8 and np.array_equal(label, expected)
            assert label[0, 0] == 255 and label[0, 1] == 149
    assert "training: 4/4" in log  # progress line


def test_second_run_changes_nothing(tmp_path, capsys):
    make_raw_tree(tmp_path)
    assert run(tmp_path, capsys)[0] == 0
    before = output_mtimes(tmp_path)
    code, log = run(tmp_path, capsys)
    assert code == 0
    assert output_mtimes(tmp_path) == before
    assert "0 to convert" in log and "written" not in log and "WARNING" not in log and "ERROR" not in log


def test_leftover_temp_file_is_redone(tmp_path, capsys):
    raw_labels = make_raw_tree(tmp_path)
    assert run(tmp_path, capsys)[0] == 0
    output = tmp_path / "annotations_0based" / "training" / "ADE_train_00000001.png"
    partial = output.read_bytes()[:30]
    output.unlink()
    leftover = output.with_name(f".{output.name}{TEMP_MARKER}12345")
    leftover.write_bytes(partial)
    code, log = run(tmp_path, capsys)
    assert code == 0 and "1 to convert" in log and "leftover" in log
    assert not leftover.exists()
    raw = raw_labels[("training", "ADE_train_00000001")]
    assert np.array_equal(cv2.imread(str(output), cv2.IMREAD_UNCHANGED),
                          np.where(raw == 0, 255, raw.astype(np.int16) - 1).astype(np.uint8))


def test_orphans_reported_and_left_out(tmp_path, capsys):
    make_raw_tree(tmp_path)
    cv2.imwrite(str(tmp_path / "images" / "training" / "lonely_image.jpg"), np.zeros((40, 50, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "annotations" / "validation" / "lonely_label.png"), np.zeros((40, 50), np.uint8))
    code, log = run(tmp_path, capsys)
    assert code == 1  # files left out of the lists
    assert "2 file(s) left out of the lists" in log
    assert "image without label" in log and "lonely_image.jpg" in log
    assert "label without image" in log and "lonely_label.png" in log
    assert not any("lonely" in line for split in ("training", "validation")
                   for line in read_list_lines(tmp_path, split))


def test_values_above_150_are_an_error(tmp_path, capsys):
    make_raw_tree(tmp_path)
    bad = np.zeros((40, 50), np.uint8)
    bad[3, 3], bad[4, 4] = 151, 200
    cv2.imwrite(str(tmp_path / "annotations" / "validation" / "ADE_valid_00000000.png"), bad)
    code, log = run(tmp_path, capsys)
    assert code == 1
    assert "ADE_valid_00000000.png: label values 151, 200 are not valid here (valid: 0..150)" in log
    assert read_list_lines(tmp_path, "validation") == [
        "images/validation/ADE_valid_00000001.jpg annotations_0based/validation/ADE_valid_00000001.png"]


def test_missing_folders(tmp_path, capsys):
    (tmp_path / "images" / "training").mkdir(parents=True)
    code, log = run(tmp_path, capsys)
    assert code == 2 and "images/validation" in log and "annotations/training" in log
    assert prepare.main([str(tmp_path / "absent")]) == 2


def test_command_line_with_worker_pool(tmp_path):
    make_raw_tree(tmp_path, counts=(("training", 5), ("validation", 1)))
    result = subprocess.run([sys.executable, str(TOOL), str(tmp_path), "--workers", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(read_list_lines(tmp_path, "training")) == 5 and "ETA" in result.stderr


def test_trainval_and_testing_lists(tmp_path, capsys):
    make_raw_tree(tmp_path)
    assert run(tmp_path, capsys)[0] == 0
    assert read_list_lines(tmp_path, "trainval") == read_list_lines(tmp_path, "training") + \
        read_list_lines(tmp_path, "validation")
    assert not (tmp_path / "list" / "testing.txt").exists()  # no test images unpacked
    test_dir = tmp_path / "release_test" / "testing"
    test_dir.mkdir(parents=True)
    for name in ("ADE_test_00000002", "ADE_test_00000001"):
        cv2.imwrite(str(test_dir / f"{name}.jpg"), np.zeros((30, 20, 3), np.uint8))
    code, log = run(tmp_path, capsys)
    assert code == 0 and "testing.txt: 2 lines (written)" in log
    assert read_list_lines(tmp_path, "testing") == ["release_test/testing/ADE_test_00000001.jpg",
                                                    "release_test/testing/ADE_test_00000002.jpg"]
    # The test list is read as split "test" (images only) by the loader the tools use.
    from util.data.dataset import read_list
    assert read_list(tmp_path / "list" / "testing.txt", tmp_path, "test")[0] == (
        str(test_dir / "ADE_test_00000001.jpg"), None)


def test_mapping_function():
    raw = np.array([[0, 1, 150], [75, 0, 2]], np.uint8)
    assert prepare.ade20k_train_ids(raw).tolist() == [[255, 0, 149], [74, 255, 1]]
    assert prepare.ade20k_train_ids(raw.astype(np.uint16)).dtype == np.uint8
