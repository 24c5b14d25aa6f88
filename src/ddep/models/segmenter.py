"""The segmentation model: encoder, decoder and head, with the freezing DDeP needs."""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

log = logging.getLogger(__name__)


def check_classes(classes: object) -> None:
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise ValueError(f"classes must be a positive integer; got {classes!r}")


def make_head(in_channels: int, classes: int) -> nn.Conv2d:
    """A 3x3 convolution from the decoder's last features to one channel per class."""
    return nn.Conv2d(in_channels, classes, kernel_size=3, padding=1)


def find_unused_parameters(model: nn.Module, size: tuple[int, int]) -> tuple[str, ...] | None:
    """The names of ``model``'s parameters that its output does not depend on (None: not found out).

    One forward pass in training mode on a batch of two ``size`` images, every parameter taken as
    trainable, on the meta device (shapes only: no arithmetic and no memory, whatever the model's
    size); the parameters the output's autograd graph does not reach are unused, as DDP's own
    search finds them. A model that cannot run there (an operation without a meta implementation,
    a tensor kept outside its parameters and buffers) gives None.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        with torch.inference_mode(False), torch.enable_grad():  # a model built under inference_mode, too
            params = {name: torch.empty_like(p, device="meta").requires_grad_() for name, p in model.named_parameters()}
            buffers = {name: torch.empty_like(b, device="meta") for name, b in model.named_buffers()}
            out = functional_call(model, {**params, **buffers}, (torch.empty(2, 3, *size, device="meta"),), strict=True)
    except Exception as e:  # noqa: BLE001 - unknown then; DDP searches for them in every step instead
        log.debug("could not trace %s on the meta device (%s: %s)", type(model).__name__, type(e).__name__, e)
        return None
    finally:
        for module, mode in modes:
            module.training = mode
    if out.grad_fn is None:  # no graph to walk: unknown, not "nothing used"
        return None
    reached, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf, i.e. a parameter
        if variable is not None:
            reached.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return tuple(name for name, p in params.items() if id(p) not in reached)


def _with_dropped_channels(features: Any) -> Any:
    """Each feature map batched with a copy of it under ``Dropout2d(0.5)``; other tensors (a ViT's
    prefix tokens) batched with themselves; lists and tuples of them alike."""
    if isinstance(features, (list, tuple)):
        return type(features)(_with_dropped_channels(f) for f in features)
    if features.dim() == 4:
        return torch.cat([features, F.dropout2d(features, 0.5, training=True)])
    return torch.cat([features, features])


def _kept_pairs(pairs: int) -> torch.Tensor:
    """The pairs of views complementary dropout leaves whole: a random half of them (UniMatch V2)."""
    return torch.randperm(pairs)[: pairs // 2]


def complementary_masks(batch: int, channels: int, device: torch.device, kept: torch.Tensor | None = None) -> torch.Tensor:
    """UniMatch V2's channel masks (``model/semseg/dpt.py``, ``comp_drop``) for a batch whose two
    halves are two views of the same images: sample i of the first half keeps a random half of the
    channels (times 2) and its pair, sample i of the second, the other half; the pairs ``kept``
    (default: a random half of them) keep every channel. ``batch`` x ``channels``."""
    if batch % 2:
        raise ValueError(f"complementary dropout takes a batch of two views of the same images; got {batch} samples")
    half = batch // 2
    first = torch.bernoulli(torch.full((half, channels), 0.5, device=device)) * 2
    first[(_kept_pairs(half) if kept is None else kept).to(device)] = 1.0
    return torch.cat([first, 2.0 - first])


def _with_complementary_channels(features: Any, drawn: dict[Any, torch.Tensor] | None = None) -> Any:
    """Each feature map under :func:`complementary_masks`: the kept pairs drawn once, the channels
    once per channel count (shared by a ViT's levels, as in UniMatch V2); other tensors (a ViT's
    prefix tokens) as they are."""
    drawn = {} if drawn is None else drawn
    if isinstance(features, (list, tuple)):
        return type(features)(_with_complementary_channels(f, drawn) for f in features)
    if features.dim() != 4:
        return features
    batch, channels = features.shape[:2]
    if "kept" not in drawn:
        drawn["kept"] = _kept_pairs(batch // 2)
    if channels not in drawn:
        drawn[channels] = complementary_masks(batch, channels, features.device, drawn["kept"])
    return features * drawn[channels].to(features.dtype)[:, :, None, None]


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

    #: The parameters no output depends on, found when the model is built: they stay frozen
    #: (:meth:`unfreeze_encoder` included), so neither the optimizer nor DDP sees them, and stay in
    #: the state dict. None: not known, so DDP has to search for unused ones in every step.
    #: ddep's own architectures use every parameter.
    unused_parameters: tuple[str, ...] | None = ()

    @property
    def input_divisor(self) -> int:
        """Input sides must be multiples of this (1: any size); evaluation and prediction pad up to it."""
        return getattr(self.encoder, "input_divisor", 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Reject inputs the architecture cannot take, in one line that says what to do."""
        if x.dim() != 4:
            raise ValueError(f"expected a batch B x C x H x W; got shape {tuple(x.shape)}")
        d = self.input_divisor
        h, w = x.shape[-2:]
        if h % d or w % d:
            raise ValueError(f"{self.config['arch']} on {self.config['encoder']} needs sides that are multiples of {d}; "
                             f"got {h}x{w} (pad to {-(-h // d) * d}x{-(-w // d) * d}, or choose such a crop_size)")

    def freeze_unused_parameters(self, names: tuple[str, ...] | None) -> None:
        """Record ``names`` as :attr:`unused_parameters` and take their gradients away."""
        self.unused_parameters = names
        for name in names or ():
            self.get_parameter(name).requires_grad_(False)

    def forward(self, x: torch.Tensor, perturb: bool = False, complementary: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at the input's resolution. ``perturb``: also the logits of the same encoder
        features with half their channels dropped (``Dropout2d(0.5)``, whatever the mode), decoded
        in one pass with the clean ones: UniMatch's feature perturbation (``model/semseg/
        deeplabv3plus.py``, ``need_fp``), on every feature map the decoder takes.
        ``complementary``: the batch's two halves decoded from complementary channels
        (:func:`complementary_masks`, UniMatch V2's dropout of its two strong views)."""
        if perturb and complementary:
            raise ValueError("perturb and complementary are two different perturbations: choose one")
        self.check_input(x)
        features = self.encoder(x)
        if perturb:
            features = _with_dropped_channels(features)
        elif complementary:
            features = _with_complementary_channels(features)
        logits = self.segmentation_head(self.decode(features))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return tuple(logits.chunk(2)) if perturb else logits

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
        self.freeze_unused_parameters(self.unused_parameters)  # never used: nothing to train
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
