"""Draw a training run's validation curve from its TensorBoard events (needs requirements-viz.txt).

    python figure/make_validation_curve.py --events exp/camvid/pyconvresnet50_pyconvsegnet/model \
        [--output figure/camvid_validation_curve.png] [--title TEXT]

``--events`` is the run's ``save_path`` (tool/train.py writes its ``events.out.tfevents.*`` files
there; a resumed run adds a file, and for a step logged twice the later file wins). Left: the
per-epoch validation mIoU/mAcc/allAcc (``*_val``, whatever ``val_mode`` measured: whole images with
tool/test.py's sliding window by default) and the training mIoU (``mIoU_train``, of the augmented
crops); right: the training loss per epoch and the learning rate of each parameter group.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Dict, List, Optional

TAGS_LEFT = (("mIoU_val", "val mIoU"), ("mAcc_val", "val mAcc"), ("allAcc_val", "val allAcc"),
             ("mIoU_train", "train mIoU (crops)"))


def read_scalars(events_dir: str) -> Dict[str, Dict[int, float]]:
    """``{tag: {step: value}}`` over every events file in ``events_dir``, oldest file first."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        sys.exit("this script reads TensorBoard events with the tensorboard package: "
                 "pip install -r requirements-viz.txt")
    files = sorted(glob.glob(os.path.join(events_dir, "events.out.tfevents.*")), key=os.path.getmtime)
    if not files:
        sys.exit(f"no TensorBoard events (events.out.tfevents.*) in {events_dir}: give the run's save_path")
    scalars: Dict[str, Dict[int, float]] = {}
    for path in files:
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series = scalars.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                series[event.step] = event.value
    return scalars


def draw(scalars: Dict[str, Dict[int, float]], output: str, title: Optional[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "mIoU_val" not in scalars:
        sys.exit("the events hold no mIoU_val: the run did not validate (evaluate False?)")
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for tag, label in TAGS_LEFT:
        if tag in scalars:
            steps = sorted(scalars[tag])
            style = "o-" if tag.endswith("_val") else "s--"
            left.plot(steps, [scalars[tag][s] for s in steps], style, label=label, markersize=4)
    left.set_xlabel("epoch")
    left.set_ylabel("score")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_title("validation (per epoch)", fontsize=10)

    steps = sorted(scalars.get("loss_train", {}))
    right.plot(steps, [scalars["loss_train"][s] for s in steps], "o-", color="tab:red", markersize=4,
               label="train loss (main + 0.4 aux)")
    right.set_xlabel("epoch")
    right.set_ylabel("loss")
    right.grid(alpha=0.3)
    lr_tags: List[str] = sorted(tag for tag in scalars if tag == "lr" or tag.startswith("lr/"))
    if lr_tags:
        iterations_per_epoch = _iterations_per_epoch(scalars)
        twin = right.twinx()
        for tag in lr_tags:
            lr_steps = sorted(scalars[tag])
            twin.plot([s / iterations_per_epoch for s in lr_steps], [scalars[tag][s] for s in lr_steps],
                      linewidth=1, label=tag)
        twin.set_ylabel("learning rate")
        twin.legend(loc="upper right", fontsize=8)
    right.legend(loc="upper center", fontsize=8)
    right.set_title("training", fontsize=10)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    print(f"wrote {output}")


def _iterations_per_epoch(scalars: Dict[str, Dict[int, float]]) -> float:
    """Global iterations per epoch, from the per-batch loss steps and the number of epochs logged."""
    batch_steps = scalars.get("loss_train_batch", {})
    epochs = scalars.get("loss_train", {})
    if not batch_steps or not epochs:
        return 1.0
    return max(batch_steps) / max(epochs)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", required=True, help="the run's save_path (holds events.out.tfevents.*)")
    parser.add_argument("--output", default="figure/camvid_validation_curve.png")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    draw(read_scalars(args.events), args.output, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
