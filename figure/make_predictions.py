"""Draw real predictions beside the ground truth: a PNG grid of image | ground truth | prediction.

    python figure/make_predictions.py --config config/demo/demo_pyconvresnet50_pyconvsegnet.yaml \
        [--model PATH] [--list LIST] [--num 4] [--start 0 | --spread] [--tile-height 128] \
        [--output figure/predictions_demo.png] [KEY VALUE ...]

Predictions use the config's test-time settings (``scales``, ``base_size``, ``test_h``/``test_w``,
flip), exactly as tool/test.py; the model defaults to ``model_path`` and the images to ``test_list``.
Ground-truth pixels with the ignore label are drawn black. Each tile is resized (nearest for the
label maps) to ``--tile-height`` pixels, keeping the aspect ratio, to keep the file small.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from util.config import parse_cli  # noqa: E402
from util.errors import ConfigError  # noqa: E402
from util.runtime.cli import run_cli  # noqa: E402

HEADER_HEIGHT = 22
GAP = 4  # white pixels between tiles


def _tile(array: np.ndarray, height: int, nearest: bool) -> np.ndarray:
    scale = height / array.shape[0]
    width = max(1, int(round(array.shape[1] * scale)))
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(array, (width, height), interpolation=interpolation)


def _header(width: int, titles: Sequence[str], tile_width: int) -> np.ndarray:
    header = np.full((HEADER_HEIGHT, width, 3), 255, dtype=np.uint8)
    for column, title in enumerate(titles):
        x = column * (tile_width + GAP) + 4
        cv2.putText(header, title, (x, HEADER_HEIGHT - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return header


def make_grid(rows: List[List[np.ndarray]], titles: Sequence[str]) -> np.ndarray:
    """Stack rows of equally sized RGB tiles with white gaps and a title row."""
    gap_v = np.full((rows[0][0].shape[0], GAP, 3), 255, dtype=np.uint8)
    lines = []
    for tiles in rows:
        parts = []
        for tile in tiles:
            parts.extend([tile, gap_v])
        lines.append(np.concatenate(parts[:-1], axis=1))
    width = max(line.shape[1] for line in lines)
    out = [_header(width, titles, rows[0][0].shape[1])]
    for line in lines:
        if line.shape[1] < width:
            line = np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=255)
        out.extend([line, np.full((GAP, width, 3), 255, dtype=np.uint8)])
    return np.concatenate(out[:-1], axis=0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    def add_flags(parser):
        parser.add_argument("--model", help="checkpoint (default: the config's model_path, else the run's "
                                                 "train_epoch_{epochs}.pth in save_path)")
        parser.add_argument("--list", help="list file of images and labels (default: the config's test_list)")
        parser.add_argument("--num", type=int, default=4, help="number of images (rows), default 4")
        parser.add_argument("--start", type=int, default=0, help="first list entry to draw, default 0")
        parser.add_argument("--spread", action="store_true",
                            help="--num entries evenly spaced over the whole list (first and last included) "
                                 "instead of consecutive ones from --start: frames from every part of a video set")
        parser.add_argument("--tile-height", type=int, default=128, help="height of each tile in pixels, default 128")
        parser.add_argument("--output", default="figure/predictions_demo.png", help="PNG to write")

    args, cfg = parse_cli(argv, __doc__.split("\n\n")[0], add_flags)

    from util.data.dataset import load_image, load_label, read_list
    from util.evaluation.inference import inference_kwargs, load_inference_model, predict_multiscale
    from util.evaluation.visualize import colorize, config_palette
    from util.runtime.distributed import select_device
    from util.runtime.runs import resolve_test_paths

    resolve_test_paths(cfg)  # an empty model_path: the run's last checkpoint, as tool/test.py
    model_path = args.model or cfg.model_path
    list_path = args.list or cfg.test_list
    if not model_path or not list_path:
        raise ConfigError("need --model (or model_path in the config) and --list (or test_list)")
    entries = read_list(list_path, cfg.data_root, "val")
    if args.spread:
        from util.data.dataset import evenly_spaced_subset

        entries = [entries[i] for i in evenly_spaced_subset(len(entries), args.num)]
    else:
        entries = entries[args.start:args.start + args.num]
    if not entries:
        raise ConfigError(f"no images in {list_path} from index {args.start}")
    device = select_device(cfg.device)
    model = load_inference_model(cfg, model_path, device)
    kwargs = inference_kwargs(cfg)
    palette = config_palette(cfg)

    rows = []
    for image_path, label_path in entries:
        image = load_image(image_path)
        prediction = predict_multiscale(model, image, **kwargs).to("cpu", torch.uint8).numpy()
        label = load_label(label_path)
        rows.append([_tile(np.clip(image, 0, 255).astype(np.uint8), args.tile_height, nearest=False),
                     _tile(colorize(label, palette), args.tile_height, nearest=True),
                     _tile(colorize(prediction, palette), args.tile_height, nearest=True)])
    grid = make_grid(rows, ["image", "ground truth", "prediction"])
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(output), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        print(f"could not write {output}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({grid.shape[1]}x{grid.shape[0]}, {len(rows)} images from {list_path}, "
          f"model {model_path})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
