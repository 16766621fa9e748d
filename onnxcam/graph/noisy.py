"""The noisy-input model: the noisy batch, the target classes and the gradient moments are made
inside the graph.

``build_noisy_model(gm)`` puts in front of the rewritten model's input::

    x = images[rows] + scales * noise[samples]

with ``images`` the clean images of a call, ``noise`` the bank of standard normal samples
``z_1 .. z_n`` (onnxcam.explain.noise), and per batch row its image, its sample and its scale
(the image's sigma; 0 gives the clean image exactly, so one run can hold an image's clean pass
and its noisy samples). On a GPU the images and the bank are uploaded once (bound as device
tensors) and each batch sends only small per-row vectors, the same inputs as the NumPy path
(same float32 products and sums, in the same order). The CPU's fused runs use ``front="input"``:
no noise front, NumPy makes the noisy batch (``build_noisy_model``).

For class scores the seed is made in the graph too: row i explains class ``targets[i]``, or, where
that is -1, the class the model predicts for row ``picks[i]`` (the argmax of its logits: the
lowest index among ties, as ``onnxcam.explain.targets.top_classes``). So the clean row's
prediction steers its own noisy rows within one run, with no trip to the host in between.

Behind the gradient it sums ``weights * g``, ``weights * g^2`` and ``weights * g^3`` over the
batch rows: Smooth Grad-CAM++'s moments leave the device as three (1, K, h, w) tensors instead of
the whole batch's gradients. ``FIRST_*`` outputs are row 0's activation, gradient and logits (the
clean row) and ``CLASSES`` each row's class.
"""

from __future__ import annotations

import heapq

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxcam.errors import OptionError
from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, SEED, GradientModel

IMAGES = "onnxcam_images"
NOISE = "onnxcam_noise"
ROWS = "onnxcam_rows"
SAMPLES = "onnxcam_samples"
SCALES = "onnxcam_scales"
TARGETS = "onnxcam_targets"
PICKS = "onnxcam_picks"
WEIGHTS = "onnxcam_weights"

SUMS = ("onnxcam_sum_g", "onnxcam_sum_g2", "onnxcam_sum_g3")
FIRST_ACTIVATION = "onnxcam_first_activation"
FIRST_GRADIENT = "onnxcam_first_gradient"
FIRST_LOGITS = "onnxcam_first_logits"
CLASSES = "onnxcam_classes"
#: The outputs with one entry per row of a run (the others are per run: sums, first row's values).
ROW_OUTPUTS = (ACTIVATION, GRADIENT, LOGITS, CLASSES)

_PREFIX = "onnxcam_noisy/"


def targets_in_graph(gm: GradientModel) -> bool:
    """Whether the noisy model takes class targets (class scores with a fixed number of
    classes); otherwise it takes the seed rows themselves (neuron scores, and a segmentation
    model's class regions)."""
    return gm.is_class_score and gm.num_classes is not None and gm.class_grid is None


def build_noisy_model(gm: GradientModel, front: str = "bank") -> onnx.ModelProto:
    """A copy of ``gm.model`` fed by (images, noise, rows, samples, scales[, targets, picks],
    weights) with the extra outputs described in the module docstring.

    ``front="input"`` has no noise front: it takes the noisy batch itself as the model's own
    input (the CPU makes it with NumPy, ``onnxcam.explain.noise.fill_noisy``). On ONNX Runtime's
    CPU provider a model input made inside the graph slowed the convolutions that add a skip
    connection in place (ResNet-50's ``conv3``: up to 2.2x; 10-15% of the whole model), which
    cost more than the Mul and Add saved. Its outputs are only those the fused runs fetch (the
    sums, ``FIRST_*``, ``CLASSES``)."""
    if front not in ("bank", "input"):
        raise ValueError(f"front must be 'bank' or 'input', not {front!r}")
    model = onnx.ModelProto()
    model.CopyFrom(gm.model)
    graph = model.graph
    original = next(i for i in graph.input if i.name == gm.input_name)
    elem_type = original.type.tensor_type.elem_type
    if elem_type != TensorProto.FLOAT:
        raise OptionError("noise in the graph needs a float32 model input; use the NumPy noise "
                          "(noise_in_graph=False)")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in original.type.tensor_type.shape.dim]
    rank = len(dims)
    p = _PREFIX
    initializers = [helper.make_tensor(p + "axis0", TensorProto.INT64, [1], [0]),
                    helper.make_tensor(p + "one", TensorProto.INT64, [1], [1])]
    if front == "bank":
        initializers.append(helper.make_tensor(p + "column", TensorProto.INT64, [rank], [-1] + [1] * (rank - 1)))
        inputs = [helper.make_tensor_value_info(IMAGES, elem_type, ["M", *dims[1:]]),
                  helper.make_tensor_value_info(NOISE, elem_type, ["S", *dims[1:]]),
                  helper.make_tensor_value_info(ROWS, TensorProto.INT64, ["N"]),
                  helper.make_tensor_value_info(SAMPLES, TensorProto.INT64, ["N"]),
                  helper.make_tensor_value_info(SCALES, elem_type, ["N"])]
        nodes = [
            helper.make_node("Gather", [IMAGES, ROWS], [p + "clean"], axis=0),
            helper.make_node("Gather", [NOISE, SAMPLES], [p + "z"], axis=0),
            helper.make_node("Reshape", [SCALES, p + "column"], [p + "scale"]),
            helper.make_node("Mul", [p + "z", p + "scale"], [p + "noise"]),
            helper.make_node("Add", [p + "noise", p + "clean"], [gm.input_name]),
        ]
    else:
        inputs, nodes = [original], []
    inputs.append(helper.make_tensor_value_info(WEIGHTS, elem_type, ["N"]))
    gradient_rank = len(gm.activation_shape) or rank
    initializers.append(helper.make_tensor(p + "gradient_column", TensorProto.INT64, [gradient_rank],
                                           [-1] + [1] * (gradient_rank - 1)))
    nodes += [helper.make_node("Reshape", [WEIGHTS, p + "gradient_column"], [p + "weight"]),
              helper.make_node("CastLike", [p + "weight", GRADIENT], [p + "weight_cast"]),
              helper.make_node("Mul", [GRADIENT, p + "weight_cast"], [p + "wg1"]),
              helper.make_node("Mul", [p + "wg1", GRADIENT], [p + "wg2"]),
              helper.make_node("Mul", [p + "wg2", GRADIENT], [p + "wg3"])]
    nodes += [helper.make_node("ReduceSum", [p + f"wg{k}", p + "axis0"], [SUMS[k - 1]], keepdims=1)
              for k in (1, 2, 3)]
    nodes += [helper.make_node("Slice", [source, p + "axis0", p + "one", p + "axis0"], [first])
              for source, first in ((ACTIVATION, FIRST_ACTIVATION), (GRADIENT, FIRST_GRADIENT),
                                    (LOGITS, FIRST_LOGITS))]
    kept_inputs = [i for i in graph.input if i.name != gm.input_name]
    if targets_in_graph(gm):
        kept_inputs, picking_inputs, picking_initializers, picking_nodes = _targets_picked(gm, kept_inputs)
        inputs += picking_inputs
        initializers += picking_initializers
        nodes += picking_nodes
    outputs = {o.name: o for o in graph.output}
    extra = [helper.make_tensor_value_info(name, outputs[source].type.tensor_type.elem_type, None)
             for name, source in ((SUMS[0], GRADIENT), (SUMS[1], GRADIENT), (SUMS[2], GRADIENT),
                                  (FIRST_ACTIVATION, ACTIVATION), (FIRST_GRADIENT, GRADIENT),
                                  (FIRST_LOGITS, LOGITS))]
    if targets_in_graph(gm):
        extra.append(helper.make_tensor_value_info(CLASSES, TensorProto.INT64, ["N"]))
    if front == "input":  # the fused runs fetch only these: the whole batch's A, g and logits are not
        # outputs, so ONNX Runtime drops the Identity nodes that would copy them every run
        kept = [o for o in graph.output if o.name not in (ACTIVATION, GRADIENT, LOGITS)]
        del graph.output[:]
        graph.output.extend(kept)
    return _finished(model, inputs + kept_inputs, initializers, nodes, extra)


def build_picking_model(gm: GradientModel) -> onnx.ModelProto:
    """A copy of ``gm.model`` whose seed is made in the graph from ``targets`` and ``picks`` (as
    in the noisy model), fed the model's own input: the CPU's fused runs, whose noisy batches
    NumPy makes while the previous batch runs. Outputs: the model's A, g, logits for every row,
    and ``CLASSES``. Needs class scores (``targets_in_graph``)."""
    if not targets_in_graph(gm):
        raise OptionError("classes picked in the graph need class scores with a fixed number of classes")
    model = onnx.ModelProto()
    model.CopyFrom(gm.model)
    kept_inputs, inputs, initializers, nodes = _targets_picked(gm, list(model.graph.input))
    extra = [helper.make_tensor_value_info(CLASSES, TensorProto.INT64, ["N"])]
    return _finished(model, kept_inputs + inputs, initializers, nodes, extra)


def _targets_picked(gm: GradientModel, kept_inputs: list):
    """The graph inputs, initializers and nodes that make the seed from ``targets`` and
    ``picks`` (module docstring), and the graph inputs left once the seed input is gone."""
    p = _PREFIX
    seed_input = next(i for i in kept_inputs if i.name == SEED)
    kept_inputs = [i for i in kept_inputs if i.name != SEED]
    inputs = [helper.make_tensor_value_info(TARGETS, TensorProto.INT64, ["N"]),
              helper.make_tensor_value_info(PICKS, TensorProto.INT64, ["N"])]
    initializers = [helper.make_tensor(p + "classes", TensorProto.INT64, [1, gm.num_classes],
                                       list(range(gm.num_classes))),
                    helper.make_tensor(p + "zero", TensorProto.INT64, [], [0]),
                    helper.make_tensor(p + "class_axis", TensorProto.INT64, [1], [1])]
    nodes = [
        helper.make_node("ArgMax", [LOGITS], [p + "predicted"], axis=1, keepdims=0),
        helper.make_node("Gather", [p + "predicted", PICKS], [p + "picked"], axis=0),
        helper.make_node("GreaterOrEqual", [TARGETS, p + "zero"], [p + "given"]),
        helper.make_node("Where", [p + "given", TARGETS, p + "picked"], [CLASSES]),
        helper.make_node("Unsqueeze", [CLASSES, p + "class_axis"], [p + "class_column"]),
        helper.make_node("Equal", [p + "class_column", p + "classes"], [p + "hot"]),
        helper.make_node("Cast", [p + "hot"], [SEED], to=seed_input.type.tensor_type.elem_type),
    ]
    return kept_inputs, inputs, initializers, nodes


def _finished(model: onnx.ModelProto, inputs: list, initializers: list, nodes: list, extra: list) -> onnx.ModelProto:
    """``model`` with its inputs replaced and the nodes, initializers and outputs added, in
    topological order (the seed is now computed from the logits, deep inside the graph)."""
    graph = model.graph
    del graph.input[:]
    graph.input.extend(inputs)
    graph.initializer.extend(initializers)
    graph.output.extend(extra)
    graph.node.extend(nodes)
    order = _stable_order(list(graph.node))
    if order is not None:
        reordered = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(reordered)
        return model
    sorted_graph = gs.import_onnx(model)  # subgraphs: graph-surgeon knows their outer-scope inputs
    sorted_graph.toposort()
    ordered = gs.export_onnx(sorted_graph)
    ordered.ir_version = model.ir_version
    del ordered.metadata_props[:]
    ordered.metadata_props.extend(model.metadata_props)
    return ordered


def _stable_order(nodes: list) -> list[int] | None:
    """A topological order of ``nodes`` that keeps their given order wherever the dependencies
    allow (a node waits only for its inputs' producers), or None for a graph with subgraphs.

    ONNX Runtime runs nodes in the graph's order and plans its buffers by it, so the rewritten
    model's own nodes keep the order (and the plan) they had; a generic sort interleaves them
    with the new nodes arbitrarily."""
    if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in nodes for attribute in node.attribute):
        return None
    producer = {name: i for i, node in enumerate(nodes) for name in node.output}
    waiting = [0] * len(nodes)
    consumers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for j in {producer[name] for name in node.input if name in producer}:
            waiting[i] += 1
            consumers[j].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in consumers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the noisy model's graph has a cycle")
    return order


def row_feeds(rows, samples, scales, weights, targets=None, picks=None, seed=None) -> dict[str, np.ndarray]:
    """The per-batch inputs of the noisy model: ``targets`` and ``picks`` for class scores,
    ``seed`` rows otherwise; ``rows``, ``samples`` and ``scales`` None for the input front."""
    feeds = {WEIGHTS: np.ascontiguousarray(weights, dtype=np.float32)}
    if rows is not None:
        feeds[ROWS] = np.ascontiguousarray(rows, dtype=np.int64)
        feeds[SAMPLES] = np.ascontiguousarray(samples, dtype=np.int64)
        feeds[SCALES] = np.ascontiguousarray(scales, dtype=np.float32)
    if seed is not None:
        feeds[SEED] = np.ascontiguousarray(seed, dtype=np.float32)
    else:
        feeds[TARGETS] = np.ascontiguousarray(targets, dtype=np.int64)
        feeds[PICKS] = np.ascontiguousarray(np.zeros(len(feeds[WEIGHTS])) if picks is None else picks,
                                            dtype=np.int64)
    return feeds


def padded_row_feeds(feeds: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """``feeds`` of a run grown to ``size`` rows by copies of its last row with weight 0: the
    moment sums and the first row's outputs are unchanged, and the per-row outputs
    (``ROW_OUTPUTS``) of the real rows come first."""
    rows = len(feeds[WEIGHTS])
    padded = {name: np.concatenate([values, np.repeat(values[-1:], size - rows, axis=0)])
              for name, values in feeds.items()}
    padded[WEIGHTS][rows:] = 0
    return padded
