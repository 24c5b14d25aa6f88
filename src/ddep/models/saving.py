"""Exported models: weights as safetensors plus a JSON config; loading never unpickles code."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..atomic import write_atomic, write_text_atomic
from .registry import build_model
from .segmenter import SegmentationModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_model(model: SegmentationModel, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each atomically)."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = dict(model.config, encoder_weights=None)  # the weights are in the file itself
    write_atomic(directory / WEIGHTS_FILE, lambda f: f.write(safetensors_bytes(state)))
    write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2))
    return directory


def model_from_state(config: dict, state: dict[str, torch.Tensor], source: str) -> SegmentationModel:
    """Build ``config``'s architecture without downloading anything and load ``state`` into it."""
    model = build_model(**dict(config, encoder_weights=None))
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


def model_file(path: str | os.PathLike) -> Path:
    """The weights file of an exported model folder; any other path as it is."""
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def read_model_config(path: str | os.PathLike) -> dict:
    """The model config of an exported model folder or a checkpoint, without building the model."""
    path = model_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    if path.suffix == ".safetensors":
        return json.loads(path.with_name(CONFIG_FILE).read_text())
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
        config_path = path.with_name(CONFIG_FILE)
        if not config_path.is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} beside it")
        try:
            config, state = json.loads(config_path.read_text()), load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any reader error becomes one clear line
            raise ValueError(f"{path}: not a readable exported model ({type(e).__name__}: {e})") from None
        return model_from_state(config, state, str(path))
    from ..engine.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    return model_from_state(checkpoint["model_config"], checkpoint["model"], str(path))
