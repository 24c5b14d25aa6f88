"""One registry of architectures and the one constructor, :func:`build_model`."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..choices import check_choice, check_options
from .segmenter import SegmentationModel

Builder = Callable[..., tuple[nn.Module, nn.Module]]


@dataclass(frozen=True)
class Arch:
    name: str
    default_encoder: str
    builder: Builder


_ARCHS: dict[str, Arch] = {}


def register_arch(name: str, default_encoder: str) -> Callable[[Builder], Builder]:
    """Register ``builder(encoder, encoder_weights, decoder_width, **options) -> (encoder, decoder)``."""

    def wrap(builder: Builder) -> Builder:
        _ARCHS[name] = Arch(name, default_encoder, builder)
        return builder

    return wrap


def list_archs() -> list[str]:
    return sorted(_ARCHS)


def arch_options(arch: str) -> dict[str, Any]:
    """The architecture-specific keyword options of ``arch`` and their defaults."""
    params = inspect.signature(get_arch(arch).builder).parameters
    return {k: p.default for k, p in params.items() if k not in ("encoder", "encoder_weights", "decoder_width")}


def get_arch(arch: str) -> Arch:
    check_choice("arch", arch, list_archs())
    return _ARCHS[arch]


def build_model(
    arch: str,
    encoder: str | None = None,
    encoder_weights: str | None = None,
    classes: int = 3,
    decoder_width: int = 1,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **options: Any,
) -> SegmentationModel:
    """Build a segmentation model; ``build_model(**model.config)`` rebuilds it.

    Args:
        arch: ``"unet"`` or ``"transunet"`` (see :func:`list_archs`).
        encoder: a timm model name (default: the arch's, ``resnet50`` / ``vit_base_r50_s16_224``).
        encoder_weights: None, a local .pth/.safetensors file, ``"efficientnet-lite0"``, or a timm
            pretrained tag (needs the network).
        classes: output channels (3 for denoising pretraining, K for segmentation).
        decoder_width: multiplies every decoder channel count (the paper's 1x, 2x, 3x).
        mean, std: input normalisation; defaults to the encoder's pretrained config.
        **options: architecture options, e.g. ``decoder_channels``; see :func:`arch_options`.
    """
    spec = get_arch(arch)
    check_options(f"arch {arch!r}", options, arch_options(arch))
    if not isinstance(decoder_width, int) or isinstance(decoder_width, bool) or decoder_width < 1:
        raise ValueError(f"decoder_width must be a positive integer (the paper uses 1, 2, 3); got {decoder_width!r}")
    encoder = encoder or spec.default_encoder
    enc, dec = spec.builder(encoder=encoder, encoder_weights=encoder_weights, decoder_width=decoder_width, **options)
    config = dict(
        arch=arch,
        encoder=encoder,
        encoder_weights=None if encoder_weights is None else str(encoder_weights),
        classes=classes,
        decoder_width=decoder_width,
        mean=[float(v) for v in (mean if mean is not None else enc.mean)],
        std=[float(v) for v in (std if std is not None else enc.std)],
        **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},  # plain JSON data
    )
    return SegmentationModel(enc, dec, classes, config)
