"""Exported networks (ONNX, TorchScript): writing them, reading them back, checking them.

An exported file holds the eval-mode network with BatchNorm folded into the convolutions:
``image`` float32 ``(N, 3, H, W)`` (RGB, ``(pixel - mean) / std`` with pixels in 0..255) ->
``logits`` float32 ``(N, classes, h, w)``. The batch ``N`` is free; ``H x W`` is fixed to the size it
was exported at (the config's ``test_h x test_w``, the only size the sliding window feeds): the
heads' adaptive pooling is traced for one size, and a file that accepted other sizes would be
silently wrong at them. Its metadata (:func:`export_metadata`) names the classes, the mean/std and
the input size, so a user outside this repository knows what to feed it.

:func:`load_exported_model` returns an ``nn.Module`` whose ``forward`` runs the file (onnxruntime
for ``.onnx``, ``torch.jit.load`` for ``.torchscript``), so ``util.evaluation.inference``'s sliding-window,
multi-scale, flipped prediction runs on it unchanged, and ``tool/test.py`` / ``tool/demo.py``
take an exported file as ``model_path`` (:func:`is_exported_model`, by extension).

onnx, onnxscript and onnxruntime are optional (``requirements-export.txt``); they are imported
only when an ONNX file is written or read.

An exported file is a program, not data: ``torch.jit.load`` runs the TorchScript code inside the
archive (``weights_only`` loading, which guards every ``.pth`` checkpoint, does not apply), and
onnxruntime executes the ONNX graph. Load exported files only from a source you trust; loading a
TorchScript file logs a one-line note saying so.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from util.errors import CheckpointError

# The extension is the format: tool/test.py and tool/demo.py pick the runtime by it.
FORMAT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript"}
# Fixed, and written into the file: the exporter's default may change with the PyTorch version.
ONNX_OPSET = 20
METADATA_FORMAT = "pyconvsegnet-export/1"
TORCHSCRIPT_METADATA = "metadata.json"  # the TorchScript archive's extra file holding the metadata
# The self-check's limit on max |exported - pytorch| / max |pytorch| over the logits: float32
# rounding through ~100 layers stays around 1e-6 relative; a wrong graph is off by far more.
RELATIVE_TOLERANCE = 1e-4
CHECK_BATCH_SIZES = (1, 2, 3)
INSTALL_HINT = "pip install -r requirements-export.txt"
LOGGER_NAME = "pyconvsegnet"  # util.runtime.log.get_logger's: the tools' log
TORCHSCRIPT_TRUST_NOTE = ("note: {path} was loaded with torch.jit.load, which runs the program inside the file "
                          "(weights_only safety covers .pth checkpoints only): load exported files only from a "
                          "source you trust")


class ExportedModelError(CheckpointError):
    """An exported file that cannot be used (unreadable, not ours, another config, another size)."""


def is_exported_model(path) -> bool:
    """True for a path with an exported format's extension (``.onnx``, ``.torchscript``)."""
    return path is not None and Path(str(path)).suffix.lower() in FORMAT_SUFFIXES.values()


def not_a_checkpoint_message(path, key: Optional[str] = None) -> str:
    """Why an exported file cannot be read as a checkpoint (or be ``key``: weight, resume, pretrained, the
    keys that take a ``.pth`` checkpoint), and where it can be used instead."""
    what = (f"{path} is an exported network ({Path(str(path)).suffix} file: the eval-mode network for inference, "
            f"without the state_dict, optimizer and config a checkpoint holds), not a checkpoint")
    if key is None:
        return f"{what} (.pth); to run it, give it as model_path to tool/test.py or tool/demo.py"
    return (f"{key} {what}: {key} takes a .pth checkpoint; to run the exported file, give it "
            f"as model_path to tool/test.py or tool/demo.py")


def missing_export_message(key: str, path) -> str:
    """A missing exported file given as ``key``: how such a file is made."""
    return (f"{key} file not found: {path} (an exported network is written by tool/deployment/export.py "
            f"--config CFG model_path CHECKPOINT --format {format_of(path)} --output {shlex.quote(str(path))})")


def format_of(path) -> str:
    suffix = Path(str(path)).suffix.lower()
    for name, known in FORMAT_SUFFIXES.items():
        if suffix == known:
            return name
    raise ExportedModelError(f"{path}: unknown exported format (extensions: "
                             f"{', '.join(FORMAT_SUFFIXES.values())})")


# ---------------------------------------------------------------------------------------------
# Metadata


def export_metadata(cfg, input_size: Tuple[int, int], output_size: Tuple[int, int], fmt: str,
                    source: Optional[str] = None) -> Dict[str, str]:
    """String key -> string value pairs written into the file (ONNX ``metadata_props``; the
    TorchScript archive's ``metadata.json``). Lists are JSON."""
    from util.data.transforms import MEAN, STD
    from util.evaluation.visualize import config_class_names

    height, width = input_size
    metadata = {
        "format": METADATA_FORMAT,
        "arch": str(cfg.arch), "backbone_net": str(cfg.backbone_net), "layers": str(cfg.layers),
        "classes": str(int(cfg.classes)), "class_names": json.dumps(list(config_class_names(cfg))),
        "mean": json.dumps([float(v) for v in MEAN]), "std": json.dumps([float(v) for v in STD]),
        "input_size": json.dumps([int(height), int(width)]),
        "input": f"image: float32 N x 3 x {height} x {width} (batch N free), RGB, (pixel - mean) / std "
                 f"with pixels in 0..255; only this height and width",
        "output": f"logits: float32 N x {int(cfg.classes)} x {output_size[0]} x {output_size[1]}; "
                  f"the class is the argmax over dim 1",
        "batchnorm": "folded into the convolutions",
        "torch": torch.__version__,
    }
    if fmt == "onnx":
        metadata["opset"] = str(ONNX_OPSET)
    if source:
        metadata["source"] = os.path.basename(str(source))
    return metadata


def parse_metadata(metadata: Dict[str, str], path) -> Dict:
    """The metadata of an exported file with its lists decoded; ExportedModelError when it is not ours."""
    if metadata.get("format") != METADATA_FORMAT:
        raise ExportedModelError(f"{path} has no PyConvSegNet metadata (not written by "
                                 f"tool/deployment/export.py?)")
    try:
        parsed = dict(metadata)
        for key in ("class_names", "mean", "std", "input_size"):
            parsed[key] = json.loads(metadata[key])
        parsed["classes"] = int(metadata["classes"])
        parsed["input_size"] = tuple(int(v) for v in parsed["input_size"])
    except (KeyError, ValueError, TypeError) as error:
        raise ExportedModelError(f"{path}: damaged PyConvSegNet metadata ({error})") from None
    return parsed


def check_matches_config(metadata: Dict, cfg, path) -> None:
    """ExportedModelError when the file was exported for other classes, another normalisation or
    another window size than ``cfg`` asks for (test_h x test_w is the size the sliding window feeds)."""
    from util.data.transforms import MEAN, STD

    if metadata["classes"] != int(cfg.classes):
        raise ExportedModelError(f"{path} predicts {metadata['classes']} classes but the config has classes "
                                 f"{cfg.classes}")
    window = (int(cfg.test_h), int(cfg.test_w))
    if metadata["input_size"] != window:
        height, width = metadata["input_size"]
        raise ExportedModelError(f"{path} takes {height}x{width} inputs but test_h x test_w is "
                                 f"{window[0]}x{window[1]}: set test_h {height} test_w {width}, or export again "
                                 f"with test_h {window[0]} test_w {window[1]}")
    for key, expected in (("mean", MEAN), ("std", STD)):
        if any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(metadata[key], expected)) or \
                len(metadata[key]) != len(expected):
            raise ExportedModelError(f"{path} expects {key} {metadata[key]}, "
                                     f"this code normalises with {list(expected)}")


# ---------------------------------------------------------------------------------------------
# Writing


def _temporary_beside(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".{name}.{os.getpid()}.tmp{Path(name).suffix}")


def export_model(model: nn.Module, fmt: str, output, input_size: Tuple[int, int], metadata: Dict[str, str],
                 reference: Optional[nn.Module] = None,
                 batch_sizes: Sequence[int] = CHECK_BATCH_SIZES) -> List[Dict]:
    """Write the eval-mode ``model`` (BatchNorm already folded: ``util.evaluation.inference.prepare_inference_model``)
    to ``output`` in ``fmt`` ("onnx" | "torchscript") for ``input_size`` (H, W) inputs with a free
    batch size, with ``metadata``; return the self-check (:func:`compare_with_reference`).

    The file is written beside ``output`` under a temporary name, read back with
    :func:`load_exported_model` and compared with ``reference`` (default ``model``) at
    ``batch_sizes``; only when every comparison is ok is it renamed to ``output``. Otherwise
    ExportedModelError, and ``output`` is untouched: a file that disagrees is never written."""
    if fmt not in FORMAT_SUFFIXES:
        raise ValueError(f"format must be one of {list(FORMAT_SUFFIXES)}, got {fmt!r}")
    model = model.eval()
    output = os.fspath(output)
    example = torch.zeros(2, 3, *input_size)  # batch 2: an example batch of 1 would be specialised to 1
    temporary = _temporary_beside(output)
    try:
        if fmt == "onnx":
            _export_onnx(model, example, temporary, metadata)
        else:
            _export_torchscript(model, example, temporary, metadata)
        exported = load_exported_model(temporary, threads=torch.get_num_threads())
        checks = compare_with_reference(exported, reference if reference is not None else model, input_size,
                                        batch_sizes)
        del exported
        failed = [c for c in checks if not c["ok"]]
        if failed:
            raise ExportedModelError(f"the exported {fmt} model disagrees with PyTorch beyond float tolerance "
                                     f"({describe_check(failed[0])}); nothing written to {output}")
        os.replace(temporary, output)
        return checks
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def describe_check(check: Dict) -> str:
    """One line of a :func:`compare_with_reference` result."""
    if "max_relative_diff" not in check:
        return f"batch {check['batch']}: output shape {check['shape']}, expected {check['expected_shape']}"
    return (f"batch {check['batch']}: max relative logit difference {check['max_relative_diff']:.2e} "
            f"(tolerance {RELATIVE_TOLERANCE:.0e}), argmax agreement {100 * check['argmax_agreement']:.3f} %")


def _export_onnx(model: nn.Module, example: torch.Tensor, path: str, metadata: Dict[str, str]) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; a clear message when absent)
    except ImportError:
        raise ExportedModelError(f"ONNX export needs onnx and onnxscript: {INSTALL_HINT}") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter; the self-check decides
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                    input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    program.model.metadata_props.update(metadata)
    program.save(path)


class _FixedSize(nn.Module):
    """Refuses inputs of another height and width than the traced one, inside the TorchScript file,
    so that a C++ caller gets the same one-line message as Python."""

    def __init__(self, network: nn.Module, height: int, width: int):
        super().__init__()
        self.network = network
        self.height = height
        self.width = width

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3 or image.shape[2] != self.height or image.shape[3] != self.width:
            raise RuntimeError("this exported model takes N x 3 x " + str(self.height) + " x " + str(self.width)
                               + " inputs, got " + str(list(image.shape)))
        return self.network(image)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: str, metadata: Dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # size branches baked in: the size is fixed
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated (docs/deployment.md)
        traced = torch.jit.trace(model, example, check_trace=False)
        scripted = torch.jit.script(_FixedSize(traced, int(example.shape[2]), int(example.shape[3])))
        torch.jit.save(scripted, path, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})


# ---------------------------------------------------------------------------------------------
# Reading


class ExportedModel(nn.Module):
    """An exported file behind the interface the sliding-window code calls: ``model(image) -> logits``
    for normalised ``(N, 3, H, W)`` input of the file's size (other sizes: ExportedModelError).

    Always float32 (autocast does not reach into the file). ``metadata`` is the file's, decoded.
    ONNX runs in onnxruntime on the CPU with as many threads as torch; TorchScript on ``device``.
    """

    def __init__(self, path, metadata: Dict, session=None, network: Optional[nn.Module] = None):
        super().__init__()
        self.path = str(path)
        self.metadata = metadata
        self.input_size: Tuple[int, int] = metadata["input_size"]
        self.format = "onnx" if session is not None else "torchscript"
        self._session = session
        self.network = network  # a TorchScript module (its parameters give the device); None for ONNX

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or tuple(image.shape[-2:]) != self.input_size:
            height, width = self.input_size
            raise ExportedModelError(f"{self.path} takes N x 3 x {height} x {width} inputs (exported at that size), "
                                     f"got {list(image.shape)}")
        if self._session is None:
            with torch.autocast(image.device.type, enabled=False):
                return self.network(image.float())
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self._session.run(["logits"], {"image": array})[0]
        return torch.from_numpy(logits).to(image.device)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def load_exported_model(path, device: torch.device = torch.device("cpu"), cfg=None,
                        threads: Optional[int] = None) -> ExportedModel:
    """The exported file at ``path`` as an eval-mode :class:`ExportedModel`; with ``cfg``, checked
    against its classes and window size (:func:`check_matches_config`). ``threads``: onnxruntime's
    intra-op threads (default: ``torch.get_num_threads()``, for a like-for-like comparison).

    Raises ExportedModelError (one line) for a missing, unreadable or foreign file."""
    path = os.fspath(path)
    fmt = format_of(path)
    if not os.path.isfile(path):
        raise ExportedModelError(f"exported model {path} does not exist")
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ExportedModelError(f"{path}: running ONNX files needs onnxruntime: {INSTALL_HINT}") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.log_severity_level = 3  # errors only: no warnings on stderr for every session
        try:
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for a bad file
            raise ExportedModelError(f"{path} is not a readable ONNX file ({_first_line(error)})") from None
        metadata = parse_metadata(dict(session.get_modelmeta().custom_metadata_map), path)
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names != (["image"], ["logits"]):
            raise ExportedModelError(f"{path} has inputs {names[0]} and outputs {names[1]}, expected image -> logits")
        model = ExportedModel(path, metadata, session=session)
    else:
        extra = {TORCHSCRIPT_METADATA: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated (docs/deployment.md)
                network = torch.jit.load(path, map_location=device, _extra_files=extra)
        except Exception as error:  # RuntimeError / zipfile errors for a bad archive
            raise ExportedModelError(f"{path} is not a readable TorchScript file ({_first_line(error)})") from None
        logging.getLogger(LOGGER_NAME).info(TORCHSCRIPT_TRUST_NOTE.format(path=path))
        try:
            raw = json.loads(extra[TORCHSCRIPT_METADATA] or "{}")
        except ValueError:
            raw = {}
        metadata = parse_metadata(raw, path)
        model = ExportedModel(path, metadata, network=network)
    if cfg is not None:
        check_matches_config(metadata, cfg, path)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Checking


@torch.inference_mode()
def compare_with_reference(exported: nn.Module, reference: nn.Module, input_size: Tuple[int, int],
                           batch_sizes: Sequence[int] = CHECK_BATCH_SIZES, seed: int = 0) -> List[Dict]:
    """Run ``exported`` and the PyTorch ``reference`` (eval mode) on the same random normalised
    inputs of each batch size; per batch size the max relative logit difference
    (max |a - b| / max |b|), the argmax agreement, and ``ok``.

    ``ok`` is False when the relative difference exceeds :data:`RELATIVE_TOLERANCE` or when an
    argmax differs at a pixel whose two best reference logits are further apart than that
    tolerance (closer ones may swap by float rounding alone)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(iter(reference.parameters())).device
    results = []
    for batch in batch_sizes:
        image = torch.randn(batch, 3, *input_size, generator=generator).to(device)
        expected = reference(image).float()
        got = exported(image).float().to(expected.device)
        if got.shape != expected.shape:
            results.append({"batch": batch, "ok": False, "shape": list(got.shape),
                            "expected_shape": list(expected.shape)})
            continue
        scale = expected.abs().max().clamp_min(1e-12)
        relative = ((got - expected).abs().max() / scale).item()
        differs = got.argmax(1) != expected.argmax(1)
        top2 = expected.topk(2, dim=1).values if expected.shape[1] > 1 else None
        clear = (top2[:, 0] - top2[:, 1]) > RELATIVE_TOLERANCE * scale if top2 is not None else differs
        results.append({"batch": batch, "max_relative_diff": relative,
                        "argmax_agreement": 1.0 - differs.double().mean().item(),
                        "ok": relative <= RELATIVE_TOLERANCE and not bool((differs & clear).any())})
    return results


__all__ = ["FORMAT_SUFFIXES", "ONNX_OPSET", "RELATIVE_TOLERANCE", "ExportedModel", "ExportedModelError",
           "check_matches_config", "compare_with_reference", "describe_check", "export_metadata", "export_model",
           "format_of", "is_exported_model", "load_exported_model", "parse_metadata"]
