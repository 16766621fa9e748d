"""Inputs other than the image, fixed as constants: a temperature, a flag, an image-size tensor.

onnxcam explains single-input image models. A deployed model often takes more (PaddleDetection's
``scale_factor``, a ``training`` flag left in a TensorFlow export, a softmax temperature); rather
than asking for a re-export, the user gives their values and each such input becomes an
initializer of that value before the model is prepared and rewritten.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcam.errors import OptionError


def fix_inputs(model: onnx.ModelProto, values: Mapping[str, Any]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs named in ``values`` are initializers of those values.

    A value is a number (filled into the input's static shape), a nested list or array of the
    input's shape, or the path of a ``.npy`` file; it is cast to the input's type. Symbolic dims
    take the value's size."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    initializers = {init.name for init in fixed.graph.initializer}
    inputs = {i.name: i for i in fixed.graph.input if i.name not in initializers}
    if set(inputs) <= set(values):
        raise OptionError(f"--input {', '.join(values)}: that would leave the model no input for the image: "
                          "give values only for its other inputs")
    for name, given in values.items():
        if name not in inputs:
            raise OptionError(f"--input {name}: the model has no input {name!r} (its inputs: "
                              f"{', '.join(inputs) or 'none'})")
        fixed.graph.initializer.append(numpy_helper.from_array(_value_for(inputs[name], given), name))
    kept = [i for i in fixed.graph.input if i.name not in values]
    del fixed.graph.input[:]
    fixed.graph.input.extend(kept)
    return fixed


def _value_for(value_info: onnx.ValueInfoProto, given: Any) -> np.ndarray:
    name = value_info.name
    tensor_type = value_info.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    except (KeyError, ValueError, TypeError):
        raise OptionError(f"--input {name}: its type cannot be given a value here") from None
    array = _read(name, given)
    try:
        array = array.astype(dtype, casting="unsafe") if dtype != np.bool_ else array.astype(bool)
    except (TypeError, ValueError):
        raise OptionError(f"--input {name}: {given!r} is not a {np.dtype(dtype).name} value") from None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if array.ndim == 0 and all(d is not None for d in dims):
        return np.full(dims, array, dtype=array.dtype)
    if len(dims) != array.ndim or any(d is not None and d != n for d, n in zip(dims, array.shape)):
        shape = "x".join("?" if d is None else str(d) for d in dims) or "a scalar"
        raise OptionError(f"--input {name}: a value of shape {list(array.shape)} does not fit the input's "
                          f"shape [{shape}]: give one number, or an array (.npy) of that shape")
    return array


def _read(name: str, given: Any) -> np.ndarray:
    if isinstance(given, (str, os.PathLike)) and str(given).endswith(".npy"):
        try:
            return np.load(Path(given), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise OptionError(f"--input {name}: cannot read '{given}' ({exc}): give a NumPy .npy file") from None
    if isinstance(given, str) and given.strip().lower() in ("true", "false"):  # a flag
        return np.asarray(given.strip().lower() == "true")
    if isinstance(given, str):
        try:
            return np.asarray([float(part) for part in given.split(",")]) if "," in given else \
                np.asarray(float(given))
        except ValueError:
            raise OptionError(f"--input {name}: {given!r} is not a number, true/false, a comma-separated "
                              "list of numbers or a .npy file") from None
    return np.asarray(given)


def parse_input_options(options: tuple[str, ...]) -> dict[str, str]:
    """``("NAME=VALUE", ...)`` from the command line -> {NAME: VALUE}."""
    values = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise OptionError(f"--input {option!r}: write NAME=VALUE (a number, true/false, numbers "
                              "separated by commas, or a .npy file)")
        values[name.strip()] = value.strip()
    return values
