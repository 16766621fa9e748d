"""Gradient moments D1, D2, D3 (means of g, g^2, g^3 per image) over noisy samples.

Smooth Grad-CAM++ needs only these running means, so the noisy batch can be fed chunk by chunk
and memory stays bounded by one chunk, not by the number of samples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .formulas import plusplus_map, plusplus_weights_single, weighted_map
from .options import PlusPlusSettings, check_feature_maps_in_range
from .workspace import WORKSPACE


def _as_4d(name: str, values: np.ndarray, dtype=np.float64) -> np.ndarray:
    """``values`` as a (B, K, h, w) array of ``dtype`` (None: its own dtype, no copy)."""
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 4:
        raise ValueError(f"{name} must have shape (B, K, h, w), got {array.shape}")
    return array


@dataclass(frozen=True)
class GradientMoments:
    """Per-image means over samples: d1 = mean g, d2 = mean g^2, d3 = mean g^3, each (N,K,h,w).

    mean_map (N,h,w) is the mean of per-sample Grad-CAM++ maps ('maps' averaging), else None;
    map_settings records the Grad-CAM++ choices those per-sample maps were made with.
    """

    d1: np.ndarray
    d2: np.ndarray
    d3: np.ndarray
    count: np.ndarray
    mean_map: np.ndarray | None = None
    map_settings: PlusPlusSettings | None = None

    @classmethod
    def from_gradients(cls, gradients: np.ndarray) -> "GradientMoments":
        """Moments of a single sample per image (no noise): d1 = g, d2 = g^2, d3 = g^3, each
        made in float64 only when a method reads it (Grad-CAM reads d1 alone; on a GPU, squaring
        and cubing 25 ResNet-50 gradients in float64 cost several times the forward pass), and
        for the images ``rows`` picks only."""
        return _SingleSample(_as_4d("gradients", gradients, dtype=None))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.d1.shape

    @property
    def single_sample(self) -> np.ndarray | None:
        """The gradients themselves when these are the moments of one sample per image (then a
        method may use a simpler form), else None."""
        return None

    def rows(self, start: int, stop: int) -> "GradientMoments":
        """The moments of images ``start:stop`` (views)."""
        mean_map = None if self.mean_map is None else self.mean_map[start:stop]
        return GradientMoments(d1=self.d1[start:stop], d2=self.d2[start:stop], d3=self.d3[start:stop],
                               count=self.count[start:stop], mean_map=mean_map, map_settings=self.map_settings)


class _SingleSample(GradientMoments):
    """One sample per image: d1 = g in float64, d2 = d1^2 and d3 = d1^3, made on first use."""

    def __init__(self, gradients: np.ndarray) -> None:
        for name, value in (("gradients", gradients), ("count", np.ones(len(gradients), dtype=np.int64)),
                            ("mean_map", None), ("map_settings", None)):
            object.__setattr__(self, name, value)  # frozen: set once, as the dataclass would

    @functools.cached_property
    def d1(self) -> np.ndarray:
        return np.asarray(self.gradients, dtype=np.float64)

    @functools.cached_property
    def d2(self) -> np.ndarray:
        return self.d1 * self.d1

    @functools.cached_property
    def d3(self) -> np.ndarray:
        return self.d2 * self.d1

    @property
    def shape(self) -> tuple[int, ...]:
        return self.gradients.shape

    @property
    def single_sample(self) -> np.ndarray:
        return self.gradients

    def rows(self, start: int, stop: int) -> GradientMoments:
        return _SingleSample(self.gradients[start:stop])


class _MapsOnly(GradientMoments):
    """The mean of per-sample maps alone ('maps' averaging without its moments): d1, d2, d3 are
    None, and ``shape`` is the samples' (N, K, h, w)."""

    def __init__(self, count: np.ndarray, mean_map: np.ndarray, map_settings: PlusPlusSettings,
                 shape: tuple[int, ...]) -> None:
        for name, value in (("d1", None), ("d2", None), ("d3", None), ("count", count), ("mean_map", mean_map),
                            ("map_settings", map_settings), ("_shape", tuple(shape))):
            object.__setattr__(self, name, value)  # frozen: set once, as the dataclass would

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def rows(self, start: int, stop: int) -> GradientMoments:
        count = self.count[start:stop]
        return _MapsOnly(count, self.mean_map[start:stop], self.map_settings, (len(count), *self._shape[1:]))


class MomentAccumulator:
    """Running means of g, g^2, g^3 per image over noisy samples, fed chunk by chunk,
    so memory is bounded by a chunk, not by the number of samples.

    With keep_maps it also averages each sample's own Grad-CAM++ map (made from that sample's
    activation and gradient with ``denominator``, ``numerator`` and ``feature_maps``): the 'maps'
    variant of Smooth Grad-CAM++, which cannot be rebuilt from the moments afterwards.
    Sums are kept in float64 and divided once in result(), or in place by ``finish()``; their
    buffers come from the calculator's workspace, and ``release()`` hands them back.
    ``moments=False`` (with keep_maps) keeps the mean map alone: the 'maps' method reads nothing
    else, and the float64 powers and sums were half of ``add()``'s time (28 MobileNetV2 samples:
    6 of 13.9 ms).
    """

    def __init__(self, n_images: int, keep_maps: bool = False, denominator: str = "sum", *,
                 numerator: str = "D2", feature_maps: Sequence[int] | None = None, moments: bool = True) -> None:
        if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
            raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
        self.n_images = int(n_images)
        self.keep_maps = bool(keep_maps)
        if not moments and not self.keep_maps:
            raise ValueError("moments=False keeps nothing without keep_maps")
        self.moments = bool(moments)
        self._sample_shape: tuple[int, ...] | None = None
        self.settings = PlusPlusSettings.checked(numerator, denominator, feature_maps)
        self._count = np.zeros(self.n_images, dtype=np.int64)
        self._sums: np.ndarray | None = None      # (3, N, K, h, w): sums of g, g^2, g^3
        self._map_sum: np.ndarray | None = None   # (N, h, w) when keep_maps
        self._work: np.ndarray | None = None      # (3, B, K, h, w) scratch for g, g^2, g^3
        self._state = "open"                      # then "finished" (means in _sums), "released"

    def add(self, rows: np.ndarray, gradients: np.ndarray, activations: np.ndarray | None = None) -> None:
        """Add B samples, in order: rows (B,) names each sample's image; gradients and activations
        (B,K,h,w).

        activations (of the noisy samples themselves) are needed only with keep_maps.
        """
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise ValueError(f"rows must be a 1-D integer array, got dtype {rows.dtype} shape {rows.shape}")
        g = np.asarray(gradients)
        if g.ndim != 4:
            raise ValueError(f"gradients must have shape (B, K, h, w), got {g.shape}")
        if len(g) != len(rows):
            raise ValueError(f"rows has {len(rows)} entries but gradients has {len(g)} samples")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_images):
            raise ValueError(f"rows must lie in 0..{self.n_images - 1}, got {rows.min()}..{rows.max()}")
        if self.keep_maps:
            if activations is None:
                raise ValueError("keep_maps needs the noisy samples' activations in add()")
            activations = _as_4d("activations", activations)
            if activations.shape != g.shape:
                raise ValueError(f"activations {activations.shape} and gradients {g.shape} differ in shape")
        self._allocate(g.shape[1:])
        if not rows.size:
            return
        if not self.moments:
            self._add_maps(rows, self._sample_maps_of(activations, g))
            return
        powers = self._powers(g)
        sample_maps = self._sample_maps(activations, *powers) if self.keep_maps else None
        # one sample after another, in order: the float64 sums then do not depend on how the
        # samples were cut into chunks (bit-identical maps for any batch size). A chunk's samples
        # of one image are contiguous; add.reduce along the first axis is the same left fold
        # as adding them one by one, from the running sum on.
        rows_list = rows.tolist()
        started = set(np.flatnonzero(self._count).tolist())  # images whose sums hold samples
        start = 0
        while start < len(rows_list):
            row = rows_list[start]
            stop = start + 1
            while stop < len(rows_list) and rows_list[stop] == row:
                stop += 1
            block = powers[:, start:stop]
            if row in started:  # else its sums start here (the buffer holds old values)
                block[:, 0] += self._sums[:, row]
            started.add(row)
            np.add.reduce(block, axis=1, out=self._sums[:, row])
            if sample_maps is not None:
                for i in range(start, stop):
                    self._map_sum[row] += sample_maps[i]
            start = stop
        self._count += np.bincount(rows, minlength=self.n_images)

    def _add_maps(self, rows: np.ndarray, sample_maps: np.ndarray) -> None:
        """Each sample's map onto its image's sum, one after another (as ``add`` orders them)."""
        for i, row in enumerate(rows.tolist()):
            self._map_sum[row] += sample_maps[i]
        self._count += np.bincount(rows, minlength=self.n_images)

    def _sample_maps_of(self, activations: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Per-sample maps without the moments: the powers only where the general form needs them."""
        if self.settings.denominator == "sum":
            return self._sample_maps(activations, np.asarray(g, dtype=np.float64), None, None)
        return self._sample_maps(activations, *self._powers(g))

    def add_sums(self, row: int, count: int, sum_g: np.ndarray, sum_g2: np.ndarray, sum_g3: np.ndarray) -> None:
        """Add ``count`` samples of image ``row`` given as their sums of g, g^2 and g^3, each
        (K,h,w) or (1,K,h,w): the sums a device made itself (``onnxcam.graph.noisy``), so only
        they cross the bus. Not with keep_maps, whose per-sample maps need each sample."""
        if self.keep_maps:
            raise ValueError("keep_maps needs every sample's activation and gradient: use add()")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        if not 0 <= row < self.n_images:
            raise ValueError(f"row must lie in 0..{self.n_images - 1}, got {row}")
        sums = [np.asarray(s) for s in (sum_g, sum_g2, sum_g3)]
        sums = [s[0] if s.ndim == 4 and len(s) == 1 else s for s in sums]
        if any(s.ndim != 3 or s.shape != sums[0].shape for s in sums):
            raise ValueError(f"sums must all have shape (K,h,w), got {[s.shape for s in sums]}")
        self._allocate(sums[0].shape)
        for k, values in enumerate(sums):  # float32 widened on the way in: no float64 copies
            if self._count[row]:
                np.add(self._sums[k, row], values, out=self._sums[k, row], casting="safe")
            else:  # the image's first sums: copied, as 0 + sums would be, without the add
                np.copyto(self._sums[k, row], values, casting="safe")
        self._count[row] += int(count)

    def result(self) -> GradientMoments:
        """The means so far (new arrays); every image must have at least one sample."""
        self._check_open()
        if not self.moments:
            return self._maps_only()
        return self._means(self._sums * self._reciprocal_counts())

    def finish(self) -> GradientMoments:
        """The means, divided in place in the sums' buffer (the same values as ``result()``,
        with no new arrays): the accumulator then takes no more samples. Call ``release()`` once
        the moments are no longer read."""
        self._check_open()
        if not self.moments:
            self._state = "finished"
            return self._maps_only()
        np.multiply(self._sums, self._reciprocal_counts(), out=self._sums)
        self._state = "finished"
        return self._means(self._sums)

    def _maps_only(self) -> GradientMoments:
        mean_map = self._map_sum / self._per_image()[:, None, None]
        return _MapsOnly(self._count.copy(), mean_map, self.settings, (self.n_images, *self._sample_shape))

    def release(self) -> None:
        """Hand the buffers back to the workspace (the moments of ``finish()`` with them): the
        accumulator and those moments must not be used afterwards."""
        WORKSPACE.give(self._sums, self._work)
        self._sums = self._work = None
        self._state = "released"

    def _per_image(self) -> np.ndarray:
        missing = np.flatnonzero(self._count == 0)
        if self._sample_shape is None or missing.size:
            raise ValueError(f"no samples were added for image(s) {missing.tolist()}")
        return self._count.astype(np.float64)

    def _reciprocal_counts(self) -> np.ndarray:
        """1 / samples per image, shaped to scale the (3, N, K, h, w) sums: a product is a
        third of a division's time (3x2048x7x7: 55 against 150 us on the CPU machine)."""
        return (1.0 / self._per_image())[None, :, None, None, None]

    def _means(self, means: np.ndarray) -> GradientMoments:
        d1, d2, d3 = means
        mean_map = self._map_sum / self._per_image()[:, None, None] if self.keep_maps else None
        return GradientMoments(d1=d1, d2=d2, d3=d3, count=self._count.copy(), mean_map=mean_map,
                               map_settings=self.settings if self.keep_maps else None)

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"this accumulator is {self._state}: it takes no more samples and gives no more "
                             "results (make a new one)")

    def _allocate(self, sample_shape: tuple[int, ...]) -> None:
        self._check_open()
        if self._sample_shape is None:
            check_feature_maps_in_range(self.settings.feature_maps, sample_shape[0])
            self._sample_shape = tuple(sample_shape)
            if self.moments:
                # not zeroed: an image's first samples are written, not added (add, add_sums),
                # and an image with none is refused before its sums are read (_per_image)
                self._sums = WORKSPACE.take((3, self.n_images) + tuple(sample_shape))
            if self.keep_maps:
                self._map_sum = np.zeros((self.n_images,) + tuple(sample_shape[1:]))
        elif self._sample_shape != tuple(sample_shape):
            raise ValueError(
                f"gradients of shape (K,h,w)={tuple(sample_shape)} differ from earlier chunks "
                f"{self._sample_shape}"
            )

    def _powers(self, gradients: np.ndarray) -> np.ndarray:
        """(3, B, K, h, w): g, g^2, g^3 in float64, in a buffer kept between chunks (fresh
        arrays of this size cost more to allocate and fault in than to fill)."""
        shape = (3, *gradients.shape)
        if self._work is None or self._work.shape[1] < shape[1] or self._work.shape[2:] != shape[2:]:
            WORKSPACE.give(self._work)
            self._work = WORKSPACE.take(shape)
        powers = self._work[:, :len(gradients)]
        np.copyto(powers[0], gradients)
        np.multiply(powers[0], powers[0], out=powers[1])
        np.multiply(powers[1], powers[0], out=powers[2])
        return powers

    def _sample_maps(self, activations, g, g2, g3) -> np.ndarray:
        settings = self.settings
        if settings.denominator == "sum":  # each sample's own map: the single-sample form
            weights = plusplus_weights_single(activations, g, settings.numerator)
            return weighted_map(weights, activations, settings.feature_maps)
        maps, _ = plusplus_map(activations, g, g2, g3, settings.numerator, settings.denominator,
                               settings.feature_maps)
        return maps
