"""The explainer: images in, one Explanation per image and class out (see explainer.py)."""

from onnxcam.explain.explainer import COMPARE_METHODS, Explainer
from onnxcam.explain.result import METHOD_TITLES, Explanation

__all__ = ["COMPARE_METHODS", "METHOD_TITLES", "Explainer", "Explanation"]
