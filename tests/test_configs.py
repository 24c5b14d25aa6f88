"""Every shipped recipe is a valid config for its command."""
from pathlib import Path

import pytest

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
