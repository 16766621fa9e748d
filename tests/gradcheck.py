"""The gradient checker: onnxcam's gradient (ONNX Runtime, float32) against float64 central finite
differences of the *forward* graph, evaluated by ONNX's reference evaluator.

Directional derivatives along random directions test every element at once:
<grad, v> must equal (f(A + h v) - f(A - h v)) / 2h with f(A) = <seed, score(A)>.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _ReferenceConvTranspose
import onnx_graphsurgeon as gs

from onnxcam.graph.prepare import prepare_model
from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, SEED, build_gradient_model


class GradientMismatch(AssertionError):
    pass


class Erf(OpRun):
    """The reference Erf computes in float32 (otypes="f"): redone here in float64."""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)


class LRN(OpRun):
    """The reference LRN loops over the batch axis where it means channels (onnx 1.23): redone
    here from the operator spec; ``test_lrn_reference_matches_onnxruntime`` checks it."""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        channels = x.shape[1]
        before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
        squares = x ** 2
        window = np.zeros_like(x)
        for c in range(channels):
            window[:, c] = squares[:, max(0, c - before):min(channels, c + after + 1)].sum(axis=1)
        return ((x / (bias + alpha / size * window) ** beta).astype(x.dtype),)


class Gelu(OpRun):
    """The reference runs Gelu's function body, whose constants round to float32."""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
            return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype),)
        erf = np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2))
        return ((0.5 * x * (1 + erf)).astype(x.dtype),)


class Pad(OpRun):
    """The reference pads with np.pad, which rejects negative pads (a crop, in the operator
    spec): crop first, then pad, as ONNX Runtime does; ``test_pad_reference_matches_onnxruntime``
    checks it."""

    def _run(self, data, pads, constant_value=None, axes=None, mode=None):
        rank = data.ndim
        axes = list(range(rank)) if axes is None else [int(axis) % rank for axis in axes]
        pads = [int(p) for p in pads]
        crop, width = [slice(None)] * rank, [(0, 0)] * rank
        for i, axis in enumerate(axes):
            begin, end = pads[i], pads[len(axes) + i]
            crop[axis] = slice(max(-begin, 0), data.shape[axis] - max(-end, 0))
            width[axis] = (max(begin, 0), max(end, 0))
        mode = mode.decode() if isinstance(mode, bytes) else (mode or "constant")
        extra = {"constant_values": 0 if constant_value is None else constant_value} if mode == "constant" else {}
        return (np.pad(data[tuple(crop)], width, mode=mode, **extra).astype(data.dtype),)


class ConvTranspose(_ReferenceConvTranspose):
    """The reference ConvTranspose miscounts the channels of a grouped one (onnx 1.23: it
    reshapes the weights as if there were one group): each group runs alone here and the outputs
    are joined; ``test_conv_transpose_reference_matches_onnxruntime`` checks it."""

    def _run(self, X, W, B=None, group=None, **attrs):
        if not group or group == 1:
            return super()._run(X, W, B, group=group, **attrs)
        biases = np.split(B, group) if B is not None else [None] * group
        parts = [super(ConvTranspose, self)._run(x, w, b, group=1, **attrs)[0]
                 for x, w, b in zip(np.split(X, group, axis=1), np.split(W, group, axis=0), biases)]
        return (np.concatenate(parts, axis=1),)


FLOAT64_OPS = [Erf, LRN, Gelu, Pad, ConvTranspose]


def reference_evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    return ReferenceEvaluator(model, new_ops=FLOAT64_OPS)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float64 copy of a float32 model, so the reference evaluator computes in double."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float64),
                                                        attr.t.name))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.DOUBLE
    del graph.value_info[:]
    return model


def tail_model(prepared: onnx.ModelProto, layer: str, score: str) -> onnx.ModelProto:
    """The forward subgraph from ``layer`` to ``score``."""
    graph = gs.import_onnx(prepared)
    tensors = graph.tensors()
    graph.inputs, graph.outputs = [tensors[layer]], [tensors[score]]
    graph.cleanup()
    return gs.export_onnx(graph)


def onnxcam_gradient(gm, inputs: np.ndarray, seed: np.ndarray):
    """Activation and gradient of a rewritten model, from ONNX Runtime on the CPU."""
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    activation, gradient = session.run([ACTIVATION, GRADIENT], {gm.input_name: inputs, SEED: seed})
    return activation, gradient


def together_and_alone(gm, inputs: np.ndarray, seed: np.ndarray, outputs=(GRADIENT,)):
    """``outputs`` of the rewritten model for one run of all ``inputs``, and for each input run
    alone (concatenated): batching must not change any row."""
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    together = session.run(list(outputs), {gm.input_name: inputs, SEED: seed})
    singles = [session.run(list(outputs), {gm.input_name: inputs[i:i + 1], SEED: seed[i:i + 1]})
               for i in range(len(inputs))]
    return together, [np.concatenate([single[k] for single in singles]) for k in range(len(outputs))]


def check_gradient(model, inputs: np.ndarray, layer: str | None = None, score: str | None = None,
                   seed: np.ndarray | None = None, directions: int = 4, rtol: float = 1e-4,
                   rng_seed: int = 0, prepared: onnx.ModelProto | None = None) -> float:
    """Largest relative error of onnxcam's gradient over random directions; raises
    GradientMismatch when it exceeds ``rtol``. ``prepared``: the model already prepared."""
    rng = np.random.default_rng(rng_seed)
    if prepared is None:
        prepared = prepare_model(model if isinstance(model, onnx.ModelProto) else onnx.load(model))
    gm = build_gradient_model(prepared, layer=layer, score=score)
    if seed is None:
        shape = (inputs.shape[0], gm.num_classes) if gm.is_class_score and gm.num_classes and not gm.class_grid else \
            _score_shape(prepared, gm, gm.score, inputs)
        seed = rng.standard_normal(shape).astype(np.float32)
    activation, gradient = onnxcam_gradient(gm, inputs, seed)
    if gm.layer_layout == "NHWC":  # A and g come channels first; the reference takes the layer as it is
        activation, gradient = (t.transpose(0, 2, 3, 1) for t in (activation, gradient))
    reference = _reference_function(prepared, gm, gm.score, inputs)
    a0 = activation.astype(np.float64)
    seed64 = seed.astype(np.float64)
    h = 1e-8 * max(float(np.abs(a0).max()), 1e-3)  # small: random directions must not cross ReLU kinks
    worst = 0.0
    for _ in range(directions):
        # Exact zeros (ReLU outputs) tie inside max-pooling windows, where the derivative is
        # undefined; they are left unperturbed, every other element is checked.
        v = rng.standard_normal(a0.shape) * (a0 != 0)
        numeric = (np.sum(seed64 * reference(a0 + h * v)) - np.sum(seed64 * reference(a0 - h * v))) / (2 * h)
        analytic = float(np.sum(gradient.astype(np.float64) * v))
        scale = max(abs(numeric), np.abs(gradient).max() * np.sqrt(v.size) * 1e-3, 1e-12)
        worst = max(worst, abs(analytic - numeric) / scale)
    if not np.isfinite(worst) or worst > rtol:
        raise GradientMismatch(f"gradient at '{gm.layer}' differs from finite differences: "
                               f"relative error {worst:.3g} > {rtol}")
    return worst


def _score_shape(prepared, gm, score_name, inputs):
    session = ort.InferenceSession(_with_output(prepared, score_name).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    if score_name == "onnxcam_logits":
        out = session.run(None, {gm.input_name: inputs})[-1]
        return (out.shape[0], int(np.prod(out.shape[1:])))
    return session.run([score_name], {gm.input_name: inputs})[0].shape


def _with_output(model, name):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if name not in [o.name for o in model.graph.output] and name != "onnxcam_logits":
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    return model


def _reference_function(prepared, gm, score_name, inputs):
    """float64 A -> score, through the forward graph only."""
    from onnxcam.graph.locate import find_logits

    if score_name == "onnxcam_logits":
        graph = gs.import_onnx(prepared)
        score_name = find_logits(graph).name
    if gm.layer == gm.input_name:
        evaluator = reference_evaluator(to_float64(_with_output(prepared, score_name)))
    else:
        evaluator = reference_evaluator(to_float64(tail_model(prepared, gm.layer, score_name)))

    def score(a: np.ndarray) -> np.ndarray:
        out = evaluator.run([score_name], {gm.layer: a})[0]
        return out.reshape(out.shape[0], -1) if gm.is_class_score else out

    return score
