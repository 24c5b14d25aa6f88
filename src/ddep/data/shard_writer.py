"""``ddep shards``: an image tree written once as tar shards in the WebDataset layout (:mod:`.shards`).

Files are listed as the ``unlabeled`` dataset lists them and dealt to shards in the order of a hash
of their paths: every shard is then a random sample of the whole set (a class folder is spread over
all of them), and the same tree always gives the same shards. Each image is shrunk so that its
longer side is at most ``max_size``, re-encoded as JPEG and added to its shard; a file that cannot
be read is skipped and listed in the index with the reason.

Nothing half-written ever carries a final name: a shard is written under a temporary name and
renamed when complete, and ``index.json`` says ``complete: false`` (with the settings, a hash of the
listing and the shards finished so far) until the last shard is done. Rerun after a crash, the same
command keeps the finished shards and writes the rest; a folder written from other files or with
other settings is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import remove_stale_temporaries, write_atomic, write_text_atomic
from ..config import SHARD_MAX_SIZE as DEFAULT_MAX_SIZE
from ..config import SHARD_PER_SHARD as DEFAULT_PER_SHARD
from ..config import SHARD_QUALITY as DEFAULT_QUALITY
from .io import IMAGE_EXTENSIONS, DataError, read_image
from .labeled import require_dir
from .shards import FORMAT, IMAGE_MEMBER_EXTENSIONS, INDEX_FILE, VERSION, encode_key, parse_index, shard_keys, shard_name
from .unlabeled import cached_image_list, refuse_labeled_root

log = logging.getLogger(__name__)

SETTINGS = ("max_size", "quality", "per_shard")
SAVE_PROGRESS_SECONDS = 60.0  # how often the unfinished index records the shards finished so far


@dataclass(frozen=True)
class ShardTask:
    number: int
    files: list[str]
    source: Path
    output: Path
    max_size: int
    quality: int


def hashed_order(files: Iterable[str]) -> list[str]:
    """``files`` in the order of a hash of their paths: random-looking, the same on every machine."""
    return sorted(files, key=lambda name: hashlib.sha1(name.encode()).digest())


def listing_hash(files: list[str]) -> str:
    return hashlib.sha1("\n".join(files).encode()).hexdigest()


def encode_jpeg(path: Path, max_size: int, quality: int) -> bytes:
    """The image at ``path``, RGB, its longer side at most ``max_size``, as a baseline JPEG."""
    buffer = io.BytesIO()
    read_image(path, max_size=max_size).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard (atomically), or count the samples of one a crashed run finished."""
    path = task.output / shard_name(task.number)
    if path.exists():
        keys = set(shard_keys(path))
        return shard_entry(path, len(keys), [[name, "unreadable (skipped by an earlier run)"] for name in task.files
                                             if encode_key(name) not in keys])
    skipped: list[list[str]] = []

    def write(file) -> None:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in task.files:
                try:
                    data = encode_jpeg(task.source / name, task.max_size, task.quality)
                except DataError as e:
                    skipped.append([name, str(e)])
                    continue
                member = tarfile.TarInfo(f"{encode_key(name)}.jpg")  # mtime, owner 0: the same bytes every time
                member.size, member.mode = len(data), 0o644
                tar.addfile(member, io.BytesIO(data))

    write_atomic(path, write)
    return shard_entry(path, len(task.files) - len(skipped), skipped)


def shard_entry(path: Path, samples: int, skipped: list[list[str]]) -> dict[str, Any]:
    """A shard's line in the index: its file, sample count, size and skipped files with reasons."""
    return {"file": path.name, "samples": samples, "bytes": path.stat().st_size, "skipped": skipped}


def previous_index(output: Path, settings: dict[str, Any], files: int, listing: str) -> dict[str, Any] | None:
    """The index of an earlier run into ``output`` with these settings and files, if any; a folder
    holding shards of other files or settings, or shards without an index, is refused."""
    path = output / INDEX_FILE
    if not path.is_file():
        if any(output.glob("shard-*.tar")):
            raise DataError(f"{output} holds shard files but no {INDEX_FILE}: not written by `ddep shards`; use an empty --output")
        return None
    index = parse_index(path)
    differences = [f"{key} {index.get(key)} there, {value} here" for key, value in settings.items() if index.get(key) != value]
    if index.get("listing_sha1") != listing:
        differences.append(f"{index.get('files')} files listed there, {files} here" if index.get("files") != files
                           else "the same number of files but other names")
    if differences:
        raise DataError(f"{output} holds shards written from other files or settings ({'; '.join(differences)}): "
                        "use another --output, or remove that folder")
    return index


def write_shards(
    source: str | os.PathLike,
    output: str | os.PathLike,
    max_size: int = DEFAULT_MAX_SIZE,
    per_shard: int = DEFAULT_PER_SHARD,
    quality: int = DEFAULT_QUALITY,
    workers: int | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write the images under ``source`` as shards into ``output`` (see the module's docstring) and
    return the finished index. ``workers`` processes (default: every core) write whole shards."""
    for what, value, least in (("max_size", max_size, 16), ("per_shard", per_shard, 1), ("quality", quality, 1)):
        if not isinstance(value, int) or value < least or (what == "quality" and value > 100):
            raise DataError(f"{what} must be an integer {'in 1..100' if what == 'quality' else f'>= {least}'}, got {value!r}")
    source, output = require_dir(Path(source), "image folder").resolve(), Path(output)
    files = cached_image_list(source, cache_dir)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {source}")
    refuse_labeled_root(source, files, option="--input ", sources=False)
    output.mkdir(parents=True, exist_ok=True)
    settings = {"max_size": max_size, "quality": quality, "per_shard": per_shard}
    listing = listing_hash(files)
    earlier = previous_index(output, settings, len(files), listing) or {}
    remove_stale_temporaries(output)
    ordered = hashed_order(files)
    tasks = [ShardTask(n, ordered[start : start + per_shard], source, output, max_size, quality)
             for n, start in enumerate(range(0, len(ordered), per_shard))]
    done = {}
    for shard in earlier.get("shards", []):
        path = output / shard["file"]
        if path.is_file() and path.stat().st_size == shard["bytes"]:
            done[shard["file"]] = shard
        else:  # changed since the earlier run recorded it: written again
            path.unlink(missing_ok=True)
    index = {"format": FORMAT, "version": VERSION, "complete": False, **settings, "source": str(source), "files": len(files),
             "listing_sha1": listing, "samples": 0, "skipped": 0, "shards": []}

    def save(complete: bool) -> None:
        shards = sorted(done.values(), key=lambda shard: shard["file"])
        index.update(complete=complete, samples=sum(s["samples"] for s in shards), skipped=sum(len(s["skipped"]) for s in shards),
                     shards=shards)
        write_text_atomic(output / INDEX_FILE, json.dumps(index, indent=1))

    save(False)
    todo = [task for task in tasks if shard_name(task.number) not in done]
    results = run_each(write_shard, todo, workers)
    bar = _progress_bar(len(files), len(files) - sum(len(task.files) for task in todo), progress)  # after the fork
    saved_at = time.monotonic()
    for result in results:
        done[result["file"]] = result
        bar.update(result["samples"] + len(result["skipped"]))
        bar.set_postfix(skipped=sum(len(s["skipped"]) for s in done.values()), refresh=False)
        if time.monotonic() - saved_at > SAVE_PROGRESS_SECONDS:
            save(False)
            saved_at = time.monotonic()
    bar.close()
    if not sum(shard["samples"] for shard in done.values()):
        save(False)
        raise DataError(f"no readable images under {source} ({len(files)} files, none could be read)")
    save(True)
    return index


def count_shard(path: Path) -> dict[str, Any]:
    return shard_entry(path, len(shard_keys(path)), [])


def index_shards(folder: str | os.PathLike, workers: int | None = None) -> dict[str, Any]:
    """Write the index of tar shards written elsewhere in the WebDataset layout (timm's, OpenCLIP's,
    img2dataset's): every ``*.tar`` directly in ``folder``, its samples counted from the member
    headers, so that ``data.dataset: shards`` reads them. Returns the index."""
    folder = require_dir(Path(folder), "shard folder")
    if (folder / INDEX_FILE).exists():
        raise DataError(f"{folder / INDEX_FILE} exists already; remove it to index the shards again")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise DataError(f"no .tar files in {folder}")
    shards = sorted(run_each(count_shard, tars, workers), key=lambda shard: shard["file"])
    samples = sum(shard["samples"] for shard in shards)
    if not samples:
        raise DataError(f"{folder}: the .tar files hold no image members ({', '.join(IMAGE_MEMBER_EXTENSIONS)})")
    index = {"format": FORMAT, "version": VERSION, "complete": True, "source": None, "files": samples, "samples": samples,
             "skipped": 0, "shards": shards}
    write_text_atomic(folder / INDEX_FILE, json.dumps(index, indent=1))
    return index


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_each(function: Callable[[Any], dict[str, Any]], tasks: list, workers: int | None = None) -> Iterator[dict[str, Any]]:
    """``function(task)`` for every task, results as they finish, in ``workers`` processes (default:
    every core; forked where the OS allows, so that torch is not imported again), or in this one
    for one. The processes start before this returns; a process that dies (killed for memory, say)
    raises ``BrokenProcessPool`` instead of leaving the loop waiting for its result."""
    workers = max(1, min(workers or usable_cores(), len(tasks)))
    if workers == 1:
        return map(function, tasks)
    methods = multiprocessing.get_all_start_methods()
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork" if "fork" in methods else None))
    futures = [pool.submit(function, task) for task in tasks]

    def results() -> Iterator[dict[str, Any]]:
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:  # on an error or Ctrl-C: no new tasks, the ones in flight finish (their shards are whole)
            pool.shutdown(wait=True, cancel_futures=True)

    return results()


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="shards", unit="img", dynamic_ncols=True, disable=not enabled)
