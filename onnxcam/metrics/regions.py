"""Ground-truth regions for the localization metrics: boxes, masks and the manifest of a data set.

Conventions (used by every metric in :mod:`onnxcam.metrics.localization`):

- A **box** is ``(x0, y0, x1, y1)`` in pixel-edge coordinates of the image the map covers: the
  image spans ``[0, W] x [0, H]``, ``x`` is the column axis and ``y`` the row axis. Pixel
  ``(row r, column c)`` belongs to the box when its centre ``(c + 0.5, r + 0.5)`` lies in
  ``[x0, x1] x [y0, y1]``. For integer boxes this is exactly the slice ``[y0:y1, x0:x1]`` (``x1`` and
  ``y1`` exclusive), which is how the localization manifest stores tight boxes.
- A **mask** is a boolean ``(H, W)`` array, True inside the region.
- The **region of one image** is given as boxes (an ``(K, 4)`` array-like, or a single box of 4
  numbers), or as a mask, or as ``(K, H, W)`` boolean instance masks. Several boxes or masks form
  their union where a metric needs one region.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from onnxcam.errors import DataError, OptionError

__all__ = [
    "LocalizationItem",
    "LocalizationSet",
    "box_mask",
    "instance_masks",
    "load_manifest",
    "region_mask",
    "scale_boxes",
]


def _as_boxes(boxes: Any, what: str) -> np.ndarray:
    """``(K, 4)`` float64 boxes, validated (finite, x0 <= x1, y0 <= y1)."""
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what}: boxes must be numbers [x0, y0, x1, y1]") from None
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None, :]
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise DataError(f"{what}: boxes must have shape (K, 4) as [x0, y0, x1, y1], got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{what}: a box coordinate is not finite")
    if np.any(arr[:, 2] < arr[:, 0]) or np.any(arr[:, 3] < arr[:, 1]):
        raise DataError(f"{what}: a box has x1 < x0 or y1 < y0 (expected [x0, y0, x1, y1])")
    return arr


def box_mask(boxes: Any, height: int, width: int, what: str = "boxes") -> np.ndarray:
    """Boolean ``(K, H, W)`` masks, one per box: the pixels whose centre lies inside the box."""
    arr = _as_boxes(boxes, what)
    cols = np.arange(width, dtype=np.float64) + 0.5
    rows = np.arange(height, dtype=np.float64) + 0.5
    in_x = (cols[None, :] >= arr[:, 0:1]) & (cols[None, :] <= arr[:, 2:3])  # (K, W)
    in_y = (rows[None, :] >= arr[:, 1:2]) & (rows[None, :] <= arr[:, 3:4])  # (K, H)
    return in_y[:, :, None] & in_x[:, None, :]


def _is_mask_like(region: Any, height: int, width: int) -> bool:
    arr = np.asarray(region)
    return arr.dtype == np.bool_ and arr.ndim in (2, 3) and arr.shape[-2:] == (height, width)


def instance_masks(region: Any, height: int, width: int, what: str = "region") -> np.ndarray:
    """The instances of one image's region as boolean ``(K, H, W)`` masks.

    ``region`` is boxes (``(K, 4)`` or one box), a boolean ``(H, W)`` mask (one instance) or
    boolean ``(K, H, W)`` instance masks.
    """
    if isinstance(region, np.ndarray) and region.dtype == np.bool_:
        if region.ndim == 2 and region.shape == (height, width):
            return region[None, :, :]
        if region.ndim == 3 and region.shape[1:] == (height, width):
            return region
        raise DataError(
            f"{what}: a mask must have shape ({height}, {width}) or (K, {height}, {width}), "
            f"got {region.shape}"
        )
    if _is_mask_like(region, height, width):
        return instance_masks(np.asarray(region), height, width, what)
    return box_mask(region, height, width, what)


def region_mask(region: Any, height: int, width: int, what: str = "region") -> np.ndarray:
    """The union of one image's boxes or masks as one boolean ``(H, W)`` mask."""
    return instance_masks(region, height, width, what).any(axis=0)


def scale_boxes(boxes: Any, from_size: tuple[int, int], to_size: tuple[int, int],
                footprint: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Rescale ``(K, 4)`` boxes from an image of ``(H, W)`` = ``from_size`` to ``to_size``.

    Use it when the model input (and so the map) has another size than the annotated image.
    ``footprint`` = (top, left, height, width) is the image rectangle the model input covers (a
    centre crop, or padding beyond the image); the boxes are then clipped to the model input, and
    a box the crop leaves out becomes empty.
    """
    arr = _as_boxes(boxes, "boxes")
    fh, fw = from_size
    th, tw = to_size
    if min(fh, fw, th, tw) <= 0:
        raise DataError(f"scale_boxes: sizes must be positive, got {from_size} -> {to_size}")
    if footprint is None:
        scale = np.array([tw / fw, th / fh, tw / fw, th / fh], dtype=np.float64)
        return arr * scale
    top, left, height, width = footprint
    shifted = (arr - np.array([left, top, left, top])) * np.array([tw / width, th / height] * 2)
    return np.clip(shifted, 0.0, np.array([tw, th, tw, th], dtype=np.float64))


# ----------------------------------------------------------------------------------------------
# The localization manifest (models/localization/manifest.json)


@dataclass(frozen=True)
class LocalizationItem:
    """One annotated image: its file, class and the boxes of the instances of that class."""

    image: Path
    label: int
    label_name: str
    boxes: np.ndarray  # (K, 4) float64, [x0, y0, x1, y1], x1/y1 exclusive for integer boxes


@dataclass(frozen=True)
class LocalizationSet:
    """A data set for the localization metrics, read from a ``manifest.json``."""

    root: Path
    classes: list[str]
    items: list[LocalizationItem]

    def __len__(self) -> int:
        return len(self.items)


def load_manifest(path: str | Path) -> LocalizationSet:
    """Read and validate a localization manifest.

    The file is JSON: ``{"classes": [names...], "images": [{"image": "0001.png", "label": 0,
    "label_name": "circle", "boxes": [[x0, y0, x1, y1], ...]}, ...]}``. Image paths are relative to
    the manifest's folder. ``path`` may be the manifest itself or its folder. Raises
    :class:`~onnxcam.errors.DataError` (one line naming the entry at fault) when it is malformed.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{p}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot read the manifest ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{p}: the manifest must be a JSON object with 'classes' and 'images'")
    classes = raw.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{p}: 'classes' must be a non-empty list of class names")
    entries = raw.get("images")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{p}: 'images' must be a non-empty list of entries")
    items: list[LocalizationItem] = []
    for i, entry in enumerate(entries):
        where = f"{p}: images[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where} must be an object")
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: 'image' must be a file name")
        where = f"{p}: images[{i}] ({image})"
        label = entry.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(classes):
            raise DataError(f"{where}: 'label' must be an integer in [0, {len(classes)})")
        name = entry.get("label_name", classes[label])
        if name != classes[label]:
            raise DataError(f"{where}: 'label_name' {name!r} is not classes[{label}] = {classes[label]!r}")
        boxes_raw = entry.get("boxes")
        if not isinstance(boxes_raw, list) or not boxes_raw:
            raise DataError(f"{where}: 'boxes' must be a non-empty list of [x0, y0, x1, y1]")
        if not all(
            isinstance(b, list)
            and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
            for b in boxes_raw
        ):
            raise DataError(f"{where}: each box must be 4 numbers [x0, y0, x1, y1]")
        boxes = _as_boxes(boxes_raw, where)
        items.append(LocalizationItem(p.parent / image, label, classes[label], boxes))
    return LocalizationSet(p.parent, list(classes), items)


def _check_regions(regions: Sequence[Any], n: int, what: str = "regions") -> None:
    try:
        count = len(regions)
    except TypeError:
        raise DataError(f"{what}: expected one region (boxes or mask) per map") from None
    if count != n:
        raise DataError(f"{what}: {count} regions for {n} maps (expected one per map)")


def check_maps(maps: Any, what: str = "maps") -> np.ndarray:
    """A batch of real, finite maps (N, H, W) as float64, or a one-line DataError."""
    arr = np.asarray(maps)
    if arr.ndim != 3:
        raise DataError(f"{what}: expected a batch of maps of shape (N, H, W), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{what}: the batch is empty")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataError(f"{what}: maps of shape {arr.shape[1:]} have no pixels")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise DataError(f"{what}: expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = int(np.argwhere(~np.isfinite(arr))[0, 0])
        raise DataError(f"{what}[{bad}] contains NaN or infinity")
    return arr


def check_pixels(value: Any, name: str) -> float:
    """A finite number of pixels >= 0 (a tolerance, a blur sigma), or a one-line OptionError."""
    try:
        pixels = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name}: expected a number of pixels, got {value!r}") from None
    if not np.isfinite(pixels) or pixels < 0:
        raise OptionError(f"{name}: expected a number of pixels >= 0, got {value!r}")
    return pixels
