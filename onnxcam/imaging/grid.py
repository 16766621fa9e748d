"""A one-row comparison figure: the input image, then one titled overlay per method.

Laid out like the qualitative figures of the Grad-CAM / Smooth Grad-CAM++ papers: equal tiles,
a short title above each, white background, small even margins, optionally a colour bar at the
right, so it can go straight into a README.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from onnxcam.errors import OptionError
from onnxcam.imaging.colormap import get_colormap
from onnxcam.imaging.overlay import check_alpha, outline, overlay

BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (34, 34, 34)
FRAME_COLOUR = (170, 170, 170)
MIN_TILE = 32


def compare_grid(
    image: Image.Image,
    panels: Sequence[tuple[str, np.ndarray]],
    alpha: float = 0.5,
    colormap: str = "turbo",
    tile: int = 224,
    image_title: str = "Input",
    colorbar: bool = False,
    seen: np.ndarray | None = None,
    region: np.ndarray | None = None,
) -> Image.Image:
    """Return an RGB figure: ``image`` then, for each (title, map01) in ``panels``, its overlay.

    Every tile is the image scaled (aspect ratio kept) to fit a ``tile`` x ``tile`` box, so all
    tiles have the same size. Maps can be at any resolution (they are stretched over the image).
    With ``colorbar`` a vertical low-to-high bar of the colormap is added at the right. ``seen``
    (H, W) bool at the image's size marks what the model saw (a centre crop); the rest is left
    uncoloured in every overlay. ``region`` (H, W) bool: a segmentation class's pixels, outlined
    on every overlay.
    """
    weight = check_alpha(alpha)
    get_colormap(colormap)  # fail on a bad name before drawing anything
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < MIN_TILE:
        raise OptionError(f"tile size {tile!r} is too small; give an integer of at least {MIN_TILE} pixels")

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    scale = tile / max(rgb.size)
    tile_size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    thumbnail = rgb.resize(tile_size, Image.Resampling.LANCZOS)
    tiles = [(image_title, thumbnail)]
    if seen is not None:
        mask = Image.fromarray(np.asarray(seen, dtype=np.uint8) * 255).resize(tile_size, Image.Resampling.NEAREST)
        seen = np.asarray(mask) > 127
    tiles += [(title, overlay(thumbnail, map01, weight, colormap, seen=seen)) for title, map01 in panels]
    if region is not None:
        tiles[1:] = [(title, outline(picture, region)) for title, picture in tiles[1:]]

    margin = max(6, tile // 28)
    font = _font(max(11, round(tile * 0.068)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, text_top, _, text_bottom = measure.textbbox((0, 0), "Ag", font=font)
    title_height = (text_bottom - text_top) + max(4, margin // 2 + 2)

    tile_w, tile_h = tile_size
    width = margin + len(tiles) * tile_w + (len(tiles) - 1) * margin + margin
    bar_width, label_font = max(8, tile // 18), _font(max(10, round(tile * 0.05)))
    if colorbar:
        label_width = max(measure.textlength(word, font=label_font) for word in ("high", "low"))
        width += bar_width + 4 + int(np.ceil(label_width)) + margin
    height = margin + title_height + tile_h + margin

    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    top = margin + title_height
    for index, (title, picture) in enumerate(tiles):
        left = margin + index * (tile_w + margin)
        figure.paste(picture, (left, top))
        text = _fit(draw, str(title), font, tile_w)
        text_width = draw.textlength(text, font=font)
        draw.text((left + (tile_w - text_width) / 2, margin - text_top), text, fill=TEXT_COLOUR, font=font)

    if colorbar:
        bar_left = margin + len(tiles) * (tile_w + margin)
        _draw_colorbar(figure, draw, colormap, (bar_left, top, bar_width, tile_h), label_font)
    return figure


def _draw_colorbar(
    figure: Image.Image, draw: ImageDraw.ImageDraw, colormap: str, box: tuple[int, int, int, int], font
) -> None:
    left, top, bar_width, bar_height = box
    levels = np.linspace(1.0, 0.0, bar_height)  # high at the top
    indices = np.rint(levels * 255).astype(np.intp)
    column = get_colormap(colormap)[indices]  # (bar_height, 3)
    bar = np.repeat(column[:, None, :], bar_width, axis=1)
    figure.paste(Image.fromarray(np.ascontiguousarray(bar)), (left, top))
    draw.rectangle((left, top, left + bar_width - 1, top + bar_height - 1), outline=FRAME_COLOUR)
    _, text_top, _, text_bottom = draw.textbbox((0, 0), "high", font=font)
    draw.text((left + bar_width + 4, top - text_top), "high", fill=TEXT_COLOUR, font=font)
    draw.text((left + bar_width + 4, top + bar_height - text_bottom), "low", fill=TEXT_COLOUR, font=font)


def _font(size: int):
    """Pillow's bundled font at ``size`` (needs FreeType, Pillow >= 10.1); else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError, AttributeError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    """``text`` on one line, shortened with "..." until it fits ``max_width`` pixels."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= max_width:
        return text
    while len(text) > 1 and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text.rstrip() + "..."
