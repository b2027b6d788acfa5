"""tool/dataset_converters/prepare_cityscapes.py on a fake tree in the official layout (labelIds PNGs)."""
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tiny_runs import REPO_ROOT, load_script

prepare = load_script("tool/dataset_converters/prepare_cityscapes.py", "prepare_cityscapes")
CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",), "test": ("berlin",)}


def make_tree(root, size=(24, 40)) -> dict:
    """Two frames per city; labelIds hold every id 0..33 (plus random ones). Returns {(split, key): ids}."""
    rng = np.random.default_rng(1)
    ids = {}
    for split, cities in CITIES.items():
        for city in cities:
            for frame in range(2):
                key = f"{city}/{city}_00000{frame}_000019"
                image_path = root / "leftImg8bit" / split / f"{key}_leftImg8bit.png"
                image_path.parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(image_path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
                label_ids = rng.integers(0, 34, size, dtype=np.uint8)
                label_ids.flat[:34] = np.arange(34)
                gt_dir = root / "gtFine" / split / city
                gt_dir.mkdir(parents=True, exist_ok=True)
                stem = f"{city}_00000{frame}_000019"
                assert cv2.imwrite(str(gt_dir / f"{stem}_gtFine_labelIds.png"), label_ids)
                # The other gtFine files of the official layout, which the tool must not take for labels.
                assert cv2.imwrite(str(gt_dir / f"{stem}_gtFine_color.png"), np.zeros((*size, 3), np.uint8))
                assert cv2.imwrite(str(gt_dir / f"{stem}_gtFine_instanceIds.png"), label_ids.astype(np.uint16))
                ids[(split, key)] = label_ids
    return ids


def official_train_ids(label_ids):
    """Pixel-wise from the published table (trainIds of the 19 classes, in the order of labels.py)."""
    evaluated = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    out = np.full(label_ids.shape, 255, np.uint8)
    for train_id, label_id in enumerate(evaluated):
        out[label_ids == label_id] = train_id
    return out


def test_table_matches_cityscapesscripts():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    official = {label.id: label.trainId for label in labels.labels if label.id >= 0}
    assert prepare.LABEL_ID_TO_TRAIN_ID == {i: (255 if t in (-1, 255) else t) for i, t in official.items()}
    trained = sorted((label for label in labels.labels if 0 <= label.trainId < 255), key=lambda label: label.trainId)
    names = [label.name for label in trained]
    colors = [list(label.color) for label in trained]
    from util.data.dataset import read_colors, read_names
    assert read_names(REPO_ROOT / "config/cityscapes/cityscapes_names.txt", 19) == names
    assert read_colors(REPO_ROOT / "config/cityscapes/cityscapes_colors.txt", 19).tolist() == colors


def test_mapping_function():
    label_ids = np.arange(34, dtype=np.uint8).reshape(2, 17)
    assert np.array_equal(prepare.cityscapes_train_ids(label_ids), official_train_ids(label_ids))
    assert sorted(set(prepare.LABEL_ID_TO_TRAIN_ID.values())) == list(range(19)) + [255]


def test_converts_pixel_for_pixel_and_writes_lists(tmp_path, capsys):
    ids = make_tree(tmp_path)
    assert prepare.main([str(tmp_path), "--workers", "1"]) == 0
    log = capsys.readouterr().err
    assert "train: 4/4" in log and "ETA" in log
    for split in ("train", "val"):
        lines = (tmp_path / "list" / f"{split}.txt").read_text().splitlines()
        assert len(lines) == 2 * len(CITIES[split])
        for line in lines:
            image_rel, label_rel = line.split(" ")
            assert image_rel.startswith(f"leftImg8bit/{split}/") and image_rel.endswith("_leftImg8bit.png")
            assert label_rel.endswith("_gtFine_labelTrainIds.png") and (tmp_path / image_rel).is_file()
            key = image_rel[len(f"leftImg8bit/{split}/"):-len("_leftImg8bit.png")]
            train_ids = cv2.imread(str(tmp_path / label_rel), cv2.IMREAD_UNCHANGED)
            assert train_ids.dtype == np.uint8 and np.array_equal(train_ids, official_train_ids(ids[(split, key)]))
    assert (tmp_path / "list" / "test.txt").read_text().splitlines() == [
        "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png",
        "leftImg8bit/test/berlin/berlin_000001_000019_leftImg8bit.png"]
    # Re-run: nothing to do, nothing rewritten.
    assert prepare.main([str(tmp_path), "--workers", "1"]) == 0
    log = capsys.readouterr().err
    assert "0 to convert" in log and "(written)" not in log


def test_bad_label_is_named_and_left_out(tmp_path, capsys):
    make_tree(tmp_path)
    bad = tmp_path / "gtFine" / "val" / "frankfurt" / "frankfurt_000001_000019_gtFine_labelIds.png"
    cv2.imwrite(str(bad), np.full((24, 40), 34, np.uint8))
    assert prepare.main([str(tmp_path), "--workers", "1"]) == 1
    log = capsys.readouterr().err
    assert f"{bad}: label values 34 are not valid here (valid: 0..33)" in log
    assert (tmp_path / "list" / "val.txt").read_text().count("\n") == 1


def test_missing_city_folder_is_left_out_with_status_1(tmp_path, capsys):
    """A city whose images are missing: its labels are left out of the list, named, and the status is 1."""
    import shutil

    make_tree(tmp_path)
    shutil.rmtree(tmp_path / "leftImg8bit" / "train" / "bochum")
    assert prepare.main([str(tmp_path), "--workers", "1"]) == 1
    log = capsys.readouterr().err
    assert "label without image" in log and "bochum" in log
    assert "2 file(s) left out of the lists" in log
    lines = (tmp_path / "list" / "train.txt").read_text().splitlines()
    assert len(lines) == 2 and not any("bochum" in line for line in lines)


def test_missing_layout(tmp_path, capsys):
    (tmp_path / "leftImg8bit" / "train").mkdir(parents=True)
    assert prepare.main([str(tmp_path)]) == 2
    assert "gtFine/train" in capsys.readouterr().err


def test_command_line_with_worker_pool(tmp_path):
    make_tree(tmp_path)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tool/dataset_converters/prepare_cityscapes.py"),
                             str(tmp_path), "--workers", "2"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "list" / "train.txt").read_text().splitlines()) == 4
