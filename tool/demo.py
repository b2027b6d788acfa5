"""Segment one image: class-id map, colour map and overlay PNGs.

    python tool/demo.py --config config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml \
        --image photo.jpg [--output DIR] [KEY VALUE ...]

Uses the weights of ``model_path`` and the test-time settings of the config (``scales``,
``base_size``, ``test_h``/``test_w``, ``test_batch_size``; palette ``colors_path``, names ``names_path``).
Writes DIR/NAME_gray.png (class ids), DIR/NAME_color.png and DIR/NAME_overlay.png.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from util.cli import exit_with  # noqa: E402
from util.config import ConfigError, parse_cli  # noqa: E402
from util.precision import check_device_support  # noqa: E402
from util.dataset import load_image  # noqa: E402
from util.inference import inference_kwargs, load_inference_model, predict_multiscale  # noqa: E402
from util.misc import get_logger, select_device  # noqa: E402
from util.visualize import colorize, config_class_names, config_palette, overlay, save_gray, save_rgb  # noqa: E402


def _add_arguments(parser) -> None:
    parser.add_argument("--image", required=True, help="image file to segment")
    parser.add_argument("--output", default="demo_output", help="folder for the PNGs (default: demo_output)")
    parser.add_argument("--alpha", type=float, default=0.5, help="colour weight of the overlay (default 0.5)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, cfg = parse_cli(list(argv) if argv is not None else None, description=__doc__.splitlines()[0],
                          extra=_add_arguments)
    logger = get_logger()
    device = select_device(cfg.device)
    check_device_support(cfg, device.type)
    if not cfg.model_path:
        raise ConfigError("model_path must be set to the weights to run")
    image = load_image(args.image)
    model = load_inference_model(cfg, cfg.model_path, device)
    kwargs = inference_kwargs(cfg)
    logger.info(f"=> {cfg.model_path} on {device}: {args.image} ({image.shape[1]}x{image.shape[0]}), "
                f"scales {kwargs['scales']}, base_size {cfg.base_size}")
    gray = predict_multiscale(model, image, **kwargs).to("cpu", torch.uint8).numpy()

    palette = config_palette(cfg)
    color = colorize(gray, palette)
    output = Path(args.output)
    stem = Path(args.image).stem
    paths = {kind: output / f"{stem}_{kind}.png" for kind in ("gray", "color", "overlay")}
    save_gray(paths["gray"], gray)
    save_rgb(paths["color"], color)
    save_rgb(paths["overlay"], overlay(image, color, args.alpha))

    names = config_class_names(cfg)
    ids, counts = np.unique(gray, return_counts=True)
    for class_id, count in sorted(zip(ids.tolist(), counts.tolist()), key=lambda item: -item[1])[:10]:
        logger.info(f"  {names[class_id]:<20s} {100.0 * count / gray.size:6.2f}% of pixels")
    for kind, path in paths.items():
        logger.info(f"=> {kind}: {path}")
    return 0


if __name__ == "__main__":
    exit_with(main)
