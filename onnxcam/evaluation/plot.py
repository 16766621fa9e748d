"""Deletion and insertion mean curves drawn with Pillow (no plotting library).

``curves_figure(fractions, curves)`` returns a PIL image with two panels (deletion, insertion):
axes from 0 to 1 with ticks and grid, axis labels, one coloured line per method and a legend
giving each method's area under the curve.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["curves_figure"]

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
DASHES = [None, (10, 5), (3, 4), (12, 4, 3, 4)]


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def curves_figure(fractions: np.ndarray, curves: Mapping[str, Mapping[str, np.ndarray]],
                  titles: Mapping[str, str] | None = None, title: str | None = None) -> Image.Image:
    """Two panels (deletion, insertion); ``curves[name] = {"deletion": y, "insertion": y}`` over
    ``fractions`` (x in [0, 1]); ``titles[name]`` is the legend text (default: the name)."""
    titles = dict(titles or {})
    x = np.asarray(fractions, dtype=np.float64)
    names = list(curves)
    panel_w, panel_h = 560, 400
    margin_left, margin_right, margin_top, margin_bottom = 70, 20, 50, 60
    legend_line = 22
    legend_h = 20 + legend_line * len(names)
    header = 40 if title else 0
    width = 2 * (panel_w + margin_left + margin_right)
    height = header + margin_top + panel_h + margin_bottom + legend_h
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small, big = _font(15), _font(13), _font(18)
    if title:
        tw, _ = _text_size(draw, title, big)
        draw.text(((width - tw) // 2, 10), title, fill="black", font=big)
    for panel, (kind, better) in enumerate((("deletion", "lower is better"), ("insertion", "higher is better"))):
        ox = panel * (panel_w + margin_left + margin_right) + margin_left
        oy = header + margin_top

        def to_px(fx, fy):
            return ox + fx * panel_w, oy + (1.0 - fy) * panel_h

        # grid, ticks and tick labels
        for tick in np.linspace(0, 1, 6):
            gx, _ = to_px(tick, 0)
            _, gy = to_px(0, tick)
            draw.line([(gx, oy), (gx, oy + panel_h)], fill=(230, 230, 230))
            draw.line([(ox, gy), (ox + panel_w, gy)], fill=(230, 230, 230))
            draw.line([(gx, oy + panel_h), (gx, oy + panel_h + 5)], fill="black")
            draw.line([(ox - 5, gy), (ox, gy)], fill="black")
            label = f"{tick:.1f}"
            lw, lh = _text_size(draw, label, small)
            draw.text((gx - lw / 2, oy + panel_h + 8), label, fill="black", font=small)
            draw.text((ox - 10 - lw, gy - lh / 2 - 2), label, fill="black", font=small)
        draw.rectangle([ox, oy, ox + panel_w, oy + panel_h], outline="black")
        heading = f"{kind.capitalize()} ({better})"
        hw, _ = _text_size(draw, heading, font)
        draw.text((ox + (panel_w - hw) / 2, oy - 28), heading, fill="black", font=font)
        xlabel = f"fraction of pixels {'deleted' if kind == 'deletion' else 'inserted'} (most salient first)"
        xw, _ = _text_size(draw, xlabel, small)
        draw.text((ox + (panel_w - xw) / 2, oy + panel_h + 30), xlabel, fill="black", font=small)
        ylabel = "class probability"
        yw, yh = _text_size(draw, ylabel, small)
        rotated = Image.new("RGBA", (yw + 4, yh + 6), (255, 255, 255, 0))
        ImageDraw.Draw(rotated).text((2, 0), ylabel, fill="black", font=small)
        rotated = rotated.rotate(90, expand=True)
        image.paste(rotated, (int(ox - 62), int(oy + (panel_h - rotated.height) / 2)), rotated)
        # curves
        for k, name in enumerate(names):
            y = np.clip(np.asarray(curves[name][kind], dtype=np.float64), 0.0, 1.0)
            points = [to_px(fx, fy) for fx, fy in zip(x, y)]
            # dash patterns as well as colours: curves that coincide (Smooth Grad-CAM++ with the
            # moments equals Grad-CAM++ on a linear head) stay visible on top of each other
            _polyline(draw, points, PALETTE[k % len(PALETTE)], DASHES[k % len(DASHES)], width=3)
        # legend with the areas
        ly = oy + panel_h + margin_bottom
        for k, name in enumerate(names):
            y = np.asarray(curves[name][kind], dtype=np.float64)
            auc = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0)) if len(x) > 1 else float("nan")
            colour = PALETTE[k % len(PALETTE)]
            yy = ly + k * legend_line + 8
            _polyline(draw, [(ox, yy), (ox + 40, yy)], colour, DASHES[k % len(DASHES)], width=3)
            draw.text((ox + 48, yy - 9), f"{titles.get(name, name)}  (AUC {auc:.3f})", fill="black", font=small)
    return image


def _polyline(draw: ImageDraw.ImageDraw, points, colour, dash, width: int) -> None:
    if len(points) < 2:
        return
    if dash is None:
        draw.line(points, fill=colour, width=width, joint="curve")
        return
    pattern = list(dash)
    on, index = True, 0
    remaining = pattern[0]
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        length = float(np.hypot(x1 - x0, y1 - y0))
        start = 0.0
        while start < length:
            step = min(remaining, length - start)
            if on:
                a = start / length
                b = (start + step) / length
                draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                          fill=colour, width=width)
            start += step
            remaining -= step
            if remaining <= 1e-9:
                index = (index + 1) % len(pattern)
                remaining = pattern[index]
                on = not on
