"""The noisy-input model: the noisy batch, the target classes and the gradient moments are made
inside the graph.

``build_noisy_model(gm)`` puts in front of the rewritten model's input::

    x = images[rows] + scales * noise[samples]

with ``images`` the clean images of a call, ``noise`` the bank of standard normal samples
``z_1 .. z_n`` (onnxcam.explain.noise), and per batch row its image, its sample and its scale
(the image's sigma; 0 gives the clean image exactly, so one run can hold an image's clean pass
and its noisy samples). On a GPU the images and the bank are uploaded once (bound as device
tensors) and each batch sends only small per-row vectors. The CPU uses the *rows front*
(``front="rows"``): ``x = images + scales * noise`` with each run's noise rows bound straight
from a host array (no copy, no Gathers). Either front gives the same inputs as the NumPy path
(same float32 products and sums, in the same order).

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

_PREFIX = "onnxcam_noisy/"


def targets_in_graph(gm: GradientModel) -> bool:
    """Whether the noisy model takes class targets (class scores with a fixed number of
    classes); otherwise it takes the seed rows themselves (neuron scores)."""
    return gm.is_class_score and gm.num_classes is not None


def build_noisy_model(gm: GradientModel, front: str = "bank") -> onnx.ModelProto:
    """A copy of ``gm.model`` fed by (images, noise, rows, samples, scales[, targets, picks],
    weights) with the extra outputs described in the module docstring.

    ``front="rows"`` takes the noise already in row order instead, ``x = images + scales *
    noise`` with ``images`` one image (broadcast) or one per row, and no ``rows``/``samples``:
    on the CPU each run binds a view of the host's bank (no copy), and the graph skips the
    two Gathers, which cost more there than the Mul and Add."""
    if front not in ("bank", "rows"):
        raise ValueError(f"front must be 'bank' or 'rows', not {front!r}")
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
    inputs = [helper.make_tensor_value_info(IMAGES, elem_type, ["M", *dims[1:]]),
              helper.make_tensor_value_info(NOISE, elem_type, ["S" if front == "bank" else "N", *dims[1:]])]
    if front == "bank":
        inputs += [helper.make_tensor_value_info(ROWS, TensorProto.INT64, ["N"]),
                   helper.make_tensor_value_info(SAMPLES, TensorProto.INT64, ["N"])]
    inputs += [helper.make_tensor_value_info(SCALES, elem_type, ["N"]),
               helper.make_tensor_value_info(WEIGHTS, elem_type, ["N"])]
    p = _PREFIX
    initializers = [helper.make_tensor(p + "column", TensorProto.INT64, [rank], [-1] + [1] * (rank - 1)),
                    helper.make_tensor(p + "axis0", TensorProto.INT64, [1], [0]),
                    helper.make_tensor(p + "one", TensorProto.INT64, [1], [1])]
    clean, z = (p + "clean", p + "z") if front == "bank" else (IMAGES, NOISE)
    nodes = [
        helper.make_node("Gather", [IMAGES, ROWS], [clean], axis=0),
        helper.make_node("Gather", [NOISE, SAMPLES], [z], axis=0),
    ] if front == "bank" else []
    nodes += [
        helper.make_node("Reshape", [SCALES, p + "column"], [p + "scale"]),
        helper.make_node("Mul", [z, p + "scale"], [p + "noise"]),
        helper.make_node("Add", [p + "noise", clean], [gm.input_name]),
    ]
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
    sorted_graph = gs.import_onnx(model)
    sorted_graph.toposort()
    ordered = gs.export_onnx(sorted_graph)
    ordered.ir_version = model.ir_version
    del ordered.metadata_props[:]
    ordered.metadata_props.extend(model.metadata_props)
    return ordered


def row_feeds(rows, samples, scales, weights, targets=None, picks=None, seed=None) -> dict[str, np.ndarray]:
    """The per-batch inputs of the noisy model: ``targets`` and ``picks`` for class scores,
    ``seed`` rows otherwise; ``rows`` and ``samples`` None for the rows front."""
    feeds = {SCALES: np.ascontiguousarray(scales, dtype=np.float32),
             WEIGHTS: np.ascontiguousarray(weights, dtype=np.float32)}
    if rows is not None:
        feeds[ROWS] = np.ascontiguousarray(rows, dtype=np.int64)
        feeds[SAMPLES] = np.ascontiguousarray(samples, dtype=np.int64)
    if seed is not None:
        feeds[SEED] = np.ascontiguousarray(seed, dtype=np.float32)
    else:
        feeds[TARGETS] = np.ascontiguousarray(targets, dtype=np.int64)
        feeds[PICKS] = np.ascontiguousarray(np.zeros(len(feeds[SCALES])) if picks is None else picks,
                                            dtype=np.int64)
    return feeds
