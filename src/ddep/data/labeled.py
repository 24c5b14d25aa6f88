"""Labeled segmentation datasets: Cityscapes, ADE20K, Pascal Context 59 and a user's folders.

Each dataset is a list of (image, mask) file pairs under a root, in the layouts that
mmsegmentation expects, plus how to turn a mask file into class ids (ignore = 255). Items are
dicts: ``image`` (float tensor 3 x H x W), ``mask`` (int64 tensor H x W) and ``name`` (the image
path relative to the root), after ``transform`` (default: :class:`~ddep.data.transforms.ToTensor`).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..atomic import write_text_atomic
from .classes import ADE20K_CLASSES, CITYSCAPES_CLASSES, CITYSCAPES_LABEL_TO_TRAIN_ID, PASCAL_CONTEXT_59_CLASSES, PASCAL_VOC_CLASSES
from .io import IMAGE_EXTENSIONS, MASK_EXTENSIONS, DataError, inspect_image, read_image, read_mask
from .transforms import IGNORE_INDEX, ToTensor, Transform

Pair = tuple[str, str]  # (image, mask) paths relative to the dataset root
log = logging.getLogger(__name__)


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path


def label_lut(id_map: dict[int, int] | None = None, reduce_zero_label: bool = False,
              label_map: dict[int, int] | None = None) -> np.ndarray:
    """A 256-entry lookup table from stored mask values to class ids.

    ``id_map`` sends listed values to ids and every other value to 255 (Cityscapes labelIds);
    ``label_map`` sends listed values to ids and keeps the others (a user's ``{255: 1}``);
    ``reduce_zero_label`` then sends 0 to 255 and k to k - 1, keeping 255 (ADE20K, Pascal
    Context): mmsegmentation's order (``mmseg/datasets/transforms/loading.py``, LoadAnnotations).
    """
    lut = np.arange(256, dtype=np.int64)
    if id_map is not None:
        lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
        for source, target in id_map.items():
            lut[source] = target
    for source, target in (label_map or {}).items():
        lut[source] = target
    if reduce_zero_label:
        lut = np.where(lut == 0, IGNORE_INDEX, np.where(lut == IGNORE_INDEX, IGNORE_INDEX, lut - 1))
    return lut.astype(np.uint8)  # masks come out as uint8, as the PIL images they become


def read_split_file(split_file: str | os.PathLike, root: Path) -> list[Pair]:
    """Pairs from a split file, one ``image mask`` per line relative to ``root``; every path must
    exist and stay inside ``root``."""
    pairs = []
    real_root = root.resolve()
    lines = Path(split_file).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DataError(f"{split_file}:{number}: expected 'image_path label_path', got {line.strip()!r}")
        for field in fields:
            full = (root / field).resolve()
            if Path(field).is_absolute() or not full.is_relative_to(real_root):
                raise DataError(f"{split_file}:{number}: {field} is outside the dataset root {root}")
            if not full.is_file():
                raise DataError(f"{split_file}:{number}: {root / field} not found")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise DataError(f"{split_file}: no image/label pairs")
    return pairs


class SegmentationDataset(Dataset):
    """(image, mask) pairs under ``root``, with masks mapped to class ids by ``lut``."""

    def __init__(
        self,
        root: str | os.PathLike,
        pairs: Sequence[Pair],
        classes: Sequence[str],
        transform: Transform | None = None,
        lut: np.ndarray | None = None,
        palette: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.root = Path(root)
        if not pairs:
            raise DataError(f"no image/mask pairs found under {self.root}")
        self.pairs = list(pairs)
        self.classes = tuple(classes)
        self.num_classes = len(self.classes)
        self.transform = transform or ToTensor()
        self.lut = label_lut() if lut is None else lut
        self.palette = palette

    def __len__(self) -> int:
        return len(self.pairs)

    def load_mask(self, path: Path) -> np.ndarray:
        """Class ids of one mask file (0..K-1 and 255); subclasses change how values map."""
        raw = read_mask(path, self.palette)
        if raw.max(initial=0) >= len(self.lut):
            big = np.unique(raw[raw >= len(self.lut)])[:5].tolist()
            raise DataError(f"{path}: label values {big} above 255")
        return self.lut[raw]

    def check_labels(self, mask: np.ndarray, path: Path) -> None:
        if mask.max(initial=0) < self.num_classes:
            return
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            shown = ", ".join(map(str, bad[:10].tolist())) + (", ..." if bad.size > 10 else "")
            raise DataError(
                f"{path}: label values {shown} outside 0..{self.num_classes - 1} and {IGNORE_INDEX} (after id mapping)"
            )

    @staticmethod
    def check_size(mask: np.ndarray, image_size: tuple[int, int], mask_path: Path, image_path: Path) -> None:
        """Refuse a mask whose size is not its image's ``(width, height)``."""
        if mask.shape != (image_size[1], image_size[0]):
            raise DataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                            f"{image_size[0]}x{image_size[1]}")

    def __getitem__(self, index: int) -> dict:
        image_rel, mask_rel = self.pairs[index]
        image = read_image(self.root / image_rel)
        mask = self.load_mask(self.root / mask_rel)
        self.check_size(mask, image.size, self.root / mask_rel, self.root / image_rel)
        self.check_labels(mask, self.root / mask_rel)
        sample = {"image": image, "mask": Image.fromarray(mask.astype(np.uint8, copy=False)), "name": image_rel}
        return self.transform(sample)

    def problems(self, index: int, full: bool = False) -> list[str]:
        """What :meth:`__getitem__` would refuse in pair ``index``, one line per problem (image and
        mask checked apart, so both are named), without decoding the image unless ``full``: the
        image by :func:`~ddep.data.io.inspect_image`; the mask read whole, as for training
        (:meth:`load_mask`, :meth:`check_labels`: ids are a property of every pixel)."""
        image_rel, mask_rel = self.pairs[index]
        image_path, mask_path = self.root / image_rel, self.root / mask_rel
        found, size = [], None
        try:
            size = inspect_image(image_path, full)
        except Exception as e:  # noqa: BLE001 - one odd file must not hide the others
            found.append(_problem(e, image_path))
        try:
            mask = self.load_mask(mask_path)
            if size is not None:
                self.check_size(mask, size, mask_path, image_path)
            self.check_labels(mask, mask_path)
        except Exception as e:  # noqa: BLE001
            found.append(_problem(e, mask_path))
        return found


def _problem(error: Exception, path: Path) -> str:
    """An exception as one line naming its file (:class:`DataError` messages name it already)."""
    if isinstance(error, DataError):
        return " ".join(str(error).split())
    return f"{path}: cannot be read ({type(error).__name__}: {' '.join(str(error).split())})"


class Cityscapes(SegmentationDataset):
    """``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` with ``gtFine/{split}/<city>/*_gtFine_labelTrainIds.png``;
    where only ``*_gtFine_labelIds.png`` exists it is mapped with the official table (19 classes)."""

    LABEL_IDS_LUT = label_lut(CITYSCAPES_LABEL_TO_TRAIN_ID)

    def __init__(self, root, split="train", transform=None, split_file=None) -> None:
        root = require_dir(Path(root), "Cityscapes root")
        pairs = read_split_file(split_file, root) if split_file else self.list_pairs(root, split)
        super().__init__(root, pairs, CITYSCAPES_CLASSES, transform)

    @staticmethod
    def list_pairs(root: Path, split: str) -> list[Pair]:
        image_dir = require_dir(root / "leftImg8bit" / split, "Cityscapes image folder")
        pairs = []
        for image in sorted(image_dir.glob("*/*_leftImg8bit.png")):
            stem = image.name.removesuffix("_leftImg8bit.png")
            gt = root / "gtFine" / split / image.parent.name
            train_ids, label_ids = gt / f"{stem}_gtFine_labelTrainIds.png", gt / f"{stem}_gtFine_labelIds.png"
            mask = train_ids if train_ids.is_file() else label_ids
            if not mask.is_file():
                raise DataError(f"{image}: no mask (expected {train_ids} or {label_ids})")
            pairs.append((str(image.relative_to(root)), str(mask.relative_to(root))))
        return pairs

    def load_mask(self, path: Path) -> np.ndarray:
        if path.name.endswith("_labelIds.png"):
            return self.LABEL_IDS_LUT[read_mask(path)]
        return super().load_mask(path)


def _find_layout_root(root: Path, folder: str, what: str) -> Path:
    """Accept either the dataset folder itself or its parent (``data/ADEChallengeData2016`` or ``data``)."""
    root = require_dir(root, f"{what} root")
    return root / folder if (root / folder).is_dir() else root


def _pairs_by_stem(image_dir: Path, mask_dir: Path, root: Path, image_suffixes: Sequence[str]) -> list[Pair]:
    """Pair every image under ``image_dir`` with the mask of the same relative path and stem: a
    PNG or TIFF (:data:`~ddep.data.io.MASK_EXTENSIONS`, any case; ``.png`` first where several
    exist). Where only a lossy file of that stem is there (a JPEG), the error names it."""
    require_dir(image_dir, "image folder")
    require_dir(mask_dir, "mask folder")
    masks: dict[str, list[Path]] = {}
    for path in mask_dir.rglob("*"):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            masks.setdefault(str(path.relative_to(mask_dir).with_suffix("")), []).append(path)
    preference = {suffix: rank for rank, suffix in enumerate(MASK_EXTENSIONS)}
    pairs = []
    for image in sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in image_suffixes):
        stem = str(image.relative_to(image_dir).with_suffix(""))
        found = masks.get(stem, [])
        usable = sorted((p for p in found if p.suffix.lower() in preference),
                        key=lambda p: (preference[p.suffix.lower()], p.suffix != p.suffix.lower(), p.name))
        if not usable:
            if not found:
                raise DataError(f"{image}: no mask (expected {mask_dir / stem}{MASK_EXTENSIONS[0]}, "
                                f"{' or '.join(MASK_EXTENSIONS[1:])})")
            other = sorted(found)[0]
            if other.suffix.lower() in (".jpg", ".jpeg"):
                raise DataError(f"{image}: no mask; found {other}: masks must be lossless (PNG/TIFF): JPEG changes the ids")
            raise DataError(f"{image}: no mask; found {other}: masks are read from PNG or TIFF files; save it as PNG")
        pairs.append((str(image.relative_to(root)), str(usable[0].relative_to(root))))
    return pairs


class ADE20K(SegmentationDataset):
    """``ADEChallengeData2016/images/{training,validation}/*.jpg`` with ``annotations/<split>/*.png``;
    150 classes, reduce-zero-label (0 -> 255, k -> k - 1)."""

    SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

    def __init__(self, root, split="train", transform=None, split_file=None) -> None:
        root = _find_layout_root(Path(root), "ADEChallengeData2016", "ADE20K")
        if split_file:
            pairs = read_split_file(split_file, root)
        else:
            if split not in self.SPLITS:
                raise DataError(f"ADE20K split must be one of {sorted(self.SPLITS)}; got {split!r}")
            folder = self.SPLITS[split]
            pairs = _pairs_by_stem(root / "images" / folder, root / "annotations" / folder, root, (".jpg", ".jpeg"))
        super().__init__(root, pairs, ADE20K_CLASSES, transform, lut=label_lut(reduce_zero_label=True))


class PascalContext59(SegmentationDataset):
    """``VOC2010/JPEGImages/*.jpg`` and ``SegmentationClassContext/*.png`` listed by
    ``ImageSets/SegmentationContext/{train,val}.txt``; 59 classes, reduce-zero-label."""

    def __init__(self, root, split="train", transform=None, split_file=None) -> None:
        root = _find_layout_root(Path(root), "VOC2010", "Pascal Context")
        if split_file:
            pairs = read_split_file(split_file, root)
        else:
            listing = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
            if not listing.is_file():
                raise DataError(f"Pascal Context split list not found: {listing}")
            pairs = []
            for name in listing.read_text().split():
                image, mask = f"JPEGImages/{name}.jpg", f"SegmentationClassContext/{name}.png"
                for path in (image, mask):
                    if not (root / path).is_file():
                        raise DataError(f"{listing}: {name}: {root / path} not found")
                pairs.append((image, mask))
        super().__init__(root, pairs, PASCAL_CONTEXT_59_CLASSES, transform, lut=label_lut(reduce_zero_label=True))


class PascalVOC(SegmentationDataset):
    """Pascal VOC 2012 with the SBD augmented masks, as the semi-supervised literature trains on it:
    ``JPEGImages/<name>.jpg`` with VOC's own mask ``SegmentationClass/<name>.png`` where there is
    one, else SBD's ``SegmentationClassAug/<name>.png`` (mmsegmentation's layout; UniMatch's holds
    all of them in ``SegmentationClass``); val is scored on VOC's masks alone. ``train`` is the
    10,582 images of ``train_aug``, ``val`` the 1,449 of VOC's val, as UniMatch lists them
    (``ddep.data.published``); 21 classes, 255 on object boundaries ignored."""

    def __init__(self, root, split="train", transform=None, split_file=None) -> None:
        from .published import pascal_list

        root = _find_layout_root(Path(root), "VOCdevkit/VOC2012", "Pascal VOC")
        if split_file:
            pairs = read_split_file(split_file, root)
        else:
            if split not in ("train", "val"):
                raise DataError(f"Pascal VOC split must be train (train_aug, with SBD) or val; got {split!r}")
            folders = ("SegmentationClass", "SegmentationClassAug") if split == "train" else ("SegmentationClass",)
            pairs, missing = [], []
            for image in pascal_list(split):
                masks = [f"{folder}/{Path(image).stem}.png" for folder in folders]
                mask = next((m for m in masks if (root / m).is_file()), None)
                missing += [image] if not (root / image).is_file() else []
                missing += [" or ".join(masks)] if mask is None else []
                pairs.append((image, mask))
            if missing:
                sbd = " (the training split needs SBD's augmented masks, SegmentationClassAug)" if split == "train" else ""
                raise DataError(f"Pascal VOC {split}: {len(missing)} of its files are not under {root} (first: {missing[0]}){sbd}")
        super().__init__(root, pairs, PASCAL_VOC_CLASSES, transform)


#: Sub-folder names that mark ``<img_dir>`` as split into folders (mmsegmentation's and the usual ones).
SPLIT_FOLDERS = ("train", "val", "test", "training", "validation", "trainval")


class FolderDataset(SegmentationDataset):
    """A user's own data: ``<root>/<img_dir>`` and ``<root>/<ann_dir>`` matched by relative path
    and stem (images of :data:`~ddep.data.io.IMAGE_EXTENSIONS`; masks PNG or TIFF, any case of the
    suffix). When ``<img_dir>/<split>`` exists, that subfolder is the split; when
    ``<img_dir>`` has other split folders (``train``, ``val``, ...) but not that one, the split is
    an error; otherwise (one flat folder) every split is the whole folder, which fine-tuning and
    evaluation refuse to report on when it holds trained images.

    Give ``num_classes`` or ``classes_file`` (one class name per line). Masks hold class ids; with
    ``label_map`` (``{stored value: class id}``, e.g. ``{255: 1}`` for binary masks stored as
    0/255) listed values become those ids; with ``reduce_zero_label`` 0 is ignored and k becomes
    k - 1; with ``palette`` (one RGB colour per class) RGB masks are mapped to ids.
    ``label_check=False`` skips :func:`check_label_encoding` (masks that are sparse on purpose).
    """

    def __init__(
        self,
        root,
        split="train",
        transform=None,
        split_file=None,
        img_dir: str = "images",
        ann_dir: str = "masks",
        num_classes: int | None = None,
        classes_file: str | os.PathLike | None = None,
        reduce_zero_label: bool = False,
        palette: Sequence[Sequence[int]] | None = None,
        label_map: dict[int, int] | None = None,
        label_check: bool = True,
    ) -> None:
        root = require_dir(Path(root), "dataset root")
        classes = self.read_classes(num_classes, classes_file)
        check_label_map(label_map, len(classes), reduce_zero_label)
        if split_file:
            pairs = read_split_file(split_file, root)
        else:
            image_dir, mask_dir = root / img_dir, root / ann_dir
            require_dir(image_dir, "image folder")
            if (image_dir / split).is_dir():
                image_dir, mask_dir = image_dir / split, mask_dir / split
            else:
                splits = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and p.name in SPLIT_FOLDERS)
                if splits:
                    raise DataError(f"{image_dir / split} not found ({image_dir} is split into {', '.join(splits)}): put the "
                                    f"{split} images there and their masks in {mask_dir / split}, or name another split")
            pairs = _pairs_by_stem(image_dir, mask_dir, root, IMAGE_EXTENSIONS)
        self.flat = not split_file and image_dir == root / img_dir  # one folder: every split is the whole of it
        self.label_check = label_check
        lut = label_lut(reduce_zero_label=reduce_zero_label, label_map=label_map)
        super().__init__(root, pairs, classes, transform, lut=lut, palette=palette)

    @staticmethod
    def read_classes(num_classes: int | None, classes_file: str | os.PathLike | None) -> tuple[str, ...]:
        if classes_file is not None:
            path = Path(classes_file)
            if not path.is_file():
                raise DataError(f"classes_file not found: {path}")
            names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
            if not names:
                raise DataError(f"{path}: no class names (expected one per line)")
            if num_classes is not None and num_classes != len(names):
                raise DataError(f"{path}: {len(names)} class names but num_classes={num_classes}")
            return names
        if not isinstance(num_classes, int) or not 1 <= num_classes <= IGNORE_INDEX:
            raise DataError("folder dataset needs num_classes (1..255) or classes_file (in a config: data.options.num_classes=K); "
                            f"got num_classes={num_classes!r}")
        return tuple(f"class_{i}" for i in range(num_classes))


def check_label_map(label_map: dict[int, int] | None, num_classes: int, reduce_zero_label: bool) -> None:
    """``label_map``: stored values 0..255 to class ids 0..K-1 or 255 (ignore); with
    ``reduce_zero_label``, which comes after it (as in mmsegmentation's LoadAnnotations), to 0..K or 255."""
    if label_map is None:
        return
    if not isinstance(label_map, dict) or not label_map:
        raise DataError(f"label_map must map stored mask values to class ids, e.g. {{255: 1}}; got {label_map!r}")
    top = num_classes if reduce_zero_label else num_classes - 1
    for source, target in label_map.items():
        if not _is_int(source) or not 0 <= source <= 255:
            raise DataError(f"label_map key {source!r}: expected a stored mask value 0..255")
        if not _is_int(target) or not (0 <= target <= top or target == IGNORE_INDEX):
            after = " (before reduce_zero_label)" if reduce_zero_label else ""
            raise DataError(f"label_map[{source}] = {target!r}: expected a class id 0..{top}{after} or {IGNORE_INDEX} (ignore)")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


#: Masks read by :func:`check_label_encoding` at most (spread over the set): the encoding is a
#: property of the whole set, visible in a few hundred of its masks.
ENCODING_SAMPLE = 500


def check_label_encoding(dataset: Dataset, indices: Sequence[int] | None = None, what: str = "labeled set") -> None:
    """Refuse a user's masks whose encoding would silently drop classes, before any training.

    255 is the ignore index, so binary masks stored as 0/255 would train and evaluate on class 0
    alone (and report a high score). Refused: masks whose class ids are only 0 besides 255, and
    masks where 255 covers most pixels while some class never appears. Only a
    :class:`FolderDataset` whose ``label_check`` is on: the benchmarks' encodings are known."""
    if not isinstance(dataset, FolderDataset) or dataset.num_classes < 2 or not dataset.label_check:
        return
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if len(indices) > ENCODING_SAMPLE:
        indices = [indices[i * len(indices) // ENCODING_SAMPLE] for i in range(ENCODING_SAMPLE)]
    counts = np.zeros(256, dtype=np.int64)
    for index in indices:
        counts += np.bincount(dataset.load_mask(dataset.root / dataset.pairs[index][1]).ravel(), minlength=256)[:256]
    present = [k for k in range(dataset.num_classes) if counts[k]]
    ignored = counts[IGNORE_INDEX] / max(1, counts.sum())
    example = dataset.root / dataset.pairs[indices[0]][1]
    where = f"the {len(indices)} masks of the {what} (e.g. {example})"
    if counts[IGNORE_INDEX] and present == [0]:
        raise DataError(f"{where} hold only 0 and 255, and 255 is the ignore index: every pixel but class 0 would be dropped. "
                        "Binary masks stored as 0/255: 'data.options.label_map={255: 1}' (with num_classes 2); if class 0 "
                        "alone is right, data.options.label_check=false")
    missing = [k for k in range(dataset.num_classes) if not counts[k]]
    if ignored > 0.5 and missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"in {where} 255 (ignore) covers {ignored:.0%} of the pixels and class {shown} never appears: if 255 "
                        f"marks a class, map it ('data.options.label_map={{255: {missing[0]}}}'); if the masks are sparse on "
                        "purpose, data.options.label_check=false")


#: Problems named in :func:`check_pairs`'s one-line error; the rest go to its report file.
SHOWN_PROBLEMS = 3
#: Below this many pairs, :func:`check_pairs` works in this process (starting workers costs more).
PARALLEL_FROM = 64


def check_pairs(dataset: Dataset, indices: Sequence[int] | None = None, workers: int | None = None, full: bool = False,
                report: str | os.PathLike | None = None, progress: bool = False) -> None:
    """Check every labeled pair (or those at ``indices``) before training, so that a bad file
    stops the run at its start instead of after some steps; one :class:`DataError` names them all.

    Checked per pair, as :meth:`SegmentationDataset.__getitem__` would refuse it: the image is
    readable, not cut short, 8 bits per channel (by header, and for JPEG and PNG by walking the
    file's structure to its end marker, without decoding; ``full=True`` decodes every image, which
    also finds a damaged compressed stream); the mask is readable and holds ids in range after the
    dataset's own mapping (Cityscapes labelIds, reduce-zero-label, ``label_map``, ``palette``: it
    is read whole by the dataset's :meth:`~SegmentationDataset.load_mask`); the mask has the
    image's size. Work is spread over ``workers`` processes (default: every usable core from
    :data:`PARALLEL_FROM` pairs on, else this process; forked where the OS allows). Datasets
    without files (``demo``) pass at once; a ``LabeledSubset`` or torch ``Subset`` is checked on
    its own items.

    The error is one line: how many pairs of how many cannot be used, the first
    :data:`SHOWN_PROBLEMS` problems (paths relative to the root), and where there are more, the
    file listing every one (``report``, default a new file in the temporary folder)."""
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # LabeledSubset, torch Subset
        chosen = list(dataset.indices)
        indices = chosen if indices is None else [chosen[i] for i in indices]
        dataset = dataset.dataset
    if not isinstance(dataset, SegmentationDataset):
        return
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if not indices:
        return
    started = time.perf_counter()
    if workers is None:
        workers = _usable_cores() if len(indices) >= PARALLEL_FROM else 1
    size = max(1, min(256, -(-len(indices) // (max(1, workers) * 16))))  # 16 chunks a worker, for the progress bar
    chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
    workers = max(1, min(workers, len(chunks)))
    from tqdm import tqdm

    found: list[list[str]] = []
    with tqdm(total=len(indices), desc="checking pairs", unit="pair", dynamic_ncols=True, disable=not progress) as bar:
        if workers == 1:
            for chunk in chunks:
                found += [dataset.problems(i, full) for i in chunk]
                bar.update(len(chunk))
        else:
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)  # macOS: fork is unsafe
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_checking, initargs=(dataset, full)) as pool:
                try:
                    for chunk, result in zip(chunks, pool.map(_check_chunk, chunks)):
                        found += result
                        bar.update(len(chunk))
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    elapsed = time.perf_counter() - started
    log.info("checked %d labeled pairs in %.1f s (%.0f pairs/s, %d processes)", len(indices), elapsed,
             len(indices) / max(elapsed, 1e-9), workers)
    bad = [problems for problems in found if problems]
    if not bad:
        return
    problems = [problem for pair in bad for problem in pair]
    prefix = f"{dataset.root}{os.sep}"
    shown = "; ".join(problem.replace(prefix, "") for problem in problems[:SHOWN_PROBLEMS])
    message = f"{len(bad)} of {len(indices)} labeled pairs under {dataset.root} cannot be used: {shown}"
    if len(problems) > SHOWN_PROBLEMS:
        path = _write_report(report, f"# {len(bad)} of {len(indices)} labeled pairs under {dataset.root} cannot be used", problems)
        message += f"; and {len(problems) - SHOWN_PROBLEMS} more: every problem is listed in {path}"
    raise DataError(message)


_CHECKING: tuple[SegmentationDataset, bool] | None = None  # a checking worker's dataset and ``full``


def _start_checking(dataset: SegmentationDataset, full: bool) -> None:
    global _CHECKING
    _CHECKING = dataset, full


def _check_chunk(indices: list[int]) -> list[list[str]]:
    dataset, full = _CHECKING
    return [dataset.problems(i, full) for i in indices]


def _usable_cores() -> int:
    """The cores this process may use: its share when torchrun started several on the machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _write_report(report: str | os.PathLike | None, header: str, problems: list[str]) -> Path:
    """``problems`` one per line in ``report``, or in a new file of the temporary folder."""
    text = "\n".join([header, *problems]) + "\n"
    if report is not None:
        write_text_atomic(Path(report), text)
        return Path(report)
    handle, name = tempfile.mkstemp(prefix="ddep-bad-pairs-", suffix=".txt")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    return Path(name)
