"""tool/dataset_converters/make_lists.py on a generated folder of images and masks, then training on its lists."""
import shlex
import subprocess

import cv2
import numpy as np

from util.data.dataset import read_list

from tiny_model import TINY_MODEL_OPTS
from tiny_runs import REPO_ROOT, load_script

make_lists = load_script("tool/dataset_converters/make_lists.py", "make_lists")


def make_folder(root, count=6, size=(24, 32), classes=3):
    """images/NAME.jpg and masks/NAME.png (label ids, one 255 row); masks in a subfolder too."""
    rng = np.random.default_rng(4)
    masks = {}
    for index in range(count):
        sub = "street/" if index % 2 else ""
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "masks" / sub).mkdir(parents=True, exist_ok=True)
        mask = rng.integers(0, classes, size, dtype=np.uint8)
        mask[0] = 255
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        assert cv2.imwrite(str(root / "images" / f"{sub}img {index}.jpg"), image)
        assert cv2.imwrite(str(root / "masks" / f"{sub}img {index}.png"), mask)
        masks[f"{sub}img {index}"] = mask
    return masks


def run(root, capsys, *extra):
    code = make_lists.main([str(root / "images"), str(root / "masks"), str(root / "lists"), "--classes", "3",
                            "--workers", "1", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pairs_split_and_frequencies(tmp_path, capsys):
    masks = make_folder(tmp_path)
    code, out, err = run(tmp_path, capsys, "--val-fraction", "0.34")
    assert code == 0, err
    train = read_list(tmp_path / "lists" / "train.txt", tmp_path, "train")
    val = read_list(tmp_path / "lists" / "val.txt", tmp_path, "val")
    assert (len(train), len(val)) == (4, 2)
    listed = {str(label)[len(str(tmp_path / "masks")) + 1:-4]: (image, label) for image, label in train + val}
    assert sorted(listed) == sorted(masks)  # every pair once, names with spaces and subfolders included
    for name, (image, label) in listed.items():
        assert image == str(tmp_path / "images" / f"{name}.jpg")
    # Per-class pixel counts of the train split, as printed.
    counts = np.bincount(np.concatenate([cv2.imread(label, cv2.IMREAD_UNCHANGED).ravel() for _, label in train]),
                         minlength=256)
    train_table = out.split("val:")[0]
    for class_id in range(3):
        assert f"  {class_id:>3} {str(class_id):<5} {counts[class_id]:>12}" in train_table
    assert f"  255 (ignored) {counts[255]:>12}" in train_table
    assert f"data_root {tmp_path} train_list {tmp_path / 'lists' / 'train.txt'}" in out
    # Reproducible: the same files and seed give the same lists (unchanged), another seed another split.
    assert run(tmp_path, capsys, "--val-fraction", "0.34")[2].count("(unchanged)") == 2
    assert run(tmp_path, capsys, "--val-fraction", "0.34", "--seed", "1")[0] == 0
    assert read_list(tmp_path / "lists" / "val.txt", tmp_path, "val") != val


def test_bad_files_are_named_and_left_out(tmp_path, capsys):
    make_folder(tmp_path)
    cv2.imwrite(str(tmp_path / "masks" / "img 0.png"), np.full((24, 31), 1, np.uint8))  # wrong size
    cv2.imwrite(str(tmp_path / "masks" / "img 2.png"), np.full((24, 32), 7, np.uint8))  # class 7 of 3
    cv2.imwrite(str(tmp_path / "masks" / "img 4.png"), np.zeros((24, 32, 3), np.uint8))  # colour mask
    cv2.imwrite(str(tmp_path / "images" / "lonely.jpg"), np.zeros((24, 32, 3), np.uint8))
    code, out, err = run(tmp_path, capsys)
    assert code == 1
    assert f"label {tmp_path / 'masks' / 'img 0.png'} is 31x24 (WxH) but its image" in err
    assert f"label {tmp_path / 'masks' / 'img 2.png'} has values 7 outside the classes 0..2" in err
    assert f"label {tmp_path / 'masks' / 'img 4.png'} has 3 channels" in err
    assert "image without label" in err and "lonely.jpg" in err
    listed = (tmp_path / "lists" / "train.txt").read_text() + (tmp_path / "lists" / "val.txt").read_text()
    assert listed.count("\n") == 3 and "img 0" not in listed and "img 2" not in listed
    assert "3 bad file(s) left out" in out


def test_split_names():
    names = [f"n{i}" for i in range(20)]
    train, val = make_lists.split_names(names, 0.1, seed=0)
    assert len(val) == 2 and sorted(train + val) == sorted(names)
    assert make_lists.split_names(list(reversed(names)), 0.1, seed=0) == (train, val)  # order does not matter
    assert make_lists.split_names(["a", "b"], 0.01, seed=0)[1] != []  # at least one validation image


def printed_line(out):
    """The training command make_lists printed, as text."""
    line = next(line for line in out.splitlines() if line.startswith("train (from any directory) with: "))
    return line.split(" with: ", 1)[1]


def printed_command(out):
    """The words of the training command make_lists printed, as the shell splits them."""
    return shlex.split(printed_line(out))


def test_printed_command_is_quoted_and_runs_from_anywhere(tmp_path, capsys):
    """A data folder with a space: the printed command reaches train.py with the folder as one value, from a
    directory that is not the repository root (a typo appended to it is the only config error)."""
    root = tmp_path / "my data"
    make_folder(root, count=4)
    code, out, _ = run(root, capsys, "--val-fraction", "0.5")
    assert code == 0
    command = printed_command(out)
    assert command[:3] == [str(REPO_ROOT / "tool" / "train.sh"), "custom", "pyconvresnet50_pyconvsegnet"]
    assert command[command.index("data_root") + 1] == str(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(["sh", "-c", printed_line(out) + " epoch 1"], cwd=elsewhere, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("config error: unknown config key 'epoch' "
                                                      "(did you mean 'epochs'?)")
    assert list(elsewhere.iterdir()) == []


def train_on(train_tool, tmp_path, overrides):
    """tool/train.py's summary of one tiny epoch on the custom config with ``overrides``, run from tmp_path."""
    return train_tool.main(["--config", str(REPO_ROOT / "config/custom/custom_pyconvresnet50_pyconvsegnet.yaml"),
                       *overrides, "save_path", str(tmp_path / "model"), *TINY_MODEL_OPTS, "train_h", "17",
                            "train_w", "17", "batch_size", "2", "batch_size_val", "2", "epochs", "1", "workers", "0"])


def test_train_on_the_lists(tmp_path, capsys, one_thread, monkeypatch, train_tool):
    """The path of docs/datasets.md, "Your own data": make_lists, then the custom config with the printed
    overrides, from another folder."""
    make_folder(tmp_path, count=4)
    code, out, _ = run(tmp_path, capsys, "--val-fraction", "0.5")
    assert code == 0
    monkeypatch.chdir(tmp_path)
    summary = train_on(train_tool, tmp_path, printed_command(out)[3:])
    assert (tmp_path / "model" / "train_epoch_1.pth").is_file()
    assert summary["epochs"] == 1 and np.isfinite(summary["train"]["loss"])
    assert summary["val"] is not None  # the config validates each epoch, on val.txt


def test_no_validation_split_trains_without_validation(tmp_path, capsys, one_thread, monkeypatch, train_tool):
    """--val-fraction 0 (after a split that had one): train.txt only, an earlier val.txt removed, and the
    printed command trains with evaluate False."""
    make_folder(tmp_path, count=4)
    assert run(tmp_path, capsys, "--val-fraction", "0.5")[0] == 0
    assert (tmp_path / "lists" / "val.txt").is_file()
    code, out, err = run(tmp_path, capsys, "--val-fraction", "0")
    assert code == 0 and "no validation split" in err
    assert not (tmp_path / "lists" / "val.txt").exists()
    assert len(read_list(tmp_path / "lists" / "train.txt", tmp_path, "train")) == 4
    command = printed_command(out)
    assert "val_list" not in command and "test_list" not in command
    assert command[command.index("evaluate") + 1] == "False"
    monkeypatch.chdir(tmp_path)
    summary = train_on(train_tool, tmp_path, command[3:])
    assert summary["epochs"] == 1 and summary["val"] is None
