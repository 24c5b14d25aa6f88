"""Tiny dataset trees in the real layouts (32 x 64 px PNG and JPEG files) for tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

H, W = 32, 64


def rgb(seed: int, size=(H, W)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def mask(values, size=(H, W)) -> Image.Image:
    """A mask whose columns cycle through ``values``."""
    values = np.asarray(values, dtype=np.uint8)
    return Image.fromarray(np.tile(values[np.arange(size[1]) % len(values)], (size[0], 1)))


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def cityscapes(root: Path, split: str = "train", cities=None, label_ids: bool = False) -> Path:
    cities = cities or {"aachen": 2, "bremen": 1}
    for c, (city, count) in enumerate(cities.items()):
        for i in range(count):
            stem = f"{city}_{i:06d}_000019"
            save(rgb(10 * c + i), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            kind, values = ("labelIds", [7, 26, 0, 33, 4]) if label_ids else ("labelTrainIds", [0, 13, 255, 18])
            save(mask(values), root / "gtFine" / split / city / f"{stem}_gtFine_{kind}.png")
    return root


def ade20k(root: Path, count: int = 3, values=(0, 1, 150)) -> Path:
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(count):
            save(rgb(i), base / "images" / split / f"ADE_{split[:5]}_{i:08d}.jpg")
            save(mask(values), base / "annotations" / split / f"ADE_{split[:5]}_{i:08d}.png")
    return root


def pascal_context(root: Path, names=("2008_000002", "2008_000003")) -> Path:
    base = root / "VOC2010"
    for i, name in enumerate(names):
        save(rgb(i), base / "JPEGImages" / f"{name}.jpg")
        save(mask([0, 1, 59]), base / "SegmentationClassContext" / f"{name}.png")
    lists = base / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("\n".join(names) + "\n")
    (lists / "val.txt").write_text(names[0] + "\n")
    return root


def folder(root: Path, count: int = 4, values=(0, 1, 2)) -> Path:
    for i in range(count):
        save(rgb(i), root / "images" / f"img{i}.jpg")
        save(mask(values), root / "masks" / f"img{i}.png")
    return root
