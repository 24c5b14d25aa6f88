"""Joint image/mask transforms.

A sample is a dict: ``image`` (a PIL RGB image until :class:`ToTensor`, then a float tensor
3 x H x W in [0, 1], normalised by :class:`Normalize`) and, for labeled data, ``mask`` (a PIL
``L``/``I`` image, then an int64 tensor H x W with ignore = 255). Other keys pass through.
Geometric transforms move image and mask together (bilinear for the image, nearest for the mask);
randomness comes from torch's global RNG, which DataLoader seeds per worker.

The fine-tuning pipeline is mmsegmentation's: random resize, a random crop of at most the crop
size (optionally avoiding crops dominated by one class), flip, photometric distortion, then
normalisation and padding to the crop size, so padding is 0 in normalised units (the mean
colour) as mmsegmentation's data preprocessor pads, never black.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IGNORE_INDEX = 255
#: The paper's crop sizes (square): fine-tuning per dataset, and denoising pretraining.
CROP_PRESETS = {"cityscapes": 1024, "ade20k": 512, "pascal_context": 512, "pretrain": 224}

Sample = dict
Transform = Callable[[Sample], Sample]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _chance() -> bool:
    """A fair coin from torch's RNG (mmseg's ``random.randint(2)``)."""
    return bool(torch.randint(2, ()).item())


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` from an int (square) or a pair."""
    h, w = (size, size) if isinstance(size, int) else size
    return int(h), int(w)


def rescale_size(height: int, width: int, scale: Sequence[int] | None = None, ratio: float = 1.0) -> tuple[int, int]:
    """The ``(h, w)`` an image takes when fitted, keeping its ratio, inside the (long, short) box
    ``scale`` times ``ratio``, by mmcv's rules: the box is ``(int(long * ratio), int(short * ratio))``
    (mmcv's ``RandomResize``, mmseg 0.x ``MultiScaleFlipAug``), the factor
    ``min(long / max(h, w), short / min(h, w))`` and each side ``int(side * factor + 0.5)``
    (``mmcv.rescale_size``). Without ``scale`` the box is the image's own size.
    """
    if scale is None:
        scale = (max(height, width), min(height, width))
    long, short = int(max(scale) * ratio), int(min(scale) * ratio)
    factor = min(long / max(height, width), short / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomResize:
    """Rescale by a ratio drawn from ``ratio_range``, keeping the aspect ratio.

    With ``scale=(long, short)`` the image is fitted inside that box times the ratio
    (mmsegmentation's ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``),
    otherwise the ratio applies to the original size; sizes follow :func:`rescale_size`.
    """

    def __init__(self, ratio_range: tuple[float, float] = (0.5, 2.0), scale: tuple[int, int] | None = None) -> None:
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high; got {ratio_range}")
        self.ratio_range, self.scale = ratio_range, scale

    def __call__(self, sample: Sample) -> Sample:
        w, h = sample["image"].size
        new_h, new_w = rescale_size(h, w, self.scale, _uniform(*self.ratio_range))
        return _resize(sample, (new_w, new_h))


def _resize(sample: Sample, size: tuple[int, int]) -> Sample:
    out = dict(sample, image=sample["image"].resize(size, Image.BILINEAR))
    if "mask" in sample:
        out["mask"] = sample["mask"].resize(size, Image.NEAREST)
    return out


class RandomCrop:
    """A random crop of at most ``size`` (h, w): a smaller side is kept whole, and :class:`Pad`
    fills the rest after normalisation.

    With ``cat_max_ratio < 1`` (mmsegmentation's ``RandomCrop(crop_size, cat_max_ratio=0.75)``) a
    crop is redrawn, up to 10 times, unless its labeled pixels (ignore 255 aside) hold more than
    one class and the largest covers less than ``cat_max_ratio`` of them; the last draw is kept
    unchecked. 1.0 takes the first crop.
    """

    def __init__(self, size: int | tuple[int, int], cat_max_ratio: float = 1.0) -> None:
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1] (1.0: off); got {cat_max_ratio}")
        self.size, self.cat_max_ratio = _size_pair(size), cat_max_ratio

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """One random ``(left, top, right, bottom)``: top offset drawn first, as mmseg does."""
        ch, cw = self.size
        top = int(torch.randint(max(height - ch, 0) + 1, ()).item())
        left = int(torch.randint(max(width - cw, 0) + 1, ()).item())
        return left, top, min(left + cw, width), min(top + ch, height)

    def balanced(self, labels: np.ndarray, box: tuple[int, int, int, int]) -> bool:
        """Whether the crop passes the ``cat_max_ratio`` rule."""
        left, top, right, bottom = box
        classes, counts = np.unique(labels[top:bottom, left:right], return_counts=True)
        counts = counts[classes != IGNORE_INDEX]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(self, sample: Sample) -> Sample:
        w, h = sample["image"].size
        box = self.box(w, h)
        if self.cat_max_ratio < 1 and "mask" in sample:
            labels = np.asarray(sample["mask"])
            for _ in range(10):
                if self.balanced(labels, box):
                    break
                box = self.box(w, h)
        out = dict(sample, image=sample["image"].crop(box))
        if "mask" in sample:
            out["mask"] = sample["mask"].crop(box)
        return out


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        if torch.rand(()).item() >= self.p:
            return sample
        image = sample["image"]
        out = dict(sample, image=image.flip(-1) if isinstance(image, torch.Tensor) else image.transpose(Image.FLIP_LEFT_RIGHT))
        if "mask" in sample:
            out["mask"] = sample["mask"].transpose(Image.FLIP_LEFT_RIGHT)
        return out


# RGB order of the four values OpenCV's HSV -> RGB picks from, per hue sector (its sector_data, BGR).
_HSV_SECTORS = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB H x W x 3 -> uint8 HSV with H in [0, 180), as OpenCV's 8-bit ``RGB2HSV``
    (12-bit fixed-point tables), which mmsegmentation's ``PhotoMetricDistortion`` uses via mmcv."""
    rgb = image.long()
    r, g, b = rgb.unbind(-1)
    v = rgb.amax(-1)
    diff = v - rgb.amin(-1)
    s_div = torch.where(v > 0, ((255 << 12) / v.clamp(min=1).double()).round().long(), 0)
    h_div = torch.where(diff > 0, ((180 << 12) / (6 * diff.clamp(min=1)).double()).round().long(), 0)
    s = (diff * s_div + (1 << 11)) >> 12
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = torch.div(h * h_div + (1 << 11), 1 << 12, rounding_mode="floor")
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v], -1).to(torch.uint8)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """uint8 HSV (H in [0, 180)) -> uint8 RGB, as OpenCV's vectorised 8-bit ``HSV2RGB``: float32,
    ``1 - s * h`` fused (FMA), truncated (its scalar tail, the last few pixels of a row, rounds)."""
    h, s, v = hsv.float().unbind(-1)
    h, s, v = h * (6.0 / 180.0), s * (1.0 / 255.0), v * (1.0 / 255.0)
    sector = h.floor()
    f = h - sector
    s64 = s.double()  # float32 products are exact in float64: 1 - s * h then rounds once, as an FMA
    values = torch.stack([v, v * (1 - s), v * (1 - s64 * f).float(), v * (1 - s64 * (1 - f)).float()], -1)
    rgb = values.gather(-1, _HSV_SECTORS[sector.long() % 6])
    return (rgb * 255).clamp(0, 255).to(torch.uint8)


class PhotoMetricDistortion:
    """mmsegmentation's ``PhotoMetricDistortion`` on the image only (uint8, clipped after each step).

    Each step fires with probability 0.5: brightness (add U(-32, 32)), contrast (times
    U(0.5, 1.5)) either second or last (a coin decides), saturation (S times U(0.5, 1.5)) and hue
    (H + randint(-18, 18), high exclusive as numpy's, mod 180), each colour step through its own
    HSV round trip. Values are truncated to uint8 after clipping, as mmseg's ``astype(np.uint8)``.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        self.brightness_delta, self.contrast_range = brightness_delta, contrast_range
        self.saturation_range, self.hue_delta = saturation_range, hue_delta

    @staticmethod
    def convert(image: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
        """``image * alpha + beta`` in float32, clipped to [0, 255], truncated to uint8."""
        return (image.float() * alpha + beta).clamp_(0, 255).to(torch.uint8)

    @staticmethod
    def brightness(image: torch.Tensor, delta: float) -> torch.Tensor:
        return PhotoMetricDistortion.convert(image, beta=delta)

    @staticmethod
    def contrast(image: torch.Tensor, alpha: float) -> torch.Tensor:
        return PhotoMetricDistortion.convert(image, alpha=alpha)

    @staticmethod
    def saturation(image: torch.Tensor, alpha: float) -> torch.Tensor:
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = PhotoMetricDistortion.convert(hsv[..., 1], alpha=alpha)
        return hsv_to_rgb(hsv)

    @staticmethod
    def hue(image: torch.Tensor, delta: int) -> torch.Tensor:
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].long() + delta) % 180
        return hsv_to_rgb(hsv)

    def __call__(self, sample: Sample) -> Sample:
        image = torch.from_numpy(np.asarray(sample["image"], dtype=np.uint8).copy())
        if _chance():
            image = self.brightness(image, _uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = _chance()  # mmseg's mode == 1
        if contrast_first and _chance():
            image = self.contrast(image, _uniform(*self.contrast_range))
        if _chance():
            image = self.saturation(image, _uniform(*self.saturation_range))
        if _chance():
            image = self.hue(image, int(torch.randint(-self.hue_delta, self.hue_delta, ()).item()))
        if not contrast_first and _chance():
            image = self.contrast(image, _uniform(*self.contrast_range))
        return dict(sample, image=Image.fromarray(image.numpy()))


class ToTensor:
    """PIL image (or uint8 3 x H x W tensor, on any device) -> float32 3 x H x W in [0, 1]; mask -> int64 H x W."""

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"]
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        out = dict(sample, image=image.float().div_(255))
        if "mask" in sample:
            out["mask"] = torch.from_numpy(np.asarray(sample["mask"]).astype(np.int64))
        return out


class Normalize:
    """(image - mean) / std per channel, with the model's ``mean`` and ``std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, sample: Sample) -> Sample:
        return dict(sample, image=(sample["image"] - self.mean) / self.std)


class Pad:
    """Pad the normalised tensors at the bottom and right up to ``size`` (h, w): the image with 0
    (the mean colour), the mask with 255, as mmsegmentation's data preprocessor (``stack_batch``)."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = _size_pair(size)

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample["image"].shape[-2:]
        padding = (0, max(self.size[1] - w, 0), 0, max(self.size[0] - h, 0))
        if not any(padding):
            return sample
        out = dict(sample, image=F.pad(sample["image"], padding, value=0.0))
        if "mask" in sample:
            out["mask"] = F.pad(sample["mask"], padding, value=IGNORE_INDEX)
        return out


class RandomResizedCrop:
    """Image-only random crop of ``scale`` of the area, resized to ``size`` (pretraining views);
    of a PIL image or of a uint8 tensor on any device, with the same random draws for both."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.25, 1.0)) -> None:
        from torchvision.transforms import RandomResizedCrop as _RandomResizedCrop

        self.crop = _RandomResizedCrop(size, scale=scale, antialias=True)

    def __call__(self, sample: Sample) -> Sample:
        if "mask" in sample:
            raise ValueError("RandomResizedCrop is for unlabeled images; use RandomResize + RandomCrop with masks")
        return dict(sample, image=self.crop(sample["image"]))


def train_transforms(
    crop_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    ratio_range: tuple[float, float] = (0.5, 2.0),
    scale: tuple[int, int] | None = None,
    cat_max_ratio: float = 1.0,
    photometric: bool = False,
) -> Compose:
    """Fine-tuning, in mmsegmentation's train-pipeline order: random resize, random crop
    (``cat_max_ratio``; 1.0 is off, mmseg's default), flip, optional photometric distortion,
    normalise, then pad to ``crop_size`` (image 0, mask 255).

    ``crop_size`` may be a preset name's value, e.g. ``CROP_PRESETS["cityscapes"]`` (1024).
    """
    steps: list[Transform] = [
        RandomResize(ratio_range, scale), RandomCrop(crop_size, cat_max_ratio), RandomHorizontalFlip(),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    return Compose([*steps, ToTensor(), Normalize(mean, std), Pad(crop_size)])


def eval_transforms(mean: Sequence[float], std: Sequence[float]) -> Compose:
    """Evaluation: the original size, normalised (test scale, sliding windows and TTA come at inference)."""
    return Compose([ToTensor(), Normalize(mean, std)])


def pretrain_transforms(crop_size: int = CROP_PRESETS["pretrain"], scale: tuple[float, float] = (0.25, 1.0)) -> Compose:
    """Denoising pretraining: a random resized crop and a flip, left in [0, 1] and unnormalised,
    since noise is added in [-1, 1] before the model's normalisation. It takes PIL images, or
    uint8 tensors decoded on the GPU (``data.decode: gpu``), with the same random draws."""
    return Compose([RandomResizedCrop(crop_size, scale), RandomHorizontalFlip(), ToTensor()])
