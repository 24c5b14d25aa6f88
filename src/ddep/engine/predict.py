"""``ddep predict``: class-id masks and colour overlays for a folder of images."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.io import DataError, read_image
from ..data.labeled import require_dir
from ..data.transforms import eval_transforms
from ..data.unlabeled import list_images
from ..inference import eval_for_model, predict
from ..models.saving import load_model
from .distributed import DistInfo, resolve_device


def palette(num_classes: int) -> np.ndarray:
    """Distinct, fixed colours per class (the same for every run)."""
    rng = np.random.default_rng(2205_11423)
    colours = rng.integers(40, 256, (max(num_classes, 1), 3), dtype=np.uint8)
    return np.vstack([colours, np.zeros((256 - len(colours), 3), np.uint8)])


@torch.no_grad()
def predict_folder(config: dict[str, Any]) -> Path:
    """Write ``<output>/<image path>.png`` (class ids) and ``..._overlay.jpg`` for each input image."""
    for key in ("checkpoint", "input", "output"):
        if not config[key]:
            raise ValueError(f"predict needs {key}=PATH")
    source, output = Path(config["input"]), Path(config["output"])
    require_dir(source, "input folder")
    device = resolve_device(config["device"], DistInfo())
    model = load_model(config["checkpoint"]).to(device).eval()
    transform = eval_transforms(model.config["mean"], model.config["std"])
    colours = palette(model.config["classes"])
    eval_config = eval_for_model(config["eval"], model)
    files = list_images(source)
    if not files:
        raise DataError(f"no images found under {source}")
    for name in files:
        image = read_image(source / name)
        x = transform({"image": image})["image"][None].to(device)
        ids = predict(model, x, **eval_config).argmax(1)[0].to(torch.uint8).cpu().numpy()
        target = (output / name).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids).save(target)
        overlay = (0.5 * np.asarray(image, np.float32) + 0.5 * colours[ids]).astype(np.uint8)
        Image.fromarray(overlay).save(target.with_name(target.stem + "_overlay.jpg"), quality=90)
    print(f"wrote {len(files)} masks and overlays to {output}")
    return output
