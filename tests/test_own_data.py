"""A user's own folders: no number reported on trained images, no class silently dropped, the
model that was trained recorded."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import fake_data
from ddep.cli import main
from ddep.data import build_dataset
from ddep.data.io import DataError
from ddep.data.labeled import check_label_encoding

#: a tiny fine-tuning run on a folder of 2 classes (UNet on ResNet-18, 32 px crops, 2 steps)
RUN = ["model.encoder=resnet18", "data.num_workers=0", "progress=false", "data.crop_size=32", "data.batch_size=2",
       "steps=2", "eval_every=0", "checkpoint_every=100", "data.options.num_classes=2"]


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


@pytest.fixture
def flat(tmp_path, monkeypatch):
    """images/ and masks/ with no split folders (DATA.md's layout), classes 0 and 1."""
    monkeypatch.chdir(tmp_path)
    return fake_data.folder(tmp_path / "flat", count=8, values=(0, 1))


def test_a_flat_folder_is_refused_as_its_own_val_split(flat, capsys):
    for extra in ([], ["--dry-run"]):
        assert main(["finetune", "data.root=flat", *RUN, *extra]) == 1
        assert last_error(capsys) == (
            "ddep finetune: error: the reported split (data.val_split='val', 8 images) shares 8 images with the training split "
            "(one flat folder of images: every split is all of it): report on images never trained on: hold some out with "
            "`ddep splits --dataset folder --root flat --val 0.2 -o num_classes=2` and pass the data.options.split_file and "
            "data.val_split_file it prints, or give the dataset a val split (images/val and masks/val) "
            "(data.allow_trained_images=true reports on them anyway: a number never to publish)")
    assert not Path("runs").exists()


def test_a_val_image_copied_from_the_training_images_under_another_name_is_refused(tmp_path, monkeypatch, capsys):
    """The same photo in both folders, renamed (a common way to make a val folder by hand): its
    score would be a trained image's."""
    monkeypatch.chdir(tmp_path)
    for split, offset in (("train", 0), ("val", 10)):
        for i in range(3):
            fake_data.save(fake_data.rgb(i + offset), tmp_path / "tree" / "images" / split / f"{split}{i}.jpg")
            fake_data.save(fake_data.mask([0, 1]), tmp_path / "tree" / "masks" / split / f"{split}{i}.png")
    copy = tmp_path / "tree" / "images" / "val" / "val1.jpg"
    copy.write_bytes((tmp_path / "tree" / "images" / "train" / "train2.jpg").read_bytes())
    assert main(["finetune", "data.root=tree", *RUN]) == 1
    assert last_error(capsys) == (
        "ddep finetune: error: the reported split (data.val_split='val', 3 images) shares 1 images with the training split "
        "(copies under other names among them, e.g. tree/images/val/val1.jpg is tree/images/train/train2.jpg): report on images "
        "never trained on: remove the copies from one of the two (data.allow_trained_images=true reports on them anyway: a "
        "number never to publish)")
    assert not Path("runs").exists()


def test_split_folders_without_the_val_folder_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for i in range(4):  # images/train and masks/train, no val folders
        fake_data.save(fake_data.rgb(i), tmp_path / "tree" / "images" / "train" / f"{i}.jpg")
        fake_data.save(fake_data.mask([0, 1]), tmp_path / "tree" / "masks" / "train" / f"{i}.png")
    assert main(["finetune", "data.root=tree", *RUN]) == 1
    assert last_error(capsys) == ("ddep finetune: error: tree/images/val not found (tree/images is split into train): put the val "
                                  "images there and their masks in tree/masks/val, or name another split")
    assert not Path("runs").exists()


def test_a_held_out_val_split_is_reported_and_evaluate_refuses_the_trained_images(flat, capsys, caplog):
    assert main(["splits", "--dataset", "folder", "--root", "flat", "--val", "0.25", "-o", "num_classes=2"]) == 0
    out = capsys.readouterr().out
    folder = Path("splits/folder/val0.25/seed0")
    assert f"fine-tune with data.options.split_file={folder}/train.txt data.val_split_file={folder}/val.txt" in out
    train, val = ({line.split()[0] for line in (folder / f"{name}.txt").read_text().splitlines()} for name in ("train", "val"))
    assert len(val) == 2 and len(train) == 6 and not train & val and train | val == {f"images/img{i}.jpg" for i in range(8)}
    # another stream than the label fractions': labeled.txt of the same seed is not the val images
    assert main(["splits", "--dataset", "folder", "--root", "flat", "--fractions", "2", "-o", "num_classes=2"]) == 0
    assert main(["splits", "--dataset", "folder", "--root", "flat", "--fractions", "2", "--val", "0.2", "-o", "num_classes=2"]) == 1
    assert "needs --fractions (label fractions) or --val (a held-out val split), one of them" in last_error(capsys)
    assert {line.split()[0] for line in Path("splits/folder/2/seed0/labeled.txt").read_text().splitlines()} != val

    split = [f"data.options.split_file={folder}/train.txt", f"data.val_split_file={folder}/val.txt"]
    assert main(["finetune", "data.root=flat", *RUN, *split]) == 0
    metrics = json.loads(Path("runs/finetune/metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["train_images"] == 6 and metrics["trained_images"] == 0
    assert metrics["split_hash"] != metrics["train_split_hash"]
    recorded = Path("runs/finetune/train_split.txt").read_text().splitlines()[1:]
    assert sorted(recorded) == sorted(str((flat / image).resolve()) for image in train)

    evaluate = ["evaluate", "checkpoint=runs/finetune/model", "data.root=flat", "data.options.num_classes=2", "device=cpu"]
    assert main(evaluate) == 1  # the whole folder: 6 of its 8 images were trained on
    assert last_error(capsys) == (
        "ddep evaluate: error: 6 of these 8 images are in the training split of runs/finetune/model (listed in "
        "runs/finetune/train_split.txt): evaluate on images it was not trained on (data.allow_trained_images=true "
        "evaluates anyway: a number never to publish)")
    assert not Path("runs/evaluate").exists()
    assert main([*evaluate, f"data.options.split_file={folder}/val.txt"]) == 0
    first = Path("runs/evaluate/metrics.json").read_text()
    assert json.loads(first)["trained_images"] == 0 and json.loads(first)["classes"] == ["class_0", "class_1"]
    assert main([*evaluate, f"data.options.split_file={folder}/val.txt"]) == 1  # the same name again: the first is kept
    assert last_error(capsys) == ("ddep evaluate: error: runs/evaluate holds an earlier evaluation (runs/evaluate/metrics.json): "
                                  "name=... for this one, which keeps that one")
    assert Path("runs/evaluate/metrics.json").read_text() == first
    assert main([*evaluate, "data.allow_trained_images=true", "name=trained", "checkpoint=runs/finetune/checkpoints/last.pt"]) == 0
    assert json.loads(Path("runs/trained/metrics.json").read_text())["trained_images"] == 6
    assert "(data.allow_trained_images=true): these metrics are not a result to publish" in caplog.text
    # the record travels with an export
    assert main(["export", "checkpoint=runs/finetune/checkpoints/last.pt", "output=exported"]) == 0
    assert Path("exported/train_split.txt").read_text() == Path("runs/finetune/train_split.txt").read_text()
    assert main([*evaluate, "checkpoint=exported", "name=exported"]) == 1
    assert "6 of these 8 images are in the training split of exported" in last_error(capsys)


def test_a_run_records_its_training_split_before_its_first_step(flat, monkeypatch, capsys):
    """An interrupted (or still running) run's checkpoints are checked by evaluate too."""
    assert main(["splits", "--dataset", "folder", "--root", "flat", "--val", "2", "-o", "num_classes=2"]) == 0
    folder = Path("splits/folder/val2/seed0")
    split = [f"data.options.split_file={folder}/train.txt", f"data.val_split_file={folder}/val.txt"]
    fake_data.interrupt_after(monkeypatch, "finetune", ["data.root=flat", *RUN, *split, "checkpoint_every=1"], step=1)
    assert len(Path("runs/finetune/train_split.txt").read_text().splitlines()) == 1 + 6
    assert main(["evaluate", "checkpoint=runs/finetune/checkpoints/last.pt", "data.root=flat", "data.options.num_classes=2"]) == 1
    assert "6 of these 8 images are in the training split of runs/finetune/checkpoints/last.pt" in last_error(capsys)


def binary(root: Path, foreground: int, count: int = 6) -> Path:
    """Masks of a 0 background and a ``foreground`` square, images/{train,val}."""
    for split in ("train", "val"):
        for i in range(count):
            fake_data.save(fake_data.rgb(i + 10 * (split == "val"), (32, 32)), root / "images" / split / f"{i}.png")
            mask = np.zeros((32, 32), np.uint8)
            mask[8:24, 4 + i:20 + i] = foreground
            fake_data.save(Image.fromarray(mask), root / "masks" / split / f"{i}.png")
    return root


def test_binary_masks_stored_as_0_255_are_refused_and_label_map_trains_both_classes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    binary(tmp_path / "cells", 255)
    assert main(["finetune", "data.root=cells", *RUN]) == 1
    assert last_error(capsys) == (
        "ddep finetune: error: the 6 masks of the training split (e.g. cells/masks/train/0.png) hold only 0 and 255, and 255 "
        "is the ignore index: every pixel but class 0 would be dropped. Binary masks stored as 0/255: "
        "'data.options.label_map={255: 1}' (with num_classes 2); if class 0 alone is right, data.options.label_check=false")
    assert not Path("runs").exists()
    assert main(["finetune", "data.root=cells", *RUN, "data.options.label_map={255: 1}"]) == 0
    metrics = json.loads(Path("runs/finetune/metrics.json").read_text())
    assert len(metrics["IoU"]) == 2 and metrics["IoU"][1] == metrics["IoU"][1]  # the foreground is measured (not NaN)
    dataset = build_dataset("folder", "cells", "val", num_classes=2, label_map={255: 1})
    assert set(np.unique(dataset[0]["mask"].numpy())) == {0, 1}
    evaluate = ["evaluate", "checkpoint=runs/finetune/model", "data.root=cells", "data.options.num_classes=2", "device=cpu"]
    assert main(evaluate) == 1 and "hold only 0 and 255" in last_error(capsys)  # a 0/255 val set too
    assert main([*evaluate, "data.options.label_map={255: 1}"]) == 0


def test_masks_mostly_255_with_a_class_missing_are_refused_unless_unchecked(tmp_path):
    root = tmp_path / "sparse"
    for i in range(3):
        fake_data.save(fake_data.rgb(i, (32, 32)), root / "images" / f"{i}.png")
        mask = np.full((32, 32), 255, np.uint8)
        mask[:4] = 0  # 12.5% class 0, 87.5% 255; classes 1 and 2 never appear
        mask[4:6] = 1
        fake_data.save(Image.fromarray(mask), root / "masks" / f"{i}.png")
    dataset = build_dataset("folder", root, num_classes=3)
    with pytest.raises(DataError, match=r"255 \(ignore\) covers 81% of the pixels and class 2 never appears: if 255 marks a "
                                        r"class, map it \('data.options.label_map=\{255: 2\}'\); if the masks are sparse on "
                                        r"purpose, data.options.label_check=false"):
        check_label_encoding(dataset)
    check_label_encoding(build_dataset("folder", root, num_classes=3, label_check=False))
    check_label_encoding(build_dataset("folder", root, num_classes=2))  # every class appears: scribbles are fine


@pytest.mark.parametrize("options, message", [
    ({"label_map": {255: 2}}, r"label_map\[255\] = 2: expected a class id 0..1 or 255 \(ignore\)"),
    ({"label_map": {300: 1}}, r"label_map key 300: expected a stored mask value 0..255"),
    ({"label_map": [255, 1]}, r"label_map must map stored mask values to class ids"),
    ({"label_map": {255: 3}, "reduce_zero_label": True}, r"expected a class id 0..2 \(before reduce_zero_label\) or 255"),
])
def test_bad_label_maps_are_refused(tmp_path, options, message):
    fake_data.folder(tmp_path, values=(0, 1))
    with pytest.raises(DataError, match=message):
        build_dataset("folder", tmp_path, num_classes=2, **options)


def test_label_map_comes_before_reduce_zero_label_as_in_mmsegmentation(tmp_path):
    fake_data.folder(tmp_path, count=1, values=(0, 1, 2, 255))
    dataset = build_dataset("folder", tmp_path, num_classes=2, label_map={255: 2}, reduce_zero_label=True)
    assert dataset[0]["mask"][0, :4].tolist() == [255, 0, 1, 1]  # 0 ignored, k -> k - 1, stored 255 -> 2 -> 1


def test_an_init_run_records_the_model_it_trained_and_refuses_contradicting_model_keys(data, capsys):
    pretrain = ["data.root=data/images", *fake_data.PRETRAIN, "model.arch=smp:FPN", "model.encoder=tu-test_resnet", "steps=1"]
    assert main(["pretrain", *pretrain]) == 0
    finetune = ["data.root=data", "data.options.num_classes=3", *RUN[1:-1], "init=runs/pretrain/model"]
    assert main(["finetune", *finetune, "model.encoder=resnet18"]) == 1
    assert last_error(capsys) == (
        "ddep finetune: error: model.encoder='resnet18': init=runs/pretrain/model brings a smp:FPN on tu-test_resnet "
        "(decoder_width 1, 3 classes) model, whose weights this run trains; leave those model settings out, or leave init out "
        "to build that model")
    assert not Path("runs/finetune").exists()
    assert main(["finetune", *finetune, "model.arch=smp:FPN"]) == 0  # agreeing with init: fine
    model = yaml.safe_load(Path("runs/finetune/config.yaml").read_text())["model"]
    assert (model["arch"], model["encoder"], model["decoder_width"]) == ("smp:FPN", "tu-test_resnet", 1)
