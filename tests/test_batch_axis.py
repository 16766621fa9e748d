"""Following the batch through models exported at a batch of 1 (``onnxcam.graph.batch_axis``).

Each model hard-codes its batch of 1 the way an exporter does. The property that matters: the
rewritten model gives, for a run of 3 inputs, the logits of the original model run on each input
alone, and each input's own single-run gradient; and its gradient matches finite differences.
Where the batch cannot be followed, the node is named and nothing is claimed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.graph import batch_axis, prepare, rewrite
from onnxcam.graph.rewrite import GRADIENT, LOGITS, SEED, build_gradient_model
from tests.gradcheck import check_gradient, together_and_alone

RNG = np.random.default_rng(11)
CLASSES = 5


def _model(nodes, inits, channels=8, size=4) -> onnx.ModelProto:
    """conv (x -> c) -> ``nodes`` (c -> body) -> GAP -> Flatten -> Gemm: logits."""
    weights = {"conv_w": RNG.standard_normal((channels, 3, 3, 3)) * 0.3,
               "fc_w": RNG.standard_normal((CLASSES, channels)) * 0.3}
    head = [helper.make_node("GlobalAveragePool", ["body"], ["gap"], name="gap"),
            helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="flatten"),
            helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1, name="fc")]
    conv = helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1], name="conv")
    initializers = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()]
    initializers += [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    graph = helper.make_graph([conv, *nodes, *head], "batch_of_one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _shape(values) -> np.ndarray:
    return np.array(values, np.int64)


def windows_model() -> onnx.ModelProto:
    """Swin's window attention: NHWC, 2x2 windows of a 4x4 map (the batch folded into the 4
    windows), a per-window mask added with the batch split back out, windows merged."""
    nodes = [
        helper.make_node("Transpose", ["c"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "grid"], ["grid6"]),                     # [1, 2, 2, 2, 2, 8]
        helper.make_node("Transpose", ["grid6"], ["grouped"], perm=[0, 1, 3, 2, 4, 5]),
        helper.make_node("Reshape", ["grouped", "windows"], ["w"]),                    # [4, 4, 8]
        helper.make_node("MatMul", ["w", "mix"], ["mixed"]),
        helper.make_node("Reshape", ["mixed", "per_image"], ["split"]),               # [1, 4, 4, 8]
        helper.make_node("Add", ["split", "mask"], ["masked"]),
        helper.make_node("Reshape", ["masked", "merged_windows"], ["merged"]),         # [-1, 4, 8]
        helper.make_node("Reshape", ["merged", "grid"], ["back6"]),
        helper.make_node("Transpose", ["back6"], ["back"], perm=[0, 1, 3, 2, 4, 5]),
        helper.make_node("Reshape", ["back", "map"], ["map_nhwc"]),                   # [1, 4, 4, 8]
        helper.make_node("Transpose", ["map_nhwc"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Relu", ["t"], ["body"], name="window_relu"),
    ]
    inits = {"grid": _shape([1, 2, 2, 2, 2, 8]), "windows": _shape([4, 4, 8]), "per_image": _shape([1, 4, 4, 8]),
             "merged_windows": _shape([-1, 4, 8]), "map": _shape([1, 4, 4, 8]),
             "mix": (RNG.standard_normal((8, 8)) * 0.3).astype(np.float32),
             "mask": RNG.standard_normal((1, 4, 4, 1)).astype(np.float32)}
    return _model(nodes, inits)


def heads_model() -> onnx.ModelProto:
    """torch's MultiheadAttention: tokens first, the batch in dim 1, folded into the 2 heads, then
    behind the tokens (16 x N rows) for the output projection."""
    nodes = [
        helper.make_node("Reshape", ["c", "tokens_shape"], ["tokens"]),               # [1, 8, 16]
        helper.make_node("Transpose", ["tokens"], ["lne"], perm=[2, 0, 1]),            # (16, N, 8)
        helper.make_node("MatMul", ["lne", "proj"], ["q"]),
        helper.make_node("Reshape", ["q", "heads_shape"], ["heads"]),                  # [16, 2, 4]
        helper.make_node("Transpose", ["heads"], ["per_head"], perm=[1, 0, 2]),        # (2N, 16, 4)
        helper.make_node("Softmax", ["per_head"], ["attention"], axis=-1),
        helper.make_node("Transpose", ["attention"], ["back"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["back", "lne_shape"], ["joined"]),                # [16, 1, 8]
        helper.make_node("Reshape", ["joined", "rows_shape"], ["rows"]),               # [16, 8]: 16 x N rows
        helper.make_node("MatMul", ["rows", "out_proj"], ["projected"]),
        helper.make_node("Reshape", ["projected", "lne_shape"], ["tokens_out"]),       # [16, 1, 8]
        helper.make_node("Transpose", ["tokens_out"], ["nel"], perm=[1, 2, 0]),        # (N, 8, 16)
        helper.make_node("Reshape", ["nel", "map_shape"], ["body"], name="to_map"),    # [1, 8, 4, 4]
    ]
    inits = {"tokens_shape": _shape([1, 8, 16]), "heads_shape": _shape([16, 2, 4]), "lne_shape": _shape([16, 1, 8]),
             "rows_shape": _shape([16, 8]), "map_shape": _shape([1, 8, 4, 4]),
             "proj": (RNG.standard_normal((8, 8)) * 0.3).astype(np.float32),
             "out_proj": (RNG.standard_normal((8, 8)) * 0.3).astype(np.float32)}
    return _model(nodes, inits)


def class_token_model() -> onnx.ModelProto:
    """ViT's class token: a constant (1, 1, C) token concatenated before the image's tokens,
    which the exporter wrote for a batch of 1; here every token then gets the sequence's mean."""
    nodes = [
        helper.make_node("Reshape", ["c", "tokens_shape"], ["tokens"]),                # [1, 8, 16]
        helper.make_node("Transpose", ["tokens"], ["nlc"], perm=[0, 2, 1]),             # (N, 16, 8)
        helper.make_node("Concat", ["class_token", "nlc"], ["sequence"], axis=1, name="cls_concat"),
        helper.make_node("ReduceMean", ["sequence"], ["summary"], axes=[1], keepdims=1),
        helper.make_node("Slice", ["sequence", "one", "end", "one"], ["patches"]),
        helper.make_node("Add", ["patches", "summary"], ["mixed"]),
        helper.make_node("Transpose", ["mixed"], ["ncl"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["ncl", "map_shape"], ["body"]),                    # [1, 8, 4, 4]
    ]
    inits = {"tokens_shape": _shape([1, 8, 16]), "map_shape": _shape([1, 8, 4, 4]), "one": _shape([1]),
             "end": _shape([17]), "class_token": RNG.standard_normal((1, 1, 8)).astype(np.float32)}
    return _model(nodes, inits)


def _logits_alone(model, x) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


def _assert_batches_like_single_runs(model, layer: str = "c") -> None:
    gm = build_gradient_model(model, layer=layer)
    assert gm.batch_built_in is None
    x = RNG.standard_normal((3, 3, 4, 4)).astype(np.float32)
    seed = RNG.standard_normal((3, CLASSES)).astype(np.float32)
    (logits, gradient), (_, alone) = together_and_alone(gm, x, seed, (LOGITS, GRADIENT))
    np.testing.assert_allclose(logits, _logits_alone(model, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gradient, alone, rtol=1e-5, atol=1e-7)
    check_gradient(model, x, layer=layer)


@pytest.mark.parametrize("build", [windows_model, heads_model, class_token_model])
def test_a_batch_of_one_folded_into_other_dims_is_followed(build):
    _assert_batches_like_single_runs(build())


def test_a_wrong_reading_of_the_batch_is_caught_by_a_run_of_two_images(monkeypatch):
    """With the batch put in the last possible dim of every constant Reshape, the heads model's
    softmax would mix the images: the run of two images that checks every reading catches it,
    and the model runs one row at a time, naming the first node read that way."""
    def last_place(before, out_shape, axis):
        return batch_axis.Batch(len(out_shape) - 1, 1)

    monkeypatch.setattr(batch_axis, "batch_place", last_place)
    gm = build_gradient_model(heads_model(), layer="c")
    assert gm.batch_built_in is not None
    monkeypatch.setattr(rewrite, "batch_is_consistent", lambda *args: True)
    with pytest.raises(AssertionError):  # unchecked, the same reading would pass as batch-free
        _assert_batches_like_single_runs(heads_model())


def _with_batch_mean(model: onnx.ModelProto) -> onnx.ModelProto:
    """Subtract the batch's mean (a training-mode normalisation): fine alone, mixes a batch."""
    relu = next(node for node in model.graph.node if node.name == "window_relu")
    relu.output[0] = "pre"
    position = list(model.graph.node).index(relu) + 1
    model.graph.node.insert(position, helper.make_node("ReduceMean", ["pre"], ["batch_mean"], axes=[0],
                                                       keepdims=1, name="batch_mean"))
    model.graph.node.insert(position + 1, helper.make_node("Sub", ["pre", "batch_mean"], ["centred"]))
    model.graph.node.insert(position + 2, helper.make_node("Add", ["centred", "pre"], ["body"]))
    return model


def test_a_batch_that_cannot_be_followed_names_the_node():
    gm = build_gradient_model(_with_batch_mean(windows_model()))
    assert gm.batch_built_in == "batch_mean"


def test_a_leading_one_is_followed_without_static_sizes():
    """With a dynamic image size there are no per-image sizes: a Reshape to [1, 8, -1] (the
    classic exporter's view(1, C, -1)) still follows the batch."""
    nodes = [helper.make_node("Reshape", ["c", "rows_shape"], ["rows"]),
             helper.make_node("ReduceMean", ["rows"], ["mean"], axes=[2], keepdims=1),
             helper.make_node("Unsqueeze", ["mean", "last"], ["body"])]
    model = _model(nodes, {"rows_shape": _shape([1, 8, -1]), "last": _shape([3])})
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    gm = build_gradient_model(model, layer="c")
    assert gm.batch_built_in is None
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((3, 3, 6, 5)).astype(np.float32)
    logits = session.run([LOGITS], {"x": x, SEED: np.zeros((3, CLASSES), np.float32)})[0]
    np.testing.assert_allclose(logits, _logits_alone(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("before_windows, built_in", [(True, "cumsum"), (False, None)])
def test_an_op_it_does_not_know_is_decided_by_a_run_of_two_images(before_windows, built_in):
    """After an op batch_axis does not know (CumSum, before the layer, so it needs no gradient
    rule), the batch's place is unknown: the windows' constants after it stay as exported, and a
    run of two images tells whether the model batches (it does not, and the CumSum is named) or
    it still does (a CumSum after the windows)."""
    model = windows_model()
    where = "nhwc" if before_windows else "t"
    consumer = next(node for node in model.graph.node if where in node.input)
    consumer.input[list(consumer.input).index(where)] = "summed"
    model.graph.initializer.append(numpy_helper.from_array(_shape(-1), "last_axis"))
    producer = next(node for node in model.graph.node if where in node.output)
    model.graph.node.insert(list(model.graph.node).index(producer) + 1,
                            helper.make_node("CumSum", [where, "last_axis"], ["summed"], name="cumsum"))
    gm = build_gradient_model(model, layer="body")
    assert gm.batch_built_in == built_in
    if built_in is None:
        _assert_batches_like_single_runs(model, layer="body")


@pytest.mark.parametrize("first_run, budget", [(prepare.FIRST_RUN, prepare.MEASURE_BYTES), (2, 1)])
def test_pads_computed_at_run_time_are_decided_by_a_run_of_two_images(first_run, budget, monkeypatch):
    """Hugging Face's Swin pads each map to a whole number of windows with pads computed from its
    Shape, then rolls it (a Concat of two Slices): the pads' values are unknown until the model
    runs, so a run decides (it batches; they were once taken for a pad of the batch's dim), and
    the padded sizes, which the Concat's gradient needs, are told from the batch's by one run of
    two images."""
    nodes = [helper.make_node("Shape", ["c"], ["c_shape"]),
             helper.make_node("Sub", ["c_shape", "c_shape"], ["zeros"]),
             helper.make_node("Concat", ["zeros", "zeros"], ["no_pads"], axis=0),
             helper.make_node("Add", ["no_pads", "window_pads"], ["pads"]),
             helper.make_node("Pad", ["c", "pads"], ["padded"], name="window_pad"),
             helper.make_node("Slice", ["padded", "zero", "two", "last"], ["front"]),
             helper.make_node("Slice", ["padded", "two", "end", "last"], ["back"]),
             helper.make_node("Concat", ["back", "front"], ["rolled"], axis=3),
             helper.make_node("Relu", ["rolled"], ["body"])]
    model = _model(nodes, {"window_pads": _shape([0, 0, 0, 0, 0, 0, 1, 1]), "zero": _shape([0]),
                           "two": _shape([2]), "end": _shape([99]), "last": _shape([3])})
    monkeypatch.setattr(prepare, "FIRST_RUN", first_run)  # the sizes are measured a few tensors a run
    monkeypatch.setattr(prepare, "MEASURE_BYTES", budget)
    assert build_gradient_model(model, layer="c").batch_built_in is None
    _assert_batches_like_single_runs(model)


def chunk_model() -> onnx.ModelProto:
    """torch's chunk under the classic exporter with a dynamic batch: Slices of the channels
    whose bounds come from Shape (ShuffleNet's channel split, MaxViT's qkv)."""
    nodes = [helper.make_node("Shape", ["c"], ["c_shape"]),
             helper.make_node("Gather", ["c_shape", "one"], ["channels"]),
             helper.make_node("Div", ["channels", "two"], ["half"]),
             helper.make_node("Slice", ["c", "zero", "half", "one"], ["first"], name="chunk_first"),
             helper.make_node("Slice", ["c", "half", "end", "one"], ["second"], name="chunk_second"),
             helper.make_node("Concat", ["second", "first"], ["body"], axis=1)]
    return _model(nodes, {"zero": _shape([0]), "one": _shape([1]), "two": _shape([2]), "end": _shape([99])})


def normalised_windows_model() -> onnx.ModelProto:
    """dynamo's F.normalize on windows (Swin V2's cosine attention): the norm is expanded to the
    windows' shape, a constant with the batch of 1 folded into its 4 windows."""
    nodes = [helper.make_node("Reshape", ["c", "windows"], ["w"]),                   # [4, 8, 2, 2]
             helper.make_node("ReduceL2", ["w"], ["norm"], axes=[1], keepdims=1),
             helper.make_node("Expand", ["norm", "windows"], ["spread"], name="expand_norm"),
             helper.make_node("Div", ["w", "spread"], ["unit"]),
             helper.make_node("Reshape", ["unit", "map"], ["body"])]
    return _model(nodes, {"windows": _shape([4, 8, 2, 2]),
                          "map": _shape([1, 8, 4, 4])})


def einsum_model() -> onnx.ModelProto:
    """dynamo's attention written as Einsum (MaxViT): tokens against tokens, then back."""
    nodes = [helper.make_node("Reshape", ["c", "tokens_shape"], ["t"]),              # [1, 8, 16]
             helper.make_node("Einsum", ["t", "t"], ["scores"], equation="bcl,bdl->bcd"),
             helper.make_node("Softmax", ["scores"], ["weights"], axis=-1),
             helper.make_node("Einsum", ["weights", "t"], ["mixed"], equation="b c d, b d l -> b c l"),
             helper.make_node("Reshape", ["mixed", "map"], ["body"])]
    return _model(nodes, {"tokens_shape": _shape([1, 8, 16]), "map": _shape([1, 8, 4, 4])})


@pytest.mark.parametrize("build", [chunk_model, normalised_windows_model, einsum_model])
def test_chunks_folded_expands_and_einsums_keep_the_batch(build):
    """Each once made onnxcam run the model one row at a time (the batch lost at a Slice with
    computed bounds, at an Expand to a constant with the batch folded in, at an Einsum)."""
    _assert_batches_like_single_runs(build())


def test_sizes_of_an_upsampling_with_the_batch_of_one_written_in_follow_the_batch():
    """Dynamo's segmentation export: the class scores upsampled to constant sizes [1, 3, 8, 8]."""
    inits = [numpy_helper.from_array((RNG.standard_normal((4, 3, 3, 3)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array((RNG.standard_normal((3, 4, 1, 1)) * 0.6).astype(np.float32), "w2"),
             numpy_helper.from_array(_shape([1, 3, 8, 8]), "sizes")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["scores"]),
             helper.make_node("Resize", ["scores", "", "", "sizes"], ["logits"], mode="linear")]
    graph = helper.make_graph(nodes, "segmenter_at_batch_one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    gm = build_gradient_model(model)
    assert gm.batch_built_in is None and gm.class_grid == (8, 8) and gm.layer == "a"
    x = RNG.standard_normal((3, 3, 8, 8)).astype(np.float32)
    seed = RNG.standard_normal((3, 3 * 8 * 8)).astype(np.float32)
    together, alone = together_and_alone(gm, x, seed, outputs=(GRADIENT, LOGITS))
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    check_gradient(model, x, layer="a")
