"""A run folder (``<out_dir>/<name>/``) and the process set-up every command shares."""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..atomic import remove_stale_temporaries
from ..config import DEFAULTS, RESULT_NEUTRAL_KEYS, save_config
from ..models.registry import config_options
from ..models.segmenter import SegmentationModel
from ..models.transunet import PATCH_STRIDE
from .checkpoint import checkpoint_path, resumable_checkpoints
from .distributed import DistInfo, init_distributed, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Run:
    dir: Path
    dist: DistInfo
    device: torch.device
    resumed: bool = False


def last_checkpoint(config: dict[str, Any]) -> Path:
    """Where a training run's resumable checkpoint lives."""
    return checkpoint_path(Path(config["out_dir"]) / config["name"])


def can_resume(config: dict[str, Any]) -> bool:
    """Whether the run has a checkpoint to resume from (the last one, or the one before it)."""
    return bool(resumable_checkpoints(last_checkpoint(config)))


def check_input_size(config: dict[str, Any]) -> None:
    """TransUNet needs sides that are multiples of its 16-pixel patches: refuse other crops up front
    (``model`` describes an ``init`` model too: :func:`ddep.engine.finetune.with_init`)."""
    arch = config["model"]["arch"]
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
    section = dict(arch=c["arch"], encoder=c["encoder"], encoder_weights=c["encoder_weights"], decoder_width=c["decoder_width"],
                   options=config_options(c))
    return {**config, "model": section}


def config_differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """``key: A there, B here`` for every setting that differs, the result-neutral ones left out.

    A key the saved config lacks (a run made by an older ddep) counts as its default, and a setting
    this ddep no longer has (``data.val_batch_size``, say) is not compared; with the same ``init``,
    the model is init's either way, so the ``model`` sections are not compared."""
    defaults = next((d for d in DEFAULTS.values() if d.keys() == config.keys()), {})
    same_init = bool(saved.get("init")) and saved.get("init") == config.get("init")
    skip = {*RESULT_NEUTRAL_KEYS, *(["model"] if same_init else [])}
    return _differences({k: v for k, v in saved.items() if k not in skip}, {k: v for k, v in config.items() if k not in skip},
                        {k: v for k, v in defaults.items() if k not in skip})


def _differences(saved: dict[str, Any], config: dict[str, Any], defaults: dict[str, Any], prefix: str = "",
                 options: bool = False) -> list[str]:
    """``options``: the keys are a dataset's or a model's options, which have no defaults here."""
    out = []
    for key in sorted(set(saved) | set(config)):
        if key not in config and not options:
            continue  # a setting an older ddep had
        default = defaults.get(key)
        a, b = saved.get(key, default), config.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, default if isinstance(default, dict) and key != "options" else {}, f"{prefix}{key}.",
                                options or key == "options")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} here")
    return out


def resolve_resume(config: dict[str, Any], resume: bool | str | None) -> bool:
    """Whether a training run resumes. ``True``: it must (a checkpoint must exist); ``False``: it
    must not (a folder holding a run is refused); ``"auto"``: it resumes a run made with the same
    config, starts when the folder holds none, and refuses one made with another config. None
    takes ``config["resume"]``; a group torchrun restarts (``TORCHELASTIC_RESTART_COUNT`` > 0)
    counts False as ``"auto"``, so that it continues from the last checkpoint."""
    resume = config["resume"] if resume is None else resume
    if resume is False and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"
    run_dir = Path(config["out_dir"]) / config["name"]
    resumable = can_resume(config)
    if resume == "auto":
        saved = run_dir / "config.yaml"
        if resumable and saved.is_file():
            differences = config_differences(yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(yaml.safe_dump(config)))
            if differences:
                raise FileExistsError(f"{run_dir} holds a run made with another config ({'; '.join(differences[:3])}): "
                                      "name=... for a new run, or --resume to continue it anyway")
        return resumable
    if resume and not resumable:
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last_checkpoint(config)}")
    if not resume and resumable:
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume (or --resume auto) to continue it, "
                              "or name=... for a new run")
    return bool(resume)


def start_run(config: dict[str, Any], resume: bool | str | None = None, training: bool = True) -> Run:
    """Check the run folder before any work (see :func:`resolve_resume`), seed everything, save
    the resolved config."""
    dist_info = init_distributed(config["device"], config["dist_timeout_minutes"])
    device = resolve_device(config["device"], dist_info)
    run_dir = Path(config["out_dir"]) / config["name"]
    resumed = training and resolve_resume(config, resume)
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
        if not resumed:  # a resumed run's is rewritten once its checkpoint has loaded (Trainer.load)
            save_config(config, run_dir / "config.yaml")
        remove_stale_temporaries(checkpoint_path(run_dir).parent)
    seed = config["seed"] + dist_info.rank
    random.seed(seed)
    torch.manual_seed(seed)
    configure_kernels(device, training, bool(config.get("deterministic")))
    return Run(run_dir, dist_info, device, resumed)


def configure_kernels(device: torch.device, training: bool, deterministic: bool) -> None:
    """Deterministic kernels when asked; otherwise, when training on a GPU, let cuDNN time its
    convolution algorithms once per input shape and keep the fastest, as mmsegmentation does
    (training crops have one shape; evaluation, whose images vary, turns it off meanwhile).

    On a GPU, deterministic cuBLAS needs a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, set here
    before the first matmul unless already set), and a few CUDA kernels have no deterministic
    version (the backward of bilinear upsampling and of adaptive average pooling): they warn
    instead of stopping the run, so there a run is as deterministic as PyTorch allows, not bit
    for bit."""
    on_gpu = device.type == "cuda"
    if deterministic and on_gpu and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_initialized():  # from Python, after other GPU work: cuBLAS may keep the workspace it has
            log.warning("deterministic=true: CUBLAS_WORKSPACE_CONFIG is set after CUDA started in this process, so cuBLAS "
                        "may not use it; set CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting Python")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(deterministic, warn_only=deterministic and on_gpu)
    torch.backends.cudnn.benchmark = training and device.type == "cuda" and not deterministic
