"""Blending a coloured relevance map over the image it explains."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from onnxcam.errors import OptionError
from onnxcam.imaging.colormap import apply_colormap


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in [0, 1], or an OptionError saying what it means."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise OptionError(
            f"overlay alpha {alpha!r} is outside [0, 1]; use 0 for the image only, 1 for the map only (e.g. 0.5)"
        )
    return value


def resize_map(map01: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (h, w) float map to ``size`` = (width, height) with bilinear interpolation.

    Done on a 32-bit float "F" image, so the map is not quantised to 8 bits before colouring.
    """
    values = np.asarray(map01, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"a relevance map must be 2-D (H, W), got shape {values.shape}")
    width, height = size
    if values.shape == (height, width):
        return values
    resized = Image.fromarray(np.ascontiguousarray(values)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


#: Rows of the image coloured and blended at a time: the float32 colours and blend of a whole
#: large photo would take 16 bytes a pixel on top of it.
STRIP_ROWS = 256


def overlay(image: Image.Image, map01: np.ndarray, alpha: float = 0.5, colormap: str = "turbo",
            seen: np.ndarray | None = None) -> Image.Image:
    """Return ``(1 - alpha) * image + alpha * colormap(map)`` as an RGB image of the image's size.

    ``map01`` holds values in [0, 1] (clipped otherwise) at any resolution; it is stretched over
    the whole image. ``seen`` (H, W) bool marks the pixels the model saw (a centre crop): the
    others are only darkened, with no colour, so that no one reads a map where the model did not look.
    """
    weight = check_alpha(alpha)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    stretched = resize_map(map01, rgb.size)
    pixels = np.asarray(rgb)
    unseen = None if seen is None else ~np.asarray(seen, dtype=bool)
    out = np.empty_like(pixels)
    for top in range(0, pixels.shape[0], STRIP_ROWS):  # a 24-megapixel photo: 0.2 GB, not 1 GB, at a time
        rows = slice(top, top + STRIP_ROWS)
        colours = apply_colormap(stretched[rows], colormap).astype(np.float32)
        if unseen is not None:
            colours[unseen[rows]] = 0.0
        blended = pixels[rows].astype(np.float32)
        blended *= 1.0 - weight
        colours *= weight
        blended += colours
        np.rint(blended, out=blended)
        np.clip(blended, 0, 255, out=blended)
        out[rows] = blended
    return Image.fromarray(out)


#: The colour of a segmentation region's outline on an overlay.
OUTLINE_COLOUR = (255, 255, 255)


def outline(picture: Image.Image, region: np.ndarray) -> Image.Image:
    """``picture`` with the border of ``region`` ((H, W) bool at any resolution, stretched over
    it) drawn in white, about a two-hundredth of the picture's shorter side thick: the pixels a
    segmentation map explains."""
    width, height = picture.size
    mask = Image.fromarray(np.asarray(region, dtype=np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    inside = np.asarray(mask) > 127
    padded = np.pad(inside, 1, mode="edge")
    edge = inside & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    for _ in range(max(1, round(min(width, height) / 200)) - 1):  # thicker on large pictures
        grown = np.pad(edge, 1)
        edge = edge | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]
    pixels = np.array(picture.convert("RGB"))
    pixels[edge & inside] = OUTLINE_COLOUR
    return Image.fromarray(pixels)
