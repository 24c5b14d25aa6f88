"""Evaluation: inference over a labeled set, metrics as mmsegmentation computes them, metrics.json."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..data import build_dataset
from ..atomic import write_text_atomic
from ..data.io import DataError
from ..data.labeled import check_label_encoding
from ..data.splits import read_train_record, shared_images, split_hash
from ..data.transforms import eval_transforms
from ..inference import describe_mode, eval_for_model, evaluating, predict
from ..metrics import SegMetric
from ..models.saving import load_model, model_file, refuse_pretraining_result
from .distributed import DistInfo, shutdown
from .preemption import release_at_exit, worker_init
from .run import start_run

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, eval_config: dict[str, Any], device: torch.device, dist_info: DistInfo = DistInfo(),
                   num_workers: int = 0) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset``; each rank takes every world-th image (no padding, so
    no image counts twice) and the confusion matrices are summed across ranks. ``num_workers``
    processes read the images meanwhile (a large val image takes longer to decode than to
    segment on a GPU); like the training loader's, they leave stop signals to the main process."""
    metric = SegMetric(dataset.num_classes)
    shard = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    # a generator of its own: an evaluation between training steps leaves the stream dropout draws from alone
    loader = DataLoader(shard, batch_size=1, num_workers=num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=worker_init(release_at_exit()) if num_workers else None, generator=torch.Generator())
    with evaluating(model):
        for item in loader:
            image = item["image"].to(device)
            probabilities = predict(model, image, **eval_config)
            metric.update(probabilities.argmax(1).cpu(), item["mask"])
    metric.all_reduce()
    return metric.compute()


def file_hash(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def write_metrics(path: Path, metrics: dict[str, Any], eval_config: dict[str, Any], dataset, checkpoint: str | os.PathLike | None, **extra: Any) -> None:
    """metrics.json: the metrics with everything needed to say what they measure."""
    record = {
        **metrics,
        "inference": describe_mode(**eval_config),
        "split_hash": split_hash(dataset.pairs),
        "num_images": len(dataset),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_hash": file_hash(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
        **extra,
    }
    write_text_atomic(path, json.dumps(record, indent=2))


def trained_images(checkpoint: str, dataset, allow: bool) -> int | None:
    """How many of ``dataset``'s images the run that made ``checkpoint`` trained on (its training
    split's record), None without a record; any is refused unless ``allow``."""
    record = read_train_record(checkpoint)
    if record is None:
        return None
    shared = shared_images(dataset, record[1])
    overlap = f"{shared} of these {len(dataset)} images are in the training split of {checkpoint} (listed in {record[0]})"
    if shared and not allow:
        raise DataError(f"{overlap}: evaluate on images it was not trained on (data.allow_trained_images=true evaluates "
                        "anyway: a number never to publish)")
    if shared:
        log.warning("%s (data.allow_trained_images=true): these metrics are not a result to publish", overlap)
    return shared


def evaluate(config: dict[str, Any]) -> Path:
    """``ddep evaluate``: a checkpoint or exported model on a labeled split."""
    if not config["checkpoint"]:
        raise ValueError("evaluate needs checkpoint=PATH (a .pt checkpoint or an exported model folder)")
    refuse_pretraining_result(config["checkpoint"], "evaluate")
    model = load_model(config["checkpoint"])  # the model and the data are checked before a run folder exists
    data = config["data"]
    classes_from = "dataset"
    if data["dataset"] == "folder" and data["options"].get("num_classes") is None and data["options"].get("classes_file") is None:
        # the class count is the model's: recorded in the run's config.yaml and metrics.json
        data["options"] = {**data["options"], "num_classes": model.config["classes"]}
        classes_from = "model"
    dataset = build_dataset(data["dataset"], data["root"], data["split"], transform=eval_transforms(model.config["mean"], model.config["std"]), **data["options"])
    if model.config["classes"] != dataset.num_classes:
        fix = "; leave data.options.num_classes and classes_file out to take the model's" if data["dataset"] == "folder" else ""
        raise ValueError(f"{config['checkpoint']} predicts {model.config['classes']} classes but {data['dataset']} has {dataset.num_classes}{fix}")
    trained = trained_images(config["checkpoint"], dataset, data["allow_trained_images"])
    check_label_encoding(dataset, None, f"{data['options'].get('split_file') or data['split']} split")
    earlier = Path(config["out_dir"]) / config["name"] / "metrics.json"
    if earlier.is_file():
        raise FileExistsError(f"{earlier.parent} holds an earlier evaluation ({earlier}): name=... for this one, which "
                              "keeps that one")
    run = start_run(config, training=False)
    if run.dist.is_main and classes_from == "model":
        print(f"data.options.num_classes not given: {dataset.num_classes} classes, from the model")
    try:
        model.to(run.device)
        eval_config = eval_for_model(config["eval"], model)
        metrics = evaluate_model(model, dataset, eval_config, run.device, run.dist, data["num_workers"])
        if run.dist.is_main:
            write_metrics(run.dir / "metrics.json", metrics, eval_config, dataset, model_file(config["checkpoint"]),
                          trained_images=trained, num_classes=dataset.num_classes, num_classes_from=classes_from,
                          classes=list(dataset.classes))
            print(f"mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  mAcc {metrics['mAcc']:.2f}  ({len(dataset)} images); "
                  f"{run.dir / 'metrics.json'}")
        return run.dir
    finally:
        shutdown(run.dist)
