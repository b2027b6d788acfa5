"""tool/test.py's work on one checkpoint (or on predictions saved before): predict every listed image,
save the class maps (``gray/NAME.png``, ``color/NAME.png``), score them against the labels and write
``metrics.json`` and ``predictions.json`` (how the predictions were made) into the save folder."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from util.data.dataset import ListEntry, load_label
from util.errors import CheckpointError, ConfigError, DataError
from util.evaluation.deploy import is_exported_model
from util.evaluation.inference import inference_kwargs, load_inference_model
from util.evaluation.metrics import nan_to_none
from util.evaluation.visualize import colorize, config_class_names, config_palette, save_gray, save_rgb
from util.evaluation.whole_images import evaluate_images, whole_image_predictor
from util.runtime.runs import checkpoint_path_problem


def select_items(items: Sequence, index_start: int, index_step: int) -> list:
    """``items[index_start : index_start + index_step]`` (``index_step`` 0 = to the end), as the release."""
    end = len(items) if not index_step else min(index_start + index_step, len(items))
    return list(items[index_start:end])


def checkpoints_to_evaluate(cfg) -> List[Tuple[Optional[str], str]]:
    """(model path, save folder) pairs to evaluate: ``model_path`` and, when set, ``best_mIoU_model_path``."""
    if not cfg.save_folder:
        raise ConfigError("save_folder must be set (predictions and metrics are written there), or model_path, "
                          "or save_path and epochs of the run to evaluate")
    runs = [(cfg.model_path, cfg.save_folder)]
    if cfg.best_mIoU_model_path:
        if not cfg.best_mIoU_save_folder:
            raise ConfigError("best_mIoU_model_path is set but best_mIoU_save_folder is empty "
                              "(set it, or set best_mIoU_model_path to '' to skip)")
        runs.append((cfg.best_mIoU_model_path, cfg.best_mIoU_save_folder))
    if not cfg.has_prediction:
        for model_path, _ in runs:
            if not model_path:
                raise ConfigError("model_path must be set (or has_prediction True to score saved predictions)")
            problem = checkpoint_path_problem("model_path" if model_path == cfg.model_path else
                                              "best_mIoU_model_path", model_path)
            if problem:
                raise CheckpointError(problem)
    return runs


PREDICTION_RECORD = "predictions.json"  # how the gray maps of a save folder were made


PREDICTION_KEYS = ("model_path", "scales", "base_size", "crop_size", "flip", "precision")


def precision_that_runs(cfg, model_path: Optional[str]) -> str:
    """The precision the predictions of ``model_path`` are computed in: the config's ``precision`` for a
    checkpoint; ``fp32`` for an exported file, which always computes in float32 (autocast does not reach
    into it: util/evaluation/deploy.py)."""
    return "fp32" if model_path and is_exported_model(model_path) else cfg.get("precision", "fp32")


def prediction_record(cfg, model_path: Optional[str], kwargs: dict) -> dict:
    """The settings that make this run's predictions (kept in the save folder and in metrics.json); each
    states what ran (``precision``: :func:`precision_that_runs`)."""
    return dict(model_path=str(model_path), scales=kwargs["scales"], base_size=cfg.base_size,
                crop_size=list(kwargs["crop_size"]), flip=bool(kwargs["flip"]),
                precision=precision_that_runs(cfg, model_path))


def read_prediction_record(save_folder: str, logger) -> dict:
    """How the predictions already in ``save_folder`` were made (``has_prediction True``): the record
    tool/test.py wrote beside them; its settings, not this command's, describe what is scored."""
    path = Path(save_folder) / PREDICTION_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return {key: record.get(key) for key in PREDICTION_KEYS}
    except (OSError, ValueError):
        logger.warning(f"{path} is missing or unreadable: how these predictions were made is not known "
                       f"(recorded as null in metrics.json)")
        return {key: None for key in PREDICTION_KEYS}


def replaced_results_message(save_folder: str, model_path: Optional[str]) -> Optional[str]:
    """A warning when ``save_folder`` holds the results of another model than ``model_path`` (its
    predictions.json names another file): this run replaces them. None for an empty folder or the same model."""
    path = Path(save_folder) / PREDICTION_RECORD
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")).get("model_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not earlier or earlier == str(model_path):
        return None
    try:
        if os.path.samefile(earlier, str(model_path)):
            return None
    except OSError:  # the earlier model is gone (or was relative to another directory): names differ
        pass
    return (f"{save_folder} holds the results of {earlier}: this run replaces them with those of {model_path} "
            f"(give save_folder to keep both)")


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)


def evaluate_run(cfg, model_path: Optional[str], save_folder: str, entries: Sequence[ListEntry],
                 names: Sequence[str], device: torch.device, rank: int, world_size: int, logger,
                 environment: Optional[dict] = None) -> Optional[dict]:
    """Predict (or read saved predictions) for this process's share of ``entries`` and score them
    with :func:`util.evaluation.whole_images.evaluate_images` (the loop the training-time validation runs too).

    ``names[i]`` is the output file name of ``entries[i]``; ``environment`` (where the scoring ran:
    util.runtime.environment.collect_environment) goes into metrics.json. Returns the metrics dict (None
    for an unlabelled split).
    """
    labelled = cfg.split != "test"
    gray_folder = Path(save_folder) / "gray"
    color_folder = Path(save_folder) / "color"
    palette = config_palette(cfg)
    kwargs = inference_kwargs(cfg)

    if cfg.has_prediction:
        made_by = read_prediction_record(save_folder, logger)

        def predict(index, entry, where):
            gray_path = gray_folder / f"{names[index]}.png"
            if not gray_path.is_file():
                raise DataError(f"has_prediction is True but the prediction {gray_path} does not exist "
                                f"(for image {entry.image_path})")
            return load_label(gray_path)

        save_prediction = None
    else:
        made_by = prediction_record(cfg, model_path, kwargs)
        replaced = replaced_results_message(save_folder, model_path) if rank == 0 else None
        if replaced:
            logger.warning(replaced)
        if made_by["precision"] != cfg.get("precision", "fp32"):
            logger.info(f"=> precision {cfg.precision} applies to checkpoints: {model_path} is an exported file and "
                        f"computes in float32 (recorded as fp32)")
        # Always a fresh model: load_inference_model folds BatchNorm into the convolutions, so a
        # previous run's model no longer has the checkpoint's layout to load new weights into.
        model = load_inference_model(cfg, model_path, device)
        logger.info(f"=> loaded weights {model_path}; scales {kwargs['scales']}, flip {kwargs['flip']}, "
                    f"base_size {cfg.base_size}, crop {kwargs['crop_size']}, {kwargs['batch_size']} windows per "
                    f"forward, device {device}")
        predict = whole_image_predictor(model, kwargs)

        def save_prediction(index, entry, prediction):
            gray = prediction.to("cpu", torch.uint8).numpy()
            save_gray(gray_folder / f"{names[index]}.png", gray)
            save_rgb(color_folder / f"{names[index]}.png", colorize(gray, palette))

    metrics = evaluate_images(entries, predict, cfg.classes, device, ignore_index=cfg.ignore_label,
                              labelled=labelled, rank=rank, world_size=world_size, list_path=cfg.test_list,
                              on_prediction=save_prediction, logger=logger, title="Test")
    if rank == 0 and not cfg.has_prediction:
        write_json(Path(save_folder) / PREDICTION_RECORD, made_by)
    if not labelled:
        logger.info(f"<<<<<<<<<<<<<<<<< End Evaluation: predictions in {save_folder} <<<<<<<<<<<<<<<<<")
        return None

    if rank == 0:
        class_names = config_class_names(cfg)
        logger.info(f"Eval result: mIoU/mAcc/allAcc {metrics['mIoU']:.4f}/{metrics['mAcc']:.4f}/"
                    f"{metrics['allAcc']:.4f}.")
        for class_id, (iou, acc, class_name) in enumerate(zip(metrics["iou"], metrics["acc"], class_names)):
            logger.info(f"Class_{class_id} result: iou/accuracy {iou:.4f}/{acc:.4f}, name: {class_name}.")
        record = {key: value for key, value in metrics.items() if key not in ("confusion_matrix", "num_images")}
        record.update(
            names=class_names,
            num_images=metrics["num_images"],
            split=cfg.split,
            test_list=str(cfg.test_list),
            has_prediction=bool(cfg.has_prediction),
            **made_by,
            confusion_matrix=metrics["confusion_matrix"].cpu().tolist(),
            environment=environment,
        )
        metrics_path = Path(save_folder) / "metrics.json"
        write_json(metrics_path, nan_to_none(record))
        logger.info(f"=> metrics written to {metrics_path}")
        logger.info("<<<<<<<<<<<<<<<<< End Evaluation <<<<<<<<<<<<<<<<<")
    return metrics
