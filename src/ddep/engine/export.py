"""``ddep export``: a checkpoint to safetensors + JSON config (and optionally ONNX)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.saving import load_model, save_model


def export(config: dict[str, Any]) -> Path:
    if not config["checkpoint"] or not config["output"]:
        raise ValueError("export needs checkpoint=PATH and output=FOLDER")
    model = load_model(config["checkpoint"]).eval()
    output = save_model(model, config["output"])
    if config["onnx"]:
        try:
            import onnx  # noqa: F401  (torch's exporter needs it)
        except ImportError:
            raise RuntimeError("ONNX export needs the onnx package: pip install 'ddep[onnx]'") from None
        height, width = config["onnx_size"]
        dummy = torch.zeros(1, 3, height, width)
        torch.onnx.export(
            model, (dummy,), str(output / "model.onnx"), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
    print(f"exported to {output}")
    return output
