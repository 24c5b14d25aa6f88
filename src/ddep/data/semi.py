"""Unlabeled images for semi-supervised fine-tuning: where they come from, and UniMatch's views.

Each unlabeled image gives a weak view (the labeled pipeline's random resize, crop and flip) and
strong views of that same crop (colour jitter, grayscale, blur), each with its own CutMix box;
the training loop pastes, inside a view's box, the pixels of another image of the batch and
predicts the weak view's pseudo-labels there too (``ddep.engine.semi``). Pixels that padding
added are marked ``ignore`` and count in no loss. Sources: LiheYoung/UniMatch
``dataset/semi.py`` and ``dataset/transform.py`` (docs/PROTOCOL.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import ImageFilter
from torch.utils.data import Dataset

from .splits import LabeledSubset
from .transforms import (
    Compose, Normalize, Pad, RandomCrop, RandomHorizontalFlip, RandomResize, Sample, ToTensor, _size_pair,
    _uniform,
)
from .unlabeled import UnlabeledImages

#: UniMatch's strong views: ColorJitter(0.5, 0.5, 0.5, 0.25) with p 0.8, grayscale with p 0.2,
#: Gaussian blur with p 0.5 and sigma U(0.1, 2.0); a CutMix box with p 0.5, of U(0.02, 0.4) of
#: the crop's area and aspect ratio U(0.3, 1 / 0.3).
JITTER, JITTER_P, GRAYSCALE_P, BLUR_P, BLUR_SIGMA = (0.5, 0.5, 0.5, 0.25), 0.8, 0.2, 0.5, (0.1, 2.0)
CUTMIX_P, CUTMIX_AREA, CUTMIX_RATIO = 0.5, (0.02, 0.4), (0.3, 1 / 0.3)


def unlabeled_images(labeled: Dataset, labeled_indices: Sequence[int], masks: bool = False) -> Dataset:
    """The training split's images outside the labeled subset, as the semi-supervised literature
    uses them: image files alone (their masks are never read), or for a dataset made in memory
    (the demo's scenes) its items, of which :class:`WeakStrongViews` reads the image alone.
    ``masks``: the items with their masks, for a diagnostic that never reaches training (the
    pseudo-labels' accuracy). ``labeled`` must be an instance of its own: its transform is replaced."""
    chosen = set(labeled_indices)
    rest = [i for i in range(len(labeled.pairs)) if i not in chosen]
    if not rest:
        raise ValueError(f"semi-supervised fine-tuning: all {len(labeled.pairs)} training images are labeled, none is left "
                         "unlabeled (label fewer with data.labeled=N, or give other images: semi.unlabeled.root=...)")
    if getattr(labeled, "root", None) is not None and not masks:
        return UnlabeledImages(labeled.root, files=[labeled.pairs[i][0] for i in rest])
    return LabeledSubset(labeled, rest)


def cutmix_box(size: int | tuple[int, int], p: float = CUTMIX_P) -> torch.Tensor:
    """A ``size`` bool mask, True inside a random box (none with probability ``1 - p``): UniMatch's
    ``obtain_cutmix_box``, for any crop shape: the area drawn once, the aspect ratio and the
    position until the box fits."""
    h, w = _size_pair(size)
    box = torch.zeros(h, w, dtype=torch.bool)
    if torch.rand(()).item() >= p:
        return box
    area = _uniform(*CUTMIX_AREA) * h * w
    while True:
        ratio = _uniform(*CUTMIX_RATIO)
        box_w, box_h = int((area / ratio) ** 0.5), int((area * ratio) ** 0.5)
        x, y = int(torch.randint(w, ()).item()), int(torch.randint(h, ()).item())
        if x + box_w <= w and y + box_h <= h:
            box[y : y + box_h, x : x + box_w] = True
            return box


def strong_colours(image: Image.Image) -> Image.Image:
    """UniMatch's photometric strong augmentation of a PIL image (colour jitter, grayscale, blur)."""
    from torchvision import transforms

    if torch.rand(()).item() < JITTER_P:
        image = transforms.ColorJitter(*JITTER)(image)
    image = transforms.RandomGrayscale(GRAYSCALE_P)(image)
    if torch.rand(()).item() < BLUR_P:
        image = image.filter(ImageFilter.GaussianBlur(radius=_uniform(*BLUR_SIGMA)))
    return image


class WeakStrongViews:
    """A transform of ``{"image"}`` items into ``image`` (the weak view), ``strong`` (``views`` x
    3 x H x W), ``boxes`` (``views`` x H x W, CutMix boxes) and ``ignore`` (H x W, True where
    padding added pixels), all at ``crop_size``. ``truth``: also the item's mask under the weak
    view's crop (``truth``, 255 in the padding), for diagnostics only; the views and their random
    draws are the same either way."""

    def __init__(self, crop_size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 ratio_range: tuple[float, float] = (0.5, 2.0), scale: tuple[int, int] | None = None, views: int = 2,
                 truth: bool = False) -> None:
        self.crop_size, self.views, self.truth = crop_size, views, truth
        self.weak = Compose([RandomResize(ratio_range, scale), RandomCrop(crop_size), RandomHorizontalFlip()])
        self.finish = Compose([ToTensor(), Normalize(mean, std), Pad(crop_size)])

    def __call__(self, sample: Sample) -> dict[str, Any]:
        weak = self.weak({"image": sample["image"], **({"mask": sample["mask"]} if self.truth else {})})
        width, height = weak["image"].size
        ignore = torch.ones(_size_pair(self.crop_size), dtype=torch.bool)
        ignore[:height, :width] = False  # Pad fills the bottom and the right
        finished = self.finish(weak)
        strong = [self.finish({"image": strong_colours(weak["image"])})["image"] for _ in range(self.views)]
        boxes = [cutmix_box(self.crop_size) for _ in range(self.views)]
        out = {"image": finished["image"], "strong": torch.stack(strong), "boxes": torch.stack(boxes), "ignore": ignore,
               "name": sample.get("name", "")}
        if self.truth:
            out["truth"] = finished["mask"]
        return out
