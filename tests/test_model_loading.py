"""Models that training, evaluation and prediction must take as they are: smp models that leave
parameters unused (under DDP), smp's own save_pretrained folder, and TransUNet on sides that are
not multiples of its patch stride."""
import json
import os
import subprocess
import sys
from pathlib import Path

import fake_data
import pytest
import segmentation_models_pytorch as smp
import torch
from PIL import Image

import ddep
from conftest import TINY_TRANSUNET
from ddep.cli import main
from ddep.engine.checkpoint import load_checkpoint
from ddep.models.saving import load_model, read_model_config, save_model
from ddep.models.smp_models import save_smp

TINY = "tu-test_resnet"


def odd_sized_tree(root: Path, size=(40, 56)) -> Path:
    """A folder dataset under ``root/odd`` (images/val, masks/val: 2 images of 40 x 56, classes 0, 1, 2) and
    ``root/photos`` (the same images)."""
    for i in range(2):
        fake_data.save(fake_data.rgb(i, size), root / "odd/images/val" / f"{i}.png")
        fake_data.save(fake_data.mask([0, 1, 2], size), root / "odd/masks/val" / f"{i}.png")
        fake_data.save(fake_data.rgb(i, size), root / "photos" / f"{i}.png")
    return root


def evaluate_and_predict(checkpoint: str) -> None:
    """``ddep evaluate`` and ``ddep predict`` of ``checkpoint`` on 40 x 56 images, which need no padding from the user."""
    assert main(["evaluate", f"checkpoint={checkpoint}", "data.root=odd", "data.split=val", "data.options={num_classes: 3}",
                 "device=cpu", "name=eval"]) == 0
    assert json.loads(Path("runs/eval/metrics.json").read_text())["num_images"] == 2
    assert main(["predict", f"checkpoint={checkpoint}", "input=photos", "output=masks", "device=cpu"]) == 0
    assert Image.open("masks/0.png").size == (56, 40)


# ----- 1. DDP and parameters smp never uses

def test_two_gloo_processes_train_an_smp_model_that_leaves_encoder_stages_unused(data):
    """smp's PSPNet uses 3 of ResNet-18's 5 stages (encoder_depth 3): DeP (the encoder trained too) on two processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29543", "-m", "ddep"]
    args = ["pretrain", "data.root=data/images", *fake_data.PRETRAIN, "model.arch=smp:PSPNet", "mode=encoder+decoder",
            "device=cpu", "steps=2", "checkpoint_every=100", "image_every=0", "name=ddp"]
    train = subprocess.run([*torchrun, *args], env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    state = load_checkpoint("runs/ddp/checkpoints/last.pt")
    assert state["step"] == 2
    # the exported model keeps the unused stages, so that it loads in smp as its architecture
    plain = smp.PSPNet("resnet18", encoder_weights=None, classes=3)
    plain.load_state_dict(load_model("runs/ddp/model").state_dict())
    assert any(k.startswith("encoder.layer4.") for k in state["model"])


# ----- 3. smp's save_pretrained folder (ddep export's smp/)

@pytest.fixture
def smp_folder(tmp_path, monkeypatch):
    """smp's save_pretrained folder of a tiny 3-class FPN, as ``ddep export`` writes it (``smp/``), in the cwd;
    its decoder width and normalisation are not smp's to record (ddep's config goes along)."""
    monkeypatch.chdir(tmp_path)
    model = ddep.build_model("smp:FPN", TINY, classes=3, decoder_width=2, decoder_segmentation_channels=16,
                             mean=(0.4, 0.4, 0.4)).eval()
    save_smp(model, tmp_path / "exported" / "smp")
    return model


def test_smp_folder_loads_with_its_config(smp_folder, no_network):
    model = load_model("exported/smp")
    assert type(model) is type(smp_folder) and model.config == smp_folder.config
    assert read_model_config("exported/smp") == smp_folder.config  # without building the weights' model twice
    assert read_model_config("exported/smp/model.safetensors") == smp_folder.config
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), smp_folder(x))


def test_smp_folder_works_as_init_checkpoint_and_for_predict(smp_folder, tmp_path, no_network, capsys):
    fake_data.engine_tree(tmp_path)
    odd_sized_tree(tmp_path)
    common = ["data.root=data", *[a for a in fake_data.FINETUNE if not a.startswith("model.")], "steps=1", "eval_every=0",
              "checkpoint_every=100"]
    assert main(["finetune", "--dry-run", "init=exported/smp", *common]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    assert main(["finetune", "init=exported/smp", *common, "name=ft"]) == 0
    assert load_checkpoint("runs/ft/checkpoints/last.pt")["model_config"]["arch"] == "smp:FPN"
    evaluate_and_predict("exported/smp")  # 40 x 56: padded to FPN's 32, logits cropped back


def test_a_user_saved_smp_folder_loads_offline_and_foreign_ones_are_refused_in_one_line(tmp_path, no_network):
    """A folder a user saved with smp names pretrained encoder weights (not fetched: the folder holds them)."""
    net = smp.Unet(TINY, encoder_weights=None, classes=2, decoder_channels=(64, 32, 16, 8, 4))
    net.save_pretrained(str(tmp_path / "mine"))
    config = json.loads((tmp_path / "mine" / "config.json").read_text())
    (tmp_path / "mine" / "config.json").write_text(json.dumps(dict(config, encoder_weights="imagenet")))
    model = load_model(tmp_path / "mine")
    assert model.config["arch"] == "smp:Unet" and model.config["decoder_channels"] == [64, 32, 16, 8, 4]
    assert model.config == ddep.from_smp(net).config == read_model_config(tmp_path / "mine")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), net.eval()(x))
    smp.FPN(TINY, encoder_weights=None, aux_params={"classes": 2}).save_pretrained(str(tmp_path / "aux"))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (tmp_path / "odd" / "model.safetensors").write_bytes((tmp_path / "mine" / "model.safetensors").read_bytes())
    for folder, message in [("aux", "classification head .aux_params."), ("odd", "neither a ddep nor an smp model config")]:
        with pytest.raises(ValueError, match=message) as info:
            load_model(tmp_path / folder)
        assert "\n" not in str(info.value)


# ----- 4. TransUNet pads to its patch stride in evaluation and prediction

def test_transunet_evaluates_and_predicts_sides_that_are_not_multiples_of_16(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ddep.build_model("transunet", **TINY_TRANSUNET, classes=3)
    assert model.input_divisor == 16
    save_model(model, tmp_path / "model")
    odd_sized_tree(tmp_path)
    evaluate_and_predict("model")
    assert json.loads(Path("runs/eval/metrics.json").read_text())["inference"]["size_divisor"] == 16
