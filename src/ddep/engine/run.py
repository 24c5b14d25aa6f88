"""A run folder (``<out_dir>/<name>/``) and the process set-up every command shares."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import save_config
from .distributed import DistInfo, init_distributed, resolve_device


@dataclass
class Run:
    dir: Path
    dist: DistInfo
    device: torch.device


def last_checkpoint(config: dict[str, Any]) -> Path:
    """Where a training run's resumable checkpoint lives."""
    return Path(config["out_dir"]) / config["name"] / "checkpoints" / "last.pt"


def start_run(config: dict[str, Any], resume: bool = False, training: bool = True) -> Run:
    """Check the run folder before any work, seed everything, save the resolved config."""
    dist_info = init_distributed(config["device"])
    device = resolve_device(config["device"], dist_info)
    run_dir = Path(config["out_dir"]) / config["name"]
    last = last_checkpoint(config)
    if training and resume and not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last}")
    if training and not resume and last.is_file():
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or name=... for a new run")
    if dist_info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise PermissionError(f"cannot write to the run folder {run_dir}: {e.strerror}") from None
        save_config(config, run_dir / "config.yaml")
    seed = config["seed"] + dist_info.rank
    random.seed(seed)
    torch.manual_seed(seed)
    if config.get("deterministic"):
        torch.use_deterministic_algorithms(True)
    return Run(run_dir, dist_info, device)
