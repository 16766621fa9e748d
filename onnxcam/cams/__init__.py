"""Class activation maps from a target layer's activation and gradient moments."""

from .methods import (METHODS, CamMethod, CamResult, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM,
                      SmoothGradCAMPlusPlus, XGradCAM, canonical_method_name, get_method)
from .moments import GradientMoments, MomentAccumulator
from .postprocess import footprint_mask, normalize, upsample_bilinear

__all__ = [
    "METHODS", "CamMethod", "CamResult", "GradCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM",
    "SmoothGradCAMPlusPlus", "XGradCAM", "canonical_method_name", "get_method",
    "GradientMoments", "MomentAccumulator", "footprint_mask", "normalize", "upsample_bilinear",
]
