"""Segmentation data: list files, image/label loading with clear errors, the dataset, class names/palettes.

List file format (one sample per line, paths relative to ``data_root``; absolute paths are used as given)::

    images/train/a.jpg annotations/train/a.png
    images/test/b.jpg                     <- split "test" only: the label column is optional (and ignored)

Rules:

* surrounding whitespace (including the CR of CRLF files) is stripped and blank lines are skipped;
* a line containing a TAB is split on tabs only: this is the unambiguous way to write paths with spaces;
* otherwise a line with one or two whitespace-separated fields is ``IMAGE [LABEL]``;
* a line with more fields has spaces inside its paths: it is split at the whitespace run where both halves
  name existing files, else at the only whitespace run whose left half ends with an image extension
  (``.jpg``, ``.png``, ...); for split "test" a line that as a whole names an existing file is the image.
  Anything still ambiguous is a ``DataError`` asking for a TAB separator.

Every problem raises ``DataError`` (a ``ValueError``) naming the list file and line, or the image file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence

import cv2
import numpy as np
import torch.utils.data

from util.errors import DataError, EmptyListError

__all__ = [
    "ListEntry", "read_list", "read_list_entries", "check_listed_files", "output_names", "load_image", "load_label",
    "SegDataset", "read_names", "read_colors", "evenly_spaced_subset", "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

# How many offending label values to quote in an error message.
_MAX_VALUES_SHOWN = 10


class ListEntry(NamedTuple):
    image_path: str
    label_path: Optional[str]
    line_number: int  # 1-based line in the list file


def _resolve(data_root, path: str) -> str:
    if data_root is None or str(data_root) == "" or os.path.isabs(path):
        return path
    return os.path.join(str(data_root), path)


def _whitespace_runs(line: str) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of whitespace inside an already stripped line."""
    runs, start = [], None
    for position, char in enumerate(line):
        if char.isspace():
            if start is None:
                start = position
        elif start is not None:
            runs.append((start, position))
            start = None
    return runs


def _split_spaced_line(line: str, data_root, split: str, where: str) -> list[str]:
    """Split a line whose paths contain spaces (see the module docstring for the rule)."""
    if split == "test" and os.path.isfile(_resolve(data_root, line)):
        return [line]
    candidates = [(line[:start], line[end:]) for start, end in _whitespace_runs(line)]
    both_exist = [c for c in candidates
                  if os.path.isfile(_resolve(data_root, c[0])) and os.path.isfile(_resolve(data_root, c[1]))]
    if len(both_exist) == 1:
        return list(both_exist[0])
    by_extension = [c for c in candidates if c[0].lower().endswith(IMAGE_EXTENSIONS)]
    if len(by_extension) == 1:
        return list(by_extension[0])
    raise DataError(f"{where}: cannot tell where the image path ends and the label path starts in "
                    f"{line!r}; separate the two paths with a TAB")


def read_list_entries(list_path, data_root, split: str) -> list[ListEntry]:
    """Parse a list file into ``ListEntry(image_path, label_path_or_None, line_number)`` (paths resolved).

    Raises DataError for a missing/unreadable list, a malformed line or a list without entries.
    Does not check that the listed files exist (``SegDataset`` does).
    """
    list_path = str(list_path)
    if not os.path.isfile(list_path):
        from util.data.preparation import missing_list_hint

        raise DataError(f"list file not found: {list_path}{missing_list_hint(list_path)}")
    try:
        with open(list_path, "r", encoding="utf-8-sig", newline=None) as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read list file {list_path}: {error}") from None
    entries: list[ListEntry] = []
    for line_number, raw_line in enumerate(lines, start=1):
        line = raw_line.strip()
        if not line:
            continue
        where = f"list {list_path} line {line_number}"
        if "\t" in line:
            fields = [field.strip() for field in line.split("\t") if field.strip()]
        else:
            fields = line.split()
            if len(fields) > 2:
                fields = _split_spaced_line(line, data_root, split, where)
            elif len(fields) == 2 and split == "test" and os.path.isfile(_resolve(data_root, line)):
                fields = [line]  # a single test image whose name contains a space
        if len(fields) > 2:
            raise DataError(f"{where}: expected 'IMAGE LABEL', got {len(fields)} fields: {line!r}")
        if split == "test":
            entries.append(ListEntry(_resolve(data_root, fields[0]), None, line_number))
        elif len(fields) == 2:
            entries.append(ListEntry(_resolve(data_root, fields[0]), _resolve(data_root, fields[1]),
                                     line_number))
        else:
            raise DataError(f"{where}: expected 'IMAGE LABEL' (only split 'test' may omit the label), "
                            f"got {line!r}")
    if not entries:
        raise EmptyListError(f"list file {list_path} has no entries")
    return entries


def read_list(list_path, data_root, split: str) -> list[tuple[str, Optional[str]]]:
    """Parse a list file into ``[(image_path, label_path_or_None), ...]``; see the module docstring."""
    return [(entry.image_path, entry.label_path) for entry in read_list_entries(list_path, data_root, split)]


def output_names(entries: Sequence[ListEntry]) -> list[str]:
    """The name of each entry's outputs (predictions, submission files): the image's file name without
    its extension. Two entries with the same name would overwrite each other: a DataError."""
    names = [Path(entry.image_path).stem for entry in entries]
    seen = {}
    for name, (image_path, _, _) in zip(names, entries):
        if name in seen:
            raise DataError(f"two images of the list would write the same output name '{name}': "
                            f"{seen[name]} and {image_path}")
        seen[name] = image_path
    return names


def _describe(path, where: str) -> str:
    return f"{path} ({where})" if where else str(path)


def _looks_truncated(data: bytes) -> bool:
    """True for JPEG/PNG byte strings cut short (older OpenCV decodes those partially without error)."""
    if data[:2] == b"\xff\xd8":  # JPEG: the last scan must be followed by the end-of-image marker
        last_scan = data.rfind(b"\xff\xda")
        return last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data.rfind(b"IEND") < 0
    return False


def _read_and_decode(path, flags: int, where: str, kind: str) -> np.ndarray:
    described = _describe(path, where)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {kind} {described}: {error.strerror or error}") from None
    if not data:
        raise DataError(f"{kind} {described} is an empty (zero-byte) file")
    if _looks_truncated(data):
        raise DataError(f"{kind} {described} is truncated (incomplete file)")
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if decoded is None:
        raise DataError(f"{kind} {described} is not a readable image (corrupt or unsupported format)")
    return decoded


def load_image(path, where: str = "") -> np.ndarray:
    """Read an image as float32 HxWx3 RGB with values 0..255.

    Grayscale becomes 3 equal channels, alpha is dropped, CMYK JPEGs are converted by OpenCV, 16-bit images
    are scaled to 0..255. EXIF orientation is ignored so images stay aligned with their label images.
    ``where`` (e.g. "list val.txt line 7") is added to error messages.
    """
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
    image = _read_and_decode(path, flags, where, "image")
    if image.ndim == 2:  # defensive: IMREAD_COLOR should already give 3 channels
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"image {_describe(path, where)} has unexpected shape {image.shape}")
    if image.dtype == np.uint8:
        scale = 1.0
    elif image.dtype == np.uint16:
        scale = 255.0 / 65535.0
    else:
        raise DataError(f"image {_describe(path, where)} has unsupported pixel type {image.dtype} "
                        f"(8- or 16-bit images are supported)")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32)
    if scale != 1.0:
        image *= scale
    return image


def load_label(path, where: str = "") -> np.ndarray:
    """Read a label image as uint8 HxW class ids. It must be single-channel (8-bit, or 16-bit with values <= 255)."""
    label = _read_and_decode(path, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION, where, "label")
    described = _describe(path, where)
    if label.ndim == 3 and label.shape[2] == 1:
        label = label[:, :, 0]
    if label.ndim != 2:
        raise DataError(f"label {described} has {label.shape[2]} channels; a label must be a single-channel "
                        f"image of class ids (color and palette PNGs are not supported: convert them to "
                        f"8-bit grayscale class ids)")
    if label.dtype == np.uint8:
        return label
    if label.dtype == np.uint16:
        if label.size and int(label.max()) > 255:
            raise DataError(f"label {described} is 16-bit with values up to {int(label.max())}; "
                            f"class ids must be <= 255")
        return label.astype(np.uint8)
    raise DataError(f"label {described} has unsupported pixel type {label.dtype}")


def check_listed_files(entries: Sequence[ListEntry], list_path, images: bool = True, labels: bool = True) -> None:
    """Raise DataError naming the list line of the first listed image (``images``) or label
    (``labels``) that does not exist, before any of them is read."""
    for entry in entries:
        for kind, path, needed in (("image", entry.image_path, images), ("label", entry.label_path, labels)):
            if needed and path is not None and not os.path.isfile(path):
                raise DataError(f"list {list_path} line {entry.line_number}: {kind} not found: {path}")


class SegDataset(torch.utils.data.Dataset):
    """Images and labels from a list file; transform applied per sample.

    Reads the list and checks that every listed file exists at construction (the first missing one is
    reported with its list line); images are loaded lazily in ``__getitem__``.

    When ``seed`` is not None, ``__getitem__`` seeds ``random`` and ``numpy.random`` from
    (seed, epoch, index) before the transform, so augmentation depends only on those three numbers and not on
    the DataLoader worker layout (exact resume). Call ``set_epoch(epoch)`` before iterating a DataLoader each
    epoch; workers copy the dataset when the iterator is created, so do not use ``persistent_workers=True``
    together with ``set_epoch``.

    For split "test" the label is an array of ``ignore_label`` with the image's size.
    If ``num_classes`` is given, label values >= num_classes other than ``ignore_label`` raise DataError.
    """

    def __init__(self, split: str, data_root, data_list, transform: Optional[Callable] = None,
                 seed: Optional[int] = None, num_classes: Optional[int] = None, ignore_label: int = 255):
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.split = split
        self.data_root = data_root
        self.data_list = str(data_list)
        self.transform = transform
        self.seed = None if seed is None else int(seed)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.ignore_label = int(ignore_label)
        self.epoch = 0
        self._entries = read_list_entries(data_list, data_root, split)
        check_listed_files(self._entries, self.data_list)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[ListEntry]:
        """The parsed list (resolved paths, list line numbers); every listed file exists."""
        return list(self._entries)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used in the per-sample augmentation seed."""
        self.epoch = int(epoch)

    def name_of(self, index: int) -> str:
        """File stem of the image at ``index`` (for naming prediction files)."""
        return Path(self._entries[index].image_path).stem

    def where(self, index: int) -> str:
        """'list FILE line N' for the sample at ``index`` (for error messages)."""
        return f"list {self.data_list} line {self._entries[index].line_number}"

    def sample_seed(self, index: int) -> int:
        """32-bit seed derived from (seed, epoch, index); mixing avoids collisions like (1, 0) vs (0, 1)."""
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1, dtype=np.uint32)
        return int(state[0])

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Untransformed (float32 HxWx3 RGB image, uint8 HxW label) with all data checks applied."""
        entry = self._entries[index]
        where = self.where(index)
        image = load_image(entry.image_path, where)
        if entry.label_path is None:
            label = np.full(image.shape[:2], self.ignore_label, dtype=np.uint8)
        else:
            label = load_label(entry.label_path, where)
            if image.shape[:2] != label.shape:
                raise DataError(f"{where}: image {entry.image_path} is {image.shape[0]}x{image.shape[1]} but "
                                f"label {entry.label_path} is {label.shape[0]}x{label.shape[1]}")
            if self.num_classes is not None:
                self._check_label_values(label, entry.label_path, where)
        return image, label

    def _check_label_values(self, label: np.ndarray, label_path: str, where: str) -> None:
        invalid = (label >= self.num_classes) & (label != self.ignore_label)
        if invalid.any():
            values = np.unique(label[invalid])
            shown = ", ".join(str(int(v)) for v in values[:_MAX_VALUES_SHOWN])
            more = f" and {len(values) - _MAX_VALUES_SHOWN} more" if len(values) > _MAX_VALUES_SHOWN else ""
            raise DataError(f"{where}: label {label_path} has values {shown}{more} outside 0..{self.num_classes - 1} "
                            f"(and not the ignore label {self.ignore_label})")

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        image, label = self.load_pair(index)
        if self.seed is not None:
            sample_seed = self.sample_seed(index)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label

    def __repr__(self) -> str:
        return (f"SegDataset(split={self.split!r}, list={self.data_list!r}, samples={len(self)}, "
                f"seed={self.seed}, epoch={self.epoch})")


def _read_text_lines(path, kind: str) -> list[str]:
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"{kind} file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8-sig") as handle:
            lines = [line.strip() for line in handle.read().splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {kind} file {path}: {error}") from None
    while lines and not lines[-1]:
        lines.pop()
    for line_number, line in enumerate(lines, start=1):
        if not line:
            raise DataError(f"{kind} file {path} line {line_number} is empty (one entry per line, class "
                            f"id = line number - 1)")
    if not lines:
        raise DataError(f"{kind} file {path} is empty")
    return lines


def read_names(path, num_classes: Optional[int] = None) -> list[str]:
    """Class names, one per line (class id = line index). Optionally check there are ``num_classes``."""
    names = _read_text_lines(path, "class names")
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f"class names file {path} has {len(names)} names but {num_classes} classes are expected")
    return names


def read_colors(path, num_classes: Optional[int] = None) -> np.ndarray:
    """Palette as uint8 array (K, 3): one ``R G B`` line per class (0..255, whitespace or comma separated)."""
    rows = []
    for line_number, line in enumerate(_read_text_lines(path, "colors"), start=1):
        fields = line.replace(",", " ").split()
        try:
            values = [int(field) for field in fields]
        except ValueError:
            values = []
        if len(values) != 3 or not all(0 <= v <= 255 for v in values):
            raise DataError(f"colors file {path} line {line_number}: expected 'R G B' with values 0..255, "
                            f"got {line!r}")
        rows.append(values)
    colors = np.array(rows, dtype=np.uint8)
    if num_classes is not None and len(colors) != num_classes:
        raise DataError(f"colors file {path} has {len(colors)} colors but {num_classes} classes are expected")
    return colors


def evenly_spaced_subset(length: int, max_items: int) -> List[int]:
    """``max_items`` indices spread evenly over ``range(length)`` (first and last included; all of
    them when ``max_items`` is 0 or >= ``length``): a fixed, reproducible subset that samples every
    part of a list, e.g. every sequence of a video dataset, not only its first frames."""
    if not max_items or max_items >= length:
        return list(range(length))
    if max_items == 1:
        return [0]
    return sorted({round(i * (length - 1) / (max_items - 1)) for i in range(max_items)})
