"""Exported models: weights as safetensors plus a JSON config; loading never unpickles code.

A folder of smp's own ``save_pretrained`` layout (``ddep export``'s ``smp/``, or a user's) loads
too: its config.json has smp's keys, and the model is rebuilt as ``smp:<Arch>`` without any download.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..atomic import write_atomic, write_text_atomic
from .registry import build_model
from .segmenter import SegmentationModel
from .smp_models import config_from_smp, is_smp_config

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STAGE_KEY = "ddep_stage"  # in the weights file's header: "pretrain" for what denoising pretraining made


def save_model(model: SegmentationModel, directory: str | os.PathLike, stage: str | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each atomically).
    ``stage`` goes into the weights file's header, so that the file, copied or exported anywhere,
    still says it is a pretraining result."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = dict(model.config, encoder_weights=None)  # the weights are in the file itself
    metadata = {STAGE_KEY: stage} if stage else None
    write_atomic(directory / WEIGHTS_FILE, lambda f: f.write(safetensors_bytes(state, metadata=metadata)))
    write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2))
    return directory


def _config_of_built(config: dict) -> dict:
    """The full config of the model ``config`` builds (the defaults it leaves out filled in): built
    on the meta device, which holds no weights, or, should that fail, as usual."""
    try:
        with torch.device("meta"):
            return build_model(**dict(config, encoder_weights=None)).config
    except Exception:  # noqa: BLE001 - an initialiser the meta device lacks, say: build it for real
        return build_model(**dict(config, encoder_weights=None)).config


def model_from_state(config: dict, state: dict[str, torch.Tensor], source: str) -> SegmentationModel:
    """Build ``config``'s architecture without downloading anything and load ``state`` into it."""
    if "arch" not in config:
        raise ValueError(f"{source}: its model config names no architecture ('arch')")
    try:
        model = build_model(**dict(config, encoder_weights=None))
    except TypeError as e:  # a config key build_model does not take
        raise ValueError(f"{source}: not a ddep model config ({e})") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        names = (missing + unexpected + misshapen)[:3]
        raise ValueError(
            f"{source}: weights do not fit the model config ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(misshapen)} of another shape, e.g. {', '.join(names)})"
        )
    model.load_state_dict(state)
    return model


def pretraining_result(path: str | os.PathLike) -> bool:
    """Whether ``path`` is what denoising pretraining made: a checkpoint of a pretraining run, a
    weights file whose header says so (a pretraining run's ``model/``, ``ddep export`` of one), or
    the ``model/`` of a run folder whose config.yaml is a pretraining config (written before the
    header said so). Such a model predicts noise (or the clean image), not classes: scoring or
    drawing its three output channels as classes would give a number or masks that mean nothing."""
    weights = model_file(path)
    if not weights.is_file():
        return False  # load_model's to report
    try:
        if weights.suffix != ".safetensors":  # a checkpoint, memory-mapped (a zip file): only its "stage" is read
            return torch.load(weights, map_location="cpu", weights_only=True, mmap=True).get("stage") == "pretrain"
        with safe_open(weights, "pt") as f:  # the header only
            if (f.metadata() or {}).get(STAGE_KEY) == "pretrain":
                return True
    except Exception:  # noqa: BLE001 - not a ddep checkpoint or model, or unreadable: load_model's to report
        return False
    run_dir = weights.parent.parent  # runs/x/model/model.safetensors -> runs/x, when it is a run's folder
    if weights.parent.name != "model" or not (run_dir / "checkpoints").is_dir() or not (run_dir / "config.yaml").is_file():
        return False
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and "noise" in config and "mode" in config


def refuse_pretraining_result(checkpoint: str | os.PathLike, command: str) -> None:
    """A pretraining result predicts noise, not classes: refused by ``evaluate`` and ``predict``."""
    if pretraining_result(checkpoint):
        raise ValueError(f"{checkpoint} is a denoising-pretraining result: it predicts noise, not classes. Fine-tune it "
                         f"first (ddep finetune init={checkpoint} ...), then {command} the fine-tuned model")


def model_file(path: str | os.PathLike) -> Path:
    """The weights file of an exported model folder; any other path as it is."""
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def _exported_config(path: Path) -> dict:
    """The config.json beside an exported ``model.safetensors`` as :func:`build_model`'s arguments
    (smp's keys mapped, see :func:`~ddep.models.smp_models.config_from_smp`), in one-line errors."""
    config_path = path.with_name(CONFIG_FILE)
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} beside it")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: not a readable model config ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a model config (a JSON object)")
    if is_smp_config(config):
        return config_from_smp(config, str(config_path.parent))
    if "arch" not in config:
        raise ValueError(f"{config_path}: neither a ddep nor an smp model config (no 'arch', no '_model_class'); give the "
                         "folder that ddep export or training wrote (its model/), or smp's save_pretrained folder")
    return config


def read_model_config(path: str | os.PathLike) -> dict:
    """The model config of an exported model folder (ddep's or smp's) or a checkpoint, without
    loading the weights."""
    path = model_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    if path.suffix == ".safetensors":
        config = _exported_config(path)
        if "mean" in config and "std" in config:
            return config
        return _config_of_built(config)  # an smp folder ddep did not write: the encoder's normalisation
    from ..engine.checkpoint import load_checkpoint

    return load_checkpoint(path)["model_config"]


def load_model(path: str | os.PathLike) -> SegmentationModel:
    """Load an exported model folder (or its .safetensors file), or a ddep checkpoint (.pt).

    Checkpoints are read with ``torch.load(weights_only=True)``: a file that needs arbitrary
    pickled objects is refused with a clear message instead of being executed.
    """
    path = model_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    if path.suffix == ".safetensors":
        config = _exported_config(path)
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any reader error becomes one clear line
            raise ValueError(f"{path}: not a readable exported model ({type(e).__name__}: {e})") from None
        return model_from_state(config, state, str(path))
    from ..engine.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    return model_from_state(checkpoint["model_config"], checkpoint["model"], str(path))
