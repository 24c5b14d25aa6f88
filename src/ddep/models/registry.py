"""One registry of architectures and the one constructor, :func:`build_model`."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from ..choices import check_choice, check_options
from .segmenter import SegmentationModel, check_classes


class Parts(NamedTuple):
    """What a builder returns: the three modules and the encoder's input normalisation."""

    encoder: nn.Module
    decoder: nn.Module
    head: nn.Module
    mean: Sequence[float]
    std: Sequence[float]


Builder = Callable[..., Parts]
BUILDER_ARGS = ("encoder", "encoder_weights", "decoder_width", "classes")


@dataclass(frozen=True)
class Arch:
    name: str
    default_encoder: str
    builder: Builder
    model_class: type[SegmentationModel] = SegmentationModel
    #: the keyword options and their defaults; None: read from the builder's signature
    options: dict[str, Any] | None = None


_ARCHS: dict[str, Arch] = {}


def register_arch(
    name: str, default_encoder: str, model_class: type[SegmentationModel] = SegmentationModel,
    options: dict[str, Any] | None = None,
) -> Callable[[Builder], Builder]:
    """Register ``builder(encoder, encoder_weights, decoder_width, classes, **options) -> Parts``."""

    def wrap(builder: Builder) -> Builder:
        _ARCHS[name] = Arch(name, default_encoder, builder, model_class, options)
        return builder

    return wrap


def list_archs() -> list[str]:
    """ddep's own architectures, then segmentation_models_pytorch's (``smp:<Arch>``)."""
    return sorted(_ARCHS, key=lambda name: (name.startswith("smp:"), name))


def arch_options(arch: str) -> dict[str, Any]:
    """The architecture-specific keyword options of ``arch`` and their defaults."""
    spec = get_arch(arch)
    if spec.options is not None:
        return dict(spec.options)
    params = inspect.signature(spec.builder).parameters
    return {k: p.default for k, p in params.items() if k not in BUILDER_ARGS}


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
        arch: ``"unet"``, ``"transunet"`` or a segmentation_models_pytorch architecture,
            ``"smp:FPN"`` (see :func:`list_archs`).
        encoder: a timm model name (default: the arch's, ``resnet50`` / ``vit_base_r50_s16_224``);
            for ``smp:`` archs an smp encoder name, ``tu-<timm name>`` included.
        encoder_weights: None, a local .pth/.safetensors file, ``"efficientnet-lite0"``, or a
            pretrained tag of timm (or smp) (needs the network, or the hub's local cache).
        classes: output channels (3 for denoising pretraining, K for segmentation).
        decoder_width: multiplies every decoder channel count (the paper's 1x, 2x, 3x).
        mean, std: input normalisation; defaults to the encoder's pretrained config.
        **options: architecture options, e.g. ``decoder_channels``; see :func:`arch_options`.
    """
    spec = get_arch(arch)
    check_options(f"arch {arch!r}", options, arch_options(arch))
    check_classes(classes)
    if not isinstance(decoder_width, int) or isinstance(decoder_width, bool) or decoder_width < 1:
        raise ValueError(f"decoder_width must be a positive integer (the paper uses 1, 2, 3); got {decoder_width!r}")
    encoder = encoder or spec.default_encoder
    parts = spec.builder(encoder=encoder, encoder_weights=encoder_weights, decoder_width=decoder_width, classes=classes, **options)
    config = model_config(arch, encoder, encoder_weights, classes, decoder_width, mean if mean is not None else parts.mean,
                          std if std is not None else parts.std, options)
    return spec.model_class(parts.encoder, parts.decoder, parts.head, config)


#: The keys of every ``model.config``; the others are the architecture's options.
CONFIG_KEYS = ("arch", "encoder", "encoder_weights", "classes", "decoder_width", "mean", "std")


def model_config(
    arch: str, encoder: str, encoder_weights: str | None, classes: int, decoder_width: int,
    mean: Sequence[float], std: Sequence[float], options: dict[str, Any],
) -> dict[str, Any]:
    """A model's ``config`` as plain JSON data: the arguments that rebuild it with :func:`build_model`."""
    return dict(
        arch=arch,
        encoder=encoder,
        encoder_weights=None if encoder_weights is None else str(encoder_weights),
        classes=classes,
        decoder_width=decoder_width,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
    )


def config_options(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture options in a model's ``config``."""
    return {k: v for k, v in config.items() if k not in CONFIG_KEYS}


def describe_model(config: dict[str, Any]) -> str:
    """A model config in words, e.g. ``unet on resnet18 (decoder_width 1, 3 classes)``: two
    configs with the same words have the same architecture and weight shapes."""
    options = "".join(f", {k}={v!r}" for k, v in sorted(config_options(config).items()))
    return f"{config['arch']} on {config['encoder']} (decoder_width {config['decoder_width']}, {config['classes']} classes{options})"
