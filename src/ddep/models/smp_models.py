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
import json
import logging
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
from .segmenter import SegmentationModel, find_unused_parameters
from .weights import OFFLINE_WEIGHTS, create_pretrained, load_encoder_weights, load_into, pretrained_name, read_state_dict, weights_kind

PREFIX = "smp:"
TIMM_PREFIX = "tu-"
#: Constructor arguments ddep sets itself: the encoder and its weights, 3 input channels, the
#: class count, raw logits (no activation) and no classification head.
FIXED_ARGS = ("self", "kwargs", "encoder_name", "encoder_weights", "in_channels", "classes", "activation", "aux_params")
#: Options of smp's timm encoders (passed through an architecture's ``**kwargs``) that ddep offers,
#: as (ddep's default, smp's): DPT takes any size its ViT's patch size divides, not only the
#: size the ViT was made for (224 px, say); timm's ViTs take ``dynamic_img_size`` for that.
ADDED_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {"DPT": {"dynamic_img_size": (True, False)}}
#: The key under which :func:`save_smp` keeps ddep's model config in smp's config.json (smp passes
#: no key that starts with ``_`` to the model), so that ddep loads the folder as it was exported.
DDEP_CONFIG_KEY = "_ddep_config"

log = logging.getLogger(__name__)


@functools.cache
def smp_classes() -> dict[str, type[smp.base.SegmentationModel]]:
    """Every smp architecture by class name (``Unet``, ``FPN``, ``DeepLabV3Plus``, ...)."""
    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


def smp_options(cls: type) -> dict[str, Any]:
    """The constructor options of an smp architecture that ddep passes through, with their defaults."""
    params = inspect.signature(cls.__init__).parameters
    added = {k: ddep_default for k, (ddep_default, _) in ADDED_OPTIONS.get(cls.__name__, {}).items()}
    return {**{k: p.default for k, p in params.items() if k not in FIXED_ARGS}, **added}


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
    """smp's constructor; a bad encoder or option becomes one ``ValueError`` line.

    :data:`ADDED_OPTIONS` go to smp only where they differ from smp's own default (so that smp's
    config.json names them only then); a timm encoder that does not know one left at ddep's
    default is built without it."""
    kwargs, added = dict(kwargs), ADDED_OPTIONS.get(cls.__name__, {})
    explicit = added.keys() & kwargs.keys()
    values = {k: kwargs.pop(k, ddep_default) for k, (ddep_default, _) in added.items()}
    given = {k: v for k, v in values.items() if v != added[k][1]}
    try:
        try:
            return cls(encoder_name=encoder, encoder_weights=weights, classes=classes, **kwargs, **given)
        except TypeError as e:  # e.g. "__init__() got an unexpected keyword argument 'dynamic_img_size'"
            if not [k for k in given if k in str(e) and k not in explicit]:
                raise
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


def check_dpt_fuses(model: nn.Module, encoder: str) -> None:
    """smp's DPT decoder cannot fuse the features of a ViT whose patch size is not a power of two
    (patch 14: DINOv2): it would fail at the first forward pass; refused by name instead."""
    if isinstance(model, smp.DPT) and any(stride & (stride - 1) for stride in model.encoder.output_strides):
        raise ValueError(f"smp:DPT on {encoder}: smp {smp.__version__}'s DPT decoder cannot fuse the features of a ViT whose patch "
                         f"size is not a power of two ({model.encoder.output_strides[0]}; smp issue #1328): choose a patch-16 "
                         "ViT, e.g. tu-vit_base_patch16_dinov3")


def build_smp(
    cls: type, encoder: str, encoder_weights: str | None, decoder_width: int, classes: int, **options: Any
) -> Parts:
    """smp's ``cls`` with ``options``, its decoder channels times ``decoder_width``."""
    check_encoder_name(encoder)
    kwargs = smp_kwargs(cls, decoder_width, options)
    model = _construct(cls, encoder, None, classes, kwargs)  # checks the arguments before any download
    check_dpt_fuses(model, encoder)
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


#: :func:`find_unused_parameters` of the models :func:`ddep.build_model` built, by architecture:
#: its config (less the class count, weights and normalisation) fixes which parameters are used.
_UNUSED: dict[str, tuple[str, ...] | None] = {}


class SmpModel(SegmentationModel):
    """An smp model's encoder, decoder and head with ddep's freezing, heads and checks.

    ``set_grad_checkpointing`` recomputes the whole decoder in the backward pass (smp's decoders
    have no checkpointing of their own); BatchNorm running statistics are updated once per step.

    smp leaves some parameters of many models unused: the encoder stages past ``encoder_depth``
    (PSPNet's default depth is 3; any model with ``encoder_depth < 5``), the final norm and
    classifier of DPT's ViT, the last convolution of smp's EfficientNets. They are found when the
    model is built (:func:`~ddep.models.segmenter.find_unused_parameters`, on the meta device) and
    frozen: never trained, never all-reduced, and kept in the state dict, so the model still loads
    into smp's own architecture. Models that ``config`` describes alike (as :func:`ddep.build_model`
    builds them) share that search; a model from :func:`from_smp` (``shared_probe=False``), whose
    modules a user may have changed, has its own.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, segmentation_head: nn.Module, config: dict[str, Any],
                 shared_probe: bool = True) -> None:
        super().__init__(encoder, decoder, segmentation_head, config)
        self.grad_checkpointing = False
        probe_key = None
        if shared_probe:
            probe_key = json.dumps({k: v for k, v in config.items() if k not in ("classes", "encoder_weights", "mean", "std")},
                                   sort_keys=True, default=str)
        if probe_key is None or probe_key not in _UNUSED:
            unused = find_unused_parameters(self, self.fixed_input_size or self.probe_size())
            if probe_key is not None:
                _UNUSED[probe_key] = unused
        else:
            unused = _UNUSED[probe_key]
        self.freeze_unused_parameters(unused)
        if unused:
            log.debug("%s on %s: %d parameters are never used and stay frozen (%s, ...)", config["arch"], config["encoder"],
                      len(unused), unused[0])

    @property
    def smp_class(self) -> type:
        return smp_classes()[self.config["arch"].removeprefix(PREFIX)]

    @property
    def input_divisor(self) -> int:  # type: ignore[override]
        """The encoder's output stride (1 for architectures that take any size). DPT's decoder
        halves its ViT's token grid once per level past 1/16 and doubles it back, so the grid
        must divide by that too: 32 px for a patch-16 ViT at the default ``encoder_depth`` 4."""
        if not self.smp_class.requires_divisible_input_shape:
            return 1
        if self.smp_class is smp.DPT:
            down = [b.upsample.stride[0] for b in self.decoder.reassemble_blocks if isinstance(b.upsample, nn.Conv2d)]
            return self.encoder.output_stride * max(down, default=1)
        return self.encoder.output_stride

    @property
    def fixed_input_size(self) -> tuple[int, int] | None:
        """The one input size of an encoder that takes no other (a timm ViT without ``dynamic_img_size``)."""
        embed = getattr(getattr(self.encoder, "model", None), "patch_embed", None)
        if getattr(embed, "strict_img_size", False) and getattr(embed, "img_size", None) is not None:
            return tuple(embed.img_size)
        return None

    def probe_size(self) -> tuple[int, int]:
        """An input size every architecture takes: 256 px, or 8 times a larger divisor (PAN needs 8 px at the deepest level)."""
        d = self.input_divisor
        side = -(-max(256, 8 * d) // d) * d
        return side, side

    def check_input(self, x: torch.Tensor) -> None:
        fixed = self.fixed_input_size
        if fixed is not None and x.dim() == 4 and tuple(x.shape[-2:]) != fixed:
            h, w = x.shape[-2:]
            why = ("with dynamic_img_size=False" if self.config.get("dynamic_img_size", True) is False
                   else f"(timm's {self.config['encoder'].removeprefix(TIMM_PREFIX)} has no dynamic_img_size)")
            raise ValueError(f"{self.config['arch']} on {self.config['encoder']} {why} takes {fixed[0]}x{fixed[1]} inputs only; "
                             f"got {h}x{w} (data.crop_size={fixed[0]}, eval.mode=slide with eval.crop_size={list(fixed)}, "
                             "or resize)")
        super().check_input(x)

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


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON data (a tuple default and the list read from config.json are the same)."""
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def _from_smp_init(cls: type, init: dict[str, Any], where: str) -> tuple[str, int, dict[str, Any]]:
    """The encoder, class count and ddep options of smp's constructor arguments ``init`` (smp's
    ``model.config``): the options that differ from smp's defaults, and ddep's added options with
    the value smp built them with."""
    name = cls.__name__
    if init.get("aux_params") is not None:
        raise ValueError(f"{where}: {name} has a classification head (aux_params); ddep trains segmentation "
                         "heads only, so build it without aux_params")
    if init.get("in_channels", 3) != 3 or init.get("activation") is not None:
        raise ValueError(f"{where}: ddep needs in_channels=3 and activation=None (raw logits); "
                         f"got in_channels={init.get('in_channels')}, activation={init.get('activation')!r}")
    defaults = smp_options(cls)
    added = ADDED_OPTIONS.get(name, {})
    values = {**{k: smp_default for k, (_, smp_default) in added.items()}, **init}
    options = {k: v for k, v in values.items() if k in defaults and not _same(v, defaults[k])}
    signature = inspect.signature(cls.__init__).parameters
    return values.get("encoder_name", signature["encoder_name"].default), values.get("classes", signature["classes"].default), options


def from_smp(model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> SmpModel:
    """Wrap an smp model a user built, for :func:`ddep.engine.pretrain` or fine-tuning from Python.

    The wrapper shares the model's modules (training one trains the other); its ``config``
    rebuilds the architecture with :func:`ddep.build_model`. Use :func:`to_smp` to get a plain
    smp model back after a head was replaced. Parameters the model never uses (see
    :class:`SmpModel`) lose their gradients, in the user's model too.
    """
    cls = type(model)
    name = cls.__name__
    check_choice("smp architecture", name, list(smp_classes()))
    if getattr(model, "classification_head", None) is not None:
        raise ValueError(f"from_smp: {name} has a classification head (aux_params); ddep trains segmentation "
                         "heads only, so build it without aux_params")
    encoder, classes, options = _from_smp_init(cls, dict(model.config), "from_smp")
    check_dpt_fuses(model, encoder)
    default_mean, default_std = normalisation(model.encoder)
    config = model_config(PREFIX + name, encoder, None, classes, 1, mean if mean is not None else default_mean,
                          std if std is not None else default_std, options)
    return SmpModel(model.encoder, model.decoder, model.segmentation_head, config, shared_probe=False)


def is_smp_config(config: dict[str, Any]) -> bool:
    """Whether ``config`` (a config.json) is smp's ``save_pretrained`` one."""
    return "_model_class" in config


def config_from_smp(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The arguments of :func:`ddep.build_model` for smp's ``save_pretrained`` config.json: the ddep
    config :func:`save_smp` stored in it, or, for any other smp folder, its architecture, encoder,
    classes and options (the normalisation then is the encoder's, as :func:`from_smp` assumes; no
    ``mean``/``std`` keys). The weights are in the folder: ``encoder_weights`` is None either way."""
    name = config.get("_model_class")
    stored = config.get(DDEP_CONFIG_KEY)
    if isinstance(stored, dict) and stored.get("arch") == PREFIX + str(name):
        return dict(stored, encoder_weights=None)
    if name not in smp_classes():
        raise ValueError(f"{source}: smp architecture {name!r} is not one of smp {smp.__version__}'s "
                         f"({', '.join(smp_classes())})")
    cls = smp_classes()[name]
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    encoder, classes, options = _from_smp_init(cls, init, source)
    known = set(inspect.signature(cls.__init__).parameters) | set(ADDED_OPTIONS.get(name, {}))
    unknown = sorted(k for k in init if k not in known)
    if unknown:
        raise ValueError(f"{source}: smp's {name} config sets {', '.join(unknown)}, which ddep does not pass to smp "
                         "(build the model with ddep.from_smp in Python instead)")
    return dict(arch=PREFIX + name, encoder=encoder, encoder_weights=None, classes=classes, decoder_width=1, **options)


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
    plain.config[DDEP_CONFIG_KEY] = dict(model.config, encoder_weights=None)  # smp passes no _key on to the model
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
