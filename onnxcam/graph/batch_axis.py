"""Following the batch through a model exported at a batch of 1.

Exporters write the example's batch of 1 into constants: Reshape targets such as ``[1, -1]``,
Swin's ``[64, 49, 96]`` (the batch folded into its 64 windows), attention's ``[197, 12, 64]`` and
``[197, 768]`` (the batch folded into the heads, or behind the tokens), a class token
concatenated to a batch of 1, and Gathers of fixed indices into a flattened batch (torch's
dynamo exporter's ``as_strided``). Shape inference cannot tell such a constant from a real
per-image size, so this module follows the batch instead: for every tensor, the axis that holds
the images, and the per-image size ahead of the batch in that dim (``outer``: 1 for Swin's
``batch x 64`` windows, 197 for attention's ``197 x batch`` rows).

A Reshape never moves data, so the batch keeps its place among the values: the output dim that
holds it becomes -1. A class token is expanded to the batch; fixed indices into a whole
flattened batch become a Gather per row. Where the batch cannot be followed (an op that mixes
it, a reduction over it) the node is recorded: a model whose logits lose the batch there runs
one row at a time. Past an op this module does not know the batch's place is unknown, and
nothing downstream is changed. Only a batch of 1 kept in dim 0 is certain: every other change,
and every unknown place, is settled by ``batch_is_consistent``, which runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcam.gradients.backward import SHAPE_ONLY
from onnxcam.graph import external


@dataclass(frozen=True)
class Batch:
    """The batch is in dim ``axis``, after ``outer`` per-image values of that dim."""

    axis: int
    outer: int = 1

    def moved(self, axis: int) -> Batch:
        return Batch(axis, self.outer)


@dataclass(frozen=True)
class Lost:
    """The batch cannot be followed past ``node``."""

    node: str


@dataclass(frozen=True)
class Unknown:
    """The batch reaches the tensor, but its place was lost track of at ``node`` (an op this
    module does not know): nothing is claimed, a run decides."""

    node: str


@dataclass
class Followed:
    """What ``free_the_batch`` found and changed."""

    axes: dict        # tensor name -> Batch, Lost or Unknown (absent: the batch does not reach it)
    guesses: list     # names of the nodes changed on a reading of the exporter's intent


#: Ops applied per element (with broadcasting): the batch keeps its place, counted from the
#: right, in the output.
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod", "Where", "PRelu",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not",
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Mish", "ThresholdedRelu", "Shrink",
    "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign", "Erf", "Exp", "Log",
    "Sqrt", "Reciprocal", "Abs", "Neg", "Ceil", "Floor", "Round", "Sign", "Sin", "Cos", "Clip",
    "Cast", "CastLike", "Identity", "Dropout", "IsNaN", "IsInf", "QuantizeLinear", "DequantizeLinear",
}
#: Ops on rows of dim 0 (N, C, spatial...): any batch in dim 0 stays.
PER_ROW = {
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "LRN",
    "DepthToSpace", "SpaceToDepth",
}
#: Ops that work along one ``axis`` and keep the rank.
ALONG_AXIS = {"Softmax", "LogSoftmax", "Hardmax", "Split"}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"}


def free_the_batch(model: onnx.ModelProto, per_image: dict[str, list]) -> Followed:
    """Rewrite ``model``'s batch-of-1 constants in place so it runs at any batch.

    ``per_image``: every tensor's shape at a batch of 1 (from shape inference).
    """
    return _Walk(model, per_image).run()


class _Walk:
    """One pass over the nodes in topological order, with the batch's place in each tensor."""

    def __init__(self, model: onnx.ModelProto, per_image: dict[str, list]):
        self.graph = model.graph
        self.constants = {init.name: init for init in self.graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant"}
        self.producers = {output: node for node in self.graph.node for output in node.output}
        self.shapes = {**{name: list(init.dims) for name, init in self.constants.items()}, **per_image}
        self.axes: dict = {value.name: Batch(0) for value in self.graph.input if value.name not in self.constants}
        self.guesses: list[str] = []

    def run(self) -> Followed:
        for node in list(self.graph.node):
            if node.op_type in SHAPE_ONLY:
                continue  # shapes follow the batch by themselves
            states = [self.axes.get(name) for name in node.input]
            lost = next((s for s in states if isinstance(s, Lost)), None)
            unknown = next((s for s in states if isinstance(s, Unknown)), None)
            batched = [(i, s) for i, s in enumerate(states) if isinstance(s, Batch)]
            if lost is not None:  # whatever it meets, a tensor that mixed the batch stays mixed
                out = lost
            elif unknown is not None:
                out = unknown
            elif batched:
                out = self.follow(node, batched) or Unknown(node.name or node.output[0])
            else:
                continue
            self.axes.update((output, out) for output in node.output)
        return Followed(self.axes, self.guesses)

    def value(self, name: str) -> np.ndarray | None:
        return constant_value(name, self.constants, self.constant_nodes)

    def follow(self, node, batched) -> Batch | Lost | None:
        """The batch's place in ``node``'s outputs (a Lost where it cannot go on, None: unknown)."""
        op = node.op_type
        index, batch = batched[0]
        axis = batch.axis
        in_shape, out_shape = self.shapes.get(node.input[index]), self.shapes.get(node.output[0])
        lost = Lost(node.name or node.output[0])
        if in_shape is None or out_shape is None:
            return None
        rank, out_rank = len(in_shape), len(out_shape)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if op in ELEMENTWISE or op == "Concat":
            return self.elementwise(node, batched, attrs, out_rank, lost)
        if op in PER_ROW:
            return batch if index == 0 and axis == 0 else lost
        if op in ALONG_AXIS:
            return lost if _axis(attrs.get("axis", -1 if op != "Split" else 0), rank) == axis else batch
        if op in REDUCTIONS:
            reduced = attrs.get("axes")
            if reduced is None and op.startswith("Reduce") and len(node.input) > 1 and node.input[1]:
                reduced = self.value(node.input[1])
            if op.startswith("Arg"):
                reduced = [attrs.get("axis", 0)]
            reduced = sorted({_axis(a, rank) for a in (reduced if reduced is not None else range(rank))})
            if axis in reduced or index != 0:
                return lost
            return batch if attrs.get("keepdims", 1) else batch.moved(axis - sum(a < axis for a in reduced))
        if op == "Transpose":
            return batch.moved(list(attrs.get("perm", range(rank - 1, -1, -1))).index(axis))
        if op == "LayerNormalization":
            return lost if axis >= _axis(attrs.get("axis", -1), rank) or index != 0 else batch
        if op in ("MatMul", "Gemm"):
            return _matmul(op, index, batch, rank, out_rank, attrs, lost)
        if op == "Einsum":
            return _einsum(attrs.get("equation", ""), batched, lost)
        if op in ("Squeeze", "Unsqueeze"):
            return self.squeeze(node, batch, attrs, in_shape, out_rank, lost)
        if op in ("Reshape", "Flatten"):
            return self.reshape(node, batch, in_shape, out_shape, lost) if index == 0 else None
        if op == "Gather":
            return self.gather(node, index, batch, rank, attrs, lost)
        if op == "Slice":
            return self.slice(node, batch, in_shape, lost) if index == 0 else lost
        if op in ("Expand", "Tile", "Pad", "Resize"):
            return self.resizing(op, node, batch, in_shape, out_rank, attrs, lost) if index == 0 else lost
        return None

    def elementwise(self, node, batched, attrs, out_rank, lost):
        if any(self.shapes.get(node.input[i]) is None for i, _ in batched):
            return None
        placed = {(s.axis + out_rank - len(self.shapes[node.input[i]]), s.outer) for i, s in batched}
        if len(placed) != 1:
            return None
        batch = Batch(*placed.pop())
        if node.op_type == "Concat":
            if _axis(attrs["axis"], out_rank) == batch.axis:
                return lost
            self.expand_tokens(node, batched, batch, out_rank)
        if self.unbatched_operand_clashes(node, batched, batch.axis, out_rank, concat=node.op_type == "Concat"):
            return lost  # fine at a batch of 1 only: a constant sized like the batch's dim
        return batch

    def expand_tokens(self, node, batched, batch: Batch, out_rank: int) -> None:
        """A class token, an operand without the batch concatenated to a batch of 1 (ViT, DeiT),
        is expanded to the batch: torch's ``token.expand(n, -1, -1)``, exported with n = 1."""
        source_index, source = batched[0]
        if self.shapes[node.input[source_index]][source.axis] != 1:
            return  # a folded batch (several per-image values in its dim) would need a Tile
        for i, name in enumerate(node.input):
            stem = f"{node.output[0]}__onnxcam_token{i}"
            if name == f"{stem}_expanded":  # expanded when the model was prepared before
                batched.append((i, batch))
                continue
            producer = self.producers.get(name)
            if producer is not None and producer.op_type == "Expand" and producer.input[0] not in self.axes:
                name = producer.input[0]  # the classic exporter's expand(n, -1, -1), n computed from a Shape
            shape = self.shapes.get(name)
            if any(i == j for j, _ in batched) or shape is None or len(shape) != out_rank or shape[batch.axis] != 1:
                continue
            parts = [f"{stem}_before"] * bool(batch.axis) + [f"{stem}_batch"] + \
                [f"{stem}_after"] * bool(out_rank - batch.axis - 1)
            for part, count in ((f"{stem}_before", batch.axis), (f"{stem}_after", out_rank - batch.axis - 1)):
                if count:
                    self.graph.initializer.append(numpy_helper.from_array(np.ones(count, np.int64), part))
            self.insert_before(node, helper.make_node("Shape", [node.input[source_index]], [f"{stem}_batch"],
                                                      start=source.axis, end=source.axis + 1, name=f"{stem}_batch"),
                               helper.make_node("Concat", parts, [f"{stem}_shape"], axis=0, name=f"{stem}_shape"),
                               helper.make_node("Expand", [name, f"{stem}_shape"], [f"{stem}_expanded"],
                                                name=f"{stem}_expanded"))
            node.input[i] = f"{stem}_expanded"
            self.shapes[f"{stem}_expanded"] = shape
            batched.append((i, batch))
            self.guesses.append(node.name or node.output[0])

    def unbatched_operand_clashes(self, node, batched, out_axis, out_rank, concat) -> bool:
        """An operand without the batch whose dim at the batch's is not 1 (or, for Concat, any
        operand without the batch) only lines up with a batch of 1."""
        with_batch = {i for i, _ in batched}
        for i, name in enumerate(node.input):
            shape = self.shapes.get(name)
            if i in with_batch or not name or shape is None:
                continue
            where = out_axis - (out_rank - len(shape))
            if concat or (where >= 0 and shape[where] != 1):
                return True
        return False

    def squeeze(self, node, batch, attrs, in_shape, out_rank, lost):
        listed = attrs.get("axes")
        if listed is None and len(node.input) > 1 and node.input[1]:
            listed = self.value(node.input[1])
        if node.op_type == "Squeeze":
            listed = [i for i, d in enumerate(in_shape) if d == 1] if listed is None else listed
            listed = {_axis(a, len(in_shape)) for a in listed}
            return lost if batch.axis in listed else batch.moved(batch.axis - sum(a < batch.axis for a in listed))
        if listed is None:
            return None
        axis = batch.axis
        for a in sorted(_axis(a, out_rank) for a in listed):
            axis += a <= axis
        return batch.moved(axis)

    def reshape(self, node, batch, in_shape, out_shape, lost):
        """The output dim that holds the batch: as many per-image values before it as in the
        input. A constant target gets a -1 there, its other dims as at a batch of 1."""
        if not _static(in_shape) or not _static(out_shape):
            return self.leading_one(node, batch, in_shape)
        before = int(np.prod(in_shape[:batch.axis])) * batch.outer
        if node.op_type == "Flatten":
            split = _axis(node.attribute[0].i if node.attribute else 1, len(in_shape))
            return Batch(0, before) if batch.axis < split else Batch(1, before // int(np.prod(in_shape[:split])))
        place = batch_place(before, out_shape, batch.axis)
        if place is None:
            return lost
        target = self.value(node.input[1])
        if target is None:  # a computed shape (Shape -> Gather -> Concat) follows the batch itself
            if not place == batch == Batch(0):
                self.guesses.append(node.name or node.output[0])  # where it puts the batch: a run decides
            return place
        fixed = np.array(out_shape, dtype=np.int64)
        fixed[place.axis] = -1
        if not np.array_equal(fixed, target):
            self.set_shape(node, fixed)
        if not (batch == place == Batch(0) and out_shape[0] == 1):
            self.guesses.append(node.name or node.output[0])
        return place

    def leading_one(self, node, batch, in_shape) -> Batch | None:
        """Without static per-image sizes (a dynamic image size) only a batch of 1 kept in dim 0,
        ``[1, ...]``, is followed: the 1 becomes 0, "copy the input's dim" (or -1 where
        ``allowzero`` makes 0 a real 0 and there is no other -1)."""
        target = self.value(node.input[1]) if node.op_type == "Reshape" else None
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if (target is None or batch != Batch(0) or in_shape[0] != 1 or target.ndim != 1 or target.size == 0
                or target[0] != 1 or (allowzero and (0 in target or -1 in target))):
            return None
        fixed = target.copy()
        fixed[0] = -1 if allowzero else 0
        self.set_shape(node, fixed)
        return Batch(0)

    def set_shape(self, node, shape: np.ndarray) -> None:
        name = f"{node.output[0]}__onnxcam_batch_shape"  # one per node: others may share the shape
        self.graph.initializer.append(numpy_helper.from_array(shape.astype(np.int64), name))
        node.input[1] = name

    def gather(self, node, index, batch, rank, attrs, lost):
        """A Gather off the batch's dim keeps it; fixed indices into a whole flattened batch of 1
        (dynamo's as_strided) become per-row indices."""
        if index != 0:
            return None
        gathered = _axis(attrs.get("axis", 0), rank)
        indices = self.value(node.input[1])
        index_rank = len(self.shapes.get(node.input[1]) or ()) if indices is None else indices.ndim
        if gathered != batch.axis:
            return batch if gathered > batch.axis else batch.moved(batch.axis - 1 + index_rank)
        flat = self.producers.get(node.input[0])
        if (rank != 1 or batch != Batch(0) or indices is None or indices.ndim < 1 or indices.shape[0] != 1
                or indices.size == 0 or flat is None or flat.op_type != "Reshape"
                or not _static(self.shapes.get(flat.input[0]))):
            return lost
        if indices.min() < 0 or indices.max() >= int(np.prod(self.shapes[flat.input[0]])):
            return lost
        rows, row_indices = f"{node.output[0]}__onnxcam_rows", f"{node.output[0]}__onnxcam_row_indices"
        self.graph.initializer.append(numpy_helper.from_array(indices[0], row_indices))
        self.insert_before(node, helper.make_node("Flatten", [flat.input[0]], [rows], axis=1, name=rows))
        node.input[0], node.input[1] = rows, row_indices
        for attribute in list(node.attribute):
            if attribute.name == "axis":
                node.attribute.remove(attribute)
        node.attribute.append(helper.make_attribute("axis", 1))
        self.guesses.append(node.name or node.output[0])
        return Batch(0)

    def slice(self, node, batch, in_shape, lost):
        """A Slice keeps the batch where it takes all of the batch's dim. Bounds computed at run
        time (torch's chunk with a dynamic batch) are fine on another axis; on the batch's, or
        along axes not known, a run decides."""
        starts, ends = self.value(node.input[1]), self.value(node.input[2])
        sliced = self.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if starts is None or ends is None:
            if sliced is None or batch.axis in [_axis(a, len(in_shape)) for a in sliced]:
                return None
            return batch
        sliced = range(len(starts)) if sliced is None else [_axis(a, len(in_shape)) for a in sliced]
        for a, start, end in zip(sliced, starts, ends):
            if a == batch.axis and not (start == 0 and end >= in_shape[a]):
                return lost
        return batch

    def resizing(self, op, node, batch, in_shape, out_rank, attrs, lost):
        """Expand, Tile, Pad and Resize keep the batch where they leave its dim alone."""
        if op == "Expand":
            shape = self.value(node.input[1])
            if shape is None:
                return None
            out = batch.moved(batch.axis + out_rank - len(in_shape))
            where = out.axis - (out_rank - len(shape))
            if where < 0 or shape[where] == 1:
                return out
            if shape[where] != in_shape[batch.axis]:
                return lost
            # the input already has that dim (dynamo's F.normalize expands the norm to the
            # windows' shape, batch of 1 and all): a 1 leaves it to the input, whatever the batch
            fixed = np.array(shape, dtype=np.int64)
            fixed[where] = 1
            self.set_shape(node, fixed)
            self.guesses.append(node.name or node.output[0])
            return out
        if op == "Tile":
            repeats = self.value(node.input[1])
            return None if repeats is None else batch if repeats[batch.axis] == 1 else lost
        if op == "Pad":  # pads computed at run time (HF Swin's window padding): a run decides
            pads = attrs.get("pads") if "pads" in attrs else self.value(node.input[1])
            listed = self.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if pads is None:
                return None
            padded = range(len(in_shape)) if listed is None else [_axis(a, len(in_shape)) for a in listed]
            half = len(pads) // 2
            return lost if any(a == batch.axis and (pads[i] or pads[i + half]) for i, a in enumerate(padded)) else batch
        # Resize: a scale of 1 on the batch's dim keeps it; fixed sizes do not, computed ones may
        scales = self.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scales is not None and scales.size:
            return batch if scales[batch.axis] == 1 else lost
        sizes = node.input[3] if len(node.input) > 3 and node.input[3] else None
        fixed = None if sizes is None else self.value(sizes)
        if (fixed is not None and batch == Batch(0) and fixed.ndim == 1 and fixed.size == len(in_shape)
                and in_shape[0] == 1 and fixed[0] == 1 and not any(a.name == "axes" for a in node.attribute)):
            # the example's batch of 1 written into the sizes (dynamo's upsampling of a
            # segmentation model's scores): the batch's size becomes the input's own, as the
            # classic exporter computes it (Concat(Shape(x)[:1], the other sizes))
            stem = f"{node.output[0]}__onnxcam_batch"
            for name, value in ((f"{stem}_begin", [0]), (f"{stem}_end", [1]), (f"{stem}_rest", fixed[1:])):
                self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
            self.insert_before(node,
                               helper.make_node("Shape", [node.input[0]], [f"{stem}_shape"]),
                               helper.make_node("Slice", [f"{stem}_shape", f"{stem}_begin", f"{stem}_end"],
                                                [f"{stem}_size"]),
                               helper.make_node("Concat", [f"{stem}_size", f"{stem}_rest"], [f"{stem}_sizes"], axis=0))
            node.input[3] = f"{stem}_sizes"
            self.guesses.append(node.name or node.output[0])
            return batch
        return lost if sizes is None or fixed is not None else None

    def insert_before(self, node, *new_nodes) -> None:
        position = list(self.graph.node).index(node)
        for offset, new in enumerate(new_nodes):
            self.graph.node.insert(position + offset, new)


def batch_place(before: int, out_shape, axis: int) -> Batch | None:
    """Where a Reshape to ``out_shape`` puts a batch that has ``before`` per-image values ahead
    of it: a dim whose leading dims hold a divisor of ``before`` and which holds the rest.

    Where the batch sits on the border of two dims, or beside dims of 1, several dims qualify;
    the reading the exporters write is preferred: a dim of 1 (the batch itself), not the last
    dim (features, which the next MatMul sums over), the nearest to the input's ``axis``.
    """
    places = []
    for j, size in enumerate(out_shape):
        ahead = int(np.prod(out_shape[:j]))
        if before % ahead == 0 and size % (before // ahead) == 0:
            places.append(Batch(j, before // ahead))
    last = len(out_shape) - 1
    key = lambda p: (p.axis == last and last > 0, out_shape[p.axis] != 1, abs(p.axis - axis), p.axis)  # noqa: E731
    return min(places, key=key) if places else None


def _matmul(op, index, batch, rank, out_rank, attrs, lost):
    if op == "Gemm":
        row_axis = 1 if attrs.get("transA" if index == 0 else "transB", 0) else 0
        return batch.moved(0) if index == 0 and batch.axis == row_axis else lost
    if index == 0:  # A (..., M, K): K is summed over
        return lost if batch.axis == rank - 1 else batch.moved(batch.axis + out_rank - rank)
    if rank >= 2 and batch.axis == rank - 2:  # B (..., K, N): K is summed over
        return lost
    return batch.moved(batch.axis + out_rank - rank)


def _einsum(equation, batched, lost):
    """The batch follows its letter in the equation (dynamo writes MaxViT's attention as
    ``bhid,bhjd->bhij``): to that letter's place in the output, lost where it is summed over;
    unknown with an ellipsis, an implicit output, operands that disagree, or the letter shared
    with an operand without the batch."""
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    terms, output = equation.split("->")
    terms = terms.split(",")
    places = {(terms[i][b.axis], b.outer) for i, b in batched if i < len(terms) and b.axis < len(terms[i])}
    if len(places) != 1:
        return None
    letter, outer = places.pop()
    with_batch = {i for i, _ in batched}
    if any(letter in term for i, term in enumerate(terms) if i not in with_batch):
        return None
    return Batch(output.index(letter), outer) if letter in output else lost


def batch_is_consistent(model: onnx.ModelProto, input_name: str, image_shape: tuple) -> bool:
    """Whether ``model`` gives a run of two images each image's own outputs (after the changes
    that ``free_the_batch`` made on a reading of the exporter's intent)."""
    import onnxruntime as ort

    from onnxcam.runtime.providers import CPU_PROVIDER, SILENT, session_options

    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, *image_shape)).astype(np.float32)
    quiet = ort.RunOptions()
    quiet.log_severity_level = SILENT
    options = external.session_options_for(model, session_options())  # its errors are the user's
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[CPU_PROVIDER])
        together = session.run(None, {input_name: images}, quiet)
        alone = [session.run(None, {input_name: images[i:i + 1]}, quiet) for i in range(2)]
    except Exception:  # noqa: BLE001 - a shape the batch breaks is the answer, not an error
        return False
    for k, output in enumerate(together):
        expected = np.concatenate([run[k] for run in alone])
        scale = max(float(np.abs(expected).max()), 1e-12)
        if output.shape != expected.shape or not np.allclose(output, expected, rtol=1e-4, atol=1e-5 * scale):
            return False
    return True


def _axis(a, rank: int) -> int:
    return int(a) + rank if int(a) < 0 else int(a)


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
