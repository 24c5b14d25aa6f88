"""Datasets, transforms and label-fraction splits.

``build_dataset(name, root, split, transform, **options)`` returns a torch ``Dataset`` of dicts:
``image`` (float tensor 3 x H x W) and, for labeled data, ``mask`` (int64 tensor H x W, ignore =
255). Names: ``cityscapes``, ``ade20k``, ``pascal_context``, ``folder``, ``unlabeled``, ``demo``.
"""
from __future__ import annotations

import inspect
import os
from typing import Any

from torch.utils.data import Dataset

from ..choices import check_choice, check_options
from .io import DataError, read_image, read_mask
from .labeled import ADE20K, Cityscapes, FolderDataset, PascalContext59, PascalVOC, SegmentationDataset, check_pairs
from .transforms import CROP_PRESETS, IGNORE_INDEX
from .shards import ShardImages
from .unlabeled import UnlabeledImages

LABELED = {"cityscapes": Cityscapes, "ade20k": ADE20K, "pascal_context": PascalContext59, "pascal_voc": PascalVOC,
           "folder": FolderDataset}
DATASETS = (*LABELED, "unlabeled", "shards", "demo")


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    transform: Any = None,
    **options: Any,
) -> Dataset:
    """Build a dataset by name.

    - ``cityscapes``, ``ade20k``, ``pascal_context``: the mmsegmentation layouts under ``root``;
      ``split_file=`` reads pairs from a split file instead of the split folder. ``pascal_voc``:
      VOC 2012 with SBD's augmented masks, the semi-supervised literature's training set.
    - ``folder``: a user's ``img_dir``/``ann_dir`` folders, with ``num_classes`` or ``classes_file``
      (and optional ``reduce_zero_label``, ``palette``).
    - ``unlabeled``: every image under ``root`` (recursive), or with ``source="cityscapes"`` (any
      labeled name) the images of that dataset's ``split``; ``min_size`` enables reduced-size JPEG
      decoding.
    - ``shards``: the tar shards ``ddep shards`` wrote into ``root`` (an iterable dataset; options
      ``shuffle_shards``, ``decode``).
    - ``demo``: the built-in synthetic scenes (no root); ``split`` is ``unlabeled``, ``train`` or ``val``.
    """
    check_choice("dataset", name, DATASETS)
    if name == "demo":
        from .demo import DemoDataset

        check_options("dataset 'demo'", options, _keywords(DemoDataset))
        return DemoDataset(split=split, transform=transform, **options)
    if root is None:
        raise DataError(f"dataset {name!r} needs a root folder")
    if name == "shards":
        check_options("dataset 'shards'", options, _keywords(ShardImages))
        return ShardImages(root, transform, **options)
    if name == "unlabeled":
        source = options.pop("source", None)
        unlabeled_keys = _keywords(UnlabeledImages) - {"files"}
        if source is None:
            check_options("dataset 'unlabeled'", options, unlabeled_keys)
            return UnlabeledImages(root, transform, **options)
        check_choice("unlabeled source", source, LABELED)
        labeled_options = {k: v for k, v in options.items() if k not in unlabeled_keys}
        check_options(f"dataset 'unlabeled' from {source!r}", labeled_options, _keywords(LABELED[source]))
        labeled = LABELED[source](root, split=split, **labeled_options)
        files = [image for image, _ in labeled.pairs]
        return UnlabeledImages(labeled.root, transform, files=files, **{k: options[k] for k in options if k in unlabeled_keys})
    check_options(f"dataset {name!r}", options, _keywords(LABELED[name]))
    return LABELED[name](root, split=split, transform=transform, **options)


def _keywords(cls: type) -> set[str]:
    """The keyword options a dataset class accepts, besides root, split and transform."""
    return set(inspect.signature(cls).parameters) - {"root", "split", "transform"}


__all__ = [
    "build_dataset", "DATASETS", "DataError", "SegmentationDataset", "Cityscapes", "ADE20K", "PascalContext59", "PascalVOC",
    "FolderDataset", "UnlabeledImages", "ShardImages", "read_image", "read_mask", "check_pairs", "CROP_PRESETS", "IGNORE_INDEX",
]
