"""The UNet-style decoder that both architectures share.

Starting from the deepest feature map, each block upsamples, concatenates the next shallower
encoder feature (the skip) and applies two 3x3 conv-BN-ReLU layers. Blocks past the last skip
upsample by two without one, up to the input resolution. TransUNet's cascaded upsampler is this
decoder with a 3x3 "center" convolution on the ViT tokens, four blocks, bilinear upsampling
(``align_corners=True`` as its official ``nn.UpsamplingBilinear2d``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: With gradient checkpointing, the blocks at the highest resolutions (1/2 and full size) keep no
#: activations and run again in the backward pass: most of the decoder's activation memory, and
#: little of its arithmetic (their few channels make them cheap).
CHECKPOINTED_BLOCKS = 2


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """Upsample to the skip's size (or by two), concatenate the skip, two conv-BN-ReLU.

    ``align_corners`` applies to the interpolating modes (bilinear) only; nearest has none.
    """

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, upsample_mode: str, align_corners: bool = False
    ) -> None:
        super().__init__()
        if align_corners and upsample_mode == "nearest":
            raise ValueError("align_corners=True needs an interpolating upsample_mode (bilinear), not nearest")
        self.upsample_mode = upsample_mode
        self.align_corners = align_corners
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)

    def upsample(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` at the skip's size, or twice its own without a skip."""
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        align = {} if self.upsample_mode == "nearest" else {"align_corners": self.align_corners}
        return F.interpolate(x, size=size, mode=self.upsample_mode, **align)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.upsample(x, skip)
        conv, norm, act = self.conv1
        if skip is None:
            y = conv(x)
        else:
            # conv(cat([x, skip])) as one convolution per part of the weight: mathematically the same,
            # without the concatenated copy, and no input gradient is computed for a frozen encoder's
            # skip (for UNet-R50 that gradient was 17% of the DDeP step's backward pass)
            split = x.shape[1]
            y = F.conv2d(x, conv.weight[:, :split], None, conv.stride, conv.padding, conv.dilation, conv.groups)
            y = y + F.conv2d(skip, conv.weight[:, split:], None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self.conv2(act(norm(y)))


class UNetDecoder(nn.Module):
    """Decode a pyramid of encoder features (shallow to deep) to ``out_channels`` at full size.

    Args:
        encoder_channels: channels of each encoder feature map, shallow to deep.
        decoder_channels: output channels of each block, deep to shallow; there must be at least
            one block per skip (every feature map but the deepest).
        center_channels: if set, a 3x3 conv-BN-ReLU maps the deepest feature to this width first.
        upsample_mode: ``"nearest"`` (UNet) or ``"bilinear"`` (TransUNet).
        align_corners: for bilinear upsampling, as in :func:`torch.nn.functional.interpolate`.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        center_channels: int | None = None,
        upsample_mode: str = "nearest",
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        skip_channels = list(encoder_channels[:-1])[::-1]
        if len(decoder_channels) < len(skip_channels):
            raise ValueError(
                f"decoder_channels has {len(decoder_channels)} blocks; the encoder has {len(skip_channels)} skips"
            )
        self.center = conv_bn_relu(encoder_channels[-1], center_channels) if center_channels else nn.Identity()
        in_channels = [center_channels or encoder_channels[-1], *decoder_channels[:-1]]
        skip_channels += [0] * (len(decoder_channels) - len(skip_channels))
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o, upsample_mode, align_corners) for i, s, o in zip(in_channels, skip_channels, decoder_channels)
        )
        self.out_channels = decoder_channels[-1]
        self.grad_checkpointing = False

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        skips = list(features[:-1])[::-1]
        x = self.center(features[-1])
        recompute_from = len(self.blocks) - CHECKPOINTED_BLOCKS if self.grad_checkpointing and torch.is_grad_enabled() else len(self.blocks)
        for i, block in enumerate(self.blocks):
            skip = skips[i] if i < len(skips) else None
            if i >= recompute_from:
                x = recomputed(block, x, skip)
            else:
                x = block(x, skip)
        return x


def recomputed(module: nn.Module, *args: Any) -> torch.Tensor:
    """``module(*args)`` keeping no activations: it runs again in the backward pass, with the same
    dropout draws, and its batch norms update their running statistics once, as without."""
    # compiled, the recomputation is functional and updates no running statistics anyway
    # (and torch.compile takes no custom context_fn)
    options = {} if torch.compiler.is_compiling() else {"context_fn": lambda: (contextlib.nullcontext(), running_stats_kept(module))}
    return checkpoint(module, *args, use_reentrant=False, **options)


@contextlib.contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Batch norms run again in the backward pass normalise with the batch's statistics as before
    but leave their running statistics as the forward pass left them (updated once per step)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, kept):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
