"""The same explanation from two models: a regression check for re-exported, quantised or
fine-tuned models.

For every image, both models explain the **same class** (model A's prediction unless a class is
given) with the same method and noise; the two maps are compared at one resolution (the model
input size, the larger of the two when they differ) by

- the Spearman rank correlation of their pixel values (NumPy; tied values get their average rank,
  so flat regions do not count as agreement or disagreement by accident), and
- the IoU of their top-20% regions (the pixels at or above each map's 80th percentile value).

An image "regresses" when its correlation falls below the threshold (default 0.8).

Conventions for degenerate maps: two constant maps have correlation 1 when they are equal (0
otherwise); a constant map against a varying one has correlation 0. A constant map's top region
is all its pixels.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcam.errors import ModelError, OptionError

__all__ = ["ComparisonResult", "average_ranks", "compare_models", "spearman", "top_fraction_iou",
           "top_fraction_mask"]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of the flattened ``values``; ties get the mean of the ranks they span."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    n = flat.size
    order = np.argsort(flat, kind="mergesort")
    ordered = flat[order]
    # start of each run of equal values in sorted order
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    ends = np.concatenate([starts[1:], [n]])
    mean_rank = (starts + ends + 1) / 2.0            # mean of ranks start+1 .. end
    run_of = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[run_of]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally shaped arrays (Pearson of the average ranks)."""
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"maps of different sizes {np.shape(a)} and {np.shape(b)}")
    if x.size == 0:
        raise ValueError("empty maps")
    constant_x = bool(np.all(x == x[0]))
    constant_y = bool(np.all(y == y[0]))
    if constant_x or constant_y:
        return 1.0 if (constant_x and constant_y and np.array_equal(x, y)) else 0.0
    rx = average_ranks(x)
    ry = average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = math.sqrt(float(np.dot(rx, rx)) * float(np.dot(ry, ry)))
    return float(np.clip(np.dot(rx, ry) / denominator, -1.0, 1.0))


def top_fraction_mask(values: np.ndarray, fraction: float = 0.2) -> np.ndarray:
    """The pixels whose value is at least the k-th largest, k = ceil(fraction * size) (ties at
    the boundary are all kept)."""
    if not 0 < fraction <= 1:
        raise OptionError(f"fraction {fraction!r} must be in (0, 1]")
    flat = np.asarray(values, dtype=np.float64)
    k = max(1, int(math.ceil(fraction * flat.size - 1e-9)))
    kth = np.partition(flat.reshape(-1), flat.size - k)[flat.size - k]
    return flat >= kth


def top_fraction_iou(a: np.ndarray, b: np.ndarray, fraction: float = 0.2) -> float:
    """IoU of the top-``fraction`` regions of two maps."""
    ma, mb = top_fraction_mask(a, fraction), top_fraction_mask(b, fraction)
    union = np.count_nonzero(ma | mb)
    return float(np.count_nonzero(ma & mb) / union) if union else 1.0


@dataclass
class ComparisonResult:
    model_a: str
    model_b: str
    method: str
    threshold: float
    min_iou: float | None
    size: tuple[int, int]
    layers: tuple[str, str]
    images: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(not image["passed"] for image in self.images)

    @property
    def passed(self) -> bool:
        return self.failures == 0

    def to_dict(self) -> dict[str, Any]:
        correlations = [image["correlation"] for image in self.images]
        ious = [image["iou"] for image in self.images]
        return {
            "model_a": self.model_a, "model_b": self.model_b, "method": self.method,
            "layers": {"a": self.layers[0], "b": self.layers[1]},
            "map_size": {"height": self.size[0], "width": self.size[1]},
            "threshold": self.threshold, "min_iou": self.min_iou, "top_fraction": 0.2,
            "passed": self.passed, "failures": self.failures,
            "mean_correlation": float(np.mean(correlations)), "min_correlation": float(np.min(correlations)),
            "mean_iou": float(np.mean(ious)), "min_iou_measured": float(np.min(ious)),
            "images": self.images, "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def compare_models(model_a, model_b, images: Sequence[str | os.PathLike], method: str = "gradcam", *,
                   threshold: float = 0.8, min_iou: float | None = None, class_index: int | str | None = None,
                   layer_a: str | None = None, layer_b: str | None = None, samples: int = 25,
                   noise_level: float = 0.15, seed: int = 0, device: str | None = None,
                   batch_size: int | None = None, fraction: float = 0.2, cache: bool = True,
                   explainers: tuple | None = None, inputs: dict | None = None, resize: str | None = None,
                   crop_fraction: float | None = None, interpolation: str | None = None,
                   scores_output: str | None = None) -> ComparisonResult:
    """Explain ``images`` with both models (same method, class, noise) and compare the maps.

    ``class_index``: the class to explain in every image, an index or a name among model A's labels
    (default: model A's prediction, per image). ``threshold``: minimum rank correlation; ``min_iou``: optional minimum top-20% IoU.
    ``explainers``: ready-made (Explainer A, Explainer B), for callers that already have them.
    ``inputs``: values of the models' inputs other than the image, and ``scores_output`` the output
    that holds the class scores (both models). ``resize``,
    ``crop_fraction`` and ``interpolation``: how both models fit the images (see :class:`~onnxcam.explain.Explainer`).
    """
    from onnxcam.cams import canonical_method_name, normalize, upsample_bilinear
    from onnxcam.explain import Explainer

    started = time.perf_counter()
    _check_fraction("threshold", threshold, low=-1.0)
    if min_iou is not None:
        _check_fraction("min IoU", min_iou, low=0.0)
    method = canonical_method_name(method)
    if explainers is None:
        shared = dict(resize=resize, crop_fraction=crop_fraction, interpolation=interpolation,
                      scores_output=scores_output)
        explainer_a = Explainer(model_a, layer=layer_a, device=device, batch_size=batch_size, cache=cache,
                                inputs=inputs, **shared)
        explainer_b = Explainer(model_b, layer=layer_b, device=device, batch_size=batch_size, cache=cache,
                                inputs=inputs, **shared)
    else:
        explainer_a, explainer_b = explainers
    if explainer_a.num_classes != explainer_b.num_classes:
        raise ModelError(f"the models have {explainer_a.num_classes} and {explainer_b.num_classes} classes: "
                         "compare needs two models with the same classes")
    paths = list(images)
    if not paths:
        raise OptionError("no images given: pass at least one image")
    from onnxcam.evaluation.predictor import Predictor

    predictor_a, predictor_b = Predictor(explainer_a), Predictor(explainer_b)  # refuse before the work
    if (predictor_a.regions is None) != (predictor_b.regions is None):
        raise ModelError(f"model '{explainer_a.model_name}' and model '{explainer_b.model_name}' do not "
                         "score alike (one per class, the other per pixel): compare two versions of one model")
    t0 = time.perf_counter()
    options = dict(samples=samples, noise_level=noise_level, seed=seed)
    given = None if class_index is None else [class_index] * len(paths)  # an index, or a name of A's labels
    maps_a = explainer_a.explain(paths, method=method, targets=given, **options)
    targets = [e.class_index for e in maps_a]
    maps_b = explainer_b.explain(paths, method=method, targets=targets, **options)
    explain_s = time.perf_counter() - t0
    # B's own prediction, for the record: one batched pass through B's session
    probs_b, predicted_b = predictor_b.predict(explainer_b.preprocess(paths))
    probs_a, predicted_a = predictor_a.predict(explainer_a.preprocess(paths))
    size = _common_size(explainer_a, explainer_b, maps_a[0])
    records = []
    for path, a, b, pa, pb, top_a, top_b in zip(paths, maps_a, maps_b, probs_a, probs_b, predicted_a, predicted_b):
        map_a = normalize(upsample_bilinear(a.raw_map, size))
        map_b = normalize(upsample_bilinear(b.raw_map, size))
        correlation = spearman(map_a, map_b)
        iou = top_fraction_iou(map_a, map_b, fraction)
        passed = correlation >= threshold and (min_iou is None or iou >= min_iou)
        records.append({
            "image": str(path), "class": a.class_index, "label": a.label,
            "predicted_a": int(top_a), "predicted_b": int(top_b),
            "probability_a": float(pa[a.class_index]), "probability_b": float(pb[a.class_index]),
            "correlation": correlation, "iou": iou, "flat_a": bool(a.flat), "flat_b": bool(b.flat),
            "passed": bool(passed),
        })
    return ComparisonResult(
        model_a=explainer_a.model_name, model_b=explainer_b.model_name, method=method,
        threshold=float(threshold), min_iou=min_iou, size=size, layers=(explainer_a.layer, explainer_b.layer),
        images=records, timings={"explain_s": explain_s, "total_s": time.perf_counter() - started})


def _common_size(explainer_a, explainer_b, first) -> tuple[int, int]:
    sizes = []
    for explainer in (explainer_a, explainer_b):
        size = getattr(explainer, "model_size", None)
        if size is not None and all(isinstance(d, int) and d > 0 for d in size):
            sizes.append((int(size[0]), int(size[1])))
    if not sizes:
        return tuple(first.image_size)  # dynamic input sizes: the image's own size
    return max(sizes, key=lambda hw: hw[0] * hw[1])


def _check_fraction(what: str, value, low: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number) or not low <= number <= 1:
        raise OptionError(f"{what} {value!r} must be a number in [{low:g}, 1]")
    return number

