"""Segment an image, a folder of images or a video: class-id maps, colour maps and overlays.

    python tool/demo.py --config config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml \
        --image photo.jpg [--output DIR] [KEY VALUE ...]
    python tool/demo.py --config ... --image photos/          # every image in the folder and its sub-folders
    python tool/demo.py --config ... --image street.mp4       # an overlay video

Uses the weights of ``model_path`` (empty: the run's last checkpoint, as tool/test.py) and the
test-time settings of the config (``scales``, ``base_size``, ``test_h``/``test_w``,
``test_batch_size``, ``precision``; palette ``colors_path``, names ``names_path``). For each image it
writes DIR/NAME_gray.png (class ids), DIR/NAME_color.png and DIR/NAME_overlay.png (a folder's
sub-folders mirrored in DIR); for a video NAME.EXT DIR/NAME_EXT_overlay.mp4
(util/evaluation/segment_files.py), with progress lines for folders and videos.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from util.config import parse_cli  # noqa: E402
from util.engine.precision import check_device_support  # noqa: E402
from util.errors import ConfigError  # noqa: E402
from util.evaluation.inference import inference_kwargs, load_inference_model  # noqa: E402
from util.evaluation.segment_files import (  # noqa: E402
    folder_images,
    input_kind,
    model_predictor,
    segment_folder,
    segment_image,
    segment_video,
)
from util.evaluation.visualize import config_class_names, config_palette  # noqa: E402
from util.runtime.cli import exit_with  # noqa: E402
from util.runtime.distributed import select_device  # noqa: E402
from util.runtime.log import get_logger  # noqa: E402
from util.runtime.runs import check_checkpoint_paths, resolve_test_paths  # noqa: E402


def _add_arguments(parser) -> None:
    parser.add_argument("--image", "--input", dest="image", required=True,
                        help="an image file, a folder of images, or a video file to segment")
    parser.add_argument("--output", default="demo_output", help="folder for the results (default: demo_output)")
    parser.add_argument("--alpha", type=float, default=0.5, help="colour weight of the overlay (default 0.5)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, cfg = parse_cli(list(argv) if argv is not None else None, description=__doc__.splitlines()[0],
                          extra=_add_arguments)
    logger = get_logger()
    device = select_device(cfg.device)
    check_device_support(cfg, device.type)
    resolve_test_paths(cfg)
    if not cfg.model_path:
        raise ConfigError("model_path must be set to the weights to run (or save_path and epochs of a run)")
    check_checkpoint_paths(cfg, ("model_path",))
    kind = input_kind(args.image)
    images = folder_images(args.image, skip=Path(args.output)) if kind == "folder" else None
    model = load_inference_model(cfg, cfg.model_path, device)
    kwargs = inference_kwargs(cfg)
    logger.info(f"=> {cfg.model_path} on {device}: {kind} {args.image}, scales {kwargs['scales']}, "
                f"base_size {cfg.base_size}, windows {kwargs['crop_size'][0]}x{kwargs['crop_size'][1]}")
    predict = model_predictor(model, kwargs)
    palette = config_palette(cfg)
    output = Path(args.output)

    if kind == "video":
        path = segment_video(predict, args.image, output, palette, args.alpha, logger)
        logger.info(f"=> overlay video: {path}")
        return 0
    if kind == "folder":
        results = segment_folder(predict, images, output, palette, args.alpha, logger, root=Path(args.image))
        logger.info(f"=> {len(results)} images: NAME_gray.png, NAME_color.png, NAME_overlay.png in {output} "
                    f"(sub-folders mirrored)")
        return 0

    result = segment_image(predict, Path(args.image), output, palette, args.alpha)
    gray = result.pop("class_ids")
    names = config_class_names(cfg)
    ids, counts = np.unique(gray, return_counts=True)
    for class_id, count in sorted(zip(ids.tolist(), counts.tolist()), key=lambda item: -item[1])[:10]:
        logger.info(f"  {names[class_id]:<20s} {100.0 * count / gray.size:6.2f}% of pixels")
    for name, path in result.items():
        logger.info(f"=> {name}: {path}")
    return 0


if __name__ == "__main__":
    exit_with(main)
