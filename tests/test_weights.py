import pickle

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data

import ddep
from ddep.models import OFFLINE_WEIGHTS
from ddep.models.weights import load_into, read_state_dict


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to download weights fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", refuse, raising=False)


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


def test_transunet_loads_a_local_file(tmp_path):
    tiny = dict(depth=1, embed_dim=64, num_heads=2, resnet_layers=(1, 1, 1), resnet_width=0.5)
    source = ddep.build_model("transunet", **tiny)
    path = tmp_path / "hybrid.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.model.state_dict().items()}, str(path))
    model = ddep.build_model("transunet", encoder_weights=str(path), **tiny)
    assert torch.equal(model.encoder.model.pos_embed, source.encoder.model.pos_embed)


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
