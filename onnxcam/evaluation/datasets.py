"""Evaluation data sets: image files with optional ground truth (class, boxes, masks).

``load_dataset(DATA, labels=...)`` reads a folder (or a manifest file) in one of these forms, the
first that applies:

1. **JSON manifest** (``manifest.json``, the format of ``models/localization/manifest.json``)::

       {"classes": ["circle", ...],                       # optional
        "images": [{"image": "0001.png", "label": 0,      # label: index (or class name), optional
                    "boxes": [[x0, y0, x1, y1], ...],     # optional
                    "mask": "masks/0001.png"}, ...]}      # optional

2. **CSV manifest** (``manifest.csv``, or the only ``.csv`` file in the folder): rows
   ``image,label,x0,y0,x1,y1`` (an optional header row starting with ``image``); several rows for
   one image give several boxes; the label may be a class index or name, or empty (unknown); the
   four box fields may all be empty (no box).
3. **Pascal VOC** XML files next to the images (``0001.xml`` for ``0001.jpg``): every
   ``object`` with ``name`` and ``bndbox`` (xmin, ymin, xmax, ymax). Names are mapped to class
   indices through the model's labels (an integer name is taken as an index). An image whose
   objects belong to several classes gives one sample per class, each with its own boxes.
4. **Mask PNGs** only: ``masks/<stem>.png`` (or ``<stem>_mask.png`` next to the image).
5. Plain images: no ground truth (the faithfulness metrics still apply, for the predicted class).

Mask PNGs can accompany any of the forms (a ``mask`` entry in JSON, or the file-name conventions
of 4). A mask has the image's size; 0 is background and every other value one instance (so a
0/255 mask is one region, and an instance-id PNG gives one instance per id).

Coordinates: boxes are in the **original image's pixels**, pixel-edge convention (the image spans
``[0, W] x [0, H]``; integer boxes are the slice ``[y0:y1, x0:x1]``, x1/y1 exclusive; see
:mod:`onnxcam.metrics.regions`). VOC's 1-based inclusive pixel indices are converted:
``[xmin - 1, ymin - 1, xmax, ymax]``. :meth:`Sample.regions_at` rescales boxes (and resizes masks,
nearest neighbour) to the size the maps are computed at (the model input).

Every malformed file raises :class:`~onnxcam.errors.DataError` with one line that names the file
and the line, entry or field at fault.
"""

from __future__ import annotations

import csv
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from onnxcam.errors import DataError, ImageError
from onnxcam.imaging import find_images
from onnxcam.imaging.io import display_path
from onnxcam.metrics.regions import scale_boxes

__all__ = ["Dataset", "Sample", "load_dataset"]

MASK_FOLDER = "masks"
MASK_SUFFIX = "_mask"


@dataclass
class Sample:
    """One evaluation item: an image, the class to explain (None: the predicted one) and its
    ground-truth region (boxes and/or a mask, in the image's own pixels), if any."""

    image: Path
    label: int | None = None
    label_name: str | None = None
    boxes: np.ndarray | None = None          # (K, 4) float64, original pixels
    mask_path: Path | None = None
    key: str = ""                            # unique name in the data set (image, + class when repeated)
    _size: tuple[int, int] | None = field(default=None, repr=False)
    _mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def has_region(self) -> bool:
        return (self.boxes is not None and len(self.boxes) > 0) or self.mask_path is not None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image as onnxcam loads it (EXIF orientation applied), read from the header."""
        if self._size is None:
            self._size = image_size(self.image)
        return self._size

    def instance_mask(self) -> np.ndarray | None:
        """(K, H, W) bool instance masks at the original size, from the mask file; None without one."""
        if self.mask_path is None:
            return None
        if self._mask is None:
            self._mask = read_mask(self.mask_path, self.size)
        return self._mask

    def regions_at(self, size: tuple[int, int], footprint: tuple[float, float, float, float] | None = None) -> Any:
        """The region at map size (H, W): (K, H, W) instance masks when there is a mask file, else
        the (K, 4) boxes rescaled from the image size; None without ground truth. ``footprint`` =
        (top, left, height, width) is the image rectangle the model input covers, in the image's
        pixels (a centre crop or padding); None: the whole image, stretched."""
        height, width = size
        masks = self.instance_mask()
        if masks is not None:
            if footprint is not None:
                return _masks_in_footprint(masks, size, footprint)
            if masks.shape[1:] == (height, width):
                return masks
            resized = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((width, height),
                                                                                   Image.Resampling.NEAREST)) > 0
                       for m in masks]
            return np.stack(resized) if resized else np.zeros((0, height, width), dtype=bool)
        if self.boxes is None or len(self.boxes) == 0:
            return None
        if self.size == (height, width) and footprint is None:
            return self.boxes
        return scale_boxes(self.boxes, self.size, (height, width), footprint)

    def instance_count(self) -> int:
        masks = self.instance_mask()
        if masks is not None:
            return int(masks.shape[0])
        return 0 if self.boxes is None else int(len(self.boxes))


@dataclass
class Dataset:
    """The samples of a data set and where their ground truth came from."""

    root: Path
    samples: list[Sample]
    source: str                   # "json", "csv", "voc", "masks" or "images"
    manifest: Path | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def limit(self, count: int | None) -> "Dataset":
        """The first ``count`` samples (all when None)."""
        if count is None:
            return self
        return self.subset(self.samples[:count])

    def subset(self, samples: list[Sample]) -> "Dataset":
        """The same data set with only ``samples``."""
        return Dataset(self.root, samples, self.source, self.manifest, self.classes)

    def describe(self) -> str:
        regions = sum(sample.has_region for sample in self.samples)
        labelled = sum(sample.label is not None for sample in self.samples)
        where = display_path(self.manifest) if self.manifest is not None else display_path(self.root)
        return (f"{len(self.samples)} samples from {where} ({self.source}): {labelled} with a class, "
                f"{regions} with a region")


# ----------------------------------------------------------------------------------------------
# The entry point


def load_dataset(path: str | os.PathLike, labels: Sequence[str] | None = None,
                 num_classes: int | None = None) -> Dataset:
    """Read a data set folder (or a ``.json``/``.csv`` manifest file); see the module doc.

    ``labels``: the model's class names (to map names to indices); ``num_classes``: to check
    class indices. Raises DataError (one line) for anything malformed.
    """
    given = Path(path)
    if not given.exists():
        raise DataError(f"{display_path(given)}: no such data folder or manifest; check the path")
    classes = _Classes(labels, num_classes)
    if given.is_file():
        suffix = given.suffix.lower()
        if suffix == ".json":
            return _with_masks(_load_json(given, classes))
        if suffix == ".csv":
            return _with_masks(_load_csv(given, classes))
        raise DataError(f"{display_path(given)}: not a data set; give a folder of images, a manifest.json "
                        "or a .csv manifest")
    if not given.is_dir():
        raise DataError(f"{display_path(given)}: not a folder or a manifest file")
    manifest = given / "manifest.json"
    if manifest.is_file():
        return _with_masks(_load_json(manifest, classes))
    csv_files = sorted(p for p in given.glob("*.csv") if p.is_file() and not p.name.startswith("."))
    named = given / "manifest.csv"
    if named.is_file():
        return _with_masks(_load_csv(named, classes))
    if len(csv_files) == 1:
        return _with_masks(_load_csv(csv_files[0], classes))
    if len(csv_files) > 1:
        names = ", ".join(p.name for p in csv_files[:4])
        raise DataError(f"{display_path(given)}: several CSV files ({names}); name the manifest "
                        "(DATA/manifest.csv) or pass the CSV file itself")
    images = _folder_images(given)
    if any(image.with_suffix(".xml").is_file() for image in images):
        return _with_masks(_load_voc(given, images, classes))
    dataset = Dataset(given, [Sample(image, key=image.name) for image in images], "images")
    dataset = _with_masks(dataset)
    if any(sample.mask_path is not None for sample in dataset.samples):
        dataset.source = "masks"
    return dataset


# ----------------------------------------------------------------------------------------------
# Classes: indices or names, mapped onto the model's labels


class _Classes:
    def __init__(self, labels: Sequence[str] | None, num_classes: int | None) -> None:
        self.labels = list(labels) if labels is not None else None
        self.num_classes = num_classes if num_classes is not None else (len(self.labels) if self.labels else None)
        self.index = {name: i for i, name in enumerate(self.labels)} if self.labels else {}
        self.lower = {name.strip().lower(): i for i, name in enumerate(self.labels)} if self.labels else {}

    def name_of(self, index: int) -> str | None:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return None

    def check_index(self, index: int, where: str) -> int:
        if index < 0 or (self.num_classes is not None and index >= self.num_classes):
            limit = f"0 to {self.num_classes - 1}" if self.num_classes else "0 or more"
            raise DataError(f"{where}: class index {index} is out of range (the model's classes are {limit})")
        return index

    def from_name(self, name: str, where: str) -> int:
        """A class name (or an integer written as text) -> index."""
        text = name.strip()
        if text in self.index:
            return self.index[text]
        if text.lower() in self.lower:
            return self.lower[text.lower()]
        if _is_int_text(text):
            return self.check_index(int(text), where)
        if self.labels is None:
            raise DataError(f"{where}: class name {text!r} cannot be mapped to a class index: the model "
                            "has no labels (give --labels FILE, or use class indices)")
        shown = ", ".join(self.labels[:6]) + (", ..." if len(self.labels) > 6 else "")
        raise DataError(f"{where}: class name {text!r} is not one of the model's labels ({shown})")


def _is_int_text(text: str) -> bool:
    return text.lstrip("-").isdigit()


# ----------------------------------------------------------------------------------------------
# JSON


def _load_json(path: Path, classes: _Classes) -> Dataset:
    name = display_path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: cannot read the manifest ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if isinstance(raw, list):
        raw = {"images": raw}
    if not isinstance(raw, dict):
        raise DataError(f"{name}: the manifest must be a JSON object with an 'images' list")
    manifest_classes = raw.get("classes")
    if manifest_classes is not None and (not isinstance(manifest_classes, list) or not manifest_classes
                                         or not all(isinstance(c, str) for c in manifest_classes)):
        raise DataError(f"{name}: 'classes' must be a non-empty list of class names")
    entries = raw.get("images")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{name}: 'images' must be a non-empty list of entries")
    # manifest class index -> model class index (by name when the names differ from the model's)
    remap = _manifest_remap(manifest_classes, classes, name)
    samples = []
    for i, entry in enumerate(entries):
        where = f"{name}: images[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: must be an object with 'image'")
        unknown = sorted(set(entry) - {"image", "label", "label_name", "boxes", "mask"})
        if unknown:
            raise DataError(f"{where}: unknown field {unknown[0]!r} (fields: image, label, label_name, boxes, mask)")
        image = entry.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: 'image' must be a file name")
        where = f"{name}: images[{i}] ({image})"
        image_path = _existing_file(path.parent / image, f"{where}: 'image'")
        label, label_name = None, None
        if "label" in entry and entry["label"] is not None:
            value = entry["label"]
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise DataError(f"{where}: 'label' must be a class index or name, got {value!r}")
            if isinstance(value, str):
                label = classes.from_name(value, f"{where}: 'label'") if manifest_classes is None \
                    else remap(_manifest_index(manifest_classes, value, where), where)
            else:
                if manifest_classes is not None:
                    if not 0 <= value < len(manifest_classes):
                        raise DataError(f"{where}: 'label' {value} is not an index into 'classes' "
                                        f"(0 to {len(manifest_classes) - 1})")
                    given_name = entry.get("label_name", manifest_classes[value])
                    if given_name != manifest_classes[value]:
                        raise DataError(f"{where}: 'label_name' {given_name!r} is not classes[{value}] "
                                        f"= {manifest_classes[value]!r}")
                    label = remap(value, where)
                else:
                    label = classes.check_index(value, f"{where}: 'label'")
            label_name = classes.name_of(label) or (manifest_classes[label] if manifest_classes
                                                   and label < len(manifest_classes) else None)
        elif "label_name" in entry:
            value = entry["label_name"]
            if not isinstance(value, str):
                raise DataError(f"{where}: 'label_name' must be a class name")
            label = classes.from_name(value, f"{where}: 'label_name'")
            label_name = value
        boxes = None
        if entry.get("boxes") is not None:
            boxes = _json_boxes(entry["boxes"], f"{where}: 'boxes'")
        mask = None
        if entry.get("mask") is not None:
            if not isinstance(entry["mask"], str):
                raise DataError(f"{where}: 'mask' must be a file name")
            mask = _existing_file(path.parent / entry["mask"], f"{where}: 'mask'")
        samples.append(Sample(image_path, label, label_name, boxes, mask, key=image))
    _unique_keys(samples)
    return Dataset(path.parent, samples, "json", path, classes.labels or manifest_classes)


def _manifest_index(manifest_classes: list[str], value: str, where: str) -> int:
    if value in manifest_classes:
        return manifest_classes.index(value)
    raise DataError(f"{where}: 'label' {value!r} is not one of the manifest's classes")


def _manifest_remap(manifest_classes, classes: _Classes, name: str):
    """A function manifest index -> model index: the identity when the manifest's classes are the
    model's (or the model has no labels), by name otherwise."""
    if manifest_classes is None or classes.labels is None or manifest_classes == classes.labels:
        return lambda index, where: classes.check_index(index, f"{where}: 'label'")
    missing = [c for c in manifest_classes if c not in classes.index and c.strip().lower() not in classes.lower]
    if missing:
        raise DataError(f"{name}: class {missing[0]!r} of the manifest's 'classes' is not among the model's "
                        "labels; give matching --labels or fix the manifest")
    return lambda index, where: classes.from_name(manifest_classes[index], where)


def _json_boxes(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list):
        raise DataError(f"{where} must be a list of [x0, y0, x1, y1]")
    if len(value) == 4 and all(_is_number(v) for v in value):
        value = [value]
    rows = []
    for j, box in enumerate(value):
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise DataError(f"{where}[{j}] must be 4 numbers [x0, y0, x1, y1], got {box!r}")
        rows.append(_check_box([float(v) for v in box], f"{where}[{j}]"))
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_box(box: list[float], where: str) -> list[float]:
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise DataError(f"{where}: box {_fmt_box(box)} has x1 < x0 or y1 < y0 (expected [x0, y0, x1, y1])")
    if x0 < 0 or y0 < 0:
        raise DataError(f"{where}: box {_fmt_box(box)} has a negative coordinate")
    return box


def _fmt_box(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


# ----------------------------------------------------------------------------------------------
# CSV


def _load_csv(path: Path, classes: _Classes) -> Dataset:
    name = display_path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: cannot read the CSV manifest ({type(exc).__name__})") from None
    reader = csv.reader(text.splitlines())
    by_image: dict[str, Sample] = {}
    first_line: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        cells = [cell.strip() for cell in row]
        if not cells or all(not c for c in cells) or cells[0].startswith("#"):
            continue
        if line == 1 and cells[0].lower() == "image":
            header = [c.lower() for c in cells]
            expected = ["image", "label", "x0", "y0", "x1", "y1"]
            if header != expected[:len(header)]:
                raise DataError(f"{name} line 1: header {','.join(cells)!r} is not image,label,x0,y0,x1,y1")
            continue
        where = f"{name} line {line}"
        if len(cells) not in (1, 2, 6):
            raise DataError(f"{where}: expected image,label,x0,y0,x1,y1 (6 fields, or image,label), "
                            f"got {len(cells)} fields")
        image = cells[0]
        if not image:
            raise DataError(f"{where}: the image field is empty")
        label = None
        if len(cells) >= 2 and cells[1]:
            label = classes.from_name(cells[1], f"{where}: label")
        box = None
        if len(cells) == 6:
            coords = cells[2:6]
            if any(coords):
                values = []
                for field_name, cell in zip(("x0", "y0", "x1", "y1"), coords):
                    try:
                        value = float(cell)
                    except ValueError:
                        raise DataError(f"{where}: {field_name} {cell!r} is not a number") from None
                    if not math.isfinite(value):
                        raise DataError(f"{where}: {field_name} {cell!r} is not a finite number")
                    values.append(value)
                box = _check_box(values, where)
        sample = by_image.get(image)
        if sample is None:
            image_path = _existing_file(path.parent / image, f"{where}: image")
            sample = Sample(image_path, label, classes.name_of(label) if label is not None else None, key=image)
            by_image[image] = sample
            first_line[image] = line
        elif label is not None and sample.label is not None and label != sample.label:
            raise DataError(f"{where}: label {cells[1]!r} differs from the label of {image} on line "
                            f"{first_line[image]}; one class per image")
        elif label is not None and sample.label is None:
            sample.label, sample.label_name = label, classes.name_of(label)
        if box is not None:
            row_box = np.array([box], dtype=np.float64)
            sample.boxes = row_box if sample.boxes is None else np.concatenate([sample.boxes, row_box])
    if not by_image:
        raise DataError(f"{name}: no rows; expected image,label,x0,y0,x1,y1 lines")
    return Dataset(path.parent, list(by_image.values()), "csv", path, classes.labels)


# ----------------------------------------------------------------------------------------------
# Pascal VOC


def _load_voc(folder: Path, images: list[Path], classes: _Classes) -> Dataset:
    samples = []
    for image in images:
        xml_path = image.with_suffix(".xml")
        if not xml_path.is_file():
            samples.append(Sample(image, key=image.name))
            continue
        per_class: dict[int, list[list[float]]] = {}
        for label, box in _read_voc(xml_path, classes):
            per_class.setdefault(label, []).append(box)
        if not per_class:
            samples.append(Sample(image, key=image.name))
            continue
        several = len(per_class) > 1
        for label, boxes in per_class.items():
            key = f"{image.name}#{classes.name_of(label) or label}" if several else image.name
            samples.append(Sample(image, label, classes.name_of(label),
                                  np.array(boxes, dtype=np.float64).reshape(-1, 4), key=key))
    _unique_keys(samples)
    return Dataset(folder, samples, "voc", None, classes.labels)


def _read_voc(path: Path, classes: _Classes) -> list[tuple[int, list[float]]]:
    name = display_path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, column = getattr(exc, "position", (0, 0))
        raise DataError(f"{name}: not valid XML (line {line}, column {column})") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot read the file ({exc.strerror or type(exc).__name__})") from None
    if root.tag != "annotation":
        raise DataError(f"{name}: the root element is <{root.tag}>, not <annotation> (Pascal VOC)")
    found = []
    for j, obj in enumerate(root.findall("object")):
        where = f"{name}: object {j + 1}"
        label_text = (obj.findtext("name") or "").strip()
        if not label_text:
            raise DataError(f"{where}: <name> is missing or empty")
        label = classes.from_name(label_text, f"{where} <name>")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{where} ({label_text}): <bndbox> is missing")
        values = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = bndbox.findtext(tag)
            if text is None:
                raise DataError(f"{where} ({label_text}): <bndbox><{tag}> is missing")
            try:
                value = float(text.strip())
            except ValueError:
                raise DataError(f"{where} ({label_text}): <{tag}> {text.strip()!r} is not a number") from None
            if not math.isfinite(value):
                raise DataError(f"{where} ({label_text}): <{tag}> is not a finite number")
            values.append(value)
        xmin, ymin, xmax, ymax = values
        if xmax < xmin or ymax < ymin:
            raise DataError(f"{where} ({label_text}): xmax < xmin or ymax < ymin")
        # VOC: 1-based, inclusive pixel indices -> pixel edges, x1/y1 exclusive
        found.append((label, [max(0.0, xmin - 1.0), max(0.0, ymin - 1.0), xmax, ymax]))
    return found


# ----------------------------------------------------------------------------------------------
# Masks


def _with_masks(dataset: Dataset) -> Dataset:
    """Attach masks/<stem>.png or <stem>_mask.png to the samples that have no mask yet."""
    for sample in dataset.samples:
        if sample.mask_path is not None:
            continue
        for candidate in (sample.image.parent / MASK_FOLDER / f"{sample.image.stem}.png",
                          sample.image.with_name(f"{sample.image.stem}{MASK_SUFFIX}.png")):
            if candidate.is_file() and candidate != sample.image:
                sample.mask_path = candidate
                break
    return dataset


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(K, H, W) instance masks of a mask PNG: 0 background, each other value one instance
    (colour masks: any non-black pixel). The mask must have the image's size (H, W)."""
    name = display_path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            mask = opened.copy()
    except FileNotFoundError:
        raise DataError(f"{name}: mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: not a readable mask image ({type(exc).__name__})") from None
    if (mask.height, mask.width) != tuple(size):
        raise DataError(f"{name}: mask is {mask.width}x{mask.height} but its image is {size[1]}x{size[0]}; "
                        "a mask must have its image's size")
    if mask.mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
        values = np.asarray(mask if mask.mode != "1" else mask.convert("L"))
        ids = [v for v in np.unique(values).tolist() if v != 0]
        return np.stack([values == v for v in ids]) if ids else np.zeros((0, *size), dtype=bool)
    values = np.asarray(mask.convert("RGB"))
    region = values.any(axis=-1)
    return region[None] if region.any() else np.zeros((0, *size), dtype=bool)


# ----------------------------------------------------------------------------------------------
# Helpers


def _masks_in_footprint(masks: np.ndarray, size: tuple[int, int],
                        footprint: tuple[float, float, float, float]) -> np.ndarray:
    """(K, H, W) masks sampled (nearest) at the model input's pixel centres placed on the image
    by ``footprint``; pixels of padding beyond the image are outside every region."""
    top, left, height, width = footprint
    rows = np.floor(top + (np.arange(size[0]) + 0.5) * (height / size[0])).astype(np.intp)
    columns = np.floor(left + (np.arange(size[1]) + 0.5) * (width / size[1])).astype(np.intp)
    row_inside = (rows >= 0) & (rows < masks.shape[1])
    column_inside = (columns >= 0) & (columns < masks.shape[2])
    sampled = masks[:, np.clip(rows, 0, masks.shape[1] - 1)][:, :, np.clip(columns, 0, masks.shape[2] - 1)]
    return sampled & row_inside[None, :, None] & column_inside[None, None, :]


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file as ``load_image`` returns it (EXIF orientation 5-8 swaps the sides),
    from the header only."""
    name = display_path(path)
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            try:
                orientation = opened.getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block: load_image will ignore it too
                orientation = 1
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file; check the path") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not an image Pillow can read ({type(exc).__name__})") from None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return int(height), int(width)


def _existing_file(path: Path, where: str) -> Path:
    if not path.is_file():
        raise DataError(f"{where} {display_path(path.name)!r}: no such file next to the manifest "
                        f"({display_path(path.parent)})")
    return path


def _folder_images(folder: Path) -> list[Path]:
    try:
        images = find_images([folder])
    except ImageError as exc:
        raise DataError(str(exc)) from None
    kept = [image for image in images if not image.stem.endswith(MASK_SUFFIX)]
    if not kept:
        raise DataError(f"{display_path(folder)}: no images besides masks; add the images")
    return kept


def _unique_keys(samples: list[Sample]) -> None:
    seen: dict[str, int] = {}
    for sample in samples:
        key = sample.key or sample.image.name
        count = seen.get(key, 0) + 1
        seen[key] = count
        sample.key = key if count == 1 else f"{key}#{count}"
