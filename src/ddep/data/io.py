"""Reading images and masks from disk, with every odd format converted or refused explicitly.

Images: RGB is read as is; grayscale, 1-bit, palette and CMYK are converted to RGB; an alpha
channel is dropped (composited on black); 16-bit and float images are refused, since scaling
them to 8 bits is a choice the user must make. Masks: 8-bit grayscale and palette PNGs are
class ids (a palette PNG's indices, as in Pascal VOC); 16-bit masks are read as ids; RGB masks
need a ``palette`` that maps colours to ids. Every failure is a :class:`DataError` naming the file.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DataError(ValueError):
    """A file or folder that cannot be used as it is; the message names it."""


def open_image(path: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """The image file at ``path``, or the encoded image ``data`` (``path`` then only names it)."""
    try:
        image = Image.open(path if data is None else io.BytesIO(data))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as e:  # far more pixels than any training image needs
        raise DataError(f"{path}: too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__})") from None
    return image


def _load(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    try:
        image.load()
    except (OSError, SyntaxError) as e:  # PIL raises these for truncated or corrupt data
        raise DataError(f"{path}: truncated or corrupt image ({e})") from None
    return image


def fit_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """``(width, height)`` scaled down, keeping the aspect ratio, until the longer side is at most
    ``max_size`` (never scaled up; sides rounded, at least 1)."""
    factor = min(1.0, max_size / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))


def read_image(path: str | os.PathLike, min_size: int | None = None, max_size: int | None = None,
               data: bytes | None = None) -> Image.Image:
    """An RGB image, from the file at ``path`` or from its encoded bytes ``data``.

    With ``min_size``, JPEGs are decoded at a reduced scale (``Image.draft``) whose shorter side is
    still at least ``min_size``: much faster for large photos. With ``max_size``, the image is
    shrunk (Lanczos, after the reduced-scale decoding that still holds the result) so that its
    longer side is at most ``max_size``."""
    image = open_image(path, data)
    target = fit_size(*image.size, max_size) if max_size else None
    if image.format == "JPEG" and (min_size or target):
        image.draft("RGB", target or (min_size, min_size))
    image = _load(image, path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise DataError(f"{path}: {image.mode} image with more than 8 bits per channel; convert it to 8-bit RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, 0)
        image.paste(rgba, mask=rgba.getchannel("A"))
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if target and image.size != target:
        image = image.resize(target, Image.LANCZOS)
    return image


def read_mask(path: str | os.PathLike, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Class ids as an H x W integer array (uint8, or int32 for 16-bit masks)."""
    image = _load(open_image(path), path)
    if image.mode in ("L", "P", "1"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image).astype(np.int32)
    if image.mode in ("RGB", "RGBA"):
        if palette is None:
            raise DataError(f"{path}: RGB mask; pass a palette (one RGB colour per class) to map colours to ids")
        return rgb_to_ids(np.asarray(image.convert("RGB")), palette, path)
    raise DataError(f"{path}: unsupported mask mode {image.mode}; expected 8/16-bit grayscale or palette PNG")


def rgb_to_ids(rgb: np.ndarray, palette: Sequence[Sequence[int]], path: str | os.PathLike) -> np.ndarray:
    """Map each palette colour to its index; unknown colours are an error that lists them."""
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    lut = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(palette)}
    found, inverse = np.unique(codes, return_inverse=True)
    unknown = [c for c in found.tolist() if c not in lut]
    if unknown:
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in unknown[:5])
        raise DataError(f"{path}: mask colours not in the palette: {shown}")
    return np.array([lut[c] for c in found.tolist()], dtype=np.uint8)[inverse].reshape(codes.shape)
