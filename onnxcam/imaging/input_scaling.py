"""Models that normalise their own pixels: Keras' ``Rescaling(1/255)`` (tf2onnx exports it as the
first ``Mul`` on the input), or a deployment export with ``(x / 255 - mean) / std`` built in. The
default ``imagenet`` preset would normalise such an input a second time, and every map would
explain a dark, washed-out image. The ops between the input and its first weights that scale or
shift it by constants compose to ``a * x + b`` per channel; the scale ``a`` tells what range the
model expects: a 0-255 image brought to a few units (``raw``), or a 0-1 image (``unit``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxcam.gradients.backward import SHAPE_ONLY
from onnxcam.graph.batch_axis import constant_value

#: Ops that move or relabel the input without changing its values (tf2onnx's NHWC -> NCHW).
_RELABEL = {"Transpose", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze"}
#: Normalised inputs span about 1 (0-1), 2 (-1 to 1) or 4.5 ((x - mean) / std) units.
_SPAN = (0.9, 6.0)


@dataclass(frozen=True)
class InputScaling:
    """The model computes ``scale * x + offset`` (per channel) from its input before anything
    else, ending at node ``node``: it expects the ``preset``'s pixel range."""

    preset: str  # "raw" (0-255 pixels) or "unit" (0-1)
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    node: str

    def describe(self) -> str:
        expects = "0-255 pixels" if self.preset == "raw" else "0-1 pixels"
        scale = ", ".join(f"{v:.6g}" for v in sorted(set(self.scale)))
        return f"the model normalises its input itself (x {scale} up to node {self.node!r}): it expects {expects}"


def input_scaling(model: onnx.ModelProto) -> InputScaling | None:
    """The model's own normalisation of its input (``Mul``, ``Div``, ``Add``, ``Sub`` by
    constants, per tensor or per channel, through ops that only move values), when its scale
    brings 0-255 or 0-1 pixels to a normalised range; else None."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    constant_nodes = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    inputs = [value.name for value in graph.input if value.name not in constants]
    if not inputs:
        return None
    tensor, scale, offset, last = inputs[0], np.ones(1), np.zeros(1), None
    while True:
        readers = [node for node in graph.node if tensor in node.input and node.op_type not in SHAPE_ONLY]
        if len(readers) != 1:
            break
        node = readers[0]
        if node.op_type in _RELABEL and node.input[0] == tensor:
            tensor = node.output[0]
            continue
        others = [name for name in node.input if name != tensor]
        if node.op_type not in ("Mul", "Div", "Add", "Sub") or len(others) != 1:
            break
        if node.op_type in ("Div", "Sub") and node.input[0] != tensor:
            break  # c / x or c - x: not a scaling of the input
        value = constant_value(others[0], constants, constant_nodes)
        if value is None:
            break
        value = np.asarray(value, dtype=np.float64).ravel()
        if value.size == 0 or (value.size > 1 and scale.size > 1 and value.size != scale.size):
            break
        if node.op_type in ("Mul", "Div"):
            if np.any(value == 0):
                break
            factor = value if node.op_type == "Mul" else 1 / value
            scale, offset = scale * factor, offset * factor
        else:
            offset = offset + (value if node.op_type == "Add" else -value)
        scale, offset = np.broadcast_arrays(scale, offset)
        scale, offset, last = scale.copy(), offset.copy(), node.name or node.output[0]
        tensor = node.output[0]
    if last is None or np.allclose(scale, 1):
        return None  # nothing, or only a shift (a mean subtracted): no range to read
    for preset, top in (("raw", 255.0), ("unit", 1.0)):
        span = np.abs(scale) * top
        if np.all((span >= _SPAN[0]) & (span <= _SPAN[1])) and np.all(np.abs(offset) <= _SPAN[1]):
            return InputScaling(preset, tuple(float(v) for v in scale), tuple(float(v) for v in offset), last)
    return None
