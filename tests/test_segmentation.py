"""Segmentation models: per-pixel class scores [N, classes, H, W].

A class's score is the sum of its logits over the pixels it is predicted at. The oracle is
analytic: with a 1x1 convolution from the layer to the logits, the gradient of that score at
the layer is the class's weight times the region's mask, so Grad-CAM and HiResCAM can be written
down from the layer's activation (onnx's reference evaluator) and the region.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcam import Explainer
from onnxcam.explain.regions import PixelClasses
from onnxcam.graph.rewrite import build_gradient_model
from tests.cli_helpers import run
from tests.test_explainer import _init, reference_tensors, save_model

SIZE = 16
CLASSES = 3


def build_segmenter(seed: int = 0, classes: int = CLASSES, sigmoid: bool = False,
                    bias=None, channels_last: bool = False) -> onnx.ModelProto:
    """x [1,3,16,16] -> Conv 3x3 (c1) -> Relu (a1) -> Conv 3x3 (c2) -> Relu (a2) -> Conv 1x1
    (logits [N, classes, 16, 16]) [-> Sigmoid]. ``channels_last``: as tf2onnx exports a Keras
    U-Net, x [1,16,16,3] is transposed in, and the scores out ([N, 16, 16, classes])."""
    rng = np.random.default_rng(seed)
    inits = [_init("W1", rng.normal(0, 0.5, (6, 3, 3, 3))), _init("B1", rng.normal(0, 0.1, 6)),
             _init("W2", rng.normal(0, 0.4, (5, 6, 3, 3))), _init("B2", rng.normal(0.1, 0.1, 5)),
             _init("W3", rng.normal(0, 0.6, (classes, 5, 1, 1))),
             _init("B3", rng.normal(0, 0.2, classes) if bias is None else bias)]
    first = "x"
    nodes = []
    if channels_last:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
        first = "x_nchw"
    nodes += [helper.make_node("Conv", [first, "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Conv", ["a1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["a2"]),
             helper.make_node("Conv", ["a2", "W3", "B3"], ["logits"])]
    out = "logits"
    if channels_last:
        nodes.append(helper.make_node("Transpose", ["logits"], ["scores"], perm=[0, 2, 3, 1]))
        out = "scores"
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", [out], ["probs"]))
        out = "probs"
    image, scores = ([1, SIZE, SIZE, 3], [1, SIZE, SIZE, classes]) if channels_last else \
        ([1, 3, SIZE, SIZE], [1, classes, SIZE, SIZE])
    graph = helper.make_graph(nodes, "segmenter", [helper.make_tensor_value_info("x", TensorProto.FLOAT, image)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, scores)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def inputs(count: int, seed: int = 0, channels_last: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, 1, (count, 3, SIZE, SIZE)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if channels_last else x


def oracle(model: onnx.ModelProto, x: np.ndarray, classes: list[int]):
    """Per image: (a2, the class's region, d score / d a2) from the reference evaluator."""
    a2, logits = reference_tensors(model, x, ["a2", "logits"])
    w3 = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W3"))[:, :, 0, 0]
    rows = []
    for i, cls in enumerate(classes):
        region = np.argmax(logits[i], axis=0) == cls if logits.shape[1] > 1 else logits[i, 0] > 0
        where = region if region.any() else np.ones_like(region)
        gradient = w3[cls][:, None, None] * where[None].astype(np.float64)
        rows.append((a2[i].astype(np.float64), region, gradient, logits[i]))
    return rows


@pytest.mark.parametrize("channels_last", [False, True])
def test_per_pixel_scores_make_a_segmentation_model(channels_last):
    gm = build_gradient_model(build_segmenter(channels_last=channels_last))
    assert gm.class_grid == (SIZE, SIZE) and gm.num_classes == CLASSES
    assert gm.class_axis == (3 if channels_last else 1)
    assert gm.layer == "a2"  # the last layer before the class scores, not the scores themselves
    assert gm.seed_shape[1:] == (CLASSES * SIZE * SIZE,)


@pytest.mark.parametrize("targets, channels_last", [(None, False), (1, False), (None, True), (2, True)])
def test_grad_cam_and_hirescam_differentiate_the_region_score(targets, channels_last):
    model = build_segmenter(channels_last=channels_last)
    x = inputs(3, channels_last=channels_last)
    explainer = Explainer(model, cache=False)
    results = explainer.compare(x, methods=("gradcam", "hirescam"), targets=targets)
    _, logits = reference_tensors(model, x, ["a2", "logits"])
    if targets is None:  # the class that owns the most pixels
        chosen = [int(np.bincount(np.argmax(row, axis=0).ravel(), minlength=CLASSES).argmax()) for row in logits]
    else:
        chosen = [targets] * len(x)
    for i, (activation, region, gradient, row_logits) in enumerate(oracle(model, x, chosen)):
        gradcam, hirescam = results["gradcam"][i], results["hirescam"][i]
        assert gradcam.class_index == chosen[i]
        weights = gradient.mean(axis=(1, 2))
        np.testing.assert_allclose(gradcam.raw_map, np.maximum((weights[:, None, None] * activation).sum(0), 0),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(hirescam.raw_map, np.maximum((gradient * activation).sum(0), 0),
                                   rtol=1e-4, atol=1e-5)
        where = region if region.any() else np.ones_like(region)
        assert gradcam.score == pytest.approx(float(row_logits[chosen[i]][where].sum()), rel=1e-5)
        probabilities = np.exp(row_logits - row_logits.max(0)) / np.exp(row_logits - row_logits.max(0)).sum(0)
        assert gradcam.probability == pytest.approx(float(probabilities[chosen[i]][where].mean()), rel=1e-5)
        assert gradcam.to_dict()["region_fraction"] == pytest.approx(region.mean(), abs=1e-6)


def test_a_class_that_owns_no_pixel_is_scored_over_the_whole_image():
    model = build_segmenter(bias=[20.0, -20.0, 0.0])  # class 0 wins everywhere
    x = inputs(1)
    explanation = Explainer(model, cache=False).explain(x, method="gradcam", targets=1)[0]
    ((activation, region, gradient, _),) = oracle(model, x, [1])
    assert not region.any() and explanation.to_dict()["region_fraction"] == 0
    weights = gradient.mean(axis=(1, 2))
    np.testing.assert_allclose(explanation.raw_map, np.maximum((weights[:, None, None] * activation).sum(0), 0),
                               rtol=1e-4, atol=1e-5)


def test_the_predicted_targets_pass_over_a_background_class():
    model = build_segmenter(bias=[1.5, 0.0, 0.0])  # background owns most pixels, not all
    x = inputs(2)
    _, logits = reference_tensors(model, x, ["a2", "logits"])
    counts = [np.bincount(np.argmax(row, axis=0).ravel(), minlength=CLASSES) for row in logits]
    assert all(c.argmax() == 0 and c[1:].sum() > 0 for c in counts)
    explainer = Explainer(model, cache=False, labels=["background", "road", "car"])
    top = explainer.explain(x, method="gradcam", top_k=3)
    for i, c in enumerate(counts):
        got = [e.class_index for e in top[3 * i:3 * i + 3]]
        assert got[0] == 1 + int(np.argmax(c[1:])) and got[-1] == 0  # background last
    # without the label, the largest region comes first
    assert Explainer(model, cache=False).explain(x, method="gradcam")[0].class_index == 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_sigmoid_model_scores_the_pixels_above_one_half(channels_last):
    """A binary mask: [N, 1, H, W], or a Keras U-Net's [N, H, W, 1]."""
    model = build_segmenter(classes=1, sigmoid=True, bias=[0.3], channels_last=channels_last)
    x = inputs(2, channels_last=channels_last)
    got = Explainer(model, cache=False).explain(x, method="hirescam")
    for explanation, (activation, region, gradient, row_logits) in zip(got, oracle(model, x, [0, 0])):
        assert 0 < region.mean() < 1
        np.testing.assert_allclose(explanation.raw_map, np.maximum((gradient * activation).sum(0), 0),
                                   rtol=1e-4, atol=1e-5)
        probability = 1 / (1 + np.exp(-row_logits[0][region].astype(np.float64)))
        assert explanation.probability == pytest.approx(probability.mean(), rel=1e-5)


def test_smooth_grad_cam_pp_keeps_the_clean_region_on_every_path():
    """At a non-linear layer the noisy passes run. Whether the noisy batch is made by NumPy or in
    the graph, one class per image or several, each class's map is the same: the seeds are the
    clean image's regions."""
    model = build_segmenter(seed=2)
    x = inputs(2, seed=5)
    options = dict(method="smoothgradcampp", samples=6, layer="a1")
    numpy_noise = Explainer(model, cache=False, noise_in_graph=False)
    top2 = numpy_noise.explain(x, top_k=2, **options)
    for noise_in_graph in (False, True):
        explainer = Explainer(model, cache=False, noise_in_graph=noise_in_graph)
        for explanation in top2:
            one = explainer.explain(x[explanation.image_index:explanation.image_index + 1],
                                    targets=explanation.class_index, **options)[0]
            np.testing.assert_allclose(one.raw_map, explanation.raw_map, rtol=1e-4, atol=1e-6)
    assert not top2[0].noisy_passes_skipped
    # and the noise is not a no-op here: another seed gives another map
    other = numpy_noise.explain(x[:1], targets=top2[0].class_index, seed=1, **options)[0]
    assert not np.allclose(other.raw_map, top2[0].raw_map)


def test_pixel_classes_order_and_seeds():
    regions = PixelClasses.of(3, (1, 4), "softmax", ["a", "Background", "c"])
    assert regions.background == (1,)
    logits = np.array([[[[2, 0, 0, 0]], [[0, 3, 3, 3]], [[0, 0, 0, 0]]]], np.float32).reshape(1, -1)
    assert regions.top_classes(logits, 3) == [[0, 2, 1]]  # class 2 owns nothing but beats background
    seeds = regions.seeds(logits, [0, 0], [0, 2]).reshape(2, 3, 1, 4)
    assert seeds[0, 0].tolist() == [[1, 0, 0, 0]] and seeds[0, 1:].sum() == 0
    assert seeds[1, 2].tolist() == [[1, 1, 1, 1]] and seeds[1, :2].sum() == 0  # no pixel: all of them
    probabilities, top = regions.predicted(logits)
    assert top.tolist() == [0] and np.array_equal(probabilities, regions.summary(logits)[1])
    softmax = np.exp(regions.planes(logits)[0]) / np.exp(regions.planes(logits)[0]).sum(axis=0)
    assert np.isclose(probabilities[0, 0], softmax[0, 0, 0])  # its one pixel
    assert np.isclose(probabilities[0, 2], softmax[2].mean())  # no pixel: the whole image


def test_the_command_line_says_what_a_segmentation_map_explains(tmp_path):
    path = save_model(build_segmenter(), tmp_path / "seg.onnx")
    shown = run(["inspect", path])
    assert shown.exit_code == 0 and "3 classes per pixel" in shown.output
    image = tmp_path / "x.png"
    from tests.test_explainer import random_png
    random_png(image, size=(16, 16))
    result = run(["explain", path, image, "--out", tmp_path / "out", "--method", "gradcam"])
    assert result.exit_code == 0, result.output
    assert "of the pixels" in result.output


def test_inspect_says_why_the_automatic_layer_is_not_the_class_scores(tmp_path):
    path = save_model(build_segmenter(), tmp_path / "seg.onnx")
    shown = run(["inspect", path])
    assert shown.exit_code == 0, shown.output
    assert "the automatic layer is a2, the last feature map: the later layers have 3 channels, one per class" \
        in shown.output
    assert "token" not in shown.output


def test_a_segmentation_export_with_a_dynamic_size_asks_for_the_size(tmp_path):
    """torch.onnx.export with dynamic height and width: the scores' [N, classes, h, w] are per
    pixel once the size is fixed, so the error asks for --size, not the detectors' --neuron."""
    model = build_segmenter()
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param, dims[2].dim_param, dims[3].dim_param = "n", "h", "w"
    path = save_model(model, tmp_path / "seg.onnx")
    from tests.cli_helpers import assert_one_line_error
    from tests.test_explainer import random_png

    image = random_png(tmp_path / "x.png", size=(20, 20))
    result = run(["explain", path, image, "--out", tmp_path / "out"])
    assert_one_line_error(result, "input size is dynamic", "--size H,W")
    assert "--neuron" not in result.output and not (tmp_path / "out").exists()
    shown = run(["inspect", path])
    assert shown.exit_code == 0 and "(--size H,W)" in shown.output and "--neuron" not in shown.output
    result = run(["explain", path, image, "--out", tmp_path / "out", "--size", "16,16", "--method", "gradcam"])
    assert result.exit_code == 0 and "of the pixels" in result.output, result.output


def test_a_torch_segmenter_that_upsamples_to_the_input_size_matches_autograd():
    """DeepLab's pattern: class scores at 1/2 resolution, upsampled to the input's own size
    (``F.interpolate(size=x.shape[-2:])``: a Resize whose sizes the graph computes)."""
    torch = pytest.importorskip("torch")
    import io

    nn = torch.nn

    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
            self.classifier = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            scores = self.classifier(self.body(x))
            return nn.functional.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)

    torch.manual_seed(0)
    model = Segmenter().eval()
    with torch.no_grad():  # scores that vary over the image, so that the classes share it
        model.classifier.weight.mul_(6)
        model.classifier.bias.zero_()
    buffer = io.BytesIO()
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), buffer, input_names=["input"], output_names=["out"],
                      opset_version=17, dynamo=False, dynamic_axes={"input": {0: "N"}, "out": {0: "N"}})
    x = np.random.default_rng(3).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    results = Explainer(onnx.load_from_string(buffer.getvalue()), cache=False).compare(
        x, methods=("gradcam", "gradcampp"), top_k=2)
    for explanation in results["gradcam"]:
        activation = model.body(torch.from_numpy(x[explanation.image_index:explanation.image_index + 1]))
        activation.retain_grad()
        logits = nn.functional.interpolate(model.classifier(activation), size=(32, 32), mode="bilinear",
                                           align_corners=False)
        cls = explanation.class_index
        region = logits.argmax(dim=1)[0] == cls
        (logits[0, cls] * (region if region.any() else torch.ones_like(region))).sum().backward()
        weights = activation.grad[0].mean(dim=(1, 2))
        want = torch.relu((weights[:, None, None] * activation[0]).sum(0)).detach().numpy()
        np.testing.assert_allclose(explanation.raw_map, want, rtol=1e-4, atol=1e-5 * want.max())
        assert explanation.to_dict()["region_fraction"] == pytest.approx(region.float().mean().item(), abs=1e-6)


def test_evaluate_scores_the_bundled_segmenter_on_the_localization_set():
    """The manifest's class names map onto the segmenter's (after its background), its largest
    regions are the labels, and the maps point into the shapes."""
    import json
    from pathlib import Path

    from onnxcam.evaluation import evaluate, load_dataset

    root = Path(__file__).resolve().parent.parent / "models"
    explainer = Explainer(root / "shapes_segmenter.onnx")
    dataset = load_dataset(root / "localization", labels=explainer.labels, num_classes=explainer.num_classes)
    dataset.samples = dataset.samples[:24]
    manifest = json.loads((root / "localization" / "manifest.json").read_text(encoding="utf-8"))
    assert [s.label for s in dataset.samples] == [entry["label"] + 1 for entry in manifest["images"][:24]]
    result = evaluate(explainer, dataset, methods=["gradcam"], steps=8)
    row = result.row("gradcam")
    assert result.summary["accuracy"] == 1.0
    assert row["pointing_game"] >= 0.95 and row["energy_pointing_game"] > 0.5
    assert row["deletion_auc"] < row["insertion_auc"]


def test_compare_and_check_predict_the_class_explain_picks(tmp_path):
    """The predicted class of a segmentation model is its largest region, background last, and
    its probability the mean over that region: in compare's records and check's prediction."""
    from onnxcam.evaluation.check import load_check_config, run_checks
    from onnxcam.evaluation.compare import compare_models
    from tests.test_explainer import random_png

    model = build_segmenter(bias=[1.5, 0.0, 0.0])
    path = save_model(model, tmp_path / "seg.onnx")
    (tmp_path / "labels.txt").write_text("background\nroad\ncar\n")
    images = [random_png(tmp_path / f"{i}.png", size=(16, 16), seed=i) for i in range(3)]
    explainer = Explainer(path, labels=tmp_path / "labels.txt")
    explained = explainer.explain(images, method="gradcam")
    assert {e.class_index for e in explained} <= {1, 2}  # background owns the most pixels, yet comes last
    from onnxcam.evaluation.predictor import Predictor

    logits = Predictor(explainer).logits(explainer.preprocess(images)).reshape(3, CLASSES, -1)
    assert all(np.bincount(row.argmax(0), minlength=CLASSES).argmax() == 0 for row in logits)
    result = compare_models(path, path, images, method="gradcam",
                            explainers=(explainer, Explainer(path, labels=tmp_path / "labels.txt")))
    for record, explanation in zip(result.images, explained):
        assert record["predicted_a"] == record["predicted_b"] == explanation.class_index
        assert record["probability_a"] == pytest.approx(explanation.probability, rel=1e-5)
        assert record["correlation"] == pytest.approx(1.0)
    entries = "".join(f'[[images]]\npath = "{image.name}"\nclass = {e.class_index}\n\n'
                      for image, e in zip(images, explained))
    (tmp_path / "check.toml").write_text(f'model = "seg.onnx"\nmethod = "gradcam"\nlabels = "labels.txt"\n'
                                         f'[thresholds]\nprediction = true\nmax_average_drop = 100.0\n\n{entries}')
    report = run_checks(load_check_config(tmp_path / "check.toml"))
    assert all(r.passed for r in report.results if r.kind == "prediction")
    assert len([r for r in report.results if r.kind == "prediction"]) == 3


def test_scores_neither_per_class_nor_per_pixel_are_refused_and_explained_as_neurons(tmp_path):
    """A detector's [N, 12, 64] (boxes' values by anchor) flattened would give 'class 676'."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["a"]), helper.make_node("Conv", ["a", "W2"], ["h"]),
             helper.make_node("Reshape", ["h", "shape"], ["out"])]
    inits = [_init("W1", rng.normal(0, 0.5, (8, 3, 3, 3))), _init("W2", rng.normal(0, 0.5, (12, 8, 1, 1))),
             onnx.numpy_helper.from_array(np.array([1, 12, 64], np.int64), "shape")]
    graph = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 12, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = save_model(model, tmp_path / "det.onnx")
    from tests.cli_helpers import assert_one_line_error
    from tests.test_explainer import random_png

    image = random_png(tmp_path / "x.png", size=(16, 16))
    result = run(["explain", path, image, "--out", tmp_path / "out"])
    assert_one_line_error(result, "'out' have shape ['N', 12, 64]", "--score out --neuron INDEX")
    assert not (tmp_path / "out").exists()
    result = run(["explain", path, image, "--out", tmp_path / "out", "--score", "out", "--neuron", "4,10",
                  "--method", "gradcam"])
    assert result.exit_code == 0 and "neuron (4, 10) of out" in result.output


def test_the_overlay_outlines_the_region_the_map_explains():
    from PIL import Image

    from onnxcam.imaging import outline

    region = np.zeros((4, 4), bool)
    region[1:3, 1:3] = True  # a square, stretched over a 40 x 40 picture: rows and columns 10-29
    drawn = np.asarray(outline(Image.new("RGB", (40, 40)), region))
    white = (drawn == 255).all(axis=2)
    square = np.zeros((40, 40), bool)
    square[10:30, 10:30] = True
    border = square & ~np.pad(square, 1)[2:, 1:-1] | square & ~np.pad(square, 1)[:-2, 1:-1] \
        | square & ~np.pad(square, 1)[1:-1, 2:] | square & ~np.pad(square, 1)[1:-1, :-2]
    np.testing.assert_array_equal(white, border)
    # on an explanation: the class's region at the scores' grid, on the image through the footprint
    model = build_segmenter(bias=[1.5, 0.0, 0.0])
    x = inputs(1)
    explanation = Explainer(model, cache=False).explain(x, method="gradcam", targets=0)[0]
    ((_, region, _, _),) = oracle(model, x, [0])
    np.testing.assert_array_equal(explanation.region, region)
    assert 0 < region.mean() < 1 and explanation.region_on_image.shape == (SIZE, SIZE)
    on_image = explanation.region_on_image
    np.testing.assert_array_equal(on_image, region)  # an array input: the map is at the scores' size
    inner = on_image & np.pad(on_image, 1, mode="edge")[2:, 1:-1] & np.pad(on_image, 1, mode="edge")[:-2, 1:-1] \
        & np.pad(on_image, 1, mode="edge")[1:-1, 2:] & np.pad(on_image, 1, mode="edge")[1:-1, :-2]
    white = (np.asarray(explanation.overlay()) == 255).all(axis=2)
    assert white[on_image & ~inner].all() and (on_image & ~inner).any()


@pytest.mark.parametrize("kind", ["segmenter", "classifier"])
def test_a_model_that_outputs_class_indices_is_explained_from_the_scores_behind_its_argmax(kind, tmp_path):
    """Deployed models often end in ArgMax (the label per image or per pixel): the indices have no
    gradient, the scores before them do."""
    from tests.test_explainer import build_cnn

    plain = build_segmenter() if kind == "segmenter" else build_cnn(softmax=True)
    indexed = onnx.ModelProto()
    indexed.CopyFrom(plain)
    scores = indexed.graph.output[0].name
    indexed.graph.node.append(helper.make_node("ArgMax", [scores], ["argmax"], axis=1, keepdims=0))
    indexed.graph.node.append(helper.make_node("Cast", ["argmax"], ["labels"], to=TensorProto.INT32))
    del indexed.graph.output[:]
    shape = [1, SIZE, SIZE] if kind == "segmenter" else [1]
    indexed.graph.output.append(helper.make_tensor_value_info("labels", TensorProto.INT32, shape))
    x = inputs(2) if kind == "segmenter" else np.random.default_rng(0).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    want = Explainer(plain, cache=False).explain(x, method="gradcampp")
    got = Explainer(indexed, cache=False).explain(x, method="gradcampp")
    for a, b in zip(got, want):
        assert a.class_index == b.class_index and a.layer == b.layer
        np.testing.assert_allclose(a.raw_map, b.raw_map, rtol=1e-5, atol=1e-7)
        assert a.probability == pytest.approx(b.probability, rel=1e-6)
    path = save_model(indexed, tmp_path / "indexed.onnx")
    assert "the scores the output's ArgMax picks from" in run(["inspect", path]).output


def test_the_bundled_shapes_segmenter_explains_the_shapes_it_paints():
    """models/shapes_segmenter.onnx (scripts/train_shapes_segmenter.py) on the 120 images of the
    localization set: the largest non-background region is the image's class, and each method's
    map peaks inside one of its instances' boxes (120, 119 and 119 of 120 when it was trained)."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "models"
    manifest = json.loads((root / "localization" / "manifest.json").read_text(encoding="utf-8"))
    explainer = Explainer(root / "shapes_segmenter.onnx")
    assert explainer.gradient_model.class_grid == (96, 96) and explainer.labels[0] == "background"
    paths = [root / "localization" / entry["image"] for entry in manifest["images"]]
    results = explainer.compare(paths, methods=("gradcam", "gradcampp", "smoothgradcampp"))
    for method, explanations in results.items():
        hits = 0
        for explanation, entry in zip(explanations, manifest["images"]):
            assert explanation.class_index == entry["label"] + 1, (method, entry["image"])
            y, x = np.unravel_index(np.argmax(explanation.map), explanation.map.shape)
            hits += any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in entry["boxes"])
        assert hits >= 114, (method, hits)


@pytest.mark.parametrize("axis", [-1, 1])
def test_the_axis_of_a_softmax_over_square_scores_says_where_the_classes_are(axis):
    """[N, 16, 16, 16] scores of a 16x16 image read alike either way; the Softmax's axis decides."""
    model = build_segmenter(classes=SIZE, channels_last=axis == -1)
    output = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Softmax", [output], ["probs"], axis=axis))
    model.graph.output[0].name = "probs"
    gm = build_gradient_model(model)
    assert gm.class_axis == (3 if axis == -1 else 1) and gm.num_classes == SIZE and gm.class_grid == (SIZE, SIZE)
