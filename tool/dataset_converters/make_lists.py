"""Make train/val list files for your own folder of images and label maps, checking every label map.

    python tool/dataset_converters/make_lists.py IMAGES LABELS OUT --classes N
        [--val-fraction 0.1] [--seed 0] [--ignore-label 255] [--data-root DIR] [--names FILE] [--workers N]

Pairs each image in IMAGES with the label map of the same name (any extension; subfolders are matched by
their relative path) in LABELS. A label map is a single-channel image of class ids 0..N-1, with
``--ignore-label`` (255) for pixels to ignore, the same size as its image (read by the same loader as
training, util/data/dataset.py). Every pair is checked; each bad file is named with what is wrong, left out,
and the exit status is 1. Images without a label and labels without an image are warnings.

Writes ``OUT/train.txt`` and ``OUT/val.txt``: a reproducible split (the same files and ``--seed`` give the
same split) with ``--val-fraction`` of the pairs (at least one) for validation. With ``--val-fraction 0``
(or a single pair) there is no validation split: only ``OUT/train.txt`` is written (an earlier
``OUT/val.txt`` is removed) and the printed command trains with ``evaluate False``. Paths are relative to
``--data-root`` (default: the folder holding IMAGES and LABELS). Lists are rewritten only when they change.
Prints the per-class pixel frequencies of each split and a shell-quoted command, with absolute paths, that
trains on the lists from any directory:

    /path/to/repository/tool/train.sh custom pyconvresnet50_pyconvsegnet data_root DIR \
        train_list OUT/train.txt ... classes N
"""
from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from util.data.dataset import IMAGE_EXTENSIONS, load_image, load_label, read_names  # noqa: E402
from util.data.preparation import (  # noqa: E402
    LabelError,
    default_workers,
    files_by_stem,
    log,
    pair_by_stem,
    run_parallel,
    write_list,
)
from util.errors import DataError  # noqa: E402


def check_pair(job: tuple) -> np.ndarray:
    """Pixels per label value (length 256) of one (image, label, classes, ignore_label) pair; LabelError
    naming the file when the label cannot be used."""
    image_path, label_path, classes, ignore_label = job
    try:
        image = load_image(image_path)
        label = load_label(label_path)
    except DataError as error:
        raise LabelError(str(error)) from None
    if label.shape != image.shape[:2]:
        raise LabelError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                         f"{image_path} is {image.shape[1]}x{image.shape[0]}")
    counts = np.bincount(label.ravel(), minlength=256)
    bad = [value for value in np.flatnonzero(counts) if value >= classes and value != ignore_label]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10])
        raise LabelError(f"label {label_path} has values {shown} outside the classes 0..{classes - 1} "
                         f"(and not the ignore label {ignore_label})")
    return counts


def split_names(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val), each sorted: a seeded shuffle of the sorted names, the first ``val_fraction`` (at
    least one when there are two or more names and the fraction is > 0) for validation."""
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    val_count = int(round(val_fraction * len(shuffled)))
    if val_fraction > 0 and len(shuffled) >= 2:
        val_count = min(max(val_count, 1), len(shuffled) - 1)
    return sorted(shuffled[val_count:]), sorted(shuffled[:val_count])


def frequency_table(counts: np.ndarray, classes: int, ignore_label: int, class_names: Sequence[str]) -> list[str]:
    """Lines of a per-class pixel table (pixels and share of the labelled pixels), ignored pixels last."""
    labelled = int(counts[:classes].sum())
    width = max([len(name) for name in class_names] + [5])
    lines = [f"  {'id':>3} {'class':<{width}} {'pixels':>12} {'share':>7}"]
    for class_id in range(classes):
        share = 100.0 * counts[class_id] / labelled if labelled else 0.0
        note = "   <- no pixel" if counts[class_id] == 0 else ""
        lines.append(f"  {class_id:>3} {class_names[class_id]:<{width}} {int(counts[class_id]):>12} "
                     f"{share:6.2f}%{note}")
    lines.append(f"  {ignore_label:>3} {'(ignored)':<{width}} {int(counts[ignore_label]):>12}")
    return lines


def list_line(data_root: Path, image: Path, label: Path) -> str:
    """``IMAGE LABEL`` relative to data_root; a TAB separates them when a path holds whitespace."""
    image_rel, label_rel = os.path.relpath(image, data_root), os.path.relpath(label, data_root)
    separator = "\t" if any(char.isspace() for char in image_rel + label_rel) else " "
    return f"{image_rel}{separator}{label_rel}"


def train_command(data_root: Path, out: Path, classes: int, ignore_label: int, has_val: bool = True) -> str:
    """The shell-quoted tool/train.sh command that trains the custom config on the lists in ``out``. Every
    path in it is absolute, so it runs from any directory (the wrapper finds the repository itself).
    Without a validation list (``has_val`` False) it trains with ``evaluate False``."""
    lists = ["train_list", str(out / "train.txt")]
    lists += ["val_list", str(out / "val.txt"), "test_list", str(out / "val.txt")] if has_val else ["evaluate", "False"]
    return shlex.join([str(REPO_ROOT / "tool" / "train.sh"), "custom", "pyconvresnet50_pyconvsegnet",
                       "data_root", str(data_root), *lists, "classes", str(classes), "ignore_label", str(ignore_label)])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, help="folder of images")
    parser.add_argument("labels", type=Path, help="folder of label maps (class ids), named as the images")
    parser.add_argument("out", type=Path, help="folder for train.txt and val.txt")
    parser.add_argument("--classes", type=int, required=True, help="number of classes (ids 0..classes-1)")
    parser.add_argument("--ignore-label", type=int, default=255, help="label value of ignored pixels (default 255)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of pairs for val.txt (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--data-root", type=Path, help="paths in the lists are relative to it (default: the "
                                                       "folder holding IMAGES and LABELS)")
    parser.add_argument("--names", type=Path, help="class names file (one per line) for the frequency table")
    parser.add_argument("--workers", type=int, default=default_workers(), help="worker processes (default: all cores)")
    args = parser.parse_args(argv)
    if not 2 <= args.classes <= 255 or not 0 <= args.ignore_label <= 255:
        parser.error("--classes must be in 2..255 and --ignore-label in 0..255")
    if args.ignore_label < args.classes:
        parser.error(f"--ignore-label {args.ignore_label} is one of the classes 0..{args.classes - 1}")
    if not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")
    for folder in (args.images, args.labels):
        if not folder.is_dir():
            log(f"ERROR {folder} is not a folder")
            return 2
    images_dir, labels_dir = args.images.resolve(), args.labels.resolve()
    data_root = (args.data_root or Path(os.path.commonpath([images_dir, labels_dir]))).resolve()
    try:
        class_names = read_names(args.names, args.classes) if args.names else [str(c) for c in range(args.classes)]
    except DataError as error:
        log(f"ERROR {error}")
        return 2

    try:
        images = files_by_stem(images_dir, IMAGE_EXTENSIONS, recursive=True)
        labels = files_by_stem(labels_dir, IMAGE_EXTENSIONS, recursive=True)
    except LabelError as error:
        log(f"ERROR {error}")
        return 2
    names = pair_by_stem(images, labels, "pairs")
    if not names:
        log(f"ERROR no image in {args.images} has a label of the same name in {args.labels}")
        return 1
    log(f"checking {len(names)} image/label pairs")
    results = run_parallel(check_pair, [(images[n], labels[n], args.classes, args.ignore_label) for n in names],
                           max(1, args.workers), "checked")
    counts, errors = {}, []
    for name, (result, error) in zip(names, results):
        if error is None:
            counts[name] = result
        else:
            errors.append(error)
            log(f"ERROR {error}")
    if not counts:
        log("ERROR no usable pair: no list written")
        return 1
    train, val = split_names(sorted(counts), args.val_fraction, args.seed)
    if not val:  # --val-fraction 0, or a single pair: no val.txt (an earlier split's would mix with this one)
        log(f"no validation split ({len(train)} pair(s), --val-fraction {args.val_fraction}): train.txt only, "
            f"training with evaluate False")
        if (args.out / "val.txt").is_file():
            (args.out / "val.txt").unlink()
            log(f"list {args.out / 'val.txt'}: removed (it held an earlier split)")
    for split, split_names_ in (("train", train), ("val", val)) if val else (("train", train),):
        write_list(args.out / f"{split}.txt", [list_line(data_root, images[n], labels[n]) for n in split_names_])
        print(f"{split}: {len(split_names_)} images, pixels per class:")
        print("\n".join(frequency_table(sum((counts[n] for n in split_names_), np.zeros(256, np.int64)),
                                        args.classes, args.ignore_label, class_names)))
    out = args.out.resolve()
    print(f"{len(errors)} bad file(s) left out" + (" (see the errors above)" if errors else ""))
    print(f"train (from any directory) with: "
          f"{train_command(data_root, out, args.classes, args.ignore_label, has_val=bool(val))}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
