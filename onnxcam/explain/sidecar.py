"""Preprocessing and class names from the files exporters leave next to the model.

A model exported with Hugging Face's optimum comes in a folder with ``preprocessor_config.json``
(the image processor: size, crop, resampling, rescale factor, mean and std) and ``config.json``
(``id2label``); one from timm's hub has ``config.json`` with ``pretrained_cfg`` (input size,
``crop_pct``, ``crop_mode``, interpolation, mean, std) and ``label_names``. Deployment feeds the
model what those files say, so onnxcam reads them when the options and the model's metadata do not
say otherwise: a ViT that expects mean 0.5 and std 0.5 is not fed ImageNet statistics, and a
fine-tuned model's classes have their names.

A ``config.json`` without those keys, or one that is not JSON at all, is someone else's file and
is left alone; a ``preprocessor_config.json`` that cannot be read is an error naming it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcam.errors import ModelError
from onnxcam.imaging.fit import INTERPOLATIONS

PROCESSOR_FILE = "preprocessor_config.json"
CONFIG_FILE = "config.json"
#: Pillow's resampling codes, as Hugging Face's processors store them
PIL_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
#: the settings that describe one way of fitting the image, taken from one file
GEOMETRY = ("resize", "crop_fraction", "size", "test_size", "test_crop_fraction", "centring")


@dataclass(frozen=True)
class Sidecar:
    """What the files next to a model say about feeding it; None where they say nothing.
    ``mean``/``std`` are in 0-1 units (the ``unit`` preset's) after the rescale factor."""

    files: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str | None = None
    crop_fraction: float | None = None
    interpolation: str | None = None
    size: tuple[int, int] | None = None          # the (H, W) the model is fed
    labels: list[str] | None = field(default=None, repr=False)
    test_size: tuple[int, int] | None = None     # timm's test_input_size, with its own crop
    test_crop_fraction: float | None = None
    centring: str = "round"                      # where a crop's margin is split: "floor" for HF

    def crop_fraction_at(self, size: tuple[int, int] | None) -> float | None:
        """The crop fraction for a model fed ``size``: timm's test_crop_pct at its test size."""
        if size is not None and tuple(size) == self.test_size and self.test_crop_fraction is not None:
            return self.test_crop_fraction
        return self.crop_fraction

    @property
    def describes_preprocessing(self) -> bool:
        return self.mean is not None or self.std is not None

    @property
    def source(self) -> str:
        return " and ".join(self.files) + " next to the model"

    @property
    def labels_source(self) -> str:
        return f"{CONFIG_FILE} next to the model"  # id2label or label_names


def read_sidecar(model: Any) -> Sidecar | None:
    """The settings in ``preprocessor_config.json`` and ``config.json`` beside the model file;
    None for a ModelProto or a folder without them. A file that is not valid JSON is a ModelError
    naming it."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    folder = Path(model).parent
    processor = _read_json(folder / PROCESSOR_FILE)
    config = _read_json(folder / CONFIG_FILE, strict=False)  # a common name: maybe not an exporter's
    settings: dict[str, Any] = {}
    files = []
    if processor is not None:
        settings.update(_from_processor(processor, folder / PROCESSOR_FILE))
        files.append(PROCESSOR_FILE)
    if config is not None:
        from_config = _from_timm(config, folder / CONFIG_FILE) if "pretrained_cfg" in config else {}
        labels = _labels(config, folder / CONFIG_FILE)
        if labels is not None:
            from_config["labels"] = labels
        if "resize" in settings:  # the image processor's own file comes first, its geometry whole
            from_config = {key: value for key, value in from_config.items() if key not in GEOMETRY}
        for key, value in from_config.items():
            settings.setdefault(key, value)
        if from_config:
            files.append(CONFIG_FILE)
    return Sidecar(files=tuple(files), **settings) if settings else None


def _read_json(path: Path, strict: bool = True) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if not strict:
            return None
        raise ModelError(f"'{path}' next to the model is not readable JSON ({exc}): fix or remove it, or "
                         "give the preprocessing and labels as options") from None
    return value if isinstance(value, dict) else None


def _from_processor(processor: dict, path: Path) -> dict[str, Any]:
    """A Hugging Face image processor: rescale, normalise, resize, centre crop."""
    settings: dict[str, Any] = {}
    scale = _number(processor.get("rescale_factor", 1 / 255), path, "rescale_factor") \
        if processor.get("do_rescale", True) else 1.0
    offset = 1.0 if processor.get("rescale_offset") else 0.0     # EfficientNet's [-1, 1]
    mean = _numbers(processor.get("image_mean", [0.0]), path, "image_mean") \
        if processor.get("do_normalize", True) else (0.0,)
    std = _numbers(processor.get("image_std", [1.0]), path, "image_std") \
        if processor.get("do_normalize", True) else (1.0,)
    if processor.get("include_top") and str(processor.get("image_processor_type", "")).startswith("EfficientNet"):
        std = tuple(s * s for s in std)  # its processor divides by the std a second time
    # x = (p * scale - offset - mean) / std, written in 0-1 units: (p / 255 - mean') / std'
    units = 1 / (255 * scale)
    settings["mean"] = tuple((m + offset) * units for m in mean)
    settings["std"] = tuple(s * units for s in std)
    if "resample" in processor:
        settings["interpolation"] = PIL_CODES.get(processor["resample"])
    size = processor.get("size") if processor.get("do_resize", True) else None
    crop = _hw(processor.get("crop_size")) if processor.get("do_center_crop") else None
    if isinstance(size, dict) and "shortest_edge" in size:
        shortest = int(size["shortest_edge"])
        if "crop_pct" in processor:  # ConvNeXt: crop below 384, a square stretch from there on
            if shortest < 384:
                settings.update(resize="crop", crop_fraction=_number(processor["crop_pct"], path, "crop_pct"),
                                size=(shortest, shortest))
            else:
                settings.update(resize="stretch", size=(shortest, shortest))
        elif crop is not None:
            settings.update(resize="crop", crop_fraction=crop[0] / shortest, size=crop)
    elif _hw(size) is not None:
        height, width = _hw(size)  # type: ignore[misc]
        if crop is not None:
            settings.update(resize="stretch-crop", crop_fraction=crop[0] / height, size=crop)
        else:
            settings.update(resize="stretch", size=(height, width))
    if "resize" in settings:
        settings["centring"] = "floor"  # transformers' center_crop: (size - crop) // 2
    return settings


def _from_timm(config: dict, path: Path) -> dict[str, Any]:
    """timm's pretrained_cfg: input size, crop_pct and crop_mode, interpolation, mean, std."""
    cfg = config["pretrained_cfg"]
    if not isinstance(cfg, dict):
        return {}
    settings: dict[str, Any] = {}
    if "mean" in cfg:
        settings["mean"] = _numbers(cfg["mean"], path, "pretrained_cfg.mean")
    if "std" in cfg:
        settings["std"] = _numbers(cfg["std"], path, "pretrained_cfg.std")
    if cfg.get("interpolation") in INTERPOLATIONS:
        settings["interpolation"] = cfg["interpolation"]
    input_size = cfg.get("input_size")
    if isinstance(input_size, list) and len(input_size) == 3:
        settings["size"] = (int(input_size[1]), int(input_size[2]))
        fraction = _number(cfg.get("crop_pct", 0.875), path, "pretrained_cfg.crop_pct")
        mode = cfg.get("crop_mode", "center")
        square = input_size[1] == input_size[2]
        if mode == "squash" or (mode == "center" and not square):
            settings.update(resize="stretch-crop", crop_fraction=fraction)
        elif mode == "border":
            settings.update(resize="pad")  # the longest edge fitted, on the mean colour
        else:
            settings.update(resize="crop", crop_fraction=fraction)
        test_size = cfg.get("test_input_size")
        if settings.get("crop_fraction") is not None and isinstance(test_size, list) and len(test_size) == 3:
            settings.update(test_size=(int(test_size[1]), int(test_size[2])),
                            test_crop_fraction=_number(cfg.get("test_crop_pct", fraction), path,
                                                       "pretrained_cfg.test_crop_pct"))
    return settings


def _labels(config: dict, path: Path) -> list[str] | None:
    """``id2label`` (transformers) or ``label_names`` (timm), in class order."""
    if isinstance(config.get("label_names"), list):
        return [str(name) for name in config["label_names"]]
    table = config.get("id2label")
    if not isinstance(table, dict) or not table:
        return None
    try:
        indexed = {int(key): str(value) for key, value in table.items()}
    except (TypeError, ValueError):
        raise ModelError(f"'{path}': id2label keys must be class indices: fix or remove it, or give --labels") \
            from None
    if sorted(indexed) != list(range(len(indexed))):
        raise ModelError(f"'{path}': id2label does not number the classes 0 to {len(indexed) - 1}: fix or "
                         "remove it, or give --labels")
    names = [indexed[i] for i in range(len(indexed))]
    if names == [f"LABEL_{i}" for i in range(len(names))]:  # transformers' placeholders: no names
        return None
    return names


def _hw(value: Any) -> tuple[int, int] | None:
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    return None


def _number(value: Any, path: Path, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelError(f"'{path}': {key} {value!r} is not a positive number: fix or remove the file, or "
                         "give the preprocessing as options")
    return float(value)


def _numbers(value: Any, path: Path, key: str) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                         for v in values):
        raise ModelError(f"'{path}': {key} {value!r} is not a list of numbers: fix or remove the file, or "
                         "give --mean/--std")
    return tuple(float(v) for v in values)
