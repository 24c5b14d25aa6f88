"""The segmentation model: encoder, decoder and head, with the freezing DDeP needs."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def check_classes(classes: object) -> None:
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise ValueError(f"classes must be a positive integer; got {classes!r}")


def make_head(in_channels: int, classes: int) -> nn.Conv2d:
    """A 3x3 convolution from the decoder's last features to one channel per class."""
    return nn.Conv2d(in_channels, classes, kernel_size=3, padding=1)


class SegmentationModel(nn.Module):
    """``encoder -> decoder -> segmentation_head``, returning logits at the input's resolution.

    ``config`` holds every argument of :func:`ddep.build_model`, so ``build_model(**config)``
    rebuilds the same architecture (with ``config["classes"]`` output channels). Inputs are
    normalised with ``config["mean"]`` and ``config["std"]``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, segmentation_head: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.segmentation_head = segmentation_head
        self.config = dict(config)
        self.encoder_frozen = False

    #: Input sides must be multiples of this (1: any size); inference pads up to it.
    input_divisor: int = 1

    def check_input(self, x: torch.Tensor) -> None:
        """Reject inputs the architecture cannot take (overridden where sizes are constrained)."""
        if x.dim() != 4:
            raise ValueError(f"expected a batch B x C x H x W; got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        logits = self.segmentation_head(self.decode(self.encoder(x)))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(features)

    def freeze_encoder(self) -> SegmentationModel:
        """No gradients for the encoder, and its norm/dropout layers held in eval mode.

        Eval mode holds across later ``model.train()`` calls, so BatchNorm running statistics
        and dropout/drop-path stay exactly as pretrained while the decoder learns.
        """
        self.encoder.requires_grad_(False)
        self.encoder_frozen = True
        self.encoder.eval()
        return self

    def unfreeze_encoder(self) -> SegmentationModel:
        """Undo :meth:`freeze_encoder`: gradients again, and the model's current train/eval mode."""
        self.encoder.requires_grad_(True)
        self.encoder_frozen = False
        self.encoder.train(self.training)
        return self

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> SegmentationModel:
        """Trade compute for memory in training: the decoder's highest-resolution blocks keep no
        activations and are recomputed in the backward pass (same results; see PERFORMANCE.md)."""
        self.decoder.grad_checkpointing = enable
        return self

    def new_head(self, classes: int) -> nn.Module:
        """A randomly initialised head like the current one, with ``classes`` outputs."""
        return make_head(self.segmentation_head.in_channels, classes)

    def replace_head(self, classes: int) -> SegmentationModel:
        """A new, randomly initialised head with ``classes`` outputs; every other weight is kept."""
        check_classes(classes)
        old = next(self.segmentation_head.parameters())
        self.segmentation_head = self.new_head(classes).to(device=old.device, dtype=old.dtype)
        self.config["classes"] = classes
        return self
