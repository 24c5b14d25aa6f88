"""segmentation_models_pytorch models under ddep's contract, and back out to plain smp."""
import copy
import json
import time

import fake_data
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from PIL import Image
from torch import nn

import ddep
from ddep.inference import eval_for_model, predict
from ddep.models import OFFLINE_WEIGHTS
from ddep.models.saving import load_model, save_model
from ddep.models.smp_models import save_smp, smp_classes, width_options
from ddep.models.weights import WeightsDownloadError
from conftest import assert_config_rebuilds, onnx_matches_pytorch
from test_freezing import pretraining_step

TINY = "tu-test_resnet"  # timm's 0.5 M-parameter test ResNet, strides 2 to 32
DPT_TINY = dict(decoder_intermediate_channels=[16, 32, 64, 64], decoder_fusion_channels=16)
CONTRACT = ["smp:FPN", "smp:DeepLabV3Plus", "smp:UPerNet", "smp:Segformer", "from_smp:Unet"]


def contract_model(name: str, **kwargs) -> ddep.SegmentationModel:
    """A tiny smp model, built by ddep or (``from_smp:``) by smp and wrapped."""
    kind, _, arch = name.partition(":")
    if kind == "from_smp":
        return ddep.from_smp(getattr(smp, arch)(TINY, encoder_weights=None, classes=kwargs.pop("classes", 3), **kwargs))
    return ddep.build_model(name, TINY, **kwargs)


def head_conv(model) -> nn.Conv2d:
    return [m for m in model.segmentation_head.modules() if isinstance(m, nn.Conv2d)][-1]


def test_every_smp_architecture_is_registered():
    archs = [a for a in ddep.list_archs() if a.startswith("smp:")]
    assert archs == sorted(f"smp:{n}" for n in ("Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus",
                                                "Linknet", "MAnet", "PAN", "UPerNet", "Segformer", "DPT"))


@pytest.mark.parametrize("name", CONTRACT)
def test_logits_at_the_input_resolution(name):
    model = contract_model(name, classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 5, 64, 96)


@pytest.mark.parametrize("name", CONTRACT)
def test_frozen_encoder_is_bit_identical_after_a_pretraining_step(name):
    model = contract_model(name).freeze_encoder().train()
    encoder_before = copy.deepcopy(model.encoder.state_dict())
    decoder_before = copy.deepcopy(model.decoder.state_dict())
    pretraining_step(model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.rand(2, 3, 64, 64))
    assert any(k.endswith("running_mean") for k in encoder_before)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key  # weights and BatchNorm statistics
    assert not any(m.training for m in model.encoder.modules())  # norms and dropout held in eval
    assert any(not torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())


@pytest.mark.parametrize("name", CONTRACT)
def test_replace_head_keeps_every_other_weight(name):
    model = contract_model(name)
    before = copy.deepcopy(model.state_dict())
    old_conv = head_conv(model)
    model.replace_head(7)
    after = model.state_dict()
    assert head_conv(model).out_channels == 7 and model.config["classes"] == 7
    changed = {k for k in before if k not in after or after[k].shape != before[k].shape or not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("segmentation_head.") for k in changed)
    assert head_conv(model).kernel_size == old_conv.kernel_size and head_conv(model).bias.abs().sum() == 0  # smp's init
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7, 64, 64)


@pytest.mark.parametrize("name", CONTRACT)
def test_config_rebuilds_the_same_model(name):
    assert_config_rebuilds(contract_model(name, classes=4), 64)


@pytest.mark.parametrize("name", CONTRACT)
def test_grad_checkpointing_recomputes_the_decoder_with_the_same_step(name):
    """Same outputs, gradients and BatchNorm statistics (updated once), fewer saved activations."""
    torch.manual_seed(0)
    plain = contract_model(name).freeze_encoder().train()
    checkpointed = copy.deepcopy(plain).set_grad_checkpointing()
    x = torch.randn(2, 3, 64, 64)
    results = []
    for model in (plain, checkpointed):
        kept = []
        hook = (lambda t: kept.append(0 if isinstance(t, nn.Parameter) else t.numel() * t.element_size()) or t, lambda t: t)
        torch.manual_seed(1)  # the same dropout draws
        with torch.autograd.graph.saved_tensors_hooks(*hook):
            out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        model.state_dict(), sum(kept)))
    (out_a, grads_a, state_a, kept_a), (out_b, grads_b, state_b, kept_b) = results
    torch.testing.assert_close(out_b, out_a)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], msg=key)
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], msg=key)
    assert kept_b < 0.5 * kept_a


def test_decoder_width_multiplies_the_channel_options():
    assert width_options(smp.FPN) == ["decoder_pyramid_channels", "decoder_segmentation_channels"]
    wide = ddep.build_model("smp:FPN", TINY, decoder_width=2, decoder_segmentation_channels=32)
    assert wide.config["decoder_segmentation_channels"] == 32 and wide.config["decoder_width"] == 2
    assert head_conv(wide).in_channels == 64  # 32 x 2
    assert wide.decoder.p5.out_channels == 512  # smp's default 256, doubled
    assert ddep.build_model("smp:DeepLabV3Plus", TINY, decoder_width=3).decoder.aspp[0].convs[0][0].out_channels == 768
    with pytest.raises(ValueError, match="decoder_width=2: smp's Linknet has no decoder channel setting"):
        ddep.build_model("smp:Linknet", TINY, decoder_width=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(arch="smp:FPM"), "unknown arch 'smp:FPM'.*did you mean 'smp:FPN'"),
        (dict(arch="smp:FPN", encoder="resnet343"), "unknown smp encoder 'resnet343'; did you mean 'resnet34'"),
        (dict(arch="smp:FPN", encoder="tu-resnet5O"), "unknown timm encoder 'resnet5O'"),
        (dict(arch="smp:FPN", encoder=TINY, decoder_channels=[8]), "unknown option 'decoder_channels' for arch 'smp:FPN'"),
        (dict(arch="smp:FPN", encoder=TINY, decoder_merge_policy="mul"), "smp FPN with encoder 'tu-test_resnet': .*merge"),
        (dict(arch="smp:FPN", encoder="resnet18", encoder_weights="efficientnet-lite0"),
         "fits encoder 'tu-tf_efficientnet_lite0', not 'resnet18'"),
        (dict(arch="smp:FPN", encoder="resnet18", encoder_weights="noisy-student"), "neither a file nor smp weights of 'resnet18'"),
    ],
)
def test_bad_arguments_get_one_clear_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        ddep.build_model(**kwargs)
    assert "\n" not in str(info.value)


def test_sides_the_architecture_cannot_take_are_refused_with_the_padding_to_use():
    model = ddep.build_model("smp:FPN", TINY)
    assert model.input_divisor == 32 and ddep.build_model("smp:Unet", TINY).input_divisor == 1
    with pytest.raises(ValueError, match="smp:FPN on tu-test_resnet needs sides that are multiples of 32; got 48x64 .pad to 64x64"):
        model(torch.randn(1, 3, 48, 64))


@pytest.mark.parametrize("encoder", [TINY, "resnet18"])
def test_a_local_weights_file_loads_into_the_encoder_offline(tmp_path, encoder, no_network):
    if encoder == TINY:  # a timm classifier checkpoint, timm's keys
        source = timm.create_model("test_resnet").state_dict()
        expected = {k: source[k] for k in ddep.build_model("smp:FPN", TINY).encoder.model.state_dict()}
    else:  # a torchvision-style ResNet-18 checkpoint, the keys of smp's own encoder plus fc
        source = {**smp.encoders.get_encoder("resnet18").state_dict(), "fc.weight": torch.zeros(1000, 512)}
        expected = {k: v for k, v in source.items() if not k.startswith("fc.")}
    torch.save(source, tmp_path / "encoder.pth")
    model = ddep.build_model("smp:FPN", encoder, encoder_weights=str(tmp_path / "encoder.pth"))
    loaded = model.encoder.model.state_dict() if encoder == TINY else model.encoder.state_dict()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_efficientnet_lite0_offline_weights_on_the_timm_encoder(no_network):
    model = ddep.build_model("smp:FPN", "tu-tf_efficientnet_lite0", encoder_weights="efficientnet-lite0")
    reference = OFFLINE_WEIGHTS["efficientnet-lite0"].load()
    assert torch.equal(model.encoder.model.state_dict()["conv_stem.weight"], reference["conv_stem.weight"])
    assert model.config["mean"] == [0.5, 0.5, 0.5]  # the encoder's own normalisation, from timm


@pytest.mark.parametrize("encoder, weights, name", [("resnet18", "imagenet", "resnet18.imagenet"),
                                                    ("tu-resnet18", "imagenet", "resnet18.tv_in1k")])
def test_named_weights_without_a_network_fail_at_once_in_one_line(monkeypatch, encoder, weights, name):
    """No retries (they would sleep about 30 s): the hub is probed first, then only its cache is asked."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as on a machine where nobody set it
    monkeypatch.setenv("HF_HOME", "/nonexistent-ddep-cache")
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail(f"retried (slept {s} s)"))
    with pytest.raises(WeightsDownloadError, match=f"could not download pretrained weights '{name}'.*local") as info:
        ddep.build_model("smp:FPN", encoder, encoder_weights=weights)
    assert "\n" not in str(info.value) and constants.HF_HUB_OFFLINE is False


def test_from_smp_shares_the_modules_and_records_the_options():
    net = smp.Unet(TINY, encoder_weights=None, classes=2, decoder_channels=(64, 32, 16, 8, 4)).eval()
    model = ddep.from_smp(net)
    assert model.encoder is net.encoder and model.decoder is net.decoder
    assert model.config == dict(arch="smp:Unet", encoder=TINY, encoder_weights=None, classes=2, decoder_width=1,
                                mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], decoder_channels=[64, 32, 16, 8, 4])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), net(x))
    with pytest.raises(ValueError, match="classification head .aux_params."):
        ddep.from_smp(smp.FPN(TINY, encoder_weights=None, aux_params={"classes": 2}))
    with pytest.raises(ValueError, match="in_channels=3 and activation=None"):
        ddep.from_smp(smp.FPN(TINY, encoder_weights=None, activation="sigmoid"))


@pytest.mark.parametrize("name", ["smp:FPN", "smp:Segformer"])
def test_back_out_to_a_plain_smp_model_with_the_same_outputs(tmp_path, name, no_network):
    model = contract_model(name, classes=3, decoder_width=2)
    model.replace_head(4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        plain = ddep.to_smp(model).eval()
        assert type(plain) is smp_classes()[name[4:]] and torch.equal(plain(x), expected)
        folder = save_smp(model, tmp_path / "smp")
        assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left
        loaded = smp.from_pretrained(str(folder)).eval()  # offline: a local folder, no encoder weights fetched
        assert torch.equal(loaded(x), expected)
        # and ddep's own export round trip
        save_model(model, tmp_path / "ddep")
        assert torch.equal(load_model(tmp_path / "ddep").eval()(x), expected)
    with pytest.raises(TypeError, match="to_smp needs a model built on an smp architecture"):
        ddep.to_smp(ddep.build_model("unet", "resnet18"))


def test_dpt_on_a_vit_encoder():
    model = ddep.build_model("smp:DPT", "tu-test_vit", decoder_intermediate_channels=[16, 32, 64, 64], decoder_fusion_channels=16)
    with torch.no_grad():
        assert model.replace_head(4).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)
    torch.testing.assert_close(ddep.to_smp(model).eval()(torch.zeros(1, 3, 64, 64)), model(torch.zeros(1, 3, 64, 64)))


@pytest.mark.slow
def test_cli_chain_pretrain_finetune_export_on_an_smp_model(tmp_path, monkeypatch, capsys, no_network):
    from ddep.cli import main

    monkeypatch.chdir(tmp_path)
    common = ["model.arch=smp:FPN", f"model.encoder={TINY}", "device=cpu", "progress=false", "data.num_workers=0",
              "data.dataset=demo", "data.options={size: 64, num_images: 8}", "data.crop_size=64", "data.batch_size=4",
              "steps=2", "checkpoint_every=2", "log_every=1"]
    assert main(["pretrain", *common, "data.split=unlabeled", "image_every=2"]) == 0
    assert main(["finetune", *common, "init=runs/pretrain/model", "data.labeled=4", "eval_every=0"]) == 0
    metrics = json.loads((tmp_path / "runs/finetune/metrics.json").read_text())
    assert metrics["inference"]["size_divisor"] == 32  # whole images padded to FPN's stride
    assert main(["evaluate", "checkpoint=runs/finetune/model", "data.dataset=demo", "data.options={size: 48, num_images: 2}",
                 "device=cpu", "name=eval48"]) == 0  # 48 px images: padded to 64, logits cropped back
    assert json.loads((tmp_path / "runs/eval48/metrics.json").read_text())["num_images"] == 2
    for i in range(2):
        fake_data.save(fake_data.rgb(i, (40, 56)), tmp_path / "photos" / f"{i}.png")
    assert main(["predict", "checkpoint=runs/finetune/model", "input=photos", "output=masks", "device=cpu"]) == 0
    assert Image.open(tmp_path / "masks/0.png").size == (56, 40)
    assert main(["export", "checkpoint=runs/finetune/model", "output=exported", "onnx=true", "onnx_size=[64, 64]"]) == 0
    assert "smp model (segmentation_models_pytorch.from_pretrained): exported/smp" in capsys.readouterr().out
    model = load_model("runs/finetune/model").eval()
    x = torch.randn(2, 3, 64, 64)  # a batch of 2 through a graph traced with 1
    with torch.no_grad():
        assert torch.equal(smp.from_pretrained("exported/smp").eval()(x), model(x))
    onnx_matches_pytorch("exported/model.onnx", model, x)


@pytest.mark.slow
def test_the_five_lines_of_smp_md_run(tmp_path, monkeypatch, no_network):
    """docs/SMP.md's Python, on a tiny encoder, a folder of 8 images and 2 steps."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "SMP.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)[:1]
    for old, new in [('"resnet34", encoder_weights="imagenet"', f'"{TINY}", encoder_weights=None'),
                     ('"steps=20000"', '"steps=2", "data.crop_size=64", "data.batch_size=4", "data.num_workers=0", '
                                       '"progress=false", "device=cpu"')]:
        assert old in block, f"docs/SMP.md changed: {old!r} not found"
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)
    for i in range(8):
        fake_data.save(fake_data.rgb(i, (64, 64)), tmp_path / "my_unlabeled_images" / f"{i}.png")
    namespace = {}
    exec(compile(block, "docs/SMP.md", "exec"), namespace)
    net = namespace["net"]
    assert net.segmentation_head[0].out_channels == 19  # the user's head is left alone
    pretrained = load_model(tmp_path / "runs" / "pretrain" / "model")
    for key, value in net.decoder.state_dict().items():  # the user's model holds the pretrained decoder
        assert torch.equal(value, pretrained.decoder.state_dict()[key]), key


@pytest.mark.parametrize("arch, encoder, options", [
    ("smp:PSPNet", "resnet18", {}),  # encoder_depth 3: ResNet-18's layer3 and layer4 unused
    ("smp:Unet", "resnet18", dict(encoder_depth=4, decoder_channels=[32, 16, 8, 4])),  # layer4 unused
    ("smp:DPT", "tu-test_vit3", DPT_TINY),  # the ViT's final norm, attention pool and classifier unused
])
def test_parameters_smp_never_uses_are_found_at_build_time_frozen_and_kept(arch, encoder, options):
    model = ddep.build_model(arch, encoder, **options)
    plain = ddep.to_smp(model).train()  # every parameter trainable: which ones get no gradient?
    plain(torch.randn(2, 3, 64, 64)).sum().backward()
    unused = {n for n, p in plain.named_parameters() if p.grad is None}
    assert unused and set(model.unused_parameters) == unused
    for frozen in (False, True):  # unfreezing the encoder leaves them frozen
        if frozen:
            model.freeze_encoder().unfreeze_encoder()
        assert {n for n, p in model.named_parameters() if not p.requires_grad} == unused
    assert unused <= model.state_dict().keys()  # kept: the smp model has them


def test_a_model_built_under_inference_mode_finds_the_same_unused_parameters():
    from ddep.models.segmenter import find_unused_parameters

    model = ddep.build_model("smp:PSPNet", "resnet18", classes=2)  # smp's own encoder: layer3 and layer4 unused
    with torch.inference_mode():  # a notebook's or a predict loop's: no graph unless asked for
        assert find_unused_parameters(model, (64, 64)) == model.unused_parameters != ()


def test_dpt_takes_any_size_its_patch_size_and_decoder_allow():
    """A ViT made for one size (timm's test_vit3: 160 px) gets timm's dynamic_img_size under smp's DPT.
    DPT's decoder halves the 1/16 token grid for its 1/32 level and doubles it back: sides in 32s."""
    model = ddep.build_model("smp:DPT", "tu-test_vit3", **DPT_TINY)
    assert model.input_divisor == 32
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)
        with pytest.raises(ValueError, match="smp:DPT on tu-test_vit3 needs sides that are multiples of 32; got 40x56 .pad to 64x64"):
            model(torch.randn(1, 3, 40, 56))
        shallow = ddep.build_model("smp:DPT", "tu-test_vit3", encoder_depth=3, decoder_intermediate_channels=[16, 32, 64],
                                   decoder_fusion_channels=16).eval()
        assert shallow.input_divisor == 16 and shallow(torch.randn(1, 3, 48, 80)).shape == (1, 3, 48, 80)
        probs = predict(model, torch.randn(1, 3, 40, 56), **eval_for_model({}, model))
        assert probs.shape == (1, 3, 40, 56)
        plain = ddep.to_smp(model).eval()
        assert plain.config["dynamic_img_size"] is True  # saved by save_pretrained: smp's from_pretrained gets it too
        x = torch.randn(1, 3, 32, 64)
        assert torch.equal(plain(x), model(x))
    fixed = ddep.build_model("smp:DPT", "tu-test_vit3", **DPT_TINY, dynamic_img_size=False)
    with pytest.raises(ValueError, match=r"smp:DPT on tu-test_vit3 with dynamic_img_size=False takes 160x160 inputs only; got 64x64"):
        fixed(torch.randn(1, 3, 64, 64))
    wrapped = ddep.from_smp(smp.DPT("tu-test_vit3", encoder_weights=None, **DPT_TINY))  # the user's own, fixed-size
    assert wrapped.config["dynamic_img_size"] is False
    assert ddep.from_smp(smp.DPT("tu-test_vit3", encoder_weights=None, **DPT_TINY, dynamic_img_size=True)).config.get(
        "dynamic_img_size", True) is True


def test_dpt_on_a_patch_14_vit_is_refused_by_name_while_smps_decoder_cannot_fuse_it():
    """smp 0.6's DPT truncates a patch-14 ViT's reassembly factors (3.5 to 3, ...): its features do not
    fuse at any size (smp issue #1328). When smp fixes it, this test fails: lift the refusal then."""
    import ddep

    with pytest.raises(ValueError, match=r"smp:DPT on tu-vit_small_patch14_dinov2: smp .*'s DPT decoder cannot fuse the features "
                                         r"of a ViT whose patch size is not a power of two \(14; smp issue #1328\)"):
        ddep.build_model("smp:DPT", "tu-vit_small_patch14_dinov2", classes=3, encoder_weights=None, **DPT_TINY)
    model = smp.DPT("tu-vit_small_patch14_dinov2", encoder_weights=None, classes=3, dynamic_img_size=True, **DPT_TINY)
    with pytest.raises(ValueError, match=r"smp:DPT on tu-vit_small_patch14_dinov2: smp .*'s DPT decoder cannot fuse"):
        ddep.from_smp(model)  # a user's own DPT: refused as it is wrapped, not at the first step
    with pytest.raises(RuntimeError, match="must match the size of tensor"), torch.no_grad():
        model.eval()(torch.randn(1, 3, 224, 224))
