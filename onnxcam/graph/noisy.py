"""The noisy-input front of the rewritten model: the noisy batch is made inside the graph.

``build_noisy_model(gm)`` puts in front of the rewritten model's input::

    x = images[rows] + sigma[rows] * noise[samples]

with ``images`` the clean images of a call, ``noise`` the bank of standard normal samples
``z_1 .. z_n`` (onnxcam.explain.noise) and ``rows`` / ``samples`` naming the (image, sample) pair of
each row of the batch. On a GPU the images and the bank are uploaded once (bound as device
tensors) and each batch only sends two small index vectors: the noisy batch is made and kept on
the device. On the CPU it gives the same inputs as the NumPy path (same float32 products and sums,
in the same order).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from onnxcam.errors import OptionError
from onnxcam.graph.rewrite import GradientModel

IMAGES = "onnxcam_images"
NOISE = "onnxcam_noise"
ROWS = "onnxcam_rows"
SAMPLES = "onnxcam_samples"
SIGMA = "onnxcam_sigma"


def build_noisy_model(gm: GradientModel) -> onnx.ModelProto:
    """A copy of ``gm.model`` whose input is computed from (images, noise, rows, samples, sigma)."""
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
    item = dims[1:]
    rank = len(dims)
    inputs = [helper.make_tensor_value_info(IMAGES, elem_type, ["M", *item]),
              helper.make_tensor_value_info(NOISE, elem_type, ["S", *item]),
              helper.make_tensor_value_info(ROWS, TensorProto.INT64, ["N"]),
              helper.make_tensor_value_info(SAMPLES, TensorProto.INT64, ["N"]),
              helper.make_tensor_value_info(SIGMA, elem_type, ["M"])]
    prefix = "onnxcam_noisy/"
    shape = helper.make_tensor(prefix + "sigma_shape", TensorProto.INT64, [rank], [-1] + [1] * (rank - 1))
    nodes = [
        helper.make_node("Gather", [IMAGES, ROWS], [prefix + "clean"], axis=0),
        helper.make_node("Gather", [NOISE, SAMPLES], [prefix + "z"], axis=0),
        helper.make_node("Gather", [SIGMA, ROWS], [prefix + "sigma"], axis=0),
        helper.make_node("Reshape", [prefix + "sigma", prefix + "sigma_shape"], [prefix + "sigma_b"]),
        helper.make_node("Mul", [prefix + "z", prefix + "sigma_b"], [prefix + "noise"]),
        helper.make_node("Add", [prefix + "noise", prefix + "clean"], [gm.input_name]),
    ]
    kept_inputs = [i for i in graph.input if i.name != gm.input_name]
    del graph.input[:]
    graph.input.extend(inputs + kept_inputs)
    graph.initializer.append(shape)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    return model
