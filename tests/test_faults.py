"""Fault suite, part 2: untrusted checkpoints and bad data, through tool/train.py and tool/test.py alike.

Each fault goes through the tools' command-line entry point (``util.runtime.cli.run_cli(tool.main)``, what their
``__main__`` runs, in-process for speed, plus a few real subprocesses): the run either works, or stops with
status 1 and ONE line naming the file (and, for data, the list file and line) -- never a traceback.
The model is the test-only network of tests/tiny_model.py on 33x33 crops of 40x44 synthetic images (CPU, one
thread): the subject is the tools' handling of files, not the network.
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from util.runtime import cli as util_cli

from conftest import REPO_ROOT
from tiny_model import ARCH, BACKBONE, TINY_MODEL_KEYS, TINY_MODEL_OPTS

CLASSES = 3
HEIGHT, WIDTH = 40, 44
MODEL_BUILT = f"{ARCH} on {BACKBONE}"  # tool/train.py's log line right after build_model

# A 44x40 CMYK JPEG (left half red, right half blue) written by Pillow: OpenCV cannot write CMYK.
CMYK_JPEG = base64.b64decode("""
/9j/7gAOQWRvYmUAZAAAAAAA/9sAQwANCQoLCggNCwoLDg4NDxMgFRMSEhMnHB4XIC4pMTAuKS0sMzpKPjM2RjcsLUBXQUZMTlJT
UjI+WmFaUGBKUVJP/8AAFAgAKAAsBEMRAE0RAFkRAEsRAP/EAB8AAAEFAQEBAQEBAAAAAAAAAAABAgMEBQYHCAkKC//EALUQAAIB
AwMCBAMFBQQEAAABfQECAwAEEQUSITFBBhNRYQcicRQygZGhCCNCscEVUtHwJDNicoIJChYXGBkaJSYnKCkqNDU2Nzg5OkNERUZH
SElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6g4SFhoeIiYqSk5SVlpeYmZqio6Slpqeoqaqys7S1tre4ubrCw8TFxsfIycrS09TV
1tfY2drh4uPk5ebn6Onq8fLz9PX29/j5+v/aAA4EQwBNAFkASwAAPwDua4OuDr06iiiisHxt/wAine/9s/8A0YtFbvgn/kbLL/tp
/wCi2oryiivWKKKKKKKKKK91orwqiiiiisHxt/yKd7/2z/8ARi0Vu+Cf+Rssv+2n/otqK8oor1iiiiiiiiiivdaK8KooooorB8bf
8ine/wDbP/0YtFbvgn/kbLL/ALaf+i2oryiivWKKKKKKKKKK91orwqiiiiisHxt/yKd7/wBs/wD0YtFbvgn/AJGyy/7af+i2oryi
ivWKKKKKKKKKK91orwqiiiiisHxt/wAine/9s/8A0YtFbvgn/kbLL/tp/wCi2oryiivWKKKKKKKKKK//2Q==
""")


class RunsCode:
    """Unpickling this runs a shell command: what a checkpoint from a stranger could hide."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------
# Fixtures


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return str(path)


def _expanded_state(overrides) -> dict:
    """A state dict with the keys and shapes of the model ``overrides`` describe, in a few bytes on disk
    (every tensor is a broadcast view of one zero: torch.save stores the shared storage once)."""
    from model import build_model
    from util.config import load_cfg

    cfg = load_cfg(None, [*TINY_MODEL_OPTS, "classes", str(CLASSES), *overrides])
    with torch.device("meta"):
        shapes = {key: (value.shape, value.dtype) for key, value in build_model(cfg).state_dict().items()}
    return {f"module.{key}": torch.zeros((), dtype=dtype).expand(shape) for key, (shape, dtype) in shapes.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic data (a clean list and an "odd but valid" one), a config for both tools, a real model
    checkpoint and a set of bad checkpoints."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    rng = np.random.default_rng(0)

    def label():
        values = rng.integers(0, CLASSES, (HEIGHT, WIDTH), dtype=np.uint8)
        values[:3] = 255
        return values

    clean = []
    for i in range(2):
        _png(data / "images" / f"{i}.png", rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
        _png(data / "labels" / f"{i}.png", label())
        clean.append(f"images/{i}.png labels/{i}.png")
    (data / "clean.txt").write_text("\n".join(clean) + "\n")

    # Inputs that must work: grayscale, RGBA, 16-bit, CMYK JPEG, a path with spaces, a 16-bit label;
    # the list has CRLF endings, blank and whitespace-only lines.
    _png(data / "odd" / "gray.png", rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8))
    _png(data / "odd" / "rgba.png", rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8))
    _png(data / "odd" / "deep.png", rng.integers(0, 65536, (HEIGHT, WIDTH, 3), dtype=np.uint16))
    (data / "odd" / "cmyk.jpg").write_bytes(CMYK_JPEG)
    _png(data / "odd" / "with space" / "img 1.png", rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    for name in ("gray", "rgba", "deep", "cmyk", "img 1"):
        _png(data / "odd" / "labels" / f"{name}.png", label())
    _png(data / "odd" / "labels" / "deep16.png", label().astype(np.uint16))
    odd_lines = ["", "odd/gray.png odd/labels/gray.png", "   ", "odd/rgba.png odd/labels/rgba.png",
                 "odd/deep.png odd/labels/deep16.png", "", "odd/cmyk.jpg odd/labels/cmyk.png",
                 "odd/with space/img 1.png odd/labels/img 1.png", "", ""]
    (data / "odd.txt").write_bytes("\r\n".join(odd_lines).encode())

    # Broken inputs, each used as line 4 of a list (after a blank line, a good entry and a blank line)
    (data / "bad").mkdir()
    (data / "bad" / "empty.png").write_bytes(b"")
    (data / "bad" / "noise.png").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    ok, encoded = cv2.imencode(".jpg", rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    (data / "bad" / "cut.jpg").write_bytes(encoded.tobytes()[: len(encoded) // 2])
    _png(data / "bad" / "narrow_label.png", label()[:, :40])
    out_of_range = label()
    out_of_range[10, 10:13] = [7, 7, 9]
    _png(data / "bad" / "classes_label.png", out_of_range)

    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "DATA": {"data_root": str(data), "train_list": str(data / "clean.txt"), "classes": CLASSES},
        "TRAIN": {**TINY_MODEL_KEYS, "train_h": 33, "train_w": 33, "batch_size": 2, "workers": 0, "epochs": 1,
                  "manual_seed": 3, "print_freq": 1, "evaluate": False, "save_path": str(root / "model")},
        "TEST": {"test_list": str(data / "clean.txt"), "split": "val", "base_size": 48, "test_h": 33, "test_w": 33,
                 "scales": [1.0], "test_batch_size": 4, "device": "cpu", "model_path": str(root / "good.pth"),
                 "save_folder": str(root / "out"), "best_mIoU_model_path": None},
    }, sort_keys=False))

    from model import build_model
    from util.config import load_cfg
    from util.runtime.checkpoint_io import add_module_prefix

    torch.manual_seed(0)
    good = {"epoch": 1, "state_dict": add_module_prefix(build_model(load_cfg(str(config))).state_dict()),
            "optimizer": {"state": {}, "param_groups": []}}
    torch.save(good, root / "good.pth")

    bad = root / "checkpoints"
    bad.mkdir()
    marker = root / "code_ran"
    good_bytes = (root / "good.pth").read_bytes()
    (bad / "truncated.pth").write_bytes(good_bytes[: len(good_bytes) // 2])
    (bad / "random.pth").write_bytes(rng.integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    for name, overrides in (("classes.pth", ["classes", "5"]), ("arch.pth", ["arch", "psp"])):
        torch.save({"epoch": 1, "state_dict": _expanded_state(overrides),
                    "optimizer": {"state": {}, "param_groups": []}}, bad / name)
    torch.save({"epoch": 1, "state_dict": _expanded_state([]), "optimizer": {}, "extra": RunsCode(marker)},
               bad / "malicious.pth")
    (bad / "malicious_raw.pth").write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    torch.save(_expanded_state([]), bad / "bare_state_dict.pth")
    return root


def run_cli(tool, monkeypatch, capsys, argv):
    """Call the tool's command-line entry point in-process: (exit status, stdout, stderr)."""
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", ["tool.py", *map(str, argv)])
        status = util_cli.run_cli(tool.main)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(err: str, *fragments: str) -> str:
    """stderr holds exactly one non-empty line, ``error: ...``, with every fragment; no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Untrusted checkpoints


BAD_CHECKPOINTS = {
    "truncated.pth": ["is not a valid checkpoint (truncated or corrupted?)"],
    "random.pth": ["is not a valid checkpoint (truncated or corrupted?)"],
    "classes.pth": ["does not match the model", "wrongly shaped", "cls."],
    "arch.pth": ["does not match the model", "missing", "unexpected"],
    "malicious.pth": ["refused", "system"],
    "malicious_raw.pth": [],  # refused one way or another: it is not a torch checkpoint at all
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
@pytest.mark.parametrize("route", ["test.py model_path", "train.py weight", "train.py resume"])
def test_bad_checkpoint_refused_in_one_line(world, train_tool, test_tool, monkeypatch, capsys, route, name):
    path = world / "checkpoints" / name
    save = world / "runs" / f"{route.replace(' ', '_')}_{name}"
    if route == "test.py model_path":
        argv = ["--config", world / "config.yaml", "model_path", path, "save_folder", save]
        tool = test_tool
    else:
        key = route.split()[-1]
        argv = ["--config", world / "config.yaml", key, path, "save_path", save]
        tool = train_tool
    status, out, err = run_cli(tool, monkeypatch, capsys, argv)
    if route == "train.py weight" and name == "classes.pth":
        # Fine-tuning on another class count (docs/training.md) loads every other tensor, re-initialises
        # only the final classifiers and trains.
        assert status == 0, out[-2000:] + err[-2000:]
        assert "cls.1, aux.4 re-initialised" in out + err, out[-2000:] + err[-2000:]
        assert list(save.glob("train_epoch_*.pth"))
        return
    assert status == 1, out[-2000:] + err[-2000:]
    assert_one_line_error(err, str(path), *BAD_CHECKPOINTS[name])
    assert not (world / "code_ran").exists(), "the pickle's code was executed"
    assert not list(save.glob("*.pth")) and not (save / "gray").exists()  # nothing trained or predicted


def test_resume_from_weights_only_file_or_corrupted_newest(world, train_tool, monkeypatch, capsys):
    """``resume`` needs a training checkpoint (a bare state dict says to use ``weight``); ``resume auto``
    on a damaged newest checkpoint names it (a crash cannot produce one: saves are atomic, but disks can)."""
    bare = world / "checkpoints" / "bare_state_dict.pth"
    status, out, err = run_cli(train_tool, monkeypatch, capsys, ["--config", world / "config.yaml", "resume", bare,
                                                                 "save_path", world / "runs" / "bare"])
    assert status == 1
    assert_one_line_error(err, str(bare), "is not a training checkpoint", f"use 'weight {bare}'")

    save_path = world / "runs" / "damaged_newest"
    save_path.mkdir(parents=True)
    damaged = save_path / "train_epoch_3.pth"
    damaged.write_bytes((world / "checkpoints" / "truncated.pth").read_bytes())
    status, out, err = run_cli(train_tool, monkeypatch, capsys,
                               ["--config", world / "config.yaml", "resume", "auto", "save_path", save_path,
                                "epochs", "5"])
    assert status == 1
    assert_one_line_error(err, str(damaged), "is not a valid checkpoint")
    assert MODEL_BUILT not in out


@pytest.mark.slow
def test_bad_checkpoints_through_real_processes(world):
    """The same refusals from the real command lines (concurrently): status 1, one line, code never run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    bad = world / "checkpoints"
    commands = {
        "test-malicious": [REPO_ROOT / "tool" / "test.py", "--config", world / "config.yaml",
                           "model_path", bad / "malicious.pth", "save_folder", world / "runs" / "p1"],
        "train-resume-truncated": [REPO_ROOT / "tool" / "train.py", "--config", world / "config.yaml",
                                   "resume", bad / "truncated.pth", "save_path", world / "runs" / "p2"],
        "train-weight-malicious": [REPO_ROOT / "tool" / "train.py", "--config", world / "config.yaml",
                                   "weight", bad / "malicious_raw.pth", "save_path", world / "runs" / "p3"],
    }
    running = {name: subprocess.Popen([sys.executable, *map(str, command)], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, command in commands.items()}
    for name, process in running.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 1, (name, out[-2000:], err[-2000:])
        assert_one_line_error(err, str(commands[name][4]))
    assert not (world / "code_ran").exists()


# ---------------------------------------------------------------------------------------------
# Odd but valid data: both tools work


def test_odd_but_valid_inputs_train_and_test(world, train_tool, test_tool, monkeypatch, capsys):
    """Grayscale, RGBA, 16-bit, CMYK JPEG images, a path with spaces, a 16-bit label, CRLF line endings and
    blank lines: training runs and testing scores every image."""
    odd_list = world / "data" / "odd.txt"
    save_path = world / "runs" / "odd_train"
    status, out, err = run_cli(train_tool, monkeypatch, capsys,
                               ["--config", world / "config.yaml", "train_list", odd_list, "save_path", save_path])
    assert status == 0, out[-3000:] + err[-3000:]
    assert "5 training images" in out and (save_path / "train_epoch_1.pth").is_file()

    save_folder = world / "runs" / "odd_test"
    status, out, err = run_cli(test_tool, monkeypatch, capsys,
                               ["--config", world / "config.yaml", "test_list", odd_list, "save_folder", save_folder])
    assert status == 0, out[-3000:] + err[-3000:]
    metrics = json.loads((save_folder / "metrics.json").read_text())
    assert metrics["num_images"] == 5
    assert sorted(p.name for p in (save_folder / "gray").iterdir()) == \
        ["cmyk.png", "deep.png", "gray.png", "img 1.png", "rgba.png"]


# ---------------------------------------------------------------------------------------------
# Broken data: both tools stop with the list file and line


# name -> (line 4 of the list, fragments expected from train.py, fragments expected from test.py)
BAD_LINES = {
    "missing-image": ("images/nope.png labels/0.png", ["image not found", "nope.png"], None),
    "missing-label": ("images/0.png labels/nope.png", ["label not found", "nope.png"], None),
    "size-mismatch": ("images/0.png bad/narrow_label.png", ["narrow_label.png", "40x44", "40x40"],
                      ["narrow_label.png", "40x40"]),
    "one-field": ("images/0.png", ["expected 'IMAGE LABEL'"], None),
    "ambiguous-spaces": ("images/0.png labels/0.png extra.png", ["TAB"], None),
    "zero-byte-image": ("bad/empty.png labels/0.png", ["empty.png", "zero-byte"], None),
    "random-bytes-image": ("bad/noise.png labels/0.png", ["noise.png", "not a readable image"], None),
    "truncated-image": ("bad/cut.jpg labels/0.png", ["cut.jpg", "truncated"], None),
    "label-out-of-range": ("images/0.png bad/classes_label.png", ["classes_label.png", "7, 9", "outside 0..2"],
                           ["classes_label.png", "[0, 3)"]),
}


def _bad_list(world: Path, case: str) -> Path:
    path = world / "data" / f"bad_{case}.txt"
    path.write_text(f"\nimages/1.png labels/1.png\n\n{BAD_LINES[case][0]}\n")
    return path


@pytest.mark.parametrize("case", list(BAD_LINES))
@pytest.mark.parametrize("tool_name", ["train.py", "test.py"])
def test_bad_data_names_list_file_and_line(world, train_tool, test_tool, monkeypatch, capsys, tool_name, case):
    list_path = _bad_list(world, case)
    _, train_fragments, test_fragments = BAD_LINES[case]
    if tool_name == "train.py":
        argv = ["--config", world / "config.yaml", "train_list", list_path,
                "save_path", world / "runs" / f"bad_train_{case}"]
        tool, fragments = train_tool, train_fragments
    else:
        argv = ["--config", world / "config.yaml", "test_list", list_path,
                "save_folder", world / "runs" / f"bad_test_{case}"]
        tool, fragments = test_tool, test_fragments or train_fragments
    status, out, err = run_cli(tool, monkeypatch, capsys, argv)
    assert status == 1, out[-3000:] + err[-3000:]
    assert_one_line_error(err, f"list {list_path} line 4", *fragments)
    if case in ("missing-image", "missing-label", "one-field", "ambiguous-spaces"):
        # found by reading the list, before the model is built (train.py) or any image is predicted (test.py)
        assert MODEL_BUILT not in out and "=> loaded weights" not in out


@pytest.mark.slow
def test_bad_image_in_a_dataloader_worker_is_one_line(world):
    """With ``workers`` > 0 the error is raised in a worker process and re-raised with the worker's
    traceback appended: the command line still prints only the reason, with list file and line."""
    list_path = _bad_list(world, "zero-byte-image")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tool" / "train.py"), "--config", str(world / "config.yaml"),
                           "train_list", str(list_path), "workers", "2", "save_path", str(world / "runs" / "workers")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert_one_line_error(proc.stderr, f"list {list_path} line 4", "empty.png", "zero-byte")
