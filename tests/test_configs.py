"""Every shipped recipe is a valid config for its command."""
from pathlib import Path

import pytest

import fake_data
from ddep.config import load_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if "experiments" not in p.relative_to(ROOT).parts)  # studies: test_study.py


def command_of(path: Path) -> str:
    folder = path.parent.name
    return {"pretrain": "pretrain", "finetune": "finetune"}.get(folder) or path.stem.split("_")[0]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_configs_load(path):
    config = load_config(command_of(path), path)
    assert config["name"]


def test_there_are_paper_recipes():
    names = {p.stem for p in CONFIGS}
    assert {"cityscapes_transunet", "ade20k_transunet", "pascal_context_transunet", "ddep_transunet_in21k_224"} <= names


@pytest.mark.parametrize("text, key, value", [
    ("amp=off", "amp", "off"),  # YAML reads `off` as False
    ("amp=bf16", "amp", "bf16"),
    ("channels_last=true", "channels_last", True),
    ("channels_last=no", "channels_last", False),
    ("channels_last=auto", "channels_last", "auto"),
])
def test_choice_keys_accept_yaml_booleans(text, key, value):
    got = load_config("pretrain", overrides=[text])[key]
    assert got == value and type(got) is type(value)


#: Training images of the real datasets: the paper's "100 epochs" are counted over all of them.
FULL_TRAIN_IMAGES = {"cityscapes": 2975, "ade20k": 20210, "pascal_context": 4996}
FAKE_TREES = {"cityscapes": lambda root: fake_data.cityscapes(fake_data.cityscapes(root), "val"),
              "ade20k": fake_data.ade20k, "pascal_context": fake_data.pascal_context}


SEMI_RECIPES = sorted(p for p in (ROOT / "finetune").glob("*.yaml") if "unimatch" in p.stem)


@pytest.mark.parametrize("path", sorted(set((ROOT / "finetune").glob("*.yaml")) - set(SEMI_RECIPES)), ids=lambda p: p.stem)
def test_paper_budgets_do_not_shrink_with_the_label_fraction(tmp_path, path):
    from ddep.engine.finetune import plan_finetune

    dataset = load_config("finetune", path)["data"]["dataset"]
    root = FAKE_TREES[dataset](tmp_path)
    plans = {amount: plan_finetune(load_config("finetune", path, [f"data.root={root}", f"data.labeled={amount}"]))
             for amount in ("1/30", "1/1")}
    few, full = plans["1/30"], plans["1/1"]
    assert few["steps"] == full["steps"] and few["images_seen"] == full["images_seen"]
    assert few["images_per_step"] == 512 and few["warmup_steps"] > 0
    # 100 epochs over the whole training set, whatever part of it keeps its labels
    assert full["images_seen"] >= 100 * FULL_TRAIN_IMAGES[dataset] > full["images_seen"] - 512
    assert dataset != "cityscapes" or few["steps"] >= 200
    assert few["epochs_over_labeled"] >= full["epochs_over_labeled"] and few["selected_on"] is None


def test_a_null_option_is_removed_so_the_constructor_default_applies(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  options:\n    decoder_channels: [64, 32, 16, 8, 4]\n    center: true\n")
    config = load_config("pretrain", base, ["model.options.decoder_channels=null", "model.arch=smp:FPN"])
    assert config["model"]["options"] == {"center": True}


@pytest.mark.parametrize("path", SEMI_RECIPES, ids=lambda p: p.stem)
def test_semi_supervised_recipes_use_a_published_split_and_unimatchs_budget(tmp_path, path):
    """UniMatch: 80 (Pascal) or 240 (Cityscapes) epochs over the unlabeled images at 8 per step;
    V2: 60 (Pascal) at 16 per step; the last partial batch dropped (their loaders: drop_last)."""
    from ddep.data.published import SPLITS, published_images

    config = load_config("finetune", path)
    split, method = config["data"]["labeled"], config["semi"]["method"]
    assert split in SPLITS and method == ("unimatch_v2" if "_v2_" in path.stem else "unimatch")
    pool = 10582 if split.startswith("pascal") else 2975
    epochs = {"unimatch_v2": 60}.get(method, 80 if split.startswith("pascal") else 240)
    per_step = config["data"]["batch_size"] * config["optim"]["grad_accum"]
    assert config["steps"] == (pool - len(published_images(split))) // per_step * epochs
    if method == "unimatch":
        assert config["model"]["options"]["decoder_atrous_rates"] == [6, 12, 18]  # UniMatch's ASPP, not smp's default
    else:  # V2: an EMA teacher, 40x the learning rate on the head, V2's head widths for ViT-B
        assert (config["semi"]["teacher"], config["optim"]["decoder_lr_mult"], per_step) == ("ema", 40.0, 16)
        assert config["model"]["options"]["decoder_intermediate_channels"] == [96, 192, 384, 768]
