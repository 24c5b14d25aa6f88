"""Fine-tuning: a K-class head on a pretrained (or random) model, encoder and decoder trained
with per-pixel cross-entropy on the labeled images (and, with ``semi.method``, on unlabeled
images by weak-to-strong consistency: ``semi.py``).

The reported split (``data.val_split``) is never used to choose anything: the final checkpoint is
the result, unless ``data.select_fraction`` holds part of the labeled training images out, in
which case the checkpoint with the best mIoU on that held-out part is the result.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from ..config import DEFAULTS, PAPER_FINETUNE_LR
from ..data import build_dataset
from ..data.io import DataError, open_image
from ..data.labeled import check_label_encoding, check_pairs
from ..data.splits import LabeledSubset, copied_images, hold_out, labeled_indices, shared_images, split_hash, write_train_record
from ..data.transforms import eval_transforms, train_transforms
from ..inference import eval_for_model
from ..models import SegmentationModel, build_model
from ..models.registry import config_options, describe_model
from ..models.saving import load_model, read_model_config, save_model
from .checkpoint import checkpoint_path
from .distributed import barrier, launched_rank, shutdown
from .evaluate import evaluate_model, write_metrics
from .losses import supervised_loss
from .plan import run_plan
from .run import start_run, with_model
from .semi import SemiSupervised, check_semi, check_unlabeled_apart, semi_enabled, unlabeled_set
from .summary import write_finetune_report
from .trainer import Trainer

log = logging.getLogger(__name__)


class FinetuneData(NamedTuple):
    train: Dataset  # the labeled images trained on
    select: Dataset | None  # held out of the labeled images to choose a checkpoint on, or None
    val: Dataset  # the reported split
    pool: Dataset  # the training split the labeled images are drawn from
    unlabeled: Dataset | None  # the unlabeled images of semi-supervised fine-tuning, or None


def finetune_data(config: dict[str, Any]) -> FinetuneData:
    """The training, held-out and validation sets of ``config`` (without transforms), and the
    training split they are drawn from; a reported split that shares images with that split, or
    masks that would silently drop classes, are refused here, before a run folder exists."""
    data = config["data"]

    def split(name: str, **options: Any) -> Dataset:
        return build_dataset(data["dataset"], data["root"], name, **options)

    labeled = split(data["split"], **data["options"])
    val = split(data["val_split"], **_val_options(data))
    check_reported_split(val, labeled, data)
    indices = labeled_indices(labeled, data["labeled"], data["labeled_seed"])
    unlabeled = None
    if semi_enabled(config):
        check_semi(config)
        unlabeled = unlabeled_set(config, indices)
        check_unlabeled_apart(unlabeled, val, data)
    if not data["select_fraction"]:
        sets = FinetuneData(LabeledSubset(labeled, indices), None, val, labeled, unlabeled)
    else:
        if config["eval_every"] < 1:
            raise ValueError("data.select_fraction chooses a checkpoint among the periodic evaluations: set eval_every > 0")
        trained, held = hold_out(indices, data["select_fraction"], data["labeled_seed"])
        # the held-out images get evaluation transforms: a dataset of their own, not the training set's
        sets = FinetuneData(LabeledSubset(labeled, trained), LabeledSubset(split(data["split"], **data["options"]), held), val, labeled,
                            unlabeled)
    progress = config["progress"] and launched_rank() == 0
    check_pairs(labeled, indices, progress=progress)  # a bad file stops the run now, not at some step: every one named
    check_pairs(val, progress=progress)
    check_label_encoding(labeled, None, "training split")  # all of it: a few masks may rightly lack a class
    check_label_encoding(val, None, f"{data['val_split_file'] or data['val_split']} split")
    warn_if_crops_pad(sets.train, data)
    return sets


#: Training images whose sizes :func:`warn_if_crops_pad` reads (headers only).
SIZE_SAMPLE = 20


def warn_if_crops_pad(train: Dataset, data: dict[str, Any]) -> None:
    """Warn when ``data.crop_size`` exceeds the training images even at the largest random resize:
    every crop is then padded, mostly with ignored pixels, at the crop's full cost."""
    root, crop = getattr(train, "root", None), data["crop_size"]
    if root is None or data["scale"] or not train.pairs:
        return
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    step = max(1, len(train.pairs) // SIZE_SAMPLE)
    sizes = []
    for image, _ in train.pairs[::step][:SIZE_SAMPLE]:
        with open_image(Path(root) / image) as opened:  # the header only
            sizes.append(opened.size)
    ratio = data["ratio_range"][1]
    if all(crop_h > h * ratio or crop_w > w * ratio for w, h in sizes):
        w, h = sizes[0]
        log.warning("data.crop_size=%s is larger than the training images (e.g. %dx%d) even resized by %s: every crop is "
                    "padded, mostly with ignored pixels; a crop_size of at most %d suits them", crop, w, h, ratio,
                    min(min(w, h) for w, h in sizes))


def _val_options(data: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in data["options"].items() if k != "split_file"}
    return {**options, "split_file": data["val_split_file"]} if data["val_split_file"] else options


def check_reported_split(val: Dataset, train: Dataset, data: dict[str, Any]) -> None:
    """Refuse a reported split that shares images with the training split (a flat folder, whose
    every split is the whole folder, say; or byte-identical copies under other names), unless
    ``data.allow_trained_images`` (warned)."""
    shared, copies = shared_images(val, train), copied_images(val, train)
    if not shared and not copies:
        return
    described = f"data.val_split_file={data['val_split_file']}" if data["val_split_file"] else f"data.val_split={data['val_split']!r}"
    overlap = f"the reported split ({described}, {len(val)} images) shares {shared + len(copies)} images with the training split"
    if copies:
        overlap += f" (copies under other names among them, e.g. {copies[0][0]} is {copies[0][1]})"
    if data["allow_trained_images"]:
        log.warning("%s (data.allow_trained_images=true): its metrics are not a result to publish", overlap)
        return
    if not shared:
        flat, fix = "", "remove the copies from one of the two"
    elif data["dataset"] == "folder":
        flat = " (one flat folder of images: every split is all of it)" if val.flat else ""
        options = "".join(f" -o {k}={v}" for k, v in data["options"].items() if k != "split_file" and isinstance(v, (int, str)))
        fix = (f"hold some out with `ddep splits --dataset folder --root {data['root']} --val 0.2{options}` and pass the "
               "data.options.split_file and data.val_split_file it prints, or give the dataset a val split (images/val and masks/val)")
    else:
        flat, fix = "", "give split files that do not share images (data.options.split_file, data.val_split_file)"
    raise DataError(f"{overlap}{flat}: report on images never trained on: {fix} (data.allow_trained_images=true reports on "
                    "them anyway: a number never to publish)")


def with_init(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` whose ``model`` section describes the model ``init`` brings, so that the run's
    config.yaml records what was trained. A ``model`` setting (not left at its default) that
    contradicts it is refused: it would be ignored. ``encoder_weights`` is kept as given (a recipe
    sets it for the no-init baseline; with ``init`` every weight comes from there)."""
    if not config["init"]:
        return config
    brought, given, default = read_model_config(config["init"]), config["model"], DEFAULTS["finetune"]["model"]
    conflicts = [f"model.{key}={given[key]!r}" for key in ("arch", "encoder", "decoder_width")
                 if given[key] != default[key] and given[key] != brought[key]]
    options = config_options(brought)
    conflicts += [f"model.options.{key}={value!r}" for key, value in given["options"].items() if options.get(key) != value]
    if conflicts:
        raise ValueError(f"{', '.join(conflicts)}: init={config['init']} brings a {describe_model(brought)} model, "
                         "whose weights this run trains; leave those model settings out, or leave init out to build that model")
    model = dict(given, arch=brought["arch"], encoder=brought["encoder"], decoder_width=brought["decoder_width"], options=options)
    return {**config, "model": model}


def finetune_lr(config: dict[str, Any], model_config: dict[str, Any]) -> float:
    """``optim.lr``, or the paper's rate for the model's decoder width."""
    return config["optim"]["lr"] or PAPER_FINETUNE_LR.get(model_config["decoder_width"], 6e-5)


def plan_finetune(config: dict[str, Any]) -> dict[str, Any]:
    """``ddep finetune --dry-run``: the budget, from the datasets' file lists and the model config
    alone (no run folder, no weights built)."""
    config = with_init(config)
    sets = finetune_data(config)
    plan = run_plan(
        config, len(sets.train), finetune_lr(config, config["model"]), passes="epochs_over_labeled",
        select_images=len(sets.select) if sets.select is not None else 0,
        selected_on=split_hash(sets.select.pairs) if sets.select is not None else None,
        val_images=len(sets.val),
    )
    if sets.unlabeled is not None:
        per_step = (config["semi"]["batch_size"] or config["data"]["batch_size"]) * plan["grad_accum"] * plan["processes"]
        plan.update(semi=config["semi"]["method"], unlabeled_images=len(sets.unlabeled), unlabeled_images_per_step=per_step,
                    passes_over_unlabeled=round(plan["steps"] * per_step / len(sets.unlabeled), 2))
    return plan


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
    return supervised_loss(logits, batch["mask"])


def finetune(config: dict[str, Any], resume: bool | str | None = None, model: SegmentationModel | None = None) -> Path:
    """Train the whole model on the labeled images; the final checkpoint (or the one chosen on a
    held-out part of them) is evaluated on the val split. ``model`` is trained in place instead
    of building ``config["model"]`` (see :func:`ddep.engine.pretrain.pretrain`)."""
    config = with_init(with_model(config, model))
    sets = finetune_data(config)  # bad data settings fail before a run folder exists
    run = start_run(config, resume)
    try:
        if run.dist.is_main:  # from the start: a run's checkpoints are evaluated before it ends too
            write_train_record(run.dir, sets.pool)
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
        loss = segmentation_loss if sets.unlabeled is None else SemiSupervised(config, sets.unlabeled, trainer, mean, std).loss
        for batch in trainer.batches():
            if trainer.backward(loss(trainer, batch)) and trainer.due(config["eval_every"]):
                periodic_evaluation(trainer, sets, eval_config, run)
        best = checkpoint_path(run.dir, "best.pt")
        if sets.select is not None:
            barrier(run.dist)  # rank 0 may still be writing best.pt
        chosen = model if sets.select is None else load_model(best).to(run.device)  # the run's result
        if "final_metrics" not in trainer.extra:  # a resumed finished run has them
            metrics = trainer.extra["final_metrics"] = evaluate_model(chosen, sets.val, eval_config, run.device, run.dist,
                                                                      config["data"]["num_workers"])
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
                trained_images=shared_images(sets.val, sets.pool), classes=list(sets.val.classes),
            )
            try:
                write_finetune_report(run.dir, chosen, sets.val, eval_config, run.device)
            except Exception as e:  # noqa: BLE001 - the run's result is written: a report that fails must not hide it
                log.warning("%s: report.md not written (%s: %s)", run.dir, type(e).__name__, e)
        trainer.close()
        return run.dir
    finally:
        shutdown(run.dist)


def periodic_evaluation(trainer: Trainer, sets: FinetuneData, eval_config: dict[str, Any], run) -> None:
    """On the held-out images, keeping the best checkpoint as ``best.pt``; without them, on the
    reported split for the log only (nothing is chosen by it)."""
    workers = trainer.config["data"]["num_workers"]
    if sets.select is None:
        if trainer.step == trainer.total_steps:
            return  # the final evaluation follows the loop
        metrics = evaluate_model(trainer.model, sets.val, eval_config, run.device, run.dist, workers)
        trainer.log({"step": trainer.step, "val_mIoU": metrics["mIoU"], "val_aAcc": metrics["aAcc"]})
        return
    metrics = evaluate_model(trainer.model, sets.select, eval_config, run.device, run.dist, workers)
    trainer.log({"step": trainer.step, "select_mIoU": metrics["mIoU"], "select_aAcc": metrics["aAcc"]})
    if metrics["mIoU"] > trainer.extra.get("best_mIoU", -1.0):
        trainer.extra["best_mIoU"], trainer.extra["best_step"] = metrics["mIoU"], trainer.step
        trainer.save("best.pt")
