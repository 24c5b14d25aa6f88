"""A run folder (``<out_dir>/<name>/``) and the process set-up every command shares."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import save_config
from ..models.segmenter import SegmentationModel
from ..models.transunet import PATCH_STRIDE
from .checkpoint import checkpoint_path, resumable_checkpoints
from .distributed import DistInfo, init_distributed, resolve_device


@dataclass
class Run:
    dir: Path
    dist: DistInfo
    device: torch.device


def last_checkpoint(config: dict[str, Any]) -> Path:
    """Where a training run's resumable checkpoint lives."""
    return checkpoint_path(Path(config["out_dir"]) / config["name"])


def can_resume(config: dict[str, Any]) -> bool:
    """Whether the run has a checkpoint to resume from (the last one, or the one before it)."""
    return bool(resumable_checkpoints(last_checkpoint(config)))


def remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.NAME.tmpPID`` files left by processes killed while saving (not a live one's)."""
    for stale in folder.glob(".*.tmp*"):
        pid = stale.name.rpartition(".tmp")[2]
        if pid.isdigit() and _alive(int(pid)):
            continue
        stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_input_size(config: dict[str, Any]) -> None:
    """TransUNet needs sides that are multiples of its 16-pixel patches: refuse other crops up front."""
    arch = config["model"]["arch"] if not config.get("init") else None  # an init checkpoint brings its own
    crop = config["data"].get("crop_size")
    if arch == "transunet" and crop is not None and crop % PATCH_STRIDE:
        raise ValueError(f"data.crop_size={crop}: TransUNet needs a multiple of {PATCH_STRIDE} (its patch size), "
                         f"e.g. {-(-crop // PATCH_STRIDE) * PATCH_STRIDE}")


def with_model(config: dict[str, Any], model: SegmentationModel | None) -> dict[str, Any]:
    """``config`` whose ``model`` section describes ``model`` (a model passed in from Python)."""
    if model is None:
        return config
    if config.get("init"):
        raise ValueError("pass either init=... or a model, not both")
    c = model.config
    options = {k: v for k, v in c.items() if k not in ("arch", "encoder", "encoder_weights", "decoder_width", "classes", "mean", "std")}
    section = dict(arch=c["arch"], encoder=c["encoder"], encoder_weights=c["encoder_weights"], decoder_width=c["decoder_width"], options=options)
    return {**config, "model": section}


def start_run(config: dict[str, Any], resume: bool = False, training: bool = True) -> Run:
    """Check the run folder before any work, seed everything, save the resolved config."""
    dist_info = init_distributed(config["device"])
    device = resolve_device(config["device"], dist_info)
    run_dir = Path(config["out_dir"]) / config["name"]
    resumable = training and can_resume(config)
    if training and resume and not resumable:
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last_checkpoint(config)}")
    if not resume and resumable:
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or name=... for a new run")
    if training:
        check_input_size(config)
    if dist_info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise PermissionError(f"cannot write to the run folder {run_dir}: {e.strerror}") from None
        save_config(config, run_dir / "config.yaml")
        remove_stale_temporaries(checkpoint_path(run_dir).parent)
    seed = config["seed"] + dist_info.rank
    random.seed(seed)
    torch.manual_seed(seed)
    configure_kernels(device, training, bool(config.get("deterministic")))
    return Run(run_dir, dist_info, device)


def configure_kernels(device: torch.device, training: bool, deterministic: bool) -> None:
    """Deterministic kernels when asked; otherwise, when training on a GPU, let cuDNN time its
    convolution algorithms once per input shape and keep the fastest, as mmsegmentation does
    (training crops have one shape; evaluation, whose images vary, turns it off meanwhile)."""
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = training and device.type == "cuda" and not deterministic
