"""Does bf16 keep the accuracy of fp32? Two checks on real data, one JSON object.

    python tool/analysis_tools/check_bf16.py --config CFG [--images N] [--loss-curve STEPS] [KEY VALUE ...]

* ``agreement`` (``--images N``, default 4; 0 skips): fraction of pixels where the bf16 prediction
  equals the fp32 one on N real images spread over cfg.val_list (test settings of the config: the
  path of tool/test.py), with the weights of ``model_path`` (random weights and a ``warnings``
  entry when there is no checkpoint: a random network's agreement says little).
* ``loss_curve`` (``--loss-curve STEPS``, default 0: off): STEPS training steps of
  ``util.engine.training.train_iterations`` on real batches of cfg.train_list from the same initial weights,
  in fp32, in bf16, and in fp32 again with other dropout masks: the bf16 curve's distance to fp32
  is judged against that run-to-run noise.

Progress goes to stderr, the JSON to stdout (and ``--output``; ``--markdown`` writes a table). The
figures of docs/performance.md (trained CamVid weights):

    python tool/analysis_tools/check_bf16.py --config config/camvid/camvid_pyconvresnet50_pyconvsegnet.yaml \\
        --images 16 --loss-curve 20 --markdown bf16_camvid.md \\
        model_path exp/camvid/pyconvresnet50_pyconvsegnet/model/best_mIoU.pth
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tool.analysis_tools.benchmark_jobs import command  # noqa: E402
from tool.analysis_tools.benchmark_jobs.measure import peak_rss_gib  # noqa: E402
from tool.analysis_tools.benchmark_jobs.report import accuracy_table  # noqa: E402
from util.runtime.cli import run_cli  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    command.add_common_options(parser)
    parser.add_argument("--images", type=int, default=4,
                        help="real images for the bf16-vs-fp32 prediction agreement (default 4; 0 skips)")
    parser.add_argument("--loss-curve", type=int, default=0, metavar="STEPS",
                        help="train STEPS steps on real data in fp32 and in bf16 from the same start (default 0: off)")
    args, overrides = command.split_overrides(parser, argv)
    if args.images < 0 or args.loss_curve < 0:
        parser.error("--images and --loss-curve must be >= 0")
    return args, overrides


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    from tool.analysis_tools.benchmark_jobs.accuracy import run_agreement, run_loss_curve

    args, overrides = parse_args(argv)
    cfg, device, malloc_tuned = command.start(args, overrides)
    started = time.perf_counter()
    result = command.describe(cfg, args, overrides, device, malloc_tuned)
    model = command.benchmark_model(cfg, result)
    if args.images > 0:
        result["agreement"] = run_agreement(cfg, args.images, model, device)
    if args.loss_curve > 0:
        result["loss_curve"] = run_loss_curve(cfg, args.loss_curve, device)
    result["peak_memory"] = {"rss_gib": peak_rss_gib()}
    result["seconds_total"] = time.perf_counter() - started
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    result = run(argv)
    command.write_outputs(result, parse_args(argv)[0], accuracy_table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
