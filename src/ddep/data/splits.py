"""Label-fraction splits: which training images keep their labels.

A split file has one ``image_path label_path`` pair per line, relative to the dataset root (the
format of semi-supervised segmentation code, e.g. ``splits/cityscapes/1_30/seed0/labeled.txt``).
For a seed, the training pairs are shuffled once and every amount takes a prefix of that order,
so a smaller fraction's images are a subset of a larger one's. A fraction f keeps ceil(f * N)
images (1/30 of Cityscapes' 2975 is 100, as in the literature); a plain integer is a count.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..atomic import write_text_atomic
from .io import DataError


def parse_amount(text: str, what: str = "label amount") -> Fraction | int:
    """``"1/30"`` or ``"0.05"`` -> a fraction in (0, 1]; ``"100"`` -> a count of images."""
    text = str(text).strip()
    try:
        if "/" in text or "." in text:
            value = Fraction(text)
            if not 0 < value <= 1:
                raise ValueError
            return value
        if not text.isdigit():  # int() would read "1_8" as 18
            raise ValueError
        count = int(text)
        if count < 1:
            raise ValueError
        return count
    except (ValueError, ZeroDivisionError):
        hint = f" (1/{text[2:]} for a fraction, or a published split such as pascal/{text})" if "_" in text else ""
        raise DataError(f"{what} {text!r} must be a fraction in (0, 1] such as 1/30 or 0.05, or a count >= 1{hint}") from None


def amount_name(text: str) -> str:
    """Folder name of an amount: ``1/30`` -> ``1_30``, ``0.05`` -> ``0.05``, ``100`` -> ``100``."""
    parse_amount(text)
    return str(text).strip().replace("/", "_")


def num_selected(amount: Fraction | int, total: int) -> int:
    if isinstance(amount, Fraction):
        return max(1, math.ceil(amount * total))
    if amount > total:
        raise DataError(f"asked for {amount} labeled images but the dataset has {total}")
    return amount


def select_indices(total: int, amount: Fraction | int, seed: int) -> list[int]:
    """The first ``amount`` of a seeded permutation of ``range(total)``, in permutation order."""
    order = np.random.default_rng(seed).permutation(total)
    return order[: num_selected(amount, total)].tolist()


def split_lines(pairs: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{image} {label}\n" for image, label in pairs)


def split_hash(pairs: Sequence[tuple[str, str]]) -> str:
    """A short content hash of a split, recorded with every result."""
    return hashlib.sha256(split_lines(pairs).encode()).hexdigest()[:16]


def write_splits(
    dataset: str,
    pairs: Sequence[tuple[str, str]],
    amounts: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
) -> list[tuple[Path, list[tuple[str, str]]]]:
    """Write ``<out>/<dataset>/<amount>/seed<k>/labeled.txt`` (and ``unlabeled.txt``, the rest);
    return each labeled file with its pairs."""
    parsed = [(amount_name(a), parse_amount(a)) for a in amounts]
    files, written = {}, []
    for seed in seeds:
        for name, amount in parsed:
            chosen = select_indices(len(pairs), amount, seed)
            chosen_set = set(chosen)
            labeled = [pairs[i] for i in chosen]
            folder = Path(out) / dataset / name / f"seed{seed}"
            files[folder / "labeled.txt"] = split_lines(labeled)
            files[folder / "unlabeled.txt"] = split_lines([p for i, p in enumerate(pairs) if i not in chosen_set])
            written.append((folder / "labeled.txt", labeled))
    write_split_files(files)
    return written


def write_split_files(files: dict[Path, str]) -> None:
    """Write split files; one already there that lists other images (written for another root,
    split or dataset options) is refused before any is written: a run's ``split_file`` may name
    it, and its images would change under it. The same files again are rewritten as they are."""
    other = [path for path, text in files.items() if path.is_file() and path.read_text() != text]
    if other:
        more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        raise DataError(f"{other[0]}{more} already lists other images (written for another root, split or options?): "
                        "pass --out another folder, or delete it to write these")
    for path, text in files.items():
        write_text_atomic(path, text)


def _images(dataset) -> list[str]:
    """A labeled dataset's images (its ``pairs``' first parts) or an unlabeled one's (``files``)."""
    return [image for image, _ in dataset.pairs] if hasattr(dataset, "pairs") else list(dataset.files)


def image_keys(dataset) -> set[str]:
    """What identifies each image of a dataset across splits: its resolved path (a split folder and
    a split file naming the same file agree), or its name where there are no files (the demo)."""
    root = getattr(dataset, "root", None)
    return {str((Path(root) / image).resolve()) if root is not None else image for image in _images(dataset)}


def copied_images(dataset, other) -> list[tuple[Path, Path]]:
    """``dataset``'s image files that are byte-identical copies of another file among ``other``'s
    (under another name), each with the first such file: sizes compared first, then the SHA-1 of
    equal sizes. An image that is one of ``other``'s own files is :func:`shared_images`' to count,
    and is not read."""
    root, other_root = getattr(dataset, "root", None), getattr(other, "root", None)
    if root is None or other_root is None:
        return []
    by_size: dict[int, list[Path]] = {}
    for image in _images(other):
        path = Path(other_root) / image
        by_size.setdefault(path.stat().st_size, []).append(path)
    others = {path.resolve() for paths in by_size.values() for path in paths}
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = hashlib.sha1(path.read_bytes()).hexdigest()
        return digests[path]

    copied = []
    for image in _images(dataset):
        path = Path(root) / image
        if path.resolve() in others:
            continue
        same = [candidate for candidate in by_size.get(path.stat().st_size, []) if digest(candidate) == digest(path)]
        if same:
            copied.append((path, same[0]))
    return copied


def shared_images(dataset, other) -> int:
    """How many of ``dataset``'s images are in ``other`` (a dataset or a set of :func:`image_keys`)."""
    return len(image_keys(dataset) & (other if isinstance(other, set) else image_keys(other)))


#: The training split of a fine-tuning run, in its folder: what ``ddep evaluate`` checks a reported split against.
TRAIN_RECORD = "train_split.txt"


def write_train_record(run_dir: str | os.PathLike, dataset) -> Path:
    """``<run>/train_split.txt``: the training split's images, one resolved path (or name) per line."""
    keys = sorted(image_keys(dataset))
    text = f"# the training split this run drew its labeled images from ({len(keys)} images)\n" + "".join(f"{k}\n" for k in keys)
    return write_text_atomic(Path(run_dir) / TRAIN_RECORD, text)


def read_train_record(model_path: str | os.PathLike) -> tuple[Path, set[str]] | None:
    """The training split recorded by the run a model comes from (``runs/x/model``,
    ``runs/x/checkpoints/last.pt``, or a folder ``ddep export`` wrote, which holds a copy), or None
    when there is no record (a model from elsewhere)."""
    path = Path(model_path)
    for run_dir in ((path,) if path.is_dir() else ()) + (path.parent, path.parent.parent):
        record = run_dir / TRAIN_RECORD
        if record.is_file():
            return record, {line for line in record.read_text().splitlines() if line and not line.startswith("#")}
    return None


def write_val_splits(
    dataset: str, pairs: Sequence[tuple[str, str]], amount: str, seeds: Sequence[int], out: str | os.PathLike
) -> list[tuple[Path, Path]]:
    """Hold ``amount`` of the pairs out as a reported split, once per seed: ``<out>/<dataset>/val<amount>/seed<k>/``
    ``train.txt`` and ``val.txt``, disjoint (for a folder of images without a val folder). Label
    fractions are then drawn from ``train.txt`` (``data.labeled``, or ``ddep splits --fractions``
    with ``-o split_file=.../train.txt``); fine-tuning refuses a val split that shares images with
    the training split. Returns each seed's (train, val) files."""
    count = num_selected(parse_amount(amount, "--val"), len(pairs))
    if count >= len(pairs):
        raise DataError(f"--val {amount} of {len(pairs)} images leaves none to train on")
    files, written = {}, []
    for seed in seeds:
        held = set(np.random.default_rng([seed, 2]).permutation(len(pairs))[:count].tolist())
        folder = Path(out) / dataset / f"val{amount_name(amount)}" / f"seed{seed}"
        train, val = folder / "train.txt", folder / "val.txt"
        files[train] = split_lines([p for i, p in enumerate(pairs) if i not in held])
        files[val] = split_lines([p for i, p in enumerate(pairs) if i in held])
        written.append((train, val))
    write_split_files(files)
    return written


class LabeledSubset(Dataset):
    """The chosen items of a labeled dataset, keeping its ``classes``, ``pairs`` and ``transform``."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        pairs = dataset.pairs  # may be built on each access (the demo data's are)
        self.pairs = [pairs[i] for i in self.indices]
        self.classes, self.num_classes = dataset.classes, dataset.num_classes
        self.root = getattr(dataset, "root", None)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]


def labeled_indices(dataset, amount: str | int | Fraction | None, seed: int = 0) -> list[int]:
    """The indices of ``amount`` of a labeled dataset's items (a fraction such as "1/8", or a
    count), chosen as :func:`write_splits` would choose them for ``seed``; a published split's
    name (``pascal/92``, ``cityscapes/1_16``: ``ddep.data.published``), its images; None: every item."""
    if amount is None:
        return list(range(len(dataset)))
    if isinstance(amount, str) and "/" in amount and not amount.replace("/", "").strip().isdigit():
        return published_indices(dataset, amount.strip())
    if not isinstance(amount, Fraction):
        amount = parse_amount(str(amount))
    return select_indices(len(dataset.pairs), amount, seed)


def published_indices(dataset, name: str) -> list[int]:
    """The indices of the published split ``name``'s images in ``dataset`` (matched by image path),
    in the split file's order; every one must be there."""
    from .published import DATASETS, SPLITS, published_images

    if name not in SPLITS:
        raise DataError(f"data.labeled={name!r} is not a published split; they are {', '.join(SPLITS)} (or give a "
                        "fraction such as 1/8, a count, or data.options.split_file)")
    position = {image: index for index, (image, _) in enumerate(dataset.pairs)}
    images = published_images(name)
    missing = [image for image in images if image not in position]
    if missing:
        raise DataError(f"data.labeled={name}: {len(missing)} of its {len(images)} images are not in the training split "
                        f"(first: {missing[0]}); it is a split of {DATASETS[SPLITS[name]]}'s training images")
    return [position[image] for image in images]


def labeled_subset(dataset, amount: str | int | Fraction, seed: int = 0) -> LabeledSubset:
    """``amount`` of a labeled dataset's items, as :func:`labeled_indices` chooses them."""
    return LabeledSubset(dataset, labeled_indices(dataset, amount, seed))


def hold_out(indices: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``indices`` into (trained on, held out): ``ceil(fraction * n)`` of them, seeded, held
    out to choose a checkpoint on, so that no choice is made on the reported split."""
    if not 0 < fraction < 1:
        raise DataError(f"data.select_fraction must be in (0, 1) to hold images out (0: none); got {fraction}")
    held = max(1, math.ceil(fraction * len(indices)))
    if held >= len(indices):
        raise DataError(f"data.select_fraction={fraction} of {len(indices)} labeled images leaves none to train on")
    order = np.random.default_rng([seed, 1]).permutation(len(indices))  # another stream than the labeled choice's
    chosen = set(order[:held].tolist())
    return [i for k, i in enumerate(indices) if k not in chosen], [i for k, i in enumerate(indices) if k in chosen]
