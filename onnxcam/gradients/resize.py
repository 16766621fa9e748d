"""Resize is linear in its input and separable per spatial axis, so its gradient is two small
matrices. They are measured, not re-derived: the node itself (same mode, coordinate transform,
rounding) is applied by ONNX's reference evaluator to basis images, once, at rewrite time.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxcam.errors import UnsupportedOperatorError
from onnxcam.gradients.emitter import constant_value, static_shape


def _constant_input(node: gs.Node, i: int):
    if len(node.inputs) <= i or node.inputs[i].name == "":
        return None
    value = constant_value(node.inputs[i])
    if value is None and i == 3 and "axes" not in node.attrs:
        # sizes computed in the graph, as torchvision's segmentation models upsample to the
        # input's size (Concat(Shape(x)[:2], [H, W])): the output's static shape says them
        return np.zeros(4, np.int64)  # a placeholder: _probe takes the sizes from that shape
    if value is None:
        raise UnsupportedOperatorError(
            f"operator Resize (node '{node.name}'): its roi/scales/sizes inputs must be constants")
    return value


def _probe(node: gs.Node, basis: np.ndarray, roi, scales, sizes, out_hw) -> np.ndarray:
    attrs = {k: v for k, v in node.attrs.items()}
    if sizes is not None and sizes.size:
        sizes = np.array([1, basis.shape[1], *out_hw], dtype=np.int64) if "axes" not in attrs else sizes
    inputs = {"x": basis}
    names = ["x", "", "", ""]
    for i, (name, value) in enumerate((("roi", roi), ("scales", scales), ("sizes", sizes)), start=1):
        if value is not None and value.size:
            names[i] = name
            inputs[name] = value
    while names and names[-1] == "":
        names.pop()
    probe = helper.make_node("Resize", names, ["y"], **attrs)
    graph = helper.make_graph(
        [probe], "resize_probe",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(inputs[n].dtype), inputs[n].shape)
         for n in names if n],
        [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    from onnx.reference import ReferenceEvaluator  # here: importing it costs every run 30 ms of start-up

    return ReferenceEvaluator(model).run(None, inputs)[0]


def resize_matrices(node: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """(M_h [Ho, H], M_w [Wo, W]) with y = M_h @ x @ M_w^T on the last two axes."""
    x, y = node.inputs[0], node.outputs[0]
    in_shape, out_shape = static_shape(x), static_shape(y)
    if len(in_shape) != 4 or not all(isinstance(d, int) for d in in_shape[2:] + out_shape[1:]) \
            or in_shape[1] != out_shape[1]:
        raise UnsupportedOperatorError(
            f"operator Resize (node '{node.name}'): only 4-D resizes of the two spatial axes with "
            f"static sizes are supported, got {in_shape} -> {out_shape}")
    mode = node.attrs.get("mode", "nearest")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode not in ("nearest", "linear"):
        raise UnsupportedOperatorError(
            f"operator Resize (node '{node.name}'): mode '{mode}' has no gradient rule; "
            "nearest and linear are supported")
    roi, scales, sizes = (_constant_input(node, i) for i in (1, 2, 3))
    if scales is not None and scales.size == 4 and not np.allclose(scales[:2], 1):
        raise UnsupportedOperatorError(
            f"operator Resize (node '{node.name}'): resizing the batch or channel axis is not supported")
    h, w = in_shape[2:]
    out_hw = out_shape[2:]
    basis_h = np.zeros((1, h, h, w))
    basis_h[0, np.arange(h), np.arange(h), :] = 1.0
    basis_w = np.zeros((1, w, h, w))
    basis_w[0, np.arange(w), :, np.arange(w)] = 1.0
    m_h = _probe(node, basis_h, roi, scales, sizes, out_hw)[0, :, :, 0].T
    m_w = _probe(node, basis_w, roi, scales, sizes, out_hw)[0, :, 0, :].T
    return m_h.astype(np.float64), m_w.astype(np.float64)
