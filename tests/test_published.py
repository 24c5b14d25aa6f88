"""The semi-supervised literature's splits (UniMatch's lists) and Pascal VOC with SBD's masks."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddep.data import DataError, build_dataset
from ddep.data.published import SPLITS, pascal_list, published_images
from ddep.data.splits import labeled_indices


def test_the_shipped_lists_have_the_literatures_sizes():
    """Pascal: 10,582 training images (VOC + SBD) and 1,449 val; the classic splits are counts of
    VOC's 1,464 fine ones, the blended ones fractions of all; Cityscapes: fractions of 2,975."""
    train, val = pascal_list("train"), pascal_list("val")
    assert (len(train), len(set(train)), len(val)) == (10582, 10582, 1449) and not set(train) & set(val)
    sizes = {name: len(published_images(name)) for name in SPLITS}
    assert {k: sizes[k] for k in ("pascal/92", "pascal/183", "pascal/366", "pascal/732", "pascal/1464")} == {
        "pascal/92": 92, "pascal/183": 183, "pascal/366": 366, "pascal/732": 732, "pascal/1464": 1464}
    assert (sizes["pascal/1_16"], sizes["pascal/1_8"], sizes["pascal/1_4"]) == (662, 1323, 2646)  # ceil(10582 / n)
    assert [sizes[f"cityscapes/{a}"] for a in ("1_30", "1_16", "1_8", "1_4", "1_2")] == [100, 186, 372, 744, 1488]
    for name in SPLITS:
        if name.startswith("pascal"):
            assert set(published_images(name)) <= set(train), name
        else:
            assert all(image.startswith("leftImg8bit/train/") for image in published_images(name))


def voc_tree(root: Path, images: list[str], fine: int = 0) -> Path:
    """mmsegmentation's VOCdevkit/VOC2012 layout holding ``images`` (JPEGImages/<name>.jpg): SBD's
    masks in SegmentationClassAug, and for the first ``fine`` images VOC's own in SegmentationClass
    (mask value 1, SBD's 2, to tell them apart)."""
    voc = root / "VOCdevkit" / "VOC2012"
    for i, image in enumerate(images):
        path = voc / image
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i % 255, np.uint8)).save(path)
        for folder, value in (("SegmentationClassAug", 2), ("SegmentationClass", 1))[: 1 + (i < fine)]:
            mask = voc / folder / f"{Path(image).stem}.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(mask)
    return root


def test_pascal_voc_and_a_published_split_choose_its_images(tmp_path):
    names = published_images("pascal/92") + pascal_list("train")[:5]
    root = voc_tree(tmp_path, names)
    listing = tmp_path / "pool.txt"  # the fake tree holds 97 of the 10,582 training images: list them
    listing.write_text("".join(f"{n} SegmentationClassAug/{Path(n).stem}.png\n" for n in names))
    pool = build_dataset("pascal_voc", root, "train", split_file=str(listing))
    assert pool.num_classes == 21 and pool.classes[15] == "person"
    indices = labeled_indices(pool, "pascal/92")
    assert [pool.pairs[i][0] for i in indices] == published_images("pascal/92")
    with pytest.raises(DataError, match=r"data.labeled=pascal/183: \d+ of its 183 images are not in the training split"):
        labeled_indices(pool, "pascal/183")
    with pytest.raises(DataError, match="'pascal/93' is not a published split; they are pascal/92, pascal/183"):
        labeled_indices(pool, "pascal/93")
    assert len(labeled_indices(pool, "1/8")) == 13  # fractions stay fractions
    with pytest.raises(DataError, match=r"'1_8' must be a fraction .* \(1/8 for a fraction, or a published split such as pascal/1_8\)"):
        labeled_indices(pool, "1_8")  # not int("1_8") == 18


def test_pascal_voc_takes_vocs_own_masks_first_and_names_what_is_missing(tmp_path, monkeypatch):
    from ddep.data import published

    train, val = pascal_list("train")[:4], pascal_list("val")[:2]
    root = voc_tree(tmp_path, train + val, fine=2)  # VOC's masks for 2 training images, SBD's for the rest
    monkeypatch.setattr(published, "pascal_list", {"train": train, "val": val}.get)
    pool = build_dataset("pascal_voc", root, "train")
    assert [mask.split("/")[0] for _, mask in pool.pairs] == ["SegmentationClass"] * 2 + ["SegmentationClassAug"] * 2
    with pytest.raises(DataError, match=r"Pascal VOC val: 2 of its files are not under .*VOC2012 \(first: SegmentationClass/"):
        build_dataset("pascal_voc", root, "val")  # scored on VOC's masks alone: SBD's do not count
    (root / "VOCdevkit/VOC2012" / train[3]).unlink()
    with pytest.raises(DataError, match=r"Pascal VOC train: 1 of its files .*\(first: JPEGImages/.*SBD's augmented masks"):
        build_dataset("pascal_voc", root, "train")
    with pytest.raises(DataError, match="Pascal VOC split must be train"):
        build_dataset("pascal_voc", root, "trainval")


def test_a_published_split_with_semi_supervised_fine_tuning_leaves_the_rest_unlabeled(tmp_path, monkeypatch, capsys):
    import json

    from ddep.cli import main

    train, val = published_images("pascal/92") + pascal_list("train")[:5], pascal_list("val")[:3]
    root = voc_tree(tmp_path, train + val)
    for name, images in (("pool.txt", train), ("val.txt", val)):
        (tmp_path / name).write_text("".join(f"{n} SegmentationClassAug/{Path(n).stem}.png\n" for n in images))
    monkeypatch.chdir(tmp_path)
    args = ["data.dataset=pascal_voc", f"data.root={root}", f"data.options.split_file={tmp_path / 'pool.txt'}",
            f"data.val_split_file={tmp_path / 'val.txt'}", "data.labeled=pascal/92", "semi.method=unimatch", "steps=10",
            "data.crop_size=32", "model.encoder=resnet18", "progress=false"]
    assert main(["finetune", *args, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plan["train_images"], plan["unlabeled_images"], plan["val_images"]) == (92, 5, 3)
