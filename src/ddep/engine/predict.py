"""``ddep predict``: class-id masks and colour overlays for a folder of images (or one image).

Output names. For ``input=photos`` and ``output=masks``, the image ``photos/a/b.jpg`` gives
``masks/a/b.png`` (a single-channel 8-bit PNG of class ids, as mmsegmentation's and smp's
users save them) and ``masks/a/b_overlay.jpg`` (the image blended with a fixed colour per
class). When two images of one folder share a name up to the extension (``b.jpg`` and
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

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..choices import listed
from ..data.io import IMAGE_EXTENSIONS, DataError, open_image, read_image
from ..data.transforms import eval_transforms
from ..data.unlabeled import list_images
from ..inference import eval_for_model, predict
from ..models.saving import load_model
from .distributed import DistInfo, resolve_device

MASK_SUFFIX = ".png"
OVERLAY_SUFFIX = "_overlay.jpg"


def palette(num_classes: int) -> np.ndarray:
    """Distinct, fixed colours per class (the same for every run)."""
    rng = np.random.default_rng(2205_11423)
    colours = rng.integers(40, 256, (max(num_classes, 1), 3), dtype=np.uint8)
    return np.vstack([colours, np.zeros((256 - len(colours), 3), np.uint8)])


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
    """Write ``<output>/<image path with .png>`` (class ids) and ``<stem>_overlay.jpg`` for each
    input image; see the module's docstring for the names and for what is refused."""
    for key in ("checkpoint", "input", "output"):
        if not config[key]:
            raise ValueError(f"predict needs {key}=PATH")
    source, output = Path(config["input"]), Path(config["output"])
    plan, renamed = plan_outputs(source, output)
    check_outputs(source, output, plan, bool(config.get("overwrite", False)))

    device = resolve_device(config["device"], DistInfo())
    model = load_model(config["checkpoint"]).to(device).eval()
    transform = eval_transforms(model.config["mean"], model.config["std"])
    colours = palette(model.config["classes"])
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
        Image.fromarray(ids).save(item.mask)
        overlay = (0.5 * np.asarray(image, np.float32) + 0.5 * colours[ids]).astype(np.uint8)
        Image.fromarray(overlay).save(item.overlay, quality=90)
        written += 1
    plural = "" if written == 1 else "s"
    print(f"wrote {written} mask{plural} and {written} overlay{plural} to {output}")
    return output
