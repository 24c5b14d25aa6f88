"""Joint image/mask transforms.

A sample is a dict: ``image`` (a PIL RGB image until :class:`ToTensor`, then a float tensor
3 x H x W in [0, 1]) and, for labeled data, ``mask`` (a PIL ``L``/``I`` image, then an int64
tensor H x W with ignore = 255). Other keys pass through. Geometric transforms move image and
mask together (bilinear for the image, nearest for the mask); randomness comes from torch's
global RNG, which DataLoader seeds per worker.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import ColorJitter as _ColorJitter

IGNORE_INDEX = 255
#: The paper's crop sizes (square): fine-tuning per dataset, and denoising pretraining.
CROP_PRESETS = {"cityscapes": 1024, "ade20k": 512, "pascal_context": 512, "pretrain": 224}

Sample = dict
Transform = Callable[[Sample], Sample]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


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

    With ``scale=(long, short)`` the image is first fitted inside that box (mmsegmentation's
    ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``), otherwise the
    ratio applies to the original size.
    """

    def __init__(self, ratio_range: tuple[float, float] = (0.5, 2.0), scale: tuple[int, int] | None = None) -> None:
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high; got {ratio_range}")
        self.ratio_range, self.scale = ratio_range, scale

    def __call__(self, sample: Sample) -> Sample:
        w, h = sample["image"].size
        factor = _uniform(*self.ratio_range)
        if self.scale is not None:
            factor *= min(max(self.scale) / max(w, h), min(self.scale) / min(w, h))
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        return _resize(sample, size)


def _resize(sample: Sample, size: tuple[int, int]) -> Sample:
    out = dict(sample, image=sample["image"].resize(size, Image.BILINEAR))
    if "mask" in sample:
        out["mask"] = sample["mask"].resize(size, Image.NEAREST)
    return out


class RandomCrop:
    """A random ``size`` crop; smaller inputs are padded (image with 0, mask with 255)."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)

    def __call__(self, sample: Sample) -> Sample:
        ch, cw = self.size
        w, h = sample["image"].size
        top = int(torch.randint(max(h - ch, 0) + 1, ()).item())
        left = int(torch.randint(max(w - cw, 0) + 1, ()).item())
        box = (left, top, left + cw, top + ch)  # PIL pads outside the image with the fill below
        out = dict(sample, image=_crop(sample["image"], box, 0))
        if "mask" in sample:
            out["mask"] = _crop(sample["mask"], box, IGNORE_INDEX)
        return out


def _crop(image: Image.Image, box: tuple[int, int, int, int], fill: int) -> Image.Image:
    left, top, right, bottom = box
    if right <= image.width and bottom <= image.height:
        return image.crop(box)
    canvas = Image.new(image.mode, (right - left, bottom - top), fill)
    canvas.paste(image.crop((left, top, min(right, image.width), min(bottom, image.height))), (0, 0))
    return canvas


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        if torch.rand(()).item() >= self.p:
            return sample
        out = dict(sample, image=sample["image"].transpose(Image.FLIP_LEFT_RIGHT))
        if "mask" in sample:
            out["mask"] = sample["mask"].transpose(Image.FLIP_LEFT_RIGHT)
        return out


class PhotometricJitter:
    """Brightness, contrast, saturation and hue jitter on the image only."""

    def __init__(self, brightness: float = 0.25, contrast: float = 0.25, saturation: float = 0.25, hue: float = 0.05) -> None:
        self.jitter = _ColorJitter(brightness, contrast, saturation, hue)

    def __call__(self, sample: Sample) -> Sample:
        return dict(sample, image=self.jitter(sample["image"]))


class ToTensor:
    """PIL image -> float32 3 x H x W in [0, 1]; mask -> int64 H x W."""

    def __call__(self, sample: Sample) -> Sample:
        image = torch.from_numpy(np.asarray(sample["image"], dtype=np.uint8).copy()).permute(2, 0, 1)
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


class RandomResizedCrop:
    """Image-only random crop of ``scale`` of the area, resized to ``size`` (pretraining views)."""

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
    jitter: bool = False,
) -> Compose:
    """Fine-tuning: random resize, random crop (mask padded with 255), flip, optional jitter, normalise.

    ``crop_size`` may be a preset name's value, e.g. ``CROP_PRESETS["cityscapes"]`` (1024).
    """
    steps: list[Transform] = [RandomResize(ratio_range, scale), RandomCrop(crop_size), RandomHorizontalFlip()]
    if jitter:
        steps.append(PhotometricJitter())
    return Compose([*steps, ToTensor(), Normalize(mean, std)])


def eval_transforms(mean: Sequence[float], std: Sequence[float]) -> Compose:
    """Evaluation: the original size, normalised (sliding windows and scales come at inference)."""
    return Compose([ToTensor(), Normalize(mean, std)])


def pretrain_transforms(crop_size: int = CROP_PRESETS["pretrain"], scale: tuple[float, float] = (0.25, 1.0)) -> Compose:
    """Denoising pretraining: a random resized crop and a flip, left in [0, 1] and unnormalised,
    since noise is added in [-1, 1] before the model's normalisation."""
    return Compose([RandomResizedCrop(crop_size, scale), RandomHorizontalFlip(), ToTensor()])
