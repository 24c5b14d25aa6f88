"""Encoders: a timm backbone returning a pyramid of feature maps, shallow to deep.

Every encoder exposes ``out_channels`` and ``reductions`` (one entry per feature map), the input
normalisation ``mean``/``std`` of its pretrained weights, and ``model``, the timm module whose
state dict keys are those of timm's own checkpoints.
"""
from __future__ import annotations

import timm
import torch
from torch import nn

from ..choices import did_you_mean
from .weights import WeightsDownloadError, create_timm_pretrained, load_encoder_weights, weights_kind


def check_timm_name(encoder: str) -> None:
    """Fail with a suggestion when timm has no model called ``encoder``."""
    base = encoder.split(".")[0]
    if timm.is_model(base):
        return
    raise ValueError(f"unknown timm encoder {encoder!r}{did_you_mean(base, timm.list_models())}")


class TimmEncoder(nn.Module):
    """Any timm model that supports ``features_only``, returning every stride it offers."""

    def __init__(self, name: str, encoder_weights: str | None = None, **timm_kwargs) -> None:
        super().__init__()
        check_timm_name(name)
        kind = weights_kind(encoder_weights)
        try:
            if kind == "tag":
                self.model = create_timm_pretrained(name, encoder_weights, features_only=True, **timm_kwargs)
            else:
                self.model = timm.create_model(name, features_only=True, **timm_kwargs)
        except WeightsDownloadError:
            raise
        except (TypeError, AttributeError, RuntimeError) as e:
            raise ValueError(f"timm encoder {name!r} cannot return feature maps (features_only): {e}") from None
        if kind in ("file", "offline"):
            load_encoder_weights(self.model, name, encoder_weights)
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())
        self.channels_last_output = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        cfg = self.model.pretrained_cfg
        self.mean = tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
        self.std = tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.model(x)
        if self.channels_last_output:  # swin-like models return B x H x W x C
            return [f.permute(0, 3, 1, 2) for f in features]
        return list(features)
