"""Loading a model and bringing it to the one form the gradient rules are written for.

Exported models come in every vintage: initializers listed as inputs, opset 7, a batch of 1 baked
into constants (``batch_axis``), stale value_info. Preparation normalises all of it once, so the
rewriter and the rule table stay small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import helper, shape_inference, version_converter

from onnxcam.errors import ModelError
from onnxcam.graph import external
from onnxcam.graph.batch_axis import Batch, Followed, free_the_batch
from onnxcam.graph.contrib import decompose_fused_ops

#: The opset the rules are written for: ScatterElements(reduction="add") needs 16,
#: LayerNormalization 17. Newer models keep their own opset.
OPSET_FLOOR = 17
BATCH_DIM = "N"


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read and validate a model from a path or take a ModelProto.

    External data of more than ``external.READ_IN_BYTES`` a tensor stays on disk (``external``):
    that is how models over protobuf's 2 GB limit are read at all."""
    if isinstance(model, onnx.ModelProto):
        proto, by_path = model, False
        where = "the given ModelProto"
        external.check_resolvable(proto, where)
    else:
        path = Path(model)
        where = f"model '{path}'"
        if not path.exists():
            raise ModelError(f"{where} does not exist: check the path")
        if path.is_dir():
            raise ModelError(f"{where} is a directory: give the path of an .onnx file")
        if path.stat().st_size == 0:
            raise ModelError(f"{where} is an empty file: re-export the model")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except OSError as exc:
            raise ModelError(f"{where} could not be read ({_first_line(exc)}): check the file") from None
        except Exception as exc:  # protobuf DecodeError and friends
            raise ModelError(f"{where} is not a valid ONNX file ({type(exc).__name__}): "
                             "re-export it or check that the download completed") from None
        by_path = not external.has_external_data(proto)  # the checker can read the file itself
        try:
            external.attach_small_tensors(proto, path, where)
        except OSError as exc:
            raise ModelError(f"{where}: its external data could not be read ({_first_line(exc)}): "
                             "check the model's external data files") from None
    if not proto.graph.node:
        raise ModelError(f"{where} is not a valid ONNX model (its graph has no nodes): "
                         "check that it is an exported model")
    try:
        if by_path:  # half the time of serializing the proto for the checker (VGG-16: 0.9 s of 1.8 s)
            onnx.checker.check_model(str(model))
        else:
            onnx.checker.check_model(external.checkable(proto))
    except EncodeError:  # the checker serializes the proto: over 2 GB
        raise external.too_large(where) from None
    except Exception as exc:
        raise ModelError(f"{where} fails the ONNX checker ({_first_line(exc)}): re-export it") from None
    return proto


def with_options(model: str | os.PathLike | onnx.ModelProto, inputs=None, scores_output: str | None = None):
    """``model`` as the user's options make it: itself when there are none (a path stays a path,
    which the cache keys by the file), else a ModelProto with the inputs other than the image
    fixed (``--input``) and the class-score output named in its metadata (``--scores-output``),
    so the cache key holds both."""
    if not inputs and scores_output is None:
        return model
    from onnxcam.graph.fixed_inputs import fix_inputs
    from onnxcam.graph.locate import with_scores_output

    proto = load_model(model)
    if inputs:
        proto = fix_inputs(proto, inputs)
    if scores_output is not None:
        proto = with_scores_output(proto, scores_output)
    return proto


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def model_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


@dataclass(frozen=True)
class Prepared:
    """A prepared model, where each tensor carries the batch, and the nodes changed on a reading
    of the exporter's intent (``batch_axis``)."""

    model: onnx.ModelProto
    batch_axes: dict = field(default_factory=dict)
    batch_guesses: tuple = ()


def prepare_model(model: onnx.ModelProto, dynamic_batch: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with initializers out of the inputs, opset >= OPSET_FLOOR, a symbolic
    batch dimension, and fresh shape inference."""
    return prepare(model, dynamic_batch).model


def prepare(model: onnx.ModelProto, dynamic_batch: bool = True) -> Prepared:
    """``prepare_model``, with the batch axes found on the way."""
    model = _copy(model)
    weights = _detach_weights(model)
    _drop_initializer_inputs(model)
    if model_opset(model) < OPSET_FLOOR:
        model = _upgrade_opset(model)
    decompose_fused_ops(model)
    _fold_index_arithmetic(model)
    followed, per_image = _make_batch_dynamic(model, weights) if dynamic_batch else (None, {})
    model = infer_shapes(model)
    if followed is not None:
        _complete_shapes(model, followed.axes, per_image)
        _settle_lost_dims(model, weights, per_image)
    _attach_weights(model, weights)
    if followed is None:
        return Prepared(model)
    return Prepared(model, followed.axes, tuple(followed.guesses))


#: Integer arithmetic that exporters leave on constants (torch's MultiheadAttention computes a
#: reshape's target through Mod and Add of constants), which shape inference does not evaluate.
INDEX_ARITHMETIC = {
    "Mod": lambda a, b, fmod=0: np.fmod(a, b) if fmod else np.mod(a, b),
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Neg": np.negative, "Identity": np.asarray,
    "Reshape": lambda a, shape, allowzero=0: a.reshape([a.shape[i] if d == 0 and not allowzero else d
                                                      for i, d in enumerate(shape)]),
    "Unsqueeze": lambda a, axes: np.expand_dims(a, tuple(int(x) for x in axes)),
    "Concat": lambda *parts, axis: np.concatenate(parts, axis=axis),
}


def _fold_index_arithmetic(model: onnx.ModelProto) -> None:
    """Replace integer arithmetic on constants by its result, so that shape inference can follow
    the shapes computed from it."""
    from onnx import numpy_helper

    known = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
             if init.data_type == onnx.TensorProto.INT64 and (init.raw_data or init.int64_data)}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.dtype == np.int64:
                known[node.output[0]] = value
            continue
        rule = INDEX_ARITHMETIC.get(node.op_type)
        if rule is None or len(node.output) != 1 or not node.input or not all(i in known for i in node.input):
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        value = np.asarray(rule(*(known[i] for i in node.input), **attributes)).astype(np.int64)
        known[node.output[0]] = value
        folded = helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                  value=numpy_helper.from_array(value))
        node.CopyFrom(folded)


#: Initializers above this many bytes are set aside while the model is converted and inferred:
#: those passes serialise the whole model several times and only need the weights' shapes.
DETACH_BYTES = 1 << 16


def _detach_weights(model: onnx.ModelProto) -> dict[str, bytes]:
    detached = {}
    for init in model.graph.initializer:
        if init.HasField("raw_data") and len(init.raw_data) > DETACH_BYTES:
            detached[init.name] = init.raw_data
            init.ClearField("raw_data")
    return detached


def _attach_weights(model: onnx.ModelProto, detached: dict[str, bytes]) -> None:
    for init in model.graph.initializer:
        if init.name in detached:
            init.raw_data = detached[init.name]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    names = {init.name for init in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in names]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    model.ir_version = max(model.ir_version, 4)
    try:
        upgraded = version_converter.convert_version(model, OPSET_FLOOR)
    except Exception as exc:
        raise ModelError(f"the model's opset {model_opset(model)} could not be upgraded to "
                         f"{OPSET_FLOOR} ({_first_line(exc)}): re-export it with opset "
                         f">= {OPSET_FLOOR}") from None
    upgraded.ir_version = max(upgraded.ir_version, helper.find_min_ir_version_for(
        list(upgraded.opset_import)))
    return upgraded


def _make_batch_dynamic(model: onnx.ModelProto, weights: dict[str, bytes]) -> tuple[Followed, dict]:
    """Symbolic dim 0 on every input and output; constants that hard-code a batch of 1 made to
    follow the batch (``batch_axis.free_the_batch``). Returns its findings and the per-image
    shapes (static where the symbolic ones lose track, as in the token count of attention)."""
    graph = model.graph
    followed, per_image = Followed({}, []), {}
    if all(_batch_of_one_or_symbolic(value) for value in graph.input):
        single = _with_batch_of_one(model)
        per_image, types = _inferred_shapes(single)
        per_image.update(_measured_shapes(single, weights, per_image, types))
        followed = free_the_batch(model, per_image)
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 1:
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM
    del graph.value_info[:]  # stale static shapes would make the runtime fold Shape() to batch 1
    return followed, per_image


def _batch_of_one_or_symbolic(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return not dims or not dims[0].HasField("dim_value") or dims[0].dim_value == 1


def _with_batch_of_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose inputs have a batch of 1, for per-image shapes (the weights are detached)."""
    copy = _copy(model)
    for value in copy.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    return copy


def _inferred_shapes(model: onnx.ModelProto) -> tuple[dict[str, list], dict[str, int]]:
    """Every tensor's inferred shape and element type."""
    inferred = infer_shapes(model)
    shapes, types = {}, {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor_type = value.type.tensor_type
        types[value.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                                  for d in tensor_type.shape.dim]
    return shapes, types


def _measured_shapes(single: onnx.ModelProto, weights: dict[str, bytes], inferred: dict[str, list],
                     types: dict[str, int]) -> dict:
    """The shapes that inference left incomplete at a batch of 1, measured by running the model
    once on a random image of its static size. Sizes computed from ``Shape`` through ``Div`` or
    ``Mod`` (HF's embeddings, Swin's window padding) are beyond ONNX's data propagation, and the
    gradient rules need them. Empty when nothing is missing, or when the model cannot run alone."""
    lost = [name for node in single.graph.node for name in node.output
            if name and types.get(name) and not all(isinstance(d, int) for d in inferred.get(name, [None]))]
    return _run_shapes(single, weights, lost, types, batch=1)


#: Bytes of exposed tensors per measuring run: their values all come back at once, and a ViT's
#: attention maps at a high resolution take tens of MB each. Each run makes a session, so the
#: runs take as many tensors as fit (the first ``FIRST_RUN`` tell their typical size). A model
#: with more weights than that gets runs of its weights' size: each session loads them all
#: (ViT-H/14's 2.5 GB took 3.5 s a session, the runs 1.3 s).
MEASURE_BYTES = 512 * 2**20
FIRST_RUN = 256


def _run_shapes(model: onnx.ModelProto, weights: dict[str, bytes], names: list[str], types: dict[str, int],
                batch: int) -> dict[str, list]:
    """The shapes of tensors ``names`` in runs of ``batch`` random images of the model's static
    input size, on the CPU with basic graph optimisations, about ``MEASURE_BYTES`` of tensors a run;
    empty where the model cannot run so."""
    import onnxruntime as ort

    from onnxcam.runtime.providers import CPU_PROVIDER, SILENT

    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim][1:]
        if not names or not all(dims) or value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            return {}
        feeds[value.name] = np.random.default_rng(0).standard_normal((batch, *dims)).astype(np.float32)
    runnable = _copy(model)
    _attach_weights(runnable, weights)
    outputs = runnable.graph.output
    listed = len(outputs)
    options = ort.SessionOptions()
    # basic rewrites (constant folding, redundant nodes) only: the exposed tensors keep every
    # fusion from applying, and ViT-H/14's rewrite took 12.8 s with them against 14.8 s without
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = SILENT
    external.session_options_for(runnable, options)
    shapes: dict[str, list] = {}
    budget = max(MEASURE_BYTES, sum(external.tensor_bytes(t) or 0 for t in runnable.graph.initializer))
    start, count = 0, FIRST_RUN
    while start < len(names):
        if len(names) - (start + count) < count // 4:  # a last run of a few tensors joins this one
            count = len(names) - start
        chunk, start = names[start:start + count], start + count
        del outputs[listed:]
        outputs.extend(helper.make_tensor_value_info(name, types[name], None) for name in chunk
                       if name not in {o.name for o in outputs[:listed]})
        try:
            session = ort.InferenceSession(runnable.SerializeToString(), options, providers=[CPU_PROVIDER])
            values = session.run(chunk, feeds)
            del session  # before the next one loads the weights again
        except Exception:  # noqa: BLE001 - the inferred shapes stand, and the rules say what they lack
            return {}
        shapes.update((name, list(value.shape)) for name, value in zip(chunk, values))
        typical = max(sum(value.nbytes for value in values) / len(values), 1.0)
        count = max(16, int(budget / typical))
    return shapes


def _settle_lost_dims(model: onnx.ModelProto, weights: dict[str, bytes], per_image: dict[str, list]) -> None:
    """Dims still unknown where the batch's place was lost track of (past pads computed at run
    time: HF Swin), told apart by one run of two images: a dim the same as at a batch of 1 is
    fixed, one of 1 that becomes 2 is N, and one that grows otherwise (windows) stays symbolic."""
    values, types = {}, {}
    for value in model.graph.value_info:
        known, dims = per_image.get(value.name), value.type.tensor_type.shape.dim
        if known and all(isinstance(d, int) for d in known) and (
                len(dims) != len(known) or any(not d.HasField("dim_value") and d.dim_param != BATCH_DIM for d in dims)):
            values[value.name], types[value.name] = value, value.type.tensor_type.elem_type
    for name, shape in _run_shapes(model, weights, list(values), types, batch=2).items():
        tensor_type, known = values[name].type.tensor_type, per_image[name]
        if len(shape) != len(known):
            continue
        if len(tensor_type.shape.dim) != len(known):
            tensor_type.shape.Clear()
            tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension() for _ in known)
        for dim, at_one, at_two in zip(tensor_type.shape.dim, known, shape):
            if dim.HasField("dim_value"):
                continue
            if at_one == at_two:
                dim.Clear()
                dim.dim_value = at_one
            elif (at_one, at_two) == (1, 2):
                dim.Clear()
                dim.dim_param = BATCH_DIM


def _complete_shapes(model: onnx.ModelProto, axes: dict, per_image: dict[str, list]) -> None:
    """Fill the dims that symbolic inference lost from the per-image shapes: every dim of a
    tensor but the one that holds the batch (``batch_axis.Batch``) is the same at any batch, and
    that one is N where it holds the batch alone."""
    for value in model.graph.value_info:
        place, known = axes.get(value.name), per_image.get(value.name)
        tensor_type = value.type.tensor_type
        if not isinstance(place, Batch) or not known or not all(isinstance(d, int) for d in known):
            continue
        if not tensor_type.HasField("shape"):
            tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension() for _ in known)
        dims = tensor_type.shape.dim
        if len(dims) != len(known):
            continue
        for axis, (dim, size) in enumerate(zip(dims, known)):
            if dim.HasField("dim_value"):
                continue
            if axis != place.axis:
                dim.Clear()
                dim.dim_value = size
            elif size == 1 and place.outer == 1:  # the batch alone: the input's N, not unk__7
                dim.Clear()
                dim.dim_param = BATCH_DIM


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise ModelError(f"ONNX shape inference failed on the model ({_first_line(exc)}): "
                         "re-export it with static shapes") from None
