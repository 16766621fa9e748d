"""Run CAM methods over a data set and score them (docs/method.md, "Evaluation metrics").

``evaluate(explainer, dataset, methods)`` returns an :class:`Evaluation`: one row per method with

- ``pointing_game``: accuracy of the pointing game (map maximum inside the ground-truth region,
  ``tolerance`` pixels of slack), over the samples with a region;
- ``energy_pointing_game``: mean share of the map's energy inside the region;
- ``average_drop`` % (lower is better) and ``increase_in_confidence`` % (higher is better);
- ``deletion_auc`` (lower is better) and ``insertion_auc`` (higher is better), with the mean curves;
- ``instance_coverage``: covered instances / all instances over the samples with two or more
  instances (an instance is covered when a pixel inside it reaches ``coverage_threshold`` of the
  map's maximum).

All metrics use the maps **at the model's input resolution** (the raw layer map upsampled
bilinearly to the input size and min-max normalised), the preprocessed inputs, and boxes/masks
rescaled from the image's pixels to the input size; ``tolerance`` is in input pixels. The class
explained and scored is the sample's label when it has one (``target="label"``, the default), else
the model's prediction. A segmentation model is scored as it is explained
(``onnxcam.explain.regions``): its prediction is the class with the largest region, and a class's
probability, on the image as on its perturbed copies, is its mean probability over the pixels it
is predicted at there (over the whole image where it owns none); data set labels map onto its
classes by name (a manifest's ``classes``), its background included.

Work is bounded: the maps are kept at layer resolution (tiny) and the metrics run over chunks of
images. Every method of one layer is computed from one set of passes (``Explainer.iter_explain``
over the whole list, so the noise of Smooth Grad-CAM++ depends only on the seed and the image's
position, not on the chunking). Probabilities come from the Explainer's own session, batched.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcam.cams import METHODS, canonical_method_name, normalize, upsample_bilinear
from onnxcam.errors import DataError, ImageError, OptionError
from onnxcam.evaluation.datasets import Dataset, Sample
from onnxcam.evaluation.predictor import Predictor
from onnxcam.explain.result import METHOD_TITLES
from onnxcam.jsonable import to_jsonable
from onnxcam.metrics import (deletion_insertion, energy_pointing_game, explanation_map_scores,
                             instance_coverage, pointing_game, region_mask)

__all__ = ["DEFAULT_METHODS", "Evaluation", "MethodSpec", "evaluate", "parse_method", "parse_methods"]

DEFAULT_METHODS = ("gradcam", "gradcampp", "smoothgradcampp")
#: Memory bound for keeping every preprocessed input between the passes (else re-read per chunk).
INPUT_CACHE_BYTES = 512 * 2**20
CHUNK = 64

METRIC_COLUMNS = (
    ("pointing_game", "pointing", "{:.3f}"),
    ("energy_pointing_game", "energy", "{:.3f}"),
    ("average_drop", "avg drop %", "{:.1f}"),
    ("increase_in_confidence", "incr conf %", "{:.1f}"),
    ("deletion_auc", "deletion", "{:.3f}"),
    ("insertion_auc", "insertion", "{:.3f}"),
    ("instance_coverage", "coverage", "{:.3f}"),
)


# ----------------------------------------------------------------------------------------------
# Method specifications


@dataclass(frozen=True)
class MethodSpec:
    """A method with its variant options and (optionally) its own target layer.

    Written on the command line as ``METHOD[:option=value...][@LAYER]``, for example
    ``smoothgradcampp:averaging=maps`` or ``gradcam@/features/relu4/Relu_output_0``.
    """

    method: str
    options: tuple[tuple[str, str], ...] = ()
    layer: str | None = None

    @property
    def name(self) -> str:
        text = self.method + "".join(f":{k}={v}" for k, v in self.options)
        return text + (f"@{self.layer}" if self.layer else "")

    @property
    def title(self) -> str:
        text = METHOD_TITLES.get(self.method, self.method)
        if self.options:
            text += " (" + ", ".join(f"{k}={v}" for k, v in self.options) + ")"
        return text


def parse_method(text: str | MethodSpec, layer: str | None = None) -> MethodSpec:
    """``METHOD[:option=value...][@LAYER]`` -> MethodSpec (``layer`` when no @LAYER is given)."""
    if isinstance(text, MethodSpec):
        return text if text.layer or layer is None else MethodSpec(text.method, text.options, layer)
    if not isinstance(text, str) or not text.strip():
        raise OptionError(f"method {text!r} is empty: give e.g. gradcam, gradcampp, smoothgradcampp")
    body, at, spec_layer = text.strip().partition("@")
    if at and not spec_layer.strip():
        raise OptionError(f"method {text!r} ends with '@': give the layer name after it, or drop the '@'")
    name, *parts = body.split(":")
    method = canonical_method_name(name)
    allowed = METHODS[method].allowed_options
    options = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not key or not value.strip():
            raise OptionError(f"method {text!r}: {part!r} is not option=value (e.g. smoothgradcampp:averaging=maps)")
        if key not in allowed:
            takes = ", ".join(allowed) or "no options"
            raise OptionError(f"method {text!r}: {method} has no option {key!r} ({takes})")
        choices = allowed[key]
        match = next((c for c in choices if c.lower() == value.strip().lower()), None)
        if match is None:
            raise OptionError(f"method {text!r}: {key} {value.strip()!r} is not known: choose {' or '.join(choices)}")
        options[key] = match
    return MethodSpec(method, tuple(sorted(options.items())), spec_layer.strip() or layer)


def parse_methods(texts: str | Sequence[str | MethodSpec], layer: str | None = None) -> list[MethodSpec]:
    """A comma-separated string (or a list) of method specs; duplicates are dropped."""
    if isinstance(texts, str):
        texts = [part for part in texts.split(",") if part.strip()]
    specs = []
    for text in texts:
        spec = parse_method(text, layer)
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise OptionError("no method given: choose among gradcam, gradcampp, smoothgradcampp, xgradcam, "
                          "layercam, hirescam")
    return specs


# ----------------------------------------------------------------------------------------------
# The result


@dataclass
class Evaluation:
    """The table (``rows``, one per method), per-sample records, mean curves and settings."""

    rows: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    fractions: np.ndarray
    curves: dict[str, dict[str, np.ndarray]]
    settings: dict[str, Any]
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def row(self, name: str) -> dict[str, Any]:
        for row in self.rows:
            if row["method"] == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "settings": self.settings,
            "summary": self.summary,
            "table": self.rows,
            "curves": {"fractions": self.fractions.tolist(),
                       **{name: {k: v.tolist() for k, v in c.items()} for name, c in self.curves.items()}},
            "samples": self.samples,
            "timings": {k: round(float(v), 4) for k, v in self.timings.items()},
        })

    def table_text(self) -> str:
        from onnxcam.cli.common import table

        header = ["method", "layer", *[label for _, label, _ in METRIC_COLUMNS]]
        rows = [[row["title"], _short_layer(row["layer"]),
                 *[_fmt(row[key], fmt) for key, _, fmt in METRIC_COLUMNS]] for row in self.rows]
        return table(rows, header)

    def csv_text(self) -> str:
        columns = ["method", "title", "layer", "options", "images", "flat_maps", "pointing_game",
                   "pointing_images", "energy_pointing_game", "average_drop", "increase_in_confidence",
                   "deletion_auc", "insertion_auc", "instance_coverage", "instance_coverage_mean",
                   "coverage_images", "noisy_passes_skipped"]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in self.rows:
            values = []
            for column in columns:
                value = row.get(column)
                if column == "options":
                    value = ";".join(f"{k}={v}" for k, v in (value or {}).items())
                elif isinstance(value, float):
                    value = "" if not math.isfinite(value) else f"{value:.6g}"
                elif value is None:
                    value = ""
                values.append(value)
            writer.writerow(values)
        return buffer.getvalue()


def _short_layer(layer: str) -> str:
    return layer if len(layer) <= 32 else "..." + layer[-29:]


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


# ----------------------------------------------------------------------------------------------
# The evaluation


Progress = Callable[[str, int, int], None]


def drop_unreadable(explainer, dataset: Dataset) -> tuple[Dataset, list[tuple[Sample, str]]]:
    """The data set without the samples whose image the explainer cannot read or preprocess, and
    those samples with the reason: the metrics then cover one known set of samples, decided
    before any is computed (``evaluate --skip-unreadable``). Each image is decoded once more."""
    kept, dropped = [], []
    for sample in dataset.samples:
        try:
            explainer.preprocess([sample.image])
        except ImageError as exc:
            dropped.append((sample, str(exc)))
        else:
            kept.append(sample)
    return dataset.subset(kept), dropped


def evaluate(explainer, dataset: Dataset, methods: str | Sequence[str | MethodSpec] = DEFAULT_METHODS, *,
             layer: str | None = None, samples: int = 25, noise_level: float = 0.15, seed: int = 0,
             steps: int = 50, tolerance: float = 15.0, coverage_threshold: float = 0.5,
             deletion_baseline: Any = "zeros", insertion_baseline: Any = "blur", blur_sigma: float = 5.0,
             target: str = "label", batch_size: int | None = None, progress: Progress | None = None,
             ) -> Evaluation:
    """Explain every sample with every method and compute the metrics; see the module doc.

    ``methods``: names or ``METHOD[:option=value][@LAYER]`` specs (``layer`` applies to specs
    without their own). ``samples``/``noise_level``/``seed``: Smooth Grad-CAM++ noise. ``steps``:
    deletion/insertion steps; ``deletion_baseline``/``insertion_baseline``/``blur_sigma``: see
    :func:`onnxcam.metrics.deletion_insertion`. ``target``: "label" or "predicted".
    ``batch_size``: rows per model run for the probabilities (default: the Explainer's).
    """
    started = time.perf_counter()
    specs = parse_methods(methods, layer)
    if target not in ("label", "predicted"):
        raise OptionError(f"target {target!r} is not known: choose label or predicted")
    if len(dataset) == 0:
        raise DataError("the data set has no samples")
    _check_number("tolerance", tolerance, low=0)
    _check_number("coverage threshold", coverage_threshold, low=0, high=1, open_low=True)
    _check_steps(steps)
    predictor = Predictor(explainer, batch_size)
    bs = predictor.batch_size
    progress = progress or (lambda stage, done, total: None)
    n = len(dataset)
    paths = [sample.image for sample in dataset.samples]
    timings: dict[str, float] = {}

    # 1. inputs and probabilities (the inputs are kept when they fit INPUT_CACHE_BYTES)
    t0 = time.perf_counter()
    cache: dict[int, np.ndarray] = {}
    probabilities = np.empty((n, predictor.num_classes), dtype=np.float64)
    predicted = np.empty(n, dtype=np.int64)
    keep = None
    for start in range(0, n, CHUNK):
        chunk = range(start, min(n, start + CHUNK))
        x = explainer.preprocess([paths[i] for i in chunk])
        if keep is None:
            keep = x[0].nbytes * n <= INPUT_CACHE_BYTES
            input_hw = _input_hw(x, explainer.layout)
        if keep:
            for j, i in enumerate(chunk):
                cache[i] = x[j]
        probabilities[chunk.start:chunk.stop], predicted[chunk.start:chunk.stop] = predictor.predict(x)
        progress("predict", chunk.stop, n)
    labels = [sample.label for sample in dataset.samples]
    classes = np.array([lab if (target == "label" and lab is not None) else int(p)
                        for lab, p in zip(labels, predicted)], dtype=np.int64)
    timings["predict_s"] = time.perf_counter() - t0

    # 2. maps at layer resolution, every method of a layer from one set of passes
    t1 = time.perf_counter()
    raw: dict[MethodSpec, list[np.ndarray]] = {}
    flat: dict[MethodSpec, np.ndarray] = {}
    skipped: dict[MethodSpec, bool] = {}
    layers_used: dict[MethodSpec, str] = {}
    rounds = _rounds(specs)
    for number, group in enumerate(rounds):
        names = [spec.method for spec in group]
        options = {spec.method: dict(spec.options) for spec in group if spec.options}
        for spec in group:
            raw[spec], flat[spec] = [], np.zeros(n, dtype=bool)
        for index, per_method in explainer.iter_explain(
                paths, methods=names, targets=classes.tolist(), samples=samples, noise_level=noise_level,
                seed=seed, layer=group[0].layer, method_options=options):
            for spec in group:
                explanation = per_method[spec.method][0]
                raw[spec].append(np.asarray(explanation.raw_map, dtype=np.float32))
                flat[spec][index] = explanation.flat
                skipped[spec] = explanation.noisy_passes_skipped
                layers_used[spec] = explanation.layer
            progress(f"explain {number + 1}/{len(rounds)}", index + 1, n)
    timings["explain_s"] = time.perf_counter() - t1

    # 3. metrics, chunk by chunk
    t2 = time.perf_counter()
    predict = _layout_predict(predictor, explainer.layout)
    acc = {spec: _Accumulator(n) for spec in specs}
    region_of = [sample.has_region for sample in dataset.samples]
    fractions = None
    for start in range(0, n, CHUNK):
        chunk = list(range(start, min(n, start + CHUNK)))
        x = (np.stack([cache[i] for i in chunk]) if keep
             else explainer.preprocess([paths[i] for i in chunk]))
        x = _to_nchw(x, explainer.layout)
        c = classes[chunk]
        base = probabilities[chunk, c]
        with_region = [j for j, i in enumerate(chunk) if region_of[i]]
        annotated = [dataset.samples[chunk[j]] for j in with_region]
        regions = [sample.regions_at(input_hw, explainer.footprint(sample.size)) for sample in annotated]
        for spec in specs:
            maps01 = normalize(upsample_bilinear(np.stack([raw[spec][i] for i in chunk]), input_hw))
            scores = explanation_map_scores(predict, x, maps01, c, batch_size=bs, base_probs=base)
            curves = deletion_insertion(predict, x, maps01, c, steps=steps, deletion_baseline=deletion_baseline,
                                        insertion_baseline=insertion_baseline, blur_sigma=blur_sigma,
                                        batch_size=bs)
            fractions = curves.fractions
            a = acc[spec]
            a.drops[chunk] = scores.drops
            a.increased[chunk] = scores.increased
            a.explanation_probs[chunk] = scores.explanation_probs
            a.deletion[chunk] = curves.deletion_aucs
            a.insertion[chunk] = curves.insertion_aucs
            a.add_curves(curves.deletion_curves, curves.insertion_curves)
            if with_region:
                sub = maps01[with_region]
                pg = pointing_game(sub, regions, tolerance=tolerance)
                ep = energy_pointing_game(sub, regions)
                ic = instance_coverage(sub, regions, threshold=coverage_threshold, min_instances=1)
                for k, j in enumerate(with_region):
                    i = chunk[j]
                    a.hit[i] = pg.hit[k]
                    a.distance[i] = _distance(pg.points[k], regions[k], input_hw)
                    a.energy[i] = ep.shares[k]
                    a.covered[i] = ic.covered[k]
                    a.instances[i] = ic.instances[k]
        progress("metrics", chunk[-1] + 1, n)
    timings["metrics_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - started
    timings["model_runs"] = float(explainer.session.run_calls)
    timings["probability_rows"] = float(predictor.rows)

    labelled = np.array([lab is not None for lab in labels])
    accuracy = float(np.mean(predicted[labelled] == np.array([lab for lab in labels if lab is not None]))) \
        if labelled.any() else None
    rows, curves_out = [], {}
    for spec in specs:
        a = acc[spec]
        row = a.row(region_of)
        row.update(method=spec.name, title=spec.title, base_method=spec.method, options=dict(spec.options),
                   layer=layers_used.get(spec, spec.layer or explainer.layer), images=n,
                   flat_maps=int(flat[spec].sum()), noisy_passes_skipped=bool(skipped.get(spec, False)))
        rows.append(row)
        curves_out[spec.name] = {"deletion": a.deletion_sum / n, "insertion": a.insertion_sum / n}
    sample_records = _sample_records(dataset, specs, acc, flat, classes, predicted, probabilities, explainer)
    settings = {
        "model": explainer.model_name, "data": dataset.describe(), "data_source": dataset.source,
        "methods": [spec.name for spec in specs], "default_layer": explainer.layer,
        "samples": samples, "noise_level": noise_level, "seed": seed, "steps": steps,
        "tolerance_px": tolerance, "coverage_threshold": coverage_threshold,
        "deletion_baseline": _baseline_text(deletion_baseline),
        "insertion_baseline": _baseline_text(insertion_baseline), "blur_sigma": blur_sigma,
        "target": target, "map_size": list(input_hw), "preprocessing": explainer.preprocessing_info(),
        "batch_size": bs,
        "device": explainer.session.device or "cpu",
    }
    summary = {
        "images": n, "labelled": int(labelled.sum()), "accuracy": accuracy,
        "with_region": int(sum(region_of)),
        "multi_instance": int(sum(1 for s in dataset.samples if s.has_region and s.instance_count() >= 2)),
    }
    return Evaluation(rows, sample_records, fractions, curves_out, settings, summary, timings)


class _Accumulator:
    def __init__(self, n: int) -> None:
        self.drops = np.zeros(n)
        self.increased = np.zeros(n, dtype=bool)
        self.explanation_probs = np.zeros(n)
        self.deletion = np.zeros(n)
        self.insertion = np.zeros(n)
        self.hit = np.zeros(n, dtype=bool)
        self.distance = np.full(n, np.nan)     # px from the map's maximum to the region (0 inside)
        self.energy = np.full(n, np.nan)
        self.covered = np.zeros(n, dtype=np.int64)
        self.instances = np.zeros(n, dtype=np.int64)
        self.deletion_sum: np.ndarray | Any = 0.0
        self.insertion_sum: np.ndarray | Any = 0.0

    def add_curves(self, deletion: np.ndarray, insertion: np.ndarray) -> None:
        self.deletion_sum = self.deletion_sum + deletion.sum(axis=0)
        self.insertion_sum = self.insertion_sum + insertion.sum(axis=0)

    def row(self, region_of: list[bool]) -> dict[str, Any]:
        regions = np.array(region_of, dtype=bool)
        multi = regions & (self.instances >= 2)
        n_regions, n_multi = int(regions.sum()), int(multi.sum())
        return {
            "pointing_game": float(self.hit[regions].mean()) if n_regions else None,
            "pointing_images": n_regions,
            "energy_pointing_game": float(self.energy[regions].mean()) if n_regions else None,
            "average_drop": float(100.0 * self.drops.mean()),
            "increase_in_confidence": float(100.0 * self.increased.mean()),
            "deletion_auc": float(self.deletion.mean()),
            "insertion_auc": float(self.insertion.mean()),
            "instance_coverage": (float(self.covered[multi].sum() / self.instances[multi].sum())
                                  if n_multi else None),
            "instance_coverage_mean": (float((self.covered[multi] / self.instances[multi]).mean())
                                       if n_multi else None),
            "coverage_images": n_multi,
        }


def _sample_records(dataset, specs, acc, flat, classes, predicted, probabilities, explainer) -> list[dict]:
    records = []
    for i, sample in enumerate(dataset.samples):
        record = {
            "sample": sample.key, "image": str(sample.image), "label": sample.label,
            "class": int(classes[i]), "class_name": explainer.label_of(int(classes[i])),
            "predicted": int(predicted[i]), "probability": float(probabilities[i, classes[i]]),
            "instances": sample.instance_count() if sample.has_region else 0, "methods": {},
        }
        for spec in specs:
            a = acc[spec]
            entry = {"flat": bool(flat[spec][i]), "drop": float(a.drops[i]),
                     "explanation_probability": float(a.explanation_probs[i]),
                     "increase": bool(a.increased[i]), "deletion_auc": float(a.deletion[i]),
                     "insertion_auc": float(a.insertion[i])}
            if sample.has_region:
                entry.update(pointing_hit=bool(a.hit[i]), pointing_distance=float(a.distance[i]),
                             energy=float(a.energy[i]),
                             covered=int(a.covered[i]))
            record["methods"][spec.name] = entry
        records.append(record)
    return records


def _distance(point: np.ndarray, region: Any, size: tuple[int, int]) -> float:
    """Pixels from the map's maximum ``point`` (row, col) to the nearest region pixel (0 inside;
    NaN for a flat map, whose point is (-1, -1), or an empty region)."""
    row, col = int(point[0]), int(point[1])
    if row < 0:
        return float("nan")
    rr, cc = np.nonzero(region_mask(region, size[0], size[1]))
    if rr.size == 0:
        return float("nan")
    return float(np.sqrt(((rr - row) ** 2 + (cc - col) ** 2).min()))


def _rounds(specs: list[MethodSpec]) -> list[list[MethodSpec]]:
    """Groups of specs that one iter_explain call can serve: one layer, each method name once."""
    rounds: list[list[MethodSpec]] = []
    for spec in specs:
        for group in rounds:
            if group[0].layer == spec.layer and all(other.method != spec.method for other in group):
                group.append(spec)
                break
        else:
            rounds.append([spec])
    return rounds


def _input_hw(x: np.ndarray, layout: str) -> tuple[int, int]:
    return (int(x.shape[2]), int(x.shape[3])) if layout == "NCHW" else (int(x.shape[1]), int(x.shape[2]))


def _to_nchw(x: np.ndarray, layout: str) -> np.ndarray:
    return x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _layout_predict(predictor: Predictor, layout: str):
    """The metrics build (N, C, H, W) batches; an NHWC model gets them transposed back."""
    if layout == "NCHW":
        return predictor
    return lambda x: predictor(np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1)))


def _baseline_text(value: Any) -> Any:
    return value if isinstance(value, (str, int, float)) else "array"


def _check_number(what: str, value: Any, low: float | None = None, high: float | None = None,
                  open_low: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number) or (low is not None and (number <= low if open_low else number < low)) \
            or (high is not None and number > high):
        bounds = f"in ({low}, {high}]" if open_low else f">= {low}" if high is None else f"in [{low}, {high}]"
        raise OptionError(f"{what} {value!r} must be a number {bounds}")
    return number


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise OptionError(f"steps {steps!r} must be a whole number >= 1")
    return int(steps)
