"""TransUNet: the hybrid R50+ViT-B/16 encoder and the cascaded upsampler decoder.

The encoder is timm's ``vit_base_r50_s16_224`` (its ``orig_in21k`` weights are the paper's
ImageNet-21k encoder). The ResNet stem and its first two stages give skips at 1/2, 1/4 and 1/8;
the third stage feeds the ViT, whose tokens are reshaped to an (H/16, W/16) map. Position
embeddings are resampled to the input's token grid, so any input whose sides are multiples of 16
works, non-square included; other sizes are refused with a clear error (pad or resize them).

The defaults follow the official TransUNet code (Beckschen/TransUNet) rather than timm's
classifier; :func:`transunet` says where they differ and how to get timm's behaviour.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import timm
import torch
from timm.layers import HybridEmbed, StdConv2dSame, resample_abs_pos_embed
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .decoder import UNetDecoder
from .encoders import check_timm_name
from .registry import Parts, register_arch
from .segmenter import make_head
from .weights import create_timm_pretrained, load_encoder_weights, weights_kind

PATCH_STRIDE = 16
DEFAULT_RESNET_LAYERS = (3, 4, 9)


def hybrid_backbone(layers: Sequence[int], width: float) -> ResNetV2:
    """The ResNetV2 trunk of timm's R50 hybrids (StdConv, GroupNorm, 'same' padding), resizable.

    Channel counts are scaled by ``width`` and must stay multiples of 32 for GroupNorm's 32
    groups inside every bottleneck: widths 0.5, 1, 2 work.
    """
    channels = tuple(int(c * width) for c in (256, 512, 1024)[: len(layers)])
    return ResNetV2(
        layers=list(layers),
        channels=channels,
        stem_chs=int(64 * width),
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
    )


def drop_class_token(vit: VisionTransformer) -> None:
    """Remove the class token and its position embedding, so the tokens are the patches alone.

    Called once the weights are in, as timm's checkpoints have a class token and timm's loader
    resamples ``pos_embed`` for the model's own prefix count. The parameter goes, rather than
    staying unused (which DDP refuses).
    """
    vit.pos_embed = nn.Parameter(vit.pos_embed.detach()[:, 1:].clone())
    vit.cls_token = None
    vit.has_class_token = False
    vit.num_prefix_tokens -= 1
    vit.reset_classifier(0, global_pool="avg")  # timm's own head would pool a patch token


def set_dropout(vit: VisionTransformer, rate: float) -> None:
    """Dropout ``rate`` where the official TransUNet has it: after adding the position embeddings
    and after the MLP's activation and its second layer. Attention and its output projection keep
    none (its ``attention_dropout_rate`` is 0), so timm's ``proj_drop_rate``, which also hits the
    projection, is not used."""
    vit.pos_drop = nn.Dropout(rate)
    for block in vit.blocks:
        block.mlp.drop1 = nn.Dropout(rate)
        block.mlp.drop2 = nn.Dropout(rate)


class HybridViTEncoder(nn.Module):
    """Features at strides 2, 4, 8 (ResNet) and 16 (ViT tokens) from a timm R50+ViT hybrid."""

    #: input sides must be multiples of the patch stride (evaluation and prediction pad up to it)
    input_divisor = PATCH_STRIDE

    def __init__(
        self,
        name: str = "vit_base_r50_s16_224",
        encoder_weights: str | None = None,
        depth: int | None = None,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        resnet_layers: Sequence[int] = DEFAULT_RESNET_LAYERS,
        resnet_width: float = 1.0,
        class_token: bool = False,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_timm_name(name)
        vit_sizes = {k: v for k, v in dict(depth=depth, embed_dim=embed_dim, num_heads=num_heads).items() if v is not None}
        custom_trunk = tuple(resnet_layers) != DEFAULT_RESNET_LAYERS or resnet_width != 1.0
        if len(resnet_layers) != 3:
            raise ValueError(f"resnet_layers needs 3 stages (skips at 1/4 and 1/8, tokens at 1/16); got {tuple(resnet_layers)}")
        if weights_kind(encoder_weights) == "tag":
            if vit_sizes or custom_trunk:
                raise ValueError("pretrained weights from timm need the default encoder sizes; drop depth/embed_dim/num_heads/resnet_*")
            self.model = create_timm_pretrained(name, encoder_weights, num_classes=0)
        else:
            if custom_trunk:
                vit_sizes["embed_layer"] = partial(HybridEmbed, backbone=hybrid_backbone(resnet_layers, resnet_width))
            self.model = timm.create_model(name, num_classes=0, **vit_sizes)
        trunk = getattr(getattr(self.model, "patch_embed", None), "backbone", None)
        if not isinstance(trunk, ResNetV2) or len(trunk.stages) != 3 or self.model.no_embed_class:
            raise ValueError(f"encoder {name!r} is not an R50+ViT hybrid with a stride-16 ResNet trunk (try vit_base_r50_s16_224)")
        if weights_kind(encoder_weights) in ("file", "offline"):
            load_encoder_weights(self.model, name, encoder_weights)
        if not class_token:
            drop_class_token(self.model)
        set_dropout(self.model, dropout)
        stage_channels = [s.blocks[-1].conv3.out_channels for s in trunk.stages]
        self.out_channels: list[int] = [trunk.stem.conv.out_channels, *stage_channels[:2], self.model.embed_dim]
        self.reductions: list[int] = [2, 4, 8, PATCH_STRIDE]
        self.mean = tuple(self.model.pretrained_cfg["mean"])
        self.std = tuple(self.model.pretrained_cfg["std"])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        height, width = x.shape[-2:]
        if height % PATCH_STRIDE or width % PATCH_STRIDE:
            raise ValueError(f"TransUNet input sides must be multiples of 16; got {height}x{width} (pad or resize)")
        vit = self.model
        trunk = vit.patch_embed.backbone
        x = trunk.stem.norm(trunk.stem.conv(x))
        features = [x]
        x = trunk.stem.pool(x)
        for stage in trunk.stages:
            x = stage(x)
            features.append(x)
        grid = vit.patch_embed.proj(trunk.norm(x))
        tokens = grid.flatten(2).transpose(1, 2)
        pos = resample_abs_pos_embed(
            vit.pos_embed, grid.shape[-2:], old_size=vit.patch_embed.grid_size, num_prefix_tokens=vit.num_prefix_tokens
        )
        prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        tokens = vit.pos_drop(torch.cat([*prefix, tokens], dim=1) + pos)
        tokens = vit.norm(vit.blocks(vit.norm_pre(tokens)))[:, vit.num_prefix_tokens :]
        features[-1] = tokens.transpose(1, 2).reshape(grid.shape)
        return features


@register_arch("transunet", default_encoder="vit_base_r50_s16_224")
def transunet(
    encoder: str,
    encoder_weights: str | None,
    decoder_width: int,
    classes: int,
    decoder_channels: Sequence[int] = (256, 128, 64, 16),
    center_channels: int = 512,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    resnet_layers: Sequence[int] = DEFAULT_RESNET_LAYERS,
    resnet_width: float = 1.0,
    class_token: bool = False,
    dropout: float = 0.1,
    align_corners: bool = True,
) -> Parts:
    """TransUNet's cascaded upsampler: a 3x3 conv on the tokens, then four bilinear blocks.

    ``decoder_width`` multiplies ``center_channels`` and ``decoder_channels``. ``depth``,
    ``embed_dim``, ``num_heads`` (ViT) and ``resnet_layers``, ``resnet_width`` (trunk) build
    smaller encoders, for tests or small data; None keeps timm's ViT-B/16 sizes.

    The defaults follow the official TransUNet code, not timm's classifier: no class token
    (its Embeddings hold patch tokens and position embeddings only), ``dropout`` 0.1 (its
    ``dropout_rate``: after the position embeddings and in the MLPs; attention has none) and
    ``align_corners=True`` (its ``nn.UpsamplingBilinear2d``). ``class_token=True, dropout=0.0,
    align_corners=False`` is timm's ViT with PyTorch's default bilinear upsampling.
    """
    enc = HybridViTEncoder(
        encoder, encoder_weights, depth, embed_dim, num_heads, resnet_layers, resnet_width, class_token, dropout
    )
    dec = UNetDecoder(
        enc.out_channels,
        [c * decoder_width for c in decoder_channels],
        center_channels=center_channels * decoder_width,
        upsample_mode="bilinear",
        align_corners=align_corners,
    )
    return Parts(enc, dec, make_head(dec.out_channels, classes), enc.mean, enc.std)
