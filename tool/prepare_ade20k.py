"""Prepare an unpacked ADEChallengeData2016 for training: 0-based labels and list files.

    python tool/prepare_ade20k.py ROOT [--workers N]

ROOT must contain images/{training,validation}/*.jpg and annotations/{training,validation}/*.png, where
annotation value 0 is "other" and 1..150 are the classes. This writes

* ROOT/annotations_0based/{training,validation}/NAME.png: uint8, value = raw - 1, raw 0 -> 255 (ignore);
* ROOT/list/training.txt and ROOT/list/validation.txt: sorted lines
  ``images/training/NAME.jpg annotations_0based/training/NAME.png`` (relative to ROOT, the data_root).

Re-runnable: an output that exists and is newer than its source is skipped. Outputs are written to a
temporary file and renamed into place, so a file under its final name is always complete; leftover
temporary files of an interrupted run are removed and their labels redone. List files are rewritten
only when their content changes.

Images without a label and labels without an image are reported (warnings) and left out of the lists.
Unreadable labels, labels that are not single-channel 8-bit, and values > 150 are errors: the file is left
out and the exit code is 1. A ROOT without the expected folders is exit code 2.
Progress lines with an ETA go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Optional

import cv2
import numpy as np

SPLITS = ("training", "validation")
NUM_CLASSES = 150
IGNORE_LABEL = 255
OUTPUT_DIR = "annotations_0based"
LIST_DIR = "list"
IMAGE_SUFFIXES = (".jpg", ".jpeg")
# Temporary outputs are named ".NAME.png.tmp-PID" in the output folder (same filesystem -> atomic rename).
TEMP_MARKER = ".tmp-"
# Seconds between progress lines.
PROGRESS_INTERVAL = 5.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def convert_raw_label(raw: np.ndarray) -> np.ndarray:
    """ADE20K raw label (0 = other, 1..150 classes) -> 0-based uint8 (0..149, 255 = ignore)."""
    converted = raw.astype(np.int16) - 1
    converted[raw == 0] = IGNORE_LABEL
    return converted.astype(np.uint8)


def write_atomically(path: Path, data: bytes) -> None:
    """Write bytes to a temp file next to ``path``, flush to disk, then rename over ``path``."""
    temp_path = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")
    try:
        with open(temp_path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    finally:
        if temp_path.exists():
            temp_path.unlink()


def convert_one(job: tuple[str, str]) -> tuple[str, Optional[str]]:
    """Convert one label file. Returns (output path, error message or None). Runs in worker processes."""
    source, destination = job
    try:
        data = np.fromfile(source, dtype=np.uint8)
        if data.size == 0:
            return destination, f"{source}: empty (zero-byte) file"
        raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if raw is None:
            return destination, f"{source}: not a readable image"
        if raw.ndim != 2:
            return destination, f"{source}: expected a single-channel label image, got shape {raw.shape}"
        if raw.dtype != np.uint8:
            if raw.dtype != np.uint16:
                return destination, f"{source}: unsupported pixel type {raw.dtype}"
            raw = raw.astype(np.int32)
        too_large = np.unique(raw[raw > NUM_CLASSES])
        if too_large.size:
            shown = ", ".join(str(int(v)) for v in too_large[:10])
            return destination, f"{source}: label values {shown} are > {NUM_CLASSES}"
        ok, encoded = cv2.imencode(".png", convert_raw_label(raw))
        if not ok:
            return destination, f"{source}: PNG encoding failed"
        write_atomically(Path(destination), encoded.tobytes())
        return destination, None
    except OSError as error:
        return destination, f"{source}: {error}"


def is_up_to_date(source: Path, destination: Path) -> bool:
    try:
        return destination.stat().st_mtime >= source.stat().st_mtime
    except FileNotFoundError:
        return False


def remove_leftover_temp_files(folder: Path) -> int:
    removed = 0
    for path in folder.iterdir():
        if path.name.startswith(".") and TEMP_MARKER in path.name:
            path.unlink()
            removed += 1
    return removed


def stems_by_suffix(folder: Path, suffixes: Iterable[str]) -> dict[str, str]:
    """{stem: file name} of the files in ``folder`` whose suffix (lower case) is in ``suffixes``."""
    suffixes = tuple(suffixes)
    return {p.stem: p.name for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes}


def run_jobs(jobs: list[tuple[str, str]], workers: int, split: str) -> list[tuple[str, str]]:
    """Convert labels with a process pool, logging progress; returns [(destination, error)] of failures."""
    failures = []
    if not jobs:
        return failures
    start = last_report = time.monotonic()

    def report(done: int) -> None:
        elapsed = time.monotonic() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (len(jobs) - done) / rate if rate > 0 else 0.0
        log(f"{split}: {done}/{len(jobs)} ({100.0 * done / len(jobs):.1f}%) {rate:.1f} files/s "
            f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}")

    def consume(results) -> None:
        nonlocal last_report
        for done, (destination, error) in enumerate(results, start=1):
            if error is not None:
                failures.append((destination, error))
                log(f"ERROR {error}")
            now = time.monotonic()
            if now - last_report >= PROGRESS_INTERVAL or done == len(jobs):
                last_report = now
                report(done)

    if workers <= 1 or len(jobs) < 2:
        consume(map(convert_one, jobs))
    else:
        with Pool(processes=min(workers, len(jobs))) as pool:
            consume(pool.imap_unordered(convert_one, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8)))))
    return failures


def write_list_if_changed(path: Path, lines: list[str]) -> bool:
    content = "".join(line + "\n" for line in lines).encode("utf-8")
    if path.is_file() and path.read_bytes() == content:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, content)
    return True


def prepare_split(root: Path, split: str, workers: int) -> tuple[int, int]:
    """Convert one split and write its list. Returns (number of errors, number of orphan files)."""
    image_dir = root / "images" / split
    label_dir = root / "annotations" / split
    output_dir = root / OUTPUT_DIR / split
    output_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_leftover_temp_files(output_dir)
    if removed:
        log(f"{split}: removed {removed} leftover temporary file(s) of an interrupted run")

    images = stems_by_suffix(image_dir, IMAGE_SUFFIXES)
    labels = stems_by_suffix(label_dir, (".png",))
    images_without_label = sorted(set(images) - set(labels))
    labels_without_image = sorted(set(labels) - set(images))
    for kind, names, folder in (("image without label", images_without_label, image_dir),
                                ("label without image", labels_without_image, label_dir)):
        for stem in names[:20]:
            source = images[stem] if kind.startswith("image") else labels[stem]
            log(f"WARNING {split}: {kind}: {folder / source}")
        if len(names) > 20:
            log(f"WARNING {split}: ... and {len(names) - 20} more of kind '{kind}'")

    stems = sorted(set(images) & set(labels))
    jobs, up_to_date = [], 0
    for stem in stems:
        source, destination = label_dir / labels[stem], output_dir / f"{stem}.png"
        if is_up_to_date(source, destination):
            up_to_date += 1
        else:
            jobs.append((str(source), str(destination)))
    log(f"{split}: {len(stems)} image/label pairs, {up_to_date} already converted, {len(jobs)} to convert")
    failures = run_jobs(jobs, workers, split)
    failed = {Path(destination).stem for destination, _ in failures}

    list_lines = [f"images/{split}/{images[stem]} {OUTPUT_DIR}/{split}/{stem}.png"
                  for stem in stems if stem not in failed]
    list_path = root / LIST_DIR / f"{split}.txt"
    changed = write_list_if_changed(list_path, list_lines)
    log(f"{split}: list {list_path} with {len(list_lines)} lines ({'written' if changed else 'unchanged'})")
    return len(failures), len(images_without_label) + len(labels_without_image)


def check_root(root: Path) -> list[str]:
    """Names of the expected folders missing under ROOT."""
    return [f"{kind}/{split}" for kind in ("images", "annotations") for split in SPLITS
            if not (root / kind / split).is_dir()]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="unpacked ADEChallengeData2016 folder")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: all cores)")
    args = parser.parse_args(argv)
    root = args.root
    if not root.is_dir():
        log(f"ERROR {root} is not a folder")
        return 2
    missing = check_root(root)
    if missing:
        log(f"ERROR {root} does not look like ADEChallengeData2016: missing folder(s) "
            f"{', '.join(missing)} (expected images/{{training,validation}} and annotations/{{training,validation}})")
        return 2
    total_errors = total_orphans = 0
    start = time.monotonic()
    try:
        for split in SPLITS:
            errors, orphans = prepare_split(root, split, max(1, args.workers))
            total_errors += errors
            total_orphans += orphans
    except OSError as error:
        log(f"ERROR {error}")
        return 1
    log(f"done in {format_duration(time.monotonic() - start)}: {total_errors} error(s), "
        f"{total_orphans} unpaired file(s) left out of the lists")
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
