"""``ddep predict``: class-id masks and colour overlays for a folder of images (or one image).

Output names. For ``input=photos`` and ``output=masks``, the image ``photos/a/b.jpg`` gives
``masks/a/b.png`` and ``masks/a/b_overlay.jpg``. The mask is a palette ('P' mode) PNG whose pixel
values are the class ids (``np.asarray(Image.open(mask))`` reads the ids, as Pascal VOC's masks)
and whose palette shows each id in its colour in any viewer: ``palette=`` (one RGB colour per
class), else Pascal VOC's (:func:`palette`, as mmsegmentation draws masks); OpenCV's reader turns
palette PNGs into colours, so ``palette_masks=false`` writes one-channel ids instead. The
overlay blends the image with those colours at 0.5 (every class, 0 included, as mmsegmentation's
``show_result``) and adds a legend strip below it: a swatch and a name for each class present,
names from ``class_names=[a, b, ...]`` or ``classes_file=`` (one per line), else those of the
fine-tuning run the model comes from (its metrics.json), else ``class 0``, ...
When two images of one folder share a name up to the extension (``b.jpg`` and
``b.png``), both keep their extension instead, ``masks/a/b.jpg.png`` and ``masks/a/b.png.png``
(overlays ``b.jpg_overlay.jpg``, ``b.png_overlay.jpg``), so that neither is lost; the names
of all other images stay as they are. ``input=`` may also be one image file: ``masks/<stem>.png``.

No file is lost. Every output path is worked out, and checked, before the model is loaded and
before anything is written; predict refuses (one line, exit status 1) when
  * an output would be one of the input images (``output=`` the input folder, say; symbolic and
    hard links included), even with ``overwrite=true``;
  * the output folder is the input folder or inside it: the next predict on that input would read
    the masks and overlays as images. Leaving the output folder out of the input's listing
    instead would silently skip any images kept there, and a run with another ``output=`` would
    still read the masks: refusing is the rule that surprises least;
  * an output file already exists, unless ``overwrite=true`` (so rerunning predict into the same
    folder needs it); files that this run does not write are never touched;
  * an input is not a readable image, or two inputs would still share an output name.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..choices import listed
from ..data.io import IMAGE_EXTENSIONS, DataError, open_image, read_image
from ..data.transforms import eval_transforms
from ..data.unlabeled import list_images
from ..inference import eval_for_model, predict
from ..models.saving import load_model, refuse_pretraining_result
from .distributed import DistInfo, resolve_device

MASK_SUFFIX = ".png"
OVERLAY_SUFFIX = "_overlay.jpg"


def palette(num_classes: int | None = None) -> np.ndarray:
    """Pascal VOC's colormap (the VOC devkit's and mmsegmentation's): a 256 x 3 uint8 array, id -> RGB,
    the bits of each id interleaved over R, G, B from the high bit down. 0 is black, 1 (128, 0, 0),
    2 (0, 128, 0), ... and the ignore index 255 (224, 224, 192). The same for every run and every
    ``num_classes`` (kept for callers that pass it)."""
    ids = np.arange(256)
    colours = np.zeros((256, 3), np.uint8)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return colours


def class_colours(given: Any, num_classes: int) -> np.ndarray:
    """256 x 3 colours: ``given`` (one RGB colour per class, at least ``num_classes``) over VOC's."""
    colours = palette()
    if given is None:
        return colours
    try:
        given = np.asarray(given)
        ok = given.ndim == 2 and given.shape[1] == 3 and np.issubdtype(given.dtype, np.integer) and ((0 <= given) & (given <= 255)).all()
    except (TypeError, ValueError):
        ok = False
    if not ok or not num_classes <= len(given) <= 256:
        raise ValueError(f"palette must list one RGB colour (3 integers 0..255) for each of the {num_classes} classes, "
                         f"e.g. [[0, 0, 0], [255, 0, 0]]")
    colours[:len(given)] = given
    return colours


def run_class_names(checkpoint: Path) -> list[str] | None:
    """The class names a fine-tuning run recorded in its metrics.json, for its ``model/`` or a
    checkpoint of it; None for a model from elsewhere."""
    for folder in ((checkpoint,) if checkpoint.is_dir() else ()) + (checkpoint.parent, checkpoint.parent.parent):
        metrics = folder / "metrics.json"
        if metrics.is_file():
            return json.loads(metrics.read_text()).get("classes")
    return None


def class_names(config: dict[str, Any], model_config: dict[str, Any]) -> tuple[str, ...] | None:
    """The legend's names: ``class_names`` (a list, or one string of comma-separated names), else
    ``classes_file`` (one name per line), else those the model's fine-tuning run recorded; one per
    class the model predicts."""
    names, source = config.get("class_names"), "class_names"
    if isinstance(names, str):
        names = names.split(",")
    if names is None and config.get("classes_file"):
        path = source = Path(config["classes_file"])
        if not path.is_file():
            raise DataError(f"classes_file not found: {path}")
        names = path.read_text().splitlines()
    if names is None:
        names, source = run_class_names(Path(config["checkpoint"])), "the run's metrics.json"
    if names is None:
        return None
    names = tuple(str(name).strip() for name in names if str(name).strip())
    if len(names) != model_config["classes"]:
        raise DataError(f"{source}: {len(names)} class names but the model predicts {model_config['classes']} classes")
    return names


def legend_labels(ids: np.ndarray, names: tuple[str, ...] | None) -> list[tuple[int, str]]:
    """(id, label) for each class present in ``ids``, in id order: ``"2 car"``, or ``"class 2"`` without names."""
    return [(int(k), f"{k} {names[k]}" if names else f"class {k}") for k in np.unique(ids)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1, or built without FreeType: the small bitmap font
        return ImageFont.load_default()


def overlay_image(image: Image.Image, ids: np.ndarray, colours: np.ndarray, names: tuple[str, ...] | None) -> Image.Image:
    """``image`` blended at 0.5 with the colour of each pixel's class, above a legend strip (white) with
    a swatch and a label for each class present; the strip wraps its entries and is at least as wide
    as the widest one."""
    blended = Image.fromarray((0.5 * np.asarray(image, np.float32) + 0.5 * colours[ids]).astype(np.uint8))
    size = int(np.clip(min(blended.size) / 40, 10, 48))
    font, pad = _font(size), max(2, size // 3)
    draw = ImageDraw.Draw(blended)
    entries = [(k, label, size + pad + int(np.ceil(draw.textlength(label, font=font)))) for k, label in legend_labels(ids, names)]
    width = max(blended.width, max(w for *_, w in entries) + 2 * pad)
    rows: list[list[tuple[int, str, int]]] = [[]]
    x = pad
    for entry in entries:
        if rows[-1] and x + entry[2] > width - pad:
            rows.append([])
            x = pad
        rows[-1].append(entry)
        x += entry[2] + 2 * pad
    row_height = size + pad
    canvas = Image.new("RGB", (width, blended.height + pad + len(rows) * row_height), "white")
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        x, y = pad, blended.height + pad + r * row_height
        for k, label, w in row:
            draw.rectangle([x, y, x + size - 1, y + size - 1], fill=tuple(int(c) for c in colours[k]), outline=(96, 96, 96))
            draw.text((x + size + pad, y + size / 2), label, fill="black", font=font, anchor="lm")
            x += w + 2 * pad
    return canvas


@dataclass(frozen=True)
class Output:
    """Where one input image's predictions go."""

    image: Path
    mask: Path
    overlay: Path


def input_images(source: Path) -> tuple[Path, list[str]]:
    """The folder the images are relative to, and their relative paths (a folder: every image under
    it, recursively, sorted; a file: that one image)."""
    if source.is_dir():
        names = list_images(source)
        if not names:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {source}")
        return source, names
    if source.is_file():
        if not source.name.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"input {source} is not an image file ({', '.join(IMAGE_EXTENSIONS)}); "
                            "input= takes an image or a folder of images")
        return source.parent, [source.name]
    raise DataError(f"input not found: {source} (input= takes an image or a folder of images)")


def output_names(names: list[str]) -> tuple[list[str], int]:
    """The mask path, relative to the output folder, of each relative image path, and how many keep
    their extension (``b.jpg.png``) because another image of their folder has the same stem.

    Names are compared case-insensitively, so that the outputs stay distinct on case-insensitive
    file systems too."""
    plain = [str(Path(name).with_suffix(MASK_SUFFIX)) for name in names]
    counts: dict[str, int] = defaultdict(int)
    for mask in plain:
        counts[mask.casefold()] += 1
    masks = [name + MASK_SUFFIX if counts[mask.casefold()] > 1 else mask for name, mask in zip(names, plain)]
    return masks, sum(mask != p for mask, p in zip(masks, plain))


def plan_outputs(source: Path, output: Path) -> tuple[list[Output], int]:
    """Every input image with its mask and overlay paths, and how many masks keep the image's
    extension; a :class:`DataError` when two inputs would still write one file."""
    root, names = input_images(source)
    masks, renamed = output_names(names)
    seen: dict[str, str] = {}
    for name, mask in zip(names, masks):
        other = seen.setdefault(mask.casefold(), name)
        if other != name:
            raise DataError(f"{root / other} and {root / name} would both be predicted into {output / mask}; rename one of them")
    plan = []
    for name, mask in zip(names, masks):
        mask_path = output / mask
        plan.append(Output(root / name, mask_path, mask_path.with_name(mask_path.stem + OVERLAY_SUFFIX)))
    return plan, renamed


def check_outputs(source: Path, output: Path, plan: list[Output], overwrite: bool) -> None:
    """Refuse, before anything is written, outputs that would replace an input image, land in the
    input folder, replace an existing file (without ``overwrite``) or need a folder where a file is."""
    if output.exists() and not output.is_dir():
        raise DataError(f"output {output} is a file; output= takes a folder")
    real_images = {item.image.resolve(): item.image for item in plan}
    file_ids = {}
    for item in plan:
        stat = item.image.stat()
        file_ids[(stat.st_dev, stat.st_ino)] = item.image
    targets = [path for item in plan for path in (item.mask, item.overlay)]

    clashes = []
    for target in targets:
        image = real_images.get(target.resolve())
        if image is None and target.exists():
            stat = target.stat()
            image = file_ids.get((stat.st_dev, stat.st_ino))
        if image is not None:
            clashes.append((target, image))
    if clashes:
        target, image = clashes[0]
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise DataError(f"output {target} would write over the input image {image}{more}; "
                        "choose another output folder, outside the input")

    folder = source if source.is_dir() else source.parent  # one image: its folder is the input's
    real_source = folder.resolve()
    inside = [t for t in targets if t.resolve().is_relative_to(real_source)]
    if inside:
        real_output = output.resolve()
        where = (f"output folder {output} is the input folder" if real_output == real_source else
                 f"output folder {output} is inside the input folder {folder}" if real_output.is_relative_to(real_source) else
                 f"output {inside[0]} would land inside the input folder {folder}")
        raise DataError(f"{where}: the next predict on {folder} would read the masks and overlays "
                        f"as images; choose an output folder outside {folder}")

    for folder in sorted({t.parent for t in targets}):
        for parent in (folder, *folder.parents):
            if parent.exists() and not parent.is_dir():
                raise DataError(f"{parent} is a file where predict needs a folder; choose another output folder")
            if parent == output:
                break

    existing = [t for t in targets if t.exists() or t.is_symlink()]
    folders = [t for t in existing if t.is_dir()]
    if folders:
        raise DataError(f"{folders[0]} is a folder where predict writes a file; choose another output folder")
    if existing and not overwrite:
        shown = [os.path.relpath(t, output) for t in existing]
        raise DataError(f"{len(existing)} of the {len(targets)} output files already exist in {output} "
                        f"({listed(shown)}); pass overwrite=true to replace them (rerunning predict into "
                        "the same folder needs it), or choose another output folder")

    for item in plan:  # the headers only: a missing or foreign file is found before the model is loaded
        with open_image(item.image):
            pass


@torch.no_grad()
def predict_folder(config: dict[str, Any]) -> Path:
    """Write ``<output>/<image path with .png>`` (class ids, palette PNG) and ``<stem>_overlay.jpg`` for each
    input image; see the module's docstring for the names and for what is refused."""
    for key in ("checkpoint", "input", "output"):
        if not config[key]:
            raise ValueError(f"predict needs {key}=PATH")
    refuse_pretraining_result(config["checkpoint"], "predict with")
    source, output = Path(config["input"]), Path(config["output"])
    plan, renamed = plan_outputs(source, output)
    check_outputs(source, output, plan, bool(config.get("overwrite", False)))

    device = resolve_device(config["device"], DistInfo())
    model = load_model(config["checkpoint"]).to(device).eval()
    transform = eval_transforms(model.config["mean"], model.config["std"])
    colours = class_colours(config.get("palette"), model.config["classes"])
    names = class_names(config, model.config)
    eval_config = eval_for_model(config["eval"], model)
    if renamed:
        example = next(item for item in plan if item.mask.name != item.image.with_suffix(MASK_SUFFIX).name)
        print(f"{renamed} images share their name up to the extension with another image of their folder: "
              f"their masks keep the extension ({example.image.name} -> {example.mask.name})")
    written = 0
    for item in plan:
        try:
            image = read_image(item.image)
        except DataError as e:
            raise DataError(f"{e} ({written} of {len(plan)} images were predicted into {output} before it; "
                            "rerun with overwrite=true once it is fixed or removed)") from None
        x = transform({"image": image})["image"][None].to(device)
        ids = predict(model, x, **eval_config).argmax(1)[0].to(torch.uint8).cpu().numpy()
        item.mask.parent.mkdir(parents=True, exist_ok=True)
        mask = Image.fromarray(ids)
        if config.get("palette_masks", True):
            mask.putpalette(colours.tobytes())  # 'P' mode: the pixels stay the class ids
        mask.save(item.mask)
        overlay_image(image, ids, colours, names).save(item.overlay, quality=90, subsampling=0)
        written += 1
    plural = "" if written == 1 else "s"
    print(f"wrote {written} mask{plural} and {written} overlay{plural} to {output}")
    return output
