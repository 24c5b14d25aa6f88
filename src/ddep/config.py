"""Run configuration: defaults per command, a YAML file, and dotted ``key=value`` overrides.

Every key that a command understands appears in its defaults below, so an unknown key is an
error that names the one key meant, if any: the same last part anywhere (``lr`` -> ``optim.lr``),
a ``data.options`` key of the dataset chosen (``data.num_classes`` -> ``data.options.num_classes``
for a folder dataset), another library's name for it (``choices.SYNONYMS``: ``max_iters`` ->
``steps``), or a close spelling. Values keep the type of their default (an int may stand
for a float); keys whose default is None take any value, and ``*.options`` sections are passed
as free-form keyword arguments to the model or dataset constructors, which check them (an option
set to null is removed, so the constructor's default applies).
"""
from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text_atomic
from .choices import SYNONYMS, did_you_mean

COMMON: dict[str, Any] = {
    "name": None,  # run folder name; default: the command
    "out_dir": "runs",
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "dist_timeout_minutes": 30.0,  # under torchrun: how long a rank waits for the others before failing
    "model": {"arch": "unet", "encoder": "resnet50", "encoder_weights": None, "decoder_width": 1, "options": {}},
}

TRAIN: dict[str, Any] = {
    "optim": {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "momentum": 0.9,
              "warmup_steps": 0, "min_lr_ratio": 0.0, "grad_accum": 1, "clip_grad_norm": None,
              "decoder_lr_mult": 1.0},  # the decoder and head's learning rate, as a multiple of lr (the encoder's)
    "steps": None,  # optimizer steps; when None, `epochs` decides
    "epochs": 1,
    "log_every": 10,
    "checkpoint_every": 500,
    "checkpoint_minutes": None,  # also save last.pt when this many minutes passed since the last save
    "resume": False,  # false | true | auto: resume a run of the same config when its folder holds one, else start
    "amp": "auto",  # auto (bf16 on GPU) | bf16 | fp16 | off
    "channels_last": "auto",
    "compile": False,
    "grad_checkpointing": False,  # recompute the decoder's highest-resolution blocks in the backward pass: less memory
    "deterministic": False,
    "skip_nonfinite": 0,  # how many batches with a NaN/inf loss a run may skip (counted, logged) before it stops
    "progress": True,
}

DATA: dict[str, Any] = {"dataset": None, "root": None, "split": "train", "options": {}, "batch_size": 8, "num_workers": 2}

#: ``test_scale``: (long, short) box each test image is resized into (keep ratio) before inference, as
#: mmsegmentation's test ``Resize(scale=..., keep_ratio=True)``; the logits go back to the original size for the
#: metric, and TTA ``scales`` are ratios of that size. None: the original size.
EVAL: dict[str, Any] = {"mode": "whole", "test_scale": None, "scales": [1.0], "flip": False, "crop_size": None, "stride": None,
                        "size_divisor": None}

DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {
        **COMMON, **TRAIN,
        "mode": "decoder",  # decoder (DDeP: frozen encoder) | encoder+decoder (DeP)
        "data": {**DATA, "dataset": "unlabeled", "crop_size": 224, "min_scale": 0.25, "batch_size": 64,
                 "decode": "cpu"},  # cpu (in the loader's workers) | gpu (shards' JPEGs, on the training device)
        "noise": {"type": "scaled", "std": 0.22, "target": "noise", "level": "fixed", "std_range": [0.2, 0.3],
                  "gamma_min": 0.0, "loss": "l2"},
        "image_every": 500,
    },
    "finetune": {
        **COMMON, **TRAIN,
        "init": None,  # a pretraining checkpoint or exported model; None: encoder_weights + random decoder
        "data": {**DATA, "dataset": "folder", "crop_size": 512, "ratio_range": [0.5, 2.0], "scale": None,
                 "cat_max_ratio": 1.0,  # mmseg's RandomCrop: retry crops in which one class covers more (1.0: off)
                 "photometric": False,  # mmseg's PhotoMetricDistortion on the image
                 "labeled": None, "labeled_seed": 0,
                 "select_fraction": 0.0,  # held out of the labeled images to choose a checkpoint on (0: none, the final one)
                 "val_split": "val",  # evaluated one image at a time, as mmsegmentation does (their sizes differ)
                 "val_split_file": None,  # the reported images as a split file, instead of the val_split folder
                 "allow_trained_images": False},  # report on a split that shares images with the trained ones (never do)
        "eval": EVAL,
        "eval_every": 500,
        # semi-supervised fine-tuning on unlabeled images too (ddep.engine.semi): none | unimatch | fixmatch | unimatch_v2
        "semi": {"method": "none", "threshold": 0.95,  # pseudo-labels' confidence below which a pixel is not learnt
                 "batch_size": None,  # unlabeled images per micro-batch; None: data.batch_size
                 "strong_weight": None, "fp_weight": None,  # the loss weights; None: the method's (0.5, 0.5 / 1, 0 / 1, 0)
                 # pseudo-labels from the model itself (none) or from its exponential moving average (ema: UniMatch V2)
                 "teacher": "none", "ema_momentum": 0.996,
                 # log the pseudo-labels' accuracy against the unlabeled images' masks (read for the log only)
                 "pseudo_label_accuracy": False,
                 # the unlabeled images: a dataset as `data` is one (a folder, tar shards); dataset None: the
                 # training split's images outside the labeled subset (data.labeled), whose masks are never read
                 "unlabeled": {"dataset": None, "root": None, "split": "train", "options": {}}},
    },
    "evaluate": {
        **COMMON,
        "checkpoint": None,
        # one image at a time, as mmsegmentation does (their sizes differ): no batch_size
        "data": {**{k: v for k, v in DATA.items() if k != "batch_size"}, "dataset": "folder", "split": "val",
                 "allow_trained_images": False},  # evaluate on images the model was trained on (never report it)
        "eval": EVAL,
    },
    "predict": {
        "checkpoint": None, "input": None, "output": None, "device": "auto", "eval": EVAL,
        "overwrite": False,  # replace output files that already exist (never input images)
        # the overlay legend's names, one per class: a list, or a file with one name per line; None: "class 0", ...
        "class_names": None, "classes_file": None,
        "palette": None,  # one RGB colour per class (e.g. a folder dataset's data.options.palette); None: Pascal VOC's
        "palette_masks": True,  # masks as palette PNGs (ids in PIL, colours in viewers); false: one-channel ids for OpenCV
    },
    "export": {
        "checkpoint": None, "output": None, "onnx": False, "onnx_size": [512, 512],
        "overwrite": False,  # write into a folder holding files export did not write (they are kept)
        "verbose": False,  # show the ONNX exporter's INFO lines
    },
}
#: ``ddep shards``' defaults (its writer and its command line). The longer side a shard keeps: with
#: the pretraining crop's smallest area (a quarter of the image) a 512 x 384 photo still gives crops
#: of about 222 px across, the 224 px input at full detail, and ImageNet-1k's typical 500 x 375
#: photos pass unshrunk (docs/DATA.md).
SHARD_MAX_SIZE = 512
SHARD_PER_SHARD = 1000  # about 43 MiB of the benchmark's photos: few files, long sequential reads
SHARD_QUALITY = 90  # as FFCV's ImageNet files (ffcv-imagenet: write_imagenet.sh 500 0.50 90)

# The paper's fine-tuning learning rates per decoder width (Adam, cosine decay).
PAPER_FINETUNE_LR = {1: 6e-5, 2: 1e-4, 3: 6e-5}
DEFAULTS["finetune"]["optim"] = {**TRAIN["optim"], "lr": None}  # None: PAPER_FINETUNE_LR[decoder_width]


#: Types of keys whose default is None (None stays allowed).
NULLABLE_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "steps": int, "init": str, "checkpoint": str, "model.encoder_weights": str, "input": str, "output": str,
    "optim.lr": float, "optim.clip_grad_norm": float, "checkpoint_minutes": float, "data.root": str, "data.labeled": (str, int, float), "data.scale": list,
    "data.val_split_file": str, "class_names": (list, str), "classes_file": str, "palette": list,
    "eval.crop_size": list, "eval.stride": list, "eval.size_divisor": int, "eval.test_scale": list,
    "semi.batch_size": int, "semi.strong_weight": float, "semi.fp_weight": float, "semi.unlabeled.dataset": str,
    "semi.unlabeled.root": str,
}


#: Keys that take one of a few values, checked when the config is read, before any work. YAML reads ``off``/``on``/``yes``/``no`` as booleans, so
#: ``amp: off`` arrives as False and is read as "off".
CHOICES: dict[str, tuple[Any, ...]] = {
    "amp": ("auto", "bf16", "fp16", "off"),
    "channels_last": ("auto", True, False),
    "mode": ("decoder", "encoder+decoder"),  # pretraining: DDeP (frozen encoder) or DeP
    "resume": (False, True, "auto"),
    "optim.name": ("adam", "adamw", "sgd"),
    "data.decode": ("cpu", "gpu"),
    "semi.method": ("none", "unimatch", "fixmatch", "unimatch_v2"),
    "semi.teacher": ("none", "ema"),
}


#: Top-level keys that do not change what a run computes: a study's run hash leaves them out, and
#: ``resume: auto`` resumes a run whose config differs only in them.
RESULT_NEUTRAL_KEYS = ("name", "out_dir", "progress", "log_every", "grad_checkpointing", "resume", "checkpoint_minutes",
                       "dist_timeout_minutes")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it."""


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict) and key != "options":
            keys += _flat_keys(value, f"{prefix}{key}.")
    return keys


def _check_choice(key: str, value: Any) -> Any:
    choices = CHOICES[key]
    if key == "amp" and value is False:
        value = "off"
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def _check_type(key: str, value: Any, default: Any) -> Any:
    if key in CHOICES:
        return _check_choice(key, value)
    if value is None:
        return value
    if default is None:
        expected = NULLABLE_TYPES.get(key)
        if expected is None:
            return value
        if isinstance(expected, tuple):
            if not isinstance(value, expected) or isinstance(value, bool):
                names = " or ".join(t.__name__ for t in expected)
                raise ConfigError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")
            return value
        default = expected()
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{key} must be {type(default).__name__}, got {value!r} ({type(value).__name__})")
    return value


def _dataset_options(name: Any) -> list[str]:
    """The ``data.options`` keys dataset ``name`` takes (none for an unknown name)."""
    from . import data  # here, not at the top: ddep.data imports this module

    classes = {**data.LABELED, "unlabeled": data.UnlabeledImages, "shards": data.ShardImages}
    if name == "demo":
        from .data.demo import DemoDataset

        classes["demo"] = DemoDataset
    if name not in classes:
        return []
    keys = [key for key in inspect.signature(classes[name]).parameters if key not in ("root", "split", "transform", "files")]
    return keys + ["source"] * (name == "unlabeled")


#: Other libraries' names for an evaluation batch size (and ddep's own, before it was removed).
EVAL_BATCH_KEYS = ("val_batch_size", "eval_batch_size", "test_batch_size", "per_device_eval_batch_size")


def _unknown_key(full: str, root: dict, whole: dict) -> str:
    """The one-line error for an unknown key: the key meant (its last part anywhere, a ``data.options``
    key of the dataset chosen, or another library's name for it), or why there is none."""
    leaf = full.rsplit(".", 1)[-1].lower().replace("-", "_")
    command = next((name for name, defaults in DEFAULTS.items() if defaults is root), None)
    if leaf in EVAL_BATCH_KEYS or (command == "evaluate" and "batch_size" in SYNONYMS.get(leaf, ())):
        return (f"unknown config key {full!r}: evaluation takes one image at a time, as mmsegmentation does (the images' "
                "sizes differ), and data.num_workers processes read them")
    dataset = whole.get("data", {}).get("dataset") if isinstance(root.get("data"), dict) else None
    keys = _flat_keys(root) + [f"data.options.{key}" for key in _dataset_options(dataset)]
    hint = did_you_mean(full, keys, keys=True)
    if not hint and "num_classes" in SYNONYMS.get(leaf, ()):
        hint = ("; pretraining learns no classes: fine-tuning sets them (data.options.num_classes=K for a folder dataset)"
                if command == "pretrain" else
                f"; {command} takes the class count from the model" if command in ("predict", "export") else
                f"; dataset {dataset!r} has a fixed set of classes" if dataset else "")
    return f"unknown config key {full!r}{hint}"


def merge(config: dict, updates: dict, defaults: dict, prefix: str = "", root: dict | None = None,
          whole: dict | None = None) -> None:
    """Merge ``updates`` into ``config`` in place, checking keys and types against ``defaults``
    (``root``: the command's whole defaults, and ``whole`` the whole config, for suggestions across sections)."""
    root = root or defaults
    whole = config if whole is None else whole
    for key, value in updates.items():
        full = prefix + key
        if key not in defaults:
            # a section the command lacks: name the whole key typed (a dotted key, not a value's own mapping: {255: 1})
            while isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value)), str):
                inner, value = next(iter(value.items()))
                full = f"{full}.{inner}"
            raise ConfigError(_unknown_key(full, root, whole))
        default = defaults[key]
        if isinstance(default, dict) and key != "options":
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a mapping, got {value!r}")
            merge(config[key], value, default, f"{full}.", root, whole)
        elif key == "options":
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a mapping, got {value!r}")
            # null removes an option (the constructor's default applies), e.g. one a base config set
            config[key] = {k: v for k, v in {**config[key], **value}.items() if v is not None}
        else:
            config[key] = _check_type(full, value, default)


def check_class_count(command: str, config: dict) -> None:
    """A folder dataset's class count, named by its config key: finetune needs it (evaluate takes the
    model's when it is not given), and one that is given must be 1..255."""
    data = config.get("data")
    if not isinstance(data, dict) or data.get("dataset") != "folder":
        return
    count = data["options"].get("num_classes")
    if count is None and data["options"].get("classes_file") is None and command == "finetune":
        raise ConfigError("finetune on a folder dataset needs its class count: data.options.num_classes=K (1..255) or "
                          "data.options.classes_file=PATH (one class name per line)")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 255):
        raise ConfigError(f"data.options.num_classes must be an integer 1..255 (the class count); got {count!r}")


def parse_key_value(text: str, what: str = "override") -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 0.0001)``: the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{what} must look like key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:  # e.g. an unquoted "{a: 1}" that the shell split at its space
        raise ConfigError(f"{what} {text!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote values "
                          "that hold spaces, e.g. 'data.options={num_classes: 2}'") from None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)
    return key.strip(), value


def parse_override(text: str) -> dict:
    """``"optim.lr=1e-4"`` -> ``{"optim": {"lr": 0.0001}}``."""
    key, value = parse_key_value(text)
    tree: dict = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def _looks_like_float(text: str) -> bool:
    """YAML 1.1 reads ``1e-4`` as a string; accept it as the number it plainly is."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_config(
    command: str, config_file: str | os.PathLike | None = None, overrides: list[str] = (), updates: dict | None = None
) -> dict:
    """The command's defaults, updated by ``config_file`` (YAML), then ``updates`` (a nested dict,
    for programs), then ``overrides`` (``key=value`` strings, for people)."""
    defaults = DEFAULTS[command]
    config = copy.deepcopy(defaults)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        merge(config, loaded, defaults)
    if updates:
        merge(config, updates, defaults)
    for text in overrides:
        merge(config, parse_override(text), defaults)
    check_class_count(command, config)
    optim = config.get("optim")
    if isinstance(optim, dict) and not optim["decoder_lr_mult"] > 0:  # NaN too
        raise ConfigError(f"optim.decoder_lr_mult must be > 0; got {optim['decoder_lr_mult']}")
    if "name" in config and config["name"] is None:
        config["name"] = command
    return config


def save_config(config: dict, path: str | os.PathLike) -> None:
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
