"""Unlabeled images for denoising pretraining: any folder tree, at ImageNet scale.

Listing a million files takes a while on network storage, so the sorted list is cached in a text
file (``<cache_dir>/<hash of the root>.txt``, default ``~/.cache/ddep/file-lists``). The cache is
reused while the modification times of the root and its direct sub-folders are unchanged (which
catches files added to or removed from an ImageNet-style tree); ``refresh=True`` forces a new
listing, for changes deeper down. Large JPEGs are decoded at a reduced scale (``Image.draft``) when
``min_size`` says how large they need to be. A file that cannot be read is skipped with a
warning and counted (``skipped``): one bad file in a million must not stop a pretraining run.

A folder that is a labeled dataset's root (``images/`` beside ``masks/``, mmsegmentation's
``img_dir/`` and ``ann_dir/``, Cityscapes' ``leftImg8bit/`` and ``gtFine/``, ADE20K's ``images/`` and
``annotations/``, Pascal's ``JPEGImages/`` and ``SegmentationClass*/``, at the top or one folder
down) is refused: its masks would be read as photos. The error names its image folder and the
``source`` option that reads a labeled split's images.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from ..atomic import write_text_atomic
from .io import IMAGE_EXTENSIONS, DataError, read_image
from .labeled import require_dir
from .transforms import ToTensor, Transform

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddep" / "file-lists"


def list_images(root: Path) -> list[str]:
    """Image files under ``root`` (recursive, sorted), relative to it; os.scandir keeps it fast."""
    found, stack = [], [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.relpath(entry.path, root))
    return sorted(found)


def tree_fingerprint(root: Path) -> str:
    """A hash of the modification times of ``root`` and its direct sub-folders."""
    stamps = [f"{root.stat().st_mtime_ns}"]
    with os.scandir(root) as entries:
        stamps += sorted(f"{e.name}:{e.stat().st_mtime_ns}" for e in entries if e.is_dir(follow_symlinks=True))
    return hashlib.sha1("\n".join(stamps).encode()).hexdigest()


def cached_image_list(root: Path, cache_dir: Path | None = None, refresh: bool = False) -> list[str]:
    """:func:`list_images`, stored in and reused from a cache file (written atomically)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache_dir / f"{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]}.txt"
    header = f"# ddep image list of {root.resolve()} fingerprint {tree_fingerprint(root)}"
    if cache.is_file() and not refresh:
        lines = cache.read_text().splitlines()
        if lines and lines[0] == header:
            return lines[1:]
    files = list_images(root)
    try:
        write_text_atomic(cache, "\n".join([header, *files]))
    except OSError as e:  # a read-only home must not stop training
        log.warning("could not cache the image list of %s in %s: %s", root, cache_dir, e)
    return files


#: (image folder, mask folder, the dataset name that reads them as ``source``): labeled layouts.
LABELED_LAYOUTS = (
    ("leftImg8bit", "gtFine", "cityscapes"),
    ("images", "annotations", "ade20k"),
    ("JPEGImages", "SegmentationClassContext", "pascal_context"),
    ("JPEGImages", "SegmentationClass", "folder"),
    ("images", "masks", "folder"),
    ("img_dir", "ann_dir", "folder"),
)


def labeled_layout(files: Sequence[str]) -> tuple[str, str, str, str] | None:
    """``(parent, image folder, mask folder, source)`` when the listed ``files`` (relative paths)
    come from a labeled dataset's image and mask folders, at the top (parent ``""``) or one folder
    down (``ADEChallengeData2016/images``); else None."""
    folders: dict[str, set[str]] = {}
    for name in files:
        parts = name.split(os.sep, 2)
        if len(parts) > 1:
            folders.setdefault("", set()).add(parts[0])
        if len(parts) > 2:
            folders.setdefault(parts[0], set()).add(parts[1])
    for parent in sorted(folders):
        for images, masks, source in LABELED_LAYOUTS:
            if images in folders[parent] and masks in folders[parent]:
                return parent, images, masks, source
    return None


def refuse_labeled_root(root: Path, files: Sequence[str], option: str = "data.root=", sources: bool = True) -> None:
    """A one-line :class:`DataError` when ``root`` is a labeled dataset's root (:func:`labeled_layout`),
    naming its image folder (its training split's, where it has one) for ``option`` and, with
    ``sources``, the ``data.options.source`` that reads the images of a labeled split."""
    layout = labeled_layout(files)
    if layout is None:
        return
    parent, images, masks, source = layout
    image_dir, mask_dir = root / parent / images, root / parent / masks
    train = next((image_dir / name for name in ("train", "training") if (image_dir / name).is_dir()), None)
    use = f"use {option}{train} for its training images" if train else f"use {option}{image_dir} for its images"
    if sources:
        extra = "" if source != "folder" else " data.options.num_classes=K" + (
            "" if (images, masks) == ("images", "masks") else f" data.options.img_dir={images} data.options.ann_dir={masks}")
        use += f", or data.options.source={source}{extra} for the images of one split"
    raise DataError(f"{root} is a labeled dataset's root ({image_dir.relative_to(root)}/ beside {mask_dir.relative_to(root)}/): "
                    f"its masks would be read as photos; {use}")


class UnlabeledImages(Dataset):
    """Images under ``root`` (or the given relative ``files``); items are ``{"image", "name"}``. A
    ``root`` that is a labeled dataset's (images beside masks) is refused, naming its image folder."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        files: Sequence[str] | None = None,
        min_size: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        refresh: bool = False,
    ) -> None:
        self.root = require_dir(Path(root), "image folder")
        if files is None:
            files = cached_image_list(self.root, cache_dir, refresh)
            refuse_labeled_root(self.root, files)
        self.files = list(files)
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.transform = transform or ToTensor()
        self.min_size = min_size
        self.unreadable: set[str] = set()  # files found unreadable (in this process), never read again

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped(self) -> int:
        """How many distinct files were found unreadable so far."""
        return len(self.unreadable)

    def __getitem__(self, index: int) -> dict:
        """The image at ``index``, or when it cannot be read, the next readable one."""
        for attempt in range(len(self.files)):
            name = self.files[(index + attempt) % len(self.files)]
            if name in self.unreadable:
                continue
            try:
                image = read_image(self.root / name, self.min_size)
            except DataError as e:
                self.unreadable.add(name)
                log.warning("skipping unreadable image (%d skipped so far): %s", self.skipped, e)
                continue
            return self.transform({"image": image, "name": name})
        raise DataError(f"no readable image under {self.root}")
