"""Where a training run's files are, in one place: tool/train.py, tool/test.py, tool/demo.py and the
shell wrappers (which only call them) all follow these rules, so an override such as
``save_path ~/runs/demo/model epochs 1`` carries through training, testing and the demo.

A run is the directory ``save_path`` that tool/train.py fills:

* ``train_epoch_N.pth`` / ``best_mIoU.pth`` (named here, written by util/engine/checkpoints.py), and for every
  start of train.py a log ``train-STAMP.log`` and the effective config ``train-STAMP.yaml`` (after overrides, as the run
  used it);
* results of tool/test.py go to ``RUN/result/NAME/SPLIT/ss`` (``ms`` for several scales), where RUN
  is :func:`run_directory` of the checkpoint's folder and NAME the checkpoint's name
  (``train_epoch_4.pth`` -> ``epoch_4``, ``best_mIoU.pth`` -> ``best_mIoU``; an exported file keeps its
  suffix: ``x.onnx`` -> ``x_onnx``), as in the release's ``exp/DATASET/EXP/{model,result}`` layout.

Relative paths (:func:`rebase_repository_paths`): a path typed on the command line means what it
means in the shell it was typed in (relative to the current directory); a relative path inside one of
the repository's own configs (``config/...``) is relative to the repository root, so the shipped
configs work from any directory; inside any other YAML, relative to the current directory (as the
release read them).
"""
from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from util.errors import ConfigError
from util.evaluation.deploy import is_exported_model, missing_export_message, not_a_checkpoint_message
from util.runtime import distributed
from util.runtime.checkpoint_io import PathLike
from util.runtime.cli import StopSignals, TrainingStopped

REPO_ROOT = Path(__file__).resolve().parents[2]
RELEASED_WEIGHTS_HINT = "docs/model_zoo.md, section 'Released weights'"

# Config keys whose values are file or directory paths.
PATH_KEYS = ("data_root", "train_list", "val_list", "save_path", "weight", "resume", "pretrained", "test_list",
             "model_path", "save_folder", "colors_path", "names_path", "best_mIoU_model_path",
             "best_mIoU_save_folder")


# ---------------------------------------------------------------------------------------------
# Relative paths


def is_repository_config(config_path: Optional[str]) -> bool:
    """True for a YAML inside the repository's ``config/`` directory."""
    if not config_path:
        return False
    try:
        Path(config_path).resolve().relative_to(REPO_ROOT / "config")
    except ValueError:
        return False
    return True


def rebase_repository_paths(cfg, config_path: Optional[str], overridden: Iterable[str]) -> None:
    """Make the relative paths that come from a repository config relative to the repository root
    (in place). Keys in ``overridden`` came from the command line and keep their meaning (relative
    to the current directory). Nothing changes when the current directory is the repository root."""
    if not is_repository_config(config_path):
        return
    if Path.cwd().resolve() == REPO_ROOT:
        return
    overridden = set(overridden)
    for key in PATH_KEYS:
        value = cfg.get(key)
        if key in overridden or not isinstance(value, str) or not value or os.path.isabs(value):
            continue
        if key == "resume" and value == "auto":
            continue
        cfg[key] = os.path.normpath(os.path.join(REPO_ROOT, os.path.expanduser(value)))


def repository_twin(path: str) -> Optional[str]:
    """For a relative ``path`` missing in the current directory (not the repository root) but present
    under the repository root: that file's path, for an error message (never used in its place)."""
    if not path or os.path.isabs(path) or os.path.exists(path) or Path.cwd().resolve() == REPO_ROOT:
        return None
    twin = REPO_ROOT / os.path.expanduser(path)
    return str(twin) if twin.exists() else None


def expand_user_paths(cfg) -> None:
    """``~/runs`` -> ``/home/me/runs`` for every path key (a quoted ``~`` reaches us unexpanded)."""
    for key in PATH_KEYS:
        value = cfg.get(key)
        if isinstance(value, str) and value.startswith("~"):
            cfg[key] = os.path.expanduser(value)


# ---------------------------------------------------------------------------------------------
# A run's files


def run_directory(checkpoint_dir: str) -> str:
    """The run a checkpoint folder belongs to: its parent when the folder is named ``model`` (the
    release's ``exp/DATASET/EXP/model`` layout), else the folder itself."""
    checkpoint_dir = os.path.normpath(checkpoint_dir)
    return os.path.dirname(checkpoint_dir) if os.path.basename(checkpoint_dir) == "model" else checkpoint_dir


def result_name(model_path: str) -> str:
    """The results' name of a model file: a checkpoint's name without ``.pth`` (``train_epoch_4.pth`` ->
    ``epoch_4``, ``best_mIoU.pth`` -> ``best_mIoU``, ``x.pth`` -> ``x``); any other file keeps its suffix,
    so that the exports of one checkpoint do not share a folder (``x.onnx`` -> ``x_onnx``,
    ``x.torchscript`` -> ``x_torchscript``)."""
    path = Path(model_path)
    if path.suffix != ".pth":
        return path.name.replace(".", "_")
    return path.stem[len("train_"):] if path.stem.startswith("train_epoch_") else path.stem


def results_folder(model_path: str, split: str, scales: Sequence[float]) -> str:
    """Where tool/test.py writes the predictions and metrics of ``model_path``:
    ``RUN/result/NAME/SPLIT/ss`` (single scale 1.0) or ``.../ms`` (any other scales)."""
    kind = "ss" if [float(s) for s in scales] == [1.0] else "ms"
    run = run_directory(os.path.dirname(model_path) or ".")
    return os.path.join(run, "result", result_name(model_path), split, kind)


def run_checkpoint(save_path: str, epochs: int) -> str:
    """The checkpoint a finished run of ``epochs`` epochs ends with (tool/train.py always saves the last epoch)."""
    return checkpoint_path(save_path, epochs)


def resolve_test_paths(cfg) -> List[str]:
    """Fill in the checkpoints and result folders the user did not set, from the run (in place).

    * ``model_path`` empty: the run's last checkpoint, ``save_path/train_epoch_{epochs}.pth``; then
      ``best_mIoU_model_path`` empty: the run's ``best_mIoU.pth`` if it has one. (A ``model_path``
      given by the user is evaluated alone, unless ``best_mIoU_model_path`` is given too.)
    * ``save_folder`` / ``best_mIoU_save_folder`` empty: :func:`results_folder` of their checkpoint.

    Returns one line per derived key, for the log.
    """
    derived = []
    if not cfg.get("model_path") and cfg.get("save_path"):
        cfg.model_path = run_checkpoint(cfg.save_path, cfg.epochs)
        derived.append(f"model_path {cfg.model_path} (save_path, epochs {cfg.epochs})")
        best = os.path.join(cfg.save_path, BEST_CHECKPOINT)
        if not cfg.get("best_mIoU_model_path") and os.path.isfile(best):
            cfg.best_mIoU_model_path = best
            derived.append(f"best_mIoU_model_path {best} (the run's best checkpoint)")
    for model_key, folder_key in (("model_path", "save_folder"), ("best_mIoU_model_path", "best_mIoU_save_folder")):
        if cfg.get(model_key) and not cfg.get(folder_key):
            cfg[folder_key] = results_folder(cfg[model_key], cfg.split, cfg.scales)
            derived.append(f"{folder_key} {cfg[folder_key]} (beside {model_key})")
    return derived


def timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


def training_log_paths(save_path: str, stamp: str):
    """(log, effective config copy) of one start of tool/train.py: ``save_path/train-STAMP.{log,yaml}``."""
    return os.path.join(save_path, f"train-{stamp}.log"), os.path.join(save_path, f"train-{stamp}.yaml")


def evaluation_log_path(save_folder: str, stamp: str) -> str:
    """The log of one tool/test.py run: ``save_folder/test-STAMP.log``, beside the metrics."""
    return os.path.join(save_folder, f"test-{stamp}.log")


# ---------------------------------------------------------------------------------------------
# Messages about a checkpoint path that leads somewhere


def checkpoint_path_problem(key: str, path: str) -> Optional[str]:
    """None when ``path`` is a file; else a message saying what ``path`` is and what to give instead.

    A directory is named as one (with the checkpoints of a run directory listed); a missing
    ImageNet file (``pretrained``) says where it comes from and how to train without it. An exported
    network (``.onnx``, ``.torchscript``) as ``weight``, ``resume`` or ``pretrained`` is named as one,
    with where it can be used (model_path); a missing one says how it is made. The released weights
    are pointed to only for a file that is not a run's own (``train_epoch_N.pth``, ``best_mIoU.pth``).
    """
    if is_exported_model(path) and key in ("weight", "resume", "pretrained"):
        return not_a_checkpoint_message(path, key)
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        found = [os.path.basename(p) for _, p in list_epoch_checkpoints(path)]
        if os.path.isfile(os.path.join(path, BEST_CHECKPOINT)):
            found.append(BEST_CHECKPOINT)
        if found:
            return (f"{key} {path} is a directory, not a checkpoint file; it holds {', '.join(found)}: "
                    f"give one of them, e.g. {key} {os.path.join(path, found[-1])}")
        return (f"{key} {path} is a directory, not a checkpoint file "
                f"(it holds no train_epoch_N.pth or {BEST_CHECKPOINT})")
    twin = repository_twin(path)
    if twin:  # the one rule, said where it bites: the file is there, relative to the repository instead
        return (f"{key} file not found: {path} (relative to the current directory {os.getcwd()}, as every path "
                f"typed on the command line; the repository holds {twin}: give that path, or run from the "
                f"repository root)")
    if key == "resume":
        return (f"resume checkpoint not found: {path} (use 'resume auto' to continue from the newest "
                f"train_epoch_N.pth in save_path if there is one)")
    if key == "pretrained":
        return (f"pretrained file not found: {path}: it is the ImageNet classification checkpoint of the backbone "
                f"(download page and file names: {RELEASED_WEIGHTS_HINT}); or set pretrained '' to train "
                f"from scratch")
    if is_exported_model(path):
        return missing_export_message(key, path)
    message = f"{key} file not found: {path}"
    folder = os.path.dirname(path)
    if folder and os.path.isdir(folder):
        found = [os.path.basename(p) for _, p in list_epoch_checkpoints(folder)]
        if os.path.isfile(os.path.join(folder, BEST_CHECKPOINT)):
            found.append(BEST_CHECKPOINT)
        if found:
            message += (f" ({folder} holds {', '.join(found)}; a run's checkpoint is found from save_path and "
                        f"epochs, so give the same epochs as for training, or {key} with one of these)")
    name = os.path.basename(path)
    run_file = (name == BEST_CHECKPOINT or EPOCH_CHECKPOINT_PATTERN.match(name)
                or MID_EPOCH_CHECKPOINT_PATTERN.match(name))
    if key in ("model_path", "weight", "best_mIoU_model_path") and not run_file:  # a run's own file is not released
        message += f"; the released ADE20K checkpoints are listed in {RELEASED_WEIGHTS_HINT}"
    return message


def check_checkpoint_paths(cfg, keys: Sequence[str]) -> None:
    """Raise ConfigError for the first of ``keys`` whose (set) value is not a file."""
    for key in keys:
        value = cfg.get(key)
        if value and not (key == "resume" and value == "auto"):
            problem = checkpoint_path_problem(key, value)
            if problem:
                raise ConfigError(problem)


# ---------------------------------------------------------------------------------------------
# The checkpoint files of a run

EPOCH_CHECKPOINT_PATTERN = re.compile(r"^train_epoch_(\d+)\.pth$")
# Written when training is stopped by a signal in the middle of epoch E after I of its iterations
# (the log's "Epoch: [E/..][I/..]"); it holds epoch E - 1 (epochs done) and iteration I.
MID_EPOCH_CHECKPOINT_PATTERN = re.compile(r"^train_epoch_(\d+)_iter_(\d+)\.pth$")
BEST_CHECKPOINT = "best_mIoU.pth"
EVENT_FILE_PREFIX = "events.out.tfevents."  # tensorboardX's SummaryWriter(save_path)


def checkpoint_path(save_path: PathLike, epoch: int, iteration: int = 0) -> str:
    """``save_path/train_epoch_{epoch}.pth`` after ``epoch`` whole epochs; with ``iteration`` > 0 the
    mid-epoch ``train_epoch_{epoch + 1}_iter_{iteration}.pth`` (``iteration`` done of epoch ``epoch + 1``)."""
    name = f"train_epoch_{epoch + 1}_iter_{iteration}.pth" if iteration else f"train_epoch_{epoch}.pth"
    return os.path.join(os.fspath(save_path), name)


def list_training_checkpoints(save_path: PathLike) -> List[Tuple[Tuple[int, int], str]]:
    """``[((epochs done, iterations done in the next epoch), path), ...]`` of every training checkpoint
    in ``save_path`` (whole-epoch and mid-epoch), oldest first."""
    save_path = os.fspath(save_path)
    found = [((epoch, 0), path) for epoch, path in list_epoch_checkpoints(save_path)]
    if os.path.isdir(save_path):
        for name in os.listdir(save_path):
            match = MID_EPOCH_CHECKPOINT_PATTERN.match(name)
            if match and int(match.group(1)) >= 1:
                found.append(((int(match.group(1)) - 1, int(match.group(2))), os.path.join(save_path, name)))
    return sorted(found)


def list_run_checkpoints(save_path: PathLike) -> List[str]:
    """Every checkpoint a run of tool/train.py leaves in ``save_path``: its training checkpoints (whole-epoch
    and mid-epoch, oldest first) and ``best_mIoU.pth``. Another run started there would mix with them."""
    found = [path for _, path in list_training_checkpoints(save_path)]
    best = os.path.join(os.fspath(save_path), BEST_CHECKPOINT)
    return found + ([best] if os.path.isfile(best) else [])


def list_event_files(save_path: PathLike) -> List[str]:
    """The TensorBoard event files (``events.out.tfevents.*``) tool/train.py writes in ``save_path``."""
    save_path = os.fspath(save_path)
    if not os.path.isdir(save_path):
        return []
    return sorted(os.path.join(save_path, name) for name in os.listdir(save_path)
                  if name.startswith(EVENT_FILE_PREFIX))


def list_epoch_checkpoints(save_path: PathLike) -> List[Tuple[int, str]]:
    """``[(epoch, path), ...]`` of the ``train_epoch_N.pth`` files in ``save_path``, oldest first."""
    save_path = os.fspath(save_path)
    if not os.path.isdir(save_path):
        return []
    found = []
    for name in os.listdir(save_path):
        match = EPOCH_CHECKPOINT_PATTERN.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(save_path, name)))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Stopping: where a run stopped and how to continue it


@dataclass
class RunStatus:
    """Where the run is (updated as it goes), so that a stop can say where it stopped, which
    checkpoint is the newest and the command that resumes."""

    save_path: str
    config_path: str
    opts: List[str] = field(default_factory=list)
    is_main: bool = True
    world_size: int = 1
    epoch: Optional[int] = None  # 1-based epoch being trained or validated
    epochs: Optional[int] = None
    stage: str = "setting up"  # "training", "validating", "saving checkpoints", "final validation"

    def where(self) -> str:
        if self.epoch is None:
            return f"while {self.stage}"
        return f"while {self.stage} epoch {self.epoch}/{self.epochs}"

    def resume_command(self) -> str:
        opts = list(self.opts)
        kept = []
        for key, value in zip(opts[0::2], opts[1::2]):
            if key.lstrip("-") not in ("resume", "overwrite_run"):  # resuming continues the run, never replaces it
                kept += [key, value]
        launcher = ["python"] if self.world_size == 1 else ["torchrun", f"--nproc_per_node={self.world_size}"]
        script = os.path.relpath(REPO_ROOT / "tool" / "train.py")  # as typed from this directory
        return shlex.join(launcher + [script, "--config", self.config_path, *kept, "resume", "auto"])

    def stopped_message(self, reason: str = "interrupted") -> str:
        found = list_training_checkpoints(self.save_path)
        newest = f"newest checkpoint {found[-1][1]}" if found else f"no checkpoint in {self.save_path} yet"
        return f"{reason} {self.where()}; {newest}; resume with: {self.resume_command()}"


def stop_error(stop: StopSignals, where: str, path: str, status: RunStatus, logger) -> TrainingStopped:
    """The TrainingStopped every rank raises after a stop signal: each waits for rank 0's checkpoint
    write, then leaves with 128 + the signal's number.
    (Rank 0 logs first: srun --kill-on-bad-exit ends the others as soon as one exits.)"""
    message = (f"{stop.name} received: stopped at {where}; saved {path}; resume with: "
               f"{status.resume_command()}")
    logger.info(message)
    distributed.barrier()
    return TrainingStopped(message, stop.exit_status)
