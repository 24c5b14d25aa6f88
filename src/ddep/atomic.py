"""Atomic file writes: a crash leaves the old file or the new one, never half of one."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object], keep_previous: str | os.PathLike | None = None) -> Path:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    With ``keep_previous``, the file being replaced is first renamed there (a crash between the
    two renames leaves the new file as the temporary one and the old one as ``keep_previous``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous is not None and path.exists():
        path.replace(keep_previous)
    tmp.replace(path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode()))
