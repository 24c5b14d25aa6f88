"""Fine-tuning: a K-class head on a pretrained (or random) model, encoder and decoder trained
with per-pixel cross-entropy on the labeled images; the best checkpoint by validation mIoU is kept."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import PAPER_FINETUNE_LR
from ..data import build_dataset
from ..data.splits import labeled_subset, split_hash
from ..data.transforms import IGNORE_INDEX, eval_transforms, train_transforms
from ..models import build_model
from ..models.saving import load_model, save_model
from .distributed import shutdown
from .evaluate import evaluate_model, write_metrics
from .run import start_run
from .trainer import Trainer


def build_finetune_model(config: dict[str, Any], classes: int):
    """From ``init`` (a pretraining checkpoint or exported model; its head is replaced), or from
    ``model.encoder_weights`` with a random decoder."""
    if config["init"]:
        return load_model(config["init"]).replace_head(classes)
    m = config["model"]
    return build_model(m["arch"], m["encoder"], m["encoder_weights"], classes=classes, decoder_width=m["decoder_width"], **m["options"])


def segmentation_loss(trainer: Trainer, batch: dict) -> torch.Tensor:
    """The forward half of one fine-tuning step: per-pixel cross-entropy, ignoring 255."""
    with trainer.autocast():
        logits = trainer.net(batch["image"])
    return F.cross_entropy(logits.float(), batch["mask"], ignore_index=IGNORE_INDEX)


def finetune(config: dict[str, Any], resume: bool = False) -> Path:
    run = start_run(config, resume)
    try:
        data = config["data"]
        train_set = build_dataset(data["dataset"], data["root"], data["split"], **data["options"])
        if data["labeled"] is not None:
            train_set = labeled_subset(train_set, data["labeled"], data["labeled_seed"])
        val_options = {k: v for k, v in data["options"].items() if k != "split_file"}
        val_set = build_dataset(data["dataset"], data["root"], data["val_split"], **val_options)
        model = build_finetune_model(config, train_set.num_classes)
        mean, std = model.config["mean"], model.config["std"]
        scale = tuple(data["scale"]) if data["scale"] else None
        train_set.transform = train_transforms(data["crop_size"], mean, std, tuple(data["ratio_range"]), scale, data["jitter"])
        val_set.transform = eval_transforms(mean, std)
        lr = config["optim"]["lr"] or PAPER_FINETUNE_LR.get(model.config["decoder_width"], 6e-5)
        trainer = Trainer(config, model, train_set, run.dir, run.dist, run.device, lr, "finetune", resume)
        best = trainer.extra.get("best_mIoU", -1.0)
        for batch in trainer.batches():
            if trainer.backward(segmentation_loss(trainer, batch)) and (trainer.due(config["eval_every"]) or trainer.step == trainer.total_steps):
                metrics = evaluate_model(model, val_set, config["eval"], run.device, run.dist)
                trainer.log({"step": trainer.step, "val_mIoU": metrics["mIoU"], "val_aAcc": metrics["aAcc"]})
                if metrics["mIoU"] > best:
                    best = trainer.extra["best_mIoU"] = metrics["mIoU"]
                    trainer.extra["best_step"] = trainer.step
                    trainer.save("best.pt")
                trainer.extra["last_metrics"] = metrics
        last = trainer.save("last.pt")
        if run.dist.is_main:
            save_model(model, run.dir / "model")
            write_metrics(
                run.dir / "metrics.json", trainer.extra["last_metrics"], config["eval"], val_set, last,
                best_mIoU=trainer.extra["best_mIoU"], best_step=trainer.extra["best_step"], train_split_hash=split_hash(train_set.pairs),
                train_images=len(train_set), steps=trainer.step,
            )
        trainer.close()
        return run.dir
    finally:
        shutdown(run.dist)
