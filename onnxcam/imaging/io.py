"""Finding and reading image files, turning every user mistake into a one-line ``ImageError``.

``load_image`` always returns a fully decoded 8-bit RGB image, so everything downstream (the
preprocessor, the overlay) deals with one pixel format. Files are only ever opened for reading.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from onnxcam.errors import ImageError, OptionError

#: Colour that transparent pixels are composited onto. White, because images with alpha are mostly
#: logos, icons and cut-outs drawn for white pages; a model sees them the way a person does.
ALPHA_BACKGROUND = (255, 255, 255)
#: PNG options for every figure onnxcam writes: zlib level 1 encoded a 384x384 overlay in 21 ms
#: against 78 ms at PIL's default level 6, for a file 4% larger; at the default, writing the PNGs
#: took 60% of ``onnxcam explain`` over a folder.
PNG_SAVE_OPTIONS = {"format": "PNG", "compress_level": 1}
#: PNG options for the overlays (a photo under a colour map): zlib's run-length strategy encoded
#: them in 16% less time than PNG_SAVE_OPTIONS, into 10% smaller files. Not for the figures, whose
#: flat areas it left 24% bigger, for no gain in time.
OVERLAY_PNG_OPTIONS = {**PNG_SAVE_OPTIONS, "compress_type": zlib.Z_RLE}
#: JPEG for the overlays and figures of large photos (``--image-format jpg``): a 12-megapixel
#: overlay encoded in 42 ms into 3.4 MB, against 978 ms and 25 MB as PNG; lossy, so the raw maps
#: stay in the .npy files.
JPEG_SAVE_OPTIONS = {"format": "JPEG", "quality": 90}
#: Pillow options per output format: (overlays, figures).
IMAGE_FORMATS = {"png": (OVERLAY_PNG_OPTIONS, PNG_SAVE_OPTIONS), "jpg": (JPEG_SAVE_OPTIONS, JPEG_SAVE_OPTIONS)}


def save_options(image_format: str, figure: bool = False) -> dict:
    """Pillow's save options for an overlay (or a figure) in ``image_format`` (png or jpg)."""
    if image_format not in IMAGE_FORMATS:
        raise OptionError(f"image format {image_format!r}: give one of {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[image_format][1 if figure else 0]

# What Pillow's decoders raise on a damaged file (on top of OSError): the PNG plugin uses
# SyntaxError, others struct.error, EOFError, ValueError or IndexError on short/garbled headers.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

_PIXELS_IN_MESSAGE = re.compile(r"\((\d+) pixels\)")


def display_path(path: str | os.PathLike) -> str:
    """The path as it goes into a one-line message: control characters (newlines...) escaped."""
    text = os.fspath(path)
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def readable_suffixes() -> frozenset[str]:
    """Lower-case file suffixes (".png", ".jpg"...) of the formats this Pillow can open."""
    extensions = Image.registered_extensions()  # also runs Image.init(), which fills Image.OPEN
    return frozenset(ext.lower() for ext, fmt in extensions.items() if fmt in Image.OPEN)


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand the command-line paths into the list of image files to explain.

    Files are kept as given (in order; a file named twice is kept once), even with an unusual
    suffix: ``load_image`` will say if it is not an image. A folder contributes its files whose
    suffix Pillow can open, sorted by name, not recursing and skipping hidden files (names starting
    with "." such as macOS "._x.jpg" forks). An empty ``paths`` gives an empty list.
    """
    suffixes = readable_suffixes()
    found: list[Path] = []
    seen: set[str] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            members = _images_in_folder(path, suffixes)
        elif path.is_file():
            members = [path]
        elif path.exists():
            raise ImageError(f"{display_path(path)}: not a regular file or folder; give an image file or a folder of images")
        else:
            raise ImageError(f"{display_path(path)}: no such file or folder; check the path")
        for member in members:
            key = os.path.normcase(os.path.realpath(member))
            if key not in seen:
                seen.add(key)
                found.append(member)
    return found


def _images_in_folder(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    try:
        children = sorted(folder.iterdir())
    except OSError as exc:
        raise ImageError(f"{display_path(folder)}: cannot list the folder ({_reason(exc)}); check its permissions") from None
    images = [
        child
        for child in children
        if not child.name.startswith(".") and child.suffix.lower() in suffixes and child.is_file()
    ]
    if not images:
        raise ImageError(
            f"{display_path(folder)}: folder has no image files (looked for .jpg, .png, .webp, .bmp, .tif and the other "
            "suffixes Pillow reads, not in subfolders); add images or name the files directly"
        )
    return images


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file into a fully decoded 8-bit RGB ``PIL.Image``, upright as a viewer shows it.

    - EXIF orientation is applied (a phone photo tagged "rotate 90" comes back rotated).
    - 16-bit images are scaled, not clipped, to 8 bits (see ``_to_rgb``).
    - Transparent pixels are composited onto white (``ALPHA_BACKGROUND``).
    - Only the first frame of an animated/multi-page file is read.
    - The whole file is decoded here, so a truncated file fails now, with its name.

    Every problem with the file raises ``ImageError`` with a one-line message naming the file.
    Pillow's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS`` is enforced strictly: an
    image over it is refused (Pillow itself only warns below twice the limit).
    """
    path = Path(path)
    name = display_path(path)
    try:
        if path.is_dir():
            raise ImageError(f"{name}: is a folder, not an image file; give an image file")
        size_bytes = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file; check the path") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot read the file ({_reason(exc)}); check its permissions") from None
    if size_bytes == 0:
        raise ImageError(f"{name}: file is empty (0 bytes); re-copy or re-download it")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as stream, Image.open(stream) as opened:
                opened.load()
                upright = ImageOps.exif_transpose(opened)  # a new image, independent of the file
                return _to_rgb(upright, name)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(_bomb_message(name, exc)) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read (unknown or unsupported format); check the file") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise ImageError(f"{name}: cannot read the file ({_reason(exc)}); check its permissions") from None
    except _DECODE_ERRORS as exc:
        reason = _reason(exc)
        if "truncated" in reason.lower():
            raise ImageError(f"{name}: image file is truncated (its data stops early); re-copy or re-download it") from None
        raise ImageError(f"{name}: image file is corrupt or cannot be decoded ({reason}); re-save or replace it") from None


def _bomb_message(name: str, exc: Exception) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    match = _PIXELS_IN_MESSAGE.search(str(exc))
    pixels = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
    return (
        f"{name}: image has {pixels}, over Pillow's decompression-bomb limit of {limit:,} pixels; "
        "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
    )


def _reason(exc: BaseException) -> str:
    """An exception's text squeezed onto one line."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, keeping the full tonal range of high-bit-depth data.

    - "I;16*" (16-bit grey): value / 257, rounded, so 65535 -> 255 and 32768 -> 128.
    - "I" (32-bit int): treated as 16-bit (/257) when all values lie in 0..65535 (how 16-bit PNG
      and TIFF data arrives); otherwise stretched linearly from its min..max onto 0..255.
    - "F" (float): x * 255 when all values lie in [0, 1], otherwise min..max stretch; NaN -> 0.
    - Modes with alpha (RGBA, LA, PA, P with a transparent colour...): composited onto white.
    - Everything else (L, 1, P, CMYK, YCbCr, HSV...): Pillow's ``convert("RGB")``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = Image.fromarray(_high_depth_to_uint8(np.asarray(image), mode))
        return grey.convert("RGB")
    try:
        if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
    except ValueError as exc:  # e.g. "LAB": Pillow has no direct conversion
        raise ImageError(
            f"{name}: colour mode {mode} cannot be converted to RGB ({_reason(exc)}); save the image as RGB"
        ) from None


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    if mode.startswith("I;16"):
        return np.rint(values / 257.0).astype(np.uint8)
    values = np.where(np.isfinite(values), values, 0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "I" and low >= 0 and high <= 65535:
        return np.rint(values / 257.0).astype(np.uint8)
    if mode == "F" and low >= 0 and high <= 1:
        return np.rint(values * 255.0).astype(np.uint8)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
