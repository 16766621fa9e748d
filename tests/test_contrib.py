"""ONNX Runtime's fused operators, rewritten as standard ONNX (``onnxcam.graph.contrib``).

Each decomposition is checked against ONNX Runtime's own kernel for the fused operator (the same
inputs through both graphs), and gradients through the decomposed graph against finite
differences (``tests.gradcheck``). Models that ONNX Runtime optimized and saved explain as the
models they came from did.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import Explainer
from onnxcam.errors import ModelError
from onnxcam.graph.contrib import DECOMPOSITIONS, MICROSOFT, decompose_fused_ops
from onnxcam.graph.prepare import prepare_model
from tests.gradcheck import check_gradient

RNG = np.random.default_rng(0)


def _model(nodes, inputs: dict[str, list], initializers: dict[str, np.ndarray], outputs: list[str],
           output_shape=None, opset: int = 17, dtype=np.float32) -> onnx.ModelProto:
    kind = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes, "fused",
        [helper.make_tensor_value_info(name, kind, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, kind, output_shape) for name in outputs],
        [numpy_helper.from_array(value.astype(dtype), name) for name, value in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MICROSOFT, 1)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _agrees_with_onnxruntime(model: onnx.ModelProto, feeds: dict, rtol: float = 1e-5) -> None:
    want = _run(model, feeds)
    standard = decompose_fused_ops(onnx.ModelProto.FromString(model.SerializeToString()))
    left = [n.op_type for n in standard.graph.node if n.domain or (n.domain, n.op_type) in DECOMPOSITIONS]
    assert not left, f"fused nodes left: {left}"
    got = _run(standard, feeds)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b).max())))


ACTIVATIONS = [(None, []), ("Relu", []), ("Tanh", []), ("Sigmoid", []), ("LeakyRelu", [0.2]),
               ("Clip", [0.0, 6.0]), ("Clip", [-0.5, 0.5]), ("HardSigmoid", [0.3, 0.4])]


def _activation_attrs(kind, params, prefix="activation_params") -> dict:
    attrs = {} if kind is None else {"activation": kind}
    if params and prefix == "activation_params":
        attrs[prefix] = params
    elif params:
        attrs.update(activation_alpha=params[0], **({"activation_beta": params[1]} if len(params) > 1 else {}))
    return attrs


@pytest.mark.parametrize("kind,params", ACTIVATIONS)
@pytest.mark.parametrize("extra", ["bias", "none", "sum"])
def test_fused_conv_is_its_convolution_and_activation(kind, params, extra):
    inputs = ["x", "W"] + {"bias": ["B"], "none": [], "sum": ["B", "z"]}[extra]
    node = helper.make_node("FusedConv", inputs, ["y"], domain=MICROSOFT, pads=[1, 1, 1, 1], strides=[2, 1],
                            **_activation_attrs(kind, params))
    model = _model([node], {"x": [2, 3, 9, 8], **({"z": [2, 4, 5, 8]} if extra == "sum" else {})},
                   {"W": RNG.normal(0, 0.5, (4, 3, 3, 3)), "B": RNG.normal(0, 0.3, 4)}, ["y"])
    feeds = {"x": RNG.normal(0, 1, (2, 3, 9, 8)).astype(np.float32)}
    if extra == "sum":
        feeds["z"] = RNG.normal(0, 1, (2, 4, 5, 8)).astype(np.float32)
    _agrees_with_onnxruntime(model, feeds)


@pytest.mark.parametrize("kind,params", [("Relu", []), ("LeakyRelu", [0.3]), ("Sigmoid", []), ("Tanh", [])])
def test_fused_gemm_is_its_product_and_activation(kind, params):
    node = helper.make_node("FusedGemm", ["a", "B", "C"], ["y"], domain=MICROSOFT, transB=1, alpha=0.7, beta=1.3,
                            **_activation_attrs(kind, params, prefix="alpha"))
    model = _model([node], {"a": [3, 5]}, {"B": RNG.normal(0, 1, (4, 5)), "C": RNG.normal(0, 1, 4)}, ["y"])
    _agrees_with_onnxruntime(model, {"a": RNG.normal(0, 1, (3, 5)).astype(np.float32)})


@pytest.mark.parametrize("op,inputs,attrs", [
    ("Gelu", ["x"], {}), ("BiasGelu", ["x", "b"], {}), ("FastGelu", ["x"], {}), ("FastGelu", ["x", "b"], {}),
    ("QuickGelu", ["x"], {}), ("QuickGelu", ["x"], {"alpha": 1.5}),
])
def test_gelu_and_its_approximations(op, inputs, attrs):
    node = helper.make_node(op, inputs, ["y"], domain=MICROSOFT, **attrs)
    model = _model([node], {"x": [2, 3, 8]}, {"b": RNG.normal(0, 1, 8)} if "b" in inputs else {}, ["y"])
    _agrees_with_onnxruntime(model, {"x": RNG.normal(0, 2, (2, 3, 8)).astype(np.float32)})


@pytest.mark.parametrize("trans_a,trans_b,alpha,b_shape", [
    (0, 0, 0.25, [2, 5, 6]), (0, 1, 1.0, [2, 6, 5]), (1, 0, 0.5, [5, 6]), (1, 1, -2.0, [1, 6, 5]),
])
def test_fused_matmul_is_a_scaled_product_of_transposes(trans_a, trans_b, alpha, b_shape):
    a_shape = [2, 5, 4] if trans_a else [2, 4, 5]
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain=MICROSOFT, transA=trans_a, transB=trans_b,
                            alpha=alpha)
    model = _model([node], {"a": a_shape, "b": b_shape}, {}, ["y"])
    _agrees_with_onnxruntime(model, {"a": RNG.normal(0, 1, a_shape).astype(np.float32),
                                     "b": RNG.normal(0, 1, b_shape).astype(np.float32)})


@pytest.mark.parametrize("bias,beta,sum_out", [(True, True, True), (False, True, False), (False, False, True)])
def test_skip_layer_normalization_is_the_residual_sum_normalized(bias, beta, sum_out):
    inputs = ["x", "s", "gamma", "beta" if beta else "", "bias" if bias else ""]
    outputs = ["y", "", "", "total"] if sum_out else ["y"]
    node = helper.make_node("SkipLayerNormalization", inputs, outputs, domain=MICROSOFT, epsilon=1e-5)
    inits = {"gamma": RNG.normal(1, 0.2, 8), "beta": RNG.normal(0, 0.2, 8), "bias": RNG.normal(0, 0.5, 8)}
    model = _model([node], {"x": [2, 3, 8], "s": [2, 3, 8]}, inits, [o for o in outputs if o])
    feeds = {"x": RNG.normal(0, 1, (2, 3, 8)).astype(np.float32), "s": RNG.normal(0, 1, (2, 3, 8)).astype(np.float32)}
    _agrees_with_onnxruntime(model, feeds)


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean's axes: an attribute, then an input
def test_simplified_layer_normalizations_are_rms_norms(opset):
    skip = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "s", "gamma", "bias"], ["y", "", "", "total"],
                            domain=MICROSOFT, epsilon=1e-5)
    plain = helper.make_node("SimplifiedLayerNormalization", ["total", "gamma"], ["z"], axis=-1, epsilon=1e-4)
    model = _model([skip, plain], {"x": [2, 3, 8], "s": [2, 3, 8]},
                   {"gamma": RNG.normal(1, 0.2, 8), "bias": RNG.normal(0, 0.5, 8)}, ["y", "total", "z"], opset=opset)
    plain.domain = MICROSOFT  # the transformers optimizer writes it in ONNX Runtime's domain
    feeds = {"x": RNG.normal(0, 1, (2, 3, 8)).astype(np.float32), "s": RNG.normal(0, 1, (2, 3, 8)).astype(np.float32)}
    _agrees_with_onnxruntime(model, feeds)


@pytest.mark.parametrize("attrs", [{}, {"scale": 0.2}, {"qkv_hidden_sizes": [8, 8, 12]}])
def test_attention_is_softmax_of_scaled_query_key_products_times_values(attrs):
    sizes = attrs.get("qkv_hidden_sizes", [8, 8, 8])
    node = helper.make_node("Attention", ["x", "W", "b"], ["y"], domain=MICROSOFT, num_heads=2, **attrs)
    model = _model([node], {"x": [2, 5, 6]}, {"W": RNG.normal(0, 0.5, (6, sum(sizes))),
                                              "b": RNG.normal(0, 0.2, sum(sizes))}, ["y"])
    _agrees_with_onnxruntime(model, {"x": RNG.normal(0, 1, (2, 5, 6)).astype(np.float32)})


@pytest.mark.parametrize("form", ["bias", "weights", "scale"])
def test_multi_head_attention_of_separate_query_key_and_value(form):
    """With a bias [3 hidden], the head size from it; without, from the query's weights, or the
    scale given."""
    nodes = [helper.make_node("MatMul", ["x", f"W{t}"], [t]) for t in "qkv"]
    inputs = ["q", "k", "v"] + (["b"] if form == "bias" else [])
    nodes.append(helper.make_node("MultiHeadAttention", inputs, ["y"], domain=MICROSOFT, num_heads=2,
                                  **({"scale": 0.3} if form == "scale" else {})))
    inits = {f"W{t}": RNG.normal(0, 0.5, (6, 8)) for t in "qkv"}
    if form == "bias":
        inits["b"] = RNG.normal(0, 0.2, 24)
    model = _model(nodes, {"x": [2, 5, 6]}, inits, ["y"])
    _agrees_with_onnxruntime(model, {"x": RNG.normal(0, 1, (2, 5, 6)).astype(np.float32)})


@pytest.mark.parametrize("op,inputs,attrs,inits", [
    ("FusedConv", ["x", "W"], {"activation": "Clip", "activation_params": [0.0, 0.5], "pads": [1, 1]},
     {"W": RNG.normal(0, 0.5, (4, 3, 3))}),
    ("Gelu", ["x"], {}, {}), ("FastGelu", ["x"], {}, {}), ("QuickGelu", ["x"], {}, {}),
    ("BiasGelu", ["x", "b"], {}, {"b": RNG.normal(0, 1, 8)}),
    ("SkipLayerNormalization", ["x", "x", "gamma"], {}, {"gamma": RNG.normal(1, 0.2, 8)}),
])  # not Attention: ONNX Runtime's CPU kernel of a float16 one crashes, so there is no reference
def test_float16_fused_nodes_become_float16_standard_ones(op, inputs, attrs, inits):
    """The constants of a decomposition take the node's float type (a float16 model's Clip bounds
    and GELU factors would otherwise not type-check)."""
    shape = [2, 3, 8]
    node = helper.make_node(op, inputs, ["y"], domain=MICROSOFT, **attrs)
    model = _model([node], {"x": shape}, inits, ["y"], dtype=np.float16)
    _agrees_with_onnxruntime(model, {"x": RNG.normal(0, 1, shape).astype(np.float16)}, rtol=2e-3)


@pytest.mark.parametrize("opset,shape", [(21, [2, 6, 3, 4]), (18, [2, 6, 3, 4]), (21, [2, 6, 5])])
def test_onnx_group_normalization_is_normalized_groups_scaled(opset, shape):
    """Scale and bias per channel from opset 21 on, per group before; 1-D and 2-D maps; and its
    gradient through the primitives against finite differences."""
    size = shape[1] if opset >= 21 else 3
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=3, epsilon=1e-3)
    model = _model([node], {"x": shape}, {"s": RNG.normal(1, 0.3, size), "b": RNG.normal(0, 0.5, size)}, ["y"],
                   opset=opset)
    x = RNG.normal(0.5, 2, shape).astype(np.float32)
    _agrees_with_onnxruntime(model, {"x": x})
    check_gradient(model, x, layer="x", score="y")


@pytest.mark.parametrize("axis", [-1, 1])
def test_onnx_rms_normalization_is_a_root_mean_square_norm(axis):
    node = helper.make_node("RMSNormalization", ["x", "s"], ["y"], axis=axis, epsilon=1e-4)
    scale = RNG.normal(1, 0.3, (4, 5) if axis == 1 else 5)
    model = _model([node], {"x": [2, 4, 5]}, {"s": scale}, ["y"], opset=23)
    x = RNG.normal(0, 1, (2, 4, 5)).astype(np.float32)
    _agrees_with_onnxruntime(model, {"x": x})
    check_gradient(model, x, layer="x", score="y")


def _standard_attention(attrs: dict, rank: int = 4, mask=None) -> tuple[onnx.ModelProto, dict]:
    """x -> three MatMuls (Q, K, V) -> ONNX's Attention (opset 23) -> y, as torch's dynamo exporter
    writes scaled_dot_product_attention: [2, heads 2, tokens 5, size 4] (rank 4) or
    [2, 5, 2 * 4] with the head counts as attributes (rank 3)."""
    shapes = {"x": [2, 5, 8]}
    nodes = [helper.make_node("MatMul", ["x", f"W{t}"], [f"{t}3"]) for t in "qkv"]
    inputs = ["q3", "k3", "v3"]
    if rank == "gqa":  # 4 query heads of size 2 against 2 key/value heads of size 2
        nodes += [helper.make_node("Reshape", [f"{t}3", "heads4" if t == "q" else "heads2"], [f"{t}s"])
                  for t in "qkv"]
        nodes += [helper.make_node("Slice", [f"{t}s", "zero", "two", "two"], [f"{t}h"]) for t in "kv"]
        nodes += [helper.make_node("Transpose", [f"{t}{'s' if t == 'q' else 'h'}"], [f"{t}4"], perm=[0, 2, 1, 3])
                  for t in "qkv"]
        inputs = ["q4", "k4", "v4"]
    if rank == 4:
        nodes += [helper.make_node("Reshape", [f"{t}3", "heads"], [f"{t}s"]) for t in "qkv"]
        nodes += [helper.make_node("Transpose", [f"{t}s"], [f"{t}4"], perm=[0, 2, 1, 3]) for t in "qkv"]
        inputs = ["q4", "k4", "v4"]
    feeds = {"x": RNG.normal(0, 1, (2, 5, 8)).astype(np.float32)}
    if mask is not None:
        shapes["mask"] = list(mask.shape)
        inputs.append("mask")
        feeds["mask"] = mask
    nodes.append(helper.make_node("Attention", inputs, ["y"], name="att", **attrs))
    inits = {f"W{t}": RNG.normal(0, 0.5, (8, 8)) for t in "qkv"}
    model = _model(nodes, {"x": shapes["x"]}, inits, ["y"], opset=23)
    model.graph.initializer.extend(numpy_helper.from_array(np.array(values, np.int64), name) for name, values in (
        ("heads", [0, 0, 2, 4]), ("heads4", [0, 0, 4, 2]), ("heads2", [0, 0, 4, 2]), ("zero", [0]), ("two", [2])))
    if mask is not None:
        kind = TensorProto.BOOL if mask.dtype == np.bool_ else TensorProto.FLOAT
        model.graph.input.append(helper.make_tensor_value_info("mask", kind, list(mask.shape)))
    return model, feeds


@pytest.mark.parametrize("attrs,rank,mask", [
    ({}, 4, None), ({"scale": 0.3}, 4, None), ({"q_num_heads": 2, "kv_num_heads": 2}, 3, None),
    ({}, 4, RNG.normal(0, 1, (5, 5)).astype(np.float32)),
    ({}, 4, np.tril(np.ones((5, 5), bool)) | np.eye(5, k=2, dtype=bool)),
    ({"q_num_heads": 2, "kv_num_heads": 2, "scale": 0.5}, 3, np.ones((2, 1, 5, 5), bool) & (RNG.random((5, 5)) > 0.3)
     | np.eye(5, dtype=bool)),
], ids=["4d", "4d-scale", "3d-heads", "4d-float-mask", "4d-bool-mask", "3d-bool-mask-scale"])
def test_onnx_attention_is_softmax_of_scaled_query_key_products_times_values(attrs, rank, mask):
    model, feeds = _standard_attention(attrs, rank, mask)
    _agrees_with_onnxruntime(model, feeds)
    if mask is None:  # and its gradient, through the primitives, against finite differences
        check_gradient(model, feeds["x"], layer="x", score="y")


@pytest.mark.parametrize("attrs,rank,why", [
    ({"is_causal": 1}, 4, "causal masking"), ({"softcap": 2.0}, 4, "soft cap"),
    ({"q_num_heads": 2, "kv_num_heads": 1}, 3, "grouped-query"), ({}, "gqa", "grouped-query"),
])
def test_onnx_attention_that_cannot_be_rewritten_is_a_one_line_model_error(attrs, rank, why):
    model, _ = _standard_attention(attrs, rank)
    with pytest.raises(ModelError, match=rf"node 'att' \(Attention\) has .*{why}.*re-export the model at an "
                                         "opset that writes it as primitive operators") as error:
        decompose_fused_ops(model)
    assert "\n" not in str(error.value)


def test_a_fused_node_that_cannot_be_rewritten_is_a_one_line_model_error():
    node = helper.make_node("Attention", ["x", "W", "b", "mask"], ["y"], domain=MICROSOFT, num_heads=2, name="att")
    model = _model([node], {"x": [2, 5, 6]}, {"W": RNG.normal(0, 0.5, (6, 24)), "b": RNG.normal(0, 0.2, 24)}, ["y"])
    model.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [2]))
    with pytest.raises(ModelError, match=r"node 'att' \(Attention, ONNX Runtime's fused operator\) has a mask"):
        decompose_fused_ops(model)


def _fused_cnn() -> onnx.ModelProto:
    """x -> FusedConv(Relu) -> FusedConv(Clip, + the first's output) -> GlobalAveragePool ->
    Flatten -> FusedGemm(LeakyRelu) -> Gemm: the logits."""
    nodes = [
        helper.make_node("FusedConv", ["x", "W1", "B1"], ["a1"], domain=MICROSOFT, pads=[1, 1, 1, 1],
                         activation="Relu"),
        helper.make_node("FusedConv", ["a1", "W2", "B2", "a1"], ["a2"], domain=MICROSOFT, pads=[1, 1, 1, 1],
                         activation="Clip", activation_params=[0.0, 2.0]),
        helper.make_node("GlobalAveragePool", ["a2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("FusedGemm", ["flat", "W3", "B3"], ["hidden"], domain=MICROSOFT, transB=1,
                         activation="LeakyRelu", activation_alpha=0.1),
        helper.make_node("Gemm", ["hidden", "W4", "B4"], ["logits"], transB=1)]
    inits = {"W1": RNG.normal(0, 0.5, (6, 3, 3, 3)), "B1": RNG.normal(0, 0.1, 6),
             "W2": RNG.normal(0, 0.4, (6, 6, 3, 3)), "B2": RNG.normal(0.2, 0.1, 6),
             "W3": RNG.normal(0, 0.5, (8, 6)), "B3": RNG.normal(0, 0.1, 8),
             "W4": RNG.normal(0, 0.5, (5, 8)), "B4": RNG.normal(0, 0.1, 5)}
    return _model(nodes, {"x": [1, 3, 12, 12]}, inits, ["logits"], output_shape=[1, 5])


def test_gradients_through_fused_operators_match_finite_differences():
    model = _fused_cnn()
    x = RNG.normal(0, 1, (2, 3, 12, 12)).astype(np.float32)
    assert check_gradient(model, x, layer="a1") < 1e-4
    prepared = prepare_model(model)
    assert not [n for n in prepared.graph.node if n.domain]
    assert Explainer(model, cache=False).layer == "a2"  # the fused outputs are candidate layers


@pytest.mark.parametrize("name", ["shapes_cnn", "shapes_segmenter"])
def test_a_model_onnxruntime_optimized_and_saved_explains_as_the_original(name, tmp_path):
    """``optimized_model_filepath`` at the extended level fuses every Conv + Relu into FusedConv."""
    from pathlib import Path

    original = Path(__file__).resolve().parent.parent / "models" / f"{name}.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(original), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert any(node.op_type == "FusedConv" for node in optimized.graph.node)
    image = Path(__file__).resolve().parent.parent / "models" / "localization" / "0001.png"
    want_explainer, got_explainer = Explainer(original, cache=False), Explainer(tmp_path / "optimized.onnx", cache=False)
    assert got_explainer.layer == want_explainer.layer
    for method in ("gradcam", "smoothgradcampp"):
        want = want_explainer.explain(image, method=method, samples=8)[0]
        got = got_explainer.explain(image, method=method, samples=8)[0]
        assert got.class_index == want.class_index
        np.testing.assert_allclose(got.raw_map, want.raw_map, rtol=1e-5, atol=1e-6 * np.abs(want.raw_map).max())


def test_a_node_of_another_domain_never_takes_the_rule_of_its_namesake():
    import onnx_graphsurgeon as gs

    from onnxcam.gradients.backward import unsupported_nodes

    nodes = [helper.make_node("Relu", ["x"], ["y"], domain="com.microsoft.nchwc"), helper.make_node("Relu", ["y"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    imported = gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [node.domain for node in unsupported_nodes(imported.nodes)] == ["com.microsoft.nchwc"]


def test_a_model_saved_in_onnxruntimes_nchwc_layout_is_refused_in_one_line(tmp_path):
    from pathlib import Path

    from tests.cli_helpers import assert_one_line_error, run

    models = Path(__file__).resolve().parent.parent / "models"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "nchwc.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(models / "shapes_cnn.onnx"), options, providers=["CPUExecutionProvider"])
    if not any(node.domain == "com.microsoft.nchwc" for node in onnx.load(str(tmp_path / "nchwc.onnx")).graph.node):
        pytest.skip("ONNX Runtime used no NCHWc operators on this CPU")
    result = run(["explain", tmp_path / "nchwc.onnx", models / "localization" / "0001.png", "--out", tmp_path / "out"])
    assert_one_line_error(result, "NCHWc operators", "ORT_ENABLE_EXTENDED")


def test_a_vit_through_the_transformers_optimizer_explains_as_exported(tmp_path):
    """onnxruntime.transformers' ViT optimizer fuses the blocks' residual sums and layer norms
    (SkipLayerNormalization) and their GELUs (BiasGelu); the automatic layer and the maps stay."""
    torch = pytest.importorskip("torch")
    optimize_model = pytest.importorskip("onnxruntime.transformers.optimizer").optimize_model

    from tests.test_torch_patterns import TinyViT

    torch.manual_seed(0)
    model = TinyViT(width=32).eval()
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), str(tmp_path / "vit.onnx"), input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})
    optimize_model(str(tmp_path / "vit.onnx"), model_type="vit", num_heads=2, hidden_size=32,
                   opt_level=0).save_model_to_file(str(tmp_path / "fused.onnx"))
    fused = {node.op_type for node in onnx.load(str(tmp_path / "fused.onnx")).graph.node if node.domain == MICROSOFT}
    assert {"SkipLayerNormalization", "BiasGelu"} <= fused
    x = RNG.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    want_explainer = Explainer(tmp_path / "vit.onnx", cache=False)
    got_explainer = Explainer(tmp_path / "fused.onnx", cache=False)
    assert got_explainer.layer == want_explainer.layer
    for method in ("gradcam", "smoothgradcampp"):
        for want, got in zip(want_explainer.explain(x, method=method, samples=4),
                             got_explainer.explain(x, method=method, samples=4)):
            assert got.class_index == want.class_index
            np.testing.assert_allclose(got.raw_map, want.raw_map, rtol=1e-4, atol=1e-5 * np.abs(want.raw_map).max())
