"""Prepare Cityscapes (fine annotations) for training: trainId labels and list files.

    python tool/dataset_converters/prepare_cityscapes.py ROOT [--workers N]

ROOT is the folder where leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip were unpacked:
``leftImg8bit/{train,val,test}/CITY/NAME_leftImg8bit.png`` and ``gtFine/{train,val}/CITY/NAME_gtFine_labelIds.png``
(the test split is optional). This writes

* ``gtFine/{train,val}/CITY/NAME_gtFine_labelTrainIds.png`` beside each labelIds file: uint8 trainIds
  0..18 for the 19 evaluated classes, 255 (ignore) for every other id (the official table below);
* ``ROOT/list/train.txt`` and ``ROOT/list/val.txt``: ``leftImg8bit/... gtFine/..._labelTrainIds.png`` lines
  (relative to ROOT, the data_root), and ``ROOT/list/test.txt`` (images only) when leftImg8bit/test exists.

Re-runnable and safe to interrupt (util/data/preparation.py: finished labels are skipped, outputs are written
atomically, lists rewritten only when they change). A labelIds file that is unreadable, not single-channel
or holds ids above 33 is an error naming the file (left out, exit status 1); an image without its labelIds
file (or one without its image, e.g. a city folder missing on one side) is a warning, left out, and the
exit status is 1 too; a ROOT without the expected folders is status 2. Progress lines with an ETA go to stderr.
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

LABELLED_SPLITS = ("train", "val")
TEST_SPLIT = "test"
IMAGE_SUFFIX = "_leftImg8bit"
LABEL_IDS_SUFFIX = "_gtFine_labelIds"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds"

# The official id -> trainId table: cityscapesScripts, cityscapesscripts/helpers/labels.py (``labels``:
# name, id, trainId). Ids 0..33 appear in labelIds images; every id whose trainId is 255 is ignored.
# tests/test_prepare_cityscapes.py checks this table against that file when cityscapesscripts is installed.
LABEL_ID_TO_TRAIN_ID = {
    0: IGNORE_LABEL,   # unlabeled
    1: IGNORE_LABEL,   # ego vehicle
    2: IGNORE_LABEL,   # rectification border
    3: IGNORE_LABEL,   # out of roi
    4: IGNORE_LABEL,   # static
    5: IGNORE_LABEL,   # dynamic
    6: IGNORE_LABEL,   # ground
    7: 0,              # road
    8: 1,              # sidewalk
    9: IGNORE_LABEL,   # parking
    10: IGNORE_LABEL,  # rail track
    11: 2,             # building
    12: 3,             # wall
    13: 4,             # fence
    14: IGNORE_LABEL,  # guard rail
    15: IGNORE_LABEL,  # bridge
    16: IGNORE_LABEL,  # tunnel
    17: 5,             # pole
    18: IGNORE_LABEL,  # polegroup
    19: 6,             # traffic light
    20: 7,             # traffic sign
    21: 8,             # vegetation
    22: 9,             # terrain
    23: 10,            # sky
    24: 11,            # person
    25: 12,            # rider
    26: 13,            # car
    27: 14,            # truck
    28: 15,            # bus
    29: IGNORE_LABEL,  # caravan
    30: IGNORE_LABEL,  # trailer
    31: 16,            # train
    32: 17,            # motorcycle
    33: 18,            # bicycle
}


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds (0..33) -> uint8 trainIds (0..18, 255 = ignore)."""
    return remap(label_ids, LABEL_ID_TO_TRAIN_ID)


def convert_label(path: Path) -> np.ndarray:
    return cityscapes_train_ids(read_label_png(path))


def prepare_split(root: Path, split: str, workers: int) -> tuple[int, int]:
    """Convert one labelled split and write its list. Returns (errors, files left out)."""
    images = files_by_stem(root / "leftImg8bit" / split, (".png",), strip=IMAGE_SUFFIX, recursive=True)
    labels = files_by_stem(root / "gtFine" / split, (".png",), strip=LABEL_IDS_SUFFIX, recursive=True)
    keys = pair_by_stem(images, labels, split)
    jobs = [(labels[key], root / "gtFine" / split / f"{key}{TRAIN_IDS_SUFFIX}.png") for key in keys]
    failed = convert_labels(jobs, convert_label, workers, split)
    write_list(root / "list" / f"{split}.txt",
               [f"leftImg8bit/{split}/{key}{IMAGE_SUFFIX}.png gtFine/{split}/{key}{TRAIN_IDS_SUFFIX}.png"
                for key in keys if labels[key] not in failed])
    return len(failed), len(images) + len(labels) - 2 * len(keys) + len(failed)


def check_layout(args) -> Optional[str]:
    missing = missing_folders(args.root, ("leftImg8bit", "gtFine"), LABELLED_SPLITS)
    if missing:
        return (f"{args.root} does not look like Cityscapes: missing folder(s) {', '.join(missing)} (unpack "
                f"leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into it)")
    return None


def prepare(args) -> tuple[int, int]:
    root, total_errors, total_left_out = args.root, 0, 0
    for split in LABELLED_SPLITS:
        errors, left_out = prepare_split(root, split, args.workers)
        total_errors += errors
        total_left_out += left_out
    if (root / "leftImg8bit" / TEST_SPLIT).is_dir():
        images = files_by_stem(root / "leftImg8bit" / TEST_SPLIT, (".png",), strip=IMAGE_SUFFIX, recursive=True)
        write_list(root / "list" / f"{TEST_SPLIT}.txt",
                   [f"leftImg8bit/{TEST_SPLIT}/{key}{IMAGE_SUFFIX}.png" for key in sorted(images)])
    return total_errors, total_left_out


def main(argv: Optional[list[str]] = None) -> int:
    return run_preparation(argv, __doc__, "folder holding leftImg8bit/ and gtFine/", check_layout, prepare)


if __name__ == "__main__":
    sys.exit(main())
