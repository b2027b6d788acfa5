"""BatchNorm folding: a model transformation for inference (used by util.evaluation.inference and the exporter).

With running statistics a ``BatchNorm2d`` is a per-channel affine map, so a convolution followed by
one can be replaced by a single convolution with rescaled weights and a bias.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Iterator

import torch
from torch import nn

from .pyconv import PyConv


@torch.no_grad()
def fold_batchnorm(model: nn.Module, probe_size: int = 33) -> nn.Module:
    """A copy of the eval-mode ``model`` in which every ``BatchNorm2d`` that directly consumes
    the output of a convolution is folded into it and replaced by ``nn.Identity``.

    Inference only: with running statistics BN is the per-channel affine map
    ``y = (x - mean) * g / sqrt(var + eps) + b``, so ``bn(conv(x))`` equals a convolution with
    weights ``w * s`` and bias ``(bias - mean) * s + b`` (``s = g / sqrt(var + eps)``, computed in
    float64). That saves one full pass over every activation (5-8 % of a CPU forward). A
    :class:`model.pyconv.PyConv` (levels concatenated along channels) folds level by level.

    Which BN follows which convolution is read from one small probe forward (the BN's input
    tensor is the convolution's output object), and the folded copy is checked against the
    original on that probe, in float32 with TF32 off (:func:`exact_float32`: TF32 convolutions
    differ by more than the check's 1e-3 on their own); if they differ (a model whose conv output
    also feeds something else), the unfolded copy is returned with a warning. The outcome is
    logged (logger ``pyconvsegnet``).
    """
    was_training = model.training
    original = model.eval()
    folded = copy.deepcopy(original)
    producers = {}
    pairs = []

    def remember_output(module, inputs, output):
        producers[id(output)] = (output, module)

    def match_input(module, inputs):
        record = producers.get(id(inputs[0]))
        if record is not None and record[0] is inputs[0]:
            pairs.append((record[1], module))

    handles = [m.register_forward_hook(remember_output) for m in folded.modules()
               if isinstance(m, (nn.Conv2d, PyConv))]
    handles += [m.register_forward_pre_hook(match_input) for m in folded.modules()
                if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None]
    # 33 = 4 * 8 + 1: a size the segmentation models accept, small enough to cost nothing.
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, probe_size, probe_size, generator=generator).to(next(folded.parameters()).device)
    logger = logging.getLogger("pyconvsegnet")
    try:
        with exact_float32():
            expected = folded(probe)
    except Exception as error:  # a model that cannot take the probe: nothing is folded
        warnings.warn(f"fold_batchnorm: probe forward failed ({error}); BatchNorm is not folded")
        logger.warning(f"BatchNorm NOT folded: the probe forward failed ({error})")
        pairs.clear()
    finally:
        for handle in handles:
            handle.remove()
    producers.clear()
    if pairs and not torch.isfinite(expected).all():
        # Nothing to compare against; and a model whose output is NaN/inf on a plain random input has
        # broken weights (e.g. a diverged run's checkpoint): say so rather than "did not reproduce".
        warnings.warn("fold_batchnorm: the model's own output on a random probe is not finite (broken weights?); "
                      "BatchNorm is not folded")
        logger.warning("BatchNorm NOT folded: the model's own output on a random probe is not finite (NaN/inf): "
                       "are its weights broken, e.g. a diverged run's checkpoint?")
        pairs.clear()
    if not pairs:  # (folded is still an unchanged copy)
        model.train(was_training)
        return folded

    parents = {}
    for parent in folded.modules():
        for name, child in parent.named_children():
            parents[id(child)] = (parent, name)
    for conv, bn in pairs:
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps) if bn.affine else \
            1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = -bn.running_mean.double() * scale + (bn.bias.double() if bn.affine else 0.0)
        levels = list(conv.children()) if isinstance(conv, PyConv) else [conv]
        start = 0
        for level in levels:
            stop = start + level.out_channels
            level_scale, level_shift = scale[start:stop], shift[start:stop]
            weight = level.weight.double() * level_scale.view(-1, 1, 1, 1)
            bias = level_shift if level.bias is None else level.bias.double() * level_scale + level_shift
            level.weight.copy_(weight.to(level.weight.dtype))
            level.bias = nn.Parameter(bias.to(level.weight.dtype), requires_grad=level.weight.requires_grad)
            start = stop
        parent, name = parents[id(bn)]
        setattr(parent, name, nn.Identity())

    with exact_float32():
        got = folded(probe)
    model.train(was_training)
    tolerance = 1e-3 * max(1.0, expected.abs().max().item())
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=tolerance):
        warnings.warn("fold_batchnorm: the folded model does not reproduce the original; using the unfolded one")
        logger.warning("BatchNorm NOT folded: the folded model did not reproduce the original (float32 check); "
                       "inference runs the unfolded model")
        return copy.deepcopy(original)
    logger.info(f"BatchNorm folded into {len(pairs)} convolutions (checked in float32 with TF32 off: "
                f"max difference {(got - expected).abs().max().item():.2e})")
    return folded


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for CUDA convolutions and matmuls inside the block (no effect on the CPU), restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
