"""The supervised segmentation loss, shared by supervised and semi-supervised fine-tuning."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.transforms import IGNORE_INDEX


def supervised_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy averaged over the pixels not ignored (255): ``F.cross_entropy``'s
    mean (mmsegmentation's with ``avg_non_ignore=True``), summed here from the per-pixel values.
    CUDA's mean-reducing kernel adds with atomics, in no fixed order, so ``deterministic: true``
    could not repeat it, and a crop whose every pixel is ignored would give NaN (a skipped or
    failed step) where this gives 0, as mmsegmentation does."""
    per_pixel = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX, reduction="none")
    return per_pixel.sum() / (mask != IGNORE_INDEX).sum().clamp(min=1)
