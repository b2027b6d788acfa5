"""Multi-scale, flipped, sliding-window inference of the release's test script.

The arithmetic is the release's test script's:

* per scale ``s`` the image is resized so that its long side is
  ``round(s * base_size)`` (Python's round, i.e. half to even), the short side
  keeping the aspect ratio, bilinear (cv2 INTER_LINEAR == torch bilinear with
  ``align_corners=False`` and no antialiasing);
* the resized image is padded (centred; the extra pixel goes to the bottom /
  right) with the mean colour up to the crop size, and covered by crops on a
  grid with stride ``ceil(2/3 * crop)`` whose last window is clamped to end at
  the border;
* every crop and its horizontal flip go through the model; logits are
  upsampled to the crop (bilinear, ``align_corners=True``) if the model's
  output is smaller, soft-maxed, and the flip pair is averaged;
* probabilities are summed over windows, divided by the per-pixel window
  count, un-padded and resized (bilinear) to the original image size;
* the scales' probabilities are averaged and the argmax is the prediction.

What differs is only how it is computed (the same function up to float
rounding): the padded image lives on the model's device, all windows of a scale
are gathered and run ``batch_size`` windows (plus their flips) per forward,
probabilities are kept classes-innermost ((H, W, C) memory, the layout of a
channels_last model's output) and accumulated in float32 on the device instead
of one window at a time into a float64 host array, and
:func:`load_inference_model` folds BatchNorm into the convolutions.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.fold import fold_batchnorm
from util.config import register_keys
from util.engine.precision import autocast, autocast_dtype_for

SizeLike = Union[int, Sequence[int]]
# Upper bound on the float32 logits of one forward of sliding_window_probs (windows per forward are
# lowered to stay under it, never below one): the logits are the largest tensors of the job (a
# 473x473 window and its mirror at 150 classes: 256 MiB). On a 2-core CPU the sliding-window time is
# the same with 1, 2 or 3 such windows per forward, and the peak memory of a six-scale 2048x1536
# test is 4.5 GiB instead of 5.7 GiB with 3.
MAX_LOGITS_BYTES = 1 << 29
ImageLike = Union[np.ndarray, torch.Tensor]


def _pair(size: SizeLike) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def scaled_size(height: int, width: int, scale: float, base_size: Optional[int]) -> Tuple[int, int]:
    """(new_h, new_w) of an image resized for one test scale.

    The long side becomes ``round(scale * base_size)``; the short side is
    ``round(long / long_side_of_image * short_side)``, computed in that order
    as the release did. Python's ``round`` rounds halves to even, which the
    release relied on implicitly (``round(0.5 * 65) == 32``).

    ``base_size`` 0 or None means "each image at its own size": the long side
    is ``round(scale * max(height, width))``. (The release meant this but froze
    the size of the first image for all later ones.)
    """
    if not base_size:
        base_size = max(height, width)
    long_side = round(scale * base_size)
    if height > width:
        return long_side, round(long_side / float(height) * width)
    return round(long_side / float(width) * height), long_side


def window_starts(length: int, crop: int, stride: int) -> List[int]:
    """Start offsets of the sliding windows along one axis of a padded image.

    ``ceil((length - crop) / stride) + 1`` windows at ``i * stride``; each
    window is shifted back so that it ends inside the image (the last one ends
    exactly at the border). ``length`` must be >= ``crop`` (images are padded
    to the crop first). Example: ``window_starts(600, 473, 316) == [0, 127]``.
    """
    if length < crop:
        raise ValueError(f"length {length} is smaller than the crop {crop}; pad the image first")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    count = int(math.ceil((length - crop) / stride)) + 1
    starts = []
    for index in range(count):
        end = min(index * stride + crop, length)
        starts.append(end - crop)
    return starts


def window_stride(crop: int, stride_rate: float = 2.0 / 3.0) -> int:
    """The release's window stride: ``ceil(crop * stride_rate)`` (316 for 473)."""
    return int(math.ceil(crop * stride_rate))


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a parameter-free module."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def model_is_channels_last(model: nn.Module) -> bool:
    """True when the model's first 4-D weight is stored channels_last."""
    for tensor in model.parameters():
        if tensor.dim() == 4:
            return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
    return False


def image_to_tensor(image: ImageLike, device: Optional[torch.device] = None) -> torch.Tensor:
    """A float32 (3, H, W) tensor in 0..255 RGB from an HWC numpy array or a (3, H, W) tensor."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        tensor = image.float()
    else:
        raise TypeError(f"expected a numpy array or a torch tensor, got {type(image).__name__}")
    return tensor.to(device) if device is not None else tensor


def resize_bilinear(tensor: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (C, H, W) tensor, half-pixel centres, no antialiasing
    (what cv2.resize INTER_LINEAR computes); identity when the size is unchanged."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                         antialias=False).squeeze(0)


def _channel_column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device).view(-1, 1, 1)


def _window_probs(model: nn.Module, batch: torch.Tensor, flip: bool, autocast_dtype: Optional[torch.dtype],
                  channels_last: bool) -> Iterator[Tuple[torch.Tensor, ...]]:
    """One forward of N normalised (N, 3, h, w) crops (plus their mirrors when ``flip``); yields,
    crop by crop, its softmax probabilities and (with ``flip``) those of its mirror, mirrored
    back, as float32 **(h, w, C)**: classes innermost.

    Why classes innermost: a channels_last model already returns its logits in that memory order,
    so the softmax runs over contiguous class vectors without the full-size layout copy that a
    softmax over dim 1 of a channels_last tensor costs (on the CPU those passes were about 15 % of
    the whole sliding-window time). Why crop by crop: the float32 probabilities of a whole batch
    (16 crops of 473x473 with 150 classes are 2.1 GB) never exist at once, only the logits do.
    """
    crop_h, crop_w = batch.shape[-2:]
    count = batch.shape[0]
    inputs = torch.cat([batch, batch.flip(3)], 0) if flip else batch
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with autocast(inputs.device.type, autocast_dtype):
        logits = model(inputs)
    if isinstance(logits, (tuple, list)):
        raise TypeError("the model returned a tuple: put it in eval mode (model.eval()) before inference")
    del inputs

    def softmax_hwc(index: int) -> torch.Tensor:
        crop_logits = logits[index:index + 1].float()
        if tuple(crop_logits.shape[-2:]) != (crop_h, crop_w):
            crop_logits = F.interpolate(crop_logits, size=(crop_h, crop_w), mode="bilinear", align_corners=True)
        # A view for channels_last logits; softmax makes NCHW ones contiguous in this order itself.
        return torch.softmax(crop_logits[0].permute(1, 2, 0), dim=-1)

    for index in range(count):
        # The mirror's probabilities mirrored back (the width axis of (h, w, C) is dim 1); the
        # caller sums both and divides by 2 with the window count (the release's (a + b) / 2).
        yield (softmax_hwc(index), softmax_hwc(count + index).flip(1)) if flip else (softmax_hwc(index),)


@torch.inference_mode()
def sliding_window_probs(model: nn.Module, image: ImageLike, num_classes: int, crop_size: SizeLike,
                         mean: Sequence[float], std: Sequence[float], batch_size: int = 8, flip: bool = True,
                         autocast_dtype: Optional[torch.dtype] = None, stride_rate: float = 2.0 / 3.0,
                         channels_last: Optional[bool] = None) -> torch.Tensor:
    """Class probabilities of one (already scaled) image by sliding-window inference.

    Args:
        model: segmentation network in eval mode; ``model(x)`` for normalised
            (N, 3, crop_h, crop_w) input returns logits (N, num_classes, h, w).
        image: RGB float image in 0..255, HxWx3 numpy or (3, H, W) tensor.
        crop_size: window size (crop_h, crop_w) or an int.
        mean, std: per-channel normalisation in 0..255 units; the padding colour is ``mean``.
        batch_size: windows per forward; with ``flip`` each forward holds
            ``2 * batch_size`` images (a window and its mirror always together). Lowered
            when the forward's float32 logits would exceed ``MAX_LOGITS_BYTES`` (512 MiB: one
            473x473 window and its mirror at 150 classes), which bounds the peak memory.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the model under autocast;
            softmax and accumulation stay float32.
        channels_last: feed channels_last input; None = follow the model's weights.

    Returns:
        float32 tensor (num_classes, H, W) on the model's device: window-averaged
        (and flip-averaged) softmax probabilities of the image at its given size. Its memory is
        (H, W, num_classes) (channels_last strides; ``.contiguous()`` gives the usual layout).
    """
    if model.training:
        raise ValueError("model is in training mode: call model.eval() before inference")
    device = model_device(model)
    if channels_last is None:
        channels_last = model_is_channels_last(model)
    crop_h, crop_w = _pair(crop_size)
    logits_bytes_per_window = (2 if flip else 1) * num_classes * crop_h * crop_w * 4
    batch_size = max(1, min(int(batch_size), MAX_LOGITS_BYTES // logits_bytes_per_window))
    image = image_to_tensor(image, device)
    _, height, width = image.shape

    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    top, left = pad_h // 2, pad_w // 2
    padded_h, padded_w = height + pad_h, width + pad_w
    mean_column = _channel_column(mean, device)
    std_column = _channel_column(std, device)
    # Pad with the mean colour in 0..255 space, then normalise the whole image once
    # (elementwise, so identical to normalising each crop as the release did).
    padded = mean_column.expand(3, padded_h, padded_w).clone()
    padded[:, top:top + height, left:left + width] = image
    padded = (padded - mean_column) / std_column

    starts_h = window_starts(padded_h, crop_h, window_stride(crop_h, stride_rate))
    starts_w = window_starts(padded_w, crop_w, window_stride(crop_w, stride_rate))
    windows = [(y, x) for y in starts_h for x in starts_w]  # row-major, as the release visits them

    # (H, W, C) accumulator: the layout _window_probs yields, so every window adds contiguous rows.
    prob_sum = torch.zeros((padded_h, padded_w, num_classes), dtype=torch.float32, device=device)
    for first in range(0, len(windows), batch_size):
        chunk = windows[first:first + batch_size]
        batch = torch.stack([padded[:, y:y + crop_h, x:x + crop_w] for y, x in chunk])
        for (y, x), window_probs in zip(chunk, _window_probs(model, batch, flip, autocast_dtype, channels_last)):
            if window_probs[0].shape[-1] != num_classes:
                raise ValueError(f"model predicts {window_probs[0].shape[-1]} classes but num_classes is {num_classes}")
            for probs in window_probs:  # the window, and its mirror
                prob_sum[y:y + crop_h, x:x + crop_w] += probs

    # Windows form a grid, so the per-pixel window count is the outer product of the
    # per-row and per-column counts.
    count_h = torch.zeros(padded_h, dtype=torch.float32, device=device)
    count_w = torch.zeros(padded_w, dtype=torch.float32, device=device)
    for y in starts_h:
        count_h[y:y + crop_h] += 1
    for x in starts_w:
        count_w[x:x + crop_w] += 1
    # Each window added itself and its mirror: the flip average is this factor 2.
    passes = 2 if flip else 1
    prob_sum /= (count_h.view(-1, 1) * count_w.view(1, -1) * passes).unsqueeze(-1)
    # A (C, H, W) view of the (H, W, C) memory: channels_last strides, no copy.
    return prob_sum[top:top + height, left:left + width].permute(2, 0, 1)


@torch.inference_mode()
def multiscale_probs(model: nn.Module, image: ImageLike, num_classes: int, crop_size: SizeLike,
                     scales: Sequence[float], base_size: Optional[int], mean: Sequence[float],
                     std: Sequence[float], batch_size: int = 8, flip: bool = True,
                     autocast_dtype: Optional[torch.dtype] = None,
                     channels_last: Optional[bool] = None) -> torch.Tensor:
    """Scale-averaged class probabilities, float32 (num_classes, H, W) on the model's device,
    at the original image size. See :func:`sliding_window_probs` for the arguments;
    ``scales`` are multipliers of ``base_size`` (see :func:`scaled_size`)."""
    if not scales:
        raise ValueError("scales must not be empty")
    device = model_device(model)
    image = image_to_tensor(image, device)
    _, height, width = image.shape
    # (H, W, C) memory like the per-scale probabilities; the running sum is the only full-size
    # (C, H, W) float32 array alive (1.9 GB for 150 classes at 2048x1536).
    total = torch.zeros((height, width, num_classes), dtype=torch.float32, device=device).permute(2, 0, 1)
    for scale in scales:
        new_h, new_w = scaled_size(height, width, float(scale), base_size)
        scaled = resize_bilinear(image, (new_h, new_w))
        probs = sliding_window_probs(model, scaled, num_classes, crop_size, mean, std, batch_size, flip,
                                     autocast_dtype=autocast_dtype, channels_last=channels_last)
        del scaled
        _add_resized(total, probs)
        del probs
    return total.div_(len(scales))


def _add_resized(total: torch.Tensor, probs: torch.Tensor, max_temporary: int = 1 << 26) -> None:
    """``total += resize_bilinear(probs, total's size)``, a few classes at a time so that the
    resized temporary stays under ``max_temporary`` elements (256 MB) instead of a second
    full-size copy. Each class is resized independently, so the chunks change nothing."""
    classes, height, width = total.shape
    if tuple(probs.shape[-2:]) == (height, width):
        total += probs
        return
    step = max(1, min(classes, max_temporary // max(1, height * width)))
    for first in range(0, classes, step):
        total[first:first + step] += resize_bilinear(probs[first:first + step], (height, width))


@torch.inference_mode()
def predict_multiscale(model: nn.Module, image: ImageLike, num_classes: int, crop_size: SizeLike,
                       scales: Sequence[float], base_size: Optional[int], mean: Sequence[float],
                       std: Sequence[float], batch_size: int = 8, flip: bool = True,
                       autocast_dtype: Optional[torch.dtype] = None, return_probs: bool = False,
                       channels_last: Optional[bool] = None) -> torch.Tensor:
    """The release's test-time prediction of one image.

    Returns the int64 (H, W) argmax class map on the model's device, or the
    float32 (num_classes, H, W) scale-averaged probabilities when ``return_probs``.
    """
    probs = multiscale_probs(model, image, num_classes, crop_size, scales, base_size, mean, std, batch_size,
                             flip, autocast_dtype=autocast_dtype, channels_last=channels_last)
    return probs if return_probs else probs.argmax(0)


# ---------------------------------------------------------------- config glue shared by tool/test.py and tool/demo.py
# Also predict the horizontal mirror of every window (the release's behaviour); the other TEST keys are shared.
register_keys("TEST", {"flip": True})


def inference_kwargs(cfg, **overrides) -> dict:
    """Keyword arguments of :func:`predict_multiscale` from a config (TEST keys: ``scales``, ``flip``,
    ``base_size``, ``test_h``/``test_w``, ``test_batch_size``; ``classes``, ``precision``; mean/std from
    util.data.transforms). The training-time validation passes its own ``scales=cfg.val_scales,
    flip=cfg.val_flip``."""
    from util.data.transforms import MEAN, STD

    kwargs = dict(num_classes=int(cfg.classes), crop_size=(int(cfg.test_h), int(cfg.test_w)),
                  scales=[float(s) for s in cfg.scales], base_size=cfg.base_size, mean=list(MEAN), std=list(STD),
                  batch_size=int(cfg.test_batch_size), flip=bool(cfg.get("flip", True)),
                  autocast_dtype=autocast_dtype_for(cfg.get("precision")))
    kwargs.update(overrides)
    return kwargs


def load_inference_model(cfg, model_path, device: torch.device, fold_bn: bool = True) -> nn.Module:
    """``build_model(cfg)`` (no ImageNet file needed) with the full weights of ``model_path``
    loaded strictly (release checkpoints with ``module.`` keys work), then
    :func:`prepare_inference_model`: on ``device``, eval mode, BatchNorm folded into the
    convolutions (``fold_bn``), channels_last when ``cfg.channels_last``.

    The returned model is for inference only: with BatchNorm folded its state dict is no longer
    the checkpoint's layout, so load another checkpoint by calling this function again.

    An exported file (``.onnx``, ``.torchscript``: ``util.evaluation.deploy``) is loaded as a module that runs
    it, checked against the config's classes and window size; the sliding window calls it alike."""
    from model import build_model
    from util.evaluation.deploy import is_exported_model, load_exported_model
    from util.runtime.checkpoint_io import load_model_weights

    if is_exported_model(model_path):
        return load_exported_model(model_path, device, cfg)

    model = build_model(cfg)
    load_model_weights(model, model_path)
    return prepare_inference_model(model, device, channels_last=bool(cfg.get("channels_last")), fold_bn=fold_bn,
                                   compile=bool(cfg.get("compile")))


def prepare_inference_model(model: nn.Module, device: torch.device, channels_last: bool = True,
                            fold_bn: bool = True, compile: bool = False) -> nn.Module:
    """The fast inference form of ``model``: eval mode on ``device``, BatchNorm folded into the
    preceding convolutions (:func:`fold_batchnorm`, which returns a copy), weights channels_last
    (oneDNN's and cuDNN's fast layout). ``model`` itself is moved to ``device`` and left in eval mode.

    ``compile``: wrapped in ``torch.compile`` with inductor's freezing (weights become constants, so
    convolutions get prepacked weights and fused epilogues; inference only). The first forward of
    each batch size compiles (tens of seconds for a ResNet-50 network on a CPU): worth it for a long
    test, not for one image."""
    model = model.to(device).eval()
    if fold_bn:
        model = fold_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        # dynamic=False: the window batch takes two or three sizes (full and last chunk), each
        # compiled once with static shapes, which freezing needs for its weight prepacking.
        model = torch.compile(model, dynamic=False, options={"freezing": True})
    return model
