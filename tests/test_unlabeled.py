import logging

import numpy as np
import pytest
from PIL import Image

import fake_data
from ddep.data import DataError, build_dataset
from ddep.data import unlabeled as unlabeled_module


def imagenet_like(root):
    for cls in ("n01", "n02"):
        for i in range(2):
            fake_data.save(fake_data.rgb(i), root / cls / f"{cls}_{i}.JPEG")
    fake_data.save(fake_data.rgb(5), root / "n02" / "extra.webp")
    (root / "n02" / "notes.txt").write_text("not an image")
    return root


def test_recursive_listing_with_class_folders_and_extensions(tmp_path):
    ds = build_dataset("unlabeled", imagenet_like(tmp_path / "imgs"), cache_dir=tmp_path / "cache")
    assert ds.files == ["n01/n01_0.JPEG", "n01/n01_1.JPEG", "n02/extra.webp", "n02/n02_0.JPEG", "n02/n02_1.JPEG"]
    item = ds[2]
    assert set(item) == {"image", "name"} and item["image"].shape == (3, 32, 64)


def test_listing_is_cached_and_refreshed_when_a_class_folder_changes(tmp_path, monkeypatch):
    root = imagenet_like(tmp_path / "imgs")
    calls = []
    real = unlabeled_module.list_images
    monkeypatch.setattr(unlabeled_module, "list_images", lambda r: calls.append(r) or real(r))
    build_dataset("unlabeled", root, cache_dir=tmp_path / "cache")
    second = build_dataset("unlabeled", root, cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and len(second) == 5  # the second listing came from the cache
    import os, time
    fake_data.save(fake_data.rgb(9), root / "n01" / "new.png")
    os.utime(root / "n01", ns=(time.time_ns(), time.time_ns() + 10**9))
    third = build_dataset("unlabeled", root, cache_dir=tmp_path / "cache")
    assert len(calls) == 2 and "n01/new.png" in third.files
    build_dataset("unlabeled", root, cache_dir=tmp_path / "cache", refresh=True)
    assert len(calls) == 3


def test_reduced_size_jpeg_decoding(tmp_path):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg", quality=90)
    full = build_dataset("unlabeled", tmp_path, cache_dir=tmp_path / "c")[0]["image"]
    drafted = build_dataset("unlabeled", tmp_path, cache_dir=tmp_path / "c", min_size=200)[0]["image"]
    assert full.shape == (3, 768, 1024)
    assert drafted.shape == (3, 384, 512)  # scale 1/2 keeps the short side >= 200 (1/4 would give 192)


def test_unreadable_files_are_skipped_and_counted(tmp_path, caplog):
    root = imagenet_like(tmp_path / "imgs")
    (root / "n01" / "n01_0.JPEG").write_bytes(b"")
    ds = build_dataset("unlabeled", root, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert item["name"] == "n01/n01_1.JPEG" and ds.skipped == 1
    assert "n01_0.JPEG: not a readable image" in caplog.text


def test_image_side_of_a_labeled_dataset(tmp_path):
    fake_data.cityscapes(tmp_path)
    ds = build_dataset("unlabeled", tmp_path, source="cityscapes", min_size=16)
    assert len(ds) == 3 and "mask" not in ds[0]
    assert ds.files[0] == "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images .* found under"):
        build_dataset("unlabeled", tmp_path / "empty", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="image folder not found"):
        build_dataset("unlabeled", tmp_path / "missing")


def test_tiff_images_are_listed(tmp_path):
    root = imagenet_like(tmp_path / "imgs")
    fake_data.save(fake_data.rgb(7), root / "n01" / "scan.tif")
    fake_data.save(fake_data.rgb(8), root / "n01" / "scan2.TIFF")
    ds = build_dataset("unlabeled", root, cache_dir=tmp_path / "cache")
    assert {"n01/scan.tif", "n01/scan2.TIFF"} <= set(ds.files) and ds[ds.files.index("n01/scan.tif")]["image"].shape == (3, 32, 64)


@pytest.mark.parametrize("layout, images, hint", [
    ("folder", "images", "data.options.source=folder data.options.num_classes=K"),
    ("cityscapes", "leftImg8bit/train", "data.options.source=cityscapes"),
    ("ade20k", "ADEChallengeData2016/images/training", "data.options.source=ade20k"),
    ("pascal_context", "VOC2010/JPEGImages", "data.options.source=pascal_context"),
])
def test_a_labeled_datasets_root_is_refused_naming_its_image_folder(tmp_path, layout, images, hint):
    """Pointed at a labeled dataset's root, pretraining would read its masks as photos."""
    root = getattr(fake_data, layout)(tmp_path / "data")
    with pytest.raises(DataError) as info:
        build_dataset("unlabeled", root, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(f"{root} is a labeled dataset's root (") and "its masks would be read as photos" in message
    assert "\n" not in message and f"data.root={root / images} for its" in message and hint in message
    assert len(build_dataset("unlabeled", root / images, cache_dir=tmp_path / "cache")) >= 2
    options = {"num_classes": 3} if layout == "folder" else {}
    assert len(build_dataset("unlabeled", root, source=layout, **options)) >= 2
