import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddep.data.demo import CLASSES, DemoDataset
from ddep.data.transforms import IGNORE_INDEX


def digest(ds: DemoDataset, indices=range(4)) -> str:
    h = hashlib.sha256()
    for i in indices:
        item = ds[i]
        h.update(item["image"].numpy().tobytes())
        if "mask" in item:
            h.update(item["mask"].numpy().tobytes())
    return h.hexdigest()


def test_same_seed_gives_identical_pixels_and_masks():
    a, b = DemoDataset("train", num_images=6, seed=3), DemoDataset("train", num_images=6, seed=3)
    for i in range(6):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["mask"], y["mask"])
        assert x["name"] == y["name"] == a.name(i) == f"demo/train/seed3/64px/{i:05d}"


def test_items_do_not_depend_on_access_order():
    forward = DemoDataset("val", num_images=5, seed=1)
    backward = DemoDataset("val", num_images=5, seed=1)
    first = [forward[i] for i in range(5)]
    last = [backward[i] for i in reversed(range(5))][::-1]
    for x, y in zip(first, last):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


def test_identical_in_a_fresh_process():
    code = (
        "import hashlib; from ddep.data.demo import DemoDataset\n"
        "h = hashlib.sha256()\n"
        "for split in ('unlabeled', 'train', 'val'):\n"
        "    ds = DemoDataset(split, num_images=3, seed=7)\n"
        "    for i in (2, 0, 1):\n"
        "        item = ds[i]\n"
        "        h.update(item['image'].numpy().tobytes())\n"
        "        if 'mask' in item: h.update(item['mask'].numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    h = hashlib.sha256()
    for split in ("unlabeled", "train", "val"):
        ds = DemoDataset(split, num_images=3, seed=7)
        for i in (2, 0, 1):
            item = ds[i]
            h.update(item["image"].numpy().tobytes())
            if "mask" in item:
                h.update(item["mask"].numpy().tobytes())
    assert out == h.hexdigest()


def test_different_seeds_and_splits_differ():
    base = DemoDataset("train", num_images=4, seed=0)
    assert digest(base) != digest(DemoDataset("train", num_images=4, seed=1))
    images = {split: [DemoDataset(split, num_images=8, seed=0)[i]["image"] for i in range(8)] for split in ("unlabeled", "train", "val")}
    for s1, s2 in (("unlabeled", "train"), ("unlabeled", "val"), ("train", "val")):
        for x in images[s1]:
            for y in images[s2]:
                assert not torch.equal(x, y), (s1, s2)
    # images within one split differ too
    assert not torch.equal(images["train"][0], images["train"][1])


def test_item_structure_dtypes_and_shapes():
    ds = DemoDataset("train", size=48, num_images=3)
    assert ds.classes == CLASSES and ds.num_classes == len(CLASSES) >= 5
    assert len(ds) == 3
    item = ds[0]
    assert set(item) == {"image", "mask", "name"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 48, 48)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["image"].std() > 0.05  # a photo, not a flat colour
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (48, 48)
    values = set(item["mask"].unique().tolist())
    assert values <= set(range(len(CLASSES))) | {IGNORE_INDEX}


def test_unlabeled_items_have_no_mask():
    ds = DemoDataset("unlabeled", num_images=2)
    item = ds[1]
    assert set(item) == {"image", "name"} and item["name"] == "demo/unlabeled/seed0/64px/00001"
    assert item["image"].shape == (3, ds.size, ds.size)


def test_generic_photos_are_unlabeled_crops_from_outside_the_class_sources():
    from ddep.data.demo import _CLASS_SOURCES, _GENERIC_PHOTOS, make_photo

    assert not {s.photo for sources in _CLASS_SOURCES.values() for s in sources} & set(_GENERIC_PHOTOS)
    ds = DemoDataset("photos", size=48, num_images=3)
    item = ds[2]
    assert set(item) == {"image", "name"} and item["name"] == "demo/photos/seed0/48px/00002"
    assert item["image"].shape == (3, 48, 48)
    assert np.array_equal(make_photo(0, 2, 48), ds.arrays(2)[0]) and ds.arrays(2)[1] is None
    photos = [make_photo(0, i, 48) for i in range(40)]
    assert len({p.tobytes() for p in photos}) == 40 and all(p.dtype == np.uint8 and p.shape == (48, 48, 3) for p in photos)
    assert digest(DemoDataset("photos", size=48, num_images=3), [0, 1]) != digest(DemoDataset("unlabeled", size=48), [0, 1])


def test_num_images_respected_and_index_bounds():
    assert len(DemoDataset("unlabeled", num_images=17)) == 17
    assert len(DemoDataset("val", num_images=5)) == 5
    for split in ("unlabeled", "train", "val"):
        assert len(DemoDataset(split)) > 0  # defaults exist
    with pytest.raises(IndexError):
        DemoDataset("val", num_images=5)[5]
    with pytest.raises(ValueError, match="split"):
        DemoDataset("test")


def test_every_class_appears_in_a_modest_val_set():
    ds = DemoDataset("val", size=32, num_images=40)
    seen = set()
    for i in range(len(ds)):
        seen |= set(ds[i]["mask"].unique().tolist())
    assert seen == set(range(len(CLASSES)))  # every class, and no ignore pixels


def test_transform_is_applied_to_pil_items():
    calls = []

    def transform(sample):
        calls.append(sample)
        assert isinstance(sample["image"], Image.Image) and sample["image"].mode == "RGB"
        assert isinstance(sample["mask"], Image.Image) and sample["mask"].mode == "L"
        return {"size": sample["image"].size, "mask": np.asarray(sample["mask"]), "name": sample["name"]}

    ds = DemoDataset("train", size=40, num_images=2, transform=transform)
    out = ds[1]
    assert len(calls) == 1 and out["size"] == (40, 40) and out["name"] == "demo/train/seed0/40px/00001"
    assert np.array_equal(out["mask"], DemoDataset("train", size=40, num_images=2)[1]["mask"].numpy())
