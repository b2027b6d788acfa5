"""Turn tool/test.py's ADE20K test-set predictions into the scene-parsing benchmark's submission format.

    python tool/test.py --config config/ade20k/ade20k_pyconvresnet152_pyconvsegnet_trainval.yaml
    python tool/dataset_converters/make_submission.py \\
        --config config/ade20k/ade20k_pyconvresnet152_pyconvsegnet_trainval.yaml --output submission [KEY VALUE ...]

For every image of the config's ``test_list`` (split test: ``list/testing.txt`` of prepare_ade20k.py) it
reads the class-id map tool/test.py wrote to ``save_folder/gray/NAME.png`` (0-based, 0..classes-1) and
writes ``OUTPUT/NAME.png``: the benchmark's format, one 8-bit PNG per test image with the image's name and
size, holding 1-based class ids (1..150) and 0 for "other" (which a model trained with "other" ignored
never predicts).

Every prediction is checked before anything is written: a missing prediction, one whose size differs
from its image, or one with ids >= classes is an error naming the files (exit status 1, nothing
written). Outputs are written atomically (util/data/preparation.py), with progress and an ETA on stderr.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from util.config import parse_cli  # noqa: E402
from util.data.dataset import load_label, output_names, read_list_entries  # noqa: E402
from util.data.preparation import LabelError, default_workers, log, run_parallel, write_atomically  # noqa: E402
from util.errors import (
    ConfigError,  # noqa: E402
    DataError,  # noqa: E402
)
from util.runtime.cli import exit_with  # noqa: E402

# Errors quoted in full before the rest are summarised.
MAX_SHOWN = 20


def image_size(path) -> tuple[int, int]:
    """(height, width) from the image file's header (EXIF orientation ignored, as the loader does)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except OSError as error:
        raise LabelError(f"image {path} is not readable ({error})") from None
    return height, width


def submission_ids(prediction: np.ndarray) -> np.ndarray:
    """0-based class ids (0..149) -> the benchmark's 1-based ids (1..150) as uint8; 0 stays free for "other"."""
    return (np.asarray(prediction, dtype=np.uint8) + 1).astype(np.uint8)


def check_prediction(job: tuple) -> np.ndarray:
    """The checked prediction of one (image, prediction, classes) job; LabelError naming the files otherwise."""
    image_path, prediction_path, classes = job
    if not Path(prediction_path).is_file():
        raise LabelError(f"prediction {prediction_path} for image {image_path} does not exist")
    try:
        prediction = load_label(prediction_path)
    except DataError as error:
        raise LabelError(str(error)) from None
    height, width = image_size(image_path)
    if prediction.shape != (height, width):
        raise LabelError(f"prediction {prediction_path} is {prediction.shape[1]}x{prediction.shape[0]} (WxH) but "
                         f"its image {image_path} is {width}x{height}")
    too_large = np.unique(prediction[prediction >= classes])
    if too_large.size:
        raise LabelError(f"prediction {prediction_path} has class ids {', '.join(map(str, too_large[:10]))} "
                         f">= classes {classes}")
    return prediction


def check_only(job: tuple) -> None:
    check_prediction(job)


def write_submission_png(job: tuple) -> None:
    import cv2

    image_path, prediction_path, classes, destination = job
    ok, encoded = cv2.imencode(".png", submission_ids(check_prediction((image_path, prediction_path, classes))))
    if not ok:
        raise LabelError(f"PNG encoding failed for {destination}")
    write_atomically(Path(destination), encoded.tobytes())


def add_arguments(parser) -> None:
    parser.add_argument("--output", required=True, type=Path, help="folder for the submission PNGs")
    parser.add_argument("--workers", type=int, default=default_workers(), help="worker processes (default: all cores)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, cfg = parse_cli(list(argv) if argv is not None else None, __doc__.split("\n\n")[0], extra=add_arguments)
    if not cfg.test_list or not cfg.save_folder:
        raise ConfigError("test_list and save_folder must be set (the images and where tool/test.py wrote "
                          "their predictions)")
    if cfg.classes > 255:
        raise ConfigError(f"1-based ids of {cfg.classes} classes do not fit an 8-bit PNG")
    entries = read_list_entries(cfg.test_list, cfg.data_root, "test")
    names = output_names(entries)
    gray = Path(cfg.save_folder) / "gray"
    jobs = [(entry.image_path, str(gray / f"{name}.png"), cfg.classes) for entry, name in zip(entries, names)]
    workers = max(1, args.workers)
    errors = [error for _, error in run_parallel(check_only, jobs, workers, "checked") if error is not None]
    if errors:
        for error in errors[:MAX_SHOWN]:
            log(f"ERROR {error}")
        more = f" ({len(errors) - MAX_SHOWN} more not shown)" if len(errors) > MAX_SHOWN else ""
        raise DataError(f"{len(errors)} of {len(jobs)} predictions in {gray} cannot be submitted{more}; nothing "
                        f"written (run tool/test.py with this config and split test first)")
    args.output.mkdir(parents=True, exist_ok=True)
    results = run_parallel(write_submission_png, [(*job, str(args.output / f"{name}.png"))
                                                  for job, name in zip(jobs, names)], workers, "written")
    failed = [error for _, error in results if error is not None]
    if failed:
        raise DataError(f"writing the submission failed: {failed[0]}")
    log(f"{len(jobs)} submission PNGs (1-based class ids, 0 = other) in {args.output}")
    return 0


if __name__ == "__main__":
    exit_with(main)
