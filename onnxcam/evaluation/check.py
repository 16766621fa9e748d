"""A deployment gate: explanation checks from a TOML file, for CI.

Example ``check.toml`` (relative paths are relative to the TOML file's folder)::

    model = "../models/shapes_cnn.onnx"
    method = "gradcampp"            # default smoothgradcampp; variants in [method_options]
    # layer = "/features/relu4/Relu_output_0"
    # samples = 25, noise_level = 0.15, seed = 0, device = "cpu", batch_size = 16
    # preprocess = "unit", labels = "labels.txt", resize = "crop", crop_fraction = 0.875,
    # interpolation = "bicubic", scores_output = "logits" (a model with several outputs)
    # [inputs] scale_factor = 1.0   (the model's inputs other than the image: numbers, lists, .npy)

    [thresholds]
    prediction = true               # the predicted class must be the expected one
    pointing = true                 # the map's maximum must lie in the region (+ tolerance)
    tolerance = 15                  # pixels of the ORIGINAL image
    min_energy = 0.3                # share of the map's energy inside the region
    max_average_drop = 60.0         # percent, over all images (Average Drop)

    [[images]]
    path = "images/cat.png"
    class = "circle"                # a label or an index
    region = [16, 15, 51, 50]       # [x0, y0, x1, y1] in the image's pixels (or a list of boxes)
    # tolerance / min_energy here override [thresholds] for this image

Checks: per image "prediction"; with a region, "pointing" and (when ``min_energy`` is set)
"energy"; once for all images, "average drop" (when ``max_average_drop`` is set). The map that
is checked is the expected class's (so a misclassified image still gets its region checks).
Pointing and energy use the map at the original image size, so regions and tolerance are in the
image's own pixels; Average Drop uses the map at the model's input size, as ``evaluate`` does.

``load_check_config`` raises DataError (one line, naming the file and the key) for a bad config.
"""

from __future__ import annotations

import math
import os
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.errors import DataError, OptionError
from onnxcam.imaging.fit import check_interpolation, check_resize
from onnxcam.imaging.io import display_path

__all__ = ["CheckConfig", "CheckImage", "CheckReport", "CheckResult", "junit_xml", "load_check_config",
           "read_toml", "run_checks"]

TOP_KEYS = {"model", "method", "layer", "samples", "noise_level", "seed", "device", "batch_size",
            "preprocess", "labels", "method_options", "thresholds", "images", "name", "inputs", "resize",
            "crop_fraction", "interpolation", "scores_output"}
THRESHOLD_KEYS = {"prediction", "pointing", "tolerance", "min_energy", "max_average_drop"}
IMAGE_KEYS = {"path", "class", "region", "name", "tolerance", "min_energy"}


@dataclass
class CheckImage:
    path: Path
    shown: str                        # the path as written in the config
    expected: int | str               # index, or a label name resolved against the model later
    region: np.ndarray | None         # (K, 4) boxes in the image's pixels
    tolerance: float
    min_energy: float | None


@dataclass
class CheckConfig:
    path: Path
    name: str
    model: Path
    method: str
    method_options: dict[str, str]
    layer: str | None
    samples: int
    noise_level: float
    seed: int
    device: str | None
    batch_size: int | None
    preprocess: str | None
    labels: Path | None
    prediction: bool
    pointing: bool
    max_average_drop: float | None
    images: list[CheckImage]
    inputs: dict[str, Any] = field(default_factory=dict)  # the model's other inputs, fixed
    resize: str | None = None                # stretch, crop or pad (None: the model's metadata)
    crop_fraction: float | None = None
    interpolation: str | None = None
    scores_output: str | None = None         # the output holding the class scores (None: automatic)


@dataclass
class CheckResult:
    name: str
    kind: str                         # prediction, pointing, energy, average_drop
    passed: bool
    measured: str
    threshold: str
    image: str | None = None
    value: float | int | str | None = None
    limit: float | int | str | None = None
    seconds: float = 0.0

    @property
    def message(self) -> str:
        return f"{self.measured} vs {self.threshold}"

    def line(self, width: int = 0) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name.ljust(width)}  {self.message}"


@dataclass
class CheckReport:
    config: CheckConfig
    results: list[CheckResult]
    layer: str
    device: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)

    @property
    def failures(self) -> int:
        return sum(not result.passed for result in self.results)

    def text(self) -> str:
        width = max((len(r.name) for r in self.results), default=0)
        lines = [r.line(width) for r in self.results]
        total = len(self.results)
        lines.append(f"all {total} checks passed" if self.passed
                     else f"{self.failures} of {total} checks failed")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "config": str(c.path), "name": c.name, "model": str(c.model), "method": c.method,
            "method_options": c.method_options, "layer": self.layer, "device": self.device,
            "passed": self.passed, "checks": len(self.results), "failures": self.failures,
            "results": [{"name": r.name, "kind": r.kind, "image": r.image, "passed": r.passed,
                         "value": _finite(r.value), "threshold": _finite(r.limit), "message": r.message}
                        for r in self.results],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def _finite(value):
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------
# The configuration


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file (tomllib on Python >= 3.11, the tomli package on 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise DataError("reading a TOML check file on Python 3.10 needs the 'tomli' package "
                            "(pip install tomli), or Python 3.11+") from None
    name = display_path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: no such check file; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder; give the TOML check file") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot read the file ({exc.strerror or type(exc).__name__})") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{name}: not UTF-8 text; a check file is TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{name}: not valid TOML ({' '.join(str(exc).split())})") from None


def load_check_config(path: str | os.PathLike) -> CheckConfig:
    """Read and validate a check file; every problem is a one-line DataError naming the key."""
    file = Path(path)
    raw = read_toml(file)
    name = display_path(file)
    base = file.parent
    _unknown(raw, TOP_KEYS, name, "")
    model = _string(raw, "model", name, required=True)
    method_text = _string(raw, "method", name) or "smoothgradcampp"
    from onnxcam.cams import METHODS, canonical_method_name

    try:
        method = canonical_method_name(method_text)
    except OptionError as exc:
        raise DataError(f"{name}: method: {exc}") from None
    options_raw = raw.get("method_options", {})
    if not isinstance(options_raw, dict) or not all(isinstance(v, str) for v in options_raw.values()):
        raise DataError(f"{name}: [method_options] must be a table of text values (e.g. averaging = \"maps\")")
    for key in options_raw:
        if key not in METHODS[method].allowed_options:
            takes = ", ".join(METHODS[method].allowed_options) or "no options"
            raise DataError(f"{name}: [method_options] {key!r} is not an option of {method} ({takes})")
    samples = _integer(raw, "samples", name, 25, low=1)
    seed = _integer(raw, "seed", name, 0, low=0)
    batch_size = _integer(raw, "batch_size", name, None, low=1)
    noise_level = _number(raw, "noise_level", name, 0.15, low=0)
    thresholds = raw.get("thresholds", {})
    if not isinstance(thresholds, dict):
        raise DataError(f"{name}: 'thresholds' must be a table ([thresholds])")
    _unknown(thresholds, THRESHOLD_KEYS, name, "[thresholds] ")
    prediction = _boolean(thresholds, "prediction", name, True, "[thresholds] ")
    pointing = _boolean(thresholds, "pointing", name, True, "[thresholds] ")
    tolerance = _number(thresholds, "tolerance", name, 15.0, low=0, where="[thresholds] ")
    min_energy = _number(thresholds, "min_energy", name, None, low=0, high=1, where="[thresholds] ")
    max_drop = _number(thresholds, "max_average_drop", name, None, low=0, where="[thresholds] ")
    entries = raw.get("images")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{name}: give at least one [[images]] table with path and class")
    images = []
    for i, entry in enumerate(entries):
        where = f"[[images]] #{i + 1} "
        _unknown(entry, IMAGE_KEYS, name, where)
        shown = _string(entry, "path", name, required=True, where=where)
        image_path = _resolve(base, shown)
        if not image_path.is_file():
            raise DataError(f"{name}: {where}path {shown!r}: no such file ({display_path(image_path)})")
        if "class" not in entry:
            raise DataError(f"{name}: {where}({shown}): 'class' is missing (the expected class, a label or index)")
        expected = entry["class"]
        if isinstance(expected, bool) or not isinstance(expected, (int, str)) or \
                (isinstance(expected, int) and expected < 0) or (isinstance(expected, str) and not expected.strip()):
            raise DataError(f"{name}: {where}({shown}): 'class' must be a class index >= 0 or a label")
        region = None
        if "region" in entry:
            region = _region(entry["region"], f"{name}: {where}({shown}): 'region'")
        images.append(CheckImage(
            path=image_path, shown=entry.get("name", shown) if isinstance(entry.get("name"), str) else shown,
            expected=expected, region=region,
            tolerance=_number(entry, "tolerance", name, tolerance, low=0, where=where),
            min_energy=_number(entry, "min_energy", name, min_energy, low=0, high=1, where=where)))
    labels = _string(raw, "labels", name)
    inputs = _inputs(raw.get("inputs", {}), base, name)
    resize = _string(raw, "resize", name)
    crop_fraction = _number(raw, "crop_fraction", name, None, low=0, high=1)
    interpolation = _string(raw, "interpolation", name)
    try:
        check_resize(resize, crop_fraction)
        check_interpolation(interpolation)
    except OptionError as exc:
        raise DataError(f"{name}: {exc}") from None
    return CheckConfig(
        path=file, name=_string(raw, "name", name) or file.stem, model=_resolve(base, model), method=method,
        method_options=dict(options_raw), layer=_string(raw, "layer", name), samples=samples,
        noise_level=noise_level, seed=seed, device=_string(raw, "device", name), batch_size=batch_size,
        preprocess=_string(raw, "preprocess", name), labels=_resolve(base, labels) if labels else None,
        prediction=prediction, pointing=pointing, max_average_drop=max_drop, images=images, inputs=inputs,
        resize=resize, crop_fraction=crop_fraction, interpolation=interpolation,
        scores_output=_string(raw, "scores_output", name))


def _inputs(table: Any, base: Path, name: str) -> dict[str, Any]:
    """[inputs]: the model's inputs other than the image, each a number, a list of numbers or the
    path of a .npy file (relative to the check file's folder)."""
    if not isinstance(table, dict):
        raise DataError(f"{name}: 'inputs' must be a table ([inputs] name = value)")
    values = {}
    for key, value in table.items():
        if isinstance(value, str):
            values[key] = str(_resolve(base, value))
        elif isinstance(value, (bool, int, float, list)):  # a bool for a flag input
            values[key] = value
        else:
            raise DataError(f"{name}: [inputs] {key}: give a number (or true/false), a list of numbers or a "
                            ".npy file's path")
    return values


def _resolve(base: Path, text: str) -> Path:
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else base / path


def _unknown(table: dict, known: set[str], name: str, where: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise DataError(f"{name}: {where}unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")


def _string(table: dict, key: str, name: str, required: bool = False, where: str = "") -> str | None:
    if key not in table:
        if required:
            raise DataError(f"{name}: {where}'{key}' is missing")
        return None
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{name}: {where}'{key}' must be a non-empty text value")
    return value


def _integer(table: dict, key: str, name: str, default, low: int) -> int | None:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"{name}: '{key}' must be a whole number >= {low}, got {value!r}")
    return value


def _number(table: dict, key: str, name: str, default, low: float | None = None, high: float | None = None,
            where: str = "") -> float | None:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" in [{low:g}, {high:g}]" if high is not None else f" >= {low:g}" if low is not None else ""
        raise DataError(f"{name}: {where}'{key}' must be a number{bounds}, got {value!r}")
    return float(value)


def _boolean(table: dict, key: str, name: str, default: bool, where: str) -> bool:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, bool):
        raise DataError(f"{name}: {where}'{key}' must be true or false, got {value!r}")
    return value


def _region(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be [x0, y0, x1, y1] (or a list of such boxes)")
    boxes = value if isinstance(value[0], list) else [value]
    rows = []
    for box in boxes:
        if not isinstance(box, list) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
            raise DataError(f"{where} must be [x0, y0, x1, y1] numbers, got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 <= x0 or y1 <= y0 or x0 < 0 or y0 < 0:
            raise DataError(f"{where} {box!r} is not a box: need 0 <= x0 < x1 and 0 <= y0 < y1")
        rows.append([x0, y0, x1, y1])
    return np.array(rows, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Running the checks


def run_checks(config: CheckConfig, explainer=None) -> CheckReport:
    """Explain the config's images with its method and evaluate every check."""
    from onnxcam.cams import normalize, upsample_bilinear
    from onnxcam.errors import TargetError
    from onnxcam.evaluation.predictor import Predictor
    from onnxcam.explain import Explainer
    from onnxcam.metrics import explanation_map_scores, region_mask

    started = time.perf_counter()
    if explainer is None:
        explainer = Explainer(config.model, layer=config.layer, device=config.device,
                              batch_size=config.batch_size, preprocess=config.preprocess,
                              resize=config.resize, crop_fraction=config.crop_fraction,
                              interpolation=config.interpolation,
                              labels=config.labels, inputs=config.inputs or None,
                              scores_output=config.scores_output)
    name = display_path(config.path)
    expected = []
    for image in config.images:
        if isinstance(image.expected, int):
            if explainer.num_classes is not None and image.expected >= explainer.num_classes:
                raise DataError(f"{name}: ({image.shown}): class {image.expected} is out of range "
                                f"(the model has {explainer.num_classes} classes)")
            expected.append(image.expected)
        else:
            labels = explainer.labels or []
            lookup = {label.lower(): i for i, label in enumerate(labels)}
            index = lookup.get(image.expected.strip().lower())
            if index is None:
                shown = ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "") if labels else "none"
                raise DataError(f"{name}: ({image.shown}): class {image.expected!r} is not one of the model's "
                                f"labels ({shown})")
            expected.append(index)
    t0 = time.perf_counter()
    paths = [image.path for image in config.images]
    options = {config.method: config.method_options} if config.method_options else None
    try:
        explanations = explainer.compare(paths, methods=(config.method,), targets=expected,
                                         samples=config.samples, noise_level=config.noise_level,
                                         seed=config.seed, method_options=options)[config.method]
    except TargetError as exc:
        raise DataError(f"{name}: {exc}") from None
    explain_s = time.perf_counter() - t0
    per_image_s = explain_s / len(paths)
    # the predictions: one batched pass through the Explainer's session
    t1 = time.perf_counter()
    x = explainer.preprocess(paths)
    predictor = Predictor(explainer)
    probabilities, predictions = predictor.predict(x)
    predict_s = time.perf_counter() - t1
    results: list[CheckResult] = []
    for row, (image, cls, explanation) in enumerate(zip(config.images, expected, explanations)):
        if config.prediction:
            predicted = int(predictions[row])
            results.append(CheckResult(
                name=f"{image.shown}: prediction", kind="prediction", image=image.shown,
                passed=predicted == cls,
                measured=f"predicted {explainer.label_of(predicted)} (p={probabilities[row, predicted]:.3f})",
                threshold=f"expected {explainer.label_of(cls)} (p={probabilities[row, cls]:.3f})",
                value=predicted, limit=cls, seconds=per_image_s + predict_s / len(paths)))
        if image.region is None:
            continue
        heat = explanation.map.astype(np.float64)
        height, width = heat.shape
        mask = region_mask(image.region, height, width, what=f"{image.shown} region")
        if config.pointing:
            distance, where = _pointing_distance(heat, mask)
            if distance is None:
                measured = "flat map (no maximum)" if where is None else "region is empty at this image size"
                passed = False
            else:
                passed = distance <= image.tolerance
                measured = (f"max at (x={where[1]}, y={where[0]}) " +
                            ("inside the region" if distance == 0 else f"{distance:.1f} px from the region"))
            results.append(CheckResult(
                name=f"{image.shown}: pointing", kind="pointing", image=image.shown, passed=passed,
                measured=measured, threshold=f"tolerance {image.tolerance:g} px",
                value=distance, limit=image.tolerance, seconds=per_image_s))
        if image.min_energy is not None:
            total = heat.sum()
            share = float(heat[mask].sum() / total) if total > 0 else 0.0
            results.append(CheckResult(
                name=f"{image.shown}: energy", kind="energy", image=image.shown,
                passed=share >= image.min_energy, measured=f"energy in region {share:.3f}",
                threshold=f"min {image.min_energy:.3f}", value=share, limit=image.min_energy,
                seconds=per_image_s))
    if config.max_average_drop is not None:
        t2 = time.perf_counter()
        layout = explainer.layout
        hw = (x.shape[2], x.shape[3]) if layout == "NCHW" else (x.shape[1], x.shape[2])
        maps01 = normalize(upsample_bilinear(np.stack([e.raw_map for e in explanations]), hw))
        classes = np.array(expected)
        base = probabilities[np.arange(len(paths)), classes]
        if layout == "NCHW":
            predict = predictor
        else:
            x = x.transpose(0, 3, 1, 2)

            def predict(batch):
                return predictor(np.ascontiguousarray(np.asarray(batch).transpose(0, 2, 3, 1)))
        scores = explanation_map_scores(predict, x, maps01, classes, batch_size=predictor.batch_size,
                                        base_probs=base)
        drop = scores.average_drop
        results.append(CheckResult(
            name=f"average drop ({len(paths)} image{'s' if len(paths) != 1 else ''})", kind="average_drop",
            passed=drop <= config.max_average_drop, measured=f"{drop:.1f}%",
            threshold=f"max {config.max_average_drop:.1f}%", value=drop, limit=config.max_average_drop,
            seconds=time.perf_counter() - t2))
    device = explanations[0].device if explanations else "cpu"
    return CheckReport(config, results, explainer.layer, device,
                       {"explain_s": explain_s, "predict_s": predict_s, "total_s": time.perf_counter() - started})


def _pointing_distance(heat: np.ndarray, mask: np.ndarray) -> tuple[float | None, tuple[int, int] | None]:
    """(distance in pixels from the map's maximum to the nearest region pixel, (row, col) of the
    maximum); (None, None) for a flat map, (None, point) for an empty region."""
    flat = heat.reshape(-1)
    if flat.max() == flat.min():
        return None, None
    row, col = divmod(int(np.argmax(flat)), heat.shape[1])
    rr, cc = np.nonzero(mask)
    if rr.size == 0:
        return None, (row, col)
    distance = float(np.sqrt(((rr - row) ** 2 + (cc - col) ** 2).min()))
    return distance, (row, col)


# ----------------------------------------------------------------------------------------------
# JUnit XML


def junit_xml(report: CheckReport) -> bytes:
    """JUnit XML: one testsuite, one testcase per check, a <failure> for each failed one."""
    suite_name = f"onnxcam check {report.config.name}"
    suites = ET.Element("testsuites", name="onnxcam check", tests=str(len(report.results)),
                        failures=str(report.failures), errors="0",
                        time=f"{report.timings.get('total_s', 0.0):.3f}")
    suite = ET.SubElement(suites, "testsuite", name=suite_name, tests=str(len(report.results)),
                          failures=str(report.failures), errors="0", skipped="0",
                          time=f"{report.timings.get('total_s', 0.0):.3f}")
    properties = ET.SubElement(suite, "properties")
    for key, value in (("model", str(report.config.model)), ("method", report.config.method),
                       ("layer", report.layer), ("device", report.device), ("config", str(report.config.path))):
        ET.SubElement(properties, "property", name=key, value=_xml_text(value))
    classname = f"onnxcam.check.{_xml_text(report.config.name)}"
    for result in report.results:
        case = ET.SubElement(suite, "testcase", classname=classname, name=_xml_text(result.name),
                             time=f"{result.seconds:.3f}")
        if not result.passed:
            failure = ET.SubElement(case, "failure", message=_xml_text(result.message), type=result.kind)
            failure.text = _xml_text(f"{result.name}: {result.message}")
        else:
            out = ET.SubElement(case, "system-out")
            out.text = _xml_text(result.message)
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def _xml_text(text: str) -> str:
    """Drop the characters XML 1.0 cannot carry (control characters from odd file names)."""
    return "".join(ch for ch in str(text) if ch in "\t\n\r" or (ord(ch) >= 0x20 and ch not in "\ufffe\uffff"))
