"""Quantized models in the QDQ format (QuantizeLinear / DequantizeLinear around float ops, as
onnxruntime's ``quantize_static`` writes them by default). Quantization is flat almost everywhere,
so its true gradient is 0; onnxcam passes the gradient straight through it, as quantization-aware
training does, and 0 where a value saturates. Finite differences cannot check that directly, so
the check is this: the straight-through gradient of ``rest(DQ(Q(a)))`` at ``a0`` is the gradient of
``rest(a + e)`` with the quantization error ``e = DQ(Q(a0)) - a0`` held constant, which the
finite-difference checker does check. Integer-arithmetic formats (QOperator, dynamic) are refused
with a line that says how to quantize instead."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_graphsurgeon as gs

from onnxcam import Explainer, ModelError
from onnxcam.graph.locate import find_logits
from onnxcam.graph.prepare import prepare_model
from onnxcam.graph.rewrite import GRADIENT, SEED, build_gradient_model
from tests.cli_helpers import run
from tests.gradcheck import check_gradient, together_and_alone
from tests.test_explainer import build_cnn, random_inputs, save_model

RNG = np.random.default_rng(31)


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def qdq_model(scale=0.05, zero=128, q_scale=None, axis=None, quantized=True, seed=0) -> onnx.ModelProto:
    """x -> Conv (layer "c") -> [QuantizeLinear -> DequantizeLinear] -> Tanh -> Conv -> GAP ->
    Flatten -> Gemm. ``quantized=False`` puts ``Add(c, e)`` in the pair's place instead, with
    ``e`` an input: the reference whose gradient finite differences check."""
    rng = np.random.default_rng(seed)
    inits = [_const("w1", rng.standard_normal((4, 3, 3, 3)) * 0.4),
             _const("w2", rng.standard_normal((6, 4, 3, 3)) * 0.4),
             _const("fc", rng.standard_normal((5, 6)) * 0.4)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1])]
    if quantized:
        attrs = {} if axis is None else {"axis": axis}
        inits += [_const("s_q", scale if q_scale is None else q_scale), _const("s_dq", scale),
                  _const("zp", np.broadcast_to(zero, np.shape(scale)), np.uint8)]
        nodes += [helper.make_node("QuantizeLinear", ["c", "s_q", "zp"], ["q"], **attrs),
                  helper.make_node("DequantizeLinear", ["q", "s_dq", "zp"], ["dq"], **attrs)]
    else:
        nodes.append(helper.make_node("Add", ["c", "e"], ["dq"]))
    nodes += [helper.make_node("Tanh", ["dq"], ["r"]),  # smooth: dq hits 0 exactly, a ReLU's kink
              helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
              helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    if not quantized:
        inputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4, 8, 8]))
    graph = helper.make_graph(nodes, "qdq", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model, x, names):
    """The tensors ``names`` of one run of ``model`` on ``x``."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    listed = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in listed)
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {"x": x})


def test_the_gradient_passes_straight_through_the_quantization():
    """No value saturates here: the gradient at the layer is that of the network with the
    quantization error frozen, which finite differences check (the reference model takes the
    error as its input e, so the layer "c" is the reference's too)."""
    model = qdq_model()
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    activation, dequantized = _run(model, x, ["c", "dq"])
    assert np.abs(activation / 0.05).max() + 128 < 255  # within uint8's range everywhere
    gm = build_gradient_model(model, layer="c")
    assert gm.layer == "c" and gm.batch_built_in is None
    seed = RNG.standard_normal((2, 5)).astype(np.float32)
    (gradient,), (alone,) = together_and_alone(gm, x, seed)
    np.testing.assert_allclose(gradient, alone, rtol=1e-6, atol=1e-7)

    error = dequantized - activation
    reference = _with_error_fixed(qdq_model(quantized=False), error)
    check_gradient(reference, x, layer="c", seed=seed)  # the reference's gradient is right
    session = ort.InferenceSession(build_gradient_model(reference, layer="c").model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = session.run([GRADIENT], {"x": x, SEED: seed})[0]
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert np.abs(gradient).max() > 0


def _with_error_fixed(reference: onnx.ModelProto, error: np.ndarray) -> onnx.ModelProto:
    """The reference with ``e`` a constant (a batch of exactly ``error``'s rows)."""
    model = onnx.ModelProto()
    model.CopyFrom(reference)
    graph = model.graph
    keep = [i for i in graph.input if i.name != "e"]
    del graph.input[:]
    graph.input.extend(keep)
    graph.initializer.append(numpy_helper.from_array(error.astype(np.float32), "e"))
    for value in list(graph.input) + list(graph.output):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = error.shape[0]
    return model


@pytest.mark.parametrize("axis", [None, 1])
def test_saturated_values_get_no_gradient_and_scales_apply_per_axis(axis):
    """Quantize with one scale and dequantize with another (per channel with ``axis``): where the
    value fits the integer range the layer's gradient is the one after the pair times
    s_dq / s_q, and 0 where it saturates."""
    scale = np.array([0.02, 0.05, 0.03, 0.04], np.float32) if axis else np.float32(0.03)
    q_scale = scale * 0.8 if axis else np.float32(0.025)
    model = qdq_model(scale=scale, zero=100, q_scale=q_scale, axis=axis)
    x = (RNG.standard_normal((2, 3, 8, 8)) * 3).astype(np.float32)
    (activation,) = _run(model, x, ["c"])
    view = (lambda s: s.reshape(1, -1, 1, 1)) if axis else (lambda s: s)
    levels = np.round(activation / view(q_scale)) + 100
    inside = (levels >= 0) & (levels <= 255)
    assert 0.1 < inside.mean() < 0.95  # some saturate on each side of the range

    gm = build_gradient_model(model, layer="c")
    after = build_gradient_model(model, layer="dq")
    seed = RNG.standard_normal((2, 5)).astype(np.float32)
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (gradient,) = session.run([GRADIENT], {"x": x, SEED: seed})
    session = ort.InferenceSession(after.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (gradient_after,) = session.run([GRADIENT], {"x": x, SEED: seed})
    expected = np.where(inside, gradient_after * view(scale) / view(q_scale), 0)
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-7)


def test_a_model_quantized_by_onnxruntime_is_explained_like_the_float_model(tmp_path):
    """quantize_static's QDQ model of the small CNN: its quantized activations are no candidate
    layers, the automatic layer is the last dequantized one, the score is the logits before their
    own quantization (which would clip it), and its Grad-CAM maps follow the float model's."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    float_path = save_model(build_cnn("linear", seed=3), tmp_path / "float.onnx")
    images = random_inputs(8, seed=4)

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.rows = iter({"x": images[i:i + 1]} for i in range(len(images)))

        def get_next(self):
            return next(self.rows, None)

    quantized_path = tmp_path / "int8.onnx"
    quantize_static(str(float_path), str(quantized_path), Calibration(), quant_format=QuantFormat.QDQ,
                    per_channel=True)
    quantized = Explainer(quantized_path)
    layer = quantized.gradient_model.layer
    assert layer.endswith("DequantizeLinear_Output") and layer.startswith("a2")
    assert all(c.tensor.endswith("DequantizeLinear_Output") or "QuantizeLinear" not in c.tensor
               for c in quantized.gradient_model.candidates)
    graph = gs.import_onnx(prepare_model(onnx.load(str(quantized_path))))
    assert find_logits(graph).inputs[0].op == "Gemm"  # not the DequantizeLinear of the logits
    expected = Explainer(float_path).explain(images, method="gradcam")
    got = quantized.explain(images, method="gradcam", targets=[r.class_index for r in expected])
    correlations = [np.corrcoef(a.raw_map.ravel(), b.raw_map.ravel())[0, 1] for a, b in zip(got, expected)]
    assert min(correlations) > 0.99, correlations
    inspected = run(["inspect", quantized_path])
    assert inspected.exit_code == 0 and f"*  {layer}" in inspected.stdout
    assert "pre-softmax input of the output's squashing" in inspected.stdout


@pytest.mark.parametrize("format_", ["operator", "dynamic"])
def test_integer_arithmetic_formats_are_refused_with_what_to_do(tmp_path, format_):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    float_path = save_model(build_cnn("mlp", seed=3), tmp_path / "float.onnx")
    path = tmp_path / f"{format_}.onnx"
    if format_ == "dynamic":
        quantize_dynamic(str(float_path), str(path), op_types_to_quantize=["Conv", "Gemm"])
    else:
        class Calibration(CalibrationDataReader):
            def __init__(self):
                self.rows = iter([{"x": random_inputs(1, seed=5)}])

            def get_next(self):
                return next(self.rows, None)

        quantize_static(str(float_path), str(path), Calibration(), quant_format=QuantFormat.QOperator)
    with pytest.raises(ModelError, match=r"quantized .*computes on integers.*QuantFormat\.QDQ"):
        build_gradient_model(path)
