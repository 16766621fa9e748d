"""Finding things in a prepared graph: the pre-softmax logits, the candidate target layers, and a
layer or tensor the user named."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcam.errors import LayerError, ModelError
from onnxcam.gradients.backward import SHAPE_ONLY, carries_values

#: Ops that only move or relabel data between the logits and the model's output.
PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Dropout"}
#: Output squashing whose input is the score to differentiate (method.md: pre-softmax logits).
SQUASHING = {"Softmax", "LogSoftmax", "Sigmoid"}


@dataclass(frozen=True)
class Candidate:
    """A tensor that can serve as the CAM's target layer."""

    tensor: str
    node: str  # the producing node's name
    op: str
    shape: tuple
    layout: str = "NCHW"  # "NHWC": channels last (Swin's stages, tf2onnx's models); "NLC": ViT tokens


#: Ends of output names that say "class scores" (see ``score_output_index``)
SCORE_NAMES = ("logits", "scores", "probs", "prob", "probabilities", "predictions", "softmax")
#: Model metadata naming the output that holds the class scores, for names that do not say so
SCORES_KEY = "onnxcam.scores"


def score_output_index(names, named: str | None = None) -> int:
    """Which of a model's outputs holds its class scores: the one the metadata ``named``
    (ModelError when there is none of that name), else the first whose name ends in one of
    SCORE_NAMES when there are several (a model that outputs an embedding, then its logits),
    else the first."""
    names = list(names)
    if named is not None:
        if named not in names:
            raise ModelError(f"the model's metadata {SCORES_KEY}={named!r} names no output (its outputs: "
                             f"{', '.join(names)}): fix the metadata")
        return names.index(named)
    if len(names) > 1:
        for index, name in enumerate(names):
            if _named_like_scores(name):
                return index
    return 0


def _named_like_scores(name: str) -> bool:
    return name.casefold().rstrip("_0123456789:").endswith(SCORE_NAMES)


def own_outputs(model) -> list[str]:
    """The names of a ModelProto's own outputs (a rewritten model's onnxcam_ ones left out)."""
    return [output.name for output in model.graph.output if not output.name.startswith("onnxcam_")]


def scores_output_name(model) -> str:
    """The name of the output a ModelProto's class scores are read from ("" for none)."""
    names = own_outputs(model)
    return names[score_output_index(names, scores_named(model))] if names else ""


def scores_output_by_default(model) -> str | None:
    """The first output of a model whose several outputs none names as class scores (neither the
    metadata nor a name like logits): the output read only because it comes first; else None."""
    names = own_outputs(model)
    if len(names) < 2 or scores_named(model) is not None or any(_named_like_scores(n) for n in names):
        return None
    return names[0]


def scores_named(model) -> str | None:
    """The output the model's metadata ``onnxcam.scores`` names, if any (a ModelProto)."""
    return next((prop.value.strip() for prop in model.metadata_props if prop.key == SCORES_KEY), None)


def with_scores_output(model, name: str):
    """A copy of ``model`` (a ModelProto) whose metadata ``onnxcam.scores`` names output ``name``
    (``--scores-output``): every later step, and the cache key, then read that choice. OptionError
    when the model has no output of that name."""
    import onnx

    from onnxcam.errors import OptionError

    outputs = [output.name for output in model.graph.output]
    if name not in outputs:
        raise OptionError(f"--scores-output {name}: the model has no output {name!r} (its outputs: "
                          f"{', '.join(outputs)})")
    chosen = onnx.ModelProto()
    chosen.CopyFrom(model)
    kept = [prop for prop in chosen.metadata_props if prop.key != SCORES_KEY]
    del chosen.metadata_props[:]
    chosen.metadata_props.extend(kept)
    chosen.metadata_props.add(key=SCORES_KEY, value=name)
    return chosen


def score_output(graph: gs.Graph, named: str | None = None) -> gs.Tensor:
    return graph.outputs[score_output_index((t.name for t in graph.outputs), named)]


def find_logits(graph: gs.Graph, named: str | None = None) -> gs.Tensor:
    """The pre-softmax score tensor behind the model's score output (``score_output``), before
    any quantization of it (a QDQ model's QuantizeLinear -> DequantizeLinear on its logits would
    clip the score to its calibrated range, and the gradient of a clipped score is 0)."""
    if not graph.outputs:
        raise LayerError("the model has no outputs: nothing to explain")
    output = _before_argmax(_before_quantization(score_output(graph, named)))
    tensor = output
    while len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        if producer.op in SQUASHING:
            return _before_quantization(producer.inputs[0])
        if producer.op not in PASS_THROUGH:
            break
        tensor = _before_quantization(producer.inputs[0])
    return output


def _before_argmax(tensor: gs.Tensor) -> gs.Tensor:
    """The scores an ArgMax at the end picks from (a deployed model that outputs class indices,
    per image or per pixel), else ``tensor``: the indices themselves have no gradient."""
    walked = tensor
    while len(walked.inputs) == 1 and walked.inputs[0].op in PASS_THROUGH | {"Cast"}:
        walked = walked.inputs[0].inputs[0]
    if len(walked.inputs) == 1 and walked.inputs[0].op == "ArgMax":
        return _before_quantization(walked.inputs[0].inputs[0])
    return tensor


def _before_quantization(tensor: gs.Tensor) -> gs.Tensor:
    """The float tensor that a QuantizeLinear -> DequantizeLinear pair ending in ``tensor``
    quantizes, else ``tensor``."""
    while (len(tensor.inputs) == 1 and tensor.inputs[0].op == "DequantizeLinear"
           and len(tensor.inputs[0].inputs[0].inputs) == 1 and tensor.inputs[0].inputs[0].inputs[0].op == "QuantizeLinear"):
        tensor = tensor.inputs[0].inputs[0].inputs[0].inputs[0]
    return tensor


def _spatial(shape, layout: str) -> bool:
    if layout == "NLC":
        return True  # token_grid found a grid of at least 2 x 2
    spatial = (shape[2:] if layout == "NCHW" else shape[1:3]) if shape is not None and len(shape) == 4 else ()
    return len(spatial) == 2 and all(isinstance(d, int) and d >= 2 for d in spatial)


#: Tokens ahead of a ViT's patch tokens: none, a class token, a class and a distillation token,
#: and 4, 8 or 16 register tokens with or without a class token (DINOv2 with registers). The
#: fewest that leave a grid win.
EXTRA_TOKENS = (0, 1, 2, 4, 5, 8, 9, 16, 17)
#: The counts that include a class token: a flattened map (N, C, h * w) whose channel count is
#: one of these plus a grid is rare, while a ViT's width is often a square (256, 1024).
WITH_CLASS_TOKEN = (1, 2, 5, 9, 17)


def token_grid(shape, size: tuple) -> tuple[int, int, int] | None:
    """(extra tokens, rows, columns) of a ViT token tensor (N, tokens, channels) whose patch
    tokens tile the image in square patches of a whole number of pixels (197 tokens of a 224x224
    image: a class token and 14 x 14 patches of 16 pixels), else None.

    Without a class token, (N, tokens, C) cannot be told from a flattened map (N, C, h * w) when
    its channels could be the grid ((N, 24, 16) of a 16x16 image: 8 registers and 4 x 4 patches of
    16 channels, or 24 channels of 4 x 4 positions): such a tensor is not read."""
    if shape is None or len(shape) != 3 or not all(isinstance(d, int) for d in shape[1:]) or None in size:
        return None
    reading = _grid(shape[1], size, EXTRA_TOKENS)
    if reading is not None and reading[0] not in WITH_CLASS_TOKEN and _grid(shape[2], size, (0,)) is not None:
        return None
    return reading


def _grid(count: int, size: tuple, extras) -> tuple[int, int, int] | None:
    height, width = size
    for extra in extras:
        patches = count - extra
        if patches < 4:
            continue
        rows = round(math.sqrt(patches * height / width))
        columns = patches // rows if rows else 0
        if (rows >= 2 and columns >= 2 and rows * columns == patches and height % rows == 0
                and width % columns == 0 and height // rows == width // columns):
            return extra, rows, columns
    return None


def image_size(graph: gs.Graph) -> tuple:
    """The model input's (H, W), None where unknown."""
    from onnxcam.imaging.preprocess import detect_layout

    shape = graph.inputs[0].shape if graph.inputs else None
    try:
        return detect_layout(shape or [], name="the model input")[1]
    except ModelError:  # not an image input: no size to compare layers with
        return (None, None)


def layer_layout(shape, size: tuple) -> str:
    """"NLC" for ViT tokens (``token_grid``), "NHWC" for a channels-last activation, else "NCHW"
    (the ONNX convention, and ties).

    An activation's spatial dims are the image's divided by one stride; its channel count is not
    tied to the image. The reading whose (h, w) fit inside the image at the closest strides in H
    and W wins: (N, 7, 7, 768) of a 224x224 image is channels last, (N, 64, 56, 56) is not."""
    if token_grid(shape, size) is not None:
        return "NLC"
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or None in size:
        return "NCHW"
    height, width = size

    def mismatch(h: int, w: int) -> float:
        if not (1 <= h <= height and 1 <= w <= width):
            return math.inf
        return abs(math.log((height / h) / (width / w)))

    return "NHWC" if mismatch(shape[1], shape[2]) < mismatch(shape[2], shape[3]) else "NCHW"


def dominators(graph: gs.Graph, target: gs.Tensor) -> set[str]:
    """The tensors that every path of values from the graph inputs to ``target`` passes through.

    One pass in topological order over the tensors as vertices: a tensor's immediate dominator
    is the nearest common dominator of the inputs of the node that makes it (Cooper, Harvey and
    Kennedy's intersection, which needs no iteration on an acyclic graph). Shapes are not values:
    HF's embeddings read the input's Shape for a Reshape after every block, which is no way
    around them (``backward.path_nodes`` skips it too)."""
    root = "\0the inputs"  # no tensor's name: an omitted optional input is named ""
    parent: dict[str, str] = {root: root}
    depth: dict[str, int] = {root: 0}
    for tensor in graph.inputs:
        parent[tensor.name], depth[tensor.name] = root, 1

    def common(a: str, b: str) -> str:
        while a != b:
            if depth[a] < depth[b]:
                a, b = b, a
            a = parent[a]
        return a

    for node in graph.nodes:  # topologically sorted
        reached = [t.name for t in node.inputs if t.name in parent]
        if node.op in SHAPE_ONLY or not reached:
            continue
        above = reached[0]
        for name in reached[1:]:
            above = common(above, name)
        for out in node.outputs:
            if carries_values(out) and out.name not in parent:
                parent[out.name], depth[out.name] = above, depth[above] + 1
    found, name = set(), target.name
    while name in parent and name != root:
        found.add(name)
        name = parent[name]
    return found


def candidate_layers(graph: gs.Graph, score: gs.Tensor) -> list[Candidate]:
    """Rank-4 activations (channels first or last, ``layer_layout``) with spatial size >= 2, and
    ViT token tensors on a grid of at least 2 x 2, that every input-to-score path passes through,
    past the first weights (``MIXING_OPS``), in graph order."""
    ancestors, features, dominating = _ancestors(score), _features(graph), dominators(graph, score)
    size = image_size(graph)
    found = []
    for node in graph.nodes:
        for out in node.outputs:
            shape = out.shape
            layout = layer_layout(shape, size)
            if (out.name in dominating and out.name in ancestors and out.name in features
                    and _is_float(out) and _spatial(shape, layout)):
                found.append(Candidate(out.name, node.name, node.op, tuple(shape), layout))
    return found


#: Ops with learned weights that mix values: before the first of them a tensor is still the image
#: (tf2onnx's input Transpose, Keras' Rescaling and Normalization), and no layer to explain.
MIXING_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger",
              "QLinearMatMul", "Einsum"}


def _is_float(tensor: gs.Tensor) -> bool:
    """Float or unknown: a QDQ model's quantized (integer) activations are no layers."""
    try:
        return tensor.dtype is None or np.issubdtype(np.dtype(tensor.dtype), np.floating)
    except TypeError:
        return True  # bfloat16 and other non-NumPy floats


def _features(graph: gs.Graph) -> set[str]:
    """Tensors computed through at least one mixing op (``MIXING_OPS``)."""
    features: set[str] = set()
    for node in graph.nodes:  # topologically sorted
        if node.op in MIXING_OPS or any(t.name in features for t in node.inputs):
            features.update(t.name for t in node.outputs)
    return features


def _ancestors(tensor: gs.Tensor) -> set[str]:
    """Tensors whose values reach ``tensor`` (not through shapes)."""
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        for node in t.inputs:
            if node.op not in SHAPE_ONLY:
                stack.extend(i for i in node.inputs if carries_values(i))
    return seen


def resolve_tensor(graph: gs.Graph, name: str, what: str = "layer") -> gs.Tensor:
    """A tensor by its own name or by the name of the node that produces it."""
    tensors = graph.tensors()
    if name in tensors and not isinstance(tensors[name], gs.Constant):
        return tensors[name]
    for node in graph.nodes:
        if node.name == name and node.outputs:
            return node.outputs[0]
    names = [n for n, t in tensors.items() if not isinstance(t, gs.Constant)]
    names += [node.name for node in graph.nodes if node.name]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"nearest names: {', '.join(close)}" if close else "run 'onnxcam inspect MODEL' to list the layers"
    raise LayerError(f"no {what} named '{name}' in the model: {hint}")
