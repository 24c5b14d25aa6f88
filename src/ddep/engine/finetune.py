"""Fine-tuning: a K-class head on a pretrained (or random) model, encoder and decoder trained
with per-pixel cross-entropy on the labeled images.

The reported split (``data.val_split``) is never used to choose anything: the final checkpoint is
the result, unless ``data.select_fraction`` holds part of the labeled training images out, in
which case the checkpoint with the best mIoU on that held-out part is the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import PAPER_FINETUNE_LR
from ..data import build_dataset
from ..data.splits import LabeledSubset, hold_out, labeled_indices, split_hash
from ..data.transforms import IGNORE_INDEX, eval_transforms, train_transforms
from ..inference import eval_for_model
from ..models import SegmentationModel, build_model
from ..models.saving import load_model, read_model_config, save_model
from .checkpoint import checkpoint_path
from .distributed import barrier, shutdown
from .evaluate import evaluate_model, write_metrics
from .plan import run_plan
from .run import start_run, with_model
from .trainer import Trainer


class FinetuneData(NamedTuple):
    train: Dataset  # the labeled images trained on
    select: Dataset | None  # held out of the labeled images to choose a checkpoint on, or None
    val: Dataset  # the reported split


def finetune_data(config: dict[str, Any]) -> FinetuneData:
    """The training, held-out and validation sets of ``config`` (without transforms)."""
    data = config["data"]

    def split(name: str, **options: Any) -> Dataset:
        return build_dataset(data["dataset"], data["root"], name, **options)

    labeled = split(data["split"], **data["options"])
    indices = labeled_indices(labeled, data["labeled"], data["labeled_seed"])
    if not data["select_fraction"]:
        return FinetuneData(LabeledSubset(labeled, indices), None, split(data["val_split"], **_val_options(data)))
    if config["eval_every"] < 1:
        raise ValueError("data.select_fraction chooses a checkpoint among the periodic evaluations: set eval_every > 0")
    trained, held = hold_out(indices, data["select_fraction"], data["labeled_seed"])
    # the held-out images get evaluation transforms: a dataset of their own, not the training set's
    held_set = LabeledSubset(split(data["split"], **data["options"]), held)
    return FinetuneData(LabeledSubset(labeled, trained), held_set, split(data["val_split"], **_val_options(data)))


def _val_options(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data["options"].items() if k != "split_file"}


def finetune_lr(config: dict[str, Any], model_config: dict[str, Any]) -> float:
    """``optim.lr``, or the paper's rate for the model's decoder width."""
    return config["optim"]["lr"] or PAPER_FINETUNE_LR.get(model_config["decoder_width"], 6e-5)


def plan_finetune(config: dict[str, Any]) -> dict[str, Any]:
    """``ddep finetune --dry-run``: the budget, from the datasets' file lists and the model config
    alone (no run folder, no weights built)."""
    sets = finetune_data(config)
    model_config = read_model_config(config["init"]) if config["init"] else config["model"]
    return run_plan(
        config, len(sets.train), finetune_lr(config, model_config), passes="epochs_over_labeled",
        select_images=len(sets.select) if sets.select is not None else 0,
        selected_on=split_hash(sets.select.pairs) if sets.select is not None else None,
        val_images=len(sets.val),
    )


def build_finetune_model(config: dict[str, Any], classes: int, model: SegmentationModel | None = None) -> SegmentationModel:
    """From ``init`` (a pretraining checkpoint or exported model; its head is replaced), from
    ``model`` (its head replaced unless it has ``classes`` outputs), or from
    ``model.encoder_weights`` with a random decoder."""
    if model is not None:
        return model if model.config["classes"] == classes else model.replace_head(classes)
    if config["init"]:
        return load_model(config["init"]).replace_head(classes)
    m = config["model"]
    return build_model(m["arch"], m["encoder"], m["encoder_weights"], classes=classes, decoder_width=m["decoder_width"], **m["options"])


def segmentation_loss(trainer: Trainer, batch: dict) -> torch.Tensor:
    """The forward half of one fine-tuning step: per-pixel cross-entropy, ignoring 255."""
    with trainer.autocast():
        logits = trainer.net(batch["image"])
    return F.cross_entropy(logits.float(), batch["mask"], ignore_index=IGNORE_INDEX)


def finetune(config: dict[str, Any], resume: bool | str | None = None, model: SegmentationModel | None = None) -> Path:
    """Train the whole model on the labeled images; the final checkpoint (or the one chosen on a
    held-out part of them) is evaluated on the val split. ``model`` is trained in place instead
    of building ``config["model"]`` (see :func:`ddep.engine.pretrain.pretrain`)."""
    config = with_model(config, model)
    sets = finetune_data(config)  # bad data settings fail before a run folder exists
    run = start_run(config, resume)
    try:
        data = config["data"]
        model = build_finetune_model(config, sets.train.num_classes, model)
        eval_config = eval_for_model(config["eval"], model)
        mean, std = model.config["mean"], model.config["std"]
        scale = tuple(data["scale"]) if data["scale"] else None
        sets.train.transform = train_transforms(
            data["crop_size"], mean, std, tuple(data["ratio_range"]), scale, data["cat_max_ratio"], data["photometric"]
        )
        sets.val.transform = eval_transforms(mean, std)
        if sets.select is not None:
            sets.select.transform = eval_transforms(mean, std)
        trainer = Trainer(config, model, sets.train, run.dir, run.dist, run.device, finetune_lr(config, model.config), "finetune", run.resumed)
        for batch in trainer.batches():
            if trainer.backward(segmentation_loss(trainer, batch)) and trainer.due(config["eval_every"]):
                periodic_evaluation(trainer, sets, eval_config, run)
        best = checkpoint_path(run.dir, "best.pt")
        if sets.select is not None:
            barrier(run.dist)  # rank 0 may still be writing best.pt
        chosen = model if sets.select is None else load_model(best).to(run.device)  # the run's result
        if "final_metrics" not in trainer.extra:  # a resumed finished run has them
            metrics = trainer.extra["final_metrics"] = evaluate_model(chosen, sets.val, eval_config, run.device, run.dist)
            trainer.log({"step": trainer.step, "val_mIoU": metrics["mIoU"], "val_aAcc": metrics["aAcc"]})
        last = trainer.save("last.pt")
        if run.dist.is_main:
            save_model(chosen, run.dir / "model")
            selection = {"selected_on": None}
            if sets.select is not None:
                selection = {"selected_on": split_hash(sets.select.pairs), "selected_step": trainer.extra["best_step"],
                             "select_mIoU": trainer.extra["best_mIoU"], "select_images": len(sets.select)}
            write_metrics(
                run.dir / "metrics.json", trainer.extra["final_metrics"], eval_config, sets.val,
                last if sets.select is None else best, **selection,
                train_split_hash=split_hash(sets.train.pairs), train_images=len(sets.train), steps=trainer.step,
            )
        trainer.close()
        return run.dir
    finally:
        shutdown(run.dist)


def periodic_evaluation(trainer: Trainer, sets: FinetuneData, eval_config: dict[str, Any], run) -> None:
    """On the held-out images, keeping the best checkpoint as ``best.pt``; without them, on the
    reported split for the log only (nothing is chosen by it)."""
    if sets.select is None:
        if trainer.step == trainer.total_steps:
            return  # the final evaluation follows the loop
        metrics = evaluate_model(trainer.model, sets.val, eval_config, run.device, run.dist)
        trainer.log({"step": trainer.step, "val_mIoU": metrics["mIoU"], "val_aAcc": metrics["aAcc"]})
        return
    metrics = evaluate_model(trainer.model, sets.select, eval_config, run.device, run.dist)
    trainer.log({"step": trainer.step, "select_mIoU": metrics["mIoU"], "select_aAcc": metrics["aAcc"]})
    if metrics["mIoU"] > trainer.extra.get("best_mIoU", -1.0):
        trainer.extra["best_mIoU"], trainer.extra["best_step"] = metrics["mIoU"], trainer.step
        trainer.save("best.pt")
