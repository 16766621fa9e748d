"""Class names, from the first of: a labels file the user gives; the model's metadata
``onnxcam.labels`` ("imagenet" or a JSON list of names); the bundled ImageNet list when the model
has 1000 classes (1001: "background" first, as TensorFlow-slim models count). Otherwise none.

A labels file is either a JSON list of names or plain text with one name per line (a trailing
empty line is ignored).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import onnx

from onnxcam.errors import ModelError, OptionError

METADATA_KEY = "onnxcam.labels"


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, in the usual index order (index 281 is "tabby")."""
    text = resources.files("onnxcam").joinpath("data/imagenet_labels.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """Names from a JSON list or a one-name-per-line text file; OptionError when unreadable."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise OptionError(f"labels file '{file}' does not exist: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"labels file '{file}' cannot be read ({type(exc).__name__}): give a UTF-8 "
                          "text file with one name per line, or a JSON list") from None
    names = _parse(text)
    if names is None:
        raise OptionError(f"labels file '{file}' starts like JSON but is not a JSON list of names: "
                          "give a JSON list of strings, or one name per line")
    if not names:
        raise OptionError(f"labels file '{file}' has no names: give one name per line, or a JSON list")
    return names


def _parse(text: str) -> list[str] | None:
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return None
        if isinstance(value, dict):  # {"0": "cat", "1": "dog"}
            try:
                value = [value[key] for key in sorted(value, key=int)]
            except (ValueError, TypeError):
                return None
        if not isinstance(value, list):
            return None
        return [str(name) for name in value]
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def metadata_value(model: onnx.ModelProto, key: str) -> str | None:
    for prop in model.metadata_props:
        if prop.key == key:
            return prop.value
    return None


def _outputs_hint(model: onnx.ModelProto | None) -> str:
    """For a model of several outputs: which one the classes were counted from, and how to name
    another (the count may be an embedding's)."""
    from onnxcam.graph.locate import own_outputs, scores_output_name

    count = len(own_outputs(model)) if model is not None else 0
    if count < 2:
        return ""
    return (f" (the classes are counted on output '{scores_output_name(model)}' of {count}: if another "
            "holds the class scores, name it with --scores-output)")


def resolve_labels(num_classes: int | None, labels: object = None, model: onnx.ModelProto | None = None,
                   sidecar: tuple[list[str], str] | None = None) -> tuple[list[str] | None, str]:
    """(names or None, where they came from). ``labels``: a path, a list of names, or None;
    ``sidecar``: (names, source) from a config.json next to the model, used after the metadata
    when it has one name per class."""
    if labels is not None:
        if isinstance(labels, (str, os.PathLike)):
            names, source = read_labels_file(labels), f"file {labels}"
        else:
            names, source = [str(name) for name in labels], "given list"  # type: ignore[union-attr]
        if num_classes is not None and len(names) != num_classes:
            raise OptionError(f"labels ({source}) has {len(names)} names but the model has "
                              f"{num_classes} classes: give one name per class{_outputs_hint(model)}")
        return names, source
    value = metadata_value(model, METADATA_KEY) if model is not None else None
    if value is not None:
        names = _metadata_names(value.strip())
        if names is None:
            raise ModelError(f"the model's metadata {METADATA_KEY} is neither 'imagenet' nor a JSON "
                             "list of names: fix the metadata, or pass --labels")
        if num_classes is not None and len(names) + 1 == num_classes and value.strip() == "imagenet":
            return ["background", *names], f"metadata {METADATA_KEY}=imagenet (+ background)"
        if num_classes is not None and len(names) != num_classes:
            raise ModelError(f"the model's metadata {METADATA_KEY} has {len(names)} names but the model "
                             f"has {num_classes} classes: fix the metadata, or pass --labels{_outputs_hint(model)}")
        return names, f"metadata {METADATA_KEY}"
    if sidecar is not None and (num_classes is None or len(sidecar[0]) == num_classes):
        return list(sidecar[0]), sidecar[1]
    if num_classes == 1000:
        return imagenet_labels(), "bundled ImageNet labels (the model has 1000 classes)"
    if num_classes == 1001:
        return ["background", *imagenet_labels()], "bundled ImageNet labels + background (1001 classes)"
    return None, "none"


def _metadata_names(value: str) -> list[str] | None:
    if value.lower() == "imagenet":
        return imagenet_labels()
    names = _parse(value)
    return names if names else None
