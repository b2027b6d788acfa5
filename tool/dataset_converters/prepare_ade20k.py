"""Prepare an unpacked ADEChallengeData2016 for training: 0-based labels and list files.

    python tool/dataset_converters/prepare_ade20k.py ROOT [--workers N]

ROOT must contain images/{training,validation}/*.jpg and annotations/{training,validation}/*.png, where
annotation value 0 is "other" and 1..150 are the classes. This writes

* ROOT/annotations_0based/{training,validation}/NAME.png: uint8, value = raw - 1, raw 0 -> 255 (ignore);
* ROOT/list/training.txt and ROOT/list/validation.txt: sorted lines
  ``images/training/NAME.jpg annotations_0based/training/NAME.png`` (relative to ROOT, the data_root);
* ROOT/list/trainval.txt: both (the training set of the release's test-set result);
* ROOT/list/testing.txt when the official test images are unpacked in ROOT (release_test.zip ->
  ROOT/release_test/testing/*.jpg): ``release_test/testing/NAME.jpg`` lines, images only.

Re-runnable and safe to interrupt (util/data/preparation.py): finished labels are skipped, outputs are
written atomically, lists are rewritten only when they change. Images without a label and labels
without an image are warnings and left out (exit status 1). A label that is unreadable, not single-channel or holds
values > 150 is an error naming the file: it is left out and the exit status is 1. A ROOT without
the expected folders is status 2. Progress lines with an ETA go to stderr.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from util.data.preparation import (  # noqa: E402
    IGNORE_LABEL,
    convert_labels,
    files_by_stem,
    missing_folders,
    pair_by_stem,
    read_label_png,
    remap,
    run_preparation,
    write_list,
)

SPLITS = ("training", "validation")
NUM_CLASSES = 150
OUTPUT_DIR = "annotations_0based"
TEST_DIR = "release_test/testing"
IMAGE_SUFFIXES = (".jpg", ".jpeg")
# Raw 0 ("other") -> ignore, raw k -> class k - 1.
RAW_TO_TRAIN_ID = {0: IGNORE_LABEL, **{raw: raw - 1 for raw in range(1, NUM_CLASSES + 1)}}


def ade20k_train_ids(raw: np.ndarray) -> np.ndarray:
    """ADE20K raw label (0 = other, 1..150 classes) -> 0-based uint8 (0..149, 255 = ignore)."""
    return remap(raw, RAW_TO_TRAIN_ID)


def convert_label(path: Path) -> np.ndarray:
    return ade20k_train_ids(read_label_png(path))


def prepare_split(root: Path, split: str, workers: int) -> tuple[list[str], int, int]:
    """Convert one split's labels and write its list. Returns (list lines, errors, files left out)."""
    images = files_by_stem(root / "images" / split, IMAGE_SUFFIXES)
    labels = files_by_stem(root / "annotations" / split, (".png",))
    names = pair_by_stem(images, labels, split)
    jobs = [(labels[name], root / OUTPUT_DIR / split / f"{name}.png") for name in names]
    failed = convert_labels(jobs, convert_label, workers, split)
    lines = [f"images/{split}/{images[name].name} {OUTPUT_DIR}/{split}/{name}.png"
             for name in names if labels[name] not in failed]
    write_list(root / "list" / f"{split}.txt", lines)
    unpaired = len(images) + len(labels) - 2 * len(names)
    return lines, len(failed), unpaired + len(failed)


def check_layout(args) -> Optional[str]:
    missing = missing_folders(args.root, ("images", "annotations"), SPLITS)
    if missing:
        return (f"{args.root} does not look like ADEChallengeData2016: missing folder(s) {', '.join(missing)} "
                f"(expected images/{{training,validation}} and annotations/{{training,validation}})")
    return None


def prepare(args) -> tuple[int, int]:
    root, all_lines, total_errors, total_left_out = args.root, [], 0, 0
    for split in SPLITS:
        lines, errors, left_out = prepare_split(root, split, args.workers)
        all_lines += lines
        total_errors += errors
        total_left_out += left_out
    write_list(root / "list" / "trainval.txt", all_lines)
    if (root / TEST_DIR).is_dir():
        test_images = files_by_stem(root / TEST_DIR, IMAGE_SUFFIXES)
        write_list(root / "list" / "testing.txt", [f"{TEST_DIR}/{test_images[name].name}"
                                                   for name in sorted(test_images)])
    return total_errors, total_left_out


def main(argv: Optional[list[str]] = None) -> int:
    return run_preparation(argv, __doc__, "unpacked ADEChallengeData2016 folder", check_layout, prepare)


if __name__ == "__main__":
    sys.exit(main())
