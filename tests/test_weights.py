import pickle
from functools import partial

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data
from timm.layers import HybridEmbed

import ddep
from ddep.models import OFFLINE_WEIGHTS
from ddep.models.transunet import hybrid_backbone
from ddep.models.weights import load_into, pretrained_name, read_state_dict


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weight_file_loads_offline(tmp_path, suffix, no_network):
    torch.manual_seed(1)
    classifier = timm.create_model("resnet18")  # a full classifier checkpoint: its fc head is ignored
    path = tmp_path / f"resnet18{suffix}"
    state = classifier.state_dict()
    (save_file if suffix == ".safetensors" else torch.save)(state, str(path))
    model = ddep.build_model("unet", "resnet18", encoder_weights=str(path))
    for key, value in model.encoder.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.config["encoder_weights"] == str(path)


def test_checkpoint_wrapped_in_state_dict_key(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    assert read_state_dict(path).keys() == state.keys()


def test_efficientnet_lite0_classifies_chelsea_as_egyptian_cat():
    classifier = timm.create_model("tf_efficientnet_lite0").eval()
    load_into(classifier, OFFLINE_WEIGHTS["efficientnet-lite0"].load(), "efficientnet-lite0")
    image = Image.fromarray(data.chelsea()).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)[None]
    mean, std = classifier.pretrained_cfg["mean"], classifier.pretrained_cfg["std"]
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = classifier(x).softmax(-1)
    assert probs.argmax().item() == 285  # Egyptian cat
    assert probs.max().item() > 0.5


def test_efficientnet_lite0_encoder_for_unet(no_network):
    model = ddep.build_model("unet", "tf_efficientnet_lite0", encoder_weights="efficientnet-lite0")
    reference = OFFLINE_WEIGHTS["efficientnet-lite0"].load()
    assert torch.equal(model.encoder.model.conv_stem.weight, reference["conv_stem.weight"])
    assert torch.equal(model.encoder.model.blocks[6][0].bn2.running_var, reference["blocks.6.0.bn2.running_var"])
    assert model.config["mean"] == [0.5, 0.5, 0.5]


def test_transunet_loads_a_timm_file_with_its_class_token(tmp_path):
    """A timm checkpoint has a class token and its position embedding first: by default both
    go after loading (patch tokens keep theirs); class_token=True keeps timm's tensors as they are."""
    tiny = dict(depth=1, embed_dim=64, num_heads=2)
    trunk = dict(resnet_layers=(1, 1, 1), resnet_width=0.5)
    classifier = timm.create_model("vit_base_r50_s16_224", embed_layer=partial(HybridEmbed, backbone=hybrid_backbone((1, 1, 1), 0.5)), **tiny)
    state = classifier.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 14 * 14, 64)
    path = tmp_path / "hybrid.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    official = ddep.build_model("transunet", encoder_weights=str(path), **tiny, **trunk).encoder.model
    assert torch.equal(official.pos_embed, state["pos_embed"][:, 1:])
    assert torch.equal(official.blocks[0].mlp.fc1.weight, state["blocks.0.mlp.fc1.weight"])
    timm_like = ddep.build_model("transunet", encoder_weights=str(path), class_token=True, **tiny, **trunk).encoder.model
    assert torch.equal(timm_like.pos_embed, state["pos_embed"]) and torch.equal(timm_like.cls_token, state["cls_token"])


@pytest.mark.parametrize(
    "encoder, tag, name",
    [
        ("resnet50", "imagenet", "resnet50.tv_in1k"),  # torchvision's weights, as smp's "imagenet"
        ("resnet18.a1_in1k", "imagenet", "resnet18.tv_in1k"),
        ("resnet50", "default", "resnet50"),  # timm's default tag (a1_in1k)
        ("resnet50", "a1_in1k", "resnet50.a1_in1k"),
        ("convnext_tiny", "imagenet", "convnext_tiny"),  # no torchvision weights in timm
        ("tf_efficientnet_lite0", "imagenet", "tf_efficientnet_lite0"),
    ],
)
def test_imagenet_means_torchvision_weights_where_timm_has_them(encoder, tag, name):
    assert pretrained_name(encoder, tag) == name


def test_models_command_documents_what_imagenet_means(capsys):
    from ddep.cli import main

    assert main(["models"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("encoder_weights=imagenet:"))
    assert "(timm tag tv_in1k)" in line and "else timm's default tag" in line
    assert "resnet50, resnet101" in line and "convnext" not in line


@pytest.mark.parametrize(
    "encoder, weights, message",
    [
        ("resnet18", "missing/weights.pth", "weights file not found: missing/weights.pth"),
        ("resnet18", "efficientnet-lite0", "fits encoder 'tf_efficientnet_lite0', not 'resnet18'"),
        ("resnet18", "in22k_nonsense", "neither a file nor a timm tag of 'resnet18' \\(tags: .*a1_in1k"),
    ],
)
def test_weight_errors(encoder, weights, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ddep.build_model("unet", encoder, encoder_weights=weights)


def test_weights_for_another_encoder_name_the_missing_tensors(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(ValueError, match=r"r18.pth: 165 encoder tensors missing, e.g. layer1.0.conv3.weight"):
        ddep.build_model("unet", "resnet50", encoder_weights=str(path))


def test_weights_of_the_wrong_shape_are_named(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"odd.pth: tensor shapes do not fit the encoder: conv1.weight \(64, 3, 3, 3\) != \(64, 3, 7, 7\)"):
        ddep.build_model("unet", "resnet18", encoder_weights=str(path))


def test_download_failure_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-ddep-cache")
    with pytest.raises(RuntimeError, match="could not download pretrained weights 'resnet18.a1_in1k'.*local") as info:
        ddep.build_model("unet", "resnet18", encoder_weights="a1_in1k")
    assert "\n" not in str(info.value)


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_never_run(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Exploit()}, protocol=2))
    with pytest.raises(ValueError, match="evil.pth: not a readable weights file"):
        ddep.build_model("unet", "resnet18", encoder_weights=str(path))
    assert "pwned" not in capsys.readouterr().out


def test_non_tensor_payload_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="list.pth: expected a mapping of names to tensors"):
        read_state_dict(path)


def test_a_name_is_a_tag_even_where_a_folder_or_file_of_that_name_exists(tmp_path, monkeypatch):
    """Only a value that looks like a path (a separator, a weight-file suffix, or a Path object) is
    a file: an `imagenet` folder in the working directory does not turn the tag into a missing file."""
    from pathlib import Path

    from ddep.models.weights import weights_kind

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "default").write_text("")
    (tmp_path / "mine").write_bytes(b"weights without a suffix")
    for tag in ("imagenet", "default", "a1_in1k", "mine"):
        assert weights_kind(tag) == "tag", tag
    assert weights_kind("efficientnet-lite0") == "offline" and weights_kind(None) == "none"
    for path in ("./imagenet", "imagenet/", "runs/x/encoder.safetensors", "w.pth", "W.PT", "r18.bin", Path("imagenet")):
        assert weights_kind(path) == "file", path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-ddep-cache")
    with pytest.raises(RuntimeError, match="could not download pretrained weights 'resnet18.tv_in1k'"):
        ddep.build_model("unet", "resnet18", encoder_weights="imagenet")  # the tag, not the folder
    with pytest.raises(ValueError, match=r"'mine' is neither a file nor a timm tag .* a file 'mine' is here: write ./mine to load it"):
        ddep.build_model("unet", "resnet18", encoder_weights="mine")
