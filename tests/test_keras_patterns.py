"""The patterns of Keras models exported by tf2onnx, built by hand (no TensorFlow needed): an NHWC
input with a tf2onnx batch name, Keras' Rescaling as the first Mul, the Transpose to NCHW, and a
softmax head. The model scales its own pixels, so the raw preset is used; the image itself (before
the first convolution) is no candidate layer; the layers' batch dim reads N."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import Explainer
from onnxcam.graph.rewrite import build_gradient_model
from onnxcam.imaging.input_scaling import input_scaling
from tests.cli_helpers import run
from tests.test_explainer import random_png

RNG = np.random.default_rng(21)


def keras_like(first_op: str = "Mul", factor: float = 1 / 255, per_channel=None) -> onnx.ModelProto:
    """input (unk__1, 16, 16, 3) -> Rescaling -> Transpose -> Conv -> Relu -> Conv -> Relu -> GAP
    -> Flatten -> Gemm -> Softmax."""
    scale = np.asarray(per_channel if per_channel is not None else factor, np.float32)
    if first_op == "Div":
        scale = (1 / scale).astype(np.float32)
    weights = {"w1": RNG.standard_normal((6, 3, 3, 3)) * 0.3, "w2": RNG.standard_normal((8, 6, 3, 3)) * 0.3,
               "fc": RNG.standard_normal((4, 8)) * 0.3}
    initializers = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(scale, "scale"))
    nodes = [helper.make_node(first_op, ["input", "scale"], ["rescaled"], name="rescaling/mul"),
             helper.make_node("Transpose", ["rescaled"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Conv", ["nchw", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["a2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["predictions"])]
    graph = helper.make_graph(nodes, "keras_like",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["unk__1", 16, 16, 3])],
                              [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["unk__2", 4])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("first_op, factor, per_channel, expected", [
    ("Mul", 1 / 255, None, 1 / 255),               # Rescaling(1/255)
    ("Mul", 1 / 127.5, None, 1 / 127.5),           # Rescaling(1/127.5, offset=-1)
    ("Div", 1 / 255, None, 1 / 255),               # x / 255
    ("Mul", 1 / 255, [1 / 255] * 3, 1 / 255),      # the same factor per channel
    ("Mul", 0.5, None, None),                      # not a 0-255 scaling
    ("Mul", 1 / 255, [1 / 255, 1 / 250, 1 / 240], None),  # a per-channel normalisation
])
def test_the_models_own_scaling_of_its_pixels_is_found(first_op, factor, per_channel, expected):
    found = input_scaling(keras_like(first_op, factor, per_channel))
    if expected is None:
        assert found is None
    else:
        assert found is not None and found.node == "rescaling/mul"
        assert found.factor == pytest.approx(expected, rel=1e-6)


def test_a_keras_model_is_fed_raw_pixels_and_explained_past_its_image(tmp_path):
    model = keras_like()
    gm = build_gradient_model(model)
    assert gm.layer == "a2"
    assert [c.tensor for c in gm.candidates] == ["c1", "a1", "c2", "a2"]  # not rescaled or nchw: the image
    assert all(c.shape[0] == "N" for c in gm.candidates)

    path = tmp_path / "keras_like.onnx"
    onnx.save(model, path)
    image = random_png(tmp_path / "image.png", size=(16, 16))
    explainer = Explainer(path)
    (result,) = explainer.explain([image], method="gradcam")
    info = explainer.preprocessing_info()
    assert info["preset"] == "raw" and "scales its 0-255 input itself" in info["source"]
    assert result.raw_map.shape == (8, 8)
    inspected = run(["inspect", path])
    assert "the model scales its 0-255 input itself (x 0.00392157 at node rescaling/mul)" in inspected.stdout
    assert "the 'raw' preset is used" in inspected.stdout
