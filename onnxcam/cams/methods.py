"""The CAM methods of docs/method.md as small classes, and the registry that names them.

Every method maps (clean activation, gradient moments) to a map at target-layer resolution.
Non-smooth methods read d1 (and d2, d3 for Grad-CAM++) of the moments they are given, so the
explainer can feed single-sample moments to all of them and averaged ones to Smooth Grad-CAM++.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from ..errors import OptionError
from . import formulas
from .moments import GradientMoments, MomentAccumulator
from .options import (AVERAGINGS, DENOMINATORS, NUMERATORS, PlusPlusSettings,
                      check_feature_maps, check_feature_maps_in_range, choose_option)


@dataclass(frozen=True)
class CamResult:
    """maps (N,h,w) float32 >= 0, not normalised; weights (N,K) float64 over all channels
    (feature_maps restricts only the final sum) or None; flat (N,) True where a map is all zero."""

    maps: np.ndarray
    weights: np.ndarray | None
    flat: np.ndarray


#: float64 bytes of one work array in ``CamMethod.compute``: images are computed this many at a time.
CHUNK_MEMORY = 4 * 2**20


class CamMethod:
    """Base class: option checking, shape checks and the feature-map restriction."""

    name: ClassVar[str] = ""
    needs_noise: ClassVar[bool] = False
    # option name -> allowed values, the first being the default
    allowed_options: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, feature_maps: Sequence[int] | None = None, **options: object) -> None:
        unknown = sorted(set(options) - set(self.allowed_options))
        if unknown:
            known = ", ".join(["feature_maps", *self.allowed_options])
            raise OptionError(f"{self.name} has no option {unknown[0]!r}: use only {known}")
        self.feature_maps = check_feature_maps(feature_maps)
        self.options = {
            option: choose_option(option, options.get(option, allowed[0]), allowed)
            for option, allowed in self.allowed_options.items()
        }
        for option, value in self.options.items():  # read as method.denominator, method.averaging
            setattr(self, option, value)

    def __repr__(self) -> str:
        settings = [f"{key}={value!r}" for key, value in self.options.items()]
        if self.feature_maps is not None:
            settings.append(f"feature_maps={list(self.feature_maps)}")
        return f"{type(self).__name__}({', '.join(settings)})"

    def new_accumulator(self, n_images: int) -> MomentAccumulator:
        """An accumulator that keeps what this method needs from noisy samples."""
        return MomentAccumulator(n_images)

    def compute(self, activation: np.ndarray, moments: GradientMoments) -> CamResult:
        """The maps for the clean ``activation`` (N,K,h,w) and the gradient ``moments``, a few
        images at a time (``CHUNK_MEMORY``): every formula is per image, and the float64 work
        arrays of a few images stay in the caches and the workspace instead of being faulted in
        whole (25 ResNet-50 maps on this project's CPU, scripts/bench_host_work.py: Grad-CAM 28 ->
        15 ms, Grad-CAM++ 67 -> 51 ms; the same maps bit for bit)."""
        activation = np.asarray(activation)
        if activation.ndim != 4 or activation.shape != moments.shape:
            raise ValueError(
                f"activation {activation.shape} must be (N,K,h,w) and match the moments {moments.shape}"
            )
        check_feature_maps_in_range(self.feature_maps, activation.shape[1])
        count = len(activation)
        step = max(1, CHUNK_MEMORY // max(8 * int(np.prod(activation.shape[1:])), 1))
        maps = np.empty((count, *activation.shape[2:]), dtype=np.float32)
        weights = None
        for start in range(0, max(count, 1), step):  # one empty chunk when there are no images
            stop = min(count, start + step)
            part_maps, part_weights = self._maps_and_weights(
                np.asarray(activation[start:stop], dtype=np.float64), moments.rows(start, stop))
            maps[start:stop] = part_maps
            if part_weights is not None:
                if weights is None:
                    weights = np.empty((count, *part_weights.shape[1:]), dtype=part_weights.dtype)
                weights[start:stop] = part_weights
        return CamResult(maps=maps, weights=weights, flat=~maps.reshape(len(maps), -1).any(axis=1))

    def _maps_and_weights(self, activation: np.ndarray, moments: GradientMoments):
        raise NotImplementedError


class GradCAM(CamMethod):
    """Grad-CAM: w_k = mean_ij g_kij, L = ReLU(sum_k w_k A^k)."""

    name = "gradcam"

    def _maps_and_weights(self, activation, moments):
        weights = formulas.gradcam_weights(moments.d1)
        return formulas.weighted_map(weights, activation, self.feature_maps), weights


class GradCAMPlusPlus(CamMethod):
    """Grad-CAM++ with e^S dropped (it cancels in alpha); denominator 'sum' (eq. 19) or 'weighted'."""

    name = "gradcampp"
    allowed_options = {"denominator": DENOMINATORS}
    denominator: str
    numerator: str = "D2"  # fixed here; an option of Smooth Grad-CAM++

    def _maps_and_weights(self, activation, moments):
        gradient = moments.single_sample
        if gradient is not None and self.denominator == "sum":  # one sample: no g^2, g^3 arrays
            weights = formulas.plusplus_weights_single(activation, gradient, self.numerator)
            return formulas.weighted_map(weights, activation, self.feature_maps), weights
        return formulas.plusplus_map(activation, moments.d1, moments.d2, moments.d3,
                                     self.numerator, self.denominator, self.feature_maps)


class SmoothGradCAMPlusPlus(GradCAMPlusPlus):
    """Smooth Grad-CAM++: Grad-CAM++ on moments averaged over noisy inputs ('moments'),
    or the mean of the noisy samples' own Grad-CAM++ maps ('maps')."""

    name = "smoothgradcampp"
    needs_noise = True
    allowed_options = {"numerator": NUMERATORS, "averaging": AVERAGINGS, "denominator": DENOMINATORS}
    averaging: str

    @property
    def map_settings(self) -> PlusPlusSettings:
        return PlusPlusSettings(self.numerator, self.denominator, self.feature_maps)

    def new_accumulator(self, n_images: int) -> MomentAccumulator:
        maps = self.averaging == "maps"  # the mean map alone: its moments are never read
        return MomentAccumulator(n_images, keep_maps=maps, moments=not maps,
                                 denominator=self.denominator, numerator=self.numerator,
                                 feature_maps=self.feature_maps)

    def _maps_and_weights(self, activation, moments):
        if self.averaging == "moments":
            return super()._maps_and_weights(activation, moments)
        if moments.mean_map is None or moments.map_settings != self.map_settings:
            raise ValueError(
                f"averaging='maps' needs moments whose mean_map was made with {self.map_settings}; "
                f"got {moments.map_settings}: build the accumulator with method.new_accumulator(n)"
            )
        # each per-sample map is already ReLU'd, so their mean is >= 0; no single weight vector
        return formulas.relu(np.asarray(moments.mean_map, dtype=np.float64)), None


class XGradCAM(CamMethod):
    """XGrad-CAM: w_k = sum_ij (A_kij / sum_ab A_kab) g_kij (0 where the channel sums to 0)."""

    name = "xgradcam"

    def _maps_and_weights(self, activation, moments):
        weights = formulas.xgradcam_weights(activation, moments.d1)
        return formulas.weighted_map(weights, activation, self.feature_maps), weights


class LayerCAM(CamMethod):
    """LayerCAM: L = ReLU(sum_k ReLU(g_k) * A^k), a per-location weight, so no channel weights."""

    name = "layercam"

    def _maps_and_weights(self, activation, moments):
        return formulas.location_map(formulas.relu(moments.d1) * activation, self.feature_maps), None


class HiResCAM(CamMethod):
    """HiResCAM: L = ReLU(sum_k g_k * A^k), a per-location weight, so no channel weights."""

    name = "hirescam"

    def _maps_and_weights(self, activation, moments):
        return formulas.location_map(moments.d1 * activation, self.feature_maps), None


METHODS: dict[str, type[CamMethod]] = {
    method.name: method
    for method in (GradCAM, GradCAMPlusPlus, SmoothGradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM)
}


def canonical_method_name(name: str) -> str:
    """Map friendly spellings ('Grad-CAM++', 'smooth_grad_cam++') onto registry names."""
    if not isinstance(name, str):
        raise OptionError(f"method {name!r} is not a name: choose one of {', '.join(METHODS)}")
    key = name.strip().lower().replace("++", "pp")
    for separator in "-_ ":
        key = key.replace(separator, "")
    if key not in METHODS:
        raise OptionError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return key


def get_method(name: str, **options: object) -> CamMethod:
    """Build a method by (friendly) name; options as the class accepts, e.g. feature_maps."""
    return METHODS[canonical_method_name(name)](**options)
