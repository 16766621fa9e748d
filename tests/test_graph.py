"""Model preparation, location of logits and layers, the rewriter's contract, and its errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.errors import LayerError, ModelError, OnnxCamError, UnsupportedOperatorError
from onnxcam.graph.locate import find_logits, layer_layout, token_grid
from onnxcam.graph.prepare import OPSET_FLOOR, load_model, model_opset, prepare_model
from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, SEED, build_gradient_model
from tests.gradcheck import check_gradient, together_and_alone

RNG = np.random.default_rng(5)


def _w(name, *shape):
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def small_cnn(head_ops=(), opset=17, softmax=True, batch=1, reshape_batch_one=False):
    """conv -> relu -> conv -> relu -> [head_ops] -> GAP -> flatten/reshape -> gemm -> [softmax]."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2")]
    last = "r2"
    for i, op in enumerate(head_ops):
        nodes.append(helper.make_node(op, [last], [f"h{i}"], name=f"head_{op.lower()}"))
        last = f"h{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [last], ["gap"], name="gap"))
    if reshape_batch_one:
        nodes.append(helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"], name="flatten"))
    else:
        nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"))
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], axis=1, name="softmax"))
        out = "prob"
    inits = [_w("w1", 4, 3, 3, 3), _w("w2", 6, 4, 3, 3), _w("fc_w", 5, 6), _w("fc_b", 5),
             numpy_helper.from_array(np.array([1, 6], np.int64), "flat_shape")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def test_logits_are_found_behind_softmax_and_reshapes():
    graph = gs.import_onnx(prepare_model(small_cnn()))
    assert find_logits(graph).name == "logits"
    graph = gs.import_onnx(prepare_model(small_cnn(softmax=False)))
    assert find_logits(graph).name == "logits"


def test_candidates_and_automatic_layer():
    gm = build_gradient_model(small_cnn())
    names = [c.tensor for c in gm.candidates]
    assert names == ["c1", "r1", "c2", "r2"]
    assert gm.layer == "r2"
    assert gm.path_is_linear  # GAP -> Flatten -> Gemm


def test_an_omitted_optional_input_is_no_way_around_a_layer():
    """A Clip with its min left out (an input named "") after the layers: the layers before it
    still lie on every path to the logits."""
    model = small_cnn()
    clip = helper.make_node("Clip", ["r2", "", "six"], ["clipped"], name="clip")
    model.graph.initializer.append(numpy_helper.from_array(np.array(6.0, np.float32), "six"))
    gap = next(node for node in model.graph.node if node.name == "gap")
    gap.input[0] = "clipped"
    model.graph.node.insert(list(model.graph.node).index(gap), clip)
    assert [c.tensor for c in build_gradient_model(model).candidates] == ["c1", "r1", "c2", "r2", "clipped"]


def test_layer_by_node_name_and_tensor_name():
    assert build_gradient_model(small_cnn(), layer="conv2").layer == "c2"
    assert build_gradient_model(small_cnn(), layer="r1").layer == "r1"


def test_unknown_layer_lists_nearest_names():
    with pytest.raises(LayerError, match=r"no layer named 'relu3'.*relu"):
        build_gradient_model(small_cnn(), layer="relu3")


def test_unsupported_operator_names_op_and_node_and_later_layers():
    model = small_cnn(head_ops=["Cos", "Relu"])
    with pytest.raises(UnsupportedOperatorError) as info:
        build_gradient_model(model, layer="r2")
    message = str(info.value)
    assert "Cos" in message and "head_cos" in message and "h1" in message
    assert "\n" not in message
    assert build_gradient_model(model).layer == "h1"  # the automatic choice lies after it


def test_model_without_a_suitable_layer():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [_w("w", 4, 16)])
    with pytest.raises(LayerError, match="no suitable target layer"):
        build_gradient_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage" * 50, b"not onnx at all"])
def test_invalid_model_files(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="bad.onnx"):
        load_model(path)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")


def test_a_second_model_input_is_a_model_error_that_says_what_to_do():
    model = small_cnn()
    conv = model.graph.node[0]
    conv.input[1] = "w1_given"  # the first convolution's weights fed from outside
    weights = next(init for init in model.graph.initializer if init.name == "w1")
    model.graph.input.append(helper.make_tensor_value_info("w1_given", TensorProto.FLOAT,
                                                           list(weights.dims)))
    with pytest.raises(ModelError, match=r"2 inputs \(x, w1_given\).*--input NAME=VALUE"):
        build_gradient_model(model)


def _batched_and_single_runs(model) -> tuple[np.ndarray, np.ndarray]:
    """(gradients of a run of 3 inputs, the same 3 run one at a time) of the rewritten model."""
    gm = build_gradient_model(model)
    x = np.random.default_rng(2).standard_normal([3, 3, 8, 8]).astype(np.float32)
    seed = np.eye(5, dtype=np.float32)[[0, 3, 4]]
    (together,), (alone,) = together_and_alone(gm, x, seed)
    return together, alone


@pytest.mark.parametrize("shape", [[1, 6], [1, -1]])
def test_a_batch_of_one_in_an_allowzero_reshape_is_made_dynamic(shape):
    """torch's dynamo exporter writes Reshape(allowzero=1), where a 0 in the shape is a real 0:
    the batch of 1 becomes -1, or the input's own dim 0 where the shape has a -1 already."""
    model = small_cnn(reshape_batch_one=True)
    reshape = next(node for node in model.graph.node if node.op_type == "Reshape")
    reshape.attribute.append(helper.make_attribute("allowzero", 1))
    flat = next(init for init in model.graph.initializer if init.name == "flat_shape")
    flat.CopyFrom(numpy_helper.from_array(np.array(shape, np.int64), "flat_shape"))
    assert build_gradient_model(model).batch_built_in is None
    together, alone = _batched_and_single_runs(model)
    np.testing.assert_array_equal(together, alone)


def _with_flat_gather(model: onnx.ModelProto, indices: np.ndarray) -> onnx.ModelProto:
    """The dynamo exporter's as_strided view: flatten the whole batch, then Gather ``indices``."""
    reshape = next(node for node in model.graph.node if node.op_type == "Reshape")
    reshape.output[0] = "flat_all"
    flat = next(init for init in model.graph.initializer if init.name == "flat_shape")
    flat.CopyFrom(numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"))
    model.graph.initializer.append(numpy_helper.from_array(indices, "strided"))
    model.graph.node.insert(list(model.graph.node).index(reshape) + 1,
                            helper.make_node("Gather", ["flat_all", "strided"], ["flat"], name="as_strided"))
    return model


@pytest.mark.parametrize("order", [np.arange(6), np.array([1, 0, 3, 2, 5, 4])])
def test_a_gather_from_the_whole_flattened_batch_is_made_per_row(order):
    """Fixed indices of shape (1, ...) into a flattened batch of 1 (an as_strided view) become
    per-row indices, so the model batches: the same gradients as single runs."""
    model = _with_flat_gather(small_cnn(reshape_batch_one=True, softmax=False), order[None].astype(np.int64))
    assert build_gradient_model(model).batch_built_in is None
    together, alone = _batched_and_single_runs(model)
    np.testing.assert_array_equal(together, alone)
    single = np.random.default_rng(3).standard_normal([1, 3, 8, 8]).astype(np.float32)
    check_gradient(model, single)
    gm = build_gradient_model(model)
    rewritten = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(rewritten.run([LOGITS], {"x": single, SEED: np.zeros((1, 5), np.float32)})[0],
                                  plain.run(None, {"x": single})[0])


def test_a_batch_of_one_built_in_elsewhere_is_found_and_named():
    """A batch moved out of dim 0 and then summed over (here by the classifier's Gemm) cannot be
    followed: the node where it is lost is named."""
    model = small_cnn(reshape_batch_one=True)
    flat = next(init for init in model.graph.initializer if init.name == "flat_shape")
    flat.CopyFrom(numpy_helper.from_array(np.array([6, 1], np.int64), "flat_shape"))
    reshape = next(node for node in model.graph.node if node.op_type == "Reshape")
    reshape.output[0] = "heads"
    model.graph.node.insert(list(model.graph.node).index(reshape) + 1,
                            helper.make_node("Transpose", ["heads"], ["flat"], perm=[1, 0], name="heads_first"))
    assert build_gradient_model(model).batch_built_in == "fc"
    assert build_gradient_model(small_cnn(reshape_batch_one=True)).batch_built_in is None


def test_errors_share_one_hierarchy():
    for error in (LayerError, ModelError, UnsupportedOperatorError):
        assert issubclass(error, OnnxCamError)


def test_old_opset_is_upgraded_and_batch_made_dynamic():
    model = small_cnn(opset=11, reshape_batch_one=True)
    prepared = prepare_model(model)
    assert model_opset(prepared) == OPSET_FLOOR
    assert prepared.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    gm = build_gradient_model(model)
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal([4, 3, 8, 8]).astype(np.float32)
    seed = np.eye(5, dtype=np.float32)[[0, 1, 2, 3]]
    prob, activation, gradient, logits = session.run(["prob", ACTIVATION, GRADIENT, LOGITS],
                                                     {"x": x, SEED: seed})
    assert activation.shape == gradient.shape == (4, 6, 8, 8)
    assert logits.shape == (4, 5) and prob.shape == (4, 5)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)


def test_rewritten_model_keeps_original_outputs_and_passes_full_check():
    model = small_cnn()
    gm = build_gradient_model(model)
    onnx.checker.check_model(gm.model, full_check=True)
    assert [i.name for i in gm.model.graph.input] == ["x", SEED]
    assert [o.name for o in gm.model.graph.output] == ["prob", ACTIVATION, GRADIENT, LOGITS]


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_pooling_gradient_is_broadcast_by_the_mask_not_written_out(activation):
    """GAP's backward is a (N, C, 1, 1) gradient expanded to (N, C, h, w); the ReLU / ReLU6 mask
    after it takes the small tensor and broadcasts it (the Expand is gone), read off the
    activation's output, with the same gradient (finite differences)."""
    model = small_cnn()
    if activation == "Clip":
        relu2 = next(n for n in model.graph.node if n.name == "relu2")
        relu2.op_type = "Clip"
        relu2.input.extend(["lo", "hi"])
        model.graph.initializer.extend([numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                                        numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    gm = build_gradient_model(model, layer="c2")
    nodes = gm.model.graph.node
    produced_by = {out: node for node in nodes for out in node.output}
    # the mask is dy * Cast(condition) (ONNX Runtime's CPU Where runs on one thread)
    masks = [n for n in nodes if n.op_type == "Mul"
             and any(produced_by.get(i) is not None and produced_by[i].op_type == "Cast" for i in n.input)]
    assert masks and not any(n.op_type == "Where" for n in nodes)
    assert all(produced_by.get(i) is None or produced_by[i].op_type != "Expand" for n in masks for i in n.input)
    assert not any(n.op_type == "Expand" for n in nodes)
    # the pooling's 1/(h w) is the alpha of the linear head's backward Gemm, not a Mul
    gemms = [n for n in nodes if n.op_type == "Gemm" and n.name.startswith("onnxcam_grad")]
    assert [a.f for n in gemms for a in n.attribute if a.name == "alpha"] == [pytest.approx(1 / 64)]
    # the condition reads the activation's output, so its input (the Conv's output, here also
    # the layer, exposed by an Identity) feeds no gradient node: ONNX Runtime can fuse the Conv
    # with the activation
    relu2 = next(n for n in nodes if n.name == "relu2")
    assert [n.name for n in nodes if relu2.input[0] in n.input] == ["relu2", "onnxcam/onnxcam_activation"]
    check_gradient(model, RNG.standard_normal([2, 3, 8, 8]).astype(np.float32), layer="c2")


def test_gradient_through_softmax_model_is_of_the_logits():
    """The score is the pre-softmax logit: the gradient ignores the Softmax."""
    check_gradient(small_cnn(head_ops=["Sigmoid"]), RNG.standard_normal([2, 3, 8, 8]).astype(np.float32),
                   layer="r1")


def test_neuron_level_score_on_an_intermediate_tensor():
    """The paper's neuron-level CAMs: the score is any tensor, the seed takes its shape."""
    model = small_cnn()
    gm = build_gradient_model(model, layer="r1", score="c2")
    assert gm.seed_shape == ("N", 6, 8, 8) and not gm.is_class_score
    x = RNG.standard_normal([2, 3, 8, 8]).astype(np.float32)
    seed = np.zeros([2, 6, 8, 8], np.float32)
    seed[:, 2, 4, 5] = 1.0  # one neuron: channel 2 at (4, 5)
    check_gradient(model, x, layer="r1", score="c2", seed=seed)


def test_score_that_does_not_depend_on_layer():
    with pytest.raises(LayerError):
        build_gradient_model(small_cnn(), layer="r2", score="c1")


def test_external_data_model_loads(tmp_path):
    model = small_cnn()
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    gm = build_gradient_model(tmp_path / "m.onnx")
    assert gm.layer == "r2"


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    model = small_cnn()
    onnx.save_model(model, inner / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    (inner / "m.data").rename(tmp_path / "outside.data")
    proto = onnx.load(inner / "m.onnx", load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save_model(proto, inner / "m.onnx")
    with pytest.raises(ModelError, match="m.onnx"):
        load_model(inner / "m.onnx")


def test_dynamic_input_size_is_named_as_the_cause():
    model = small_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    with pytest.raises(LayerError, match="input size is dynamic"):
        build_gradient_model(model)


@pytest.mark.parametrize("other_reader", [False, True])
def test_a_scale_goes_into_the_emitted_gemm_only_when_nothing_else_reads_it(other_reader):
    """``Emitter.scaled`` folds a factor into the alpha of a Gemm it made, through a Reshape,
    unless another node reads the Gemm's result (then it would change that node's input)."""
    from onnxcam.gradients.emitter import Emitter

    graph = gs.Graph(opset=17)
    em = Emitter(graph)
    seed = gs.Variable("seed", np.float32, (2, 3))
    product = em.op("Gemm", seed, em.const(np.ones((3, 4))))
    if other_reader:
        em.op("Relu", product)
    reshaped = em.op("Reshape", product, em.ints([2, 4, 1, 1]))
    out = em.scaled(reshaped, 0.25)
    gemm = next(n for n in graph.nodes if n.op == "Gemm")
    if other_reader:
        assert gemm.attrs.get("alpha", 1.0) == 1.0 and out.inputs[0].op == "Mul"
    else:
        assert gemm.attrs["alpha"] == 0.25 and out is reshaped


@pytest.mark.parametrize("shape, size, layout", [
    ((1, 64, 56, 56), (224, 224), "NCHW"), ((1, 56, 56, 64), (224, 224), "NHWC"),
    ((1, 768, 7, 7), (224, 224), "NCHW"), ((1, 7, 7, 768), (224, 224), "NHWC"),
    ((1, 32, 112, 112), (224, 224), "NCHW"), ((1, 28, 40, 64), (224, 320), "NHWC"),
    ((1, 7, 7, 7), (224, 224), "NCHW"), ((1, 7, 7, 768), (None, None), "NCHW"),
])
def test_layer_layout_reads_the_spatial_dims_from_the_image_size(shape, size, layout):
    assert layer_layout(shape, size) == layout


@pytest.mark.parametrize("shape, size, grid", [
    ((1, 197, 768), (224, 224), (1, 14, 14)), ((1, 196, 768), (224, 224), (0, 14, 14)),
    ((1, 198, 384), (224, 224), (2, 14, 14)), ((1, 50, 768), (224, 224), (1, 7, 7)),
    ((1, 193, 64), (192, 256), (1, 12, 16)), ((1, 10, 64), (224, 224), None),
    ((1, 197, 768), (None, None), None), ((1, 768, 7, 7), (224, 224), None),
    ((1, 256, 49), (224, 224), None), ((1, 49, 256), (224, 224), None), ((1, 197, 1024), (224, 224), (1, 14, 14)),
])
def test_vit_tokens_are_found_on_their_patch_grid(shape, size, grid):
    assert token_grid(shape, size) == grid
    assert layer_layout(shape, size) == ("NLC" if grid else "NCHW")
