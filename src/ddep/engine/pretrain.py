"""Denoising pretraining: DDeP (``mode=decoder``, frozen encoder) or DeP (``mode=encoder+decoder``)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from ..data import build_dataset
from ..data.transforms import pretrain_transforms
from ..models import SegmentationModel, build_model
from ..models.saving import save_model
from ..noise import corrupt, denoising_loss, estimate_clean, sample_gamma, to_model_input
from .distributed import shutdown
from .plan import run_plan
from .run import start_run, with_model
from .trainer import Trainer

log = logging.getLogger(__name__)


def build_pretrain_model(config: dict[str, Any], model: SegmentationModel | None = None) -> SegmentationModel:
    """``config["model"]`` with a 3-channel head, or ``model`` given that head; in DDeP its encoder frozen."""
    m = config["model"]
    if model is None:
        model = build_model(m["arch"], m["encoder"], m["encoder_weights"], classes=3, decoder_width=m["decoder_width"], **m["options"])
        if config["mode"] == "decoder" and m["encoder_weights"] is None:
            log.warning("mode=decoder with a randomly initialised encoder: DDeP expects a pretrained encoder (model.encoder_weights)")
    elif model.config["classes"] != 3:
        model.replace_head(3)  # the noise (or image) has 3 channels
    if config["mode"] == "decoder":
        model.freeze_encoder()
    return model


def pretrain_data(config: dict[str, Any]):
    """The unlabeled images of ``config``, as random resized crops in [0, 1]."""
    data = config["data"]
    options = data["options"]
    if "decode" in options:
        raise ValueError("set data.decode, not data.options.decode")
    if data["dataset"] == "shards":
        options = {**options, "decode": data["decode"]}
    elif data["decode"] != "cpu":
        raise ValueError(f"data.decode={data['decode']} decodes the JPEGs of tar shards: it needs data.dataset=shards "
                         "(write them with `ddep shards`)")
    return build_dataset(
        data["dataset"], data["root"], data["split"],
        transform=pretrain_transforms(data["crop_size"], (data["min_scale"], 1.0)), **options,
    )


def plan_pretrain(config: dict[str, Any]) -> dict[str, Any]:
    """``ddep pretrain --dry-run``: the budget, from the file list alone (no run folder, no weights built)."""
    return run_plan(config, len(pretrain_data(config)), config["optim"]["lr"])


def pretrain(config: dict[str, Any], resume: bool | str | None = None, model: SegmentationModel | None = None) -> Path:
    """Train the decoder (and in DeP the encoder) to predict the noise added to unlabeled images.

    ``model`` (e.g. ``ddep.from_smp(your_smp_model)``) is trained in place instead of building
    ``config["model"]``, which then records its architecture; a head of another width than 3 is
    replaced on it. ``resume`` (True, False or ``"auto"``; None: ``config["resume"]``): see
    :func:`ddep.engine.run.start_run`.
    """
    config = with_model(config, model)
    run = start_run(config, resume)
    try:
        model = build_pretrain_model(config, model)
        dataset = pretrain_data(config)
        if config["data"]["decode"] == "gpu" and run.device.type != "cuda":
            log.warning("data.decode=gpu without a GPU: torchvision decodes the JPEGs in the main process, on the CPU")
        trainer = Trainer(config, model, dataset, run.dir, run.dist, run.device, config["optim"]["lr"], "pretrain", run.resumed)
        for batch in trainer.batches():
            step = denoising_pass(trainer, batch["image"], config["noise"])
            if trainer.backward(step.loss) and run.dist.is_main and trainer.due(config["image_every"]):
                save_grid(run.dir / "images" / f"step{trainer.step:07d}.png", step, config["noise"])
        trainer.save("last.pt")
        if run.dist.is_main:
            save_model(model, run.dir / "model", stage="pretrain")
        trainer.close()
        return run.dir
    finally:
        shutdown(run.dist)


class DenoisingPass(NamedTuple):
    loss: torch.Tensor
    x: torch.Tensor  # the clean images in [-1, 1]
    x_noisy: torch.Tensor
    prediction: torch.Tensor
    gamma: torch.Tensor


def denoising_pass(trainer: Trainer, images: torch.Tensor, noise: dict[str, Any]) -> DenoisingPass:
    """The forward half of one pretraining step on a batch of images in [0, 1], on the device.

    The noise is drawn there with the trainer's generator (never on the host and copied over)."""
    x = images * 2 - 1  # [0, 1] -> [-1, 1], where sigma is defined
    gamma = sample_gamma(x.shape[0], generator=trainer.generator, device=x.device, **_level(noise))
    x_noisy, target = corrupt(x, noise["type"], target=noise["target"], generator=trainer.generator, gamma=gamma, **_level(noise))
    with trainer.autocast():
        prediction = trainer.net(to_model_input(x_noisy, trainer.model.config["mean"], trainer.model.config["std"]))
    prediction = prediction.float()
    return DenoisingPass(denoising_loss(prediction, target, noise["loss"]), x, x_noisy, prediction.detach(), gamma)


def _level(noise: dict[str, Any]) -> dict[str, Any]:
    return dict(noise_level=noise["level"], noise_std=noise["std"], noise_std_range=tuple(noise["std_range"]), gamma_min=noise["gamma_min"])


#: Grid padding in pixels (torchvision's default), and the left margin's text inset.
GRID_PADDING, LABEL_INSET = 2, 4


def save_grid(path: Path, step: DenoisingPass, noise: dict) -> None:
    """Rows of up to 8 examples, labelled on the left: clean, noisy, predicted target, denoised
    (all shown in [0, 1])."""
    x, x_noisy, prediction, gamma = step.x, step.x_noisy, step.prediction, step.gamma
    n = min(8, x.shape[0])
    clean = estimate_clean(x_noisy[:n], prediction[:n], gamma[:n], noise["type"], noise["target"])
    shown = prediction[:n] / 4 if noise["target"] == "noise" else prediction[:n]  # eps spans about [-4, 4]
    rows = torch.cat([x[:n], x_noisy[:n], shown, clean]).clamp(-1, 1)
    grid = make_grid((rows + 1) / 2, nrow=n, padding=GRID_PADDING).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    labels = ["clean", "noisy", "predicted noise / 4" if noise["target"] == "noise" else "predicted image", "denoised"]
    font = ImageFont.load_default()
    margin = max(int(font.getlength(label)) for label in labels) + 2 * LABEL_INSET
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw, height = ImageDraw.Draw(canvas), x.shape[-2] + GRID_PADDING
    for row, label in enumerate(labels):
        draw.text((LABEL_INSET, GRID_PADDING + row * height + x.shape[-2] // 2), label, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
