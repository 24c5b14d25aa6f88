"""A key a user gets wrong points at the key they mean: other libraries' names (timm, mmseg, smp,
Hugging Face) and a key's last part found anywhere in the config, with one suggestion or none,
never a misleading one; the class count of a folder dataset is named as a config key, and
evaluate takes it from the model."""
import json
from pathlib import Path

import pytest
import torch
import yaml

import ddep
import fake_data
from ddep.choices import check_options
from ddep.cli import main
from ddep.config import ConfigError, load_config
from ddep.data.labeled import FolderDataset
from ddep.models.saving import save_model


def config_error(command: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(command, overrides=list(overrides))
    message = str(caught.value)
    assert "\n" not in message and message.count("did you mean") <= 1
    return message


@pytest.mark.parametrize("command, override, meant", [
    ("finetune", "data.num_classes=2", "data.options.num_classes"),  # a folder dataset's option
    ("finetune", "num_classes=3", "data.options.num_classes"),
    ("finetune", "classes=3", "data.options.num_classes"),
    ("evaluate", "data.num_classes=3", "data.options.num_classes"),
    ("finetune", "data.classes_file=names.txt", "data.options.classes_file"),
    ("finetune", "optim.learning_rate=1", "optim.lr"),
    ("finetune", "learning_rate=1e-3", "optim.lr"),
    ("finetune", "lr=1e-3", "optim.lr"),
    ("pretrain", "max_steps=5", "steps"),
    ("finetune", "max_iters=5", "steps"),
    ("finetune", "iters=5", "steps"),
    ("finetune", "max_epochs=5", "epochs"),
    ("finetune", "batch_size=2", "data.batch_size"),
    ("finetune", "data.batch=2", "data.batch_size"),
    ("finetune", "workers=0", "data.num_workers"),
    ("finetune", "weight_decay=0.01", "optim.weight_decay"),
    ("finetune", "warmup=10", "optim.warmup_steps"),
    ("finetune", "crop=64", "data.crop_size"),
    ("finetune", "eval.crop=64", "eval.crop_size"),  # the section typed wins
    ("finetune", "resume_from=auto", "resume"),
    ("finetune", "optimizer=adamw", "optim.name"),
    ("predict", "output_dir=out", "output"),
    ("pretrain", "optim.lrr=0.1", "optim.lr"),  # misspellings as before
    ("pretrain", "noise.sdt=0.1", "noise.std"),
    ("finetune", "data.label_map={255: 1}", "data.options.label_map"),  # a mapping value is not part of the key
])
def test_an_unknown_key_suggests_the_key_meant(command, override, meant):
    key = override.partition("=")[0]
    assert config_error(command, override) == f"unknown config key {key!r}; did you mean {meant!r}?"


@pytest.mark.parametrize("command, overrides, note", [
    ("pretrain", ["data.num_classes=2"], "pretraining learns no classes: fine-tuning sets them"),
    ("predict", ["num_classes=3"], "predict takes the class count from the model"),
    ("predict", ["data.num_classes=3"], "predict takes the class count from the model"),  # a section predict lacks
    ("finetune", ["data.dataset=cityscapes", "data.num_classes=19"], "dataset 'cityscapes' has a fixed set of classes"),
    ("evaluate", ["max_steps=5"], None),  # no steps in evaluate: no suggestion rather than a wrong one
])
def test_a_key_with_no_counterpart_in_the_command_gets_no_misleading_suggestion(command, overrides, note):
    message = config_error(command, *overrides)
    assert "did you mean" not in message
    assert f"; {note}" in message if note else message == "unknown config key 'max_steps'"


@pytest.mark.parametrize("command, override", [("finetune", "data.val_batch_size=8"), ("evaluate", "data.batch_size=8"),
                                               ("evaluate", "data.samples_per_gpu=8"), ("finetune", "eval_batch_size=4")])
def test_an_evaluation_batch_size_is_refused_saying_why_there_is_none(command, override):
    assert config_error(command, override) == (
        f"unknown config key {override.partition('=')[0]!r}: evaluation takes one image at a time, as mmsegmentation "
        "does (the images' sizes differ), and data.num_workers processes read them")


def test_valid_keys_still_load():
    config = load_config("finetune", overrides=["epochs=3", "data.options.num_classes=2", "optim.lr=1e-3"])
    assert config["epochs"] == 3 and config["optim"]["lr"] == 1e-3


def test_unknown_dataset_options_know_other_libraries_names():
    valid = ["split_file", "img_dir", "ann_dir", "num_classes", "classes_file", "reduce_zero_label", "palette", "label_map"]
    for name in ("classes", "n_classes", "num_labels"):
        with pytest.raises(ValueError, match=rf"^unknown option '{name}' for dataset 'folder'; did you mean 'num_classes'\?$"):
            check_options("dataset 'folder'", [name], valid)


def test_finetune_on_a_folder_without_a_class_count_names_the_config_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fake_data.folder(tmp_path / "flat", count=2)
    message = ("finetune on a folder dataset needs its class count: data.options.num_classes=K (1..255) or "
               "data.options.classes_file=PATH (one class name per line)")
    assert config_error("finetune", "data.root=flat") == message
    assert main(["finetune", "data.root=flat"]) == 1
    assert capsys.readouterr().err.strip() == f"ddep finetune: error: {message}"
    assert "data.options.num_classes must be an integer 1..255 (the class count); got 0" == config_error(
        "finetune", "data.root=flat", "data.options.num_classes=0")
    assert not Path("runs").exists()


def test_evaluate_on_a_folder_takes_the_class_count_from_the_model_and_records_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = save_model(ddep.build_model("unet", "resnet18", classes=3), tmp_path / "model")
    fake_data.folder(tmp_path / "flat", count=2, values=(0, 1, 2))
    assert main(["evaluate", f"checkpoint={model}", "data.root=flat", "device=cpu"]) == 0
    assert "data.options.num_classes not given: 3 classes, from the model" in capsys.readouterr().out
    metrics = json.loads(Path("runs/evaluate/metrics.json").read_text())
    assert metrics["num_classes"] == 3 and metrics["num_classes_from"] == "model" and len(metrics["IoU"]) == 3
    assert yaml.safe_load(Path("runs/evaluate/config.yaml").read_text())["data"]["options"]["num_classes"] == 3

    assert main(["evaluate", f"checkpoint={model}", "data.root=flat", "device=cpu", "name=two",
                 "data.options.num_classes=2"]) == 1  # a count given is checked against the model's
    assert "predicts 3 classes but folder has 2" in capsys.readouterr().err
    assert FolderDataset(tmp_path / "flat", num_classes=3).num_classes == 3
