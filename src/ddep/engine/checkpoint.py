"""Checkpoints: written atomically, read without executing pickled code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (model and optimizer state,
the step, RNG states, the model config and the run config), so ``torch.load(weights_only=True)``
reads it and a file that needs anything else is refused.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomic


log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds pickled objects other than tensors: refused, never a fallback."""


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``last.pt`` -> ``last-previous.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-previous{path.suffix}")


def checkpoint_path(run_dir: str | os.PathLike, name: str = "last.pt") -> Path:
    """Where a run folder keeps the checkpoint called ``name``."""
    return Path(run_dir) / "checkpoints" / name


def resumable_checkpoints(path: str | os.PathLike) -> list[Path]:
    """The files a run could resume from, in the order to try them: ``path``, then the one it replaced."""
    return [p for p in (Path(path), previous_checkpoint(path)) if p.is_file()]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike, keep_previous: bool = False) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``:
    a crash leaves either the old checkpoint or the new one, never half of one. With
    ``keep_previous`` the replaced one stays as :func:`previous_checkpoint`, the fallback if this
    one is ever found damaged."""
    write_atomic(path, lambda f: torch.save(state, f), previous_checkpoint(path) if keep_previous else None)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the global it refused; other unpickling errors are damaged bytes
        refused = [line.strip() for line in str(e).splitlines() if "global" in line.lower()]
        if refused:
            raise UnsafeCheckpointError(f"{path}: refused, it holds pickled objects other than tensors ({refused[0][:200]})") from None
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint (UnpicklingError)") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files raise many kinds of errors
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path}: not a ddep checkpoint (expected 'model' and 'model_config')")
    return state


def load_resumable(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path]:
    """``path``, or when it is missing, truncated or corrupt, the previous checkpoint it replaced
    (with a warning; the damaged file is renamed ``*.damaged`` so that the next save cannot
    rotate it over the good one); a checkpoint that holds pickled code is refused outright."""
    path = Path(path)
    problems = []
    for candidate in resumable_checkpoints(path):
        try:
            return load_checkpoint(candidate, map_location), candidate
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            problems.append(str(e))
            if candidate == path:
                candidate.replace(candidate.with_name(candidate.name + ".damaged"))
                log.warning("%s; kept as %s.damaged, resuming from the previous checkpoint", e, candidate.name)
    raise CheckpointError("; ".join(problems) if problems else f"no checkpoint to resume from at {path}")
