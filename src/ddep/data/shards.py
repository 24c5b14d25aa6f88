"""Unlabeled images from tar shards in the WebDataset layout, read sequentially at full speed.

Layout (written by ``ddep shards``, :mod:`ddep.data.shard_writer`): ``<root>/index.json`` and
``<root>/shard-NNNNNN.tar``. Each tar holds one ``<key>.jpg`` member per sample; the key is the
image's path relative to the source folder with ``%`` and ``.`` percent-encoded
(``n01440764/n01440764_10026%2EJPEG``; ``urllib.parse.unquote`` gives the path back), so keys are
unique, stable, and free of the dot at which WebDataset splits a member's name into key and
extension. The index holds every shard's sample count and size: a run knows its epoch without
opening a shard.

Order: the shards of epoch e are a permutation seeded by (seed, e); the endless sequence of the
epochs' shards is dealt round-robin to the (rank, data-loader worker) slots, so that each shard is
read by exactly one slot per epoch. A slot reads ``shuffle_shards`` of its shards at a time, whole
and sequentially, and yields their samples in a seeded random order; every sample's augmentation
is seeded by (seed, epoch, sample index). All of it follows from the index, the seed and the
numbers of processes and workers, so a resumed run skips the batches already taken without reading
them and continues exactly where it stopped (docs/DATA.md).
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import os
import tarfile
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..choices import check_choice
from ..config import CHOICES
from .io import IMAGE_EXTENSIONS, DataError, check_complete, open_image, read_image
from .labeled import require_dir
from .seeds import sample_seed, seeded
from .transforms import ToTensor, Transform

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FORMAT = "ddep-shards"
VERSION = 1
IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def encode_key(relative_path: str) -> str:
    """A sample key for an image path: ``%`` and ``.`` percent-encoded (unique, reversible, no dot)."""
    return relative_path.replace("%", "%25").replace(".", "%2E")


def decode_key(key: str) -> str:
    return urllib.parse.unquote(key)


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def split_member_name(name: str) -> tuple[str, str]:
    """``(key, extension)`` as WebDataset splits a member's name: at the first dot of its base name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def image_members(tar: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """``(key, member)`` for each sample of a tar: the first image member (.jpg .jpeg .png .webp) of
    each key, in the tar's order; other members (labels, captions) are ignored."""
    seen = set()
    for member in tar:
        key, extension = split_member_name(member.name)
        if member.isfile() and extension in IMAGE_MEMBER_EXTENSIONS and key not in seen:
            seen.add(key)
            yield key, member


@contextlib.contextmanager
def _tar_errors(path: str | os.PathLike) -> Iterator[None]:
    try:
        yield
    except tarfile.TarError as e:
        raise DataError(f"{path}: not a readable tar shard ({e})") from None


def shard_samples(data: bytes, path: str | os.PathLike) -> list[tuple[str, memoryview]]:
    """``(key, encoded image)`` of each sample of a shard held in memory (read in one sequential read)."""
    view = memoryview(data)
    with _tar_errors(path), tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(key, view[member.offset_data : member.offset_data + member.size]) for key, member in image_members(tar)]


def shard_keys(path: Path) -> list[str]:
    """The sample keys of a shard file, from its member headers alone (the images are not read)."""
    with _tar_errors(path), tarfile.open(path, mode="r:") as tar:
        return [key for key, _ in image_members(tar)]


def parse_index(path: Path) -> dict[str, Any]:
    """The content of an ``index.json``; one that is not JSON or not ddep's format is a one-line error."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not an index written by `ddep shards` (format {FORMAT!r} expected)")
    if index.get("version", VERSION) > VERSION:
        raise DataError(f"{path}: index version {index['version']}, newer than this ddep reads ({VERSION}); update ddep")
    return index


def read_index(root: Path) -> dict[str, Any]:
    """The finished index of a shard folder; a missing, foreign or unfinished one is a one-line error."""
    path = root / INDEX_FILE
    if not path.is_file():
        if root.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*")):
            raise DataError(f"{root} holds images, not tar shards: data.dataset=unlabeled reads them as they are, or write "
                            f"shards of them elsewhere with `ddep shards --input {root} --output SHARDS` and give data.root=SHARDS")
        raise DataError(f"{root}: no {INDEX_FILE}; write shards there with `ddep shards --input IMAGES --output {root}`")
    index = parse_index(path)
    if not index.get("complete"):
        raise DataError(f"{path}: the shards are not finished; run the same `ddep shards` command again to finish them")
    return index


class ShardImages(IterableDataset):
    """The samples of a shard folder; items ``{"image", "name"}`` (``name``: the source path).

    ``shuffle_shards``: how many shards a data-loader worker holds in memory and shuffles together
    (each shard is a random sample of the whole set already: ``ddep shards`` deals files to shards
    in a hashed order). ``decode="gpu"``: workers hand over the JPEG bytes and a seed, and
    :meth:`decode_batch` decodes and augments them on the training device.

    Iterated directly or in a user's DataLoader it reads one endless stream with seed 0, split over
    the ``torch.distributed`` ranks and the loader's workers; :meth:`stream` sets the seed, the
    process and the resume point, as the Trainer does.
    """

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None, shuffle_shards: int = 2,
                 decode: str = "cpu") -> None:
        self.root = require_dir(Path(root), "shard folder")
        check_choice("data.decode", decode, CHOICES["data.decode"])
        if decode == "gpu":
            require_batched_jpeg_decoding()
        if not isinstance(shuffle_shards, int) or shuffle_shards < 1:
            raise DataError(f"shuffle_shards must be an integer >= 1, got {shuffle_shards!r}")
        index = read_index(self.root)
        self.shards: list[str] = []
        self.counts: list[int] = []
        for shard in index["shards"]:
            path = self.root / shard["file"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{path}: listed in {self.root / INDEX_FILE} but missing") from None
            if size != shard["bytes"]:
                raise DataError(f"{path}: {size} bytes, but {INDEX_FILE} says {shard['bytes']} (a partial copy?)")
            if shard["samples"]:
                self.shards.append(shard["file"])
                self.counts.append(shard["samples"])
        if not self.shards:
            raise DataError(f"{self.root}: the shards hold no images")
        self.offsets = [0, *itertools.accumulate(self.counts)][:-1]
        self.source = index.get("source")  # the folder the shards were written from (resolved), if recorded
        self.transform = transform or ToTensor()
        self.shuffle_shards, self.decode = shuffle_shards, decode
        self.seed, self.rank, self.world_size, self.batch_size, self.start = 0, None, None, 1, 0
        self.unreadable: set[str] = set()  # samples found unreadable (in this process), never decoded again
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def skipped(self) -> int:
        """How many distinct samples were found unreadable so far (in this process)."""
        return len(self.unreadable)

    def stream(self, seed: int, rank: int, world_size: int, batch_size: int, start: int = 0) -> ShardImages:
        """This dataset as process ``rank`` of ``world_size`` reads it, in batches of ``batch_size``,
        from the ``start``-th batch of that process on (a resumed run's: steps x accumulation)."""
        positioned = copy.copy(self)
        positioned.seed, positioned.rank, positioned.world_size = seed, rank, world_size
        positioned.batch_size, positioned.start = batch_size, start
        positioned.unreadable, positioned._orders = set(), {}
        return positioned

    # ----- the order: a function of the index, the seed and the slots
    def shard_at(self, t: int) -> int:
        """The shard read at position ``t`` of the endless sequence: epoch ``t // S``'s permutation."""
        epoch, position = divmod(t, len(self.shards))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -3))
            self._orders = {epoch: torch.randperm(len(self.shards), generator=generator).tolist()}
        return self._orders[epoch][position]

    def blocks(self, slot: int, slots: int) -> Iterator[list[tuple[int, int]]]:
        """Endless ``[(t, shard), ...]`` groups that ``slot`` of ``slots`` reads: positions ``slot``,
        ``slot + slots``, ... of the sequence, ``shuffle_shards`` at a time within one epoch."""
        t, block = slot, []
        while True:
            if block and (len(block) == self.shuffle_shards or t // len(self.shards) != block[0][0] // len(self.shards)):
                yield block
                block = []
            block.append((t, self.shard_at(t)))
            t += slots

    def _slot(self) -> tuple[int, int, int]:
        """This reader's slot, the number of slots, and how many of its samples a resumed run has taken.

        The DataLoader takes batch i from worker i % W; a loader restarted after ``start`` batches
        takes its batch j, the uninterrupted run's batch start + j, from its worker j % W, which
        therefore plays worker (j + start) % W."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        rank, world_size = self.rank, self.world_size
        if rank is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        role = (worker + self.start) % workers
        taken = (self.start - role + workers - 1) // workers  # batches i < start with i % workers == role
        return rank * workers + role, world_size * workers, taken * self.batch_size

    def __iter__(self) -> Iterator[dict]:
        slot, slots, skip = self._slot()
        if slot == 0 and len(self.shards) < slots * self.shuffle_shards:
            log.warning("%s: %d shards for %d readers x shuffle_shards=%d: readers shuffle fewer shards together, and some "
                        "read the same shards (of other epochs) at the same time; write smaller shards (ddep shards "
                        "--per-shard) for this many processes and workers", self.root, len(self.shards), slots, self.shuffle_shards)
        for block in self.blocks(slot, slots):
            size = sum(self.counts[shard] for _, shard in block)
            if skip >= size:  # taken before a resume: not even read
                skip -= size
                continue
            yield from self._block_items(block, skip)
            skip = 0

    def _block_items(self, block: list[tuple[int, int]], skip: int) -> Iterator[dict]:
        """The samples of one group of shards, read whole, in the group's seeded order, from ``skip`` on."""
        samples = [(t, shard, i, key, data) for t, shard in block for i, (key, data) in enumerate(self._read(shard))]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, block[0][0], -2))
        order = [samples[i] for i in torch.randperm(len(samples), generator=generator).tolist()]
        for position in range(skip, len(order)):
            yield self._item(order, position)

    def _read(self, shard: int) -> list[tuple[str | None, memoryview | None]]:
        """A shard's samples; a damaged shard's missing ones are ``(None, None)``, replaced like
        unreadable images, so that positions, and with them exact resume, hold."""
        path = self.root / self.shards[shard]
        try:
            samples = shard_samples(path.read_bytes(), path)
            problem = f"{len(samples)} images, but {INDEX_FILE} says {self.counts[shard]}" if len(samples) != self.counts[shard] else ""
        except (DataError, OSError) as e:
            samples, problem = [], str(e)
        if problem:
            log.warning("%s: %s; its missing images are replaced by others of its group", path, problem)
            samples = (samples + [(None, None)] * self.counts[shard])[: self.counts[shard]]
        return samples

    # ----- one sample
    def _item(self, order: Sequence[tuple], position: int) -> dict:
        """The sample at ``position`` of a block's order, seeded by its (epoch, index); when it cannot
        be read, the next readable one in that order takes its place (as for folders)."""
        t, shard, i, _, _ = order[position]
        seed = sample_seed(self.seed, t // len(self.shards), self.offsets[shard] + i)
        for attempt in range(len(order)):
            key, view = order[(position + attempt) % len(order)][3:]
            if key is None:  # lost with a damaged shard
                continue
            name = decode_key(key)
            if name in self.unreadable:
                continue
            try:
                data = bytes(view)
                if self.decode == "gpu":  # the device decodes: here only what is cheap to check
                    check_jpeg(name, data)
                    return {"jpeg": data, "seed": seed, "name": name}
                image = read_image(name, data=data)
            except DataError as e:
                self.unreadable.add(name)
                log.warning("skipping unreadable image (%d skipped so far): %s", self.skipped, e)
                continue
            with seeded(seed):
                return self.transform({"image": image, "name": name})
        raise DataError(f"{self.root}: no readable image in shards {sorted({self.shards[s[1]] for s in order})}")

    def decode_batch(self, batch: dict, device: torch.device) -> dict:
        """``decode="gpu"``: a batch's JPEG bytes decoded on ``device`` (nvJPEG on a GPU, libjpeg-turbo
        on a CPU) and augmented there with each sample's seed, as a worker would have on the CPU."""
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch["jpeg"]]
        names = list(batch["name"])
        try:
            images = decode_jpegs(encoded, device)
        except RuntimeError:  # damaged beyond what the workers check: one by one
            images, names = self._decode_each(encoded, names, device)
        out = []
        for image, seed in zip(images, batch["seed"].tolist()):
            with seeded(seed):
                out.append(self.transform({"image": image})["image"])
        return {"image": torch.stack(out), "name": names}

    def _decode_each(self, encoded: list[torch.Tensor], names: list[str], device: torch.device) -> tuple[list, list[str]]:
        """Each image decoded alone; one that fails takes the next decodable image of the batch (and its name)."""
        images: list[torch.Tensor | None] = []
        for data, name in zip(encoded, names):
            try:
                images.append(decode_jpegs(data, device))
            except RuntimeError as e:
                log.warning("skipping an image the device cannot decode: %s (%s)", name, str(e).splitlines()[0])
                images.append(None)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise DataError(f"{self.root}: no image of a batch of {len(names)} could be decoded ({names[0]}, ...)")
        take = [i if images[i] is not None else next((j for j in good if j > i), good[0]) for i in range(len(images))]
        return [images[j] for j in take], [names[j] for j in take]


def decode_jpegs(encoded: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """torchvision's ``decode_jpeg`` (RGB) on ``device``. On a GPU the current stream is drained
    first: nvJPEG's hardware decoder writes its outputs without waiting for the kernels queued on
    that stream, so it can be handed memory they still read, freed by the step before, and
    overwrite it (pytorch/vision#9606, reported there on an H100). The trainer waits on the GPU at
    every micro-batch anyway (the loss's value); this puts the wait before the decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def check_jpeg(name: str, data: bytes) -> None:
    """What ``decode="gpu"`` checks before the device decodes: a JPEG (other formats need
    ``decode="cpu"``) that is not cut short: its segments and entropy-coded data, walked from the
    start, reach the end-of-image marker (:func:`~ddep.data.io.jpeg_end`). Bytes after that marker
    (padding, an appended preview: PIL and torchvision ignore them) are allowed."""
    image = open_image(name, data)
    if image.format != "JPEG":
        raise DataError(f"{name}: {image.format} image; data.decode=gpu decodes JPEGs only (data.decode=cpu reads any)")
    check_complete(name, image.format, data)


def require_batched_jpeg_decoding() -> None:
    """``decode="gpu"`` decodes a batch with one ``decode_jpeg`` call on a list, which older
    torchvision releases do not take."""
    import torchvision

    version = tuple(int(part) for part in torchvision.__version__.split("+")[0].split(".")[:2])
    if version < (0, 20):
        raise DataError(f"data.decode=gpu needs torchvision >= 0.20 (decode_jpeg on a list of images); found {torchvision.__version__}")
