"""The rewriter: one exported model in, one model out that also returns the target layer's
activation, the gradient of a score with respect to it, and the pre-softmax logits.

Inputs of the rewritten model: the original inputs, plus ``onnxcam_seed``, the cotangent of the
score (for class scores, shape [N, classes]: a one-hot row picks a class, any weights a weighted
sum of classes). Outputs: the original outputs, then ``onnxcam_activation`` (A),
``onnxcam_gradient`` (d<seed, score>/dA, shaped like A) and ``onnxcam_logits`` ([N, classes]).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcam.errors import LayerError, ModelError, UnsupportedOperatorError
from onnxcam.graph.locate import (Candidate, candidate_layers, find_logits, image_size, layer_layout, scores_named,
                                  resolve_tensor, token_grid)
from onnxcam.graph.batch_axis import Batch, Lost, Unknown, batch_is_consistent
from onnxcam.graph.prepare import BATCH_DIM, Prepared, load_model, prepare
from onnxcam.gradients.backward import backward, float_dtype, path_is_linear, path_nodes, unsupported_nodes
from onnxcam.gradients.emitter import constant_value

SEED = "onnxcam_seed"
ACTIVATION = "onnxcam_activation"
GRADIENT = "onnxcam_gradient"
LOGITS = "onnxcam_logits"


@dataclass(frozen=True)
class GradientModel:
    """A rewritten model and what the runtime needs to know to feed it."""

    model: onnx.ModelProto
    layer: str
    score: str                       # tensor the seed differentiates ("onnxcam_logits" for classes)
    input_name: str
    input_shape: tuple
    activation_shape: tuple
    seed_shape: tuple
    num_classes: int | None
    candidates: tuple[Candidate, ...] = field(default=())
    path_is_linear: bool = False     # score is linear in A: the gradient does not depend on the input
    batch_built_in: str | None = None  # the node after which the batch is 1 whatever the input's
    layer_layout: str = "NCHW"       # the layer's own; A and g come out as NCHW either way
    class_grid: tuple | None = None  # (H, W) of a segmentation model's per-pixel class scores
    class_axis: int = 1              # their classes' axis: 1, or 3 for channels-last scores

    @property
    def is_class_score(self) -> bool:
        return self.score == LOGITS

    @functools.cached_property
    def widest_step(self) -> int:
        """Elements per image of the largest node's inputs and outputs together: what ONNX Runtime
        holds at once at that step, at the least. Only tensors with a dynamic dim (the batch)
        count, by their fixed dims: weights and constants do not grow with the batch. VGG-16's
        first block holds 25 MiB an image, MobileNetV2's widest step 9 MiB; the automatic batch
        size is bounded by it."""
        graph = self.model.graph
        sizes = {}
        for value in (*graph.input, *graph.value_info, *graph.output):
            dims = value.type.tensor_type.shape.dim
            if dims and not all(d.HasField("dim_value") for d in dims):
                sizes[value.name] = int(np.prod([d.dim_value for d in dims if d.HasField("dim_value")]))
        return max((sum(sizes.get(name, 0) for name in (*node.input, *node.output)) for node in graph.node),
                   default=0)


def build_gradient_model(model: str | os.PathLike | onnx.ModelProto, layer: str | None = None,
                         score: str | None = None) -> GradientModel:
    """Rewrite ``model`` so one run returns A, dScore/dA and the logits for a batch of inputs.

    ``layer``: tensor or node name of the target layer (default: the last candidate).
    ``score``: a tensor name for neuron-level CAMs (default: the pre-softmax logits).
    """
    preparation = prepare(load_model(model))
    prepared = preparation.model
    graph = gs.import_onnx(prepared)
    graph.toposort()
    if len(graph.inputs) != 1:
        names = ", ".join(t.name for t in graph.inputs)
        raise ModelError(f"the model has {len(graph.inputs)} inputs ({names}): onnxcam explains "
                         "single-input image models; give the values of the inputs other than the image "
                         "(--input NAME=VALUE; in Python Explainer(..., inputs={NAME: value}))")
    dtype = graph.inputs[0].dtype or np.float32
    _refuse_integer_arithmetic(graph)

    found = find_logits(graph, scores_named(prepared))
    built_in = _batch_built_in(found, preparation)
    pixel_grid, class_axis = class_grid(found, image_size(graph)) or (None, 1)
    if score is None and pixel_grid is None:
        _refuse_other_outputs(found, image_size(graph))
    logits = _expose_logits(graph, found)
    candidates = tuple(candidate_layers(graph, logits))
    target = logits if score is None else resolve_tensor(graph, score, what="score tensor")
    source = _choose_layer(graph, layer, candidates, graph.inputs[0].shape, logits,
                           pixel_classes=found.shape[class_axis] if pixel_grid else None)
    layer_dtype, score_dtype = float_dtype(source, dtype), float_dtype(target, dtype)  # float16 inside float32 I/O
    seed = gs.Variable(SEED, dtype=score_dtype, shape=_batched(target.shape))
    graph.inputs.append(seed)
    linear = path_is_linear(path_nodes(graph, source, target), source)
    try:
        gradient = backward(graph, source, target, seed, dtype=score_dtype)
    except UnsupportedOperatorError as exc:
        raise UnsupportedOperatorError(f"{exc}{_later_layers_hint(graph, source, target, candidates)}") from None

    size = image_size(graph)
    shape = source.shape
    layout = layer_layout(shape, size)
    grid = token_grid(shape, size)
    activation_shape = _nchw(shape, layout, grid)
    graph.outputs.append(_nchw_view(graph, source, ACTIVATION, layer_dtype, activation_shape, layout, grid))
    graph.outputs.append(_nchw_view(graph, gradient, GRADIENT, layer_dtype, activation_shape, layout, grid))
    graph.outputs.append(logits)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()

    rewritten = gs.export_onnx(graph)
    rewritten.ir_version = prepared.ir_version
    rewritten.metadata_props.extend(prepared.metadata_props)
    input_shape = tuple(graph.inputs[0].shape or ())
    return GradientModel(
        model=rewritten, layer=source.name, score=target.name,
        input_name=graph.inputs[0].name, input_shape=input_shape,
        activation_shape=tuple(activation_shape or ()), seed_shape=tuple(seed.shape or ()),
        num_classes=found.shape[class_axis] if pixel_grid else _num_classes(logits), candidates=candidates,
        path_is_linear=linear, batch_built_in=built_in, layer_layout=layout, class_grid=pixel_grid,
        class_axis=class_axis)


def _refuse_other_outputs(logits: gs.Tensor, size: tuple) -> None:
    """A ModelError for scores that are neither one per class nor one per class and pixel: a
    detector's [N, 84, 8400] flattened would give "class 123456". A LayerError asking for the
    size where the scores' shape is unknown only because the input size is (a segmentation
    export with dynamic height and width: its classes per pixel show once the size is fixed)."""
    shape = list(logits.shape or [])
    if sum(1 for d in shape[1:] if d != 1) > 1:
        if None in size and not all(isinstance(d, int) for d in shape[1:]):
            raise LayerError(f"the model's input size is dynamic, and so is the shape of its scores "
                             f"'{logits.name}' {shape}: give the input size to feed (--size H,W)")
        raise ModelError(
            f"the model's scores '{logits.name}' have shape {shape}: neither one score per class "
            "([N, classes]) nor per class and pixel ([N, classes, H, W]), as a detector's boxes: explain "
            f"one of its values as a neuron (--score {logits.name} --neuron INDEX, the batch left out; "
            "in Python score= and neuron=)")


def class_grid(logits: gs.Tensor, size: tuple) -> tuple[tuple[int, int], int] | None:
    """((H, W), the classes' axis) when the scores are per pixel: [N, classes, H, W] (a
    segmentation model: FCN, DeepLab, LRASPP, SegFormer's logits) or channels last,
    [N, H, W, classes] (a Keras U-Net through tf2onnx), told apart as layers are (``layer_layout``,
    against the input's ``size``); else None (a classifier's [N, classes] or [N, classes, 1, 1])."""
    shape = logits.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    axis = _class_axis_said(logits) or (3 if layer_layout(shape, size) == "NHWC" else 1)
    grid = (shape[1], shape[2]) if axis == 3 else (shape[2], shape[3])
    return (grid, axis) if min(grid) >= 2 else None


def _class_axis_said(logits: gs.Tensor) -> int | None:
    """The axis (1 or 3) that the ArgMax or Softmax taking the 4-D scores names, where one does:
    it settles a square output whose two readings fit the image alike."""
    for node in logits.outputs:
        if node.op in ("ArgMax", "Softmax", "LogSoftmax") and "axis" in node.attrs:
            axis = int(node.attrs["axis"]) % 4
            if axis in (1, 3):
                return axis
    return None


def _feature_layers(candidates, classes: int) -> tuple:
    """A segmentation model's candidates but its per-pixel class scores (the classifier's
    output and its upsampling, whose map of a class would be the class's own scores): the
    automatic layer is the last feature map before them."""
    features = tuple(c for c in candidates if not is_class_score_layer(c, classes))
    return features or candidates


def is_class_score_layer(candidate: Candidate, classes: int) -> bool:
    """A segmentation model's layer with one channel per class: its class scores per pixel."""
    return (candidate.shape[1] if candidate.layout == "NCHW" else candidate.shape[-1]) == classes


#: Integer ops of onnxruntime's operator-format and dynamic quantization, which compute on the
#: quantized values themselves (QDQ models keep float ops between QuantizeLinear and
#: DequantizeLinear, and are differentiated straight through the quantization).
INTEGER_ARITHMETIC = {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QGemm", "QAttention",
                      "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def _refuse_integer_arithmetic(graph: gs.Graph) -> None:
    for node in graph.nodes:
        if node.op in INTEGER_ARITHMETIC or node.op.startswith("QLinear"):
            kind = "dynamically" if node.op in ("DynamicQuantizeLinear", "ConvInteger", "MatMulInteger") else \
                "in the operator format"
            raise ModelError(
                f"the model is quantized {kind} ({node.op} at node '{node.name}'), which computes on "
                "integers and has no gradient: quantize it in the QDQ format (onnxruntime's "
                "quantize_static with quant_format=QuantFormat.QDQ, its default), which onnxcam "
                "differentiates straight through the quantization, or explain the float model")


def _batch_built_in(logits: gs.Tensor, preparation: Prepared) -> str | None:
    """The node after which the logits' batch is 1 whatever the input's, or None.

    Exporters bake the example's batch of 1 into constants; preparation follows the batch and
    makes them follow it (``batch_axis``), and names the node where it lost the batch. Where it
    changed the model on a reading of the exporter's intent, or lost track of the batch at an op
    it does not know, a run of two images must give each image's own outputs, or the first such
    node is named. Without a static input size to run, shape inference decides: a dim 0 of 1 in
    the logits, found by walking back along the tensors whose dim 0 is 1. Such a model can only
    run one image, one noisy row, at a time.
    """
    batch = preparation.batch_axes.get(logits.name)
    if isinstance(batch, Lost):
        return batch.node
    if batch == Batch(0) and not preparation.batch_guesses:
        return None
    suspect = batch.node if isinstance(batch, Unknown) else (preparation.batch_guesses or (logits.name,))[0]
    graph_input = preparation.model.graph.input[0]
    image = [d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim][1:]
    if image and all(image):
        return None if batch_is_consistent(preparation.model, graph_input.name, tuple(image)) else suspect
    if not logits.shape or logits.shape[0] != 1:
        return None
    tensor = logits
    while tensor.inputs:
        node = tensor.inputs[0]
        ones = [t for t in node.inputs if isinstance(t, gs.Variable) and t.shape and t.shape[0] == 1]
        if not ones:
            return node.name or node.op
        tensor = ones[0]
    return tensor.name


def _batched(shape) -> list | None:
    if shape is None:
        return None
    shape = list(shape)
    if shape:
        shape[0] = BATCH_DIM
    return shape


def _expose_logits(graph: gs.Graph, logits: gs.Tensor) -> gs.Tensor:
    """A graph output ``onnxcam_logits`` of shape [N, classes], flattening e.g. [N, C, 1, 1]."""
    rank = len(logits.shape) if logits.shape is not None else 2
    op = "Identity" if rank == 2 else "Flatten"
    attrs = {} if rank == 2 else {"axis": 1}
    out = gs.Variable(LOGITS, dtype=logits.dtype or np.float32, shape=[BATCH_DIM, _classes(logits)])
    graph.nodes.append(gs.Node(op=op, name=f"onnxcam/{LOGITS}", attrs=attrs, inputs=[logits],
                               outputs=[out]))
    return out


def _classes(logits: gs.Tensor):
    if logits.shape is None or len(logits.shape) < 2:
        return "classes"
    dims = list(logits.shape[1:])
    if all(isinstance(d, int) for d in dims):
        return int(np.prod(dims))
    return "classes"


def _num_classes(logits: gs.Tensor) -> int | None:
    n = logits.shape[1] if logits.shape else None
    return n if isinstance(n, int) else None


def automatic_layer(graph: gs.Graph, candidates, score: gs.Tensor,
                    pixel_classes: int | None = None) -> Candidate | None:
    """The last candidate, passing over ViT token tensors whose patch tokens reach the score only
    through the leading tokens (the class token, after the last attention block): their gradient
    is zero on every patch, and so would be the map. For a segmentation model with
    ``pixel_classes`` classes, the last before its per-pixel class scores (``_feature_layers``)."""
    if pixel_classes:
        candidates = _feature_layers(candidates, pixel_classes)
    tensors, size = graph.tensors(), image_size(graph)
    for candidate in reversed(candidates):
        if candidate.layout != "NLC":
            return candidate
        source, (extra, _, _) = tensors[candidate.tensor], token_grid(candidate.shape, size)
        if _patch_tokens_reach_score(path_nodes(graph, source, score), source, extra, candidate.shape[1]):
            return candidate
    return candidates[-1] if candidates else None


def _patch_tokens_reach_score(nodes, source: gs.Tensor, extra: int, tokens: int) -> bool:
    """False when, before attention mixes the tokens (a MatMul of two tensors of the path), the
    path keeps only leading tokens (a Gather or Slice on the token axis). Taking the class token
    off to put it back, as ``cat(x[:, :1], registers, x[:, 1:])`` does, keeps the patches."""
    on_path = {source.name} | {t.name for node in nodes for t in node.outputs}
    selected_leading = False
    for node in nodes:
        if node.op == "MatMul" and all(t.name in on_path for t in node.inputs[:2]):
            return True
        if node.op in ("Gather", "Slice") and node.inputs[0].name in on_path and _on_token_axis(node):
            kept = _kept_tokens(node, tokens)
            if kept is None or not (kept >= extra).any():
                selected_leading = True
            else:
                return True
    return not selected_leading


def _on_token_axis(node: gs.Node) -> bool:
    if node.op == "Gather":
        return node.attrs.get("axis", 0) in (1, -2)
    axes = constant_value(node.inputs[3]) if len(node.inputs) > 3 else None
    return axes is None or bool(np.isin(axes, (1, -2)).any())


def _kept_tokens(node: gs.Node, tokens: int) -> np.ndarray | None:
    """The token indices a Gather or Slice on the token axis keeps, None where not constant."""
    if node.op == "Gather":
        indices = constant_value(node.inputs[1])
        return None if indices is None else np.asarray(indices).ravel() % tokens
    starts, ends, steps = (constant_value(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2, 4))
    if starts is None or ends is None or len(np.ravel(starts)) != 1:
        return None
    step = int(np.ravel(steps)[0]) if steps is not None else 1
    return np.arange(tokens)[slice(int(np.ravel(starts)[0]), int(np.ravel(ends)[0]), step)]


def _choose_layer(graph: gs.Graph, layer: str | None, candidates, input_shape, score: gs.Tensor,
                  pixel_classes: int | None = None) -> gs.Tensor:
    if layer is not None:
        return resolve_tensor(graph, layer)
    if not candidates and input_shape and not all(isinstance(d, int) for d in input_shape[1:]):
        raise LayerError(f"the model's input size is dynamic ({list(input_shape)}): layer shapes are "
                         "unknown until it is fixed; give the input size (--size H,W)")
    if not candidates:
        raise LayerError("the model has no suitable target layer (a 4-D activation with spatial "
                         "size >= 2 that every path to the logits passes through): name one with "
                         "--layer")
    return graph.tensors()[automatic_layer(graph, candidates, score, pixel_classes).tensor]


def _nchw(shape, layout: str, grid):
    if layout == "NCHW" or shape is None:
        return shape
    if layout == "NLC":
        return [shape[0], shape[2], grid[1], grid[2]]
    return [shape[0], shape[3], shape[1], shape[2]]


def _nchw_view(graph: gs.Graph, tensor: gs.Tensor, name: str, dtype, shape, layout: str, grid) -> gs.Variable:
    """``tensor`` as a graph output ``name`` of ``shape``, channels first: the CAM methods read
    (N, K, h, w). ViT tokens lose their class (and distillation) token, and the patch tokens go
    back on their grid, as pytorch-grad-cam's ``reshape_transform`` does."""
    out = gs.Variable(name, dtype=dtype, shape=_batched(shape))
    if layout == "NLC":
        extra, rows, columns = grid
        patches = gs.Variable(f"onnxcam/{name}_patches", dtype=dtype)
        on_grid = gs.Variable(f"onnxcam/{name}_grid", dtype=dtype)
        bounds = [gs.Constant(f"onnxcam/{name}_{what}", np.array([value], np.int64))
                  for what, value in (("start", extra), ("end", extra + rows * columns), ("axis", 1))]
        grid_shape = gs.Constant(f"onnxcam/{name}_grid_shape", np.array([-1, rows, columns, shape[1]], np.int64))
        graph.nodes += [
            gs.Node(op="Slice", name=f"onnxcam/{name}_patches", inputs=[tensor, *bounds], outputs=[patches]),
            gs.Node(op="Reshape", name=f"onnxcam/{name}_grid", inputs=[patches, grid_shape], outputs=[on_grid]),
            gs.Node(op="Transpose", name=f"onnxcam/{name}", attrs={"perm": [0, 3, 1, 2]},
                    inputs=[on_grid], outputs=[out])]
    elif layout == "NCHW":
        graph.nodes.append(gs.Node(op="Identity", name=f"onnxcam/{name}", inputs=[tensor], outputs=[out]))
    else:
        graph.nodes.append(gs.Node(op="Transpose", name=f"onnxcam/{name}", attrs={"perm": [0, 3, 1, 2]},
                                   inputs=[tensor], outputs=[out]))
    return out


def _later_layers_hint(graph, source, target, candidates) -> str:
    """Candidate layers whose own path to the score has a rule for every operator."""
    tensors = graph.tensors()
    usable = [c.tensor for c in candidates if c.tensor != source.name
              and not unsupported_nodes(path_nodes(graph, tensors[c.tensor], target))]
    return f"; layers with a supported path: {', '.join(usable[-5:])}" if usable else ""
