"""The formulas of docs/method.md as vectorised float64 NumPy, with no validation.

Shapes: activation and moments (N,K,h,w), weights (N,K), maps (N,h,w).
"""

from __future__ import annotations

import numpy as np

from .workspace import WORKSPACE


def spatial_sum(values: np.ndarray) -> np.ndarray:
    """sum_ij values_kij per image and channel: einsum's loop is 2-3x faster than ``sum`` over
    the two small trailing axes (2048x7x7: 16 against 51 us on the CPU machine)."""
    return np.einsum("nkhw->nk", values)


def spatial_dot(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """sum_ij left_kij * right_kij per image and channel, with no product array in between."""
    return np.einsum("nkhw,nkhw->nk", left, right)


def relu(values: np.ndarray) -> np.ndarray:
    """ReLU that yields +0.0, never -0.0 (adding 0.0 guarantees it), so a flat map is exactly zero."""
    return np.maximum(values, 0.0) + 0.0


def plusplus_weights(activation: np.ndarray, d1: np.ndarray, d2: np.ndarray, d3: np.ndarray,
                     numerator: str = "D2", denominator: str = "sum") -> np.ndarray:
    """Grad-CAM++ channel weights w_k = sum_ij alpha_kij * ReLU(D1_kij).

    alpha = top / (2*D2 + third) with top = D2 (or D1, the paper as printed) and third
    = (sum_ab A_kab) * D3_kij ("sum", eq. 19) or sum_ab A_kab * D3_kab ("weighted", torchcam).
    alpha is 0 where the denominator is 0, so zero gradients give zero weights, not NaN.
    """
    # the two (N, K, h, w) temporaries come from the workspace and go back to it: fresh
    # arrays of this size cost more to fault in than to compute (onnxcam.cams.workspace)
    third = WORKSPACE.take(d2.shape)
    if denominator == "sum":  # einsum's broadcast product: half of np.multiply's time here
        np.einsum("nk,nkhw->nkhw", spatial_sum(activation), d3, out=third)
    else:
        third[...] = spatial_dot(activation, d3)[..., None, None]
    denominator_values = np.add(third, d2, out=third)
    denominator_values += d2  # 2*D2 + third, in place
    top = d2 if numerator == "D2" else d1
    alpha = WORKSPACE.take(d2.shape)
    alpha.fill(0.0)  # 0 where the denominator is 0
    np.divide(top, denominator_values, out=alpha, where=denominator_values != 0)
    weights = spatial_dot(alpha, np.maximum(d1, 0.0, out=denominator_values))  # ReLU(D1), reusing the buffer
    WORKSPACE.give(alpha, denominator_values)
    return weights


def plusplus_weights_single(activation: np.ndarray, gradient: np.ndarray, numerator: str = "D2") -> np.ndarray:
    """``plusplus_weights`` for one sample per image (D1 = g, D2 = g^2, D3 = g^3) with the "sum"
    denominator, in a third of the passes and with no g^2 or g^3 arrays.

    There alpha = g^2 / (g^2 (2 + S g)) with S = sum_ab A_kab, and ReLU(g) leaves the locations
    where g > 0 only, so w_k = sum_{g > 0} g / (2 + S g) (D1: sum_{g > 0} 1 / (2 + S g)): the
    same values to float64 rounding. A location where 2 + S g = 0 gives 0, as in the general
    form. ``gradient`` may be float32 (it is read once, into float64)."""
    positive = WORKSPACE.take(gradient.shape)
    np.maximum(gradient, 0.0, out=positive)  # float64 from here
    denominators = WORKSPACE.take(gradient.shape)
    np.einsum("nk,nkhw->nkhw", spatial_sum(activation), positive, out=denominators)
    denominators += 2.0  # 2 + S g, never 0 where g <= 0
    top = positive if numerator == "D2" else np.sign(positive, out=positive)  # D1: 1 where g > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = spatial_sum(np.divide(top, denominators, out=denominators))
    WORKSPACE.give(positive, denominators)
    broken = np.flatnonzero(~np.isfinite(weights).all(axis=1))
    if broken.size:  # 2 + S g = 0 somewhere (S < 0) or a NaN: those images by the general form,
        # whose rule makes such locations 0 (and keeps the NaN)
        g = np.asarray(gradient[broken], dtype=np.float64)
        weights[broken] = plusplus_weights(activation[broken], g, g * g, g * g * g, numerator)
    return weights


def gradcam_weights(d1: np.ndarray) -> np.ndarray:
    """Grad-CAM weights: the spatial mean of the gradient."""
    return spatial_sum(d1) / (d1.shape[-2] * d1.shape[-1])


def xgradcam_weights(activation: np.ndarray, d1: np.ndarray) -> np.ndarray:
    """XGrad-CAM weights sum_ij (A_kij / sum_ab A_kab) g_kij; 0 for a channel whose sum is 0."""
    activation_sum = spatial_sum(activation)
    weighted = spatial_dot(activation, d1)
    return np.divide(weighted, activation_sum, out=np.zeros(weighted.shape),
                     where=activation_sum != 0)


def select_channels(values: np.ndarray, feature_maps: tuple[int, ...] | None) -> np.ndarray:
    """Keep the chosen channels (axis 1) for the final sum; all of them when None."""
    return values if feature_maps is None else values[:, list(feature_maps)]


def weighted_map(weights: np.ndarray, activation: np.ndarray,
                 feature_maps: tuple[int, ...] | None = None) -> np.ndarray:
    """L = ReLU(sum_{k in K'} w_k A^k)."""
    return relu(np.einsum("nk,nkhw->nhw", select_channels(weights, feature_maps),
                          select_channels(activation, feature_maps)))


def location_map(contributions: np.ndarray, feature_maps: tuple[int, ...] | None = None) -> np.ndarray:
    """L = ReLU(sum_{k in K'} c_kij) for per-location contributions (LayerCAM, HiResCAM)."""
    return relu(select_channels(contributions, feature_maps).sum(axis=1))


def plusplus_map(activation: np.ndarray, d1: np.ndarray, d2: np.ndarray, d3: np.ndarray,
                 numerator: str = "D2", denominator: str = "sum",
                 feature_maps: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The Grad-CAM++ map and its weights; Smooth Grad-CAM++ is this on averaged moments."""
    weights = plusplus_weights(activation, d1, d2, d3, numerator, denominator)
    return weighted_map(weights, activation, feature_maps), weights
