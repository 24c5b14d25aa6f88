"""``ddep predict`` never loses a file: it never writes over an input image or an existing file
(without ``overwrite=true``), never writes into its input folder, and gives every image its own mask."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddep
import ddep.cli
import fake_data
from ddep.data.io import IMAGE_EXTENSIONS, read_image
from ddep.data.transforms import eval_transforms
from ddep.inference import predict
from ddep.models.saving import load_model, save_model

SIZE = (32, 32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(ddep.build_model("unet", "resnet18", classes=3), tmp_path_factory.mktemp("model") / "model")


def run_predict(checkpoint: Path, source: Path, output: Path, *extra: str) -> int:
    return ddep.cli.main(["predict", f"checkpoint={checkpoint}", f"input={source}", f"output={output}", "device=cpu", *extra])


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root``, relative, with the SHA-256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def photos(root: Path, names=("a.png", "b.jpg", "sub/c.png")) -> Path:
    for i, name in enumerate(names):
        fake_data.save(fake_data.rgb(i, SIZE), root / name)
    return root


def expected_ids(checkpoint: Path, image_path: Path) -> np.ndarray:
    model = load_model(checkpoint).eval()
    x = eval_transforms(model.config["mean"], model.config["std"])({"image": read_image(image_path)})["image"][None]
    return predict(model, x).argmax(1)[0].to(torch.uint8).numpy()


def test_output_folder_equal_to_the_input_folder_is_refused_and_the_inputs_stay_byte_identical(checkpoint, tmp_path, capsys):
    source = photos(tmp_path / "photos")
    before = tree(source)
    assert run_predict(checkpoint, source, source) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddep predict: error: output ") and "\n" not in err
    assert f"would write over the input image {source / 'a.png'}" in err and "choose another output folder" in err
    assert tree(source) == before  # not one byte written, no mask or overlay added

    jpegs = photos(tmp_path / "jpegs", ("a.jpg", "b.jpeg"))  # no clash by name, but the folder is the input
    before = tree(jpegs)
    assert run_predict(checkpoint, jpegs, jpegs) == 1
    err = capsys.readouterr().err
    assert f"output folder {jpegs} is the input folder" in err and "would read the masks and overlays as images" in err
    assert tree(jpegs) == before


def test_an_output_folder_inside_the_input_folder_is_refused(checkpoint, tmp_path, capsys):
    source = photos(tmp_path / "photos")
    before = tree(source)
    assert run_predict(checkpoint, source, source / "masks") == 1
    err = capsys.readouterr().err
    assert f"output folder {source / 'masks'} is inside the input folder {source}" in err
    assert f"choose an output folder outside {source}" in err
    assert tree(source) == before and not (source / "masks").exists()


def test_a_jpg_and_a_png_with_one_stem_both_get_their_own_mask(checkpoint, tmp_path, capsys):
    source = photos(tmp_path / "photos", ("photo.jpg", "photo.png", "other.jpg", "sub/photo.jpg"))
    output = tmp_path / "masks"
    assert run_predict(checkpoint, source, output) == 0
    assert sorted(tree(output)) == [
        "other.png", "other_overlay.jpg", "photo.jpg.png", "photo.jpg_overlay.jpg", "photo.png.png", "photo.png_overlay.jpg",
        "sub/photo.png", "sub/photo_overlay.jpg",  # alone in its folder: the plain name
    ]
    out = capsys.readouterr().out
    assert "2 images share their name up to the extension" in out and "(photo.jpg -> photo.jpg.png)" in out
    assert f"wrote 4 masks and 4 overlays to {output}" in out
    for image, mask in [("photo.jpg", "photo.jpg.png"), ("photo.png", "photo.png.png"), ("sub/photo.jpg", "sub/photo.png")]:
        written = Image.open(output / mask)
        assert written.mode == "P" and written.size == SIZE  # class ids, one channel (with a palette to view them)
        assert np.array_equal(np.asarray(written), expected_ids(checkpoint, source / image))
    overlays = tree(output)
    assert overlays["photo.jpg_overlay.jpg"] != overlays["photo.png_overlay.jpg"]


def test_a_single_image_file_as_input(checkpoint, tmp_path, capsys):
    source = photos(tmp_path / "photos", ("photo.jpg", "photo.png"))
    output = tmp_path / "masks"
    assert run_predict(checkpoint, source / "photo.jpg", output) == 0
    assert f"wrote 1 mask and 1 overlay to {output}" in capsys.readouterr().out
    assert sorted(tree(output)) == ["photo.png", "photo_overlay.jpg"]
    assert np.array_equal(np.asarray(Image.open(output / "photo.png")), expected_ids(checkpoint, source / "photo.jpg"))

    before = tree(source)  # its mask would be the PNG next to it
    assert run_predict(checkpoint, source / "photo.png", source) == 1
    assert f"would write over the input image {source / 'photo.png'}" in capsys.readouterr().err
    assert run_predict(checkpoint, source / "photo.jpg", source, "overwrite=true") == 1  # into the image's own folder
    assert f"output folder {source} is the input folder" in capsys.readouterr().err
    assert tree(source) == before


def test_existing_outputs_are_refused_without_overwrite_and_replaced_with_it(checkpoint, tmp_path, capsys):
    source = photos(tmp_path / "photos")
    output = tmp_path / "masks"
    fake_data.save(fake_data.rgb(9, SIZE), output / "a.png")  # the user's file, not predict's
    (output / "notes.txt").write_text("keep me")
    before = tree(output)
    assert run_predict(checkpoint, source, output) == 1
    err = capsys.readouterr().err
    assert f"1 of the 6 output files already exist in {output} (a.png); pass overwrite=true" in err
    assert tree(output) == before  # nothing else written either

    assert run_predict(checkpoint, source, output, "overwrite=true") == 0
    assert f"wrote 3 masks and 3 overlays to {output}" in capsys.readouterr().out
    after = tree(output)
    assert len(after) == 7 and after["notes.txt"] == before["notes.txt"] and after["a.png"] != before["a.png"]
    assert Image.open(output / "a.png").mode == "P"

    assert run_predict(checkpoint, source, output) == 1  # the same command again
    err = capsys.readouterr().err
    assert ("6 of the 6 output files already exist" in err and "(a.png, a_overlay.jpg, b.png and 3 more)" in err
            and "rerunning predict into the same folder needs it" in err)
    assert tree(output) == after


def test_a_file_that_is_not_an_image_is_refused_before_anything_is_written(checkpoint, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    output = tmp_path / "masks"
    assert run_predict(checkpoint, notes, output) == 1
    err = capsys.readouterr().err
    assert f"input {notes} is not an image file ({', '.join(IMAGE_EXTENSIONS)})" in err

    source = photos(tmp_path / "photos", ("a.png",))
    (source / "b.jpg").write_text("a text file named .jpg")
    assert run_predict(checkpoint, source / "b.jpg", output) == 1
    assert f"{source / 'b.jpg'}: not a readable image" in capsys.readouterr().err
    assert run_predict(checkpoint, source, output) == 1  # a folder with one bad image: not even a.png is written
    assert f"{source / 'b.jpg'}: not a readable image" in capsys.readouterr().err
    assert not output.exists()


#: Pascal VOC's colours of ids 0..4 and 255 (the bit-interleaving colormap mmseg and VOC use)
VOC = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 255: (224, 224, 192)}


def test_masks_are_palette_pngs_of_class_ids_in_voc_colours_and_overlays_carry_a_legend(checkpoint, tmp_path, capsys):
    from ddep.engine.predict import legend_labels, overlay_image, palette

    colours = palette()
    assert colours.shape == (256, 3) and all(tuple(colours[k]) == rgb for k, rgb in VOC.items())
    source = photos(tmp_path / "photos", ("a.png", "b.jpg"))
    output = tmp_path / "masks"
    assert run_predict(checkpoint, source, output, "class_names=[sky, road, car]") == 0
    for name in ("a", "b"):
        mask = Image.open(output / f"{name}.png")
        ids = expected_ids(checkpoint, source / f"{name}.{'png' if name == 'a' else 'jpg'}")
        assert mask.mode == "P" and np.array_equal(np.asarray(mask), ids)  # the pixel values are still the ids
        assert np.array_equal(np.asarray(mask.getpalette(), np.uint8).reshape(-1, 3)[:256], colours)
        overlay = Image.open(output / f"{name}_overlay.jpg")
        assert overlay.width >= SIZE[1] and overlay.height > SIZE[0]  # the legend strip below the image
        blended = 0.5 * np.asarray(read_image(source / f"{name}.{'png' if name == 'a' else 'jpg'}"), np.float32) + 0.5 * colours[ids]
        top = np.asarray(overlay, np.float32)[:SIZE[0], :SIZE[1]]
        assert np.abs(top - blended).mean() < 12  # every class blended at 0.5 (the JPEG's loss aside)

    assert run_predict(checkpoint, source, tmp_path / "ids", "palette_masks=false") == 0  # for OpenCV's reader
    assert Image.open(tmp_path / "ids" / "a.png").mode == "L"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ids" / "a.png")), np.asarray(Image.open(output / "a.png")))

    ids = np.array([[0, 2], [2, 2]], np.uint8)  # the legend names the classes present, in id order
    assert legend_labels(ids, ("sky", "road", "car")) == [(0, "0 sky"), (2, "2 car")]
    assert legend_labels(ids, None) == [(0, "class 0"), (2, "class 2")]
    image = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    drawn = np.asarray(overlay_image(image, np.kron(ids, np.ones((2, 2), np.uint8)), colours, ("sky", "road", "car")))
    legend = drawn[4:].reshape(-1, 3)
    present = {tuple(c) for c in legend}
    assert tuple(colours[2]) in present and tuple(colours[1]) not in present  # a swatch per present class only


def test_class_names_come_from_class_names_or_a_classes_file_and_must_match_the_model(checkpoint, tmp_path, capsys):
    source = photos(tmp_path / "photos", ("a.png",))
    names = tmp_path / "names.txt"
    names.write_text("sky\nroad\ncar\n")
    assert run_predict(checkpoint, source, tmp_path / "out", f"classes_file={names}") == 0
    capsys.readouterr()
    names.write_text("sky\nroad\n")
    for extra in (f"classes_file={names}", "class_names=[sky, road]"):
        assert run_predict(checkpoint, source, tmp_path / "two", extra) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.endswith("2 class names but the model predicts 3 classes")
    assert not (tmp_path / "two").exists()  # refused before anything is written


def test_a_fine_tuned_models_legend_names_the_classes_its_run_recorded(checkpoint, tmp_path):
    from ddep.engine.predict import class_names

    run = tmp_path / "runs" / "x"
    (run / "model").mkdir(parents=True)
    (run / "metrics.json").write_text('{"classes": ["sky", "road", "car"]}')
    config = {"class_names": None, "classes_file": None}
    for model in (run / "model", run / "checkpoints" / "last.pt"):
        assert class_names({**config, "checkpoint": str(model)}, {"classes": 3}) == ("sky", "road", "car")
    assert class_names({**config, "checkpoint": str(checkpoint)}, {"classes": 3}) is None
