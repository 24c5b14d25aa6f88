"""segmentation_models_pytorch (smp) architectures under ddep's model contract, and back.

``build_model("smp:FPN", encoder="resnet34")`` builds smp's own model and keeps its encoder,
decoder and head as the three parts of a :class:`SmpModel`, so the state dict keys are smp's
(``encoder.*``, ``decoder.*``, ``segmentation_head.*``). :func:`from_smp` wraps a model a user
already built, :func:`to_smp` hands a plain smp model back and :func:`save_smp` writes smp's own
``save_pretrained`` folder, which ``segmentation_models_pytorch.from_pretrained`` loads.
"""
from __future__ import annotations

import copy
import errno
import functools
import inspect
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from safetensors import SafetensorError
from segmentation_models_pytorch.base.initialization import initialize_head
from torch import nn

from ..atomic import fsync_dir, write_error
from ..choices import check_choice, did_you_mean
from .decoder import recomputed
from .encoders import check_timm_name
from .registry import Parts, config_options, model_config, register_arch
from .segmenter import SegmentationModel
from .weights import OFFLINE_WEIGHTS, create_pretrained, load_encoder_weights, load_into, pretrained_name, read_state_dict, weights_kind

PREFIX = "smp:"
TIMM_PREFIX = "tu-"
#: Constructor arguments ddep sets itself: the encoder and its weights, 3 input channels, the
#: class count, raw logits (no activation) and no classification head.
FIXED_ARGS = ("self", "kwargs", "encoder_name", "encoder_weights", "in_channels", "classes", "activation", "aux_params")


@functools.cache
def smp_classes() -> dict[str, type[smp.base.SegmentationModel]]:
    """Every smp architecture by class name (``Unet``, ``FPN``, ``DeepLabV3Plus``, ...)."""
    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


def smp_options(cls: type) -> dict[str, Any]:
    """The constructor options of an smp architecture that ddep passes through, with their defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k not in FIXED_ARGS}


def width_options(cls: type) -> list[str]:
    """The options that set decoder channel counts (smp names them ``*_channels``)."""
    return [k for k in smp_options(cls) if k.endswith("_channels")]


def _scaled(value: int | Sequence[int], factor: int) -> int | list[int]:
    return value * factor if isinstance(value, int) else [v * factor for v in value]


def smp_kwargs(cls: type, decoder_width: int, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every decoder channel count multiplied by ``decoder_width``."""
    kwargs = dict(options)
    if decoder_width == 1:
        return kwargs
    channels = width_options(cls)
    if not channels:
        raise ValueError(f"decoder_width={decoder_width}: smp's {cls.__name__} has no decoder channel setting "
                         "(its decoder follows the encoder's channels); use decoder_width=1")
    defaults = smp_options(cls)
    return {**kwargs, **{k: _scaled(kwargs.get(k, defaults[k]), decoder_width) for k in channels}}


def _construct(cls: type, encoder: str, weights: str | bool | None, classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """smp's constructor; a bad encoder or option becomes one ``ValueError`` line."""
    try:
        return cls(encoder_name=encoder, encoder_weights=weights, classes=classes, **kwargs)
    except (KeyError, ValueError, TypeError, AssertionError, AttributeError) as e:
        text = str(e).strip().strip("'\"").splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"smp {cls.__name__} with encoder {encoder!r}: {text}") from None


def check_encoder_name(encoder: str) -> None:
    """An smp encoder name, or ``tu-`` and a timm model name."""
    names = smp.encoders.get_encoder_names()
    if encoder.startswith(TIMM_PREFIX):
        check_timm_name(encoder[len(TIMM_PREFIX):])
    elif encoder not in names:
        raise ValueError(f"unknown smp encoder {encoder!r}{did_you_mean(encoder, names)} "
                         f"(timm models: 'tu-<timm name>', e.g. 'tu-{encoder}')")


def _smp_tag(encoder: str, tag: str) -> str:
    """smp's name for the named weights of one of its own encoders (``default``: its first)."""
    settings = list(smp.encoders.encoders[encoder]["pretrained_settings"])
    if tag == "default":
        return settings[0]
    if tag not in settings:
        raise ValueError(f"encoder_weights={tag!r} is neither a file nor smp weights of {encoder!r} "
                         f"(smp has: {', '.join(settings)}; offline sets: {', '.join(OFFLINE_WEIGHTS)})")
    return tag


def normalisation(encoder: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The encoder's input mean and std: timm's pretrained config for ``tu-`` encoders, else ImageNet's.

    smp keeps its own encoders' settings on the model hub, so offline ddep assumes ImageNet's,
    which they nearly all use; pass ``mean``/``std`` to build_model for the others.
    """
    cfg = getattr(getattr(encoder, "model", None), "pretrained_cfg", None) or {}
    return (tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)))


def _load_local_weights(model: nn.Module, encoder: str, encoder_weights: str) -> None:
    """A local file or an offline set into the encoder: timm's keys for ``tu-``, smp's for its own."""
    if encoder.startswith(TIMM_PREFIX):
        load_encoder_weights(model.encoder.model, encoder[len(TIMM_PREFIX):], encoder_weights)
    elif weights_kind(encoder_weights) == "file":
        load_into(model.encoder, read_state_dict(encoder_weights), os.fspath(encoder_weights))
    else:
        fits = OFFLINE_WEIGHTS[os.fspath(encoder_weights)].encoder
        raise ValueError(f"encoder_weights={encoder_weights!r} fits encoder '{TIMM_PREFIX}{fits}', not {encoder!r}")


def build_smp(
    cls: type, encoder: str, encoder_weights: str | None, decoder_width: int, classes: int, **options: Any
) -> Parts:
    """smp's ``cls`` with ``options``, its decoder channels times ``decoder_width``."""
    check_encoder_name(encoder)
    kwargs = smp_kwargs(cls, decoder_width, options)
    model = _construct(cls, encoder, None, classes, kwargs)  # checks the arguments before any download
    kind = weights_kind(encoder_weights)
    if kind == "tag":
        if encoder.startswith(TIMM_PREFIX):  # smp lets timm download; the tag goes into the name
            name = pretrained_name(encoder[len(TIMM_PREFIX):], encoder_weights)
            model = create_pretrained(lambda: _construct(cls, TIMM_PREFIX + name, True, classes, kwargs), name)
        else:
            tag = _smp_tag(encoder, encoder_weights)
            model = create_pretrained(lambda: _construct(cls, encoder, tag, classes, kwargs), f"{encoder}.{tag}")
    elif kind in ("file", "offline"):
        _load_local_weights(model, encoder, encoder_weights)
    mean, std = normalisation(model.encoder)
    return Parts(model.encoder, model.decoder, model.segmentation_head, mean, std)


class SmpModel(SegmentationModel):
    """An smp model's encoder, decoder and head with ddep's freezing, heads and checks.

    ``set_grad_checkpointing`` recomputes the whole decoder in the backward pass (smp's decoders
    have no checkpointing of their own); BatchNorm running statistics are updated once per step.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, segmentation_head: nn.Module, config: dict[str, Any]) -> None:
        super().__init__(encoder, decoder, segmentation_head, config)
        self.grad_checkpointing = False

    @property
    def smp_class(self) -> type:
        return smp_classes()[self.config["arch"].removeprefix(PREFIX)]

    @property
    def input_divisor(self) -> int:  # type: ignore[override]
        return self.encoder.output_stride if self.smp_class.requires_divisible_input_shape else 1

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        d = self.input_divisor
        h, w = x.shape[-2:]
        if h % d or w % d:
            raise ValueError(f"{self.config['arch']} on {self.config['encoder']} needs sides that are multiples of {d}; "
                             f"got {h}x{w} (pad to {-(-h // d) * d}x{-(-w // d) * d}, or choose such a crop_size)")

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        # DPT's ViT encoder returns (features, prefix tokens), and its decoder takes both
        args = tuple(features) if self.smp_class is smp.DPT else (features,)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return recomputed(self.decoder, *args)
        return self.decoder(*args)

    def set_grad_checkpointing(self, enable: bool = True) -> SmpModel:
        self.grad_checkpointing = enable
        return self

    def new_head(self, classes: int) -> nn.Module:
        """smp's head with its last convolution replaced by one with ``classes`` outputs (smp's init)."""
        head = copy.deepcopy(self.segmentation_head)
        name, conv = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Conv2d)][-1]
        fresh = nn.Conv2d(conv.in_channels, classes, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          conv.groups, conv.bias is not None, conv.padding_mode)
        initialize_head(fresh)
        if not name:
            return fresh
        parent, _, attr = name.rpartition(".")
        setattr(head.get_submodule(parent), attr, fresh)
        return head


for _cls in smp_classes().values():
    register_arch(
        PREFIX + _cls.__name__,
        default_encoder=inspect.signature(_cls.__init__).parameters["encoder_name"].default,
        model_class=SmpModel,
        options=smp_options(_cls),
    )(functools.partial(build_smp, _cls))


def from_smp(model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> SmpModel:
    """Wrap an smp model a user built, for :func:`ddep.engine.pretrain` or fine-tuning from Python.

    The wrapper shares the model's modules (training one trains the other); its ``config``
    rebuilds the architecture with :func:`ddep.build_model`. Use :func:`to_smp` to get a plain
    smp model back after a head was replaced.
    """
    cls = type(model)
    name = cls.__name__
    check_choice("smp architecture", name, list(smp_classes()))
    if getattr(model, "classification_head", None) is not None:
        raise ValueError(f"from_smp: {name} has a classification head (aux_params); ddep trains segmentation "
                         "heads only, so build it without aux_params")
    init = dict(model.config)
    if init.get("in_channels", 3) != 3 or init.get("activation") is not None:
        raise ValueError(f"from_smp: ddep needs in_channels=3 and activation=None (raw logits); "
                         f"got in_channels={init.get('in_channels')}, activation={init.get('activation')!r}")
    defaults = smp_options(cls)
    options = {k: v for k, v in init.items() if k in defaults and v != defaults[k]}
    default_mean, default_std = normalisation(model.encoder)
    config = model_config(PREFIX + name, init["encoder_name"], None, init["classes"], 1, mean if mean is not None else default_mean,
                          std if std is not None else default_std, options)
    return SmpModel(model.encoder, model.decoder, model.segmentation_head, config)


def to_smp(model: SmpModel) -> nn.Module:
    """A plain smp model with ``model``'s architecture and a copy of its weights."""
    if not isinstance(model, SmpModel):
        raise TypeError(f"to_smp needs a model built on an smp architecture (arch 'smp:...'); got arch {model.config['arch']!r}")
    config = model.config
    cls = model.smp_class
    options = smp_kwargs(cls, config["decoder_width"], config_options(config))
    plain = _construct(cls, config["encoder"], None, config["classes"], options)
    plain.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    return plain.to(next(model.parameters()).device).train(model.training)


def save_smp(model: SmpModel, directory: str | os.PathLike) -> Path:
    """smp's ``save_pretrained`` folder (config.json, model.safetensors, README.md).

    smp writes into a temporary folder beside ``directory``; once all its files are on disk, each
    replaces its namesake in ``directory`` (a rename), the weights first, with the permissions of a new file
    under the umask (safetensors writes through a 0600 temporary file). Other files in ``directory``
    are left alone. A failure (a full disk, say) removes the temporary folder and raises an
    ``OSError`` naming ``directory``."""
    directory = Path(directory)
    plain = to_smp(model).cpu()
    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        try:
            plain.save_pretrained(str(partial))
        except SafetensorError as e:  # the weights are written by Rust code: its I/O errors are no OSError
            code = re.search(r"os error (\d+)", str(e))
            number = int(code[1]) if code else errno.EIO
            raise OSError(number, os.strerror(number) if code else str(e)) from None
        files = sorted(partial.iterdir(), key=lambda file: file.suffix != ".safetensors")  # the weights first
        for file in files:  # every file on disk before any replaces its namesake
            os.chmod(file, 0o666 & ~umask)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        directory.mkdir(parents=True, exist_ok=True)
        for file in files:
            os.replace(file, directory / file.name)
    except OSError as e:
        raise write_error(e, directory) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    fsync_dir(directory)
    return directory
