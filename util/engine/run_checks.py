"""The checks a training run passes before anything heavy is built: the config's files and values
(:func:`check_run_config`) and, for several processes, the same on every rank with one shared
``save_path`` (:func:`check_on_every_rank`). Each raises ConfigError with what to change."""
from __future__ import annotations

import os
import uuid

from util.data.dataset import read_list_entries
from util.data.preparation import missing_list_hint
from util.engine.precision import check_device_support
from util.errors import ConfigError, DataError, EmptyListError
from util.runtime import distributed
from util.runtime.runs import check_checkpoint_paths, list_run_checkpoints


def check_writable_dir(path: str) -> None:
    """Create ``path`` and write + remove a probe file in it, or raise ConfigError."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"save_path '{path}' is not a writable directory ({exc.strerror or exc}); "
                          f"checkpoints and logs could not be saved") from None


def check_run_config(cfg) -> None:
    """Every check that needs no model or data loading; raises ConfigError with what to change."""
    device_type = "cuda" if distributed.wants_cuda(cfg) else "cpu"
    check_device_support(cfg, device_type)  # fp16 on the CPU
    if not cfg.save_path:
        raise ConfigError("save_path is not set: give the directory for checkpoints "
                          "(e.g. save_path exp/camvid/run1/model)")
    if not cfg.train_list:
        raise ConfigError("train_list is not set")
    if not os.path.isfile(cfg.train_list):
        raise ConfigError(f"train_list file not found: {cfg.train_list}{missing_list_hint(cfg.train_list)}")
    if cfg.evaluate:
        if not cfg.val_list:
            raise ConfigError("evaluate is True but val_list is not set")
        if not os.path.isfile(cfg.val_list):
            raise ConfigError(f"val_list file not found: {cfg.val_list}{missing_list_hint(cfg.val_list)}")
    for key, split in [("train_list", "train")] + ([("val_list", "val")] if cfg.evaluate else []):
        # An empty list stops the run before its log and config are written (on every rank, as a config
        # error); a malformed line stays a data error (status 1), reported when the datasets are built.
        try:
            read_list_entries(cfg[key], cfg.data_root, split)
        except EmptyListError as error:
            raise ConfigError(f"{key}: {error}" + ("; evaluate False trains without validation"
                                                   if key == "val_list" else "")) from None
        except DataError:
            pass
    check_checkpoint_paths(cfg, ("weight", "pretrained", "resume"))
    if cfg.start_epoch < 0 or cfg.start_epoch >= cfg.epochs:
        raise ConfigError(f"start_epoch must be in [0, epochs), got {cfg.start_epoch} with epochs {cfg.epochs}")
    check_fresh_run(cfg)
    check_writable_dir(cfg.save_path)


def check_fresh_run(cfg) -> None:
    """A new run (no ``resume``) starts only in a ``save_path`` without another run's checkpoints, unless
    ``overwrite_run`` (then util.engine.checkpoints.remove_previous_run clears them once the run starts):
    two runs' checkpoints in one folder would mix (``resume auto`` and tool/test.py would pick either's)."""
    if cfg.resume:
        if cfg.overwrite_run:
            raise ConfigError("overwrite_run True starts a new run, resume continues one: give only one of them")
        return
    found = list_run_checkpoints(cfg.save_path)
    if found and not cfg.overwrite_run:
        names = ", ".join(os.path.basename(path) for path in found)
        raise ConfigError(f"save_path {cfg.save_path} holds another run's checkpoints ({names}): 'resume auto' "
                          f"continues that run, another save_path starts a new one (or overwrite_run True "
                          f"replaces that run, removing its checkpoints)")


def check_on_every_rank(cfg) -> None:
    """:func:`check_run_config` on every process of a multi-process run, and ``save_path`` seen by all.

    Each node needs its own copy of ``pretrained``, the lists and the data; ``save_path`` must be one
    directory every node shares (checkpoints are written by rank 0 and read by all on resume). A
    problem on any rank stops every rank at once, named with its rank and host.
    """
    problem = None
    try:
        check_run_config(cfg)
    except ConfigError as exc:
        problem = str(exc)
    problems = distributed.problems_on_any_rank(problem)
    if not problems:
        # rank 0 leaves a marker in save_path; a rank that does not see it has a save_path of its own
        marker = os.path.join(cfg.save_path, f".shared_check_{distributed.broadcast_object(uuid.uuid4().hex)}")
        if distributed.get_rank() == 0:
            with open(marker, "w") as handle:
                handle.write("save_path shared check\n")
        distributed.barrier()
        problems = distributed.problems_on_any_rank(
            None if os.path.exists(marker) else
            f"save_path {cfg.save_path} is not the directory rank 0 writes to (a file rank 0 created there is missing)")
        distributed.barrier()
        if distributed.get_rank() == 0:
            os.remove(marker)
    if problems:
        raise ConfigError("; ".join(problems) + " (on several machines save_path must be a shared directory and "
                          "every node needs pretrained, the lists and the data)")
