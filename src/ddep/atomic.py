"""Atomic file writes: a crash leaves the old file or the new one, never half of one."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object], keep_previous: str | os.PathLike | None = None) -> Path:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    With ``keep_previous``, the file being replaced is first linked (or copied) there, so that
    ``path`` exists at every moment: a crash leaves the old file at ``path`` and ``keep_previous``,
    or the new one at ``path`` and the old at ``keep_previous``.

    A failure (a full disk, say) removes the temporary file and raises an ``OSError`` that names
    ``path``: a write error names no file by itself."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            _link_or_copy(path, Path(keep_previous))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    fsync_dir(path.parent)
    return path


def write_error(error: OSError, path: str | os.PathLike) -> OSError:
    """``error`` as an ``OSError`` of the same kind that names ``path`` (a write error names no file by itself)."""
    return OSError(error.errno, f"cannot write {path}: {error.strerror or error}")


def _link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` the content of ``source``, atomically (through a temporary name)."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(source, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(target)


def fsync_dir(folder: Path) -> None:
    """Make the renames themselves durable (where the OS allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode()))


def remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.NAME.tmpPID`` files left by processes killed while saving (not a live one's)."""
    for stale in folder.glob(".*.tmp*"):
        pid = stale.name.rpartition(".tmp")[2]
        if pid.isdigit() and process_alive(int(pid)):
            continue
        stale.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
