"""Tiny dataset trees in the real layouts (32 x 64 px PNG and JPEG files), and tiny runs on them, for tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

H, W = 32, 64

# command-line settings for tiny runs on engine_tree(): UNet on ResNet-18, 32 px crops, 4 steps
TINY = ["model.encoder=resnet18", "data.num_workers=0", "progress=false"]
PRETRAIN = [*TINY, "data.crop_size=32", "data.batch_size=4", "steps=4", "log_every=1", "checkpoint_every=2", "image_every=2"]
FINETUNE = [*TINY, "data.options={num_classes: 3}", "data.crop_size=32", "data.batch_size=4", "steps=4", "eval_every=2",
            "log_every=1", "checkpoint_every=2"]


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
            save(rgb(10 * c + i + 1000 * (split != "train")), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            kind, values = ("labelIds", [7, 26, 0, 33, 4]) if label_ids else ("labelTrainIds", [0, 13, 255, 18])
            save(mask(values), root / "gtFine" / split / city / f"{stem}_gtFine_{kind}.png")
    return root


def ade20k(root: Path, count: int = 3, values=(0, 1, 150)) -> Path:
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(count):
            save(rgb(i + 1000 * (split == "validation")), base / "images" / split / f"ADE_{split[:5]}_{i:08d}.jpg")
            save(mask(values), base / "annotations" / split / f"ADE_{split[:5]}_{i:08d}.png")
    return root


def pascal_context(root: Path, names=("2008_000002", "2008_000003"), val=("2008_000004",)) -> Path:
    base = root / "VOC2010"
    for i, name in enumerate((*names, *val)):
        save(rgb(i), base / "JPEGImages" / f"{name}.jpg")
        save(mask([0, 1, 59]), base / "SegmentationClassContext" / f"{name}.png")
    lists = base / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("\n".join(names) + "\n")
    (lists / "val.txt").write_text("\n".join(val) + "\n")
    return root


def folder(root: Path, count: int = 4, values=(0, 1, 2)) -> Path:
    for i in range(count):
        save(rgb(i), root / "images" / f"img{i}.jpg")
        save(mask(values), root / "masks" / f"img{i}.png")
    return root


def engine_tree(root: Path) -> Path:
    """A folder dataset under ``root/data``: images/{train,val} (6 and 5 RGB images of 64 x 64)
    and masks with classes 0, 1, 2 taken from the red channel."""
    for split, count in (("train", 6), ("val", 5)):
        for i in range(count):
            image = rgb(i + 100 * (split == "val"), size=(64, 64))
            save(image, root / "data/images" / split / f"{i}.png")
            ids = np.asarray(image)[..., 0] // 86
            save(Image.fromarray(ids.astype(np.uint8)), root / "data/masks" / split / f"{i}.png")
    return root


def interrupt_after(monkeypatch, stage: str, args: list[str], step: int) -> None:
    """Run ``ddep STAGE ARGS`` in this process and crash it (KeyboardInterrupt) right after ``step``
    and the loop's work on it (its checkpoint, when one is due, included)."""
    import pytest

    from ddep.cli import main
    from ddep.engine import trainer

    original = trainer.Trainer._end_of_step

    def crash(self):
        original(self)
        if self.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "_end_of_step", crash)
    with pytest.raises(KeyboardInterrupt):
        main([stage, *args])
    monkeypatch.setattr(trainer.Trainer, "_end_of_step", original)


def png16_rgb(value: int, path: Path, size=(H, W)) -> Path:
    """A 16-bit RGB PNG (PIL writes none; it reads them as 8-bit RGB, keeping the high bytes)."""
    import struct
    import zlib

    rows = b"".join(b"\x00" + np.full((size[1], 3), value, ">u2").tobytes() for _ in range(size[0]))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size[1], size[0], 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path
