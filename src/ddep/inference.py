"""Evaluation-time inference: test scale, whole image, sliding window, Cityscapes halves, flip and multi-scale.

Reported segmentation numbers depend on how the prediction is made as much as on the model, so
these follow mmsegmentation's test protocol and the DDeP paper's. Each image is resized (keep
ratio) into the dataset's test scale, mmsegmentation's test ``Resize(scale=(long, short),
keep_ratio=True)``: (2048, 512) for ADE20K, (520, 520) for Pascal Context, (2048, 1024) for
Cityscapes, which leaves 1024x2048 as it is. It is predicted with ``whole``, ``slide`` (mmseg's
window grid) or ``cityscapes-halves`` (the paper's: each 1024x1024 half on its own), optionally
at TTA ``scales``, ratios of the test scale as mmseg 0.x's ``MultiScaleFlipAug`` ``img_ratios``
(the paper's (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) for ADE20K and Pascal Context), and mirrored.

Every function takes a ``model`` mapping normalised images B x 3 x H x W to logits B x K x H x W
(at the input's resolution) and returns softmax probabilities B x K x H x W at the image's
resolution. As in mmsegmentation, each pass's logits (windows averaged first) are resized back
to the original size, then softmaxed, and the passes' probabilities averaged. Gradients are off
inside; putting the model in eval mode is the caller's job.

The image arrives normalised at its original size; resizing it bilinearly equals resizing the
uint8 image and then normalising, up to rounding. Zero padding (right and bottom) is used wherever
a model needs a bigger or better-divisible input than it gets (TransUNet takes only sides that
are multiples of 16): the input is normalised, so zero is the dataset's mean colour, as in
mmsegmentation's data preprocessor. The padded part of the output is cropped away before use.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .choices import check_choice
from .data.transforms import rescale_size

__all__ = [
    "MODES",
    "TTA_SCALES",
    "describe_mode",
    "predict",
    "predict_cityscapes_halves",
    "predict_slide",
    "predict_tta",
    "predict_whole",
    "slide_windows",
]

MODES = ("whole", "slide", "cityscapes-halves")
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the paper's ADE20K / Pascal Context scales


# --------------------------------------------------------------------------- checks and helpers

def _pair(name: str, value: int | Sequence[int] | None) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair of positive ints, with a clear error otherwise."""
    if value is None:
        raise ValueError(f"{name} is required for slide inference")
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair (h, w) of positive ints; got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise ValueError(f"{name} must be an int or a pair (h, w) of positive ints; got {value!r}")
    return h, w


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a float tensor B x C x H x W; got {shape}")


def _check_size_divisor(size_divisor: int | None) -> None:
    if size_divisor is not None and (
        not isinstance(size_divisor, int) or isinstance(size_divisor, bool) or size_divisor < 1
    ):
        raise ValueError(f"size_divisor must be a positive int or None; got {size_divisor!r}")


def _check_slide(
    crop_size: int | Sequence[int] | None, stride: int | Sequence[int] | None, size_divisor: int | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Slide mode's window settings as pairs. A stride larger than the crop would leave gaps, and
    windows are padded to ``crop_size``, so it must be divisible by ``size_divisor``."""
    crop, stride = _pair("crop_size", crop_size), _pair("stride", stride)
    if stride[0] > crop[0] or stride[1] > crop[1]:
        raise ValueError(f"stride {stride} larger than crop_size {crop} would leave gaps")
    if size_divisor is not None and (crop[0] % size_divisor or crop[1] % size_divisor):
        raise ValueError(f"crop_size {crop} must be divisible by size_divisor {size_divisor}")
    return crop, stride


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a sequence of positive numbers; got {scales!r}") from None
    if not scales or not all(s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers; got {scales!r}")
    return scales


def _check_test_scale(test_scale: Sequence[int] | None) -> tuple[int, int] | None:
    """``(long, short)`` from a pair of positive ints in either order (mmcv's rule is order-free)."""
    if test_scale is None:
        return None
    try:
        a, b = test_scale  # type: ignore[misc]
        valid = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (a, b))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"test_scale must be None or a pair (long, short) of positive ints; got {test_scale!r}")
    return max(a, b), min(a, b)


def _logits(model: nn.Module, x: torch.Tensor, pad_to: tuple[int, int] | None = None) -> torch.Tensor:
    """Float logits for ``x``, zero-padding it to at least ``pad_to`` first and cropping back."""
    h, w = x.shape[-2:]
    if pad_to is not None and (pad_to[0] > h or pad_to[1] > w):
        x = F.pad(x, (0, max(pad_to[1] - w, 0), 0, max(pad_to[0] - h, 0)))
    logits = model(x)
    if (
        not isinstance(logits, torch.Tensor)
        or logits.dim() != 4
        or logits.shape[0] != x.shape[0]
        or logits.shape[-2:] != x.shape[-2:]
    ):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"the model must return logits B x K x H x W at its input's resolution; "
            f"got {shape} for an input of shape {tuple(x.shape)}"
        )
    return logits[..., :h, :w].float()


def _divisible(size: tuple[int, int], size_divisor: int | None) -> tuple[int, int] | None:
    """The size rounded up to multiples of ``size_divisor`` (None when no padding is needed)."""
    if size_divisor is None:
        return None
    return tuple(-(-s // size_divisor) * size_divisor for s in size)  # type: ignore[return-value]


def _window_logits(
    model: nn.Module, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int], size_divisor: int | None
) -> torch.Tensor:
    """Logits of ``x`` from windows on mmsegmentation's grid, averaged where they overlap.

    Each window is zero-padded to ``crop`` (rounded up to ``size_divisor``), so a model that needs
    fixed or divisible sizes takes any image. One window (the image fits the crop) is one pass on
    the whole image; sums live on the image's device.
    """
    height, width = x.shape[-2:]
    pad_to = _divisible(crop, size_divisor) or crop
    windows = slide_windows(height, width, crop, stride)
    if len(windows) == 1:
        return _logits(model, x, pad_to)
    logits: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=x.device)
    for y1, y2, x1, x2 in windows:
        window = _logits(model, x[:, :, y1:y2, x1:x2], pad_to)
        if logits is None:
            logits = window.new_zeros(x.shape[0], window.shape[1], height, width)
        logits[:, :, y1:y2, x1:x2] += window
        count[:, :, y1:y2, x1:x2] += 1
    assert logits is not None  # the grid always has a window, and (stride <= crop) covers every pixel
    return logits / count


def _mode_logits(
    model: nn.Module,
    x: torch.Tensor,
    mode: str,
    crop_size: tuple[int, int] | None,
    stride: tuple[int, int] | None,
    size_divisor: int | None,
) -> torch.Tensor:
    """One pass's logits at ``x``'s size: ``whole`` is one window of the image's size and
    ``cityscapes-halves`` two side by side (overlapping by a column if the width is odd)."""
    height, width = x.shape[-2:]
    if mode == "whole":
        crop_size = stride = (height, width)
    elif mode == "cityscapes-halves":
        crop_size = stride = (height, -(-width // 2))
    return _window_logits(model, x, crop_size, stride, size_divisor)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- single-pass modes

@torch.no_grad()
def predict_whole(model: nn.Module, image: torch.Tensor, size_divisor: int | None = None) -> torch.Tensor:
    """One forward pass on the whole image as it is; softmax probabilities B x K x H x W.

    ``size_divisor`` (e.g. 16 for TransUNet) zero-pads the image up to multiples of it and crops
    the output back, so that any image size works.
    """
    _check_image(image)
    _check_size_divisor(size_divisor)
    return _mode_logits(model, image, "whole", None, None, size_divisor).softmax(dim=1)


def slide_windows(
    height: int, width: int, crop_size: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """The ``(y1, y2, x1, x2)`` windows of mmsegmentation's ``slide_inference``, row by row.

    ``ceil((H - h_crop) / h_stride) + 1`` rows of windows (one when the image is smaller than the
    crop), starting every ``stride`` pixels; the last row and column are shifted back to end at
    the image's edge, so every window is a full crop unless the image is smaller than the crop.
    """
    (h_crop, w_crop), (h_stride, w_stride) = _check_slide(crop_size, stride, None)
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


@torch.no_grad()
def predict_slide(
    model: nn.Module,
    image: torch.Tensor,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int],
) -> torch.Tensor:
    """Sliding-window inference on mmsegmentation's window grid; probabilities B x K x H x W.

    As in mmsegmentation, each window's logits are added where they lie and divided by the number
    of windows covering each pixel, and the softmax is taken of that average. A window smaller
    than ``crop_size`` (only when the image itself is smaller) is zero-padded to the crop size.
    """
    _check_image(image)
    crop, stride = _check_slide(crop_size, stride, None)
    return _window_logits(model, image, crop, stride, None).softmax(dim=1)


# --------------------------------------------------------------------------- test scale and augmentation

def _settings(
    mode: str,
    scales: Sequence[float],
    flip: bool,
    crop_size: int | Sequence[int] | None,
    stride: int | Sequence[int] | None,
    size_divisor: int | None,
    test_scale: Sequence[int] | None,
) -> dict[str, Any]:
    """The validated inference settings; ``crop_size`` and ``stride`` kept only in ``slide`` mode."""
    check_choice("inference mode", mode, MODES)
    scales = _check_scales(scales)
    _check_size_divisor(size_divisor)
    test_scale = _check_test_scale(test_scale)
    if mode == "slide":
        crop_size, stride = _check_slide(crop_size, stride, size_divisor)
    else:
        crop_size = stride = None  # unused outside slide mode, so not recorded as if they were
    return {"mode": mode, "test_scale": test_scale, "scales": scales, "flip": bool(flip),
            "crop_size": crop_size, "stride": stride, "size_divisor": size_divisor}


@torch.no_grad()
def predict_tta(
    model: nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] = TTA_SCALES,
    flip: bool = True,
    mode: str = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    size_divisor: int | None = None,
    test_scale: Sequence[int] | None = None,
) -> torch.Tensor:
    """Test scale, multi-scale and flip inference; the mean of every pass's probabilities.

    For each ratio ``s`` in ``scales`` the image is resized (bilinear, ``align_corners=False``)
    to fit the (long, short) box ``test_scale`` times ``s`` (the image's own size when
    ``test_scale`` is None) by mmcv's rule (:func:`~ddep.data.transforms.rescale_size`),
    predicted with ``mode``, and also mirrored left-right when ``flip`` (the output mirrored
    back). Each pass's logits are resized back to H x W (bilinear), softmaxed, and the passes
    averaged. ``size_divisor`` pads whole images and halves (see :func:`predict_whole`); in
    ``slide`` mode windows are padded to ``crop_size``, which must then be divisible by it.
    ``cityscapes-halves`` needs an even image width.
    """
    _check_image(image)
    settings = _settings(mode, scales, flip, crop_size, stride, size_divisor, test_scale)
    height, width = image.shape[-2:]
    if mode == "cityscapes-halves" and width % 2:
        raise ValueError(f"cityscapes-halves inference needs an even image width; got {width}")
    total: torch.Tensor | None = None
    passes = 0
    for scale in settings["scales"]:
        size = rescale_size(height, width, settings["test_scale"], scale)
        x = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            logits = _mode_logits(
                model, x.flip(-1) if mirrored else x, mode, settings["crop_size"], settings["stride"], size_divisor
            )
            if mirrored:
                logits = logits.flip(-1)
            if size != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            total = probs if total is None else total.add_(probs)
            passes += 1
    assert total is not None
    return total.div_(passes)


@torch.no_grad()
def predict_cityscapes_halves(
    model: nn.Module,
    image: torch.Tensor,
    flip: bool = True,
    scales: Sequence[float] = (1.0,),
    size_divisor: int | None = None,
    test_scale: Sequence[int] | None = None,
) -> torch.Tensor:
    """The DDeP paper's Cityscapes protocol: predict the left and right halves separately.

    A 1024x2048 image becomes two 1024x1024 inputs (the fine-tuning crop size), each predicted
    whole; the halves' logits are put side by side, and flip, ``scales`` and ``test_scale`` act
    on the whole image as in :func:`predict_tta` (mirroring the image mirrors each half). The
    width must be even.
    """
    return predict_tta(model, image, scales, flip, "cityscapes-halves", None, None, size_divisor, test_scale)


# --------------------------------------------------------------------------- entry point

def describe_mode(
    mode: str = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    size_divisor: int | None = None,
    test_scale: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A JSON-serialisable record of the inference mode, for results files (validated as predict would).

    ``crop_size`` and ``stride`` are recorded only in ``slide`` mode, the one that uses them;
    ``test_scale`` as ``[long, short]`` (or None: the original size).
    """
    settings = _settings(mode, scales, flip, crop_size, stride, size_divisor, test_scale)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}


def eval_for_model(eval_config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The eval settings with ``size_divisor`` defaulting to the multiple the model's input needs
    (an smp model's output stride, say): images are padded up to it after normalisation."""
    divisor = getattr(model, "input_divisor", 1)
    if eval_config.get("size_divisor") is None and divisor > 1:
        return {**eval_config, "size_divisor": divisor}
    return eval_config


@torch.no_grad()
def predict(
    model: nn.Module,
    image: torch.Tensor,
    mode: str = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    size_divisor: int | None = None,
    test_scale: Sequence[int] | None = None,
) -> torch.Tensor:
    """Probabilities B x K x H x W (the image's size) with the named mode: ``whole``, ``slide`` or
    ``cityscapes-halves``, at ``test_scale`` and the TTA ``scales`` and ``flip`` of :func:`predict_tta`.

    It takes the eval config as keyword arguments; ``describe_mode`` with the same arguments
    records what was done.
    """
    return predict_tta(model, image, scales, flip, mode, crop_size, stride, size_divisor, test_scale)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode with cuDNN's kernel timing off (evaluation images and scales vary:
    timing kernels for every shape would cost more than it saves), both as they were after."""
    was_training, timing_kernels = model.training, torch.backends.cudnn.benchmark
    model.eval()
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        model.train(was_training)
        torch.backends.cudnn.benchmark = timing_kernels
