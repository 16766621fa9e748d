"""Half-precision models: all float16, and float16 inside float32 inputs and outputs (what
onnxconverter-common's ``convert_float_to_float16(keep_io_types=True)`` writes, with a Cast at
each end). Each gradient rule emits its constants in its own node's dtype and the Cast rule
carries the gradient across, so the layer's activation and gradient come back in float16 and
match the float32 model's to half precision."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import Explainer
from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, SEED, build_gradient_model
from tests.test_explainer import random_inputs

HALF, FULL = TensorProto.FLOAT16, TensorProto.FLOAT


def cnn(inside=FULL, outside=FULL) -> onnx.ModelProto:
    """x -> [Cast] -> Conv -> Sigmoid*x (a1) -> Conv -> Relu (a2) -> GAP -> Flatten -> Gemm ->
    Relu -> Gemm -> [Cast] -> Softmax, computed in ``inside`` with inputs and outputs in
    ``outside``; the same weights for every dtype."""
    rng = np.random.default_rng(7)
    dtype = np.float16 if inside == HALF else np.float32
    weights = {"w1": rng.standard_normal((8, 3, 3, 3)) * 0.4, "w2": rng.standard_normal((12, 8, 3, 3)) * 0.3,
               "f1": rng.standard_normal((16, 12)) * 0.4, "f2": rng.standard_normal((10, 16)) * 0.4}
    inits = [numpy_helper.from_array(np.asarray(v, dtype), k) for k, v in weights.items()]
    cast_in = inside != outside
    nodes = [helper.make_node("Cast", ["x"], ["xi"], to=inside)] if cast_in else []
    nodes += [helper.make_node("Conv", ["xi" if cast_in else "x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
              helper.make_node("Sigmoid", ["c1"], ["s1"]),
              helper.make_node("Mul", ["c1", "s1"], ["a1"]),
              helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
              helper.make_node("Relu", ["c2"], ["a2"]),
              helper.make_node("GlobalAveragePool", ["a2"], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "f1"], ["h"], transB=1),
              helper.make_node("Relu", ["h"], ["hr"]),
              helper.make_node("Gemm", ["hr", "f2"], ["logits_inside" if cast_in else "logits"], transB=1)]
    if cast_in:
        nodes.append(helper.make_node("Cast", ["logits_inside"], ["logits"], to=outside))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"]))
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", outside, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("probs", outside, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _activation_and_gradient(model, layer, x, seed):
    gm = build_gradient_model(model, layer=layer)
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {gm.input_name: x.astype(session.get_inputs()[0].type == "tensor(float16)" and np.float16 or np.float32)}
    seed_type = next(i.type for i in session.get_inputs() if i.name == SEED)
    feeds[SEED] = seed.astype(np.float16 if seed_type == "tensor(float16)" else np.float32)
    return gm, session.run([ACTIVATION, GRADIENT], feeds)


@pytest.mark.parametrize("outside", [FULL, HALF])
@pytest.mark.parametrize("layer", ["a1", "a2"])
def test_half_precision_gradients_match_the_float_model(outside, layer):
    x = random_inputs(2, seed=8)
    seed = np.random.default_rng(9).standard_normal((2, 10)).astype(np.float32)
    _, (a32, g32) = _activation_and_gradient(cnn(), layer, x, seed)
    gm, (a16, g16) = _activation_and_gradient(cnn(HALF, outside), layer, x, seed)
    assert a16.dtype == g16.dtype == np.float16
    assert gm.is_class_score
    np.testing.assert_allclose(a16.astype(np.float32), a32, rtol=0, atol=5e-3 * np.abs(a32).max())
    np.testing.assert_allclose(g16.astype(np.float32), g32, rtol=0, atol=1e-2 * np.abs(g32).max())


def test_a_half_precision_model_with_float32_inputs_is_explained(tmp_path):
    path = tmp_path / "half.onnx"
    onnx.save(cnn(HALF, FULL), path)
    reference = tmp_path / "full.onnx"
    onnx.save(cnn(), reference)
    images = random_inputs(3, seed=10)
    for method in ("gradcam", "smoothgradcampp"):
        expected = Explainer(reference, layer="a1", preprocess="raw").explain(images, method=method, samples=6)
        got = Explainer(path, layer="a1", preprocess="raw").explain(images, method=method, samples=6,
                                                                      targets=[r.class_index for r in expected])
        for a, b in zip(got, expected):
            assert np.corrcoef(a.raw_map.ravel(), b.raw_map.ravel())[0, 1] > 0.99
