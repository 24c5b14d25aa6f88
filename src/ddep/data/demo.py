"""Built-in demo data: synthetic scenes cut from real photos, deterministic from a seed.

Each scene is a square of 3 to 5 regions (a Voronoi partition warped by a smooth random field,
so the borders curve). Every region is filled with a crop of a photo, and its class is the
material or subject it was cut from:

====  ==========  ===================================================================
 id   class       source (scikit-image's bundled data; licence)
====  ==========  ===================================================================
 0    grass       ``grass``: grass (CC0, via DeviantArt)
 1    gravel      ``gravel``: gravel (CC0Textures Gravel04, CC0)
 2    brick       ``brick``: a brick wall (CC0Textures Bricks25, CC0)
 3    cat fur     ``chelsea``: the cat Chelsea, left 80% of the photo (CC0, Stefan van der Walt)
 4    tissue      ``immunohistochemistry``: stained tissue (no known copyright restrictions)
 5    coins       ``coins``: Greek coins from Pompeii (no known copyright restrictions)
====  ==========  ===================================================================

Appearance varies so that a class cannot be recognised by colour or brightness alone: each crop
has a random zoom (1-2x the scene size), rotation by a multiple of 90 degrees and flip, then
either a grayscale version with a random tint (30%) or a random hue rotation, and random contrast
and brightness. Recognising the classes therefore takes texture, which is what an ImageNet
encoder brings and a randomly initialised one must learn from the few labels.

Splits: ``unlabeled`` (pretraining pool, 1000 images by default), ``train`` (the labeled pool,
200) and ``val`` (the fixed validation set, 200). ``photos`` is a second, generic unlabeled pool
(1000): square crops of other photos (an astronaut, coffee, a rocket, a motorcycle, the Hubble deep
field, a retina, a camera man, the moon, a clock, a page of text, cells), none of the classes'
sources, for the pretraining-data study (the paper pretrained on generic ImageNet-21k images). Every scene depends only on (seed, split,
index); ``val`` crops come from the last quarter of each photo (along its longer side) and the
other splits from the rest, so validation pixels are never seen in training.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .transforms import IGNORE_INDEX, ToTensor


@dataclass(frozen=True)
class _Source:
    photo: str  # a function of skimage.data
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # (left, top, right, bottom), fractions


# class name -> the photo regions its pixels are cut from
_CLASS_SOURCES: dict[str, tuple[_Source, ...]] = {
    "grass": (_Source("grass"),),
    "gravel": (_Source("gravel"),),
    "brick": (_Source("brick"),),
    "cat fur": (_Source("chelsea", (0.0, 0.0, 0.8, 1.0)),),
    "tissue": (_Source("immunohistochemistry"),),
    "coins": (_Source("coins"),),
}
CLASSES: tuple[str, ...] = tuple(_CLASS_SOURCES)
_GENERIC_PHOTOS = ("astronaut", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina", "camera", "moon",
                   "clock", "page", "cell")
SPLITS = ("unlabeled", "train", "val", "photos")
_SPLIT_IDS = {"unlabeled": 0, "train": 1, "val": 2, "photos": 3}
DEFAULT_NUM_IMAGES = {"unlabeled": 1000, "train": 200, "val": 200, "photos": 1000}
VAL_FRACTION = 0.25


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    from skimage import data

    array = getattr(data, name)()
    array = np.asarray(array[0] if isinstance(array, tuple) else array)  # stereo_motorcycle: (left, right, disparity)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8))


@functools.lru_cache(maxsize=None)
def _region(source: _Source, part: str) -> Image.Image:
    """The source's box, split along its longer side: val gets the last VAL_FRACTION."""
    photo = _photo(source.photo)
    w, h = photo.size
    l, t, r, b = round(source.box[0] * w), round(source.box[1] * h), round(source.box[2] * w), round(source.box[3] * h)
    if r - l >= b - t:
        cut = r - round((r - l) * VAL_FRACTION)
        l, r = (cut, r) if part == "val" else (l, cut)
    else:
        cut = b - round((b - t) * VAL_FRACTION)
        t, b = (cut, b) if part == "val" else (t, cut)
    region = photo.crop((l, t, r, b))
    region.load()
    return region


def _smooth_field(rng: np.random.Generator, size: int, grid: int = 4) -> np.ndarray:
    coarse = rng.standard_normal((grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


_TRANSPOSE = (None, Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270)


def _texture(rng: np.random.Generator, region: Image.Image, size: int, cfg: dict) -> np.ndarray:
    w, h = region.size
    side = int(min(round(size * rng.uniform(*cfg["zoom"])), h, w))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = region.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    k = int(rng.integers(4))
    if k:
        crop = crop.transpose(_TRANSPOSE[k])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(crop, dtype=np.float32) * (1 / 255)
    # colour: grayscale + random tint, or a hue rotation
    if rng.random() < cfg["p_gray"]:
        g = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        tint = rng.uniform(0.4, 1.0, 3).astype(np.float32)
        tint /= tint.max()
        x = g[..., None] * tint
    else:
        angle = rng.uniform(-cfg["hue"], cfg["hue"]) * np.pi
        x = _rotate_hue(x, angle)
    mean = x.mean()
    return (x - mean) * rng.uniform(*cfg["contrast"]) + mean * rng.uniform(*cfg["brightness"])


_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_RGB = np.linalg.inv(_YIQ).astype(np.float32)


def _rotate_hue(x: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float32)
    m = _RGB @ rot @ _YIQ
    return x @ m.T


# scene design: cells per scene, texture zoom, colour and contrast changes, border warp
_SCENE = dict(cells=(3, 5), zoom=(1.0, 2.0), p_gray=0.3, hue=0.15, contrast=(0.7, 1.3), brightness=(0.7, 1.3), warp=0.15)


def make_scene(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: an RGB image (size x size x 3, uint8) and its class-id mask (uint8)."""
    cfg = _SCENE  # module-level, so that benchmarks/demo_data_check.py can try other designs
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], index]))
    part = "val" if split == "val" else "train"
    n = int(rng.integers(cfg["cells"][0], cfg["cells"][1] + 1))
    classes = rng.choice(len(CLASSES), size=n, replace=False)
    sites = rng.uniform(0, 1, (n, 2)).astype(np.float32) * size
    dx = _smooth_field(rng, size) * cfg["warp"] * size
    dy = _smooth_field(rng, size) * cfg["warp"] * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    px, py = xx + dx, yy + dy
    dist = (px[None] - sites[:, 0, None, None]) ** 2 + (py[None] - sites[:, 1, None, None]) ** 2
    cell = dist.argmin(0)
    image = np.zeros((size, size, 3), dtype=np.float32)
    mask = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
    for i, k in enumerate(classes):
        sources = _CLASS_SOURCES[CLASSES[k]]
        source = sources[int(rng.integers(len(sources)))]
        tex = _texture(rng, _region(source, part), size, cfg)
        sel = cell == i
        image[sel] = tex[sel]
        mask[sel] = k
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image, mask


def make_photo(seed: int, index: int, size: int) -> np.ndarray:
    """A generic unlabeled image: a random square crop (a quarter to all of the short side) of a
    random photo from outside the classes' sources, flipped at random."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS["photos"], index]))
    photo = _photo(_GENERIC_PHOTOS[int(rng.integers(len(_GENERIC_PHOTOS)))])
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.25, 1.0))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = photo.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


class DemoDataset(Dataset):
    """The demo scenes as a dataset of ``{"image", "mask", "name"}`` items (no mask for ``unlabeled``
    and ``photos``).

    Scenes are generated on first access and kept in memory (a 64 px scene takes about a
    millisecond). ``pairs`` names each item, so splits and hashes work as for files on disk.
    """

    def __init__(self, split: str = "train", size: int = 64, num_images: int | None = None, seed: int = 0, transform=None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        self.split, self.size, self.seed = split, size, seed
        self.num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
        self.transform = ToTensor() if transform is None else transform
        self.classes, self.num_classes = CLASSES, len(CLASSES)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.num_images

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(self.name(i), self.name(i)) for i in range(self.num_images)]

    def name(self, index: int) -> str:
        return f"demo/{self.split}/seed{self.seed}/{self.size}px/{index:05d}"

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if index not in self._cache:
            if self.split == "photos":
                self._cache[index] = make_photo(self.seed, index, self.size), None
            else:
                self._cache[index] = make_scene(self.seed, self.split, index, self.size)
        return self._cache[index]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(f"demo {self.split} has {self.num_images} images; index {index} is out of range")
        image, mask = self.arrays(index)
        item = {"image": Image.fromarray(image), "name": self.name(index)}
        if mask is not None and self.split != "unlabeled":
            item["mask"] = Image.fromarray(mask)
        return self.transform(item)
