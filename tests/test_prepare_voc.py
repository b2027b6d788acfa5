"""tool/dataset_converters/prepare_voc.py on fake VOC2012 and SBD trees (palette PNGs, MATLAB .mat files)."""
import subprocess
import sys

import cv2
import numpy as np
import pytest

from util.data.dataset import read_colors

from tiny_runs import REPO_ROOT, load_script

prepare = load_script("tool/dataset_converters/prepare_voc.py", "prepare_voc")
SIZE = (20, 30)
VOC_TRAIN, VOC_VAL = ["2007_000032", "2007_000039"], ["2007_000033", "2008_000002"]
SBD_TRAIN, SBD_VAL = ["2007_000033", "2008_000005", "2008_000008"], ["2007_000032", "2008_000010"]


def voc_palette() -> list:
    """VOC's 256-entry palette as a flat RGB list (the colours config/voc2012 lists for 0..20)."""
    colors = read_colors(REPO_ROOT / "config/voc2012/voc2012_colors.txt", 21).tolist()
    colors += [[224, 224, 192]] * (256 - 21)  # 255: the boundary colour
    return [value for color in colors for value in color]


def random_label(rng, boundary: bool) -> np.ndarray:
    label = rng.integers(0, 21, SIZE, dtype=np.uint8)
    label.flat[:21] = np.arange(21)
    if boundary:
        label[-1] = 255
    return label


def make_trees(root, sbd_root) -> dict:
    """VOC2012 (palette PNG labels for VOC train+val) and SBD (cls/*.mat). Returns {(source, name): label}."""
    from PIL import Image
    rng = np.random.default_rng(2)
    labels = {}
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(n + "\n" for n in VOC_TRAIN))
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(n + "\n" for n in VOC_VAL))
    for name in sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL)):
        assert cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8))
    for name in VOC_TRAIN + VOC_VAL:
        label = random_label(rng, boundary=True)
        image = Image.fromarray(label, mode="P")
        image.putpalette(voc_palette())
        image.save(root / "SegmentationClass" / f"{name}.png")
        labels[("voc", name)] = label
    if sbd_root is not None:
        from scipy.io import savemat
        (sbd_root / "cls").mkdir(parents=True)
        (sbd_root / "train.txt").write_text("".join(n + "\n" for n in SBD_TRAIN))
        (sbd_root / "val.txt").write_text("".join(n + "\n" for n in SBD_VAL))
        for name in SBD_TRAIN + SBD_VAL:
            label = random_label(rng, boundary=False)
            savemat(str(sbd_root / "cls" / f"{name}.mat"),
                    {"GTcls": {"Segmentation": label, "Boundaries": np.zeros((1, 20), object),
                               "CategoriesPresent": np.unique(label[label > 0]).astype(np.uint8)}})
            labels[("sbd", name)] = label
    return labels


def list_names(root, split) -> list:
    lines = (root / "list" / f"{split}.txt").read_text().splitlines()
    for line in lines:
        image_rel, label_rel = line.split(" ")
        assert (root / image_rel).is_file() and (root / label_rel).is_file()
    return [line.split(" ")[0][len("JPEGImages/"):-len(".jpg")] for line in lines]


def read_output(root, name) -> np.ndarray:
    label = cv2.imread(str(root / "SegmentationClassAug" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    assert label.ndim == 2 and label.dtype == np.uint8
    return label


def test_palette_pngs_are_read_as_indices(tmp_path, capsys):
    voc = tmp_path / "VOC2012"
    labels = make_trees(voc, None)
    # The colours a colour reader would see are not the class ids: a palette PNG decoded as colour differs.
    as_colour = cv2.imread(str(voc / "SegmentationClass" / f"{VOC_TRAIN[0]}.png"), cv2.IMREAD_UNCHANGED)
    assert as_colour.ndim == 3
    assert prepare.main([str(voc), "--workers", "1"]) == 0
    assert list_names(voc, "train") == VOC_TRAIN and list_names(voc, "val") == VOC_VAL
    assert not (voc / "list" / "train_aug.txt").exists()
    for name in VOC_TRAIN + VOC_VAL:
        assert np.array_equal(read_output(voc, name), labels[("voc", name)])  # indices, 255 kept
    assert "0 error(s)" in capsys.readouterr().err


def test_sbd_augmentation(tmp_path, capsys):
    pytest.importorskip("scipy.io")
    voc, sbd = tmp_path / "VOC2012", tmp_path / "benchmark_RELEASE" / "dataset"
    labels = make_trees(voc, sbd)
    assert prepare.main([str(voc), "--sbd", str(sbd.parent), "--workers", "1"]) == 0
    # SBD train + SBD val + VOC train - VOC val: 2007_000033 (SBD train but VOC val) is out.
    expected = ["2007_000032", "2007_000039", "2008_000005", "2008_000008", "2008_000010"]
    assert list_names(voc, "train_aug") == expected
    assert prepare.train_aug_names(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL) == expected
    assert list_names(voc, "val") == VOC_VAL
    for name in expected:
        source = "voc" if name in VOC_TRAIN else "sbd"  # VOC's own label wins where there is one
        assert np.array_equal(read_output(voc, name), labels[(source, name)]), name
    capsys.readouterr()
    assert prepare.main([str(voc), "--sbd", str(sbd), "--workers", "1"]) == 0  # the dataset folder itself
    assert "0 to convert" in capsys.readouterr().err


def test_bad_values_and_missing_labels(tmp_path, capsys):
    pytest.importorskip("scipy.io")
    from scipy.io import savemat
    voc, sbd = tmp_path / "VOC2012", tmp_path / "sbd"
    make_trees(voc, sbd)
    savemat(str(sbd / "cls" / "2008_000005.mat"), {"GTcls": {"Segmentation": np.full(SIZE, 255, np.uint8)}})
    (sbd / "cls" / "2008_000008.mat").write_bytes(b"not a mat file")
    (sbd / "cls" / "2008_000010.mat").unlink()
    assert prepare.main([str(voc), "--sbd", str(sbd), "--workers", "1"]) == 1
    log = capsys.readouterr().err
    assert "2008_000005.mat: label values 255 are not valid here (valid: 0..20)" in log
    assert "2008_000008.mat: not a readable .mat file" in log
    assert "no label for 2008_000010" in log
    assert list_names(voc, "train_aug") == ["2007_000032", "2007_000039"]


def test_missing_jpeg_is_left_out_with_status_1(tmp_path, capsys):
    """A listed image whose JPEG is missing: named, left out of the list, and the status is 1."""
    voc = tmp_path / "VOC2012"
    make_trees(voc, None)
    (voc / "JPEGImages" / "2007_000039.jpg").unlink()
    assert prepare.main([str(voc), "--workers", "1"]) == 1
    log = capsys.readouterr().err
    assert f"image not found: {voc / 'JPEGImages' / '2007_000039.jpg'}" in log
    assert "1 file(s) left out of the lists" in log
    assert list_names(voc, "train") == ["2007_000032"]


def test_missing_layout(tmp_path, capsys):
    (tmp_path / "JPEGImages").mkdir()
    assert prepare.main([str(tmp_path)]) == 2
    assert "SegmentationClass" in capsys.readouterr().err
    voc = tmp_path / "VOC2012"
    make_trees(voc, None)
    assert prepare.main([str(voc), "--sbd", str(tmp_path / "nowhere")]) == 2


def test_command_line_with_worker_pool(tmp_path):
    voc = tmp_path / "VOC2012"
    make_trees(voc, None)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tool/dataset_converters/prepare_voc.py"), str(voc),
                             "--workers", "2"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list_names(voc, "val") == VOC_VAL
