import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a model hub

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import ddep  # noqa: E402
import fake_data  # noqa: E402

TINY_TRANSUNET = dict(depth=1, embed_dim=64, num_heads=2, resnet_layers=(1, 1, 1), resnet_width=0.5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(arch: str, **kwargs) -> ddep.SegmentationModel:
    """Small, fast members of each family: UNet on ResNet-18, a one-layer narrow TransUNet."""
    if arch == "unet":
        return ddep.build_model("unet", kwargs.pop("encoder", "resnet18"), **kwargs)
    return ddep.build_model("transunet", **TINY_TRANSUNET, **kwargs)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to download weights fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr("segmentation_models_pytorch.encoders.hf_hub_download", refuse)
    monkeypatch.setattr("segmentation_models_pytorch.base.hub_mixin.hf_hub_download", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", refuse, raising=False)


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A folder dataset (fake_data.engine_tree) and a run folder, as the cwd."""
    monkeypatch.chdir(tmp_path)
    return fake_data.engine_tree(tmp_path)


def onnx_matches_pytorch(path, model, x) -> None:
    """The ONNX file, run by onnxruntime on the CPU, within 1e-4 of PyTorch (float32 kernels differ)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model.eval()(x), atol=1e-4, rtol=1e-4)


def assert_config_rebuilds(model, size: int) -> None:
    """``build_model(**model.config)``, the config through JSON, is the same model: same outputs."""
    import json

    config = json.loads(json.dumps(model.config))  # plain data, storable as JSON
    rebuilt = ddep.build_model(**config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), rebuilt(x))
    assert rebuilt.config == config
