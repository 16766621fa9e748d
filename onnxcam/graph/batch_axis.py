"""Following the batch through a model exported at a batch of 1.

Exporters write the example's batch of 1 into constants: Reshape targets such as ``[1, -1]``,
Swin's ``[64, 49, 96]`` (the batch folded into its 64 windows), attention's ``[197, 12, 64]``
(the batch folded into the heads, in dim 1), and Gathers of fixed indices into a flattened
batch (torch's dynamo exporter's ``as_strided``). Shape inference cannot tell such a constant
from a real per-image size, so this module follows the batch instead: for every tensor, the
axis that holds the images, outermost in that axis (Swin's windows axis is batch x 64).

Where a constant Reshape splits or merges the batch's axis, the batch is still outermost in
the output axis that starts where the batch's axis started (the same number of values before
it, per image), so that output dim becomes -1 and the model batches. A Gather of fixed indices
into a whole flattened batch becomes a Gather per row. Where the batch cannot be followed (an
op that mixes it, a reduction over it), the node is recorded: a model whose logits lose the
batch there can only run one row at a time. Ops this module does not know leave their outputs
unknown; nothing downstream of them is changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass(frozen=True)
class Lost:
    """The batch cannot be followed past ``node``."""

    node: str


#: Ops applied per element (with broadcasting): the batch keeps its place, counted from the
#: right, in the output.
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod", "Where", "PRelu",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not",
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Mish", "ThresholdedRelu", "Shrink",
    "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign", "Erf", "Exp", "Log",
    "Sqrt", "Reciprocal", "Abs", "Neg", "Ceil", "Floor", "Round", "Sign", "Sin", "Cos", "Clip",
    "Cast", "CastLike", "Identity", "Dropout", "IsNaN", "IsInf",
}
#: Ops with the batch in dim 0 and channels in dim 1 (N, C, spatial...).
PER_IMAGE = {
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "LRN",
    "DepthToSpace", "SpaceToDepth",
}
#: Ops that work along one ``axis`` and keep the rank.
ALONG_AXIS = {"Softmax", "LogSoftmax", "Hardmax", "Split"}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"}


def free_the_batch(model: onnx.ModelProto, per_image: dict[str, list]) -> dict[str, int | Lost]:
    """Rewrite ``model``'s batch-of-1 constants in place so it runs at any batch; return the
    batch's axis (or where it was lost) for every tensor the batch reaches.

    ``per_image``: every tensor's shape at a batch of 1 (from shape inference).
    """
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    per_image = {**{name: list(init.dims) for name, init in constants.items()}, **per_image}
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    producers = {output: node for node in graph.node for output in node.output}
    axes: dict[str, int | Lost] = {value.name: 0 for value in graph.input if value.name not in constants}

    def value(name):
        return constant_value(name, constants, constant_nodes)

    for node in list(graph.node):
        states = [axes.get(name) for name in node.input]
        lost = next((s for s in states if isinstance(s, Lost)), None)
        batched = [(i, s) for i, s in enumerate(states) if isinstance(s, int)]
        if lost is not None:  # whatever it meets, a tensor that mixed the batch stays mixed
            for output in node.output:
                axes[output] = lost
            continue
        if not batched:
            continue
        out = _follow(node, batched, per_image, value, graph, producers)
        for output in node.output:
            if out is not None:
                axes[output] = out
    return axes


def _follow(node, batched, per_image, value, graph, producers) -> int | Lost | None:
    """The batch's axis in ``node``'s outputs (a Lost where it cannot go on, None: unknown)."""
    op = node.op_type
    index, axis = batched[0]
    in_shape = per_image.get(node.input[index])
    out_shape = per_image.get(node.output[0])
    lost = Lost(node.name or node.output[0])
    if in_shape is None or out_shape is None:
        return None
    rank, out_rank = len(in_shape), len(out_shape)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if op in ELEMENTWISE or op == "Concat":
        if any(per_image.get(node.input[i]) is None for i, _ in batched):
            return None
        shifted = {a + out_rank - len(per_image[node.input[i]]) for i, a in batched}
        if len(shifted) != 1:
            return None
        out_axis = shifted.pop()
        if _unbatched_operand_clashes(node, batched, per_image, out_axis, out_rank, concat=op == "Concat"):
            return lost  # fine at a batch of 1 only: a constant sized like the batch's axis
        if op == "Concat" and _axis(attrs["axis"], out_rank) == out_axis:
            return lost
        return out_axis
    if op in PER_IMAGE:
        return 0 if index == 0 and axis == 0 else lost
    if op in ALONG_AXIS:
        return lost if _axis(attrs.get("axis", -1 if op != "Split" else 0), rank) == axis else axis
    if op in REDUCTIONS:
        reduced = attrs.get("axes")
        if reduced is None and op.startswith("Reduce") and len(node.input) > 1 and node.input[1]:
            reduced = value(node.input[1])
        if op.startswith("Arg"):
            reduced = [attrs.get("axis", 0)]
        reduced = sorted({_axis(a, rank) for a in (reduced if reduced is not None else range(rank))})
        if axis in reduced or (index != 0):
            return lost
        return axis if attrs.get("keepdims", 1) else axis - sum(a < axis for a in reduced)
    if op == "Transpose":
        perm = list(attrs.get("perm", range(rank - 1, -1, -1)))
        return perm.index(axis)
    if op == "LayerNormalization":
        return lost if axis >= _axis(attrs.get("axis", -1), rank) or index != 0 else axis
    if op in ("MatMul", "Gemm"):
        return _matmul(op, index, axis, rank, out_rank, attrs, lost)
    if op in ("Squeeze", "Unsqueeze"):
        listed = attrs.get("axes")
        if listed is None and len(node.input) > 1 and node.input[1]:
            listed = value(node.input[1])
        if op == "Squeeze":
            listed = [i for i, d in enumerate(in_shape) if d == 1] if listed is None else listed
            listed = {_axis(a, rank) for a in listed}
            return lost if axis in listed else axis - sum(a < axis for a in listed)
        if listed is None:
            return None
        for a in sorted(_axis(a, out_rank) for a in listed):
            axis += a <= axis
        return axis
    if op in ("Reshape", "Flatten"):
        return _reshape(graph, node, axis, in_shape, out_shape, value, lost) if index == 0 else None
    if op == "Gather":
        return _gather(graph, node, index, axis, rank, attrs, value, per_image, producers, lost)
    if op == "Slice":
        return _slice(node, axis, in_shape, value, lost) if index == 0 else lost
    if op in ("Expand", "Tile", "Pad", "Resize"):
        return _resizing(op, node, axis, in_shape, out_rank, attrs, value, lost) if index == 0 else lost
    return None


def _unbatched_operand_clashes(node, batched, per_image, out_axis, out_rank, concat) -> bool:
    """An operand without the batch whose dim at the batch's axis is not 1 (or, for Concat,
    any operand without the batch) only lines up with a batch of 1."""
    with_batch = {i for i, _ in batched}
    for i, name in enumerate(node.input):
        if i in with_batch or not name:
            continue
        shape = per_image.get(name)
        if shape is None:
            continue
        where = out_axis - (out_rank - len(shape))
        if concat or (where >= 0 and shape[where] != 1):
            return True
    return False


def _axis(a, rank: int) -> int:
    return int(a) + rank if int(a) < 0 else int(a)


def _matmul(op, index, axis, rank, out_rank, attrs, lost):
    if op == "Gemm":
        transposed = attrs.get("transA" if index == 0 else "transB", 0)
        kept = (index == 0 and axis == (1 if transposed else 0))
        return 0 if kept else lost
    if index == 0:  # A (..., M, K): K is contracted
        return lost if axis == rank - 1 else axis + out_rank - rank
    if rank >= 2 and axis == rank - 2:  # B (..., K, N): K is contracted
        return lost
    return axis + out_rank - rank


def _reshape(graph, node, axis, in_shape, out_shape, value, lost):
    """The output axis that starts after as many per-image values as the batch's axis does; a
    constant Reshape target gets a -1 there (its other dims as at a batch of 1)."""
    if not _static(in_shape) or not _static(out_shape):
        return _leading_one(graph, node, axis, in_shape, value)
    before = int(np.prod(in_shape[:axis]))
    if node.op_type == "Flatten":
        split = _axis(node.attribute[0].i if node.attribute else 1, len(in_shape))
        if axis < split:
            return 0 if before == 1 else lost
        return 1 if int(np.prod(in_shape[split:axis])) == 1 else lost
    start = _batch_start(in_shape, out_shape, axis)
    if start is None:
        return lost
    target = value(node.input[1])
    if target is None:  # a computed shape (Shape -> Gather -> Concat) follows a batch in dim 0
        return 0 if start == axis == 0 else None
    fixed = np.array(out_shape, dtype=np.int64)
    fixed[start] = -1
    if not np.array_equal(fixed, target):
        _set_shape(graph, node, fixed)
    return start


def _leading_one(graph, node, axis, in_shape, value) -> int | None:
    """Without static per-image sizes (a dynamic image size): only a batch of 1 in dim 0 kept
    in dim 0, ``[1, ...]``, is followed: the 1 becomes 0, "copy the input's dim" (or -1 where
    ``allowzero`` makes 0 a real 0 and there is no other -1)."""
    target = value(node.input[1]) if node.op_type == "Reshape" else None
    allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
    if (target is None or axis != 0 or in_shape[0] != 1 or target.ndim != 1 or target.size == 0
            or target[0] != 1 or (allowzero and (0 in target or -1 in target))):
        return None
    fixed = target.copy()
    fixed[0] = -1 if allowzero else 0
    _set_shape(graph, node, fixed)
    return 0


def _set_shape(graph, node, shape: np.ndarray) -> None:
    name = f"{node.output[0]}__onnxcam_batch_shape"  # one per Reshape: others may share the shape
    graph.initializer.append(numpy_helper.from_array(shape.astype(np.int64), name))
    node.input[1] = name


def _batch_start(in_shape, out_shape, axis: int) -> int | None:
    """The output dim that starts after as many per-image values as the input's ``axis`` (the
    nearest to ``axis`` where leading 1s leave a choice), or None."""
    before = int(np.prod(in_shape[:axis]))
    starts = [j for j in range(len(out_shape)) if int(np.prod(out_shape[:j])) == before]
    return min(starts, key=lambda j: (abs(j - axis), j)) if starts else None


def _gather(graph, node, index, axis, rank, attrs, value, per_image, producers, lost):
    """A Gather off the batch's axis keeps it; fixed indices into a whole flattened batch of 1
    (dynamo's as_strided) become per-row indices."""
    if index != 0:
        return None
    gathered = _axis(attrs.get("axis", 0), rank)
    indices = value(node.input[1])
    index_rank = len(per_image.get(node.input[1]) or ()) if indices is None else indices.ndim
    if gathered != axis:
        return axis if gathered > axis else axis - 1 + index_rank
    flat = producers.get(node.input[0])
    if (rank != 1 or indices is None or indices.ndim < 1 or indices.shape[0] != 1 or indices.size == 0
            or flat is None or flat.op_type != "Reshape" or not _static(per_image.get(flat.input[0]))):
        return lost
    per_row = int(np.prod(per_image[flat.input[0]]))
    if indices.min() < 0 or indices.max() >= per_row:
        return lost
    rows, row_indices = f"{node.output[0]}__onnxcam_rows", f"{node.output[0]}__onnxcam_row_indices"
    graph.initializer.append(numpy_helper.from_array(indices[0], row_indices))
    graph.node.insert(list(graph.node).index(node),
                      helper.make_node("Flatten", [flat.input[0]], [rows], axis=1, name=rows))
    node.input[0], node.input[1] = rows, row_indices
    for attribute in list(node.attribute):
        if attribute.name == "axis":
            node.attribute.remove(attribute)
    node.attribute.append(helper.make_attribute("axis", 1))
    return 0


def _slice(node, axis, in_shape, value, lost):
    starts, ends = value(node.input[1]), value(node.input[2])
    sliced = value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if starts is None or ends is None:
        return lost
    sliced = range(len(starts)) if sliced is None else [_axis(a, len(in_shape)) for a in sliced]
    for a, start, end in zip(sliced, starts, ends):
        if a == axis and not (start == 0 and end >= in_shape[axis]):
            return lost
    return axis


def _resizing(op, node, axis, in_shape, out_rank, attrs, value, lost):
    """Expand, Tile, Pad and Resize keep the batch where they leave its axis alone."""
    if op == "Expand":
        shape = value(node.input[1])
        out_axis = axis + out_rank - len(in_shape)
        if shape is None:
            return None
        where = out_axis - (out_rank - len(shape))
        return out_axis if where < 0 or shape[where] == 1 else lost
    if op == "Tile":
        repeats = value(node.input[1])
        return axis if repeats is not None and repeats[axis] == 1 else lost
    if op == "Pad":
        pads = attrs.get("pads") if "pads" in attrs else value(node.input[1])
        listed = value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if pads is None:
            return lost
        padded = range(len(in_shape)) if listed is None else [_axis(a, len(in_shape)) for a in listed]
        half = len(pads) // 2
        return lost if any(a == axis and (pads[i] or pads[i + half]) for i, a in enumerate(padded)) else axis
    # Resize: scales of 1 on the batch's axis keep it; fixed sizes do not
    scales = value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scales is not None and scales.size:
        return axis if scales[axis] == 1 else lost
    return lost


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def constant_value(name: str, constants: dict, constant_nodes: dict) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, else None."""
    if name in constants:
        init = constants[name]
        if init.data_location == onnx.TensorProto.EXTERNAL or not _has_data(init):
            return None  # set aside while the model is prepared (prepare.DETACH_BYTES)
        return numpy_helper.to_array(init)
    if name in constant_nodes:
        attribute = helper.get_attribute_value(constant_nodes[name].attribute[0])
        return numpy_helper.to_array(attribute) if isinstance(attribute, onnx.TensorProto) else np.asarray(attribute)
    return None


def _has_data(init: onnx.TensorProto) -> bool:
    return bool(init.raw_data) or any(len(getattr(init, f)) for f in (
        "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"))
