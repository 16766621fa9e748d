"""Localization metrics: pointing game, energy-based pointing game and instance coverage.

All take a batch of maps ``(N, H, W)`` (the CAMs, upsampled to the image the regions are given
in) and one region per map; see :mod:`onnxcam.metrics.regions` for the box and mask conventions.
They need no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from onnxcam.errors import DataError, OptionError
from onnxcam.metrics.regions import _check_regions, check_maps, check_pixels, instance_masks, region_mask

__all__ = [
    "EnergyPointingResult",
    "InstanceCoverageResult",
    "PointingGameResult",
    "energy_pointing_game",
    "instance_coverage",
    "pointing_game",
]


# ----------------------------------------------------------------------------------------------
# Pointing game


@dataclass(frozen=True)
class PointingGameResult:
    """Pointing game outcome.

    ``hit[i]`` says whether map i pointed at its region; ``points[i]`` is the ``(row, col)`` of the
    pixel it pointed with (``(-1, -1)`` for a flat map, which never hits).
    """

    hits: int
    misses: int
    accuracy: float
    hit: np.ndarray  # (N,) bool
    points: np.ndarray  # (N, 2) int64, (row, col)
    flat: np.ndarray  # (N,) bool: maps with no maximum (max == min, e.g. all zeros)


def pointing_game(maps: Any, regions: Sequence[Any], tolerance: float = 15) -> PointingGameResult:
    """Pointing game (Zhang et al. 2016).

    Each map points with its **argmax**: the first maximum in row-major order (``np.argmax`` of the
    flattened map), so ties go to the top-most, then left-most, pixel. It is a **hit** when that
    pixel's centre is within ``tolerance`` pixels (Euclidean distance, inclusive) of the centre of a
    pixel of the region (the union of the image's boxes or masks; see
    :mod:`onnxcam.metrics.regions`); equivalently, when it lies in the region dilated by a disc of
    radius ``tolerance``. ``tolerance=0`` asks for the pixel to be inside the region. A **flat** map
    (max == min, for example all zeros) has no maximum to point with and counts as a miss.

    accuracy = hits / (hits + misses).
    """
    arr = check_maps(maps)
    n, h, w = arr.shape
    _check_regions(regions, n)
    tol = check_pixels(tolerance, "tolerance")
    flat_maps = arr.reshape(n, -1)
    idx = np.argmax(flat_maps, axis=1)
    flat = flat_maps.max(axis=1) == flat_maps.min(axis=1)
    rows, cols = np.divmod(idx, w)
    hit = np.zeros(n, dtype=bool)
    for i in range(n):
        mask = region_mask(regions[i], h, w, what=f"regions[{i}]")  # validated even for flat maps
        if flat[i]:
            continue
        rr, cc = np.nonzero(mask)
        if rr.size == 0:
            continue
        d2 = (rr - rows[i]) ** 2 + (cc - cols[i]) ** 2
        hit[i] = bool(d2.min() <= tol * tol)
    points = np.stack([rows, cols], axis=1).astype(np.int64)
    points[flat] = -1
    hits = int(hit.sum())
    return PointingGameResult(hits, n - hits, hits / n, hit, points, flat)


# ----------------------------------------------------------------------------------------------
# Energy-based pointing game


@dataclass(frozen=True)
class EnergyPointingResult:
    """Per-image share of the map's energy inside the region, and their mean."""

    shares: np.ndarray  # (N,) float64 in [0, 1]
    mean: float


def energy_pointing_game(maps: Any, regions: Sequence[Any]) -> EnergyPointingResult:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM).

    share_i = sum(map_i inside the region) / sum(map_i), with the region the union of the image's
    boxes or masks. Maps must be non-negative (CAMs after ReLU). A map whose total is 0 gets a
    share of 0, never NaN. ``mean`` is the mean of the shares.
    """
    arr = check_maps(maps)
    n, h, w = arr.shape
    _check_regions(regions, n)
    if np.any(arr < 0):
        bad = int(np.argwhere(arr < 0)[0, 0])
        raise DataError(f"maps[{bad}] has negative values; the energy pointing game needs maps >= 0")
    shares = np.zeros(n, dtype=np.float64)
    for i in range(n):
        mask = region_mask(regions[i], h, w, what=f"regions[{i}]")
        total = arr[i].sum()
        if total <= 0:
            continue
        shares[i] = min(1.0, float(arr[i][mask].sum() / total))
    return EnergyPointingResult(shares, float(shares.mean()))


# ----------------------------------------------------------------------------------------------
# Instance coverage ("multiple occurrences")


@dataclass(frozen=True)
class InstanceCoverageResult:
    """Instance coverage.

    Per image: ``instances[i]`` boxes, of which ``covered[i]`` are covered; ``shares[i]`` =
    covered / instances (0 for an image with no boxes). ``selected[i]`` says whether image i has at
    least ``min_instances`` instances and so enters the aggregates: ``share`` (all covered
    instances / all instances over the selected images) and ``mean_share`` (mean of the selected
    images' shares), both None when no image is selected; ``n_images`` selected images.
    """

    covered: np.ndarray  # (N,) int64
    instances: np.ndarray  # (N,) int64
    shares: np.ndarray  # (N,) float64
    selected: np.ndarray  # (N,) bool
    n_images: int
    share: float | None
    mean_share: float | None
    all_covered: float | None  # share of selected images whose every instance is covered


def instance_coverage(
    maps: Any,
    boxes_per_image: Sequence[Any],
    threshold: float = 0.5,
    min_instances: int = 2,
) -> InstanceCoverageResult:
    """Share of the target class's instances that the map covers (the paper's multiple occurrences).

    An instance (a box, or a mask from ``(K, H, W)`` instance masks) is **covered** when at least
    one pixel inside it has a map value ``>= threshold * max(map)``, with ``0 < threshold <= 1``. A
    map whose maximum is <= 0 (all zeros) covers nothing. Images with fewer than
    ``min_instances`` instances (default 2: the images with several instances of the class) are
    reported per image but left out of the aggregates; set ``min_instances=1`` to include all.
    """
    arr = check_maps(maps)
    n, h, w = arr.shape
    _check_regions(boxes_per_image, n, "boxes_per_image")
    try:
        thr = float(threshold)
    except (TypeError, ValueError):
        raise OptionError(f"threshold: expected a fraction of the map maximum, got {threshold!r}") from None
    if not (0 < thr <= 1):
        raise OptionError(f"threshold: expected a fraction of the map maximum in (0, 1], got {threshold!r}")
    if isinstance(min_instances, bool) or not isinstance(min_instances, (int, np.integer)) or min_instances < 1:
        raise OptionError(f"min_instances: expected an integer >= 1, got {min_instances!r}")
    covered = np.zeros(n, dtype=np.int64)
    instances = np.zeros(n, dtype=np.int64)
    for i in range(n):
        masks = instance_masks(boxes_per_image[i], h, w, what=f"boxes_per_image[{i}]")
        instances[i] = masks.shape[0]
        peak = arr[i].max()
        if peak <= 0 or masks.shape[0] == 0:
            continue
        hot = arr[i] >= thr * peak
        covered[i] = int(np.count_nonzero((masks & hot[None]).any(axis=(1, 2))))
    shares = np.divide(covered, instances, out=np.zeros(n, dtype=np.float64), where=instances > 0)
    selected = instances >= min_instances
    k = int(selected.sum())
    if k == 0:
        return InstanceCoverageResult(covered, instances, shares, selected, 0, None, None, None)
    share = float(covered[selected].sum() / instances[selected].sum())
    mean_share = float(shares[selected].mean())
    all_cov = float(np.mean(covered[selected] == instances[selected]))
    return InstanceCoverageResult(covered, instances, shares, selected, k, share, mean_share, all_cov)
