"""util/data/preparation.py: the machinery every tool/dataset_converters/ script shares."""
import glob

import cv2
import numpy as np
import pytest

from util.config import load_cfg
from util.data.dataset import read_list_entries
from util.data.preparation import (
    DATASET_SOURCES,
    TEMP_MARKER,
    LabelError,
    convert_labels,
    files_by_stem,
    missing_list_hint,
    read_label_png,
    remap,
    run_parallel,
    write_list,
)
from util.errors import DataError


def test_remap_maps_and_names_unknown_values():
    raw = np.array([[0, 1], [2, 1]], np.uint16)
    assert remap(raw, {0: 255, 1: 0, 2: 1}).tolist() == [[255, 0], [1, 0]]
    assert remap(raw, {0: 255, 1: 0, 2: 1}).dtype == np.uint8
    with pytest.raises(LabelError, match=r"label values 2 are not valid here \(valid: 0\.\.1, 255\)"):
        remap(raw, {0: 0, 1: 1, 255: 255})


def test_read_label_png_gives_palette_indices(tmp_path):
    from PIL import Image
    indices = np.array([[0, 1, 2], [255, 1, 0]], np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200] + [7, 7, 7] * 253)
    image.save(tmp_path / "palette.png")
    assert read_label_png(tmp_path / "palette.png").tolist() == indices.tolist()
    cv2.imwrite(str(tmp_path / "gray.png"), indices)
    assert read_label_png(tmp_path / "gray.png").tolist() == indices.tolist()
    cv2.imwrite(str(tmp_path / "colour.png"), np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(LabelError, match="single-channel"):
        read_label_png(tmp_path / "colour.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(LabelError, match="empty"):
        read_label_png(tmp_path / "empty.png")


def test_write_list_only_when_changed(tmp_path, capsys):
    path = tmp_path / "list" / "a.txt"
    write_list(path, ["x y"])
    mtime = path.stat().st_mtime_ns
    write_list(path, ["x y"])
    assert path.stat().st_mtime_ns == mtime and path.read_text() == "x y\n"
    assert "(written)" in capsys.readouterr().err.splitlines()[0]
    write_list(path, ["x y", "z w"])
    assert path.read_text() == "x y\nz w\n" and not [p for p in path.parent.iterdir() if TEMP_MARKER in p.name]


def test_files_by_stem_strip_recursive_and_duplicates(tmp_path):
    (tmp_path / "city").mkdir()
    for name in ("city/a_leftImg8bit.png", "city/a_other.png", ".hidden_leftImg8bit.png", "b.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert files_by_stem(tmp_path, (".png",), strip="_leftImg8bit", recursive=True) == {
        "city/a": tmp_path / "city/a_leftImg8bit.png"}
    (tmp_path / "city/a_other.jpg").write_bytes(b"x")
    with pytest.raises(LabelError, match="a_other.* have the same name"):
        files_by_stem(tmp_path / "city", (".png", ".jpg"))


def invert_label(path):  # a module-level mapping, as convert_labels requires
    return 255 - read_label_png(path)


def test_convert_labels_skips_fresh_outputs_and_removes_refused_ones(tmp_path, capsys):
    sources = [tmp_path / f"{i}.png" for i in range(3)]
    for source in sources:
        cv2.imwrite(str(source), np.full((2, 2), 10, np.uint8))
    jobs = [(source, tmp_path / "out" / source.name) for source in sources]
    assert convert_labels(jobs, invert_label, 1, "x") == {}
    assert cv2.imread(str(tmp_path / "out" / "1.png"), cv2.IMREAD_UNCHANGED).tolist() == [[245, 245], [245, 245]]
    (tmp_path / "out" / f".1.png{TEMP_MARKER}999").write_bytes(b"partial")
    sources[2].write_bytes(b"not a png")  # newer than its output: converted again, refused, output removed
    failed = convert_labels(jobs, invert_label, 1, "x")
    assert list(failed) == [sources[2]] and f"{sources[2]}: not a readable image" in failed[sources[2]]
    assert not (tmp_path / "out" / "2.png").exists() and not (tmp_path / "out" / f".1.png{TEMP_MARKER}999").exists()
    log = capsys.readouterr().err
    assert "removed 1 leftover temporary file" in log and "2 already converted, 1 to convert" in log


def test_run_parallel_keeps_order_and_reports_errors(capsys):
    results = run_parallel(abs, list(range(-5, 5)), 2, "numbers")
    assert [value for value, _ in results] == [abs(v) for v in range(-5, 5)]
    assert "numbers: 10/10 (100.0%)" in capsys.readouterr().err
    assert run_parallel(open, ["/nonexistent/file"], 1, "files")[0][1].startswith("[Errno 2]")


@pytest.mark.parametrize("path", sorted(glob.glob("config/*/*.yaml")))
def test_every_shipped_list_names_its_dataset_when_missing(path):
    cfg = load_cfg(path)
    hint = missing_list_hint(cfg.train_list)
    dataset = path.split("/")[1]
    assert DATASET_SOURCES[dataset]["prepare"] in hint and "download" in hint


def test_missing_list_error_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"list file not found: .*cityscapes.*prepare_cityscapes.py"):
        read_list_entries(tmp_path / "data/cityscapes/list/val.txt", tmp_path, "val")
    with pytest.raises(DataError, match="make_lists.py"):
        read_list_entries(tmp_path / "elsewhere.txt", tmp_path, "val")
