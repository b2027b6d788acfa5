"""Checkpoint I/O in one place: safe loading, state-dict extraction, strict loading, atomic saving.

* Every checkpoint (``.pth``: weight, resume, pretrained, model_path) is read with
  ``torch.load(weights_only=True, map_location="cpu")``: a checkpoint can hold tensors, numbers,
  strings, lists and dicts, never arbitrary Python objects (which could run code while unpickling).
  Store plain Python numbers (``float(x)``), not numpy scalars. Exported networks (``.onnx``,
  ``.torchscript`` as model_path) are not checkpoints and are not read here: util/evaluation/deploy.py loads them,
  a TorchScript file with ``torch.jit.load``, which runs the program inside the archive, so the
  ``weights_only`` guarantee does not cover them (load exported files only from a source you trust).
* Problems are reported as a one-line :class:`CheckpointError` naming the file and what is wrong.
* Weights are always loaded strictly; a mismatch lists the missing, unexpected and wrongly shaped
  keys instead of being silently ignored.
* Release checkpoints (``{'state_dict': {'module.layer0.0.weight': ...}, 'epoch': .., 'optimizer': ..}``),
  bare state dicts, and keys with or without ``module.`` (DDP) / ``_orig_mod.`` (torch.compile)
  prefixes are all accepted.

What a training run keeps (file names, pruning, resume, content) is util/engine/checkpoints.py.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import uuid
from collections import OrderedDict
from typing import Any, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from util.errors import CheckpointError

PathLike = Union[str, "os.PathLike[str]"]

# Prefixes added by wrappers: DistributedDataParallel / DataParallel, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
BACKBONE_PREFIXES = ("layer0.", "layer1.", "layer2.", "layer3.", "layer4.")
# ImageNet classification layout -> segmentation layout (the stem becomes layer0).
IMAGENET_RENAMES = (("conv1.", "layer0.0."), ("bn1.", "layer0.1."))
MAX_LISTED_KEYS = 10


# ---------------------------------------------------------------------------------------------
# Reading


def load_checkpoint_file(path: PathLike) -> Any:
    """Load ``path`` safely onto the CPU (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing or unreadable, truncated/corrupted, or contains
            Python objects other than tensors and plain containers.
    """
    path = os.fspath(path)
    from util.evaluation.deploy import is_exported_model, not_a_checkpoint_message

    if is_exported_model(path):  # torch.load would call it corrupted (ONNX) or hand it to torch.jit.load
        raise CheckpointError(not_a_checkpoint_message(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint path {path} is not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is not a valid checkpoint (truncated or corrupted?): the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        # An unknown opcode means the bytes are not a pickle stream at all (damaged or not a
        # checkpoint); anything else the weights-only unpickler rejects is a disallowed object.
        if "Weights only load failed" in message and "Unsupported operand" not in message:
            raise CheckpointError(
                f"{path}: refused: it contains Python objects that weights_only loading does not allow "
                f"({_unsafe_detail(message)}); a checkpoint must hold only tensors and plain data "
                f"(dicts, lists, numbers, strings). Loading it with weights_only=False could run code "
                f"from the file") from None
        raise CheckpointError(f"{path} is not a valid checkpoint (truncated or corrupted?): "
                              f"{_unpickling_reason(exc)}") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # the zip reader of a cut-short file (of 6-65 KB) seeks before its start
            raise CheckpointError(f"{path} is not a valid checkpoint (truncated or corrupted?): "
                                  f"{_short_reason(exc)}") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {_short_reason(exc)}") from None
    except Exception as exc:  # zip/pickle/struct errors of a damaged file take many forms
        raise CheckpointError(f"{path} is not a valid checkpoint (truncated or corrupted?): "
                              f"{_short_reason(exc)}") from None


def _unsafe_detail(message: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"global {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    if found:
        return found.group(1).strip().rstrip(".")
    return "unsupported pickle content"


def _unpickling_reason(exc: BaseException) -> str:
    found = re.search(r"Unsupported operand \S+", str(exc))
    return f"unreadable pickle data ({found.group(0)})" if found else _short_reason(exc)


def _short_reason(exc: BaseException) -> str:
    """First sentence of an exception message on one line (torch's messages run to paragraphs)."""
    text = " ".join(str(exc).split())
    text = text.split(". ")[0].rstrip(".")
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Remove ``module.`` / ``_orig_mod.`` prefixes that *every* key carries (in any nesting)."""
    result = OrderedDict(state_dict)
    changed = True
    while changed and result:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in result):
                result = OrderedDict((key[len(prefix):], value) for key, value in result.items())
                changed = True
    return result


def add_module_prefix(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Keys as DistributedDataParallel names them (the release's checkpoint layout)."""
    return OrderedDict((key if key.startswith("module.") else f"module.{key}", value)
                       for key, value in state_dict.items())


def extract_state_dict(obj: Any, source: str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """The model state dict inside a loaded checkpoint, without wrapper prefixes.

    Accepts ``{'state_dict': {...}, ...}`` (the release's and this codebase's training
    checkpoints), ``{'model': {...}}``, or a bare ``{name: tensor}`` mapping.
    """
    state_dict = obj
    if isinstance(obj, Mapping):
        for wrapper_key in ("state_dict", "model"):
            if isinstance(obj.get(wrapper_key), Mapping):
                state_dict = obj[wrapper_key]
                break
    if not isinstance(state_dict, Mapping) or not state_dict:
        kind = f"a dict with keys {_short_list(list(obj))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{source} holds no model weights: expected {{'state_dict': {{name: tensor}}}} "
                              f"or {{name: tensor}}, found {kind}")
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source} is not a state dict: {len(not_tensors)} entries are not tensors "
                              f"({_short_list(not_tensors)})")
    return strip_wrapper_prefixes(state_dict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------
# Loading into a model


def _short_list(items: List[Any], limit: int = MAX_LISTED_KEYS) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
                      expected_name: str = "model", found_name: str = "file") -> Optional[str]:
    """None when ``found`` has exactly ``expected``'s keys and shapes, else a one-line summary."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    misshaped = [f"{key} ({found_name} {list(found[key].shape)} vs {expected_name} {list(expected[key].shape)})"
                 for key in expected if key in found and found[key].shape != expected[key].shape]
    if not (missing or unexpected or misshaped):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_short_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_short_list(unexpected)}")
    if misshaped:
        parts.append(f"{len(misshaped)} wrongly shaped: {_short_list(misshaped)}")
    return "; ".join(parts)


def _load_state(path_or_state: Any, source: Optional[str]) -> Tuple[Any, str]:
    if isinstance(path_or_state, (str, os.PathLike)):
        return load_checkpoint_file(path_or_state), source or os.fspath(path_or_state)
    return path_or_state, source or "checkpoint"


def load_model_weights(model: nn.Module, path_or_state: Any, source: Optional[str] = None) -> None:
    """Load all weights of ``model`` strictly from a file path, a loaded checkpoint or a state dict.

    ``model`` may be wrapped (DDP, torch.compile); prefixes on either side do not matter.

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not match the model (the message
            lists them; typically another arch, backbone, depth or class count).
    """
    obj, source = _load_state(path_or_state, source)
    state_dict = extract_state_dict(obj, source)
    target = unwrap_model(model)
    problem = describe_mismatch(target.state_dict(), state_dict)
    if problem:
        raise CheckpointError(f"{source} does not match the model (another arch, backbone, layers or number of "
                              f"classes?): {problem}")
    target.load_state_dict(state_dict, strict=True)


def load_weights_for_fine_tuning(model: nn.Module, path_or_state: Any, source: Optional[str] = None) -> List[str]:
    """Load a whole-model checkpoint into ``model`` for fine-tuning, also across class counts.

    Every tensor that matches is loaded. When the checkpoint was trained for another number of classes,
    the final classifier layers of the main and auxiliary heads (``model.classifier_layers()``; their
    class dimension alone differs) keep the model's fresh initialisation. Any other mismatch (another
    arch, backbone or depth) is refused as by :func:`load_model_weights`.

    Returns the names of the re-initialised layers (empty when the class counts agree).
    """
    obj, source = _load_state(path_or_state, source)
    state_dict = extract_state_dict(obj, source)
    target = unwrap_model(model)
    expected = target.state_dict()
    layers = target.classifier_layers() if hasattr(target, "classifier_layers") else []
    replaced = [f"{layer}.{name}" for layer in layers for name in ("weight", "bias")
                if f"{layer}.{name}" in state_dict and f"{layer}.{name}" in expected
                and state_dict[f"{layer}.{name}"].shape != expected[f"{layer}.{name}"].shape
                and state_dict[f"{layer}.{name}"].shape[1:] == expected[f"{layer}.{name}"].shape[1:]]
    state_dict = OrderedDict(state_dict)
    for key in replaced:
        state_dict[key] = expected[key]
    problem = describe_mismatch(expected, state_dict)
    if problem:
        raise CheckpointError(f"{source} does not match the model beyond its number of classes (another arch, "
                              f"backbone or layers?): {problem}")
    target.load_state_dict(state_dict, strict=True)
    return [layer for layer in layers if f"{layer}.weight" in replaced]


def imagenet_to_segmentation_keys(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """ImageNet classifier layout -> backbone part of the segmentation layout.

    Drops the classifier ``fc.*`` and renames the stem ``conv1.* -> layer0.0.*``, ``bn1.* -> layer0.1.*``;
    ``layer1..4`` keep their names.
    """
    mapped = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        for old, new in IMAGENET_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        mapped[key] = value
    return mapped


def load_pretrained_backbone(model: nn.Module, path: PathLike) -> None:
    """Initialise ``model.layer0..layer4`` from an ImageNet backbone checkpoint (strictly).

    The file is a state dict in the classification layout (``conv1``, ``bn1``, ``layer1..4``,
    ``fc``) as released with PyConvResNet / torchvision; the head keeps its initialisation.
    """
    source = os.fspath(path)
    state_dict = imagenet_to_segmentation_keys(extract_state_dict(load_checkpoint_file(source), source))
    target = unwrap_model(model)
    backbone_state = OrderedDict((key, value) for key, value in target.state_dict().items()
                                 if key.startswith(BACKBONE_PREFIXES))
    problem = describe_mismatch(backbone_state, state_dict, expected_name="backbone")
    if problem:
        raise CheckpointError(f"pretrained backbone {source} does not match the model's backbone "
                              f"(another backbone_net or layers?): {problem}")
    result = target.load_state_dict(state_dict, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # guaranteed by the check above


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` atomically: a crash or error never leaves a partial ``path``.

    Writes a temporary file in the same directory, flushes and fsyncs it, then renames it over
    ``path`` (``os.replace`` is atomic on one filesystem). On any error the temporary file is
    removed, the previous ``path`` (if any) is untouched, and the exception propagates.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 lets the umask decide the permissions, as for a normal file.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    writer = None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            writer = _ErrorRecordingWriter(handle)
            torch.save(obj, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            os.remove(temporary)
        except FileNotFoundError:
            pass
        if writer is not None and writer.error is not None and not isinstance(exc, OSError):
            # torch.save reports a failed write (disk full, file size limit) as an opaque
            # RuntimeError ("unexpected pos ..."); raise the OSError that caused it instead.
            error = writer.error
            raise OSError(error.errno, error.strerror, path) from None
        raise
    _fsync_directory(directory)


class _ErrorRecordingWriter:
    """The file object handed to ``torch.save``: remembers the OSError of a failed write."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._handle.flush()


CHECKPOINT_TEMPORARY = re.compile(r"^\.(?P<name>.+\.pth)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(directory: PathLike) -> List[str]:
    """Delete the temporary files of :func:`save_checkpoint` calls that never finished.

    A process killed while writing a checkpoint leaves ``.NAME.pth.PID.XXXXXXXX.tmp`` behind
    (as large as a checkpoint). Files whose writer is still running on this machine are kept.
    Returns the removed paths.
    """
    directory = os.fspath(directory)
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        match = CHECKPOINT_TEMPORARY.match(name)
        if match and not _process_alive(int(match.group("pid"))):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
            except FileNotFoundError:
                pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _fsync_directory(directory: str) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


__all__ = ["load_checkpoint_file", "extract_state_dict", "strip_wrapper_prefixes", "add_module_prefix",
           "unwrap_model", "describe_mismatch", "load_model_weights", "load_weights_for_fine_tuning",
           "imagenet_to_segmentation_keys", "load_pretrained_backbone", "save_checkpoint",
           "remove_stale_temporaries"]
