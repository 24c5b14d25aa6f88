"""Semi-supervised fine-tuning: the unlabeled images trained on by weak-to-strong consistency.

UniMatch (Yang et al., CVPR 2023; LiheYoung/UniMatch ``unimatch.py``): the model's prediction on
an unlabeled image's weak view, taken without gradients, gives pseudo-labels and their
confidence; two strong views of it (``ddep.data.semi``), each with a CutMix box, learn those
pseudo-labels where the confidence reaches ``semi.threshold``, and so do the weak view's encoder
features with half their channels dropped (feature perturbation). The loss of a micro-batch is

    (supervised + strong_weight * mean(strong views) + fp_weight * perturbed) / 2

with UniMatch's weights 0.5 and 0.5 (its ``(sup + 0.25 s1 + 0.25 s2 + 0.5 fp) / 2``). FixMatch,
the ablation, has one strong view and no perturbation: ``(supervised + strong) / 2``. UniMatch V2
(``unimatch_v2.py``) decodes its two strong views from complementary halves of the encoder's
channels instead of a perturbed weak view: ``(supervised + mean(strong views)) / 2``. With
``semi.teacher: ema`` the pseudo-labels come from an exponential moving average of the model, in
eval mode (UniMatch V2, ``unimatch_v2.py``: momentum ``min(1 - 1 / step, 0.996)``, weights and
buffers), kept in the checkpoints. An
unlabeled loss counts the confident pixels that padding did not add and is averaged over all
pixels that padding did not add. A strong view's box is filled from the next image of the batch,
its pixels and their pseudo-labels alike (UniMatch V2 pairs the batch with itself reversed,
``unimatch_v2.py``, which pairs the middle image of an odd batch with itself).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data import build_dataset
from ..data.io import DataError
from ..data.seeds import sample_seed
from ..data.semi import WeakStrongViews, unlabeled_images
from ..data.shards import ShardImages, decode_key, shard_keys
from ..data.splits import copied_images, image_keys, shared_images
from ..data.transforms import IGNORE_INDEX
from .distributed import DistInfo
from .losses import supervised_loss
from .trainer import Trainer, training_loader

log = logging.getLogger(__name__)

#: Per method: strong views, the default weights of their mean loss and of the perturbed one, and
#: whether the strong views are decoded from complementary channels (UniMatch V2).
METHODS = {"unimatch": (2, 0.5, 0.5, False), "fixmatch": (1, 1.0, 0.0, False), "unimatch_v2": (2, 1.0, 0.0, True)}


def semi_enabled(config: dict[str, Any]) -> bool:
    return config["semi"]["method"] != "none"


def unlabeled_set(config: dict[str, Any], labeled_indices: list[int]) -> Dataset:
    """``semi.unlabeled``'s images (without transforms); by default the training split's images
    outside the labeled subset. Images of the reported split are refused: training on them, even
    without their labels, would make its numbers optimistic."""
    data, source, truth = config["data"], config["semi"]["unlabeled"], config["semi"]["pseudo_label_accuracy"]
    if source["dataset"] is None:
        labeled = build_dataset(data["dataset"], data["root"], data["split"], **data["options"])
        return unlabeled_images(labeled, labeled_indices, masks=truth)
    if truth:
        raise ValueError("semi.pseudo_label_accuracy needs the unlabeled images' masks: only the default unlabeled images "
                         "(the training split's, semi.unlabeled.dataset=null) have them")
    if source["options"].get("decode", "cpu") != "cpu":
        raise ValueError("semi.unlabeled.options.decode must be cpu: the weak and strong views are made by the loader's workers")
    return build_dataset(source["dataset"], source["root"], source["split"], **source["options"])


def images_from_source(val: Dataset, shards: ShardImages) -> int:
    """How many of ``val``'s image files the shards hold: their keys are paths under the folder they
    were written from (they re-encode the images, so bytes cannot be compared). The shards' member
    names are read only when some of ``val``'s files lie under that folder."""
    if getattr(val, "root", None) is None:
        return 0
    if shards.source is None:
        log.warning("%s: its index does not record the folder the shards were written from, so the reported images "
                    "among them cannot be found; make sure there are none", shards.root)
        return 0
    source = Path(shards.source)
    under = {key for key in image_keys(val) if Path(key).is_relative_to(source)}
    if not under:
        return 0
    held = {str((source / decode_key(key)).resolve()) for shard in shards.shards for key in shard_keys(shards.root / shard)}
    return len(under & held)


def check_unlabeled_apart(unlabeled: Dataset, val: Dataset, data: dict[str, Any]) -> None:
    """Refuse unlabeled images that are images of the reported split (the same files or byte-identical
    copies), unless ``data.allow_trained_images`` (warned)."""
    if isinstance(unlabeled, ShardImages):
        shared = images_from_source(val, unlabeled)
    else:
        shared = shared_images(val, unlabeled) + len(copied_images(val, unlabeled))
    if not shared:
        return
    overlap = f"{shared} of the reported split's {len(val)} images are among the unlabeled images semi-supervised training uses"
    if data["allow_trained_images"]:
        log.warning("%s (data.allow_trained_images=true): its metrics are not a result to publish", overlap)
        return
    raise DataError(f"{overlap}: report on images never trained on (semi.unlabeled.root=... without them), or "
                    "data.allow_trained_images=true to report anyway: a number never to publish")


def check_semi(config: dict[str, Any]) -> None:
    """The ``semi`` values the config's types do not check, before a run folder exists."""
    semi = config["semi"]
    if not 0 <= semi["threshold"] <= 1:
        raise ValueError(f"semi.threshold is a confidence in [0, 1]; got {semi['threshold']}")
    if not 0 <= semi["ema_momentum"] < 1:
        raise ValueError(f"semi.ema_momentum must be in [0, 1); got {semi['ema_momentum']}")
    if semi["method"] == "unimatch_v2" and semi["teacher"] != "ema":
        log.warning("semi.method=unimatch_v2 without semi.teacher=ema: UniMatch V2 takes its pseudo-labels from an EMA "
                    "teacher; this is its ablation without one")
    batch = semi["batch_size"] or config["data"]["batch_size"]
    if batch < 2:
        raise ValueError(f"semi.batch_size must be at least 2 (CutMix pairs each unlabeled image with another of its batch); "
                         f"got {batch}{'' if semi['batch_size'] else ' (data.batch_size)'}")


class SemiSupervised:
    """The loss of a micro-batch: the labeled batch's cross-entropy and the unlabeled losses of a
    batch drawn from its own stream (split over ranks and workers, resumed at the same step)."""

    def __init__(self, config: dict[str, Any], images: Dataset, trainer: Trainer, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        semi, data = config["semi"], config["data"]
        self.views, strong_weight, fp_weight, self.complementary = METHODS[semi["method"]]
        self.strong_weight = strong_weight if semi["strong_weight"] is None else semi["strong_weight"]
        self.fp_weight = fp_weight if semi["fp_weight"] is None else semi["fp_weight"]
        self.threshold = semi["threshold"]
        scale = tuple(data["scale"]) if data["scale"] else None
        images.transform = WeakStrongViews(data["crop_size"], mean, std, tuple(data["ratio_range"]), scale, self.views,
                                           truth=semi["pseudo_label_accuracy"])
        self.batch_size = semi["batch_size"] or data["batch_size"]
        loader = training_loader(images, sample_seed(config["seed"], -1, -2), self.batch_size, data["num_workers"], trainer.dist,
                                 start=trainer.batches_read, pin_memory=trainer.device.type == "cuda")
        self.batches = iter(loader)
        trainer.check_shard_order(images)
        self.teacher, self.momentum = None, semi["ema_momentum"]
        if semi["teacher"] == "ema":
            self.teacher = copy.deepcopy(trainer.model).eval().requires_grad_(False)
            trainer.add_companion("teacher", self.teacher)
            trainer.step_hooks.append(lambda: self.update_teacher(trainer.model, trainer.step, trainer.dist))

    @torch.no_grad()
    def update_teacher(self, model: torch.nn.Module, step: int, info: DistInfo) -> None:
        """After optimizer step ``step`` (1, 2, ...): the teacher's weights and buffers move to the
        model's by ``1 - min(1 - 1 / step, momentum)`` (the first step copies them). Under DDP each
        rank's batch-norm statistics follow its own batches: the teacher takes rank 0's buffers, so
        that every rank's teacher is the checkpoint's."""
        ratio = min(1 - 1 / step, self.momentum)
        for mine, theirs in zip(self.teacher.state_dict().values(), model.state_dict().values()):
            if mine.is_floating_point():
                mine.mul_(ratio).add_(theirs, alpha=1 - ratio)
            else:
                mine.copy_(theirs)
        if info.enabled:
            for buffer in self.teacher.buffers():
                torch.distributed.broadcast(buffer, 0)

    def loss(self, trainer: Trainer, batch: dict) -> torch.Tensor:
        unlabeled = trainer.to_device(next(self.batches))
        labeled = batch["image"].shape[0]
        # the weak views go through the model with the labeled batch, for their pseudo-labels or perturbed features
        weak = self.teacher is None or self.fp_weight
        with trainer.autocast():
            inputs = torch.cat([batch["image"], unlabeled["image"]]) if weak else batch["image"]
            logits, perturbed = trainer.net(inputs, perturb=True) if self.fp_weight else (trainer.net(inputs), None)
        supervised = supervised_loss(logits[:labeled], batch["mask"])
        with torch.no_grad():
            if self.teacher is not None:
                with trainer.autocast():
                    logits = torch.cat([logits[:labeled], self.teacher(unlabeled["image"])])
            confidence, pseudo = logits[labeled:].detach().float().softmax(1).max(1)
        ignore = unlabeled["ignore"]
        strong, targets = [], []
        for view in range(self.views):
            image, target = cutmix(unlabeled["strong"][:, view], unlabeled["boxes"][:, view], (pseudo, confidence, ignore))
            strong.append(image)
            targets.append(target)
        strong = torch.cat(strong)
        if trainer.use_channels_last:
            strong = strong.contiguous(memory_format=torch.channels_last)
        with trainer.autocast():
            strong_logits = trainer.net(strong, complementary=self.complementary).chunk(self.views)
        strong_losses = [consistency_loss(out, *target, self.threshold) for out, target in zip(strong_logits, targets)]
        strong_loss = torch.stack(strong_losses).mean()
        total = supervised + self.strong_weight * strong_loss
        parts = {"loss_supervised": supervised, "loss_strong": strong_loss}
        if perturbed is not None:
            parts["loss_perturbed"] = consistency_loss(perturbed[labeled:], pseudo, confidence, ignore, self.threshold)
            total = total + self.fp_weight * parts["loss_perturbed"]
        counted = ~ignore
        confident = (confidence >= self.threshold) & counted
        parts["mask_ratio"] = confident.sum() / counted.sum().clamp(min=1)
        if "truth" in unlabeled:  # a diagnostic: the masks never reach a loss
            right, known = pseudo == unlabeled["truth"], unlabeled["truth"] != IGNORE_INDEX
            parts["pseudo_accuracy"] = (right & known).sum() / known.sum().clamp(min=1)
            parts["pseudo_accuracy_confident"] = (right & known & confident).sum() / (known & confident).sum().clamp(min=1)
        trainer.track(**parts)
        return total / 2


def cutmix(images: torch.Tensor, boxes: torch.Tensor, targets: tuple[torch.Tensor, ...]
           ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Inside each sample's box, the pixels of the next sample of the batch (the last takes the
    first's), in the images (B x C x H x W) and in each per-pixel target (B x H x W) alike."""
    mixed = torch.where(boxes[:, None], images.roll(-1, 0), images)
    return mixed, tuple(torch.where(boxes, target.roll(-1, 0), target) for target in targets)


def consistency_loss(logits: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor, ignore: torch.Tensor,
                     threshold: float) -> torch.Tensor:
    """UniMatch's ``criterion_u``: cross-entropy against the pseudo-labels on the pixels whose
    confidence reaches ``threshold``, summed and divided by the count of pixels not ignored."""
    per_pixel = F.cross_entropy(logits.float(), pseudo, reduction="none")
    counted = ~ignore
    return (per_pixel * ((confidence >= threshold) & counted)).sum() / counted.sum().clamp(min=1)
