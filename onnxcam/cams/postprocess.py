"""Bringing a target-layer map to the input's size and range: bilinear upsampling, min-max."""

from __future__ import annotations

import numpy as np


def _axis_taps(in_size: int, out_size: int, start: float = 0.0,
               span: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights along one axis, half-pixel centres, edges clamped (as PIL).
    The source covers output pixels ``start`` to ``start + span`` (default: all of them)."""
    span = out_size if span is None else span
    source = (np.arange(out_size, dtype=np.float64) + 0.5 - start) * (in_size / span) - 0.5
    source = np.clip(source, 0.0, in_size - 1)
    lower = np.floor(source).astype(np.intp)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, source - lower


def upsample_bilinear(maps: np.ndarray, size: tuple[int, int],
                      footprint: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Resize (N,h,w) or (h,w) maps to size = (H, W) -- height first, unlike PIL's (W, H).

    Bilinear with half-pixel centres and clamped edges, like PIL's BILINEAR when enlarging and
    torch's align_corners=False. Meant for enlarging; shrinking samples without antialiasing
    (PIL widens its filter there). With ``footprint`` = (top, left, height, width) in output
    pixels, the maps cover that rectangle instead of the whole output (a centre crop's map on its
    image); outside it the edge values continue (see :func:`footprint_mask`). Returns float32.
    """
    values = np.asarray(maps, dtype=np.float64)
    if values.ndim not in (2, 3) or 0 in values.shape[-2:]:
        raise ValueError(f"maps must have shape (h, w) or (N, h, w) with h, w > 0, got {values.shape}")
    height, width = (int(side) for side in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be two positive integers (H, W), got {size!r}")
    box_top, box_left, box_height, box_width = footprint or (0.0, 0.0, None, None)
    top, bottom, row_weight = _axis_taps(values.shape[-2], height, box_top, box_height)
    left, right, column_weight = _axis_taps(values.shape[-1], width, box_left, box_width)
    row_weight = row_weight[:, None]
    rows = values[..., top, :] * (1.0 - row_weight) + values[..., bottom, :] * row_weight
    # the full-size pass in place: the same products and sum, half the time of a 600x400 overlay's map
    out = rows[..., left]
    out *= 1.0 - column_weight
    far = rows[..., right]
    far *= column_weight
    out += far
    return out.astype(np.float32)


def footprint_mask(size: tuple[int, int], footprint: tuple[float, float, float, float]) -> np.ndarray:
    """(H, W) bool: the pixels of an image of ``size`` whose centres lie in ``footprint`` =
    (top, left, height, width), the part of the image the model saw."""
    box_top, box_left, box_height, box_width = footprint
    rows = np.arange(size[0]) + 0.5
    columns = np.arange(size[1]) + 0.5
    inside_rows = (rows >= box_top) & (rows < box_top + box_height)
    inside_columns = (columns >= box_left) & (columns < box_left + box_width)
    return inside_rows[:, None] & inside_columns[None, :]


def normalize(maps: np.ndarray) -> np.ndarray:
    """Min-max each (h,w) map to [0, 1]; a constant map (a flat CAM) becomes all zeros, not NaN."""
    values = np.array(maps, dtype=np.float64)  # a copy, worked in place
    if values.ndim < 2:
        raise ValueError(f"maps must have shape (h, w) or (N, h, w), got {values.shape}")
    low = values.min(axis=(-2, -1), keepdims=True)
    spread = values.max(axis=(-2, -1), keepdims=True) - low
    values -= low
    varies = spread > 0
    np.divide(values, spread, out=values, where=varies)
    if not varies.all():  # constant, or NaN/inf in the map
        values[np.broadcast_to(~varies, values.shape)] = 0.0
    return values.astype(np.float32)
