"""UNet on any timm encoder that can return feature maps (``features_only``)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from .decoder import UNetDecoder
from .encoders import TimmEncoder
from .registry import Parts, register_arch
from .segmenter import make_head


@register_arch("unet", default_encoder="resnet50")
def unet(
    encoder: str,
    encoder_weights: str | None,
    decoder_width: int,
    classes: int,
    decoder_channels: Sequence[int] | None = None,
) -> Parts:
    """A skip connection at every stride the encoder offers, then blocks up to full resolution.

    The default ``decoder_channels`` halve from the deepest block down to 16 at full resolution,
    (256, 128, 64, 32, 16) for a stride-32 encoder such as ResNet-50, as in
    segmentation_models_pytorch; ``decoder_width`` multiplies them.
    """
    enc = TimmEncoder(encoder, encoder_weights)
    first = min(enc.reductions)
    if first < 1 or first & (first - 1):
        raise ValueError(f"encoder {encoder!r} has a first stride of {first}; UNet needs a power of two")
    num_blocks = len(enc.out_channels) - 1 + int(math.log2(first))
    if decoder_channels is None:
        decoder_channels = [16 * 2 ** (num_blocks - 1 - i) for i in range(num_blocks)]
    elif len(decoder_channels) != num_blocks:
        raise ValueError(f"decoder_channels needs {num_blocks} entries for encoder {encoder!r}; got {len(decoder_channels)}")
    dec = UNetDecoder(enc.out_channels, [c * decoder_width for c in decoder_channels], upsample_mode="nearest")
    return Parts(enc, dec, make_head(dec.out_channels, classes), enc.mean, enc.std)
