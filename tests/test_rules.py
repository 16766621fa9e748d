"""Every gradient rule against float64 central finite differences, with several attribute
combinations each, and proof that the checker catches a wrong rule."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.gradients import rules as rules_module
from onnxcam.gradients.rules import RULES
from tests.gradcheck import GradientMismatch, check_gradient, reference_evaluator

RNG = np.random.default_rng(1234)


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def make_model(nodes, x_shape, inits=(), opset=20, y_name="y"):
    graph = helper.make_graph(
        nodes, "rule_test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, None)],
        list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def one_op(op, x_shape, extra_inputs=(), inits=(), opset=20, outputs=("y",), **attrs):
    node = helper.make_node(op, ["x", *extra_inputs], list(outputs), **attrs)
    return make_model([node], x_shape, inits, opset)


def weights(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def normal(shape):
    return RNG.standard_normal(shape).astype(np.float32)


def positive(shape):
    return (np.abs(RNG.standard_normal(shape)) + 0.5).astype(np.float32)


def distinct(shape):
    """Values with no ties and away from 0 (max-pooling and ReLU kinks)."""
    values = RNG.permutation(np.prod(shape)).astype(np.float32) / np.prod(shape) * 4 - 2
    values[np.abs(values) < 0.05] += 0.1
    return values.reshape(shape).astype(np.float32)


# (id, model, input array)
CASES = []


def case(name, model, x):
    CASES.append(pytest.param(model, x, id=name))


# -- elementwise -----------------------------------------------------------------------------
for op, attrs, gen in [
    ("Relu", {}, distinct), ("LeakyRelu", {"alpha": 0.1}, distinct), ("LeakyRelu", {}, distinct),
    ("LeakyRelu", {"alpha": 1.5}, distinct), ("LeakyRelu", {"alpha": -0.2}, distinct),
    ("Elu", {"alpha": 0.7}, distinct), ("Sigmoid", {}, normal), ("HardSigmoid", {}, distinct),
    ("HardSigmoid", {"alpha": 0.25, "beta": 0.45}, distinct), ("HardSwish", {}, lambda s: distinct(s) * 2.5),
    ("Tanh", {}, normal), ("Softplus", {}, normal), ("Erf", {}, normal), ("Gelu", {}, normal),
    ("Gelu", {"approximate": "tanh"}, normal), ("Exp", {}, normal), ("Log", {}, positive),
    ("Sqrt", {}, positive), ("Neg", {}, normal), ("Identity", {}, normal), ("Abs", {}, distinct),
    ("Reciprocal", {}, positive),
]:
    label = op + "".join(f"-{k}{v}" for k, v in attrs.items())
    case(label, one_op(op, [2, 3, 4], **attrs), gen([2, 3, 4]))

case("Dropout", one_op("Dropout", [2, 5], opset=17), normal([2, 5]))
case("Mish", one_op("Mish", [2, 3, 4], opset=18), normal([2, 3, 4]) * 2)
case("Selu", one_op("Selu", [2, 3, 4]), distinct([2, 3, 4]))
case("Selu-attrs", one_op("Selu", [2, 3, 4], alpha=1.2, gamma=0.8), distinct([2, 3, 4]))
case("Celu-alpha", one_op("Celu", [2, 3, 4], alpha=0.6), distinct([2, 3, 4]))
case("Softsign", one_op("Softsign", [2, 3, 4]), distinct([2, 3, 4]))
case("ThresholdedRelu", one_op("ThresholdedRelu", [2, 3, 4], alpha=0.4), distinct([2, 3, 4]))

case("Cast-float", one_op("Cast", [2, 5], to=TensorProto.FLOAT), normal([2, 5]))
nodes = [helper.make_node("Cast", ["x"], ["x64"], to=TensorProto.DOUBLE), helper.make_node("Tanh", ["x64"], ["t"]),
         helper.make_node("CastLike", ["t", "x"], ["y"])]
case("CastLike-through-double", make_model(nodes, [2, 5]), normal([2, 5]))
case("PRelu-channel", one_op("PRelu", [2, 3, 4, 4], ["s"], [_const("s", [[[0.1]], [[0.2]], [[-0.3]]])]),
     distinct([2, 3, 4, 4]))
case("Clip-both", one_op("Clip", [2, 6], ["lo", "hi"], [_const("lo", -0.5), _const("hi", 0.7)]),
     distinct([2, 6]))
case("Clip-max-only", one_op("Clip", [2, 6], ["", "hi"], [_const("hi", 0.3)]), distinct([2, 6]))
case("Clip-relu6", one_op("Clip", [2, 6], ["lo", "hi"], [_const("lo", 0.0), _const("hi", 6.0)]),
     distinct([2, 6]) * 4)
case("Pow-square", one_op("Pow", [2, 5], ["p"], [_const("p", 2.0)]), normal([2, 5]))
case("Pow-frac", one_op("Pow", [2, 5], ["p"], [_const("p", 1.5)]), positive([2, 5]))
case("Softmax-last", one_op("Softmax", [2, 7]), normal([2, 7]))
case("Softmax-axis1", one_op("Softmax", [2, 3, 4], axis=1), normal([2, 3, 4]))
case("LogSoftmax", one_op("LogSoftmax", [2, 7]), normal([2, 7]))
case("LogSoftmax-axis1", one_op("LogSoftmax", [2, 3, 4], axis=1), normal([2, 3, 4]))

# -- broadcasting binary ops (both operands on the path: a derived tensor broadcasts) -------------
for op in ["Add", "Sub", "Mul", "Div"]:
    case(f"{op}-const-broadcast", one_op(op, [2, 3, 4], ["c"], [_const("c", positive([3, 1]))]),
         normal([2, 3, 4]))
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Sigmoid", ["m"], ["s"]),
             helper.make_node(op, ["x", "s"], ["y"])]
    case(f"{op}-both-broadcast", make_model(nodes, [2, 3, 4], opset=17), normal([2, 3, 4]))
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node(op, ["s", "x"], ["y"])]
    case(f"{op}-both-same", make_model(nodes, [2, 5]), positive([2, 5]))
case("Sum-three", make_model([helper.make_node("Tanh", ["x"], ["t"]),
                              helper.make_node("Sum", ["x", "t", "c"], ["y"])], [2, 3],
                             [_const("c", [1.0, 2.0, 3.0])]), normal([2, 3]))

# Max / Min / Mean: constants broadcast, both operands on the path, ties shared (Max(x, x) is x)
for op in ("Max", "Min"):
    case(f"{op}-const-broadcast", one_op(op, [2, 3, 4], ["c"], [_const("c", [[0.3], [-0.2], [0.1]])]),
         distinct([2, 3, 4]))
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Mul", ["x", "half"], ["h"]),
             helper.make_node(op, ["x", "t", "h"], ["y"])]
    case(f"{op}-three-on-path", make_model(nodes, [2, 3, 4], [_const("half", 0.5)]), distinct([2, 3, 4]))
    case(f"{op}-tie-shared", make_model([helper.make_node(op, ["x", "x"], ["y"])], [2, 5]), normal([2, 5]))
nodes = [helper.make_node("Max", ["x", "zero"], ["r"]), helper.make_node("Min", ["r", "six"], ["y"])]
case("Min-relu6-as-max-min", make_model(nodes, [2, 6], [_const("zero", 0.0), _const("six", 6.0)]),
     distinct([2, 6]) * 4)
nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
         helper.make_node("Mean", ["x", "m", "c"], ["y"])]
case("Mean-broadcast", make_model(nodes, [2, 3, 4], [_const("c", 1.5)], opset=17), normal([2, 3, 4]))

# Where: both branches on the path with a condition from the values; dynamo's NaN guard after a
# Softmax; a condition broadcast against the branches
nodes = [helper.make_node("Greater", ["x", "c"], ["cond"]), helper.make_node("Tanh", ["x"], ["t"]),
         helper.make_node("Where", ["cond", "x", "t"], ["y"])]
case("Where-both-branches", make_model(nodes, [2, 3, 4], [_const("c", 0.3)]), distinct([2, 3, 4]))
nodes = [helper.make_node("Softmax", ["x"], ["p"]), helper.make_node("IsNaN", ["p"], ["nan"]),
         helper.make_node("Where", ["nan", "zero", "p"], ["y"])]
case("Where-nan-guard", make_model(nodes, [2, 5], [_const("zero", 0.0)]), normal([2, 5]))
nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Where", ["m", "s", "x"], ["y"])]
case("Where-broadcast-condition", make_model(nodes, [2, 3, 4], [_const("m", [[True], [False], [True]], np.bool_)]),
     normal([2, 3, 4]))

# -- linear algebra --------------------------------------------------------------------------
for ta, tb in [(0, 0), (0, 1)]:
    b = weights(6, 4) if not tb else weights(4, 6)
    case(f"Gemm-tA{ta}-tB{tb}", one_op("Gemm", [3, 6], ["B", "C"], [_const("B", b), _const("C", weights(4))],
                                       alpha=0.7, beta=1.3, transB=tb), normal([3, 6]))
nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
         helper.make_node("Gemm", ["xt", "B"], ["y"], transA=1)]
case("Gemm-transA", make_model(nodes, [3, 6], [_const("B", weights(6, 4))]), normal([3, 6]))
case("MatMul-2d", one_op("MatMul", [3, 6], ["B"], [_const("B", weights(6, 4))]), normal([3, 6]))
case("MatMul-batched-bcast", one_op("MatMul", [2, 3, 5, 6], ["B"], [_const("B", weights(3, 6, 4))]),
     normal([2, 3, 5, 6]))
case("MatMul-vector", one_op("MatMul", [2, 6], ["B"], [_const("B", weights(6))]), normal([2, 6]))
nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["x", "xt"], ["y"])]
case("MatMul-self", make_model(nodes, [2, 3, 4]), normal([2, 3, 4]))
nodes = [helper.make_node("MatMul", ["A", "x"], ["y"])]
case("MatMul-right-operand", make_model(nodes, [2, 3, 4], [_const("A", weights(5, 3))]), normal([2, 3, 4]))

case("Einsum-matmul", one_op("Einsum", [3, 6], ["B"], [_const("B", weights(6, 4))], equation="ij,jk->ik"),
     normal([3, 6]))
nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
         helper.make_node("Einsum", ["x", "x"], ["y"], equation="b i d, b j d -> b i j")]
case("Einsum-attention-self", make_model(nodes, [2, 3, 4]), normal([2, 3, 4]))
case("Einsum-transpose-sum", one_op("Einsum", [2, 3, 4], equation="abc->ca"), normal([2, 3, 4]))
case("Einsum-three", one_op("Einsum", [2, 3], ["B", "C"], [_const("C", weights(4, 5)), _const("B", weights(3, 4))],
                            equation="ij,jk,kl->il"), normal([2, 3]))

for op in ("ReduceL2", "ReduceSumSquare"):
    case(f"{op}-axis1-keepdims", one_op(op, [2, 3, 4], axes=[1], keepdims=1, opset=17), normal([2, 3, 4]))
    case(f"{op}-axes-input", one_op(op, [2, 3, 4], ["a"], [_const("a", [-1, 0], np.int64)], keepdims=0, opset=18),
         normal([2, 3, 4]))
    case(f"{op}-all", one_op(op, [2, 3], keepdims=1, opset=17), normal([2, 3]))

# -- convolution -----------------------------------------------------------------------------
conv_cases = [
    ("plain", [2, 3, 7, 7], [4, 3, 3, 3], {}),
    ("stride2-pad1", [2, 3, 8, 8], [4, 3, 3, 3], {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("stride3-odd", [1, 2, 10, 11], [3, 2, 3, 2], {"strides": [3, 2]}),
    ("asym-pads", [1, 2, 7, 6], [3, 2, 3, 3], {"pads": [0, 2, 1, 0]}),
    ("dilation2", [1, 2, 9, 9], [3, 2, 3, 3], {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    ("same-upper-s2", [1, 2, 7, 8], [3, 2, 3, 3], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("same-lower-s2", [1, 2, 7, 8], [3, 2, 4, 4], {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ("valid", [1, 2, 7, 8], [3, 2, 3, 3], {"auto_pad": "VALID", "strides": [2, 2]}),
    ("groups", [1, 4, 6, 6], [6, 2, 3, 3], {"group": 2, "pads": [1, 1, 1, 1]}),
    ("depthwise", [1, 3, 7, 7], [3, 1, 3, 3], {"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("depthwise-mult2", [1, 3, 6, 6], [6, 1, 3, 3], {"group": 3}),
    ("1d", [2, 3, 9], [4, 3, 3], {"strides": [2]}),
    ("3d", [1, 2, 5, 5, 4], [2, 2, 3, 3, 2], {"pads": [1, 1, 0, 1, 1, 1]}),
    # stride 1 is emitted as a Conv with the flipped kernel: asymmetric automatic pads, pads larger
    # than the kernel (ConvTranspose fallback), dilation with asymmetric pads
    ("same-upper-s1-even", [1, 2, 7, 8], [3, 2, 4, 2], {"auto_pad": "SAME_UPPER"}),
    ("same-lower-s1-even", [1, 2, 7, 8], [3, 2, 4, 2], {"auto_pad": "SAME_LOWER"}),
    ("pads-beyond-kernel", [1, 2, 5, 5], [3, 2, 3, 3], {"pads": [3, 0, 0, 3]}),
    ("dilation-asym", [1, 4, 9, 8], [4, 2, 3, 2], {"dilations": [2, 3], "pads": [0, 3, 4, 1], "group": 2}),
]
for name, xs, ws, attrs in conv_cases:
    case(f"Conv-{name}", one_op("Conv", xs, ["W", "B"], [_const("W", weights(*ws)), _const("B", weights(ws[0]))],
                                **attrs), normal(xs))

# -- pooling ---------------------------------------------------------------------------------
pool_cases = [
    ("k2s2", {"kernel_shape": [2, 2], "strides": [2, 2]}, [2, 3, 6, 6]),
    ("k3s2-overlap", {"kernel_shape": [3, 3], "strides": [2, 2]}, [1, 2, 9, 9]),
    ("k3s2-pad-ceil", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
     [1, 2, 8, 8]),
    ("k3s1-same", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER"}, [1, 2, 5, 5]),
    ("k2s2-ceil-odd", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, [1, 2, 7, 7]),
    ("k3-dilated", {"kernel_shape": [2, 2], "dilations": [2, 2]}, [1, 2, 6, 6]),
]
for name, attrs, xs in pool_cases:
    case(f"MaxPool-{name}", one_op("MaxPool", xs, **attrs), distinct(xs))
    if "dilations" in attrs:
        continue
    for cip in (0, 1):
        case(f"AveragePool-{name}-cip{cip}", one_op("AveragePool", xs, count_include_pad=cip, **attrs),
             normal(xs))
# ConvTranspose: W is [C, M/g, k]; the torch exports' explicit pads and output_padding
conv_transpose_cases = [
    ("plain", [2, 3, 4, 4], [3, 2, 3, 3], {}),
    ("stride2-pad1-outpad1", [1, 3, 4, 5], [3, 4, 3, 3], {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                            "output_padding": [1, 1]}),
    ("stride2-k2", [2, 4, 3, 3], [4, 2, 2, 2], {"strides": [2, 2]}),
    ("groups-asym-pads", [1, 4, 4, 4], [4, 3, 3, 3], {"group": 2, "strides": [2, 1], "pads": [0, 1, 1, 2]}),
    ("dilation2", [1, 2, 4, 4], [2, 3, 3, 3], {"dilations": [2, 2], "pads": [1, 0, 1, 2]}),
    ("stride3-outpad2", [1, 2, 3, 2], [2, 2, 3, 2], {"strides": [3, 2], "output_padding": [2, 1]}),
    ("valid", [1, 2, 3, 3], [2, 2, 3, 3], {"auto_pad": "VALID", "strides": [2, 2]}),
    ("1d", [2, 3, 5], [3, 2, 3], {"strides": [2], "pads": [1, 0]}),
]
for name, xs, ws, attrs in conv_transpose_cases:
    case(f"ConvTranspose-{name}", one_op("ConvTranspose", xs, ["W", "B"],
                                         [_const("W", weights(*ws)), _const("B", weights(ws[1] * attrs.get("group", 1)))],
                                         **attrs), normal(xs))
case("GlobalAveragePool", one_op("GlobalAveragePool", [2, 3, 4, 5]), normal([2, 3, 4, 5]))
case("GlobalMaxPool", one_op("GlobalMaxPool", [2, 3, 4, 5]), distinct([2, 3, 4, 5]))
case("MaxPool-indices-output", make_model([helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2],
                                                            strides=[2, 2])], [1, 2, 4, 4]), distinct([1, 2, 4, 4]))

# -- reductions ------------------------------------------------------------------------------
for op, gen in [("ReduceMean", normal), ("ReduceSum", normal), ("ReduceMax", distinct)]:
    case(f"{op}-axes23-keep", one_op(op, [2, 3, 4, 5], ["axes"], [_const("axes", [2, 3], np.int64)]), gen([2, 3, 4, 5]))
    case(f"{op}-axis1-drop", one_op(op, [2, 3, 4], ["axes"], [_const("axes", [1], np.int64)], keepdims=0),
         gen([2, 3, 4]))
    case(f"{op}-neg-axis-drop", one_op(op, [2, 3, 4], ["axes"], [_const("axes", [-1], np.int64)], keepdims=0),
         gen([2, 3, 4]))
    case(f"{op}-opset13-attr", one_op(op, [2, 3, 4], opset=13 if op != "ReduceSum" else 11, axes=[2]),
         gen([2, 3, 4]))
case("ReduceMean-all-axes", one_op("ReduceMean", [2, 3, 4], keepdims=1), normal([2, 3, 4]))
for op, gen in [("ReduceL1", distinct), ("ReduceLogSumExp", normal)]:
    case(f"{op}-axis1-keep", one_op(op, [2, 3, 4], ["axes"], [_const("axes", [1], np.int64)]), gen([2, 3, 4]))
    case(f"{op}-last-drop", one_op(op, [2, 3, 4], ["axes"], [_const("axes", [-1], np.int64)], keepdims=0),
         gen([2, 3, 4]))
for exclusive in (0, 1):
    for reverse in (0, 1):
        case(f"CumSum-ex{exclusive}-rev{reverse}", one_op("CumSum", [2, 5, 3], ["ax"], [_const("ax", 1, np.int64)],
                                                           exclusive=exclusive, reverse=reverse), normal([2, 5, 3]))
case("GatherElements", one_op("GatherElements", [2, 4, 3], ["i"],
                              [_const("i", RNG.integers(0, 4, (2, 6, 3)), np.int64)], axis=1), normal([2, 4, 3]))
case("GatherND", one_op("GatherND", [2, 4, 3], ["i"], [_const("i", [[[1], [3], [1]], [[0], [2], [2]]], np.int64)],
                        batch_dims=1), normal([2, 4, 3]))
case("ReduceMin-axes23-keep", one_op("ReduceMin", [2, 3, 4, 5], ["axes"], [_const("axes", [2, 3], np.int64)]),
     distinct([2, 3, 4, 5]))
case("ReduceMin-axis1-drop", one_op("ReduceMin", [2, 3, 4], ["axes"], [_const("axes", [1], np.int64)], keepdims=0),
     distinct([2, 3, 4]))

# -- normalisation ---------------------------------------------------------------------------
bn = [_const("s", positive([3])), _const("b", weights(3)), _const("m", weights(3)), _const("v", positive([3]))]
case("BatchNormalization", one_op("BatchNormalization", [2, 3, 4, 4], ["s", "b", "m", "v"], bn, epsilon=1e-3),
     normal([2, 3, 4, 4]))
case("BatchNormalization-2d", one_op("BatchNormalization", [4, 3], ["s", "b", "m", "v"], bn), normal([4, 3]))
case("InstanceNormalization", one_op("InstanceNormalization", [2, 3, 4, 5], ["s", "b"],
                                     [_const("s", positive([3])), _const("b", weights(3))], epsilon=1e-4),
     normal([2, 3, 4, 5]))
case("LayerNormalization-last", one_op("LayerNormalization", [2, 3, 6], ["s", "b"],
                                       [_const("s", positive([6])), _const("b", weights(6))]), normal([2, 3, 6]))
case("LayerNormalization-axis1", one_op("LayerNormalization", [2, 3, 4], ["s"],
                                        [_const("s", positive([3, 4]))], axis=1, epsilon=1e-3), normal([2, 3, 4]))
case("LRN-size3", one_op("LRN", [2, 5, 3, 3], size=3, alpha=0.1, beta=0.75, bias=1.0), normal([2, 5, 3, 3]))
case("LRN-size5", one_op("LRN", [1, 6, 2, 3], size=5, alpha=0.3, beta=0.6, bias=2.0), normal([1, 6, 2, 3]))

# -- shape and data movement -----------------------------------------------------------------
case("Reshape", one_op("Reshape", [2, 3, 4], ["s"], [_const("s", [2, 12], np.int64)]), normal([2, 3, 4]))
case("Flatten", one_op("Flatten", [2, 3, 2, 2], axis=1), normal([2, 3, 2, 2]))
case("Squeeze", one_op("Squeeze", [2, 3, 1, 1], ["a"], [_const("a", [2, 3], np.int64)]), normal([2, 3, 1, 1]))
case("Unsqueeze", one_op("Unsqueeze", [2, 3], ["a"], [_const("a", [1, 3], np.int64)]), normal([2, 3]))
case("Transpose", one_op("Transpose", [2, 3, 4], perm=[0, 2, 1]), normal([2, 3, 4]))
case("Transpose-default", one_op("Transpose", [2, 3, 4]), normal([2, 3, 4]))
nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Concat", ["x", "t", "x"], ["y"], axis=1)]
case("Concat-axis1", make_model(nodes, [2, 3, 4]), normal([2, 3, 4]))
nodes = [helper.make_node("Split", ["x", "sp"], ["a", "b", "c"], axis=1),
         helper.make_node("Mul", ["a", "c"], ["y"])]
case("Split-unused-output", make_model(nodes, [2, 6], [_const("sp", [2, 2, 2], np.int64)]), normal([2, 6]))
nodes = [helper.make_node("Split", ["x"], ["a", "b"], axis=2, num_outputs=2),
         helper.make_node("Concat", ["b", "a"], ["y"], axis=2)]
case("Split-num-outputs", make_model(nodes, [2, 3, 4], opset=18), normal([2, 3, 4]))
slice_inits = [_const("st", [1, -1], np.int64), _const("en", [3, -5], np.int64), _const("ax", [1, 2], np.int64),
               _const("sp", [1, -2], np.int64)]
case("Slice-steps", one_op("Slice", [2, 4, 6], ["st", "en", "ax", "sp"], slice_inits), normal([2, 4, 6]))
case("Slice-simple", one_op("Slice", [2, 4, 6], ["st", "en"], [_const("st", [0, 1, 2], np.int64),
                                                               _const("en", [2, 3, 5], np.int64)]), normal([2, 4, 6]))
case("Gather-axis1", one_op("Gather", [2, 5, 3], ["i"], [_const("i", [4, 0, 4, 2], np.int64)], axis=1),
     normal([2, 5, 3]))
case("Gather-scalar-index", one_op("Gather", [2, 5, 3], ["i"], [_const("i", 2, np.int64)], axis=2),
     normal([2, 5, 3]))
case("Pad-constant-axes-opset18", one_op("Pad", [2, 3, 4, 4], ["p", "v", "ax"],
                                        [_const("p", [2, 1, 0, 3], np.int64), _const("v", 0.5),
                                         _const("ax", [-1, 1], np.int64)], opset=18), normal([2, 3, 4, 4]))
for mode in ["constant", "reflect", "edge"]:
    case(f"Pad-{mode}", one_op("Pad", [2, 3, 4, 4], ["p"], [_const("p", [0, 0, 1, 2, 0, 0, 2, 1], np.int64)],
                               mode=mode), normal([2, 3, 4, 4]))
# negative pads crop: constant mode then takes the index probe, not the slice (_unpad)
for mode in ["constant", "edge"]:
    case(f"Pad-{mode}-negative", one_op("Pad", [2, 3, 4, 5], ["p"],
                                        [_const("p", [0, 0, -1, 2, 0, 0, 1, -2], np.int64)], mode=mode),
         normal([2, 3, 4, 5]))
case("Tile", one_op("Tile", [2, 3, 2], ["r"], [_const("r", [1, 2, 3], np.int64)]), normal([2, 3, 2]))
case("Tile-batch", one_op("Tile", [1, 2, 3], ["r"], [_const("r", [3, 1, 2], np.int64)]), normal([1, 2, 3]))
case("DepthToSpace-DCR", one_op("DepthToSpace", [2, 8, 2, 3], blocksize=2), normal([2, 8, 2, 3]))
case("DepthToSpace-CRD", one_op("DepthToSpace", [2, 8, 2, 3], blocksize=2, mode="CRD"), normal([2, 8, 2, 3]))
case("SpaceToDepth", one_op("SpaceToDepth", [2, 2, 4, 6], blocksize=2), normal([2, 2, 4, 6]))
case("Expand", one_op("Expand", [2, 3, 1], ["s"], [_const("s", [2, 3, 4], np.int64)]), normal([2, 3, 1]))
case("Expand-rank-up", one_op("Expand", [2, 1, 4], ["s"], [_const("s", [3, 2, 5, 4], np.int64)]), normal([2, 1, 4]))
for mode, extra in [("nearest", {}), ("linear", {}),
                    ("linear", {"coordinate_transformation_mode": "align_corners"}),
                    ("nearest", {"nearest_mode": "floor", "coordinate_transformation_mode": "asymmetric"})]:
    label = f"Resize-{mode}" + "".join(f"-{v}" for v in extra.values())
    case(label + "-scales", one_op("Resize", [2, 3, 3, 4], ["", "sc"], [_const("sc", [1, 1, 2, 1.5])],
                                   mode=mode, **extra), normal([2, 3, 3, 4]))
    case(label + "-sizes", one_op("Resize", [1, 2, 4, 4], ["", "", "sz"], [_const("sz", [1, 2, 7, 5], np.int64)],
                                  mode=mode, **extra), normal([1, 2, 4, 4]))

# sizes computed from the input's own shape, as torch exports F.interpolate(x, size=(H, W))
case("Resize-linear-sizes-from-shape", make_model([
    helper.make_node("Shape", ["x"], ["shape"]),
    helper.make_node("Slice", ["shape", "zero", "two"], ["nc"]),
    helper.make_node("Concat", ["nc", "hw"], ["sz"], axis=0),
    helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="linear")], [2, 3, 4, 4],
    [_const("zero", [0], np.int64), _const("two", [2], np.int64), _const("hw", [7, 5], np.int64)]),
    normal([2, 3, 4, 4]))


@pytest.mark.parametrize("model, x", CASES)
def test_rule_matches_finite_differences(model, x):
    check_gradient(model, x, layer="x", score="y")


def test_lrn_reference_matches_onnxruntime():
    """The float64 LRN the checker uses is itself checked against the runtime's forward."""
    import onnxruntime as ort

    for size in (3, 5):
        model = one_op("LRN", [2, 7, 3, 2], size=size, alpha=0.2, beta=0.7, bias=1.5)
        x = normal([2, 7, 3, 2])
        runtime = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = runtime.run(None, {"x": x})[0]
        ours = reference_evaluator(model).run(None, {"x": x.astype(np.float64)})[0]
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_pad_reference_matches_onnxruntime():
    """The float64 Pad the checker uses (negative pads crop) is checked against the runtime."""
    import onnxruntime as ort

    x = normal([2, 3, 4, 5])
    for mode in ("constant", "edge", "reflect"):
        for pads in ([0, 0, -1, 2, 0, 0, 1, -2], [0, 0, 1, 2, 0, 0, 2, 1], [0, -1, 0, -2, 0, 0, -1, 0]):
            model = one_op("Pad", [2, 3, 4, 5], ["p"], [_const("p", pads, np.int64)], mode=mode)
            runtime = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            expected = runtime.run(None, {"x": x})[0]
            ours = reference_evaluator(model).run(None, {"x": x.astype(np.float64)})[0]
            np.testing.assert_allclose(ours, expected, rtol=1e-6, err_msg=f"{mode} {pads}")


def test_conv_transpose_reference_matches_onnxruntime():
    """The float64 ConvTranspose the checker uses (grouped ones a group at a time) is checked
    against the runtime's forward."""
    import onnxruntime as ort

    for name, xs, ws, attrs in conv_transpose_cases:
        bias = weights(ws[1] * attrs.get("group", 1))
        model = one_op("ConvTranspose", xs, ["W", "B"], [_const("W", weights(*ws)), _const("B", bias)], **attrs)
        x = normal(xs)
        runtime = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = runtime.run(None, {"x": x})[0]
        ours = reference_evaluator(model).run(None, {"x": x.astype(np.float64)})[0]
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5, err_msg=name)


#: Rules that are not the derivative of their op, by design: quantization is flat almost
#: everywhere, and its gradient goes straight through it. ``tests/test_quantization.py`` checks
#: them against finite differences of the network with the quantization error held constant.
STRAIGHT_THROUGH = {"QuantizeLinear", "DequantizeLinear"}


def test_every_rule_in_the_table_is_tested():
    tested = {p.id.split("-")[0] for p in CASES} | STRAIGHT_THROUGH
    assert set(RULES) <= tested, f"rules without a finite-difference test: {sorted(set(RULES) - tested)}"


def test_checker_fails_a_deliberately_wrong_rule(monkeypatch):
    model, x = one_op("Sigmoid", [2, 3, 4]), normal([2, 3, 4])
    check_gradient(model, x, layer="x", score="y")  # the right rule passes

    def wrong_sigmoid(em, node, dy):  # forgets the (1 - y) factor
        return [em.op("Mul", dy[0], node.outputs[0])]

    monkeypatch.setitem(RULES, "Sigmoid", wrong_sigmoid)
    with pytest.raises(GradientMismatch):
        check_gradient(model, x, layer="x", score="y")


def test_checker_fails_a_subtly_wrong_conv_padding(monkeypatch):
    """An off-by-one in the transposed-convolution geometry must not slip through."""
    model = one_op("Conv", [1, 2, 7, 6], ["W"], [_const("W", weights(3, 2, 3, 3))], pads=[0, 2, 1, 0])
    x = normal([1, 2, 7, 6])
    original = rules_module._transpose_geometry

    def shifted(node, x_, y_, kernel):
        geometry = original(node, x_, y_, kernel)
        n = len(kernel)
        geometry["pads"] = [p + 1 if i == 0 else p for i, p in enumerate(geometry["pads"][:n])] \
            + [max(p - 1, 0) for p in geometry["pads"][n:]]
        return geometry

    monkeypatch.setattr(rules_module, "_transpose_geometry", shifted)
    monkeypatch.setattr(rules_module, "_conv_as_correlation", lambda em, node, dy: None)
    with pytest.raises(GradientMismatch):
        check_gradient(model, x, layer="x", score="y")


def test_checker_fails_a_subtly_wrong_conv_as_correlation(monkeypatch):
    """The same off-by-one in the stride-1 form (a Conv with the flipped kernel) is caught too."""
    model = one_op("Conv", [1, 2, 7, 6], ["W"], [_const("W", weights(3, 2, 3, 3))], pads=[0, 2, 1, 0])
    x = normal([1, 2, 7, 6])
    original = rules_module._explicit_pads

    def shifted(*args):
        begin, end = original(*args)
        return [begin[0] + 1] + begin[1:], end

    monkeypatch.setattr(rules_module, "_explicit_pads", shifted)
    with pytest.raises(GradientMismatch):
        check_gradient(model, x, layer="x", score="y")


def test_stride_one_conv_gradient_is_a_conv_and_strided_is_a_conv_transpose():
    """Stride 1 with constant weights: dx is a Conv (ONNX Runtime runs it faster than
    ConvTranspose); strides > 1 keep the ConvTranspose."""
    from onnxcam.graph.prepare import prepare_model
    from onnxcam.graph.rewrite import build_gradient_model

    for strides, expected in (([1, 1], "Conv"), ([2, 2], "ConvTranspose")):
        model = one_op("Conv", [1, 2, 8, 8], ["W"], [_const("W", weights(3, 2, 3, 3))],
                       pads=[1, 1, 1, 1], strides=strides)
        gm = build_gradient_model(prepare_model(model), layer="x", score="y")
        ops = [node.op_type for node in gm.model.graph.node]
        assert ops.count("Conv") == (2 if expected == "Conv" else 1), ops
        assert ops.count("ConvTranspose") == (0 if expected == "Conv" else 1), ops


REQUIRED_OPS = """Conv Gemm MatMul Add Sub Mul Div Sum Neg Relu LeakyRelu PRelu Elu Clip Sigmoid HardSigmoid
HardSwish Tanh Softplus Erf Gelu Exp Log Sqrt Pow Softmax LogSoftmax MaxPool AveragePool
GlobalAveragePool GlobalMaxPool ReduceMean ReduceSum ReduceMax BatchNormalization
InstanceNormalization LayerNormalization LRN Dropout Identity Cast Reshape Flatten Squeeze Unsqueeze
Transpose Concat Split Slice Gather Pad Expand Resize ConvTranspose Max Min Mean Tile DepthToSpace""".split()


def test_rule_table_covers_the_heads_of_common_architectures():
    assert set(REQUIRED_OPS) <= set(RULES), sorted(set(REQUIRED_OPS) - set(RULES))
