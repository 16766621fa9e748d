"""Tests of onnxcam.metrics: each metric on a case worked out by hand, edge cases, batching, errors,
and the committed localization data set and shapes model (skipped where they are absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxcam.errors import DataError, OnnxCamError, OptionError, TargetError
from onnxcam.metrics import (
    average_drop,
    box_mask,
    deletion_insertion,
    energy_pointing_game,
    explanation_map_scores,
    gaussian_blur,
    increase_in_confidence,
    instance_coverage,
    load_manifest,
    pointing_game,
    region_mask,
    scale_boxes,
)

ROOT = Path(__file__).resolve().parents[1]
LOC = ROOT / "models" / "localization"
SHAPES = ROOT / "models" / "shapes_cnn.onnx"


class MeanModel:
    """A fake model with two classes: P(1) = mean of all pixels and channels, P(0) = 1 - P(1).

    Counts its calls and remembers the batch sizes it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.rows: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and x.ndim == 4
        self.calls += 1
        self.rows.append(x.shape[0])
        s = x.reshape(x.shape[0], -1).mean(axis=1).astype(np.float64)
        return np.stack([1.0 - s, s], axis=1)


# ----------------------------------------------------------------------------------------------
# Average Drop and Increase in Confidence


def test_average_drop_and_increase_by_hand():
    # Image A: all ones, class 1 -> Y = mean = 1. Map A = [[1, 0], [0.5, 0.5]] -> E = the map,
    # O = mean(E) = 0.5; drop = (1 - 0.5) / 1 = 0.5, no increase.
    # Image B: all 0.2, class 0 -> Y = 1 - 0.2 = 0.8. Map B = zeros -> E = 0, O = 1 - 0 = 1;
    # drop = max(0, 0.8 - 1) / 0.8 = 0, increase.
    # Average Drop = 100 * (0.5 + 0) / 2 = 25 %; Increase in Confidence = 100 * 1 / 2 = 50 %.
    images = np.stack([np.ones((1, 2, 2)), np.full((1, 2, 2), 0.2)]).astype(np.float32)
    maps = np.array([[[1.0, 0.0], [0.5, 0.5]], np.zeros((2, 2))])
    classes = np.array([1, 0])
    res = explanation_map_scores(MeanModel(), images, maps, classes)
    np.testing.assert_allclose(res.base_probs, [1.0, 0.8], atol=1e-7)
    np.testing.assert_allclose(res.explanation_probs, [0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(res.drops, [0.5, 0.0], atol=1e-7)
    assert res.increased.tolist() == [False, True]
    assert res.average_drop == pytest.approx(25.0)
    assert res.increase_in_confidence == pytest.approx(50.0)
    assert average_drop(MeanModel(), images, maps, classes) == pytest.approx(25.0)
    assert increase_in_confidence(MeanModel(), images, maps, classes) == pytest.approx(50.0)


def test_average_drop_all_ones_map_is_zero_and_zero_prob_counts_zero():
    # A map of ones leaves the image unchanged: O = Y, no drop, no (strict) increase.
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(3, 2, 4, 4)).astype(np.float32)
    res = explanation_map_scores(MeanModel(), images, np.ones((3, 4, 4)), [1, 0, 1])
    assert res.average_drop == pytest.approx(0.0, abs=1e-9)
    assert res.increase_in_confidence == 0.0
    # Y = 0 (all-zero image, class 1): the drop term is 0, not NaN.
    res = explanation_map_scores(MeanModel(), np.zeros((1, 1, 2, 2), np.float32), np.ones((1, 2, 2)), [1])
    assert res.average_drop == 0.0 and not np.isnan(res.average_drop)


def test_explanation_map_scores_batches_the_calls():
    # N = 10, batch_size = 4 -> chunks of 4, 4, 2 images -> 3 calls, each with the chunk's
    # originals and explanation images.
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, size=(10, 3, 5, 5)).astype(np.float32)
    maps = rng.uniform(0, 1, size=(10, 5, 5))
    classes = rng.integers(0, 2, size=10)
    model = MeanModel()
    ref = explanation_map_scores(model, images, maps, classes, batch_size=4)
    assert model.calls == 3
    assert model.rows == [8, 8, 4]
    # With the originals' probabilities given, only the explanation images are sent.
    model2 = MeanModel()
    res = explanation_map_scores(model2, images, maps, classes, batch_size=4, base_probs=ref.base_probs)
    assert model2.calls == 3 and model2.rows == [4, 4, 2]
    assert res.average_drop == pytest.approx(ref.average_drop)
    # The batch size does not change the result.
    res1 = explanation_map_scores(MeanModel(), images, maps, classes, batch_size=1)
    assert res1.average_drop == pytest.approx(ref.average_drop)
    model3 = MeanModel()
    average_drop(model3, images, maps, classes, batch_size=4)
    assert model3.calls == 3


def test_explanation_map_scores_errors():
    model = MeanModel()
    images = np.ones((2, 1, 2, 2), np.float32)
    maps = np.ones((2, 2, 2))
    with pytest.raises(OptionError, match="batch_size"):
        explanation_map_scores(model, images, maps, [0, 1], batch_size=0)
    with pytest.raises(DataError, match="maps"):
        explanation_map_scores(model, images, np.ones((2, 3, 3)), [0, 1])
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        explanation_map_scores(model, images, maps * 2, [0, 1])
    with pytest.raises(DataError, match="images"):
        explanation_map_scores(model, np.ones((2, 2, 2), np.float32), maps, [0, 1])
    with pytest.raises(DataError, match="classes"):
        explanation_map_scores(model, images, maps, [0, 1, 1])
    with pytest.raises(TargetError, match="out of range"):
        explanation_map_scores(model, images, maps, [0, 2])
    with pytest.raises(DataError, match="NaN"):
        explanation_map_scores(model, images, np.full((2, 2, 2), np.nan), [0, 1])
    with pytest.raises(DataError, match="predict returned"):
        explanation_map_scores(lambda x: np.ones(x.shape[0]), images, maps, [0, 1])
    assert issubclass(DataError, OnnxCamError)


# ----------------------------------------------------------------------------------------------
# Deletion and Insertion


def _di_case():
    # One image, two identical channels, flat pixels [0.2, 0.8, 0.4, 0.0] (row-major 2x2).
    # Saliency [0.1, 0.9, 0.5, 0.9]: pixels 1 and 3 tie at 0.9; the stable sort keeps pixel 1
    # first. Ranking: 1, 3, 2, 0.
    px = np.array([[0.2, 0.8], [0.4, 0.0]], np.float32)
    images = np.stack([px, px])[None]  # (1, 2, 2, 2)
    sal = np.array([[[0.1, 0.9], [0.5, 0.9]]])
    return images, sal


def test_deletion_insertion_by_hand():
    images, sal = _di_case()
    res = deletion_insertion(MeanModel(), images, sal, [1], steps=4, insertion_baseline=0.0)
    # Fractions: n_k = floor(k * 4 / 4) = k pixels -> x = 0, .25, .5, .75, 1.
    np.testing.assert_allclose(res.fractions, [0, 0.25, 0.5, 0.75, 1.0])
    # Deletion to zeros: mean 0.35; -pixel 1 (0.8) -> 0.6/4 = 0.15; -pixel 3 (0.0) -> 0.15;
    # -pixel 2 (0.4) -> 0.05; -pixel 0 -> 0.
    np.testing.assert_allclose(res.deletion_curves[0], [0.35, 0.15, 0.15, 0.05, 0.0], atol=1e-7)
    # AUC = 0.25 * ((.35+.15)/2 + (.15+.15)/2 + (.15+.05)/2 + (.05+0)/2) = 0.25 * 0.525
    assert res.deletion_auc == pytest.approx(0.13125)
    # Insertion onto the constant 0: 0; +0.8 -> 0.2; +0.0 -> 0.2; +0.4 -> 0.3; +0.2 -> 0.35.
    np.testing.assert_allclose(res.insertion_curves[0], [0.0, 0.2, 0.2, 0.3, 0.35], atol=1e-7)
    # AUC = 0.25 * (0.1 + 0.2 + 0.25 + 0.325) = 0.21875
    assert res.insertion_auc == pytest.approx(0.21875)
    np.testing.assert_allclose(res.deletion_mean_curve, res.deletion_curves[0])
    np.testing.assert_allclose(res.insertion_aucs, [0.21875])


def test_deletion_baselines_mean_and_constant():
    images, sal = _di_case()
    # "mean": deleted pixels take the per-channel mean 0.35: after pixel 1, (0.2+0.35+0.4+0)/4.
    res = deletion_insertion(MeanModel(), images, sal, [1], steps=4, deletion_baseline="mean", which="deletion")
    np.testing.assert_allclose(res.deletion_curves[0][:2], [0.35, 0.2375], atol=1e-7)
    assert res.deletion_curves[0][-1] == pytest.approx(0.35)
    assert res.insertion_curves is None and res.insertion_auc is None
    # An array baseline (broadcast to the images) works like the constant it holds.
    res_arr = deletion_insertion(MeanModel(), images, sal, [1], steps=4, deletion_baseline=np.zeros((2, 2, 2)))
    np.testing.assert_allclose(res_arr.deletion_curves[0], [0.35, 0.15, 0.15, 0.05, 0.0], atol=1e-7)
    with pytest.raises(OptionError, match=r"shape \(3,\)"):
        deletion_insertion(MeanModel(), images, sal, [1], deletion_baseline=np.zeros(3))
    # Constant 1: the last step is all ones (P(1) = 1).
    res = deletion_insertion(MeanModel(), images, sal, [1], steps=4, deletion_baseline=1.0, which="deletion")
    assert res.deletion_curves[0][-1] == pytest.approx(1.0)
    # Insertion's default "blur": the first point is the blurred image, the last the image.
    res = deletion_insertion(MeanModel(), images, sal, [1], steps=4, which="insertion", blur_sigma=1.0)
    assert res.insertion_curves[0][-1] == pytest.approx(0.35)
    blurred = gaussian_blur(images, 1.0)
    assert res.insertion_curves[0][0] == pytest.approx(float(blurred.mean()), abs=1e-6)


def test_deletion_zero_map_ranks_row_major_and_pixels_per_step():
    # A zero map: every pixel ties, so the order is row-major: pixel 0 (0.2) first, then 1 (0.8).
    images, _ = _di_case()
    res = deletion_insertion(MeanModel(), images, np.zeros((1, 2, 2)), [1], steps=4, which="deletion")
    np.testing.assert_allclose(res.deletion_curves[0], [0.35, 0.3, 0.1, 0.0, 0.0], atol=1e-7)
    # pixels_per_step=3 on 4 pixels: counts 0, 3, 4 -> x = 0, 0.75, 1.
    res = deletion_insertion(MeanModel(), images, np.zeros((1, 2, 2)), [1], pixels_per_step=3, which="deletion")
    np.testing.assert_allclose(res.fractions, [0.0, 0.75, 1.0])
    np.testing.assert_allclose(res.deletion_curves[0], [0.35, 0.0, 0.0], atol=1e-7)


def test_deletion_insertion_batches_the_calls():
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 1, size=(3, 3, 6, 6)).astype(np.float32)
    maps = rng.uniform(0, 1, size=(3, 6, 6))
    model = MeanModel()
    res = deletion_insertion(model, images, maps, [0, 1, 1], steps=4, batch_size=8)
    # 2 curves x 3 images x 5 points = 30 rows -> 4 calls of at most 8 rows.
    assert model.calls == 4 and model.rows == [8, 8, 8, 6]
    ref = deletion_insertion(MeanModel(), images, maps, [0, 1, 1], steps=4, batch_size=1)
    np.testing.assert_allclose(res.deletion_curves, ref.deletion_curves)
    np.testing.assert_allclose(res.insertion_curves, ref.insertion_curves)
    # Deletion starts at the image's probability and insertion ends there.
    p = MeanModel()(images)[np.arange(3), [0, 1, 1]]
    np.testing.assert_allclose(res.deletion_curves[:, 0], p, atol=1e-6)
    np.testing.assert_allclose(res.insertion_curves[:, -1], p, atol=1e-6)
    assert res.deletion_curves.shape == (3, 5)


def test_deletion_insertion_errors():
    images, sal = _di_case()
    with pytest.raises(OptionError, match="steps"):
        deletion_insertion(MeanModel(), images, sal, [1], steps=0)
    with pytest.raises(OptionError, match="deletion_baseline"):
        deletion_insertion(MeanModel(), images, sal, [1], deletion_baseline="noise")
    with pytest.raises(OptionError, match="which"):
        deletion_insertion(MeanModel(), images, sal, [1], which="all")
    with pytest.raises(OptionError, match="blur_sigma"):
        deletion_insertion(MeanModel(), images, sal, [1], blur_sigma=-1)
    with pytest.raises(OptionError, match="pixels_per_step"):
        deletion_insertion(MeanModel(), images, sal, [1], pixels_per_step=0)


def test_gaussian_blur():
    # Constant images stay constant (mirrored borders); an impulse far from the borders becomes
    # the outer product of the normalised kernel, whose variance is sigma^2.
    const = np.full((1, 2, 9, 7), 0.3, np.float32)
    np.testing.assert_allclose(gaussian_blur(const, 2.0), const, atol=1e-6)
    img = np.zeros((41, 41), np.float32)
    img[20, 20] = 1.0
    out = gaussian_blur(img, 2.0).astype(np.float64)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(out, out.T, atol=1e-7)
    row = out.sum(axis=0)
    t = np.arange(41) - 20
    assert float((row * t**2).sum()) == pytest.approx(4.0, rel=1e-3)
    np.testing.assert_array_equal(gaussian_blur(img, 0), img)
    # A sigma larger than the image still works (the mirror padding repeats).
    assert gaussian_blur(np.eye(3, dtype=np.float32), 5.0).shape == (3, 3)


# ----------------------------------------------------------------------------------------------
# Regions


def test_box_mask_convention_and_scaling():
    # Integer boxes are slices [y0:y1, x0:x1].
    m = box_mask([1, 2, 3, 4], 5, 5)[0]
    ref = np.zeros((5, 5), bool)
    ref[2:4, 1:3] = True
    np.testing.assert_array_equal(m, ref)
    assert box_mask(np.zeros((0, 4)), 5, 5).shape == (0, 5, 5)
    np.testing.assert_allclose(scale_boxes([[0, 0, 48, 24]], (96, 96), (224, 224)), [[0, 0, 112, 56]])
    with pytest.raises(DataError, match="x1 < x0"):
        box_mask([3, 0, 1, 2], 5, 5)
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = True
    np.testing.assert_array_equal(region_mask(mask, 5, 5), mask)
    with pytest.raises(DataError, match="mask"):
        region_mask(np.zeros((4, 4), bool), 5, 5)


# ----------------------------------------------------------------------------------------------
# Pointing game


def _peak(h, w, points, values=None):
    m = np.zeros((h, w))
    for i, (r, c) in enumerate(points):
        m[r, c] = 1.0 if values is None else values[i]
    return m


def test_pointing_game_by_hand():
    box = [5, 5, 8, 8]  # pixels rows 5..7, cols 5..7
    maps = np.stack([
        _peak(10, 10, [(2, 3)]),  # nearest box pixel (5, 5): distance sqrt(9 + 4) = 3.61
        _peak(10, 10, [(6, 6)]),  # inside
        np.zeros((10, 10)),  # flat: a miss
        _peak(10, 10, [(0, 0), (6, 6)]),  # tie: the argmax is the first in row-major, (0, 0)
    ])
    regions = [box, [box], np.array([box]), box]
    r0 = pointing_game(maps, regions, tolerance=0)
    assert r0.hit.tolist() == [False, True, False, False]
    assert (r0.hits, r0.misses, r0.accuracy) == (1, 3, 0.25)
    assert r0.points.tolist() == [[2, 3], [6, 6], [-1, -1], [0, 0]]
    assert r0.flat.tolist() == [False, False, True, False]
    assert pointing_game(maps, regions, tolerance=3).hit.tolist() == [False, True, False, False]
    assert pointing_game(maps, regions, tolerance=3.61).hit.tolist() == [True, True, False, False]
    # The default 15 px reaches (0, 0) from (5, 5) (distance 7.07), but never a flat map.
    assert pointing_game(maps, regions).hit.tolist() == [True, True, False, True]


def test_pointing_game_masks_and_several_boxes():
    mask = np.zeros((10, 10), bool)
    mask[9, 9] = True
    m = _peak(10, 10, [(9, 7)])  # distance 2 to the mask pixel
    assert pointing_game(m[None], [mask], tolerance=2).hits == 1  # inclusive
    assert pointing_game(m[None], [mask], tolerance=1.9).hits == 0
    # Several boxes: a hit on any of them.
    assert pointing_game(m[None], [[[0, 0, 2, 2], [7, 9, 8, 10]]], tolerance=0).hits == 1


def test_pointing_game_errors():
    with pytest.raises(DataError, match="regions"):
        pointing_game(np.zeros((2, 4, 4)), [[0, 0, 1, 1]])
    with pytest.raises(OptionError, match="tolerance"):
        pointing_game(np.zeros((1, 4, 4)), [[0, 0, 1, 1]], tolerance=-1)
    with pytest.raises(DataError, match=r"\(N, H, W\)"):
        pointing_game(np.zeros((4, 4)), [[0, 0, 1, 1]])
    with pytest.raises(DataError, match="NaN"):
        pointing_game(np.full((1, 4, 4), np.nan), [[0, 0, 1, 1]])
    with pytest.raises(DataError, match=r"regions\[0\]"):
        pointing_game(np.ones((1, 4, 4)), [[0, 0, 1]])


# ----------------------------------------------------------------------------------------------
# Energy-based pointing game


def test_energy_pointing_game_by_hand():
    m = np.array([[1.0, 2.0], [3.0, 4.0]])  # total 10
    maps = np.stack([m, m, m, np.zeros((2, 2)), m])
    mask = np.array([[False, False], [True, False]])
    regions = [
        [1, 0, 2, 2],  # column 1: 2 + 4 = 6 -> 0.6
        [[0, 0, 1, 1], [1, 1, 2, 2]],  # (0,0) + (1,1) = 1 + 4 -> 0.5
        [[0, 0, 2, 1], [0, 0, 1, 2]],  # overlapping: union (0,0),(0,1),(1,0) = 6 -> 0.6, not 0.7
        [0, 0, 2, 2],  # zero map -> 0, not NaN
        mask,  # 3 -> 0.3
    ]
    res = energy_pointing_game(maps, regions)
    np.testing.assert_allclose(res.shares, [0.6, 0.5, 0.6, 0.0, 0.3])
    assert res.mean == pytest.approx(2.0 / 5)
    with pytest.raises(DataError, match="negative"):
        energy_pointing_game(-maps[:1], regions[:1])


# ----------------------------------------------------------------------------------------------
# Instance coverage


def test_instance_coverage_by_hand():
    boxes = [[0, 0, 3, 3], [5, 5, 8, 8], [7, 0, 10, 2]]
    a = _peak(10, 10, [(1, 1), (6, 6), (1, 8)], [1.0, 0.6, 0.4])  # one peak per box
    b = _peak(10, 10, [(1, 1)])  # one instance only: not in the aggregates
    c = np.zeros((10, 10))  # zero map, two instances: covers none
    maps = np.stack([a, b, c])
    per_image = [boxes, [[0, 0, 3, 3]], boxes[:2]]
    res = instance_coverage(maps, per_image, threshold=0.5)
    # a: 1.0 and 0.6 >= 0.5 * 1.0, 0.4 is not -> 2 of 3; b: 1 of 1; c: 0 of 2.
    assert res.covered.tolist() == [2, 1, 0] and res.instances.tolist() == [3, 1, 2]
    np.testing.assert_allclose(res.shares, [2 / 3, 1.0, 0.0])
    assert res.selected.tolist() == [True, False, True] and res.n_images == 2
    assert res.share == pytest.approx(2 / 5)  # (2 + 0) / (3 + 2)
    assert res.mean_share == pytest.approx((2 / 3 + 0) / 2)
    assert res.all_covered == 0.0
    res = instance_coverage(maps, per_image, threshold=0.3, min_instances=1)
    assert res.covered.tolist() == [3, 1, 0] and res.n_images == 3
    assert res.share == pytest.approx(4 / 6)
    assert res.all_covered == pytest.approx(2 / 3)
    # No image with several instances: per-image values, no aggregate.
    res = instance_coverage(b[None], [[[0, 0, 3, 3]]])
    assert res.n_images == 0 and res.share is None and res.mean_share is None
    # Instance masks work like boxes.
    masks = box_mask(boxes, 10, 10)
    assert instance_coverage(a[None], [masks]).covered.tolist() == [2]
    with pytest.raises(OptionError, match="threshold"):
        instance_coverage(maps, per_image, threshold=0)
    with pytest.raises(OptionError, match="min_instances"):
        instance_coverage(maps, per_image, min_instances=0)


# ----------------------------------------------------------------------------------------------
# Manifest


def test_load_manifest_errors(tmp_path):
    good = {"classes": ["a", "b"], "images": [{"image": "x.png", "label": 1, "label_name": "b", "boxes": [[0, 0, 2, 2]]}]}
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    s = load_manifest(tmp_path)
    assert s.classes == ["a", "b"] and len(s) == 1 and s.items[0].image == tmp_path / "x.png"
    np.testing.assert_array_equal(s.items[0].boxes, [[0, 0, 2, 2]])
    cases = {
        "not valid JSON": "{",
        "'classes'": json.dumps({"images": good["images"]}),
        "'label'": json.dumps({**good, "images": [{**good["images"][0], "label": 2}]}),
        "label_name": json.dumps({**good, "images": [{**good["images"][0], "label_name": "a"}]}),
        "'boxes'": json.dumps({**good, "images": [{**good["images"][0], "boxes": []}]}),
        "4 numbers": json.dumps({**good, "images": [{**good["images"][0], "boxes": [[0, 0, 2]]}]}),
        "x1 < x0": json.dumps({**good, "images": [{**good["images"][0], "boxes": [[3, 0, 2, 2]]}]}),
    }
    for message, text in cases.items():
        p = tmp_path / "bad.json"
        p.write_text(text)
        with pytest.raises(DataError, match=message):
            load_manifest(p)
    with pytest.raises(DataError, match="not found"):
        load_manifest(tmp_path / "missing.json")


@pytest.mark.skipif(not (LOC / "manifest.json").exists(), reason="no committed localization set")
def test_committed_localization_set():
    from PIL import Image

    s = load_manifest(LOC)
    assert len(s) >= 100
    labels = (LOC / "labels.txt").read_text().split()
    assert labels == s.classes
    n_multi = 0
    for item in s.items:
        with Image.open(item.image) as im:
            assert im.size == (96, 96) and im.mode == "RGB"
        b = item.boxes
        assert np.all(b[:, :2] >= 0) and np.all(b[:, 2:] <= 96) and np.all(b[:, 2:] > b[:, :2])
        n_multi += len(b) > 1
    assert n_multi >= len(s) // 3
    assert sum(f.stat().st_size for f in LOC.glob("*.png")) < 2.5e6


@pytest.mark.skipif(not SHAPES.exists(), reason="no models/shapes_cnn.onnx")
def test_shapes_model_predicts_the_committed_set():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    model = onnx.load(str(SHAPES))
    meta = {p.key: p.value for p in model.metadata_props}
    s = load_manifest(LOC)
    assert meta["onnxcam.preprocess"] == "unit"
    assert json.loads(meta["onnxcam.labels"]) == s.classes
    sess = ort.InferenceSession(str(SHAPES), providers=["CPUExecutionProvider"])
    x = np.stack([np.asarray(Image.open(i.image).convert("RGB")) for i in s.items]).astype(np.float32)
    x = x.transpose(0, 3, 1, 2) / 255.0
    logits = sess.run(["logits"], {"input": x})[0]
    acc = float((logits.argmax(1) == np.array([i.label for i in s.items])).mean())
    assert acc >= 0.85


@pytest.mark.skipif(not SHAPES.exists(), reason="no models/shapes_cnn.onnx")
def test_shapes_model_cam_points_at_the_objects():
    # For global average pooling + Gemm, Grad-CAM at the last ReLU is CAM = ReLU(W[c] . A): a
    # check, independent of onnxcam's gradient code, that the data set and model suit CAM methods.
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper, numpy_helper
    from PIL import Image

    proto = onnx.load(str(SHAPES))
    gap = next(n for n in proto.graph.node if n.op_type == "GlobalAveragePool")
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    w = next(numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == gemm.input[1])
    proto.graph.output.append(helper.make_tensor_value_info(gap.input[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    s = load_manifest(LOC)
    x = np.stack([np.asarray(Image.open(i.image).convert("RGB")) for i in s.items]).astype(np.float32)
    _, a = sess.run(None, {"input": x.transpose(0, 3, 1, 2) / 255.0})
    cam = np.maximum(np.einsum("nk,nkhw->nhw", w[[i.label for i in s.items]], a), 0)
    scale = x.shape[1] // cam.shape[1]
    maps = np.repeat(np.repeat(cam, scale, axis=1), scale, axis=2)  # nearest upsampling is enough
    boxes = [i.boxes for i in s.items]
    assert pointing_game(maps, boxes, tolerance=0).accuracy >= 0.8
    centre = np.zeros_like(maps)
    centre[:, 40:56, 40:56] = 1.0
    assert energy_pointing_game(maps, boxes).mean > energy_pointing_game(centre, boxes).mean + 0.1
