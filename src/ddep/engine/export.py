"""``ddep export``: a checkpoint to safetensors + JSON config, smp's own folder for smp models, and
optionally ONNX."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..models.saving import load_model, save_model
from ..models.segmenter import SegmentationModel
from ..models.smp_models import SmpModel, save_smp

SMP_FOLDER = "smp"
ONNX_FILE = "model.onnx"


def export_onnx(model: SegmentationModel, path: str | os.PathLike, size: tuple[int, int]) -> Path:
    """ONNX by torch.export (``dynamo=True``; the TorchScript exporter is deprecated), batch size dynamic.

    The graph is traced at ``size`` (height, width); the file appears whole or not at all.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (torch.export's ONNX translator)
    except ImportError:
        raise RuntimeError("ONNX export needs the onnx and onnxscript packages: pip install 'ddep[onnx]'") from None
    height, width = size
    divisor = model.input_divisor
    if height % divisor or width % divisor:
        raise ValueError(f"onnx_size={[height, width]}: {model.config['arch']} needs multiples of {divisor}")
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        torch.onnx.export(
            model.eval(), (torch.zeros(1, 3, height, width),), str(partial), input_names=["image"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True, verbose=False,
        )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def export(config: dict[str, Any]) -> Path:
    if not config["checkpoint"] or not config["output"]:
        raise ValueError("export needs checkpoint=PATH and output=FOLDER")
    model = load_model(config["checkpoint"]).eval()
    output = save_model(model, config["output"])
    print(f"exported to {output}")
    if isinstance(model, SmpModel):
        print(f"smp model (segmentation_models_pytorch.from_pretrained): {save_smp(model, output / SMP_FOLDER)}")
    if config["onnx"]:
        print(f"ONNX: {export_onnx(model, output / ONNX_FILE, config['onnx_size'])}")
    return output
