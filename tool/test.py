"""Evaluate a trained model as the release's test script did, faster and on any device.

    python tool/test.py --config config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=N tool/test.py --config ...      # images split across processes

For every image of ``test_list`` (from ``index_start``, ``index_step`` images; 0 = to the end) it
predicts with multi-scale sliding windows (util/evaluation/inference.py; with their horizontal mirrors when
``flip``, the default) and writes ``save_folder/gray/NAME.png`` (class ids) and
``save_folder/color/NAME.png``. For split ``val`` or
``train`` it scores the predictions against the labels and writes ``save_folder/metrics.json``
(mIoU, mAcc, allAcc, per-class IoU/accuracy with names; NaN as null), and the log ``test-STAMP.log``.
Split ``test`` only predicts. ``save_folder/predictions.json`` records how the predictions were made
(checkpoint, scales, sizes); with ``has_prediction True`` the gray maps already in the save folder are
scored, no model is built, and metrics.json keeps that record. When ``best_mIoU_model_path`` is set, the
same is repeated for it into ``best_mIoU_save_folder``.

Left empty, ``model_path`` is the run's last checkpoint (``save_path/train_epoch_{epochs}.pth``, with
its ``best_mIoU.pth`` too when there is one) and the save folders are beside the run
(``RUN/result/epoch_N/val/ss``): util/runtime/runs.py, so the overrides given to tool/train.py find their run.

Under torchrun (WORLD_SIZE > 1) rank r takes images r, r + N, ...; confusion matrices are summed
over processes, so the scores equal a single-process run's; rank 0 prints and writes them.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from util.config import parse_cli  # noqa: E402
from util.data.dataset import check_listed_files, output_names, read_list_entries  # noqa: E402
from util.engine.precision import check_device_support  # noqa: E402
from util.errors import ConfigError  # noqa: E402
from util.evaluation.scoring import checkpoints_to_evaluate, evaluate_run, select_items  # noqa: E402
from util.runtime.cli import exit_with  # noqa: E402
from util.runtime.distributed import (  # noqa: E402
    cleanup,
    describe_launch,
    detect_launcher,
    init_distributed,
    launcher_world_size,
    select_device,
)
from util.runtime.environment import collect_environment, format_environment  # noqa: E402
from util.runtime.log import get_logger  # noqa: E402
from util.runtime.runs import evaluation_log_path, resolve_test_paths, timestamp  # noqa: E402


def _setup_distributed(cfg):
    """(rank, world_size, device, context or None). Several processes of torchrun or srun join a process group."""
    if launcher_world_size() > 1:
        context = init_distributed(cfg)
        return context.rank, context.world_size, context.device, context
    return 0, 1, select_device(cfg.device), None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, cfg = parse_cli(list(argv) if argv is not None else None, description=__doc__.splitlines()[0])
    derived = resolve_test_paths(cfg)
    rank, world_size, device, context = _setup_distributed(cfg)
    logger = get_logger(rank=rank)
    logger.info(describe_launch(context) if context is not None else
                f"launcher: {detect_launcher()}, one process, device {device}")
    try:
        check_device_support(cfg, device.type)
        if not cfg.test_list:
            raise ConfigError("test_list must be set")
        runs = checkpoints_to_evaluate(cfg)
        if rank == 0:  # the log goes beside the results, once the settings are known to be usable
            Path(cfg.save_folder).mkdir(parents=True, exist_ok=True)
        logger = get_logger(rank=rank, log_file=evaluation_log_path(cfg.save_folder, timestamp()))
        for line in derived:
            logger.info(f"=> {line}")
        environment = collect_environment() if rank == 0 else None  # once, for the log and every metrics.json
        for line in format_environment(environment) if environment else []:
            logger.info(line)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every window has the same shape
        entries = select_items(read_list_entries(cfg.test_list, cfg.data_root, cfg.split), cfg.index_start,
                               cfg.index_step)
        check_listed_files(entries, cfg.test_list, images=not cfg.has_prediction, labels=cfg.split != "test")
        names = output_names(entries)
        logger.info(f"=> {len(entries)} images of {cfg.test_list} (split {cfg.split}), {world_size} process(es)")
        for model_path, save_folder in runs:
            source = f"saved predictions in {save_folder}" if cfg.has_prediction else f"{model_path} -> {save_folder}"
            logger.info(f">>>>>>>>>>>>>>>> Start Evaluation: {source}")
            evaluate_run(cfg, model_path, save_folder, entries, names, device, rank, world_size, logger,
                         environment=environment)
    finally:
        if context is not None:
            cleanup()
    return 0


if __name__ == "__main__":
    exit_with(main)
