"""Reading images and masks from disk, with every odd format converted or refused explicitly.

Images (:data:`IMAGE_EXTENSIONS`, any case): RGB is read as is; grayscale, 1-bit, palette and
CMYK are converted to RGB; an alpha channel is dropped (composited on black); 16-bit and float
images (TIFFs with 16-bit RGB included, which PIL would silently cut to their high bytes) are
refused, since scaling them to 8 bits is a choice the user must make. Masks (PNG or TIFF): 8-bit
grayscale and palette masks are class ids (a palette PNG's indices, as in Pascal VOC); 16-bit
masks are read as ids; RGB masks need a ``palette`` that maps colours to ids. Every failure is a
:class:`DataError` naming the file.

:func:`inspect_image` finds what :func:`read_image` would refuse without decoding JPEGs and PNGs:
their header gives size and mode, and walking their structure to its end (JPEG markers and
entropy-coded data to the end-of-image marker, PNG chunks to IEND) finds files cut short.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
#: Mask files: lossless formats only (a JPEG's compression changes the ids at region borders).
MASK_EXTENSIONS = (".png", ".tif", ".tiff")
#: Image modes with more than 8 bits per channel.
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


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
        hint = ""
        if str(path).lower().endswith((".tif", ".tiff")):
            hint = ": a TIFF layout PIL does not read (more than 4 channels, planar 16-bit...); save it as 8-bit RGB"
        raise DataError(f"{path}: not a readable image ({type(e).__name__}){hint}") from None
    return image


def bits_per_channel(image: Image.Image) -> int:
    """The bits of each channel a file stores, read before it is decoded: a TIFF's own, a PNG's
    from its decoder's raw mode (PIL reads 16-bit RGB TIFFs and PNGs as 8-bit RGB, keeping the
    high bytes), else as the mode says."""
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, 8)  # BitsPerSample
        return max(bits) if isinstance(bits, tuple) else int(bits)
    if any(";16" in str(tile[3]) for tile in getattr(image, "tile", None) or []):
        return 16
    return 8 if image.mode not in DEEP_MODES else 16


def check_image_depth(image: Image.Image, path: str | os.PathLike) -> None:
    """Refuse an image with more than 8 bits per channel: scaling it down is the user's choice."""
    if image.mode in DEEP_MODES:
        raise DataError(f"{path}: {image.mode} image with more than 8 bits per channel; convert it to 8-bit RGB")
    if bits_per_channel(image) > 8:
        raise DataError(f"{path}: {bits_per_channel(image)}-bit {image.mode} image with more than 8 bits per channel; "
                        "convert it to 8-bit RGB")


def jpeg_end(data: bytes) -> int | None:
    """The offset just past a JPEG's end-of-image marker, found by walking its segments (by their
    lengths) and entropy-coded data (where 0xFF is always followed by 0x00 or a restart marker);
    None when the data ends before it (a file cut short). Bytes after the marker (padding, an
    appended preview) are not looked at, and an EXIF thumbnail's marker is skipped with its segment."""
    size, position = len(data), 2
    if data[:2] != b"\xff\xd8":
        return None
    while True:
        position = data.find(b"\xff", position)  # stray bytes before a marker are skipped, as libjpeg does
        while 0 <= position < size - 1 and data[position + 1] == 0xFF:  # fill bytes
            position += 1
        if position < 0 or position >= size - 1:
            return None
        marker, position = data[position + 1], position + 2
        if marker == 0xD9:
            return position
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if position + 2 > size:
            return None
        position += int.from_bytes(data[position : position + 2], "big")
        if position > size:
            return None
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker that is not a restart
            while True:
                position = data.find(b"\xff", position)
                if position < 0 or position >= size - 1:
                    return None
                following = data[position + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    position += 2
                elif following == 0xFF:
                    position += 1
                else:
                    break


def png_end(data: bytes) -> int | None:
    """The offset just past a PNG's IEND chunk, found by walking its chunks' lengths; None when the
    data ends before it (the chunks' CRCs and compressed data are not checked)."""
    size, position = len(data), 8
    while position + 8 <= size:
        length, kind = int.from_bytes(data[position : position + 4], "big"), data[position + 4 : position + 8]
        position += 12 + length
        if position > size:
            return None
        if kind == b"IEND":
            return position
    return None


def check_complete(path: str | os.PathLike, image_format: str, data: bytes) -> None:
    """Refuse a JPEG or PNG cut short (see :func:`jpeg_end`, :func:`png_end`); other formats pass."""
    if image_format == "JPEG" and jpeg_end(data) is None:
        raise DataError(f"{path}: truncated JPEG (its data ends before the end-of-image marker)")
    if image_format == "PNG" and png_end(data) is None:
        raise DataError(f"{path}: truncated PNG (its data ends before the IEND chunk)")


def inspect_image(path: str | os.PathLike, full: bool = False) -> tuple[int, int]:
    """``(width, height)`` of the image file at ``path``, refusing what :func:`read_image` would
    refuse. JPEGs and PNGs are checked by header and structure (:func:`check_complete`), without
    decoding, unless ``full``; other formats, and every format with ``full``, are decoded."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    with open_image(path, data) as image:
        check_image_depth(image, path)
        if full or image.format not in ("JPEG", "PNG"):
            _load(image, path)
        else:
            check_complete(path, image.format, data)
        return image.size


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
    check_image_depth(image, path)
    image = _load(image, path)
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
    image = open_image(path)
    bits = bits_per_channel(image)  # before decoding, which forgets it
    image = _load(image, path)
    if image.mode in ("RGB", "RGBA") and bits > 8:
        raise DataError(f"{path}: {bits}-bit {image.mode} mask; save masks as 8/16-bit grayscale (ids) "
                        "or 8-bit RGB with a palette")
    if image.mode in ("L", "P", "1"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return np.asarray(image).astype(np.int32)
    if image.mode in ("RGB", "RGBA"):
        if palette is None:
            raise DataError(f"{path}: RGB mask; pass a palette (one RGB colour per class) to map colours to ids")
        return rgb_to_ids(np.asarray(image.convert("RGB")), palette, path)
    raise DataError(f"{path}: unsupported mask mode {image.mode}; expected 8/16-bit grayscale or palette PNG/TIFF")


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
