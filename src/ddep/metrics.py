"""Segmentation metrics computed exactly as mmsegmentation's ``IoUMetric`` computes them.

Results must be comparable with the numbers papers report, so the counting follows
mmsegmentation: per-class intersection, union, prediction and label pixel counts are summed over
the *whole dataset* (not averaged per image), pixels labelled ``ignore_index`` are skipped, and a
class whose union (or label area) is zero is left out of the mean instead of counting as 0 or 100.

Everything is derived from one K x K confusion matrix (rows: label, columns: prediction), which
is cheap to accumulate with ``bincount`` and to sum across processes, so that a distributed
evaluation gives exactly the single-process mIoU.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["SegMetric"]


class SegMetric:
    """Accumulates a confusion matrix over batches and reports aAcc, mIoU and mAcc in percent.

    ``update(pred, target)`` takes class ids (not logits) of the same shape; ``compute()`` returns
    ``{"aAcc", "mIoU", "mAcc", "IoU", "Acc"}``. The per-class lists hold ``None`` (not NaN) for a
    class that is undefined (zero union for IoU, zero label area for Acc) so the result can be
    written with ``json.dump`` as strict JSON; such classes are excluded from the means, as
    mmsegmentation's nanmean excludes them.

    Under ``torch.distributed``, call :meth:`all_reduce` once on every rank after the last
    ``update`` and before ``compute``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._reduced = False

    def reset(self) -> None:
        """Forget everything counted so far (keeps the device of the confusion matrix)."""
        self.confusion = torch.zeros_like(self.confusion)
        self._reduced = False

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch: ``pred`` and ``target`` are class-id tensors of the same shape.

        Shapes B x H x W or H x W (any shape works, as long as both match). The confusion matrix
        follows the inputs' device, so GPU evaluation never copies masks to the CPU.
        """
        if self._reduced:
            raise RuntimeError("SegMetric was already all-reduced; call reset() before counting again")
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("pred and target must be tensors")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape; got {tuple(pred.shape)} and {tuple(target.shape)}"
                + (" (pred looks like logits: take .argmax(1) first)" if pred.dim() == target.dim() + 1 else "")
            )
        for name, t in (("pred", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex():
                raise ValueError(f"{name} must hold integer class ids; got dtype {t.dtype}")
        k = self.num_classes
        pred = pred.reshape(-1).to(torch.int64)
        target = target.reshape(-1).to(device=pred.device, dtype=torch.int64)
        valid = target != self.ignore_index
        target, pred = target[valid], pred[valid]
        if target.numel():
            if bool(((target < 0) | (target >= k)).any()):
                bad = target[(target < 0) | (target >= k)].unique()[:5].tolist()
                raise ValueError(
                    f"target holds values outside 0..{k - 1} that are not the ignore index "
                    f"{self.ignore_index}: {bad}"
                )
            if bool(((pred < 0) | (pred >= k)).any()):
                bad = pred[(pred < 0) | (pred >= k)].unique()[:5].tolist()
                raise ValueError(f"pred holds values outside 0..{k - 1}: {bad}")
        counts = torch.bincount(target * k + pred, minlength=k * k).view(k, k)
        if self.confusion.device != counts.device:
            self.confusion = self.confusion.to(counts.device)
        self.confusion += counts

    def all_reduce(self) -> SegMetric:
        """Sum the confusion matrix over all processes (a no-op without torch.distributed).

        Sums of counts are exact, so the reduced metric equals what one process would compute on
        all the data. Call it exactly once per evaluation on every rank; a second call would
        double-count, so it is refused until :meth:`reset`.
        """
        if self._reduced:
            raise RuntimeError("SegMetric was already all-reduced; call reset() before reducing again")
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            confusion = self.confusion
            if "nccl" in str(dist.get_backend()).lower() and confusion.device.type != "cuda":
                # A rank that saw no batch still holds a CPU matrix; NCCL only reduces GPU tensors.
                confusion = confusion.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
            self.confusion = confusion
        self._reduced = True
        return self

    def areas(self) -> dict[str, torch.Tensor]:
        """Per-class pixel counts as mmsegmentation's ``intersect_and_union`` returns them."""
        c = self.confusion
        intersect = c.diag()
        area_pred = c.sum(0)
        area_label = c.sum(1)
        return {
            "area_intersect": intersect,
            "area_union": area_pred + area_label - intersect,
            "area_pred_label": area_pred,
            "area_label": area_label,
        }

    def compute(self) -> dict[str, Any]:
        """aAcc, mIoU, mAcc (floats, percent) and per-class ``IoU``/``Acc`` lists (float or None)."""
        a = {name: t.double().cpu() for name, t in self.areas().items()}
        total = a["area_label"].sum().item()
        if total == 0:
            raise ValueError("no labelled pixels were counted (every pixel was ignored, or update() never ran)")
        # 0/0 gives NaN for classes absent from both prediction and label, as in mmsegmentation.
        iou = a["area_intersect"] / a["area_union"] * 100
        acc = a["area_intersect"] / a["area_label"] * 100
        return {
            "aAcc": a["area_intersect"].sum().item() / total * 100,
            "mIoU": iou.nanmean().item(),
            "mAcc": acc.nanmean().item(),
            "IoU": _nan_to_none(iou),
            "Acc": _nan_to_none(acc),
        }


def _nan_to_none(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]
