"""Prepare PASCAL VOC 2012 (optionally with the SBD augmentation) for training: index labels and lists.

    python tool/dataset_converters/prepare_voc.py ROOT [--sbd SBD_ROOT] [--workers N]

ROOT is VOCdevkit/VOC2012 of VOCtrainval_11-May-2012.tar: ``JPEGImages/NAME.jpg``, ``SegmentationClass/NAME.png``
and ``ImageSets/Segmentation/{train,val}.txt``. SBD_ROOT is the ``dataset`` folder of SBD's benchmark.tgz
(``benchmark_RELEASE/dataset``: ``cls/NAME.mat``, ``train.txt``, ``val.txt``; ``benchmark_RELEASE`` itself is
accepted too). This writes

* ``ROOT/SegmentationClassAug/NAME.png``: uint8 class ids 0..20, 255 = ignore. VOC's labels are palette
  PNGs whose pixel values are the class ids (read as indices, not colours; VOC's object boundaries, 255,
  stay ignored); SBD's ``GTcls.Segmentation`` arrays (values 0..20) are written as they are. An image that
  has a VOC label uses it (VOC's are the finer annotation, with boundaries); the others use SBD's;
* ``ROOT/list/train.txt`` (VOC train, 1,464 images) and ``ROOT/list/val.txt`` (VOC val, 1,449 images);
* with ``--sbd``: ``ROOT/list/train_aug.txt``, the usual 10,582 images: SBD train + SBD val + VOC train,
  minus every VOC val image. Lines are ``JPEGImages/NAME.jpg SegmentationClassAug/NAME.png`` (relative to
  ROOT, the data_root).

Reading SBD's .mat files needs scipy (``pip install -r requirements-datasets.txt``). Re-runnable and safe to
interrupt (util/data/preparation.py). A listed image without a picture or a label is a warning and left out
(exit status 1); a
label that is unreadable or holds values outside 0..20 (and 255 for VOC) is an error naming the file (left
out, exit status 1); a ROOT or SBD_ROOT without the expected files is status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from util.data.preparation import (  # noqa: E402
    IGNORE_LABEL,
    LabelError,
    convert_labels,
    log,
    read_label_png,
    remap,
    run_preparation,
    write_list,
)

NUM_CLASSES = 21  # background + 20 object classes
OUTPUT_DIR = "SegmentationClassAug"
VOC_SETS = "ImageSets/Segmentation"
# VOC: class ids and the boundary/"difficult" value 255. SBD: class ids only.
VOC_TABLE = {**{c: c for c in range(NUM_CLASSES)}, IGNORE_LABEL: IGNORE_LABEL}
SBD_TABLE = {c: c for c in range(NUM_CLASSES)}


def voc_train_ids(indices: np.ndarray) -> np.ndarray:
    """The palette indices of a VOC SegmentationClass PNG -> uint8 class ids (0..20, 255 = ignore)."""
    return remap(indices, VOC_TABLE)


def sbd_train_ids(segmentation: np.ndarray) -> np.ndarray:
    """SBD's ``GTcls.Segmentation`` (0..20) -> uint8 class ids."""
    return remap(segmentation, SBD_TABLE)


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class map of an SBD ``cls/NAME.mat`` (MATLAB struct ``GTcls`` with field ``Segmentation``)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(str(path))
    except (MatReadError, ValueError, TypeError) as error:
        raise LabelError(f"not a readable .mat file ({error})") from None
    try:
        segmentation = mat["GTcls"]["Segmentation"][0, 0]
    except (KeyError, ValueError, IndexError):
        raise LabelError("no GTcls.Segmentation in it (not an SBD cls/ file?)") from None
    if segmentation.ndim != 2:
        raise LabelError(f"GTcls.Segmentation has shape {segmentation.shape}, expected a 2-D map")
    return segmentation


def convert_label(path: Path) -> np.ndarray:
    if path.suffix == ".mat":
        return sbd_train_ids(read_sbd_mat(path))
    return voc_train_ids(read_label_png(path))


def train_aug_names(voc_train: Sequence[str], voc_val: Sequence[str], sbd_train: Sequence[str],
                    sbd_val: Sequence[str]) -> list[str]:
    """SBD train + SBD val + VOC train, minus VOC val (10,582 names on the full datasets), sorted."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def read_names(path: Path) -> list[str]:
    """The image names of an ImageSets-style file (one name per line)."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def find_sbd_dataset(sbd_root: Path) -> Optional[Path]:
    """SBD's ``dataset`` folder given it or the ``benchmark_RELEASE`` folder above it."""
    for candidate in (sbd_root, sbd_root / "dataset"):
        if (candidate / "cls").is_dir() and (candidate / "train.txt").is_file() and (candidate / "val.txt").is_file():
            return candidate
    return None


def check_layout(args) -> Optional[str]:
    """What is missing in ROOT or SBD_ROOT (None when both are usable); sets ``args.sbd_dataset``."""
    missing = [name for name in ("JPEGImages", "SegmentationClass", f"{VOC_SETS}/train.txt", f"{VOC_SETS}/val.txt")
               if not (args.root / name).exists()]
    if missing:
        return f"{args.root} does not look like VOCdevkit/VOC2012: missing {', '.join(missing)}"
    args.sbd_dataset = None
    if args.sbd is not None:
        args.sbd_dataset = find_sbd_dataset(args.sbd)
        if args.sbd_dataset is None:
            return (f"{args.sbd} does not look like SBD's benchmark_RELEASE/dataset: expected cls/, train.txt "
                    f"and val.txt")
        try:
            import scipy.io  # noqa: F401
        except ImportError:
            return "reading SBD's .mat files needs scipy: pip install -r requirements-datasets.txt"
    return None


def prepare(args) -> tuple[int, int]:
    root, sbd = args.root, args.sbd_dataset
    sets = {"train": read_names(root / VOC_SETS / "train.txt"), "val": read_names(root / VOC_SETS / "val.txt")}
    if sbd is not None:
        sets["train_aug"] = train_aug_names(sets["train"], sets["val"], read_names(sbd / "train.txt"),
                                            read_names(sbd / "val.txt"))
    # One label source per name: VOC's own label when there is one, else SBD's.
    sources, left_out = {}, set()
    for split, names in sets.items():
        for name in names:
            voc_label = root / "SegmentationClass" / f"{name}.png"
            source = voc_label if voc_label.is_file() else (sbd / "cls" / f"{name}.mat" if sbd else None)
            if not (root / "JPEGImages" / f"{name}.jpg").is_file():
                log(f"WARNING {split}: image not found: {root / 'JPEGImages' / f'{name}.jpg'}")
            elif source is None or not source.is_file():
                log(f"WARNING {split}: no label for {name} (neither {voc_label} nor an SBD cls/{name}.mat)")
            else:
                sources[name] = source
                continue
            left_out.add(name)
    jobs = [(source, root / OUTPUT_DIR / f"{name}.png") for name, source in sorted(sources.items())]
    failed = convert_labels(jobs, convert_label, args.workers, "labels")
    for split, names in sets.items():
        write_list(root / "list" / f"{split}.txt", [f"JPEGImages/{name}.jpg {OUTPUT_DIR}/{name}.png" for name in names
                                                    if name in sources and sources[name] not in failed])
    return len(failed), len(left_out) + len(failed)


def add_arguments(parser) -> None:
    parser.add_argument("--sbd", type=Path, help="SBD's benchmark_RELEASE/dataset folder (adds list/train_aug.txt)")


def main(argv: Optional[list[str]] = None) -> int:
    return run_preparation(argv, __doc__, "VOCdevkit/VOC2012", check_layout, prepare, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
