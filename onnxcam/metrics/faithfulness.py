"""Faithfulness metrics: Average Drop, Increase in Confidence, Deletion and Insertion.

A model is a callable ``predict(x) -> probs``: ``x`` a float32 batch ``(B, C, H, W)`` of
preprocessed inputs, ``probs`` a ``(B, classes)`` array of class probabilities (softmax already
applied by the caller). The metrics always call it on batches, never one image at a time.

Definitions (docs/method.md, "Evaluation metrics"), with ``Y_i`` the probability of class
``c_i`` on image ``x_i`` and ``O_i`` the same on the explanation-map image
``E_i = L_i * x_i`` (``L_i`` the map in [0, 1] upsampled to the input, multiplied into every
channel):

- Average Drop % = ``100/N * sum_i max(0, Y_i - O_i) / Y_i`` (lower is better; a term with
  ``Y_i == 0`` counts 0).
- Increase in Confidence % = ``100/N * sum_i [Y_i < O_i]`` (higher is better).
- Deletion / Insertion (RISE, Petsiuk et al. 2018): see :func:`deletion_insertion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from onnxcam.errors import DataError, OptionError, TargetError
from onnxcam.metrics.regions import check_maps, check_pixels

__all__ = [
    "DeletionInsertionResult",
    "ExplanationMapScores",
    "Predict",
    "average_drop",
    "deletion_insertion",
    "explanation_images",
    "explanation_map_scores",
    "gaussian_blur",
    "increase_in_confidence",
]

Predict = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------
# Validation and batching


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise OptionError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _check_inputs(images: Any, maps: Any, classes: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(images)
    if x.ndim != 4:
        raise DataError(f"images: expected a batch of shape (N, C, H, W), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError("images: the batch is empty")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise DataError(f"images: expected real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise DataError("images contain NaN or infinity")
    n, _, h, w = x.shape
    m = np.asarray(maps)
    if m.shape != (n, h, w):
        raise DataError(f"maps: expected shape ({n}, {h}, {w}) to match the images, got {m.shape}")
    m = check_maps(m)
    c = np.asarray(classes)
    if c.ndim == 0:
        c = np.full(n, c)
    if c.shape != (n,):
        raise DataError(f"classes: expected one class index per image ({n}), got shape {c.shape}")
    if c.dtype == np.bool_ or not np.issubdtype(c.dtype, np.integer):
        if np.issubdtype(c.dtype, np.floating) and np.all(np.isfinite(c)) and np.all(c == np.round(c)):
            c = c.astype(np.int64)
        else:
            raise TargetError(f"classes: expected integer class indices, got dtype {c.dtype}")
    c = c.astype(np.int64, copy=False)
    if np.any(c < 0):
        bad = int(np.argmax(c < 0))
        raise TargetError(f"classes[{bad}] = {int(c[bad])} is negative")
    return x, m, c


def _probs(predict: Predict, batch: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Call ``predict`` once on ``batch`` and pick ``probs[j, classes[j]]``."""
    out = np.asarray(predict(np.ascontiguousarray(batch, dtype=np.float32)))
    b = batch.shape[0]
    if out.ndim != 2 or out.shape[0] != b:
        raise DataError(f"predict returned shape {out.shape} for a batch of {b}; expected ({b}, classes)")
    if np.any(classes >= out.shape[1]):
        bad = int(classes[classes >= out.shape[1]][0])
        raise TargetError(f"class {bad} is out of range for a model with {out.shape[1]} classes")
    return out[np.arange(b), classes].astype(np.float64)


def explanation_images(images: Any, maps01: Any) -> np.ndarray:
    """``E = L * x``: each map (N, H, W) multiplied into every channel of its image (N, C, H, W)."""
    x = np.asarray(images, dtype=np.float32)
    m = np.asarray(maps01, dtype=np.float32)
    return x * m[:, None, :, :]


def _check_unit_maps(maps: np.ndarray, atol: float = 1e-5) -> np.ndarray:
    lo, hi = float(maps.min()), float(maps.max())
    if lo < -atol or hi > 1 + atol:
        raise DataError(f"maps: expected values in [0, 1] (normalised maps), got [{lo:.4g}, {hi:.4g}]")
    return np.clip(maps, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Average Drop and Increase in Confidence


@dataclass(frozen=True)
class ExplanationMapScores:
    """Average Drop and Increase in Confidence, with the per-image probabilities behind them."""

    average_drop: float  # percent, lower is better
    increase_in_confidence: float  # percent, higher is better
    base_probs: np.ndarray  # (N,) Y_i: probability of the class on the image
    explanation_probs: np.ndarray  # (N,) O_i: the same on the explanation-map image L*x
    drops: np.ndarray  # (N,) max(0, Y_i - O_i) / Y_i (0 where Y_i == 0)
    increased: np.ndarray  # (N,) bool, Y_i < O_i


def explanation_map_scores(
    predict: Predict,
    images: Any,
    maps01: Any,
    classes: Any,
    batch_size: int = 32,
    base_probs: Any = None,
) -> ExplanationMapScores:
    """Average Drop % and Increase in Confidence % from one pass over the images.

    ``images`` (N, C, H, W) preprocessed inputs, ``maps01`` (N, H, W) maps in [0, 1] at the input
    size, ``classes`` (N,) the class each map explains. The images are taken in chunks of
    ``batch_size``: each call to ``predict`` gets a chunk's originals followed by their explanation
    images (2 * chunk rows), so there are ceil(N / batch_size) calls. Pass ``base_probs`` (N,),
    the class probabilities on the originals when the caller has them already, and the calls get
    only the explanation images (chunk rows).
    """
    bs = _check_batch_size(batch_size)
    x, m, c = _check_inputs(images, maps01, classes)
    m = _check_unit_maps(m)
    n = x.shape[0]
    y_given = None
    if base_probs is not None:
        y_given = np.asarray(base_probs, dtype=np.float64)
        if y_given.shape != (n,):
            raise DataError(f"base_probs: expected shape ({n},), got {y_given.shape}")
        if not np.all(np.isfinite(y_given)) or np.any(y_given < 0):
            raise DataError("base_probs: expected finite probabilities >= 0")
    y = np.empty(n, dtype=np.float64)
    o = np.empty(n, dtype=np.float64)
    for start in range(0, n, bs):
        sl = slice(start, min(start + bs, n))
        e = explanation_images(x[sl], m[sl])
        if y_given is None:
            p = _probs(predict, np.concatenate([x[sl], e]), np.concatenate([c[sl], c[sl]]))
            k = e.shape[0]
            y[sl], o[sl] = p[:k], p[k:]
        else:
            o[sl] = _probs(predict, e, c[sl])
    if y_given is not None:
        y = y_given
    drops = np.divide(np.maximum(0.0, y - o), y, out=np.zeros(n), where=y > 0)
    increased = y < o
    return ExplanationMapScores(
        average_drop=float(100.0 * drops.mean()),
        increase_in_confidence=float(100.0 * increased.mean()),
        base_probs=y,
        explanation_probs=o,
        drops=drops,
        increased=increased,
    )


def average_drop(
    predict: Predict, images: Any, maps01: Any, classes: Any, batch_size: int = 32
) -> float:
    """Average Drop % (lower is better); see :func:`explanation_map_scores`."""
    return explanation_map_scores(predict, images, maps01, classes, batch_size).average_drop


def increase_in_confidence(
    predict: Predict, images: Any, maps01: Any, classes: Any, batch_size: int = 32
) -> float:
    """Increase in Confidence % (higher is better); see :func:`explanation_map_scores`."""
    return explanation_map_scores(predict, images, maps01, classes, batch_size).increase_in_confidence


# ----------------------------------------------------------------------------------------------
# Gaussian blur (separable, NumPy only)


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = max(1, int(truncate * sigma + 0.5))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: Any, sigma: float) -> np.ndarray:
    """Blur each channel of ``images`` (..., H, W) with a Gaussian of std ``sigma`` pixels.

    Separable, kernel radius ``round(4 * sigma)``, borders mirrored (half-sample symmetric, as
    scipy.ndimage's default "reflect"). ``sigma == 0`` returns a copy.
    """
    x = np.asarray(images, dtype=np.float32)
    s = check_pixels(sigma, "blur_sigma")
    if s == 0:
        return x.copy()
    k = _gaussian_kernel(s)
    r = k.shape[0] // 2
    out = x.astype(np.float64)
    for axis in (-1, -2):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="symmetric")
        size = out.shape[axis]
        acc = np.zeros_like(out)
        for j, wj in enumerate(k):
            acc += wj * np.take(padded, np.arange(j, j + size), axis=axis)
        out = acc
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Deletion and Insertion


@dataclass(frozen=True)
class DeletionInsertionResult:
    """Deletion and insertion curves and their areas.

    ``fractions`` (steps+1,) is the x axis: the share of the pixels deleted (or inserted) at each
    step, from 0 to 1. Curves are the class probability at each step, per image (N, steps+1) and
    averaged over the images. AUCs are trapezoids over ``fractions``: per image (N,) and their
    mean (= the AUC of the mean curve). The fields of a curve that was not asked for are None.
    """

    fractions: np.ndarray
    deletion_curves: np.ndarray | None
    insertion_curves: np.ndarray | None
    deletion_mean_curve: np.ndarray | None
    insertion_mean_curve: np.ndarray | None
    deletion_aucs: np.ndarray | None
    insertion_aucs: np.ndarray | None
    deletion_auc: float | None  # lower is better
    insertion_auc: float | None  # higher is better


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trapezoid rule along the last axis (np.trapz was renamed across NumPy versions)."""
    return np.sum((x[1:] - x[:-1]) * (y[..., 1:] + y[..., :-1]) / 2.0, axis=-1)


def _baseline(
    spec: Any, shape: tuple[int, ...], blur_sigma: Any, what: str
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Validate a baseline now; return ``f(x_sub, idx)``, the baseline of the images
    ``x_sub = x[idx]`` (built per chunk, so memory stays at a chunk's size)."""
    shown = f"an array of shape {np.shape(spec)}" if hasattr(spec, "shape") else repr(spec)
    bad = f"{what}: expected 'zeros', 'mean', 'blur', a number or an array broadcastable to {shape}, got {shown}"
    if isinstance(spec, str):
        if spec == "zeros":
            return lambda xs, idx: np.zeros_like(xs)
        if spec == "mean":
            return lambda xs, idx: np.broadcast_to(xs.mean(axis=(2, 3), keepdims=True), xs.shape).astype(np.float32)
        if spec == "blur":
            sigma = check_pixels(blur_sigma, "blur_sigma")
            return lambda xs, idx: gaussian_blur(xs, sigma)
        raise OptionError(bad)
    if isinstance(spec, (bool, np.bool_)):
        raise OptionError(bad)
    if isinstance(spec, (int, float, np.integer, np.floating)):
        if not np.isfinite(spec):
            raise OptionError(f"{what}: the constant must be finite, got {spec!r}")
        value = float(spec)
        return lambda xs, idx: np.full_like(xs, value)
    try:
        arr = np.broadcast_to(np.asarray(spec, dtype=np.float32), shape)
    except (TypeError, ValueError):
        raise OptionError(bad) from None
    return lambda xs, idx: np.array(arr[idx], dtype=np.float32)


def _pixel_counts(n_pixels: int, steps: Any, pixels_per_step: Any) -> np.ndarray:
    if pixels_per_step is not None:
        pps_ok = isinstance(pixels_per_step, (int, np.integer)) and not isinstance(pixels_per_step, bool)
        if not pps_ok or pixels_per_step < 1:
            raise OptionError(f"pixels_per_step: expected an integer >= 1, got {pixels_per_step!r}")
        pps = int(pixels_per_step)
        n_steps = -(-n_pixels // pps)
        return np.minimum(np.arange(n_steps + 1, dtype=np.int64) * pps, n_pixels)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise OptionError(f"steps: expected an integer >= 1, got {steps!r}")
    k = np.arange(int(steps) + 1, dtype=np.int64)
    return (k * n_pixels) // int(steps)


def _saliency_ranks(maps: np.ndarray) -> np.ndarray:
    """rank[i, p]: position of pixel p (row-major) when image i's pixels are sorted by saliency,
    highest first; ties keep row-major order (stable sort)."""
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None, :].repeat(n, axis=0), axis=1)
    return ranks


def deletion_insertion(
    predict: Predict,
    images: Any,
    maps: Any,
    classes: Any,
    steps: int = 50,
    deletion_baseline: Any = "zeros",
    insertion_baseline: Any = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 32,
    pixels_per_step: int | None = None,
    which: str = "both",
) -> DeletionInsertionResult:
    """Deletion and insertion curves (RISE, Petsiuk et al. 2018).

    The pixels of each image are ranked by the map's saliency, highest first; ties are broken by
    a stable sort, so equal values keep row-major order (top row first, left to right). A pixel
    is perturbed in all its channels at once. At step k (k = 0..steps), the top ``n_k =
    floor(k * H * W / steps)`` pixels are

    - **deletion**: replaced by ``deletion_baseline`` (step 0 is the image, the last step is all
      baseline); lower area is better;
    - **insertion**: copied from the image onto ``insertion_baseline`` (step 0 is the baseline,
      the last step the image); higher area is better.

    The curve is the probability of ``classes[i]`` at each step; the x axis is ``n_k / (H * W)``
    in [0, 1], and the AUC is the trapezoid over it. With ``pixels_per_step`` instead of
    ``steps``, ``n_k = min(k * pixels_per_step, H * W)`` and steps = ceil(H * W / pixels_per_step),
    as in RISE.

    Baselines are in the model's input (preprocessed) space: ``"zeros"`` (for normalised inputs,
    0 is the data set mean colour; for [0, 1] inputs, black), ``"mean"`` (each image's per-channel
    mean), ``"blur"`` (the image blurred by a Gaussian of ``blur_sigma`` pixels, see
    :func:`gaussian_blur`), a number (a constant image) or an array broadcastable to the images.
    ``maps`` only serve to rank, so any real values will do. The perturbed inputs are built
    lazily, ``batch_size`` rows per call to ``predict``: ceil(N * (steps + 1) / batch_size) calls
    per curve (deletion rows first, then insertion rows when ``which="both"``).
    """
    bs = _check_batch_size(batch_size)
    if which not in ("both", "deletion", "insertion"):
        raise OptionError(f"which: expected 'both', 'deletion' or 'insertion', got {which!r}")
    x, m, c = _check_inputs(images, maps, classes)
    n, _, h, w = x.shape
    counts = _pixel_counts(h * w, steps, pixels_per_step)
    n_points = counts.shape[0]
    fractions = counts / float(h * w)
    modes = ["deletion", "insertion"] if which == "both" else [which]
    bases = {}
    if "deletion" in modes:
        bases["deletion"] = _baseline(deletion_baseline, x.shape, blur_sigma, "deletion_baseline")
    if "insertion" in modes:
        bases["insertion"] = _baseline(insertion_baseline, x.shape, blur_sigma, "insertion_baseline")

    # Rows: (mode, image, step), mode-major, then image, then step. Ranks and baselines are
    # computed per chunk for the few images it touches, never for the whole set at once.
    total = len(modes) * n * n_points
    row_mode = np.repeat(np.arange(len(modes)), n * n_points)
    row_img = np.tile(np.repeat(np.arange(n), n_points), len(modes))
    row_step = np.tile(np.arange(n_points), len(modes) * n)
    probs = np.empty(total, dtype=np.float64)
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (mode, image) -> (rank, base)

    for start in range(0, total, bs):
        sl = slice(start, min(start + bs, total))
        imgs, stps, mds = row_img[sl], row_step[sl], row_mode[sl]
        batch = np.empty((imgs.shape[0],) + x.shape[1:], dtype=np.float32)
        for mi in np.unique(mds).tolist():
            mode = modes[mi]
            sel = np.flatnonzero(mds == mi)
            uniq = np.unique(imgs[sel])
            for key in [k for k in cache if k[0] != mi or k[1] < uniq[0]]:
                del cache[key]
            todo = np.array([i for i in uniq.tolist() if (mi, i) not in cache], dtype=np.int64)
            if todo.size:
                r = _saliency_ranks(m[todo])
                b = bases[mode](x[todo], todo)
                for j, i in enumerate(todo):
                    cache[(mi, int(i))] = (r[j], b[j])
            rank = np.stack([cache[(mi, int(i))][0] for i in imgs[sel]])
            base = np.stack([cache[(mi, int(i))][1] for i in imgs[sel]])
            chosen = (rank < counts[stps[sel]][:, None]).reshape(-1, 1, h, w)
            src = x[imgs[sel]]
            if mode == "deletion":
                batch[sel] = np.where(chosen, base, src)
            else:
                batch[sel] = np.where(chosen, src, base)
        probs[sl] = _probs(predict, batch, c[imgs])

    curves = probs.reshape(len(modes), n, n_points)
    out: dict[str, Any] = {}
    for mode in ("deletion", "insertion"):
        if mode in modes:
            cur = curves[modes.index(mode)]
            aucs = _trapezoid(cur, fractions)
            out[mode] = (cur, cur.mean(axis=0), aucs, float(aucs.mean()))
        else:
            out[mode] = (None, None, None, None)
    return DeletionInsertionResult(
        fractions=fractions,
        deletion_curves=out["deletion"][0],
        insertion_curves=out["insertion"][0],
        deletion_mean_curve=out["deletion"][1],
        insertion_mean_curve=out["insertion"][1],
        deletion_aucs=out["deletion"][2],
        insertion_aucs=out["insertion"][2],
        deletion_auc=out["deletion"][3],
        insertion_auc=out["insertion"][3],
    )
