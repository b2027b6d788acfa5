"""List parsing, image/label loading errors, SegDataset checks and seeded augmentation, class files, CamVid."""
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from util.data.dataset import SegDataset, load_image, load_label, read_colors, read_list, read_names
from util.data.transforms import build_train_transform, build_val_transform
from util.errors import DataError

from conftest import REPO_ROOT
from tiny_runs import make_cfg


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def make_sample(root: Path, name: str, height=12, width=14, seed=0, num_values=4, image_dir="images",
                label_dir="labels"):
    rng = np.random.default_rng(seed)
    image = write_png(root / image_dir / f"{name}.png", rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    label = write_png(root / label_dir / f"{name}.png",
                      rng.integers(0, num_values, (height, width)).astype(np.uint8))
    return image, label


def write_list(root: Path, text: str, name="list.txt", newline="\n") -> Path:
    path = root / name
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


def small_cfg(**overrides):
    return make_cfg(**{"train_h": 9, "train_w": 9, **overrides})


# ---------------------------------------------------------------- read_list

def test_read_list_relative_absolute_blank_lines_and_crlf(tmp_path):
    make_sample(tmp_path, "a")
    make_sample(tmp_path, "b")
    absolute = tmp_path / "images" / "b.png"
    list_path = write_list(tmp_path, f"\nimages/a.png labels/a.png\n\n  {absolute}   labels/b.png  \n\n",
                           newline="\r\n")
    items = read_list(list_path, tmp_path, "train")
    assert items == [(str(tmp_path / "images/a.png"), str(tmp_path / "labels/a.png")),
                     (str(absolute), str(tmp_path / "labels/b.png"))]


def test_read_list_test_split_label_optional(tmp_path):
    list_path = write_list(tmp_path, "images/a.png\nimages/b.png labels/b.png\n")
    assert read_list(list_path, tmp_path, "test") == [(str(tmp_path / "images/a.png"), None),
                                                      (str(tmp_path / "images/b.png"), None)]


def test_read_list_missing_file(tmp_path):
    with pytest.raises(DataError, match="list file not found: .*nope.txt"):
        read_list(tmp_path / "nope.txt", tmp_path, "train")


@pytest.mark.parametrize("text,line", [
    ("images/a.png labels/a.png\nimages/only.png\n", 2),
    ("images/a.png labels/a.png\n\nx\ty\tz\n", 3),
])
def test_read_list_malformed_line(tmp_path, text, line):
    list_path = write_list(tmp_path, text)
    with pytest.raises(DataError, match=rf"list .*list.txt line {line}: expected"):
        read_list(list_path, tmp_path, "train")


def test_read_list_empty(tmp_path):
    with pytest.raises(DataError, match="no entries"):
        read_list(write_list(tmp_path, "\n\n"), tmp_path, "train")


def test_paths_with_spaces(tmp_path):
    make_sample(tmp_path, "my image 1", image_dir="my images", label_dir="my labels")
    make_sample(tmp_path, "plain", image_dir="my images", label_dir="my labels")
    image, label = tmp_path / "my images/my image 1.png", tmp_path / "my labels/my image 1.png"
    # tab separator, space-split where both halves exist, extension rule for files not (yet) on disk
    text = ("my images/my image 1.png\tmy labels/my image 1.png\n"
            "my images/my image 1.png my labels/my image 1.png\n"
            "new images/x y.jpg new labels/x y.png\n")
    items = read_list(write_list(tmp_path, text), tmp_path, "train")
    assert items[0] == items[1] == (str(image), str(label))
    assert items[2] == (str(tmp_path / "new images/x y.jpg"), str(tmp_path / "new labels/x y.png"))
    # a test image whose name contains a space, alone on its line
    assert read_list(write_list(tmp_path, "my images/my image 1.png\n", "t.txt"), tmp_path, "test") == \
        [(str(image), None)]
    dataset = SegDataset("train", tmp_path, write_list(tmp_path, text.splitlines()[1] + "\n", "s.txt"))
    assert dataset.name_of(0) == "my image 1"


def test_ambiguous_spaced_line_asks_for_tab(tmp_path):
    with pytest.raises(DataError, match="line 1: .*TAB"):
        read_list(write_list(tmp_path, "a b c d\n"), tmp_path, "train")


# ---------------------------------------------------------------- load_image / load_label

def test_load_image_color_is_rgb_float32(tmp_path):
    bgr = np.zeros((3, 4, 3), np.uint8)
    bgr[..., 0] = 10  # blue
    bgr[..., 2] = 200  # red
    image = load_image(write_png(tmp_path / "c.png", bgr))
    assert image.dtype == np.float32 and image.shape == (3, 4, 3)
    assert (image[..., 0] == 200).all() and (image[..., 2] == 10).all()


def test_load_image_grayscale_rgba_16bit(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    image = load_image(write_png(tmp_path / "g.png", gray))
    assert image.shape == (3, 4, 3) and np.array_equal(image[..., 1], gray.astype(np.float32))
    bgra = np.zeros((3, 4, 4), np.uint8)
    bgra[..., 2] = 100
    bgra[..., 3] = 7
    image = load_image(write_png(tmp_path / "a.png", bgra))
    assert image.shape == (3, 4, 3) and (image[..., 0] == 100).all()
    deep = np.full((3, 4), 65535, np.uint16)
    deep[0, 0] = 0
    image = load_image(write_png(tmp_path / "d.png", deep))
    assert image.shape == (3, 4, 3) and image.max() == pytest.approx(255.0) and image.min() == 0.0


def test_load_image_cmyk_jpeg(tmp_path):
    pil_image = pytest.importorskip("PIL.Image")
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 220
    path = tmp_path / "cmyk.jpg"
    pil_image.fromarray(rgb).convert("CMYK").save(path)
    image = load_image(path)
    assert image.shape == (6, 8, 3)
    assert image[..., 0].mean() > 150 and image[..., 2].mean() < 60


def test_load_image_broken_files_name_file_and_where(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    ok, encoded = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(encoded.tobytes()[: len(encoded) * 2 // 3])
    ok, encoded_png = cv2.imencode(".png", np.zeros((40, 50, 3), np.uint8))
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(encoded_png.tobytes()[:-20])
    for path, reason in [(empty, "zero-byte"), (garbage, "not a readable image"), (truncated, "truncated"),
                         (truncated_png, "truncated"), (tmp_path / "absent.png", "cannot read")]:
        with pytest.raises(DataError, match=reason) as info:
            load_image(path, where="list val.txt line 7")
        assert str(path) in str(info.value) and "list val.txt line 7" in str(info.value)


def test_load_label_checks_channels_and_depth(tmp_path):
    label = load_label(write_png(tmp_path / "l.png", np.full((3, 4), 9, np.uint8)))
    assert label.dtype == np.uint8 and label.shape == (3, 4) and (label == 9).all()
    assert (load_label(write_png(tmp_path / "l16.png", np.full((3, 4), 200, np.uint16))) == 200).all()
    with pytest.raises(DataError, match="values up to 300"):
        load_label(write_png(tmp_path / "big.png", np.full((3, 4), 300, np.uint16)))
    with pytest.raises(DataError, match="3 channels"):
        load_label(write_png(tmp_path / "rgb.png", np.zeros((3, 4, 3), np.uint8)), where="list x line 2")


# ---------------------------------------------------------------- SegDataset

def test_dataset_reports_first_missing_file_with_line(tmp_path):
    make_sample(tmp_path, "a")
    list_path = write_list(tmp_path, "images/a.png labels/a.png\n\nimages/a.png labels/missing.png\n")
    with pytest.raises(DataError, match=r"list .*list.txt line 3: label not found: .*missing.png"):
        SegDataset("train", tmp_path, list_path)


def test_dataset_size_mismatch_names_line(tmp_path):
    make_sample(tmp_path, "a", height=12, width=14)
    write_png(tmp_path / "labels" / "small.png", np.zeros((12, 13), np.uint8))
    dataset = SegDataset("train", tmp_path, write_list(tmp_path, "images/a.png labels/small.png\n"))
    with pytest.raises(DataError, match=r"line 1: image .*a.png is 12x14 but label .*small.png is 12x13"):
        dataset[0]


def test_dataset_label_values_out_of_range(tmp_path):
    make_sample(tmp_path, "a")
    label = np.zeros((12, 14), np.uint8)
    label[0, :3] = [5, 200, 255]
    write_png(tmp_path / "labels" / "a.png", label)
    list_path = write_list(tmp_path, "images/a.png labels/a.png\n")
    dataset = SegDataset("train", tmp_path, list_path, num_classes=5)
    with pytest.raises(DataError, match=r"line 1: label .*a.png has values 5, 200 outside 0..4"):
        dataset[0]
    assert SegDataset("train", tmp_path, list_path)[0][1].max() == 255  # no check without num_classes


def test_dataset_returns_raw_arrays_and_metadata(tmp_path):
    make_sample(tmp_path, "a")
    dataset = SegDataset("train", tmp_path, write_list(tmp_path, "images/a.png labels/a.png\n"))
    image, label = dataset[0]
    assert image.dtype == np.float32 and image.shape == (12, 14, 3)
    assert label.dtype == np.uint8 and label.shape == (12, 14)
    assert len(dataset) == 1
    assert dataset.name_of(0) == "a" and dataset.name_of(-1) == "a"
    with pytest.raises(IndexError):
        dataset[1]


def test_dataset_test_split_label_is_ignore(tmp_path):
    make_sample(tmp_path, "a")
    dataset = SegDataset("test", tmp_path, write_list(tmp_path, "images/a.png\n"), ignore_label=255)
    image, label = dataset[0]
    assert label.shape == image.shape[:2] and (label == 255).all()


def seeded_dataset(tmp_path, count=4, seed=7):
    text = ""
    for index in range(count):
        make_sample(tmp_path, f"s{index}", height=16, width=18, seed=index)
        text += f"images/s{index}.png labels/s{index}.png\n"
    return SegDataset("train", tmp_path, write_list(tmp_path, text), build_train_transform(small_cfg()), seed=seed)


def test_seeded_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    dataset = seeded_dataset(tmp_path)
    first = [dataset[i] for i in range(4)]
    random.seed(999)  # global state must not matter
    again = [dataset[i] for i in reversed(range(4))][::-1]
    for (a_image, a_label), (b_image, b_label) in zip(first, again):
        assert torch.equal(a_image, b_image) and torch.equal(a_label, b_label)
    dataset.set_epoch(1)
    next_epoch = [dataset[i] for i in range(4)]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, next_epoch))
    dataset.set_epoch(0)
    assert torch.equal(dataset[2][0], first[2][0])
    seeds = {dataset.sample_seed(i) for i in range(4)} | {seeded_dataset(tmp_path, seed=8).sample_seed(0)}
    assert len(seeds) == 5


def test_seeded_augmentation_independent_of_worker_layout(tmp_path):
    dataset = seeded_dataset(tmp_path)
    dataset.set_epoch(3)
    in_process = [dataset[i] for i in range(4)]
    # Workers fork after the parent used OpenCV above; they need no worker_init_fn (a cv2.setNumThreads()
    # there deadlocks in OpenCV's thread pool), since augmentation is seeded per sample.
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, timeout=60)
    for (image, label), (expected_image, expected_label) in zip(loader, in_process):
        assert torch.equal(image[0], expected_image) and torch.equal(label[0], expected_label)


def test_seed_must_be_non_negative_int(tmp_path):
    make_sample(tmp_path, "a")
    with pytest.raises(ValueError, match="seed"):
        SegDataset("train", tmp_path, write_list(tmp_path, "images/a.png labels/a.png\n"), seed=-1)


# ---------------------------------------------------------------- class names and colors

def test_shipped_class_files():
    ade_names = read_names(REPO_ROOT / "config/ade20k/ade20k_names.txt", num_classes=150)
    assert ade_names[:3] == ["wall", "building", "sky"] and ade_names[44] == "chest of drawers"
    assert ade_names[-1] == "flag"
    ade_colors = read_colors(REPO_ROOT / "config/ade20k/ade20k_colors.txt", num_classes=150)
    assert ade_colors.dtype == np.uint8 and ade_colors.shape == (150, 3)
    assert ade_colors[:4].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50]]
    assert ade_colors[-1].tolist() == [92, 0, 255]
    camvid_names = read_names(REPO_ROOT / "config/camvid/camvid_names.txt", num_classes=11)
    assert camvid_names[0] == "sky" and camvid_names[10] == "bicyclist"
    camvid_colors = read_colors(REPO_ROOT / "config/camvid/camvid_colors.txt", num_classes=11)
    assert camvid_colors[4].tolist() == [60, 40, 222]


def test_class_file_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_names(tmp_path / "none.txt")
    with pytest.raises(DataError, match="line 2 is empty"):
        read_names(write_list(tmp_path, "a\n\nb\n", "n.txt"))
    assert read_names(write_list(tmp_path, "a\nb\n\n", "n2.txt", newline="\r\n")) == ["a", "b"]
    with pytest.raises(DataError, match="has 2 names but 3"):
        read_names(tmp_path / "n2.txt", num_classes=3)
    with pytest.raises(DataError, match="line 2: expected 'R G B'"):
        read_colors(write_list(tmp_path, "1 2 3\n1 2 300\n", "c.txt"))
    with pytest.raises(DataError, match="line 1: expected 'R G B'"):
        read_colors(write_list(tmp_path, "1 2\n", "c2.txt"))


# ---------------------------------------------------------------- real data (CamVid)

@pytest.mark.parametrize("split", ["train", "val"])
def test_camvid_through_train_transform(camvid_root, split):
    cfg = small_cfg(train_h=65, train_w=65)
    dataset = SegDataset(split, camvid_root, camvid_root / f"{split}.txt", build_train_transform(cfg),
                         seed=0, num_classes=11)
    assert len(dataset) in (367, 101)
    raw_image, raw_label = dataset.load_pair(0)
    assert raw_image.shape == (360, 480, 3) and raw_label.shape == (360, 480)
    assert 0 <= raw_image.min() and raw_image.max() <= 255
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        image, label = dataset[index]
        assert image.shape == (3, 65, 65) and image.dtype == torch.float32
        assert label.shape == (65, 65) and label.dtype == torch.int64
        assert -3.0 < image.min() and image.max() < 3.0  # normalised
        assert set(torch.unique(label).tolist()) <= set(range(11)) | {255}


def test_camvid_val_transform_and_test_split(camvid_root):
    cfg = small_cfg(train_h=65, train_w=65)
    dataset = SegDataset("val", camvid_root, camvid_root / "val.txt", build_val_transform(cfg))
    image, label = dataset[0]
    assert image.shape == (3, 65, 65) and set(torch.unique(label).tolist()) <= set(range(11)) | {255}
    test_set = SegDataset("test", camvid_root, camvid_root / "test.txt")
    image, label = test_set[0]
    assert image.shape == (360, 480, 3) and (label == 255).all()
