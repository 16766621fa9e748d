"""Tests for the public API: Explainer / Explanation (onnxcam.explain).

Small CNNs built here with onnx.helper (seeded random weights, input [1, 3, 32, 32]) keep the tests
fast; the bundled EfficientNet-Lite0 is used in two end-to-end tests only. The model builders are
imported by test_runtime.py and test_cli.py too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from PIL import Image

from onnxcam import Explainer, Explanation
from onnxcam.cams import get_method
from onnxcam.errors import ImageError, LayerError, OptionError, TargetError
from onnxcam.explain import noise as noise_module

ROOT = Path(__file__).resolve().parents[1]
EFFICIENTNET = ROOT / "models" / "efficientnet_lite0.onnx"
IMAGES = ROOT / "models" / "images"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.mktemp("onnxcam-cache")
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(folder))
    return folder


# ---------------------------------------------------------------------------------------------
# small models


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def build_cnn(head: str = "linear", seed: int = 0, classes: int = 10, softmax: bool = True,
              residual: bool = False) -> onnx.ModelProto:
    """x [1,3,32,32] -> Conv(8) -> Relu (a1) -> Conv(16) (c2) -> Relu (a2) -> GAP -> Flatten -> head.

    head "linear": Gemm(classes) -- the path from a2 to the logits is linear (Zhou's CAM applies);
    head "mlp": Gemm(12) -> Relu -> Gemm(classes) -- non-linear, so noisy gradients differ.
    softmax: the output is Softmax(logits) ("probs"), else the logits themselves.
    residual: a2 is replaced by s = a1' + a2 with a1' = Conv1x1(a1) (a skip around conv 2).
    """
    rng = np.random.default_rng(seed)
    inits = [
        _init("W1", rng.normal(0, 0.5, (8, 3, 3, 3))), _init("B1", rng.normal(0, 0.1, 8)),
        _init("W2", rng.normal(0, 0.3, (16, 8, 3, 3))), _init("B2", rng.normal(0.05, 0.1, 16)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
    ]
    last = "a2"
    if residual:
        inits.append(_init("Ws", rng.normal(0, 0.3, (16, 8, 1, 1))))
        nodes += [helper.make_node("Conv", ["a1", "Ws"], ["skip"], name="skipconv"),
                  helper.make_node("Add", ["skip", "a2"], ["s"], name="add")]
        last = "s"
    nodes += [helper.make_node("GlobalAveragePool", [last], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1)]
    if head == "linear":
        inits += [_init("W3", rng.normal(0, 0.5, (classes, 16))), _init("B3", rng.normal(0, 0.1, classes))]
        nodes.append(helper.make_node("Gemm", ["f", "W3", "B3"], ["logits"], name="fc", transB=1))
    else:
        inits += [_init("W3", rng.normal(0, 0.5, (12, 16))), _init("B3", rng.normal(0, 0.1, 12)),
                  _init("W4", rng.normal(0, 0.5, (classes, 12))), _init("B4", rng.normal(0, 0.1, classes))]
        nodes += [helper.make_node("Gemm", ["f", "W3", "B3"], ["h"], name="fc1", transB=1),
                  helper.make_node("Relu", ["h"], ["hr"], name="relu_fc"),
                  helper.make_node("Gemm", ["hr", "W4", "B4"], ["logits"], name="fc2", transB=1)]
    output = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1))
        output = "probs"
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, classes])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxcam-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_mlp() -> onnx.ModelProto:
    """An MLP on [N, 16]: no 4-D layer, so nothing to make a CAM from."""
    rng = np.random.default_rng(1)
    inits = [_init("W1", rng.normal(size=(8, 16))), _init("W2", rng.normal(size=(3, 8)))]
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as opened:
        return opened.size


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def random_inputs(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (count, 3, 32, 32)).astype(np.float32)


def random_png(path: Path, size=(48, 40), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def reference_tensors(model: onnx.ModelProto, inputs: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """Intermediate tensors from onnx's own reference evaluator (no onnxruntime involved)."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    for name in names:
        extended.graph.output.append(helper.make_empty_tensor_value_info(name))
    evaluator = ReferenceEvaluator(extended)
    return [np.asarray(v) for v in evaluator.run(names, {"x": inputs})]


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory) -> Path:
    return save_model(build_cnn("linear"), tmp_path_factory.mktemp("models") / "cnn_linear.onnx")


@pytest.fixture(scope="module")
def mlp_head_model(tmp_path_factory) -> Path:
    return save_model(build_cnn("mlp", seed=3), tmp_path_factory.mktemp("models") / "cnn_mlp.onnx")


# ---------------------------------------------------------------------------------------------
# the maths


def test_gradcam_equals_zhou_cam_on_a_gap_linear_head(linear_model):
    """Grad-CAM at the last layer before GAP -> Gemm is Zhou et al.'s CAM, ReLU(sum_k W[c,k] A_k),
    divided by h*w: W is read from the model's initializer, A from onnx's reference evaluator."""
    model = onnx.load(str(linear_model))
    weights = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W3")).astype(np.float64)
    inputs = random_inputs(3, seed=5)
    (activation,) = reference_tensors(model, inputs, ["a2"])
    explainer = Explainer(linear_model, device="cpu", layer="a2")
    assert explainer.path_is_linear
    results = explainer.explain(inputs, method="gradcam", targets=[0, 4, 9])
    assert [r.class_index for r in results] == [0, 4, 9]
    for r, act in zip(results, activation.astype(np.float64)):
        cam = np.maximum(np.einsum("k,khw->hw", weights[r.class_index], act), 0) / (32 * 32)
        assert cam.max() > 0
        np.testing.assert_allclose(r.raw_map, cam, rtol=1e-4, atol=1e-6 * cam.max())
        normalised = (cam - cam.min()) / (cam.max() - cam.min())
        np.testing.assert_allclose(r.map, normalised, atol=1e-4)  # input size == layer size here


def test_feature_maps_restrict_the_sum(linear_model):
    model = onnx.load(str(linear_model))
    weights = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W3")).astype(np.float64)
    inputs = random_inputs(2, seed=6)
    (activation,) = reference_tensors(model, inputs, ["a2"])
    chosen = [1, 5, 9]
    explainer = Explainer(linear_model, device="cpu")
    full = explainer.explain(inputs, method="gradcam", targets=3)
    subset = explainer.explain(inputs, method="gradcam", targets=3, feature_maps=chosen)
    for r, whole, act in zip(subset, full, activation.astype(np.float64)):
        cam = np.maximum(np.einsum("k,khw->hw", weights[3, chosen], act[chosen]), 0) / (32 * 32)
        np.testing.assert_allclose(r.raw_map, cam, rtol=1e-4, atol=1e-6 * max(cam.max(), 1e-12))
        assert not np.allclose(r.raw_map, whole.raw_map)
        assert r.options["feature_maps"] == chosen
    with pytest.raises(TargetError, match="out of range.*16 channels"):
        explainer.explain(inputs, method="gradcam", feature_maps=[3, 16])


def test_smooth_with_zero_noise_equals_gradcampp(mlp_head_model):
    explainer = Explainer(mlp_head_model, layer="a1")
    assert not explainer.path_is_linear
    inputs = random_inputs(2, seed=7)
    plus = explainer.explain(inputs, method="gradcampp")
    smooth = explainer.explain(inputs, method="smoothgradcampp", noise_level=0.0, samples=4)
    noisy = explainer.explain(inputs, method="smoothgradcampp", noise_level=0.3, samples=4)
    for p, s, n in zip(plus, smooth, noisy):
        assert not s.noisy_passes_skipped
        np.testing.assert_allclose(s.raw_map, p.raw_map, rtol=1e-6, atol=1e-7 * p.raw_map.max())
        assert not np.allclose(n.raw_map, p.raw_map, rtol=1e-3)  # the noise does change it


@pytest.mark.parametrize("averaging", ["moments", "maps"])
def test_same_seed_gives_bit_identical_maps_for_any_batch_size(mlp_head_model, averaging):
    """NumPy's noise (noise_in_graph=False): every row's gradient comes back and the moments are
    summed in float64, sample after sample (and the "maps" averaging makes each sample's map on
    its own), so the batch size changes no bit of the map."""
    inputs = random_inputs(3, seed=8)
    maps = []
    for batch in (1, 4, 7, 32):
        explainer = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=batch, noise_in_graph=False)
        maps.append([r.raw_map for r in explainer.explain(inputs, samples=5, seed=11, averaging=averaging)])
    for other in maps[1:]:
        for a, b in zip(maps[0], other):
            assert np.array_equal(a, b)
    again = Explainer(mlp_head_model, device="cpu", layer="a1", noise_in_graph=False).explain(
        inputs, samples=5, seed=11, averaging=averaging)
    assert all(np.array_equal(a, r.raw_map) for a, r in zip(maps[0], again))
    other_seed = Explainer(mlp_head_model, device="cpu", layer="a1", noise_in_graph=False).explain(
        inputs, samples=5, seed=12, averaging=averaging)
    assert not np.array_equal(maps[0][0], other_seed[0].raw_map)


def test_same_seed_gives_the_same_maps_with_the_moments_summed_in_the_graph(mlp_head_model):
    """The CPU's default for Smooth Grad-CAM++ (noise and moment sums in the graph): the same
    seed and batch size give the same map bit for bit; other batch sizes sum the moments in
    other groups (float32 in the graph), which moves the map by rounding only."""
    inputs = random_inputs(3, seed=8)
    reference = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=1, noise_in_graph=False).explain(
        inputs, samples=5, seed=11)
    for batch in (1, 4, 7, 32):
        first = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=batch).explain(inputs, samples=5, seed=11)
        second = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=batch).explain(inputs, samples=5, seed=11)
        for a, b, r in zip(first, second, reference):
            assert np.array_equal(a.raw_map, b.raw_map)
            np.testing.assert_allclose(a.raw_map, r.raw_map, rtol=1e-5, atol=1e-6 * np.abs(r.raw_map).max())
    assert Explainer(mlp_head_model, device="cpu", layer="a1").session.calls == {}
    explainer = Explainer(mlp_head_model, device="cpu", layer="a1")
    explainer.explain(inputs, samples=5, seed=11)
    assert set(explainer.session.calls) == {"noisy_input"}  # the CPU's front: the host bank's rows


def test_noise_of_an_image_does_not_depend_on_the_other_images(mlp_head_model):
    """An image's noise comes from (seed, sample number) alone: the same image gives the same map
    whatever the other images of the call are and wherever it stands among them."""
    inputs = random_inputs(3, seed=9)
    other = inputs.copy()
    other[1:] = random_inputs(2, seed=10)
    explainer = Explainer(mlp_head_model, layer="a1", batch_size=3)
    first = explainer.explain(inputs, samples=4, seed=3)
    second = explainer.explain(other, samples=4, seed=3)
    assert np.array_equal(first[0].raw_map, second[0].raw_map)
    moved = explainer.explain(np.stack([other[2], inputs[0]]), samples=4, seed=3)
    assert np.array_equal(moved[1].raw_map, first[0].raw_map)
    alone = explainer.explain(inputs[1:2], samples=4, seed=3)
    assert np.array_equal(alone[0].raw_map, first[1].raw_map)
    # a different image, or a different seed, gets different noise
    assert not np.array_equal(first[0].raw_map, first[1].raw_map)
    assert not np.array_equal(explainer.explain(inputs[:1], samples=4, seed=4)[0].raw_map, first[0].raw_map)


@pytest.mark.parametrize("averaging", ["moments", "maps"])
def test_noise_made_in_the_graph_gives_the_numpy_paths_maps(mlp_head_model, averaging, monkeypatch):
    """The GPU path (noisy batch made in the graph from bound images and a bound noise bank),
    run here on the CPU, gives the same maps as the NumPy noise, and uploads the bank once."""
    import onnxcam.explain.passes as passes_module
    from onnxcam.runtime.session import FULL, NOISY, NOISY_INPUT

    inputs = random_inputs(3, seed=21)
    numpy_noise = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=4, noise_in_graph=False)
    in_graph = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=4, noise_in_graph=True)
    made = []
    real_stack = passes_module.standard_normal_stack
    monkeypatch.setattr(passes_module, "standard_normal_stack",
                        lambda *a, **k: made.append(a) or real_stack(*a, **k))
    expected = numpy_noise.explain(inputs, samples=5, seed=11, averaging=averaging)
    got = in_graph.explain(inputs, samples=5, seed=11, averaging=averaging)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b.raw_map, a.raw_map, rtol=1e-6, atol=1e-7)
        assert (b.class_index, b.score, b.probability) == pytest.approx((a.class_index, a.score, a.probability))
    if averaging == "moments":  # clean row + 3 noisy rows, then 2 noisy rows, per image
        assert in_graph.session.calls[NOISY_INPUT] == 3 * math.ceil((5 + 1) / 4)
        assert in_graph.session.calls[FULL] == 0
    else:  # the clean pass (scale 0), then the noisy units in batches of 4
        assert in_graph.session.calls[NOISY] == 1 + math.ceil(3 * 5 / 4)
        assert in_graph.session.calls[FULL] == 0
    assert numpy_noise.session.calls[NOISY] == 0
    noise_module.BANK.clear()  # another test may have drawn seed 12
    noise_module.BANK.standard_normals(11, range(5), inputs.shape[1:], np.float32)
    draws = []
    real_generator = noise_module.sample_generator
    monkeypatch.setattr(noise_module, "sample_generator", lambda *a: draws.append(a) or real_generator(*a))
    again = in_graph.explain(inputs[:1], samples=5, seed=11, averaging=averaging)
    np.testing.assert_array_equal(again[0].raw_map, got[0].raw_map)
    # the bank front stays bound between the two calls; the input front (moments on the CPU)
    # adds the process bank's own arrays, never a stacked copy
    assert len(made) == (0 if averaging == "moments" else 1) and draws == []
    in_graph.explain(inputs[:1], samples=5, seed=12, averaging=averaging)
    assert len(made) == (0 if averaging == "moments" else 2)
    assert sorted(draws) == [(12, s) for s in range(5)]


def test_a_bank_over_the_budget_is_bound_a_run_at_a_time(mlp_head_model, monkeypatch):
    """Where n samples would not fit NOISE_BANK_MEMORY, each run binds only its own samples:
    memory bounded by the batch, and the same maps, bit for bit."""
    import onnxcam.explain.passes as passes_module
    from onnxcam.runtime.session import NOISY

    inputs = random_inputs(2, seed=23)
    whole = Explainer(mlp_head_model, layer="a1", batch_size=4).explain(inputs, samples=9, seed=5)
    made = []
    real_stack = passes_module.standard_normal_stack
    monkeypatch.setattr(passes_module, "standard_normal_stack",
                        lambda *a, **k: made.append((a[1], k.get("first", 0))) or real_stack(*a, **k))
    monkeypatch.setattr(passes_module, "NOISE_BANK_MEMORY", 4 * 3 * 32 * 32 * 8)  # 8 samples
    monkeypatch.setattr(Explainer, "_fused_kind", staticmethod(lambda session: NOISY))  # the CUDA path's
    parts = Explainer(mlp_head_model, layer="a1", batch_size=4).explain(inputs, samples=9, seed=5)
    for a, b in zip(whole, parts):
        assert np.array_equal(a.raw_map, b.raw_map) and a.class_index == b.class_index
    # 10 rows per image in runs of 3, 3, 4: the clean row and samples 0-1, then 2-4, then 5-8
    assert made == [(2, 0), (3, 2), (4, 5)] * 2


def test_a_small_noise_bank_keeps_the_maps_and_its_budget(mlp_head_model, monkeypatch):
    """The CPU's input front reads the process's noise bank: one that holds only some of the n
    samples keeps its first ones and draws the others again for each image, within its budget,
    and the maps are the same, bit for bit."""
    import onnxcam.explain.passes as passes_module

    inputs = random_inputs(2, seed=23)
    whole = Explainer(mlp_head_model, layer="a1", batch_size=4).explain(inputs, samples=9, seed=6)
    small = noise_module.NoiseBank(budget=4 * 3 * 32 * 32 * 4)  # 4 samples
    monkeypatch.setattr(passes_module, "BANK", small)
    draws = []
    real_generator = noise_module.sample_generator
    monkeypatch.setattr(noise_module, "sample_generator", lambda *a: draws.append(a) or real_generator(*a))
    parts = Explainer(mlp_head_model, layer="a1", batch_size=4).explain(inputs, samples=9, seed=6)
    for a, b in zip(whole, parts):
        assert np.array_equal(a.raw_map, b.raw_map) and a.class_index == b.class_index
    assert small.nbytes == 4 * 3 * 32 * 32 * 4
    assert sorted(draws) == sorted([(6, s) for s in range(9)] + [(6, s) for s in range(4, 9)])


@pytest.mark.parametrize("targets", [None, [4, 0]])
def test_clean_rows_in_the_noisy_runs_give_the_separate_passes_maps(mlp_head_model, targets):
    """With the noise in the graph, each image's clean row rides in its first noisy run and its
    predicted (or given) class is picked in the graph; Grad-CAM from that clean row and Smooth
    Grad-CAM++ from the moment sums made in the graph match the separate clean and noisy passes,
    for n below and above the batch."""
    from onnxcam.runtime.session import FULL, NOISY_INPUT

    inputs = random_inputs(2, seed=41)
    separate = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=8, noise_in_graph=False)
    together = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=8, noise_in_graph=True)
    for samples in (3, 20):
        expected = separate.compare(inputs, methods=("gradcam", "smoothgradcampp"), targets=targets,
                                    samples=samples, seed=9)
        got = together.compare(inputs, methods=("gradcam", "smoothgradcampp"), targets=targets,
                               samples=samples, seed=9)
        for name in ("gradcam", "smoothgradcampp"):
            for a, b in zip(expected[name], got[name]):
                assert b.class_index == a.class_index
                np.testing.assert_allclose(b.raw_map, a.raw_map, rtol=1e-5, atol=1e-6 * np.abs(a.raw_map).max())
    assert together.session.calls[FULL] == 0
    assert together.session.calls[NOISY_INPUT] == 2 * (1 + math.ceil((20 + 1) / 8))


@pytest.mark.parametrize("samples,budget", [(7, None), (7, 4 * 3 * 32 * 32 * 3)])
def test_the_input_front_and_the_bank_front_give_the_same_sums(mlp_head_model, samples, budget, monkeypatch):
    """The CPU's input front (NumPy makes each run's batch from its rows of the host bank, a zero
    row for the clean row first) and the CUDA's bank front (the bank bound once, rows gathered
    and noised in the graph) make the same noisy inputs, so the same moment sums, bit for bit:
    whole bank, or a bank over its budget taken a run at a time."""
    import onnxcam.explain.passes as passes_module
    from onnxcam.cams.moments import MomentAccumulator
    from onnxcam.runtime.session import NOISY, NOISY_INPUT

    if budget is not None:
        monkeypatch.setattr(passes_module, "NOISE_BANK_MEMORY", budget)
    inputs = random_inputs(2, seed=44)
    session = Explainer(mlp_head_model, layer="a1").session
    results = []
    for input_front in (True, False):
        accumulators = {"smooth": MomentAccumulator(2)}
        clean = passes_module.fused_passes(session, inputs, None, accumulators, samples, 0.2, 3, 3, True,
                                           input_front)
        moments = accumulators["smooth"].result()
        results.append((clean, moments))
    (clean_rows, rows), (clean_bank, bank) = results
    assert clean_rows.pair_class == clean_bank.pair_class
    for a, b in ((clean_rows.activation, clean_bank.activation), (clean_rows.gradient, clean_bank.gradient),
                 (rows.d1, bank.d1), (rows.d2, bank.d2), (rows.d3, bank.d3)):
        assert np.array_equal(a, b)
    assert session.calls[NOISY_INPUT] == session.calls[NOISY] == 2 * math.ceil((samples + 1) / 3)


@pytest.mark.parametrize("front", ["input", "bank"])
@pytest.mark.parametrize("averaging", ["moments", "maps"])
def test_runs_padded_to_one_size_give_the_same_maps(mlp_head_model, front, averaging, monkeypatch):
    """On CUDA (``GradientSession.pads_runs``) a pass's shorter runs are padded with weight-0 rows
    to its longest run's size, so the session does not change shape within a pass. Forced here on
    the CPU: the runs of each pass (told apart by what they fetch) have one size, and the maps,
    classes and scores are those of the unpadded runs."""
    from collections import defaultdict

    from onnxcam.graph import noisy
    from onnxcam.runtime.session import NOISY

    if front == "bank":
        monkeypatch.setattr(Explainer, "_fused_kind", staticmethod(lambda session: NOISY))
    inputs = random_inputs(3, seed=45)
    methods = ("gradcam", "smoothgradcampp")
    # moments: each image's 10 rows in runs of 3, 3, 4; maps: the 3 clean rows in runs of 1, 2,
    # then 15 noisy units in runs of 1, 2, 2, 2, 2, 2, 2, 2
    samples, batch = (9, 4) if averaging == "moments" else (5, 2)
    results, sizes = [], []
    for equal_runs in (False, True):
        explainer = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=batch, noise_in_graph=True)
        explainer.session.equal_runs = equal_runs
        real_run = explainer.session._run_noisy
        run_sizes = defaultdict(set)
        monkeypatch.setattr(explainer.session, "_run_noisy", lambda feeds, outputs, front: (
            run_sizes[tuple(outputs)].add(len(feeds[noisy.WEIGHTS])) or real_run(feeds, outputs, front)))
        results.append(explainer.compare(inputs, methods, samples=samples, seed=4,
                                         method_options={"smoothgradcampp": {"averaging": averaging}}))
        sizes.append(run_sizes)
    assert any(len(found) > 1 for found in sizes[0].values())
    assert all(len(found) == 1 for found in sizes[1].values()) and sizes[1].keys() == sizes[0].keys()
    assert not Explainer(mlp_head_model, device="cpu").session.pads_runs  # the CPU has no shape cost
    for name in methods:
        for a, b in zip(*(result[name] for result in results)):
            assert (b.class_index, b.score, b.probability) == pytest.approx((a.class_index, a.score, a.probability))
            np.testing.assert_allclose(b.raw_map, a.raw_map, rtol=1e-6, atol=1e-7 * np.abs(a.raw_map).max())


@pytest.mark.parametrize("targets", [None, [3, 3, 8]])
def test_clean_pass_in_the_noisy_model_gives_the_whole_models_maps(mlp_head_model, targets):
    """With the noise in the graph (the CUDA path) the clean pass is a run of the noisy model
    with scale 0, each row picking its own top class in the graph (or taking the given one):
    Grad-CAM and Grad-CAM++ match the whole model's, with no other session."""
    from onnxcam.runtime.session import FULL, NOISY

    inputs = random_inputs(3, seed=43) * 0.1  # plus one strong channel each: classes 8, 7, 5
    for row, (channel, value) in enumerate([(0, -5.0), (2, -20.0), (2, 20.0)]):
        inputs[row, channel] += value
    separate = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=2, noise_in_graph=False)
    together = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=2, noise_in_graph=True)
    methods = ("gradcam", "gradcampp")
    expected = separate.compare(inputs, methods=methods, targets=targets)
    got = together.compare(inputs, methods=methods, targets=targets)
    for name in methods:
        for a, b in zip(expected[name], got[name]):
            assert (b.class_index, b.score) == pytest.approx((a.class_index, a.score))
            np.testing.assert_allclose(b.raw_map, a.raw_map, rtol=1e-5, atol=1e-6 * np.abs(a.raw_map).max())
    if targets is None:  # each row picked its own prediction
        assert [e.class_index for e in got["gradcam"]] == [8, 7, 5]
    assert together.session.calls[FULL] == 0 and together.session.calls[NOISY] == 2
    assert together.device == "cpu"


def test_noise_in_graph_is_validated(mlp_head_model):
    with pytest.raises(OptionError, match="noise_in_graph"):
        Explainer(mlp_head_model, noise_in_graph="yes")


@pytest.mark.parametrize("count,samples,batch", [(3, 5, 4), (2, 25, 8), (1, 7, 32), (5, 3, 2)])
@pytest.mark.parametrize("targets", ["given", "predicted"])
@pytest.mark.parametrize("noise_in_graph", [None, False])
def test_clean_and_noisy_rows_take_ceil_rows_over_batch_runs(mlp_head_model, count, samples, batch, targets,
                                                             noise_in_graph):
    """One class per image: each image's clean row rides in the noisy runs, so an image costs
    n + 1 rows. With the noise and the moment sums in the graph (the default) each run holds
    one image's rows: ceil((n + 1) / batch) runs per image; with NumPy's noise the rows of all
    images share the runs: ceil(images * (n + 1) / batch)."""
    explainer = Explainer(mlp_head_model, device="cpu", layer="a1", batch_size=batch, noise_in_graph=noise_in_graph)
    inputs = random_inputs(count, seed=12)
    session = explainer.session
    before = session.run_calls
    explainer.explain(inputs, targets=[1] * count if targets == "given" else None, samples=samples)
    if noise_in_graph is None:
        runs, kind = count * math.ceil((samples + 1) / batch), "noisy_input"
    else:
        runs, kind = math.ceil(count * (samples + 1) / batch), "picking"
    assert session.run_calls - before == runs
    assert dict(session.calls) == {kind: runs}


@pytest.mark.parametrize("count,samples,batch", [(3, 5, 4), (2, 25, 8)])
def test_top_k_noisy_samples_take_ceil_n_times_images_over_batch_runs(mlp_head_model, count, samples, batch):
    """Several classes per image keep separate passes: the forward part and the head for the
    clean images, then one forward per noisy sample and the head per class."""
    explainer = Explainer(mlp_head_model, layer="a1", batch_size=batch)
    inputs = random_inputs(count, seed=12)
    explainer.explain(inputs, top_k=2, samples=samples)
    noisy = math.ceil(samples * count / batch)
    assert explainer.session.calls["forward"] == math.ceil(count / batch) + noisy
    assert "picking" not in explainer.session.calls


@pytest.mark.parametrize("batch", [3, 32])
def test_predicted_class_picked_in_the_graph_gives_the_given_class_maps(mlp_head_model, batch):
    """NumPy's noise: the class the graph picks from the clean row steers the noisy rows of the
    same run; the maps, and Grad-CAM's from the clean rows, are those of the same classes given,
    bit for bit."""
    explainer = Explainer(mlp_head_model, layer="a1", batch_size=batch, noise_in_graph=False)
    inputs = random_inputs(4, seed=31) * 0.1  # a strong channel each: classes 8, 7, 5, 3
    for row, (channel, value) in enumerate([(0, -5.0), (2, -20.0), (2, 20.0), (1, 9.0)]):
        inputs[row, channel] += value
    predicted = explainer.compare(inputs, methods=("gradcam", "smoothgradcampp"), samples=6, seed=2)
    classes = [e.class_index for e in predicted["gradcam"]]
    assert classes == [e.class_index for e in predicted["smoothgradcampp"]]
    assert len(set(classes)) > 1
    given = explainer.compare(inputs, methods=("gradcam", "smoothgradcampp"), targets=classes, samples=6, seed=2)
    alone = Explainer(mlp_head_model, layer="a1").compare(inputs, methods=("gradcam",), targets=classes)
    for name in ("gradcam", "smoothgradcampp"):
        for p, g in zip(predicted[name], given[name]):
            assert np.array_equal(p.raw_map, g.raw_map)
            assert (p.score, p.probability) == (g.score, g.probability)
    for p, a in zip(predicted["gradcam"], alone["gradcam"]):  # the clean rows are the clean pass
        np.testing.assert_allclose(p.raw_map, a.raw_map, rtol=1e-6, atol=1e-7 * np.abs(a.raw_map).max())
    assert set(explainer.session.calls) == {"picking"}


def test_linear_path_skips_the_noisy_passes_exactly(linear_model):
    explainer = Explainer(linear_model, device="cpu", batch_size=4)
    inputs = random_inputs(3, seed=13)
    before = explainer.session.run_calls
    smooth = explainer.explain(inputs, samples=25, targets=[2, 2, 2])
    assert explainer.session.run_calls - before == 1  # the clean pass only
    plus = explainer.explain(inputs, method="gradcampp", targets=[2, 2, 2])
    for s, p in zip(smooth, plus):
        assert s.noisy_passes_skipped and not p.noisy_passes_skipped
        assert np.array_equal(s.raw_map, p.raw_map)
        assert s.to_dict()["noisy_passes_skipped"] is True
    # the 'maps' averaging uses the noisy activations: it cannot be skipped
    maps = explainer.explain(inputs, samples=3, averaging="maps", targets=[2, 2, 2])
    assert not maps[0].noisy_passes_skipped
    assert explainer.session.run_calls - before == 2 + math.ceil(3 * (3 + 1) / 4)  # clean rows ride along


def test_linear_path_shortcut_matches_running_the_noisy_passes(linear_model):
    """The shortcut is exact: the moments of n noisy gradients equal those of the clean one."""
    explainer = Explainer(linear_model)
    inputs = random_inputs(2, seed=14)
    shortcut = explainer.explain(inputs, samples=6, targets=[5, 5])
    gm = explainer.gradient_model
    session = explainer.session
    method = get_method("smoothgradcampp")
    accumulator = method.new_accumulator(2)
    from onnxcam.explain.noise import noisy_batches
    seeds = np.zeros((2, 10), np.float32)
    seeds[:, 5] = 1
    for chunk in noisy_batches(inputs, 6, 0.15, 0, 4):
        activation, gradient, _ = session.run(chunk.inputs, seeds[chunk.rows])
        accumulator.add(chunk.rows, gradient, activation)
    clean_activation, _, _ = session.run(inputs, seeds)
    full = method.compute(clean_activation, accumulator.result())
    assert gm.path_is_linear
    np.testing.assert_allclose(np.stack([r.raw_map for r in shortcut]), full.maps, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# targets, neurons, results


def test_top_k_gives_k_results_per_image_best_first(mlp_head_model):
    explainer = Explainer(mlp_head_model, device="cpu", layer="a2")
    inputs = random_inputs(2, seed=15)
    results = explainer.explain(inputs, method="gradcampp", top_k=3)
    assert len(results) == 6
    session = ort.InferenceSession(str(mlp_head_model), providers=["CPUExecutionProvider"])
    probs = np.concatenate([session.run(None, {"x": inputs[i:i + 1]})[0] for i in range(2)])
    for image in range(2):
        mine = results[3 * image:3 * image + 3]
        assert [r.image_index for r in mine] == [image] * 3
        assert [r.class_index for r in mine] == list(np.argsort(-probs[image])[:3])
        for r in mine:
            assert r.probability == pytest.approx(float(probs[image, r.class_index]), rel=1e-5)
            assert r.label == f"class {r.class_index}"
        assert len({r.raw_map.tobytes() for r in mine}) == 3
    # each class's map is the one explained alone
    alone = explainer.explain(inputs[1:], method="gradcampp", targets=results[4].class_index)
    np.testing.assert_allclose(alone[0].raw_map, results[4].raw_map, rtol=1e-5)


def test_top_k_with_smooth_uses_the_same_noise_for_every_class(mlp_head_model):
    explainer = Explainer(mlp_head_model, layer="a1", batch_size=5)
    inputs = random_inputs(2, seed=16)
    together = explainer.explain(inputs, top_k=2, samples=4)
    for r in together:
        alone = explainer.explain(inputs, targets=[r.class_index, r.class_index], samples=4)[r.image_index]
        np.testing.assert_allclose(r.raw_map, alone.raw_map, rtol=1e-6, atol=1e-9)


NAMES = ["cat", "dog", "Crane", "crane", "bird", "fish", "frog", "horse", "ship", "truck"]


def test_classes_by_name_are_their_labels_indices(mlp_head_model):
    explainer = Explainer(mlp_head_model, labels=NAMES, cache=False)
    x = random_inputs(2)
    by_index = explainer.explain(x, method="gradcam", targets=[[4, 9], 1])
    by_name = explainer.explain(x, method="gradcam", targets=[["bird", " TRUCK "], "1"])
    assert [e.class_index for e in by_name] == [4, 9, 1] == [e.class_index for e in by_index]
    for a, b in zip(by_index, by_name):
        np.testing.assert_array_equal(a.raw_map, b.raw_map)
    assert explainer.explain(x, method="gradcam", targets="Crane")[0].class_index == 2  # exact first
    with pytest.raises(TargetError, match="'CRANE' names classes 2, 3: give the class index"):
        explainer.explain(x, method="gradcam", targets="CRANE")
    with pytest.raises(TargetError, match="'hourse' is not one of the model's 10 labels: did you mean 'horse'"):
        explainer.explain(x, method="gradcam", targets="hourse")
    with pytest.raises(TargetError, match="is a name, but the model has no labels"):
        Explainer(mlp_head_model, cache=False).explain(x, method="gradcam", targets="cat")


def test_targets_are_validated(mlp_head_model):
    explainer = Explainer(mlp_head_model)
    inputs = random_inputs(2)
    with pytest.raises(TargetError, match=r"class index 10 is out of range: the model has 10 classes \(use 0 to 9\)"):
        explainer.explain(inputs, method="gradcam", targets=10)
    with pytest.raises(TargetError, match="3 entries for 2 image"):
        explainer.explain(inputs, method="gradcam", targets=[1, 2, 3])
    with pytest.raises(TargetError, match="top_k 11 is larger"):
        explainer.explain(inputs, method="gradcam", top_k=11)
    with pytest.raises(TargetError, match="neuron= needs a score tensor"):
        explainer.explain(inputs, method="gradcam", neuron=(1, 2, 3))
    with pytest.raises(OptionError, match="unknown method"):
        explainer.explain(inputs, method="scorecam")
    with pytest.raises(OptionError, match="gradcam has no option 'averaging'"):
        explainer.explain(inputs, method="gradcam", averaging="maps")
    with pytest.raises(OptionError, match="samples"):
        explainer.explain(inputs, samples=0)
    with pytest.raises(LayerError, match="nearest names: a2"):
        Explainer(mlp_head_model, layer="a3")
    with pytest.raises(LayerError, match=r"layer 'hr' has shape \['N', 12\], not a map"):
        Explainer(mlp_head_model, layer="hr").explain(inputs, method="gradcam")
    several = explainer.explain(inputs, method="gradcam", targets=[[1, 2], [3]])
    assert [(r.image_index, r.class_index) for r in several] == [(0, 1), (0, 2), (1, 3)]


def test_neuron_level_cam_on_an_intermediate_tensor(linear_model):
    """Score = one element c2[3, 5, 7] of conv 2's output, layer = a1: the gradient is conv 2's
    kernel W2[3] placed around (5, 7), so HiResCAM's map is ReLU(sum_k W2[3,k] * A_k) there, 0
    elsewhere."""
    model = onnx.load(str(linear_model))
    kernel = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W2")).astype(np.float64)
    inputs = random_inputs(2, seed=17)
    (activation,) = reference_tensors(model, inputs, ["a1"])
    explainer = Explainer(linear_model, layer="a1", score="c2")
    assert explainer.score == "c2"
    results = explainer.explain(inputs, method="hirescam", neuron=(3, 5, 7))
    for r, act in zip(results, activation.astype(np.float64)):
        assert r.class_index is None and r.neuron == ((3, 5, 7),) and r.score_tensor == "c2"
        expected = np.zeros((32, 32))
        window = act[:, 4:7, 6:9]
        expected[4:7, 6:9] = np.maximum(np.einsum("kij,kij->ij", kernel[3], window), 0)
        np.testing.assert_allclose(r.raw_map, expected, rtol=1e-4, atol=1e-6)
        assert r.file_stem("img") == "img_hirescam_n3-5-7"
    summed = explainer.explain(inputs[:1], method="hirescam", neuron=[(3, 5, 7), (3, 20, 20)])
    assert not np.array_equal(summed[0].raw_map, results[0].raw_map)
    with pytest.raises(TargetError, match=r"out of range at position 1.*\[16, 32, 32\]"):
        explainer.explain(inputs, method="hirescam", neuron=(3, 32, 0))
    with pytest.raises(TargetError, match="needs 3 whole-number indices"):
        explainer.explain(inputs, method="hirescam", neuron=(3, 5))
    with pytest.raises(TargetError, match="neuron"):
        explainer.explain(inputs, method="hirescam", targets=1)


def test_images_paths_pil_and_nhwc_arrays(linear_model, tmp_path):
    explainer = Explainer(linear_model, device="cpu", preprocess="unit")
    path = random_png(tmp_path / "a.png", size=(48, 40))
    with Image.open(path) as opened:
        picture = opened.convert("RGB")
    from_path, from_pil = explainer.explain([path, picture], method="gradcam")
    assert from_path.map.shape == (40, 48) and from_path.source == str(path)
    assert from_pil.source is None and from_pil.image_index == 1
    np.testing.assert_array_equal(from_path.raw_map, from_pil.raw_map)
    assert from_path.map.dtype == np.float32 and from_path.map.min() == 0 and from_path.map.max() == 1
    batch = explainer.preprocess([path])
    assert batch.shape == (1, 3, 32, 32)
    from_array = explainer.explain(batch.transpose(0, 2, 3, 1), method="gradcam")[0]  # NHWC is accepted
    np.testing.assert_allclose(from_array.raw_map, from_path.raw_map, rtol=1e-6)
    assert from_array.map.shape == (32, 32)
    mixed = explainer.explain([picture, batch[0]], method="gradcam")  # a 3-D array in a list
    np.testing.assert_allclose(mixed[1].raw_map, from_path.raw_map, rtol=1e-6)
    assert mixed[1].image_index == 1 and mixed[1].map.shape == (32, 32)
    assert from_array.overlay().size == (32, 32)
    assert from_path.overlay(alpha=0.3, colormap="jet").size == (48, 40)
    with pytest.raises(ImageError, match="does not match the model input"):
        explainer.explain(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ImageError, match="no such file"):
        explainer.explain([tmp_path / "missing.png"])


def test_groups_of_files_are_decoded_ahead_and_a_bad_file_stops_where_it_is_met(linear_model, tmp_path,
                                                                               monkeypatch):
    """Many images run in groups, the next group decoded while the current one runs: the maps do
    not depend on the grouping, and a broken file raises after the groups before it were given."""
    import onnxcam.explain.explainer as explainer_module

    paths = [random_png(tmp_path / f"{i}.png", seed=i) for i in range(5)]
    explainer = Explainer(linear_model, device="cpu", preprocess="unit", batch_size=2)
    whole = explainer.explain(paths, method="gradcam")
    monkeypatch.setattr(explainer_module, "GROUP_MEMORY", 1)  # one batch per group
    grouped = explainer.explain(paths, method="gradcam")
    assert [r.source for r in grouped] == [str(p) for p in paths]
    assert all(np.array_equal(a.raw_map, b.raw_map) for a, b in zip(whole, grouped))
    (tmp_path / "3.png").write_bytes(b"not a png")
    seen = []
    with pytest.raises(ImageError, match="3.png"):
        for index, _ in explainer.iter_explain(paths, methods=["gradcam"]):
            seen.append(index)
    assert seen == [0, 1]


def test_large_pictures_make_smaller_groups_with_the_same_maps(mlp_head_model, tmp_path, monkeypatch):
    """The pictures of a group stay in memory until their overlays are written: a folder of phone
    photos (36 MB of pixels each) is read a few at a time, whatever the model's batch."""
    import onnxcam.explain.images as images_module

    paths = [random_png(tmp_path / f"{i}.png", size=(40 + i, 30), seed=i) for i in range(5)]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    explainer = Explainer(mlp_head_model, preprocess="unit")
    targets = [3, 1, 4, 1, 5]
    want = explainer.explain(paths, method="smoothgradcampp", targets=targets, samples=4)
    reader = explainer._images
    items = reader.items(paths + [tmp_path / "bad.png"])
    monkeypatch.setattr(images_module, "PICTURE_MEMORY", 3 * 41 * 30 + 3 * 42 * 30)  # room for two of the smaller
    sizes = [len(chunk) for _, chunk, _, _ in reader.groups(items, 8, explainer._preprocessor, np.float32,
                                                             skip_unreadable=True)]
    assert sizes == [2, 1, 1, 2]  # 40 + 41 fit, 42 + 43 do not; the unreadable file counts nothing
    assert [len(chunk) for _, chunk, _, _ in reader.groups(items, 1, explainer._preprocessor, np.float32,
                                                           skip_unreadable=True)] == [1] * 6
    got = explainer.explain(paths, method="smoothgradcampp", targets=targets, samples=4)
    assert [e.class_index for e in got] == targets
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.raw_map, b.raw_map)


def test_files_are_read_on_the_decoding_threads_and_the_first_bad_one_in_order_raises(linear_model, tmp_path,
                                                                                      monkeypatch):
    import threading

    import onnxcam.explain.images as images_module

    paths = [random_png(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    explainer = Explainer(linear_model, preprocess="unit")
    sequential = explainer.explain(paths[:1] + [Image.open(p) for p in paths[1:]], method="gradcam")
    threads = []
    original = images_module.load_image

    def recording_load(path):
        threads.append(threading.current_thread().name)
        return original(path)

    monkeypatch.setattr(images_module, "load_image", recording_load)
    parallel = explainer.explain(paths, method="gradcam")
    assert len(threads) == 4 and all(name.startswith("onnxcam-decode") for name in threads)
    assert all(np.array_equal(a.raw_map, b.raw_map) for a, b in zip(sequential, parallel))
    assert [r.source for r in parallel] == [str(p) for p in paths]
    threads.clear()
    explainer.explain(paths[:1], method="gradcam")  # one file: read where it is needed
    assert threads == [threading.current_thread().name]
    for broken in (1, 3):
        (tmp_path / f"{broken}.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match=r"1\.png"):
        explainer.explain(paths, method="gradcam")


def test_an_overflowing_model_is_a_model_error_naming_the_image(tmp_path):
    """NaN logits would otherwise pick class 0 and explain it; an infinite gradient would give a
    NaN map. Both stop the run with the image named."""
    from onnxcam.errors import ModelError

    model = build_cnn("linear")
    weights = next(init for init in model.graph.initializer if init.name == "W1")
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * np.float32(1e37), "W1"))
    overflowing = save_model(model, tmp_path / "overflow.onnx")
    paths = [random_png(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    with pytest.raises(ModelError, match=r"0\.png: the model's logits hold NaN or \+inf"):
        Explainer(overflowing, preprocess="unit").explain(paths, method="gradcam")

    model = build_cnn("linear", softmax=False)  # class 3 masked out with -inf: a model may do that
    model.graph.output[0].name = "masked"
    model.graph.initializer.append(numpy_helper.from_array(
        np.where(np.arange(10) == 3, -np.inf, 0.0).astype(np.float32)[None], "mask"))
    model.graph.node.append(helper.make_node("Add", ["logits", "mask"], ["masked"]))
    masked = Explainer(save_model(model, tmp_path / "masked.onnx"), preprocess="unit").explain(paths, method="gradcam")
    assert all(r.class_index != 3 and np.isfinite(r.raw_map).all() for r in masked)

    model = build_cnn("linear")  # GAP(Sqrt(a2)): d/da2 is infinite where the ReLU gave 0
    gap = next(node for node in model.graph.node if node.op_type == "GlobalAveragePool")
    gap.input[0] = "root"
    model.graph.node.insert(list(model.graph.node).index(gap), helper.make_node("Sqrt", ["a2"], ["root"]))
    rooted = save_model(model, tmp_path / "sqrt.onnx")
    explainer = Explainer(rooted, layer="a2", preprocess="unit")
    with pytest.raises(ModelError, match=r"0\.png: the gradcam map at layer a2 is not finite.*--layer"):
        explainer.explain(paths, method="gradcam")


def with_batch_built_in(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its features moved away from the batch's mean (2 f - mean), as batch
    statistics export: the identity for one image, a mix of the images for several (a batch of
    1 built in, at 'batch_mean')."""
    flatten = next(node for node in model.graph.node if node.op_type == "Flatten")
    position = list(model.graph.node).index(flatten)
    features = flatten.output[0]
    flatten.output[0] = "features_flat"
    model.graph.node.insert(position + 1, helper.make_node("ReduceMean", ["features_flat"], ["mean"], axes=[0],
                                                           keepdims=1, name="batch_mean"))
    model.graph.node.insert(position + 2, helper.make_node("Sub", ["features_flat", "mean"], ["centred"]))
    model.graph.node.insert(position + 3, helper.make_node("Add", ["centred", "features_flat"], [features]))
    return model


def test_a_model_with_a_batch_of_one_built_in_runs_one_row_at_a_time(tmp_path):
    paths = [random_png(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    plain = Explainer(save_model(build_cnn("mlp"), tmp_path / "plain.onnx"), device="cpu", preprocess="unit")
    fixed_path = save_model(with_batch_built_in(build_cnn("mlp")), tmp_path / "fixed.onnx")
    fixed = Explainer(fixed_path, device="cpu", preprocess="unit")
    assert fixed.gradient_model.batch_built_in == "batch_mean" and fixed.batch_size == 1
    assert plain.gradient_model.batch_built_in is None and plain.batch_size > 1
    for method in ("gradcam", "smoothgradcampp"):
        expected = plain.explain(paths, method=method, samples=5)
        got = fixed.explain(paths, method=method, samples=5)
        assert [r.class_index for r in got] == [r.class_index for r in expected]
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a.raw_map, b.raw_map, rtol=1e-4, atol=1e-6 * np.abs(b.raw_map).max())
    with pytest.raises(OptionError, match=r"batch size 4: the model runs one image at a time .*'batch_mean'"):
        Explainer(fixed_path, device="cpu", preprocess="unit", batch_size=4).explain(paths, method="gradcam")


def test_dynamic_input_size_is_fixed_by_size(tmp_path):
    model = build_cnn("linear")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    path = save_model(model, tmp_path / "dynamic.onnx")
    with pytest.raises(OptionError, match=r"input size is dynamic.*size=\(H, W\)"):
        Explainer(path)
    explainer = Explainer(path, size=(40, 24))
    assert explainer.input_shape[2:] == (40, 24)
    r = explainer.explain([random_png(tmp_path / "p.png", size=(50, 60))], method="gradcam")[0]
    assert r.raw_map.shape == (40, 24) and r.map.shape == (60, 50)
    with pytest.raises(OptionError, match="fixed at 32x32"):
        Explainer(save_model(build_cnn(), tmp_path / "static.onnx"), size=(40, 24))


def test_probability_follows_the_models_softmax(linear_model):
    explainer = Explainer(linear_model)
    inputs = random_inputs(1, seed=18)
    r = explainer.explain(inputs, method="gradcam")[0]
    probs = ort.InferenceSession(str(linear_model), providers=["CPUExecutionProvider"]).run(None, {"x": inputs})[0]
    assert r.class_index == int(np.argmax(probs))
    assert r.probability == pytest.approx(float(probs[0].max()), rel=1e-5)


def test_labels_from_a_file(linear_model, tmp_path):
    names = [f"thing {i}" for i in range(10)]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "labels.json").write_text(json.dumps(names))
    for file in ("labels.txt", "labels.json"):
        r = Explainer(linear_model, labels=tmp_path / file).explain(random_inputs(1), method="gradcam")[0]
        assert r.label == f"thing {r.class_index}"
    (tmp_path / "short.txt").write_text("a\nb\n")
    with pytest.raises(OptionError, match="2 names but the model has 10 classes"):
        Explainer(linear_model, labels=tmp_path / "short.txt")


def test_save_writes_three_files_atomically(linear_model, tmp_path, monkeypatch):
    r = Explainer(linear_model).explain(random_inputs(1, seed=19), method="gradcampp")[0]
    out = tmp_path / "out"
    paths = r.save(out, stem="pic")
    stem = f"pic_gradcampp_c{r.class_index}"
    assert {p.name for p in out.iterdir()} == {f"{stem}.png", f"{stem}.npy", f"{stem}.json"}
    assert paths["overlay"].name == f"{stem}.png"
    np.testing.assert_array_equal(np.load(paths["raw_map"]), r.raw_map)
    record = json.loads(paths["record"].read_text())
    for key in ("model", "layer", "method", "options", "class_index", "label", "score", "probability",
                "flat", "timings", "device"):
        assert key in record, key
    assert record["method"] == "gradcampp" and record["class_index"] == r.class_index
    assert record["device"] in ("cpu", "cuda") and record["layer"] == "a2"
    assert image_size(paths["overlay"]) == (32, 32)
    jpeg = r.save(tmp_path / "jpg", stem="pic", image_format="jpg")["overlay"]
    assert jpeg.name == f"{stem}.jpg" and Image.open(jpeg).format == "JPEG"
    with pytest.raises(OptionError, match="image format 'gif': give one of png, jpg"):
        r.save(tmp_path / "gif", stem="pic", image_format="gif")
    assert not (tmp_path / "gif").exists()

    # a failure while writing leaves neither the files nor temporaries behind
    fresh = tmp_path / "fresh"

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        r.save(fresh, stem="pic")
    assert list(fresh.iterdir()) == []


def test_save_refuses_to_overwrite_its_image(linear_model, tmp_path):
    picture = random_png(tmp_path / "x_gradcam_c0.png")
    explainer = Explainer(linear_model)
    r = explainer.explain([picture], method="gradcam", targets=0)[0]
    before = picture.read_bytes()
    with pytest.raises(OptionError, match="refusing to write"):
        r.save(tmp_path, stem="x")
    assert picture.read_bytes() == before


def test_flat_map_is_zero_not_nan(tmp_path):
    model = build_cnn("linear", seed=2)
    for init in model.graph.initializer:  # W3 = 0: every gradient is zero
        if init.name == "W3":
            init.CopyFrom(_init("W3", np.zeros((10, 16))))
    path = save_model(model, tmp_path / "zero.onnx")
    r = Explainer(path).explain(random_inputs(1), method="gradcampp")[0]
    assert r.flat and not r.raw_map.any() and not r.map.any() and not np.isnan(r.map).any()


def test_compare_shares_the_passes(mlp_head_model):
    explainer = Explainer(mlp_head_model, layer="a1", batch_size=8)
    inputs = random_inputs(2, seed=20)
    before = explainer.session.run_calls
    results = explainer.compare(inputs, samples=3, targets=[0, 1])
    assert set(results) == {"gradcam", "gradcampp", "smoothgradcampp"}
    assert explainer.session.run_calls - before == 2 * math.ceil((3 + 1) / 8)  # clean rows ride along
    single = explainer.explain(inputs, method="gradcam", targets=[0, 1])
    np.testing.assert_array_equal(results["gradcam"][1].raw_map, single[1].raw_map)


def test_explainer_reuses_one_session_per_layer(mlp_head_model):
    explainer = Explainer(mlp_head_model)
    inputs = random_inputs(1)
    explainer.explain(inputs, method="gradcam")
    explainer.explain(inputs, method="gradcam", layer="a1")
    explainer.explain(inputs, method="gradcam", layer="a1")
    explainer.explain(inputs, method="gradcam")
    assert len(explainer._sessions) == 2 and len(explainer._models) == 2


def test_explanation_is_importable_from_the_package():
    import onnxcam

    assert onnxcam.__version__ == "0.1.0"
    assert onnxcam.Explanation is Explanation


@pytest.mark.parametrize("method", ["smoothgradcampp", "gradcam"])
def test_iter_explain_skips_unreadable_files_keeping_each_images_target(tmp_path, method):
    model = save_model(build_cnn("mlp", seed=4), tmp_path / "cnn.onnx")
    paths = [random_png(tmp_path / f"{name}.png", seed=seed) for seed, name in enumerate("abcde")]
    paths[1].write_text("not an image")
    paths[3].write_bytes(paths[0].read_bytes()[:100])
    explainer = Explainer(model, batch_size=2, device="cpu")
    skipped = []
    got = list(explainer.iter_explain(paths, methods=(method,), targets=[1, 2, 3, 4, 5], samples=3,
                                      on_unreadable=lambda index, error: skipped.append((index, str(error)))))
    assert [index for index, _ in got] == [0, 2, 4]
    assert [per_method[method][0].class_index for _, per_method in got] == [1, 3, 5]
    assert [(index, paths[index].name in why) for index, why in skipped] == [(1, True), (3, True)]
    alone = explainer.explain([paths[0], paths[2], paths[4]], method=method, targets=[1, 3, 5], samples=3)
    for (_, per_method), expected in zip(got, alone):
        np.testing.assert_allclose(per_method[method][0].raw_map, expected.raw_map, rtol=1e-5, atol=1e-6)
    with pytest.raises(ImageError, match="b.png"):  # without on_unreadable the first bad file stops it
        list(explainer.iter_explain(paths, methods=(method,), samples=3))


def test_top_classes_best_first_with_ties_to_the_lower_index():
    from onnxcam.explain.targets import top_classes

    logits = np.array([[0.1, 3.0, 3.0, -1.0], [2.0, 2.0, 2.0, 2.0], [np.nan, 1.0, 5.0, 5.0],
                       [-np.inf, -np.inf, -7.0, -np.inf]], dtype=np.float32)
    assert top_classes(logits, 1) == [[1], [0], [2], [2]]
    assert top_classes(logits, 3) == [[1, 2, 0], [0, 1, 2], [2, 3, 1], [2, 0, 1]]
    rng = np.random.default_rng(3)
    many = rng.integers(0, 4, (50, 10)).astype(np.float32)  # many ties
    assert top_classes(many, 1) == [row[:1] for row in top_classes(many, 2)]


# ---------------------------------------------------------------------------------------------
# end to end on the bundled EfficientNet-Lite0 (a few seconds)

CAT_BOX = (60, 20, 380, 300)  # x0, y0, x1, y1 in chelsea.png (451x300): the cat's face, ear to ear


@pytest.mark.slow
def test_efficientnet_cat_and_espresso():
    explainer = Explainer(EFFICIENTNET)
    cat, coffee = explainer.explain([IMAGES / "chelsea.png", IMAGES / "coffee.png"])
    assert 281 <= cat.class_index <= 285, (cat.class_index, cat.label)
    assert "cat" in cat.label or cat.label in ("tabby", "Persian cat", "Siamese cat", "Egyptian cat")
    assert cat.map.shape == (300, 451)
    y, x = np.unravel_index(np.argmax(cat.map), cat.map.shape)
    x0, y0, x1, y1 = CAT_BOX
    assert x0 <= x <= x1 and y0 <= y <= y1, (x, y)
    # most of the map's energy is on the cat, not the blurred background at the right
    assert cat.map[y0:y1, x0:x1].sum() > 0.8 * cat.map.sum()
    assert coffee.class_index == 967 and coffee.label == "espresso"
    assert cat.noisy_passes_skipped  # GAP -> Gemm after the automatic layer: linear path


@pytest.mark.slow
def test_efficientnet_smooth_at_an_earlier_layer_stays_on_the_cat():
    explainer = Explainer(EFFICIENTNET, layer="/_blocks.15/_project_conv/Conv_output_0")
    assert not explainer.path_is_linear
    (cat,) = explainer.explain([IMAGES / "chelsea.png"], samples=8)
    assert not cat.noisy_passes_skipped
    y, x = np.unravel_index(np.argmax(cat.map), cat.map.shape)
    x0, y0, x1, y1 = CAT_BOX
    assert x0 <= x <= x1 and y0 <= y <= y1, (x, y)


def test_the_noisy_models_keep_the_rewritten_models_node_order(mlp_head_model):
    """The new nodes go where their inputs allow; the model's own (forward) nodes keep their order."""
    from onnxcam.graph import noisy

    gm = Explainer(mlp_head_model, layer="a1").gradient_model
    original = [n.name for n in gm.model.graph.node if not n.name.startswith("onnxcam")]
    for model in (noisy.build_noisy_model(gm), noisy.build_noisy_model(gm, front="input"),
                  noisy.build_picking_model(gm)):
        names = [n.name for n in model.graph.node]
        assert [n for n in names if n in set(original)] == original
        produced = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
        for node in model.graph.node:  # and every node still follows its inputs' producers
            assert all(name in produced for name in node.input), node.name
            produced.update(node.output)


def test_the_bound_images_are_refilled_in_place_and_the_callers_arrays_kept(mlp_head_model):
    """The noisy model's images live in one buffer of ONNX Runtime's own, refilled for each call
    and kept bound (rebinding cost ~0.2 ms a run on a GPU host): the next call's maps are those
    of its own images, and the caller's arrays are never written."""
    from onnxcam.graph import noisy
    from onnxcam.runtime.session import NOISY

    first, second = random_inputs(2, seed=41), random_inputs(2, seed=42)
    kept = first.copy(), second.copy()
    explainer = Explainer(mlp_head_model, layer="a1", batch_size=4, noise_in_graph=True)
    explainer.explain(first, samples=3, seed=1, averaging="maps")
    buffer, (binding, _) = explainer.session._bound[noisy.IMAGES], explainer.session._bindings[NOISY]
    got = explainer.explain(second, samples=3, seed=1, averaging="maps")
    assert explainer.session._bound[noisy.IMAGES] is buffer and explainer.session._bindings[NOISY][0] is binding
    fresh = Explainer(mlp_head_model, layer="a1", batch_size=4, noise_in_graph=True).explain(
        second, samples=3, seed=1, averaging="maps")
    for a, b in zip(fresh, got):
        np.testing.assert_array_equal(b.raw_map, a.raw_map)
    np.testing.assert_array_equal(first, kept[0])
    np.testing.assert_array_equal(second, kept[1])


def with_channels_last_stage(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its second conv's output also seen channels last, as Swin's stages and
    tf2onnx's models have them: c2 -> Transpose (c2_nhwc, [N, 32, 32, 16]) -> Transpose back."""
    relu = next(node for node in model.graph.node if node.name == "relu2")
    position = list(model.graph.node).index(relu)
    model.graph.node.insert(position, helper.make_node("Transpose", ["c2"], ["c2_nhwc"], perm=[0, 2, 3, 1]))
    model.graph.node.insert(position + 1, helper.make_node("Transpose", ["c2_nhwc"], ["c2_back"], perm=[0, 3, 1, 2]))
    relu.input[0] = "c2_back"
    return model


def test_a_channels_last_layer_gives_the_maps_of_its_channels_first_twin(tmp_path):
    """A layer read as (N, h, w, K) gives the maps of the same values read as (N, K, h, w), not
    maps 16 wide: the rewritten model returns A and g channels first."""
    paths = [random_png(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    explainer = Explainer(save_model(with_channels_last_stage(build_cnn("mlp")), tmp_path / "nhwc.onnx"),
                          preprocess="unit")
    layouts = {c.tensor: c.layout for c in explainer.gradient_model.candidates}
    assert layouts["c2_nhwc"] == "NHWC" and layouts["c2"] == layouts["c2_back"] == "NCHW"
    for method, top_k in (("gradcam", 2), ("smoothgradcampp", 1)):
        twin = explainer.explain(paths, method=method, top_k=top_k, samples=4, layer="c2")
        got = explainer.explain(paths, method=method, top_k=top_k, samples=4, layer="c2_nhwc")
        assert [r.class_index for r in got] == [r.class_index for r in twin]
        for a, b in zip(got, twin):
            assert a.raw_map.shape == b.raw_map.shape
            np.testing.assert_allclose(a.raw_map, b.raw_map, rtol=1e-5, atol=1e-7 * np.abs(b.raw_map).max())


def uint8_pixel_model() -> onnx.ModelProto:
    """build_cnn behind uint8 NHWC pixels: Cast -> Transpose -> /255, as deployed models take them."""
    model = build_cnn("mlp", seed=3, softmax=False)
    graph = model.graph
    graph.input.remove(graph.input[0])
    graph.input.insert(0, helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 32, 32, 3]))
    front = [helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Div", ["nchw", "c255"], ["x"])]
    graph.initializer.append(numpy_helper.from_array(np.array(255, np.float32), "c255"))
    for i, node in enumerate(front):
        graph.node.insert(i, node)
    return model


def test_an_integer_input_gets_noisy_copies_rounded_and_held_to_its_range(tmp_path, monkeypatch):
    from onnxcam.runtime.session import GradientSession

    fed = []
    as_input = GradientSession._as_input

    def spy(self, values, dtype=None):
        out = as_input(self, values, dtype)
        if out.dtype == np.uint8:
            fed.append((np.array(values, dtype=np.float64), out))
        return out

    monkeypatch.setattr(GradientSession, "_as_input", spy)
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, 16:] = 255  # half black, half white: the noise goes past both ends of uint8
    Image.fromarray(pixels).save(tmp_path / "halves.png")
    path = save_model(uint8_pixel_model(), tmp_path / "u8.onnx")
    result = Explainer(path, layer="a1", cache=False).explain(tmp_path / "halves.png", samples=4, seed=2)
    assert np.isfinite(result[0].raw_map).all()
    noisy = np.concatenate([values.ravel() for values, _ in fed])
    assert noisy.min() < -1 and noisy.max() > 256 and np.any(noisy != np.rint(noisy))
    for values, out in fed:
        np.testing.assert_array_equal(out, np.clip(np.rint(values), 0, 255))


def test_clean_images_for_an_integer_input_are_rounded_and_held_to_its_range(tmp_path):
    """The clean batch takes the same conversion as the noisy ones: black pixels less a mean of
    3.2 are 0, not a wrapped 253 (or 252 truncated); white ones 252 (251.8 rounded)."""
    from onnxcam.runtime.session import as_input_dtype

    np.testing.assert_array_equal(as_input_dtype(np.array([-3.2, 260.7, 100.6, 7.5]), np.uint8), [0, 255, 101, 8])
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, 16:] = 255
    Image.fromarray(pixels).save(tmp_path / "halves.png")
    path = save_model(uint8_pixel_model(), tmp_path / "u8.onnx")
    batch = Explainer(path, layer="a1", cache=False, preprocess="raw", mean=3.2).preprocess([tmp_path / "halves.png"])
    assert batch.dtype == np.uint8 and set(np.unique(batch).tolist()) == {0, 252}


@pytest.mark.parametrize("first", ["embedding", "probs"])
def test_a_model_with_several_outputs_is_explained_from_the_one_named_as_scores(tmp_path, first):
    """An embedding output before the class scores must not be read as 16 'classes'."""
    from tests.cli_helpers import run

    single = build_cnn("mlp", seed=5)
    model = onnx.ModelProto.FromString(single.SerializeToString())
    embedding = helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 16])  # the pooled features
    outputs = [embedding, model.graph.output[0]] if first == "embedding" else [model.graph.output[0], embedding]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    path = save_model(model, tmp_path / "two.onnx")
    x = random_inputs(2)
    got = Explainer(path, cache=False).explain(x, method="smoothgradcampp", samples=4)
    want = Explainer(single, cache=False).explain(x, method="smoothgradcampp", samples=4)
    for a, b in zip(got, want):
        assert a.class_index == b.class_index and a.probability == pytest.approx(b.probability)
        np.testing.assert_array_equal(a.raw_map, b.raw_map)
    shown = run(["inspect", path])
    assert "10 classes" in shown.output and "the class scores are read from 'probs'" in shown.output
    assert ("(its name says so" if first == "embedding" else "(the first;") in shown.output


def _embedding_then_scores() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A CNN, and a copy whose outputs are its 16 pooled features 'f', then its class
    probabilities as 'out1': no name says which holds the class scores."""
    single = build_cnn("mlp", seed=5)
    model = onnx.ModelProto.FromString(single.SerializeToString())
    model.graph.node.append(helper.make_node("Identity", ["probs"], ["out1"]))
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 16]),
                               helper.make_tensor_value_info("out1", TensorProto.FLOAT, [1, 10])])
    return single, model


def test_the_metadata_names_the_score_output_whose_name_does_not_say_so(tmp_path):
    from tests.cli_helpers import assert_one_line_error, run

    single, model = _embedding_then_scores()
    assert Explainer(model, cache=False).num_classes == 16  # no name says which: the first
    onnx.helper.set_model_props(model, {"onnxcam.scores": "out1"})
    path = save_model(model, tmp_path / "named.onnx")
    x = random_inputs(2)
    got = Explainer(path, cache=False).explain(x, method="gradcam")
    want = Explainer(single, cache=False).explain(x, method="gradcam")
    for a, b in zip(got, want):
        assert a.class_index == b.class_index and a.probability == pytest.approx(b.probability)
        np.testing.assert_array_equal(a.raw_map, b.raw_map)
    assert "read from 'out1' (the metadata onnxcam.scores says so" in run(["inspect", path]).output
    onnx.helper.set_model_props(model, {"onnxcam.scores": "nowhere"})
    path = save_model(model, tmp_path / "wrong.onnx")
    result = run(["explain", path, random_png(tmp_path / "a.png"), "--out", tmp_path / "out"])
    assert_one_line_error(result, "onnxcam.scores='nowhere' names no output (its outputs: f, out1)")


def test_scores_output_names_the_class_scores_in_every_command(tmp_path):
    """--scores-output (Python: scores_output=) picks the class-score output of a model whose
    names do not say which, in explain, inspect, rewrite, compare, evaluate and check, and it
    overrides the metadata; without it, explain says which output it read and how to choose."""
    import json

    from tests.cli_helpers import assert_one_line_error, run

    single, model = _embedding_then_scores()
    path = save_model(model, tmp_path / "two.onnx")
    x = random_inputs(2)
    want = Explainer(single, cache=False).explain(x, method="gradcam")
    first = Explainer(path)  # through the cache: the choice must be part of its key
    chosen = Explainer(path, scores_output="out1")
    assert (first.num_classes, chosen.num_classes) == (16, 10)
    for a, b in zip(chosen.explain(x, method="gradcam"), want):
        assert a.class_index == b.class_index and a.probability == pytest.approx(b.probability)
        np.testing.assert_array_equal(a.raw_map, b.raw_map)
    onnx.helper.set_model_props(model, {"onnxcam.scores": "f"})
    assert Explainer(model, scores_output="out1", cache=False).num_classes == 10  # over the metadata

    image = random_png(tmp_path / "a.png")
    plain = run(["explain", path, image, "--out", tmp_path / "plain"])
    assert plain.exit_code == 0
    assert "none is named as class scores: the 16 classes were read from the first, 'f'" in plain.output
    expected = Explainer(single, cache=False).explain([image], method="gradcam")[0]
    assert Explainer(path).explain([image], method="gradcam")[0].class_index != expected.class_index
    named = run(["explain", path, image, "--scores-output", "out1", "--out", tmp_path / "named", "--json"])
    assert named.exit_code == 0, named.output
    record = json.loads(named.output)["images"][0]["results"][0]
    assert (record["class_index"], record["probability"]) == pytest.approx((expected.class_index,
                                                                            expected.probability))
    assert record["scores_output"] == "out1"  # the record says which output it read
    shown = run(["inspect", path, "--scores-output", "out1"])
    assert "10 classes" in shown.output and "read from 'out1' (--scores-output says so)" in shown.output
    written = tmp_path / "rewritten.onnx"
    assert run(["rewrite", path, "-o", written, "--scores-output", "out1"]).exit_code == 0
    logits = [o for o in onnx.load(written).graph.output if o.name == "onnxcam_logits"][0]
    assert logits.type.tensor_type.shape.dim[1].dim_value == 10
    compared = run(["compare", path, path, image, "--scores-output", "out1", "--json"])
    assert compared.exit_code == 0, compared.output
    pair = json.loads(compared.output)["images"][0]
    assert pair["predicted_a"] == pair["predicted_b"] == expected.class_index
    assert_one_line_error(run(["evaluate", path, tmp_path, "--scores-output", "nope", "--out", tmp_path / "e"]),
                          "--scores-output nope")
    config = tmp_path / "check.toml"
    config.write_text(f'model = "{path.name}"\nmethod = "gradcam"\nscores_output = "out1"\n'
                      f'[[images]]\npath = "a.png"\nclass = {expected.class_index}\n')
    assert run(["check", config]).exit_code == 0  # the prediction check: out1's class, not f's
    assert_one_line_error(run(["explain", path, image, "--scores-output", "nope", "--out", tmp_path / "x"]),
                          "--scores-output nope: the model has no output 'nope' (its outputs: f, out1)")
