import numpy as np
import pytest
import torch
from PIL import Image

import fake_data
from ddep.data import DataError, build_dataset


def unique(mask: torch.Tensor) -> list[int]:
    return sorted(torch.unique(mask).tolist())


def test_cityscapes_train_ids(tmp_path):
    ds = build_dataset("cityscapes", fake_data.cityscapes(tmp_path))
    assert len(ds) == 3 and ds.num_classes == 19 and ds.classes[13] == "car"
    item = ds[0]
    assert item["image"].shape == (3, 32, 64) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (32, 64) and item["mask"].dtype == torch.int64
    assert unique(item["mask"]) == [0, 13, 18, 255]
    assert item["name"] == "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"


def test_cityscapes_label_ids_are_mapped_to_train_ids(tmp_path):
    ds = build_dataset("cityscapes", fake_data.cityscapes(tmp_path, label_ids=True))
    # labelIds 7 road -> 0, 26 car -> 13, 33 bicycle -> 18; 0 unlabeled and 4 static -> 255
    assert ds[0]["mask"][0, :5].tolist() == [0, 13, 255, 18, 255]


def test_ade20k_reduce_zero_label(tmp_path):
    ds = build_dataset("ade20k", fake_data.ade20k(tmp_path), split="val")
    assert len(ds) == 3 and ds.num_classes == 150
    assert ds[0]["mask"][0, :3].tolist() == [255, 0, 149]  # 0 -> 255, 1 -> 0, 150 -> 149
    assert build_dataset("ade20k", tmp_path / "ADEChallengeData2016").pairs == build_dataset("ade20k", tmp_path).pairs


def test_pascal_context_59(tmp_path):
    ds = build_dataset("pascal_context", fake_data.pascal_context(tmp_path))
    assert len(ds) == 2 and ds.num_classes == 59 and ds.classes[0] == "aeroplane"
    assert ds[1]["mask"][0, :3].tolist() == [255, 0, 58]
    assert len(build_dataset("pascal_context", tmp_path, split="val")) == 1


def test_folder_dataset_with_classes_file_and_split_subfolders(tmp_path):
    fake_data.folder(tmp_path / "images_root")
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    ds = build_dataset("folder", tmp_path / "images_root", classes_file=tmp_path / "classes.txt")
    assert ds.classes == ("sky", "road", "car") and len(ds) == 4
    assert unique(ds[0]["mask"]) == [0, 1, 2]
    for split in ("train", "val"):
        fake_data.save(fake_data.rgb(0), tmp_path / "split" / "imgs" / split / "a.png")
        fake_data.save(fake_data.mask([1]), tmp_path / "split" / "anns" / split / "a.png")
    val = build_dataset("folder", tmp_path / "split", split="val", img_dir="imgs", ann_dir="anns", num_classes=2)
    assert val.pairs == [("imgs/val/a.png", "anns/val/a.png")]


def test_folder_dataset_rgb_masks_with_palette_and_reduce_zero_label(tmp_path):
    fake_data.save(fake_data.rgb(0), tmp_path / "images" / "a.png")
    colours = np.zeros((32, 64, 3), np.uint8)
    colours[:, 32:] = (128, 0, 0)
    fake_data.save(Image.fromarray(colours), tmp_path / "masks" / "a.png")
    ds = build_dataset("folder", tmp_path, num_classes=2, palette=[[0, 0, 0], [128, 0, 0]])
    assert ds[0]["mask"][0, [0, 40]].tolist() == [0, 1]
    ds = build_dataset("folder", tmp_path, num_classes=1, palette=[[0, 0, 0], [128, 0, 0]], reduce_zero_label=True)
    assert ds[0]["mask"][0, [0, 40]].tolist() == [255, 0]
    with pytest.raises(DataError, match=r"a.png: mask colours not in the palette: \(128, 0, 0\)"):
        build_dataset("folder", tmp_path, num_classes=2, palette=[[0, 0, 0]])[0]
    with pytest.raises(DataError, match="RGB mask; pass a palette"):
        build_dataset("folder", tmp_path, num_classes=2)[0]


def test_split_file_selects_pairs(tmp_path):
    fake_data.cityscapes(tmp_path)
    split = tmp_path / "labeled.txt"
    split.write_text(
        "leftImg8bit/train/bremen/bremen_000000_000019_leftImg8bit.png "
        "gtFine/train/bremen/bremen_000000_000019_gtFine_labelTrainIds.png\n"
    )
    ds = build_dataset("cityscapes", tmp_path, split_file=split)
    assert len(ds) == 1 and ds[0]["name"].startswith("leftImg8bit/train/bremen")


@pytest.mark.parametrize(
    "line, message",
    [
        ("leftImg8bit/train/aachen/missing.png gtFine/x.png", r"labeled.txt:1: .*missing.png not found"),
        ("../outside.png ../outside.png", r"labeled.txt:1: ../outside.png is outside the dataset root"),
        ("/etc/passwd /etc/passwd", r"labeled.txt:1: /etc/passwd is outside the dataset root"),
        ("only_one_field.png", r"labeled.txt:1: expected 'image_path label_path'"),
    ],
)
def test_bad_split_lines(tmp_path, line, message):
    fake_data.cityscapes(tmp_path / "cs")
    (tmp_path / "outside.png").write_bytes(b"x")
    split = tmp_path / "labeled.txt"
    split.write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        build_dataset("cityscapes", tmp_path / "cs", split_file=split)


def test_missing_root_split_and_mask(tmp_path):
    with pytest.raises(DataError, match=f"Cityscapes root not found: {tmp_path / 'nope'}"):
        build_dataset("cityscapes", tmp_path / "nope")
    fake_data.cityscapes(tmp_path)
    with pytest.raises(DataError, match="Cityscapes image folder not found: .*leftImg8bit/val"):
        build_dataset("cityscapes", tmp_path, split="val")
    next((tmp_path / "gtFine").rglob("bremen*.png")).unlink()
    with pytest.raises(DataError, match=r"bremen_000000_000019_leftImg8bit.png: no mask \(expected .*labelTrainIds.png or .*labelIds.png\)"):
        build_dataset("cityscapes", tmp_path)


def test_image_without_mask_in_a_folder(tmp_path):
    fake_data.folder(tmp_path)
    (tmp_path / "masks" / "img2.png").unlink()
    with pytest.raises(DataError, match=r"images/img2.jpg: no mask \(expected .*masks/img2.png, .tif or .tiff\)"):
        build_dataset("folder", tmp_path, num_classes=3)


def test_empty_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no image/mask pairs found under"):
        build_dataset("folder", tmp_path, num_classes=3)


def test_mask_size_differs_from_image(tmp_path):
    fake_data.folder(tmp_path, count=1)
    fake_data.save(fake_data.mask([0], size=(16, 16)), tmp_path / "masks" / "img0.png")
    with pytest.raises(DataError, match=r"img0.png: mask is 16x16 but image .*img0.jpg is 64x32"):
        build_dataset("folder", tmp_path, num_classes=3)[0]


def test_label_values_out_of_range_are_named(tmp_path):
    fake_data.folder(tmp_path, count=1, values=(0, 1, 7, 9, 255))
    with pytest.raises(DataError, match=r"img0.png: label values 7, 9 outside 0..2 and 255"):
        build_dataset("folder", tmp_path, num_classes=3)[0]


def test_truncated_and_empty_images(tmp_path):
    fake_data.folder(tmp_path, count=2)
    data = (tmp_path / "images" / "img0.jpg").read_bytes()
    (tmp_path / "images" / "img0.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "images" / "img1.jpg").write_bytes(b"")
    ds = build_dataset("folder", tmp_path, num_classes=3)
    with pytest.raises(DataError, match="img0.jpg: truncated or corrupt image"):
        ds[0]
    with pytest.raises(DataError, match="img1.jpg: not a readable image"):
        ds[1]


def test_image_modes_are_converted_or_refused(tmp_path):
    fake_data.folder(tmp_path, count=4)
    gray = Image.fromarray(np.full((32, 64), 77, np.uint8))
    gray.save(tmp_path / "images" / "img0.jpg")
    rgba = Image.fromarray(np.dstack([np.full((32, 64, 3), 200, np.uint8), np.full((32, 64), 0, np.uint8)]))
    (tmp_path / "images" / "img1.jpg").unlink()
    rgba.save(tmp_path / "images" / "img1.png")
    (tmp_path / "images" / "img2.jpg").unlink()
    Image.fromarray(np.full((32, 64), 1000, np.uint16)).save(tmp_path / "images" / "img2.png")
    (tmp_path / "images" / "img3.jpg").unlink()
    fake_data.rgb(3).convert("P").save(tmp_path / "images" / "img3.png")
    ds = build_dataset("folder", tmp_path, num_classes=3)
    assert torch.allclose(ds[0]["image"], torch.full((3, 32, 64), 77 / 255))  # gray -> 3 equal channels
    assert ds[1]["image"].max().item() == 0  # fully transparent -> composited on black
    with pytest.raises(DataError, match=r"img2.png: I;16 image with more than 8 bits per channel"):
        ds[2]
    assert ds[3]["image"].shape == (3, 32, 64)  # palette -> RGB


def test_sixteen_bit_masks_are_read_as_ids(tmp_path):
    fake_data.folder(tmp_path, count=1)
    Image.fromarray(np.tile(np.array([0, 2, 255], np.uint16)[np.arange(64) % 3], (32, 1))).save(tmp_path / "masks" / "img0.png")
    assert unique(build_dataset("folder", tmp_path, num_classes=3)[0]["mask"]) == [0, 2, 255]
    Image.fromarray(np.full((32, 64), 300, np.uint16)).save(tmp_path / "masks" / "img0.png")
    with pytest.raises(DataError, match=r"img0.png: label values \[300\] above 255"):
        build_dataset("folder", tmp_path, num_classes=3)[0]


def test_folder_needs_classes(tmp_path):
    fake_data.folder(tmp_path)
    with pytest.raises(DataError, match="folder dataset needs num_classes"):
        build_dataset("folder", tmp_path)
    (tmp_path / "c.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="c.txt: 2 class names but num_classes=3"):
        build_dataset("folder", tmp_path, num_classes=3, classes_file=tmp_path / "c.txt")


def test_unknown_names_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'citiscapes'.*did you mean 'cityscapes'"):
        build_dataset("citiscapes", tmp_path)
    with pytest.raises(ValueError, match="unknown option 'num_clases' for dataset 'folder'; did you mean 'num_classes'"):
        build_dataset("folder", tmp_path, num_clases=3)
    with pytest.raises(ValueError, match="needs a root folder"):
        build_dataset("ade20k")


def test_tiff_images_and_masks_and_mask_suffixes_in_any_case(tmp_path):
    """.tif/.tiff images and 8/16-bit TIFF masks read as PNGs do; a mask is found by stem whatever
    the case of its .png/.tif/.tiff suffix."""
    import tifffile

    fake_data.save(fake_data.rgb(0), tmp_path / "images" / "a.tif")
    fake_data.save(fake_data.mask([0, 1]), tmp_path / "masks" / "a.tif")
    fake_data.save(fake_data.rgb(1), tmp_path / "images" / "b.TIFF")
    tifffile.imwrite(tmp_path / "masks" / "b.tiff", np.tile(np.array([2, 255], np.uint16), (32, 32)))
    fake_data.save(fake_data.rgb(2), tmp_path / "images" / "c.PNG")
    fake_data.save(fake_data.mask([1, 2]), tmp_path / "masks" / "c.PNG")
    fake_data.save(fake_data.rgb(3), tmp_path / "images" / "d.jpg")
    tifffile.imwrite(tmp_path / "masks" / "d.TIF", np.tile(np.array([0, 2], np.uint8), (32, 32)), byteorder=">")
    ds = build_dataset("folder", tmp_path, num_classes=3)
    assert ds.pairs == [("images/a.tif", "masks/a.tif"), ("images/b.TIFF", "masks/b.tiff"),
                        ("images/c.PNG", "masks/c.PNG"), ("images/d.jpg", "masks/d.TIF")]
    assert [unique(ds[i]["mask"]) for i in range(4)] == [[0, 1], [2, 255], [1, 2], [0, 2]]
    expected = torch.from_numpy(np.array(fake_data.rgb(0))).permute(2, 0, 1) / 255
    assert torch.allclose(ds[0]["image"], expected)  # the TIFF's pixels, unchanged


def test_sixteen_bit_tiff_images_are_refused_in_one_line(tmp_path):
    import tifffile

    fake_data.folder(tmp_path, count=2)
    for i in range(2):
        (tmp_path / "images" / f"img{i}.jpg").unlink()
    tifffile.imwrite(tmp_path / "images" / "img0.tif", np.full((32, 64), 1000, np.uint16))
    tifffile.imwrite(tmp_path / "images" / "img1.tif", np.full((32, 64, 3), 1000, np.uint16), photometric="rgb")
    ds = build_dataset("folder", tmp_path, num_classes=3)
    with pytest.raises(DataError, match=r"img0.tif: I;16 image with more than 8 bits per channel; convert it to 8-bit RGB"):
        ds[0]
    # PIL reads a 16-bit RGB TIFF as 8-bit RGB, keeping the high bytes: refused, not silently darkened
    with pytest.raises(DataError, match=r"img1.tif: 16-bit RGB image with more than 8 bits per channel; convert it to 8-bit RGB"):
        ds[1]


def test_sixteen_bit_rgb_pngs_are_refused_as_images_and_masks(tmp_path):
    from ddep.data.io import read_image, read_mask

    path = fake_data.png16_rgb(1000, tmp_path / "deep.png")
    with pytest.raises(DataError, match=r"deep.png: 16-bit RGB image with more than 8 bits per channel"):
        read_image(path)
    with pytest.raises(DataError, match=r"deep.png: 16-bit RGB mask; save masks as 8/16-bit grayscale"):
        read_mask(path, palette=[[0, 0, 0], [3, 3, 3]])


def test_a_lossy_mask_is_named_where_the_mask_is_missing(tmp_path):
    fake_data.folder(tmp_path, count=2)
    (tmp_path / "masks" / "img1.png").unlink()
    fake_data.save(fake_data.rgb(1).convert("L"), tmp_path / "masks" / "img1.jpg")
    with pytest.raises(DataError, match=r"images/img1.jpg: no mask; found .*masks/img1.jpg: masks must be lossless \(PNG/TIFF\): "
                                        r"JPEG changes the ids"):
        build_dataset("folder", tmp_path, num_classes=3)
