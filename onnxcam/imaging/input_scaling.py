"""Models that scale their own pixels: Keras' ``Rescaling(1/255)`` or ``Rescaling(1/127.5, -1)``
layer, which tf2onnx exports as the first ``Mul`` on the input. Such a model expects 0-255 pixels
(the ``raw`` preset); the default ``imagenet`` preset would feed it values of about -2 to 2.6, and
every map would explain a dark, washed-out image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

#: Ops that move or relabel the input without changing its values (tf2onnx's NHWC -> NCHW).
_RELABEL = {"Transpose", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze"}
#: A scale between 1/260 and 1/100 is a 0-255 input brought to [0, 1] or [-1, 1].
_SMALLEST, _LARGEST = 1 / 260, 1 / 100


@dataclass(frozen=True)
class InputScaling:
    """The model multiplies its input by ``factor`` at node ``node`` before anything else."""

    factor: float
    node: str


def input_scaling(model: onnx.ModelProto) -> InputScaling | None:
    """The model's own scaling of 0-255 pixels (a ``Mul`` by about 1/255 or 1/127.5, or a ``Div``
    by about 255 or 127.5, of the input, through ops that only move values), else None."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    constants.update({node.output[0]: node.attribute[0].t for node in graph.node
                      if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"})
    inputs = [value.name for value in graph.input if value.name not in constants]
    if not inputs:
        return None
    tensor = inputs[0]
    while True:
        readers = [node for node in graph.node if tensor in node.input and node.op_type not in ("Shape", "Size")]
        if len(readers) != 1:
            return None
        node = readers[0]
        if node.op_type in _RELABEL and node.input[0] == tensor:
            tensor = node.output[0]
            continue
        others = [name for name in node.input if name != tensor]
        if node.op_type not in ("Mul", "Div") or len(others) != 1 or others[0] not in constants:
            return None
        values = np.asarray(numpy_helper.to_array(constants[others[0]]), dtype=np.float64).ravel()
        if values.size == 0 or not np.all(values == values[0]) or values[0] == 0:
            return None
        if node.op_type == "Div" and node.input[0] != tensor:
            return None
        factor = float(values[0] if node.op_type == "Mul" else 1 / values[0])
        return InputScaling(factor, node.name or node.output[0]) if _SMALLEST <= factor <= _LARGEST else None
