"""Reverse-mode differentiation of an ONNX graph, emitted as more ONNX.

Only the nodes on a path from the source tensor (the target layer) to the score tensor are
differentiated, in reverse topological order; gradient contributions to a tensor are summed, as in
tinygrad's ``gradient.py``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcam.errors import LayerError, UnsupportedOperatorError
from onnxcam.gradients.emitter import Emitter
from onnxcam.gradients.rules import RULES


#: Ops whose outputs depend on their input's shape only, never on its values.
SHAPE_ONLY = {"Shape", "Size"}


def path_nodes(graph: gs.Graph, source: gs.Tensor, target: gs.Tensor) -> list[gs.Node]:
    """Nodes on some path of values from ``source`` to ``target``, in topological order.

    Shapes and integer tensors carry no gradient: ``x.view(x.size(0), -1)`` exported with a
    dynamic batch computes the Reshape's target from ``Shape(x)``, which is not on the path.
    ``graph.nodes`` must already be topologically sorted.
    """
    downstream = {source.name}
    forward = []
    for node in graph.nodes:
        if node.op not in SHAPE_ONLY and any(t.name in downstream for t in node.inputs):
            forward.append(node)
            downstream.update(t.name for t in node.outputs if carries_values(t))
    upstream = {target.name}
    on_path = []
    for node in reversed(forward):
        if any(t.name in upstream for t in node.outputs):
            on_path.append(node)
            upstream.update(t.name for t in node.inputs if t.name in downstream)
    return on_path[::-1]


#: Ops whose integer outputs stand for values (a QDQ model's quantized activations).
QUANTIZING = {"QuantizeLinear"}


def carries_values(tensor: gs.Tensor) -> bool:
    """False for integer and boolean tensors (shapes, indices, masks): no gradient flows
    through them. A quantized activation is the exception: it stands for its values."""
    if tensor.inputs and tensor.inputs[0].op in QUANTIZING:
        return True
    try:
        dtype = np.dtype(tensor.dtype)
    except TypeError:
        return True  # unknown or not a NumPy type (bfloat16): assume values
    return not (np.issubdtype(dtype, np.integer) or dtype == np.bool_)


#: Ops that are linear in their path inputs when every other input is a constant (affine for
#: Conv/Gemm/Add with a bias, which leaves the gradient unchanged).
LINEAR_OPS = {"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
              "Concat", "Split", "Slice", "Gather", "Expand", "Pad", "Neg", "Add", "Sub", "Sum",
              "Conv", "Gemm", "MatMul", "AveragePool", "GlobalAveragePool", "ReduceMean",
              "ReduceSum", "BatchNormalization", "Cast", "Resize"}
BILINEAR_OPS = {"Mul", "Div", "Gemm", "MatMul", "Conv"}  # linear only with a constant partner


def path_is_linear(nodes: list[gs.Node], source: gs.Tensor) -> bool:
    """True when the score is an affine function of the source tensor, so its gradient is the same
    for every input (method.md: the noisy gradient passes are then provably unnecessary)."""
    on_path = {source.name} | {t.name for node in nodes for t in node.outputs}
    for node in nodes:
        path_inputs = [t for t in node.inputs if t.name in on_path]
        if node.op not in LINEAR_OPS | {"Mul", "Div"}:
            return False
        if node.op in BILINEAR_OPS and len(path_inputs) > 1:
            return False
        if node.op == "Div" and node.inputs[1].name in on_path:
            return False
        if node.op == "Pad" and len(node.inputs) > 2 and node.inputs[2].name in on_path:
            return False
    return True


def float_dtype(tensor: gs.Tensor, default=None):
    """``tensor``'s dtype when it is known and a float, else ``default``."""
    try:
        dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        dtype = None
    return dtype if dtype is not None and np.issubdtype(dtype, np.floating) else default


def _node_dtype(node: gs.Node, default) -> np.dtype:
    """The float dtype a node computes in: its first float output's, else its first float
    input's (QuantizeLinear's outputs are integers)."""
    found = (float_dtype(tensor) for tensor in [*node.outputs, *node.inputs])
    return next((dtype for dtype in found if dtype is not None), np.dtype(default))


def unsupported_nodes(nodes: list[gs.Node]) -> list[gs.Node]:
    """The nodes no rule covers: the rules are for the standard operators, so a node of another
    domain (ONNX Runtime's nchwc "Conv", say) is not one of them whatever its name."""
    return [node for node in nodes if node.op not in RULES or node.domain not in (None, "", "ai.onnx")]


def backward(graph: gs.Graph, source: gs.Tensor, target: gs.Tensor, seed: gs.Tensor,
             dtype=np.float32) -> gs.Tensor:
    """Append the subgraph computing ``d<seed, target>/d source`` and return that tensor."""
    nodes = path_nodes(graph, source, target)
    if not nodes and source is not target:
        raise LayerError(f"score tensor '{target.name}' does not depend on layer '{source.name}': "
                         "choose a layer before the score")
    for node in unsupported_nodes(nodes):
        domain = f" of domain {node.domain}" if node.domain not in (None, "", "ai.onnx") else ""
        raise UnsupportedOperatorError(
            f"no gradient rule for operator {node.op}{domain} (node '{node.name}') on the path from "
            f"'{source.name}' to '{target.name}': choose a layer after it"
            + (", or explain the model as exported, before ONNX Runtime's optimizations" if domain else ""))
    wanted = {source.name}
    for node in nodes:
        wanted.update(t.name for t in node.outputs)
    em = Emitter(graph, wanted=wanted, dtype=dtype)
    grads: dict[str, list[gs.Tensor]] = {target.name: [seed]}
    for node in reversed(nodes):
        dys = [em.sum_all(grads[t.name]) if t.name in grads else None for t in node.outputs]
        if all(dy is None for dy in dys):
            continue
        em.dtype = _node_dtype(node, dtype)  # a rule's constants match its node (Cast changes it)
        dxs = RULES[node.op](em, node, dys)
        for tensor, dx in zip(node.inputs, dxs):
            if dx is not None and tensor.name in wanted:
                grads.setdefault(tensor.name, []).append(dx)
    if source.name not in grads:
        raise LayerError(f"the score '{target.name}' has no gradient path to layer '{source.name}'")
    return em.sum_all(grads[source.name])
