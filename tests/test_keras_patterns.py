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
    ("Mul", 1 / 255, None, ("raw", 1 / 255)),               # Rescaling(1/255)
    ("Mul", 1 / 127.5, None, ("raw", 1 / 127.5)),           # Rescaling(1/127.5, offset=-1)
    ("Div", 1 / 255, None, ("raw", 1 / 255)),               # x / 255
    ("Mul", 1 / 255, [1 / 255] * 3, ("raw", 1 / 255)),      # the same factor per channel
    ("Mul", 0.5, None, None),                               # not a normalisation
])
def test_the_models_own_scaling_of_its_pixels_is_found(first_op, factor, per_channel, expected):
    found = input_scaling(keras_like(first_op, factor, per_channel))
    if expected is None:
        assert found is None
    else:
        assert found is not None and found.node == "rescaling/mul" and found.preset == expected[0]
        assert found.scale == pytest.approx([expected[1]] * len(found.scale), rel=1e-6)


MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.mark.parametrize("steps, expected", [
    ([("Div", 255.0), ("Sub", MEAN), ("Div", STD)], ("raw", 1 / (255 * STD))),  # torchvision's, built in
    ([("Sub", MEAN), ("Div", STD)], ("unit", 1 / STD)),                          # for a 0-1 image
    ([("Mul", 1 / 255), ("Sub", MEAN), ("Mul", 1 / STD)], ("raw", 1 / (255 * STD))),
    ([("Sub", [123.68, 116.78, 103.94])], None),                                 # a mean alone: no range
    ([("Div", 255.0), ("Sub", MEAN), ("Div", STD), ("Mul", 100.0)], None),      # far from normalised
])
def test_a_normalisation_built_into_the_model_is_read_through(steps, expected):
    """(x / 255 - mean) / std written into an export with its per-channel constants (1, 3, 1, 1):
    the composed scale tells a 0-255 input from a 0-1 one."""
    model = keras_like()
    graph = model.graph
    first = graph.node[0]
    first.op_type, first.input[1] = "Identity", ""
    del first.input[1:]
    previous, nodes = "input", []
    for i, (op, value) in enumerate(steps):
        name = f"norm{i}"
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32).reshape(1, 1, 1, -1), name))
        nodes.append(helper.make_node(op, [previous, name], [f"{name}_out"], name=name))
        previous = f"{name}_out"
    first.input[0] = previous
    for offset, node in enumerate(nodes):
        graph.node.insert(offset, node)
    found = input_scaling(model)
    if expected is None:
        assert found is None
    else:
        assert found is not None and found.preset == expected[0] and found.node == f"norm{len(steps) - 1}"
        assert found.scale == pytest.approx(list(np.broadcast_to(expected[1], 3)), rel=1e-5)


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
    assert info["preset"] == "raw" and "normalises its input itself" in info["source"]
    assert result.raw_map.shape == (8, 8)
    inspected = run(["inspect", path])
    assert "normalises its input itself (x 0.00392157 up to node 'rescaling/mul'): it expects 0-255" in inspected.stdout
    assert "the 'raw' preset is used" in inspected.stdout
