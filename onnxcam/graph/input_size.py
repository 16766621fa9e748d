"""The image input's size: reading it, asking for it when it is dynamic, and fixing it.

The gradient rules need static spatial sizes, so a model exported with a dynamic height and
width is given one (``--size``, or the size its image processor files name) before the rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxcam.errors import ModelError, OptionError
from onnxcam.graph.prepare import load_model
from onnxcam.imaging.preprocess import detect_layout


def check_size(size) -> tuple[int, int]:
    """``size`` as a (height, width) pair of whole numbers >= 1, else an OptionError."""
    try:
        height, width = size
    except (TypeError, ValueError):
        raise OptionError(f"size {size!r} is not a (height, width) pair: give e.g. 224,224") from None
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise OptionError(f"size {size!r} must be two whole numbers >= 1 (height, width)")
    return int(height), int(width)


def image_input_shape(model) -> list | None:
    """The 4-D shape of the model's image input (None where a dim is symbolic); None otherwise."""
    proto = load_model(model)
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if not inputs:
        return None
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
             for d in inputs[0].type.tensor_type.shape.dim]
    return shape if len(shape) == 4 else None


def has_dynamic_size(model) -> bool:
    shape = image_input_shape(model)
    return shape is not None and None in detect_layout(shape)[1]


def sidecar_size(model, sidecar) -> tuple[int, int] | None:
    """The (H, W) the image processor next to a model with a dynamic input size makes, if any."""
    if sidecar is None or sidecar.size is None or not has_dynamic_size(model):
        return None
    return sidecar.size


def require_static_size(model) -> None:
    """OptionError when the model's input has a symbolic height or width (then no layer has the
    static spatial size the rewrite needs, which would otherwise read as "no suitable layer")."""
    if has_dynamic_size(model):
        raise OptionError(f"the model's input size is dynamic ({image_input_shape(model)}): give the size to "
                          "feed, size=(H, W) (--size H,W)")


def with_input_size(model, size: tuple[int, int]) -> onnx.ModelProto:
    """A copy of the model whose input has spatial size ``size`` = (H, W) where it was symbolic
    (the gradient rules need static spatial sizes); OptionError when it is fixed to another size."""
    proto = onnx.ModelProto()
    proto.CopyFrom(load_model(model))
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if not inputs:
        raise ModelError("the model has no inputs: nothing to explain")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    layout, current, _ = detect_layout(shape, name=f"model input '{inputs[0].name}'")
    if all(d is not None for d in current):
        if tuple(current) != size:
            raise OptionError(f"the model's input size is fixed at {current[0]}x{current[1]}: "
                              "size only applies to models with a dynamic input size")
        return proto
    for axis, value in zip((2, 3) if layout == "NCHW" else (1, 2), size):
        dims[axis].Clear()
        dims[axis].dim_value = value
    return proto
