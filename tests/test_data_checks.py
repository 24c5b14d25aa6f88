"""check_pairs: every labeled pair checked before training, all problems in one line."""
import numpy as np
import pytest
from PIL import Image

import fake_data
from ddep.data import DataError, build_dataset
from ddep.data.labeled import check_pairs
from ddep.data.splits import LabeledSubset


def broken_folder(root):
    """8 pairs of 32 x 64: 3 good, and 5 that __getitem__ would refuse, each in its own way."""
    fake_data.folder(root, count=8)
    images, masks = root / "images", root / "masks"
    data = (images / "img1.jpg").read_bytes()
    (images / "img1.jpg").write_bytes(data[: len(data) // 2])  # cut short
    (images / "img2.jpg").unlink()
    Image.fromarray(np.full((32, 64), 1000, np.uint16)).save(images / "img2.png")  # 16-bit image
    fake_data.save(fake_data.mask([0], size=(30, 30)), masks / "img4.png")  # mask of another size
    fake_data.save(fake_data.mask([0, 1, 7, 9, 255]), masks / "img5.png")  # ids out of range
    (masks / "img7.png").write_bytes(b"")  # unreadable mask
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_every_bad_pair_is_named_in_one_line_and_a_report(tmp_path, workers):
    ds = build_dataset("folder", broken_folder(tmp_path / "data"), num_classes=3)
    with pytest.raises(DataError) as info:
        check_pairs(ds, workers=workers)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"5 of 8 labeled pairs under {ds.root} cannot be used: images/img1.jpg: truncated JPEG")
    assert "; images/img2.png: I;16 image with more than 8 bits per channel" in message
    assert "; masks/img4.png: mask is 30x30 but image images/img4.jpg is 64x32" in message
    report = message.rsplit("every problem is listed in ", 1)[1].split(" ")[0]
    lines = open(report).read().splitlines()
    assert len([line for line in lines if not line.startswith("#")]) == 5
    assert any("img5.png: label values 7, 9 outside 0..2 and 255" in line for line in lines)
    assert any("img7.png: not a readable image" in line for line in lines)
    check_pairs(ds, indices=[0, 3, 6], workers=workers)  # the good ones
    check_pairs(LabeledSubset(ds, [0, 3, 6]), workers=workers)


def test_full_decoding_finds_what_the_file_structure_hides(tmp_path):
    """By default images are checked by header and structure (JPEG markers to the end, PNG chunks to
    IEND); full=True decodes them, which also finds a damaged compressed stream."""
    fake_data.folder(tmp_path, count=2)
    (tmp_path / "images" / "img1.jpg").unlink()
    fake_data.save(fake_data.rgb(1), tmp_path / "images" / "img1.png")
    data = bytearray((tmp_path / "images" / "img1.png").read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 20 : start + 60] = bytes(40)  # zlib data damaged, chunk lengths intact
    (tmp_path / "images" / "img1.png").write_bytes(bytes(data))
    ds = build_dataset("folder", tmp_path, num_classes=3)
    check_pairs(ds, workers=1)
    with pytest.raises(DataError, match=r"^1 of 2 labeled pairs under .* cannot be used: images/img1.png: truncated or corrupt image"):
        check_pairs(ds, workers=1, full=True)


def test_benchmark_id_mappings_are_applied_before_the_range_check(tmp_path):
    cityscapes = build_dataset("cityscapes", fake_data.cityscapes(tmp_path / "cs", label_ids=True))
    check_pairs(cityscapes, workers=1)  # labelIds 7, 26, 33 -> train ids; 0, 4 -> 255
    ade = fake_data.ade20k(tmp_path / "ade", count=2)
    fake_data.save(fake_data.mask([0, 151]), ade / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000001.png")
    with pytest.raises(DataError, match=r"^1 of 2 labeled pairs .*: annotations/training/ADE_train_00000001.png: label values 150 "
                                        r"outside 0..149 and 255 \(after id mapping\)$"):
        check_pairs(build_dataset("ade20k", ade), workers=1)
    binary = fake_data.folder(tmp_path / "binary", count=2, values=(0, 255))
    check_pairs(build_dataset("folder", binary, num_classes=2, label_map={255: 1}), workers=1)
    colours = tmp_path / "rgb"
    fake_data.folder(colours, count=1)
    rgb = np.zeros((32, 64, 3), np.uint8)
    rgb[:, 32:] = (128, 0, 0)
    fake_data.save(Image.fromarray(rgb), colours / "masks" / "img0.png")
    check_pairs(build_dataset("folder", colours, num_classes=2, palette=[[0, 0, 0], [128, 0, 0]]), workers=1)
    with pytest.raises(DataError, match=r"masks/img0.png: mask colours not in the palette: \(128, 0, 0\)"):
        check_pairs(build_dataset("folder", colours, num_classes=2, palette=[[0, 0, 0]]), workers=1)


def test_the_demo_data_has_no_files_to_check():
    check_pairs(build_dataset("demo", split="train", size=32, num_images=2))


def test_finetuning_checks_every_pair_before_its_first_step(tmp_path, monkeypatch, capsys):
    """A one-step run would never read the cut image: it is refused, in --dry-run too, before a run folder."""
    from ddep.cli import main

    monkeypatch.chdir(tmp_path)
    fake_data.engine_tree(tmp_path)
    data = (tmp_path / "data/images/train/5.png").read_bytes()
    (tmp_path / "data/images/train/5.png").write_bytes(data[: len(data) // 2])
    for extra in ([], ["--dry-run"]):
        assert main(["finetune", "data.root=data", *fake_data.FINETUNE, "steps=1", "data.batch_size=1", *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("ddep finetune: error: 1 of 6 labeled pairs under data cannot be used: images/train/5.png: truncated PNG")
    assert not (tmp_path / "runs").exists()


def test_a_crop_larger_than_the_training_images_warns(tmp_path, monkeypatch, caplog):
    from ddep.cli import main

    monkeypatch.chdir(tmp_path)
    fake_data.engine_tree(tmp_path)  # 64 x 64 images
    assert main(["finetune", "--dry-run", "data.root=data", *fake_data.FINETUNE, "data.crop_size=512"]) == 0
    assert ("data.crop_size=512 is larger than the training images (e.g. 64x64) even resized by 2.0: every crop is padded, "
            "mostly with ignored pixels; a crop_size of at most 64 suits them") in caplog.text
    caplog.clear()
    assert main(["finetune", "--dry-run", "data.root=data", *fake_data.FINETUNE, "data.crop_size=96"]) == 0
    assert "every crop is padded" not in caplog.text
