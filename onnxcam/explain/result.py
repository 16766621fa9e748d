"""The result of explaining one image for one class (or neuron): ``Explanation``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from onnxcam.atomic import atomic_path
from onnxcam.imaging.io import save_options
from onnxcam.cams import footprint_mask, normalize, upsample_bilinear
from onnxcam.errors import OptionError
from onnxcam.imaging import load_image, outline, overlay as blend
from onnxcam.jsonable import to_jsonable

METHOD_TITLES = {
    "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "smoothgradcampp": "Smooth Grad-CAM++",
    "xgradcam": "XGrad-CAM", "layercam": "LayerCAM", "hirescam": "HiResCAM",
}


@dataclass(eq=False)
class Explanation:
    """One map: ``map`` (H, W) float32 in [0, 1] at the original image size (the model's input size
    for array inputs), ``raw_map`` (h, w) at the target layer's resolution, not normalised.
    ``footprint`` = (top, left, height, width) is the rectangle of the image the model saw, in the
    map's pixels (None: the whole image, stretched); a centre crop leaves the map 0 outside it.

    ``class_index``/``label``/``score`` (the pre-softmax logit)/``probability`` describe the class
    explained; for a neuron-level map they are None and ``neuron`` holds the index tuples. For a
    segmentation model ``region`` (h, w) bool holds the pixels of the model's scores the class is
    predicted at (the score is its logits summed there), outlined on the overlay.
    ``flat`` is True when the map is identically zero (no positive evidence). ``timings`` are the
    seconds spent on the group of images this result was computed with.
    """

    raw_map: np.ndarray
    method: str
    options: dict[str, Any]
    layer: str
    class_index: int | None
    label: str | None
    score: float | None
    probability: float | None
    flat: bool
    image_index: int
    image_size: tuple[int, int]                 # (H, W) of the map
    footprint: tuple[float, float, float, float] | None = None  # what the model saw; None: all
    source: str | None = None                   # the image file, when one was given
    model: str = ""
    score_tensor: str | None = None             # set for neuron-level maps
    neuron: tuple[tuple[int, ...], ...] | None = None
    device: str = "cpu"
    batch_size: int = 1
    noisy_passes_skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    region: np.ndarray | None = None            # a segmentation class's pixels, at the scores' grid
    _image: Image.Image | None = field(default=None, repr=False)
    _array: np.ndarray | None = field(default=None, repr=False)   # (H, W, C) input for array inputs
    _map: np.ndarray | None = field(default=None, repr=False)

    # -- the map ---------------------------------------------------------------------------
    @property
    def map(self) -> np.ndarray:
        """(H, W) float32 in [0, 1]: raw_map upsampled (bilinear) over the image part the model
        saw, min-max normalised there and 0 elsewhere; all zeros for a flat map."""
        if self._map is None:
            values = upsample_bilinear(self.raw_map, self.image_size, self.footprint)
            seen = self.seen
            if seen is not None:  # the part the model did not see takes the seen part's minimum: 0
                values = np.where(seen, values, values[seen].min())
            self._map = normalize(values)
        return self._map

    @property
    def seen(self) -> np.ndarray | None:
        """(H, W) bool: the image pixels the model saw; None when it saw all of them."""
        if self.footprint is None:
            return None
        seen = footprint_mask(self.image_size, self.footprint)
        return None if seen.all() else seen

    @property
    def region_on_image(self) -> np.ndarray | None:
        """(H, W) bool: ``region`` on the map's pixels (through the footprint); None for a
        classifier."""
        if self.region is None:
            return None
        on_image = upsample_bilinear(np.asarray(self.region, dtype=np.float32), self.image_size, self.footprint) >= 0.5
        seen = self.seen
        return on_image if seen is None else on_image & seen

    @property
    def method_title(self) -> str:
        return METHOD_TITLES.get(self.method, self.method)

    @property
    def target_tag(self) -> str:
        """``c281`` for a class, ``n3-1-1`` (``+``-joined) for neurons: used in file names."""
        if self.neuron is None:
            return f"c{self.class_index}"
        text = "+".join("-".join(str(i) for i in item) for item in self.neuron)
        return "n" + (text if len(text) <= 40 else f"{text[:32]}-and-{len(self.neuron) - 1}-more")

    def image(self) -> Image.Image:
        """The image the map explains: the one given, the file re-read, or the array input
        min-max scaled to grey levels/RGB."""
        if self._image is not None:
            return self._image
        if self.source is not None:
            return load_image(self.source)
        if self._array is not None:
            values = np.asarray(self._array, dtype=np.float64)
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
            pixels = np.rint(scaled).astype(np.uint8)
            if pixels.shape[-1] == 1:
                pixels = np.repeat(pixels, 3, axis=-1)
            return Image.fromarray(np.ascontiguousarray(pixels[..., :3]))
        raise ValueError("this explanation has no image to overlay")

    def overlay(self, alpha: float = 0.5, colormap: str = "turbo") -> Image.Image:
        """The map coloured with ``colormap`` and blended over the image (``alpha`` = map weight)."""
        picture = blend(self.image(), self.map, alpha=alpha, colormap=colormap, seen=self.seen)
        return picture if self.region is None else outline(picture, self.region_on_image)

    # -- records and files -----------------------------------------------------------------
    def file_stem(self, stem: str | None = None) -> str:
        """``<stem>_<method>_<target>``: stem defaults to the image file's stem or ``image<index>``."""
        if stem is None:
            stem = Path(self.source).stem if self.source else f"image{self.image_index}"
        return f"{_safe(stem)}_{self.method}_{self.target_tag}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: what was explained, how, the result summary, timings and device."""
        from onnxcam import __version__

        record = {
            "onnxcam": __version__,
            "model": self.model,
            "image": self.source,
            "image_index": self.image_index,
            "map_size": {"height": self.image_size[0], "width": self.image_size[1]},
            "footprint": (None if self.footprint is None else
                          dict(zip(("top", "left", "height", "width"), (round(v, 3) for v in self.footprint)))),
            "layer": self.layer,
            "layer_map_size": {"height": int(self.raw_map.shape[0]), "width": int(self.raw_map.shape[1])},
            "method": self.method,
            "method_title": self.method_title,
            "options": self.options,
            "class_index": self.class_index,
            "label": self.label,
            "score": _finite(self.score),
            "probability": _finite(self.probability),
            "score_tensor": self.score_tensor,
            "neuron": [list(item) for item in self.neuron] if self.neuron is not None else None,
            "flat": bool(self.flat),
            "noisy_passes_skipped": bool(self.noisy_passes_skipped),
            "device": self.device,
            "batch_size": self.batch_size,
            "timings": {key: value if isinstance(value, (int, np.integer)) else round(float(value), 6)
                        for key, value in self.timings.items()},
        }
        if self.noisy_passes_skipped:
            record["noisy_passes_note"] = (
                "the path from the layer to the score is linear, so every noisy gradient equals the "
                "clean one and the moments (D1, D2, D3) are exact without the noisy passes: this "
                "Smooth Grad-CAM++ equals Grad-CAM++ (choose an earlier layer or averaging 'maps' "
                "for the noise to matter)")
        record.update(self.extra)
        return to_jsonable(record)

    def save(self, out_dir: str | os.PathLike, stem: str | None = None, *, alpha: float = 0.5,
             colormap: str = "turbo", protected: tuple = (), image_format: str = "png") -> dict[str, Path]:
        """Write ``<stem>_<method>_<target>.png`` (overlay; ``.jpg`` with ``image_format="jpg"``),
        ``.npy`` (raw_map) and ``.json`` (the record) into ``out_dir`` (created if needed) and
        return their paths.

        The three files are written to temporary names first and renamed only once all three are
        complete. The image file itself and any path in ``protected`` are never overwritten.
        """
        options = save_options(image_format)
        folder = Path(out_dir)
        if folder.exists() and not folder.is_dir():
            raise OptionError(f"output folder '{folder}' is a file: give a folder for the outputs")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OptionError(f"cannot create the output folder '{folder}' ({exc.strerror or exc}): "
                              "choose another one") from None
        base = self.file_stem(stem)
        paths = {"overlay": folder / f"{base}.{image_format}", "raw_map": folder / f"{base}.npy",
                 "record": folder / f"{base}.json"}
        check_not_protected(paths.values(), [self.source, *protected] if self.source else protected)
        picture = self.overlay(alpha=alpha, colormap=colormap)
        record = self.to_dict()
        record["files"] = {key: path.name for key, path in paths.items()}
        data = json.dumps(record, indent=2, allow_nan=False).encode("utf-8") + b"\n"
        with contextlib.ExitStack() as stack:
            picture_file = stack.enter_context(atomic_path(paths["overlay"]))
            npy = stack.enter_context(atomic_path(paths["raw_map"]))
            meta = stack.enter_context(atomic_path(paths["record"]))
            picture.save(picture_file, **options)
            np.save(npy, np.asarray(self.raw_map, dtype=np.float32))
            meta.write_bytes(data)
        return paths

    def __repr__(self) -> str:
        what = f"class={self.class_index} ({self.label!r})" if self.neuron is None else f"neuron={self.neuron}"
        return (f"Explanation({self.method_title}, image={self.source or self.image_index}, {what}, "
                f"map={self.image_size[1]}x{self.image_size[0]}, flat={self.flat})")


def check_not_protected(paths, protected) -> None:
    """OptionError if any of ``paths`` is (the same file as) one of ``protected``."""
    keys = {_key(p) for p in protected if p is not None}
    for path in paths:
        if _key(path) in keys:
            raise OptionError(f"refusing to write '{path}': it is one of the input files; choose "
                              "another output folder (--out)")


def _key(path) -> str:
    return os.path.normcase(os.path.realpath(os.fspath(path)))


def _safe(stem: str) -> str:
    """A file-name-safe stem (no separators or control characters)."""
    cleaned = re.sub(r"[\x00-\x1f/\\:]+", "_", stem).strip() or "image"
    return cleaned


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
