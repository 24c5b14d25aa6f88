import copy
import json

import pytest
import torch
import torch.nn.functional as F

import ddep
from conftest import TINY_TRANSUNET, assert_config_rebuilds, tiny_model
from ddep.models.decoder import DecoderBlock


@pytest.mark.parametrize("arch", ["unet", "transunet"])
@pytest.mark.parametrize("width", [1, 2, 3])
def test_logits_at_input_resolution_and_width_scales_decoder(arch, width):
    model = tiny_model(arch, classes=5, decoder_width=width).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5, 32, 32)
    assert model.decoder.out_channels == 16 * width
    assert model.decoder.blocks[0].conv2[0].out_channels == 256 * width


def test_unet_has_a_skip_at_every_stride():
    model = tiny_model("unet")
    # ResNet-18 features at strides 2, 4, 8, 16, 32 with 64, 64, 128, 256, 512 channels:
    # four blocks take skips (16, 8, 4, 2) and a last block reaches stride 1 without one.
    assert model.encoder.reductions == [2, 4, 8, 16, 32]
    in_channels = [b.conv1[0].in_channels for b in model.decoder.blocks]
    assert in_channels == [512 + 256, 256 + 128, 128 + 64, 64 + 64, 32]
    assert [b.conv2[0].out_channels for b in model.decoder.blocks] == [256, 128, 64, 32, 16]


@pytest.mark.parametrize("encoder, size", [("tf_efficientnet_lite0", (32, 48)), ("convnext_atto", (64, 32)), ("resnet18", (35, 51))])
def test_unet_on_other_timm_encoders_and_odd_sizes(encoder, size):
    model = ddep.build_model("unet", encoder, classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 2, *size)


def test_transunet_skips_and_token_grid():
    model = tiny_model("transunet")
    features = model.encoder(torch.randn(1, 3, 32, 64))
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 32), (8, 16), (4, 8), (2, 4)]
    assert [f.shape[1] for f in features] == model.encoder.out_channels == [32, 128, 256, 64]
    assert model.decoder.center[0].out_channels == 512


@pytest.mark.parametrize("size", [(32, 64), (64, 32), (48, 16)])
def test_transunet_non_square_inputs(size):
    model = tiny_model("transunet", classes=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 4, *size)


@pytest.mark.parametrize("class_token", [False, True])
def test_transunet_tokens_match_timm_at_the_native_size(class_token):
    encoder = tiny_model("transunet", class_token=class_token).eval().encoder
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = encoder(x)[-1]
        timm_tokens = encoder.model.forward_features(x)[:, int(class_token) :]  # the patch tokens
    assert torch.allclose(ours.flatten(2).transpose(1, 2), timm_tokens, atol=1e-5)


def test_transunet_position_embedding_is_resampled_for_other_grids():
    encoder = tiny_model("transunet").eval().encoder
    x = torch.randn(1, 3, 32, 64)  # a 2 x 4 token grid
    with torch.no_grad():
        before = encoder(x)[-1]
        encoder.model.pos_embed.zero_()
        after = encoder(x)[-1]
    assert not torch.allclose(before, after)


def test_transunet_has_no_class_token_by_default_as_the_official_code():
    """The official Embeddings hold patch tokens plus their position embeddings, nothing else;
    the class token's parameter is gone (an unused one would break DDP): every parameter learns."""
    model = tiny_model("transunet", decoder_channels=(8, 8, 8, 8), center_channels=8).train()
    vit = model.encoder.model
    assert vit.cls_token is None and vit.num_prefix_tokens == 0
    assert not [n for n, _ in model.named_parameters() if "cls_token" in n]
    assert vit.pos_embed.shape == (1, 14 * 14, 64)
    model(torch.randn(1, 3, 32, 32)).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    timm_like = tiny_model("transunet", class_token=True).encoder.model
    assert timm_like.cls_token.shape == (1, 1, 64) and timm_like.num_prefix_tokens == 1
    assert timm_like.pos_embed.shape == (1, 1 + 14 * 14, 64)


def dropout_rates(encoder: torch.nn.Module) -> dict[str, float]:
    return {n: m.p for n, m in encoder.named_modules() if isinstance(m, torch.nn.Dropout)}


def test_transunet_dropout_where_the_official_model_has_it():
    """Official TransUNet (R50-ViT-B_16 config): dropout_rate 0.1 after the position embeddings
    and twice in each MLP; attention_dropout_rate 0.0 on the attention weights and after the
    output projection. dropout=0.0 is timm's ViT."""
    options = dict(TINY_TRANSUNET, depth=2)
    official = {"pos_drop": 0.1}
    for i in range(2):
        official |= {f"blocks.{i}.attn.attn_drop": 0.0, f"blocks.{i}.attn.proj_drop": 0.0}
        official |= {f"blocks.{i}.mlp.drop1": 0.1, f"blocks.{i}.mlp.drop2": 0.1}
    rates = dropout_rates(ddep.build_model("transunet", **options).encoder.model)
    assert {n: p for n, p in rates.items() if not n.startswith(("patch_embed.", "head_drop"))} == official  # unused heads
    assert set(dropout_rates(ddep.build_model("transunet", dropout=0.0, **options).encoder).values()) == {0.0}


def test_frozen_encoder_has_no_dropout_in_train_mode():
    model = tiny_model("transunet").train()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        first, second = model.encoder(x)[-1], model.encoder(x)[-1]
        assert not torch.allclose(first, second)  # dropout at work while the encoder trains
        model.freeze_encoder().train()
        first, second = model.encoder(x)[-1], model.encoder(x)[-1]
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "arch, options, mode, align",
    [("transunet", {}, "bilinear", True), ("transunet", {"align_corners": False}, "bilinear", False), ("unet", {}, "nearest", None)],
)
def test_decoder_upsampling(arch, options, mode, align):
    """TransUNet upsamples as the official nn.UpsamplingBilinear2d(scale_factor=2), i.e. bilinear
    with align_corners=True; UNet with nearest neighbours."""
    decoder = tiny_model(arch, **options).decoder
    x = torch.randn(1, 2, 4, 6)
    expected = F.interpolate(x, scale_factor=2, mode=mode, **({} if align is None else {"align_corners": align}))
    for block in decoder.blocks[0], decoder.blocks[-1]:  # with a skip and without
        torch.testing.assert_close(block.upsample(x, torch.empty(1, 1, 8, 12)), expected)
        torch.testing.assert_close(block.upsample(x), expected)
    if align:
        torch.testing.assert_close(expected, torch.nn.UpsamplingBilinear2d(scale_factor=2)(x))
        assert not torch.allclose(expected, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="align_corners=True needs an interpolating upsample_mode"):
        DecoderBlock(2, 0, 2, "nearest", align_corners=True)


def test_transunet_options_are_in_the_config_and_rebuild_the_model():
    timm_like = dict(class_token=True, dropout=0.0, align_corners=False)
    model = tiny_model("transunet", **timm_like)
    assert {k: model.config[k] for k in timm_like} == timm_like
    rebuilt = ddep.build_model(**json.loads(json.dumps(model.config)))
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert "encoder.model.cls_token" in rebuilt.state_dict()
    assert set(dropout_rates(rebuilt.encoder).values()) == {0.0}
    assert rebuilt.decoder.blocks[0].align_corners is False


def test_a_model_saved_with_the_class_token_gets_a_clear_error_under_the_new_defaults():
    """Models exported before the official defaults carry a class token and no option saying so."""
    from ddep.models.saving import model_from_state

    old = tiny_model("transunet", class_token=True)
    config = {k: v for k, v in old.config.items() if k != "class_token"}
    with pytest.raises(ValueError, match=r"1 unexpected, 1 of another shape, e\.g\. encoder\.model\.cls_token, encoder\.model\.pos_embed"):
        model_from_state(config, old.state_dict(), "old.safetensors")


def test_transunet_refuses_sides_not_multiple_of_16():
    model = tiny_model("transunet")
    with pytest.raises(ValueError, match="multiples of 16; got 40x32"):
        model(torch.randn(1, 3, 40, 32))


@pytest.mark.slow
def test_full_transunet_matches_the_paper_sizes():
    model = ddep.build_model("transunet")
    assert model.config["mean"] == [0.5, 0.5, 0.5]
    assert model.encoder.out_channels == [64, 256, 512, 768]
    assert len(model.encoder.model.blocks) == 12
    params = sum(p.numel() for p in model.parameters())
    assert 100e6 < params < 110e6  # TransUNet R50-ViT-B/16 has about 105M parameters
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 48)).shape == (1, 3, 32, 48)


@pytest.mark.parametrize("arch", ["unet", "transunet"])
def test_config_rebuilds_the_same_model(arch):
    assert_config_rebuilds(tiny_model(arch, classes=4, decoder_width=2), 32)


def test_normalisation_comes_from_the_encoder_and_can_be_overridden():
    assert tiny_model("unet").config["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert tiny_model("unet", encoder="tf_efficientnet_lite0").config["std"] == [0.5, 0.5, 0.5]
    assert tiny_model("unet", mean=(0.1, 0.2, 0.3)).config["mean"] == [0.1, 0.2, 0.3]


@pytest.mark.parametrize("arch", ["unet", "transunet"])
def test_replace_head_keeps_every_other_weight(arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.replace_head(7)
    after = model.state_dict()
    assert model.segmentation_head.out_channels == 7 and model.config["classes"] == 7
    for key, value in before.items():
        if key.startswith("segmentation_head."):
            assert after[key].shape[0] == 7
        else:
            assert torch.equal(after[key], value), key
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7, 32, 32)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(arch="unett"), ValueError, "unknown arch 'unett'.*did you mean 'unet'"),
        (dict(arch="unet", encoder="resnet5O"), ValueError, "unknown timm encoder 'resnet5O'; did you mean"),
        (dict(arch="unet", encoder="resnet18", decoder_chanels=(1, 2)), ValueError, "did you mean 'decoder_channels'"),
        (dict(arch="unet", encoder="resnet18", decoder_width=0), ValueError, "decoder_width must be a positive integer"),
        (dict(arch="unet", encoder="resnet18", decoder_width=1.5), ValueError, "decoder_width must be a positive integer"),
        (dict(arch="unet", encoder="resnet18", classes=0), ValueError, "classes must be a positive integer"),
        (dict(arch="unet", encoder="resnet18", decoder_channels=(64, 32)), ValueError, "needs 5 entries"),
        (dict(arch="transunet", encoder="resnet18"), ValueError, "not an R50\\+ViT hybrid"),
        (dict(arch="transunet", **dict(TINY_TRANSUNET, resnet_layers=(1, 1))), ValueError, "resnet_layers needs 3 stages"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        ddep.build_model(**kwargs)


def test_list_archs():
    assert ddep.list_archs()[:2] == ["transunet", "unet"]  # then smp:<Arch> (test_smp.py)


def test_decoder_block_equals_convolving_the_concatenated_skip():
    """The block convolves the upsampled input and the skip with their parts of conv1's weight:
    outputs and weight gradients are those of conv(cat([x, skip])), and a skip that needs no
    gradient (a frozen encoder's) gets none."""
    torch.manual_seed(0)
    block = DecoderBlock(in_channels=6, skip_channels=4, out_channels=5, upsample_mode="bilinear").eval()
    x, skip = torch.randn(2, 6, 4, 4, requires_grad=True), torch.randn(2, 4, 8, 8)
    out = block(x, skip)
    out.square().sum().backward()
    ours = out.detach(), x.grad.clone(), block.conv1[0].weight.grad.clone()
    x.grad, block.conv1[0].weight.grad = None, None
    upsampled = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    reference = block.conv2(block.conv1(torch.cat([upsampled, skip], dim=1)))
    reference.square().sum().backward()
    torch.testing.assert_close(ours[0], reference.detach())
    torch.testing.assert_close(ours[1], x.grad)
    torch.testing.assert_close(ours[2], block.conv1[0].weight.grad)
    assert skip.grad is None


@pytest.mark.parametrize("arch", ["unet", "transunet"])
def test_grad_checkpointing_changes_no_result_and_keeps_fewer_activations(arch):
    """Outputs, gradients and BatchNorm running statistics (updated once per step, not again
    when the blocks are recomputed) equal those without; autograd saves fewer bytes outside the
    recomputed blocks, which keep only their inputs (the peak it saves: PERFORMANCE.md)."""
    torch.manual_seed(0)
    plain = tiny_model(arch).freeze_encoder().train()  # as in decoder pretraining
    checkpointed = copy.deepcopy(plain).set_grad_checkpointing()
    x = torch.randn(2, 3, 64, 64)
    results = []

    def count(tensor, kept):  # activations kept for the backward pass (weights are there anyway)
        kept.append(0 if isinstance(tensor, torch.nn.Parameter) else tensor.numel() * tensor.element_size())
        return tensor

    for model in (plain, checkpointed):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count(t, kept), lambda t: t):
            out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}, model.state_dict(), sum(kept)))
    (out_a, grads_a, state_a, kept_a), (out_b, grads_b, state_b, kept_b) = results
    torch.testing.assert_close(out_b, out_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    for name in state_a:  # running means, variances and batch counts too
        torch.testing.assert_close(state_b[name], state_a[name], msg=name)
    assert kept_b < 0.8 * kept_a
    with torch.no_grad():  # inference is unaffected
        torch.testing.assert_close(checkpointed.eval()(x), plain.eval()(x))


@pytest.mark.slow
def test_grad_checkpointing_under_torch_compile_gives_the_same_step():
    torch.manual_seed(0)
    plain = tiny_model("unet").train()
    checkpointed = copy.deepcopy(plain).set_grad_checkpointing()
    x = torch.randn(2, 3, 64, 64)
    out = torch.compile(checkpointed, backend="aot_eager")(x)
    out.square().mean().backward()
    reference = plain(x)
    reference.square().mean().backward()
    torch.testing.assert_close(out, reference)
    for (name, a), (_, b) in zip(checkpointed.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for name, value in plain.state_dict().items():  # running statistics updated once
        torch.testing.assert_close(checkpointed.state_dict()[name], value, msg=name)
