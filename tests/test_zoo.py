"""The gradient engine on the nine ONNX-zoo architectures (AlexNet, DenseNet-121, Inception v1
and v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512), with seeded random weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from onnxcam.gradients.backward import path_nodes
from onnxcam.graph.prepare import prepare_model
from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, SEED, build_gradient_model
from tests.gradcheck import check_gradient, together_and_alone
from tests.zoo import ZOO_MODELS, randomized

pytestmark = pytest.mark.slow
POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}


@pytest.fixture(scope="module", params=ZOO_MODELS)
def zoo(request):
    model = prepare_model(randomized(request.param))
    gm = build_gradient_model(model)
    x = np.random.default_rng(7).standard_normal([1] + list(gm.input_shape[1:])).astype(np.float32)
    return request.param, model, gm, x


def earlier_layer(gm) -> str:
    """The candidate layer before the automatic one."""
    return gm.candidates[-2].tensor


def test_rewritten_model_passes_full_check_and_runs(zoo):
    name, model, gm, x = zoo
    onnx.checker.check_model(gm.model, full_check=True)
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = np.zeros([1, gm.num_classes], np.float32)
    seed[0, 1] = 1
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {gm.input_name: x, SEED: seed})))
    assert outputs[GRADIENT].shape == outputs[ACTIVATION].shape
    assert np.abs(outputs[GRADIENT]).max() > 0
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    first_output = original.get_outputs()[0].name
    expected = original.run(None, {gm.input_name: x})[0]
    np.testing.assert_allclose(outputs[first_output], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_gradient_at_automatic_layer_matches_finite_differences(zoo):
    name, model, gm, x = zoo
    check_gradient(model, x, layer=gm.layer, rtol=1e-4, directions=2, prepared=model)


def test_gradient_at_earlier_layer_through_pooling_matches_finite_differences(zoo):
    name, model, gm, x = zoo
    layer = earlier_layer(gm)
    graph = gs.import_onnx(gm.model)
    graph.toposort()
    ops = {n.op for n in path_nodes(graph, graph.tensors()[layer], graph.tensors()[LOGITS])}
    assert ops & POOLING, f"{layer} -> logits passes no pooling op: {sorted(ops)}"
    check_gradient(model, x, layer=layer, rtol=1e-4, directions=2, prepared=model)


def test_batch_of_three_equals_three_single_runs(zoo):
    name, model, gm, _ = zoo
    rng = np.random.default_rng(3)
    x = rng.standard_normal([3] + list(gm.input_shape[1:])).astype(np.float32)
    seed = np.zeros([3, gm.num_classes], np.float32)
    seed[np.arange(3), [5, 17, 901]] = 1
    together, alone = together_and_alone(gm, x, seed, (ACTIVATION, GRADIENT, LOGITS))
    for i in range(3):
        for b, s in zip(together, alone):
            np.testing.assert_allclose(b[i:i + 1], s[i:i + 1], rtol=1e-4, atol=1e-5 * np.abs(s[i:i + 1]).max())
