"""What a map explains: class indices (given or the top-k predicted) or neurons of a score tensor,
turned into the seed rows the rewritten model takes (``onnxcam_seed``).

A seed row is the cotangent of the score: one-hot for one class, ones at several positions for a
sum of neurons. Every validation error is a TargetError that states the valid range.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from numbers import Integral

import numpy as np

from onnxcam.errors import TargetError


def _is_index(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _class_range(num_classes: int | None) -> str:
    return f"the model has {num_classes} classes (use 0 to {num_classes - 1})" if num_classes else ""


def check_class(index: object, num_classes: int | None) -> int:
    """One class index, checked against the number of classes."""
    if not _is_index(index):
        raise TargetError(f"class index {index!r} is not a whole number: "
                          f"{_class_range(num_classes) or 'give an integer class index'}")
    index = int(index)  # type: ignore[arg-type]
    if index < 0 or (num_classes is not None and index >= num_classes):
        detail = _class_range(num_classes) or "class indices start at 0"
        raise TargetError(f"class index {index} is out of range: {detail}")
    return index


def check_top_k(top_k: object, num_classes: int | None) -> int:
    if not _is_index(top_k) or int(top_k) < 1:  # type: ignore[arg-type]
        raise TargetError(f"top_k {top_k!r} must be a whole number >= 1")
    if num_classes is not None and int(top_k) > num_classes:  # type: ignore[arg-type]
        raise TargetError(f"top_k {top_k} is larger than the number of classes: {_class_range(num_classes)}")
    return int(top_k)  # type: ignore[arg-type]


def class_of(value: object, num_classes: int | None, labels: Sequence[str] | None = None) -> int:
    """A class index, or a class name (a ``str``) looked up in ``labels``: exactly, else ignoring
    case. Digits in a string are an index ("281", as a command line gives it)."""
    if isinstance(value, str):
        value = _index_of_name(value, labels)
    return check_class(value, num_classes)


def _index_of_name(name: str, labels: Sequence[str] | None) -> int:
    text = name.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if not labels:
        raise TargetError(f"class {name!r} is a name, but the model has no labels: give a class index, "
                          "or the class names (--labels FILE)")
    for matches in ([i for i, label in enumerate(labels) if label == text],
                    [i for i, label in enumerate(labels) if label.casefold() == text.casefold()]):
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise TargetError(f"class name {name!r} names classes {', '.join(map(str, matches))}: "
                              "give the class index")
    close = difflib.get_close_matches(text, list(labels), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "check the name, or give a class index"
    raise TargetError(f"class name {name!r} is not one of the model's {len(labels)} labels: {hint}")


def class_targets(targets: object, n_images: int, num_classes: int | None,
                  labels: Sequence[str] | None = None) -> list[list[int]] | None:
    """Per image, the list of classes to explain; None when they come from the predictions.

    ``targets``: None; a class (every image); a list with one entry per image, each a class or a
    list of classes (several for that image). A class is an index or a name in ``labels``.
    """
    if targets is None:
        return None
    if _is_index(targets) or isinstance(targets, str):
        return [[class_of(targets, num_classes, labels)] for _ in range(n_images)]
    if isinstance(targets, np.ndarray):
        targets = targets.tolist()
    if isinstance(targets, bytes) or not isinstance(targets, Sequence):
        raise TargetError(f"targets {targets!r} must be a class (an index or a name), or a list with one "
                          "class (or list of classes) per image")
    if len(targets) != n_images:
        raise TargetError(f"targets has {len(targets)} entries for {n_images} image(s): give one class "
                          "per image (a list of lists for several classes per image), or one class "
                          "for all images")
    chosen = []
    for entry in targets:
        if _is_index(entry) or isinstance(entry, str):
            chosen.append([class_of(entry, num_classes, labels)])
        elif isinstance(entry, (Sequence, np.ndarray)) and not isinstance(entry, bytes) and len(entry):
            classes = [class_of(value, num_classes, labels) for value in entry]
            if len(set(classes)) != len(classes):
                raise TargetError(f"targets {list(classes)} repeat a class for one image: give each class once")
            chosen.append(classes)
        else:
            raise TargetError(f"target {entry!r} is not a class or a non-empty list of classes")
    return chosen


def top_classes(logits: np.ndarray, k: int) -> list[list[int]]:
    """The k highest-scoring classes of each row, best first (ties: the lower index first)."""
    logits = np.asarray(logits)
    if k == 1 and not np.isnan(logits).any():  # argmax: the first of ties too, without a sort
        return [[int(best)] for best in np.argmax(logits, axis=1)]
    order = np.argsort(-logits.astype(np.float64), axis=1, kind="stable")[:, :k]
    return [row.tolist() for row in order]


def one_hot(classes: Sequence[int], num_classes: int, dtype=np.float32) -> np.ndarray:
    """Seed rows (len(classes), num_classes) with a 1 at each class."""
    rows = np.zeros((len(classes), num_classes), dtype=dtype)
    rows[np.arange(len(classes)), np.asarray(classes, dtype=np.intp)] = 1
    return rows


def check_neurons(neuron: object, seed_shape: Sequence, score: str) -> tuple[tuple[int, ...], ...]:
    """Neuron index tuples into the score tensor (batch dimension left out).

    ``neuron``: one index tuple (or an int for a [N, C] tensor), or a list of tuples (their scores
    are summed). Each must have one index per non-batch dimension, within its size.
    """
    dims = list(seed_shape[1:])
    if not all(isinstance(d, int) for d in dims):
        raise TargetError(f"score tensor '{score}' has a symbolic shape {list(seed_shape)}: neuron-level "
                          "CAMs need a tensor whose non-batch dimensions are fixed")
    shape_text = f"score tensor '{score}' has shape {dims} without the batch dimension"
    if neuron is None:
        raise TargetError(f"a neuron is needed for the {shape_text}: give an index tuple such as "
                          f"{tuple(0 for _ in dims)}")
    if _is_index(neuron):
        neurons = [(neuron,)]
    elif isinstance(neuron, (Sequence, np.ndarray)) and len(neuron) and all(_is_index(v) for v in neuron):
        neurons = [tuple(neuron)]
    elif isinstance(neuron, (Sequence, np.ndarray)) and len(neuron):
        neurons = [tuple(item) if isinstance(item, (Sequence, np.ndarray)) else (item,) for item in neuron]
    else:
        raise TargetError(f"neuron {neuron!r} is not an index tuple or a list of index tuples")
    checked = []
    for item in neurons:
        if len(item) != len(dims) or not all(_is_index(v) for v in item):
            raise TargetError(f"neuron {item} needs {len(dims)} whole-number indices: the {shape_text}")
        for axis, (value, size) in enumerate(zip(item, dims)):
            if not 0 <= value < size:
                raise TargetError(f"neuron {item} is out of range at position {axis}: the {shape_text} "
                                  f"(use 0 to {size - 1} there)")
        checked.append(tuple(int(v) for v in item))
    return tuple(checked)


def neuron_seed(neurons: Sequence[tuple[int, ...]], seed_shape: Sequence, dtype=np.float32) -> np.ndarray:
    """One seed row (the score tensor's shape without batch) with a 1 at each neuron (summed)."""
    row = np.zeros(tuple(int(d) for d in seed_shape[1:]), dtype=dtype)
    for item in neurons:
        row[item] += 1
    return row
