"""CAM methods and gradient moments against naive loop references written from docs/method.md.

The references below loop over images, channels and locations and are deliberately not
vectorised, so that they share no code (and no broadcasting mistakes) with onnxcam.cams.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxcam.cams import (METHODS, CamMethod, GradCAM, GradCAMPlusPlus, GradientMoments,
                          HiResCAM, LayerCAM, MomentAccumulator, SmoothGradCAMPlusPlus, XGradCAM,
                          get_method)
from onnxcam.errors import OptionError, TargetError

SEEDS = [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- naive references (loops)

def channels(K, feature_maps):
    return range(K) if feature_maps is None else feature_maps


def ref_weighted_map(A, w, feature_maps=None):
    """L[n,i,j] = max(0, sum_{k in K'} w[n,k] * A[n,k,i,j])."""
    N, K, h, wd = A.shape
    L = np.zeros((N, h, wd))
    for n in range(N):
        for i in range(h):
            for j in range(wd):
                total = 0.0
                for k in channels(K, feature_maps):
                    total += w[n, k] * A[n, k, i, j]
                L[n, i, j] = max(0.0, total)
    return L


def ref_gradcam(A, g, feature_maps=None):
    N, K, h, wd = A.shape
    w = np.zeros((N, K))
    for n in range(N):
        for k in range(K):
            total = 0.0
            for i in range(h):
                for j in range(wd):
                    total += g[n, k, i, j]
            w[n, k] = total / (h * wd)
    return ref_weighted_map(A, w, feature_maps), w


def ref_gradcampp(A, D1, D2, D3, numerator="D2", denominator="sum", feature_maps=None):
    """alpha = num / (2 D2 + S*D3_ij) ('sum') or / (2 D2 + sum_ab A*D3) ('weighted'); 0 where 0."""
    N, K, h, wd = A.shape
    w = np.zeros((N, K))
    for n in range(N):
        for k in range(K):
            activation_sum = 0.0
            activation_d3 = 0.0
            for a in range(h):
                for b in range(wd):
                    activation_sum += A[n, k, a, b]
                    activation_d3 += A[n, k, a, b] * D3[n, k, a, b]
            for i in range(h):
                for j in range(wd):
                    if denominator == "sum":
                        den = 2 * D2[n, k, i, j] + activation_sum * D3[n, k, i, j]
                    else:
                        den = 2 * D2[n, k, i, j] + activation_d3
                    num = D2[n, k, i, j] if numerator == "D2" else D1[n, k, i, j]
                    alpha = 0.0 if den == 0 else num / den
                    w[n, k] += alpha * max(0.0, D1[n, k, i, j])
    return ref_weighted_map(A, w, feature_maps), w


def ref_xgradcam(A, g, feature_maps=None):
    N, K, h, wd = A.shape
    w = np.zeros((N, K))
    for n in range(N):
        for k in range(K):
            activation_sum = sum(A[n, k, a, b] for a in range(h) for b in range(wd))
            if activation_sum != 0:
                w[n, k] = sum(A[n, k, i, j] / activation_sum * g[n, k, i, j]
                              for i in range(h) for j in range(wd))
    return ref_weighted_map(A, w, feature_maps), w


def ref_location_map(A, g, relu_gradient, feature_maps=None):
    """LayerCAM (relu_gradient) or HiResCAM: max(0, sum_k g'_kij A_kij)."""
    N, K, h, wd = A.shape
    L = np.zeros((N, h, wd))
    for n in range(N):
        for i in range(h):
            for j in range(wd):
                total = 0.0
                for k in channels(K, feature_maps):
                    grad = max(0.0, g[n, k, i, j]) if relu_gradient else g[n, k, i, j]
                    total += grad * A[n, k, i, j]
                L[n, i, j] = max(0.0, total)
    return L


def ref_moments(samples, rows, n_images):
    """Per-image means of g, g^2, g^3 with explicit loops over samples."""
    shape = (n_images,) + samples.shape[1:]
    sums = [np.zeros(shape) for _ in range(3)]
    counts = np.zeros(n_images)
    for sample, row in zip(samples, rows):
        counts[row] += 1
        for power in range(3):
            sums[power][row] += sample ** (power + 1)
    return [s / counts[:, None, None, None] for s in sums]


def reference(method_name, A, D1, D2, D3, feature_maps=None, **options):
    """(map, weights or None) of each method from the naive references."""
    if method_name == "gradcam":
        return ref_gradcam(A, D1, feature_maps)
    if method_name in ("gradcampp", "smoothgradcampp"):
        return ref_gradcampp(A, D1, D2, D3, options.get("numerator", "D2"),
                             options.get("denominator", "sum"), feature_maps)
    if method_name == "xgradcam":
        return ref_xgradcam(A, D1, feature_maps)
    if method_name == "layercam":
        return ref_location_map(A, D1, True, feature_maps), None
    if method_name == "hirescam":
        return ref_location_map(A, D1, False, feature_maps), None
    raise AssertionError(method_name)


def random_case(seed, N=2, K=3, h=4, w=5):
    """Activations >= 0 with zeros (a whole zero channel too); gradients of both signs with zeros."""
    rng = np.random.default_rng(seed)
    A = np.maximum(rng.normal(size=(N, K, h, w)), 0.0)
    A[0, 1] = 0.0
    g = rng.normal(size=(N, K, h, w))
    g[rng.random(g.shape) < 0.2] = 0.0
    return A, g


def method_moments(method, activation, gradient):
    """The moments ``method`` is computed from for one sample per image: the accumulator's (with
    each sample's own map) for the "maps" averaging, else the single-sample moments."""
    if getattr(method, "averaging", "moments") != "maps":
        return GradientMoments.from_gradients(gradient)
    accumulator = method.new_accumulator(len(activation))
    accumulator.add(np.arange(len(activation)), gradient, activation)
    return accumulator.result()


def assert_map_close(actual, expected):
    assert actual.dtype == np.float32
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * scale)


# ---------------------------------------------------------------- against the references

ALL_CONFIGS = [
    ("gradcam", {}), ("gradcampp", {}), ("gradcampp", {"denominator": "weighted"}),
    ("smoothgradcampp", {}), ("smoothgradcampp", {"numerator": "D1"}),
    ("smoothgradcampp", {"denominator": "weighted"}), ("xgradcam", {}), ("layercam", {}),
    ("hirescam", {}),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name,options", ALL_CONFIGS)
def test_single_sample_matches_reference(seed, name, options):
    A, g = random_case(seed)
    result = get_method(name, **options).compute(A, GradientMoments.from_gradients(g))
    expected_map, expected_weights = reference(name, A, g, g ** 2, g ** 3, **options)
    assert_map_close(result.maps, expected_map)
    if expected_weights is None:
        assert result.weights is None
    else:
        np.testing.assert_allclose(result.weights, expected_weights, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(result.flat, ~expected_map.reshape(len(A), -1).any(axis=1))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("options", [{}, {"numerator": "D1"}, {"denominator": "weighted"},
                                     {"numerator": "D1", "denominator": "weighted"}])
def test_smooth_moments_match_reference_on_noisy_samples(seed, options):
    rng = np.random.default_rng(100 + seed)
    A, _ = random_case(seed)
    n_images, per_image = len(A), 4
    samples = rng.normal(size=(n_images * per_image,) + A.shape[1:])
    rows = np.repeat(np.arange(n_images), per_image)
    rng.shuffle(rows)
    accumulator = SmoothGradCAMPlusPlus(**options).new_accumulator(n_images)
    accumulator.add(rows, samples)
    result = SmoothGradCAMPlusPlus(**options).compute(A, accumulator.result())
    D1, D2, D3 = ref_moments(samples, rows, n_images)
    expected_map, expected_weights = ref_gradcampp(A, D1, D2, D3, **options)
    assert_map_close(result.maps, expected_map)
    np.testing.assert_allclose(result.weights, expected_weights, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("denominator", ["sum", "weighted"])
def test_smooth_maps_averaging_is_the_mean_of_per_sample_maps(seed, denominator):
    rng = np.random.default_rng(200 + seed)
    n_images, per_image, K, h, w = 3, 3, 2, 3, 4
    rows = np.tile(np.arange(n_images), per_image)
    noisy_activations = np.maximum(rng.normal(size=(len(rows), K, h, w)), 0)
    gradients = rng.normal(size=(len(rows), K, h, w))
    method = get_method("smoothgradcampp", averaging="maps", denominator=denominator)
    accumulator = method.new_accumulator(n_images)
    accumulator.add(rows[:4], gradients[:4], noisy_activations[:4])
    accumulator.add(rows[4:], gradients[4:], noisy_activations[4:])
    clean_activation = np.maximum(rng.normal(size=(n_images, K, h, w)), 0)
    result = method.compute(clean_activation, accumulator.result())
    expected = np.zeros((n_images, h, w))
    for sample in range(len(rows)):
        g = gradients[sample:sample + 1]
        sample_map, _ = ref_gradcampp(noisy_activations[sample:sample + 1], g, g ** 2, g ** 3,
                                      denominator=denominator)
        expected[rows[sample]] += sample_map[0] / per_image
    assert_map_close(result.maps, expected)
    assert result.weights is None


# ---------------------------------------------------------------- hand-computed cases
# Two channels, 2x2, one image:
#   A0 = [[1,0],[2,1]] (sum 4)     g0 = [[1,-1],[0,2]]
#   A1 = [[1,1],[1,0]] (sum 3)     g1 = [[-2,-2],[1,-1]]

A0 = np.array([[1.0, 0.0], [2.0, 1.0]])
A1 = np.array([[1.0, 1.0], [1.0, 0.0]])
G0 = np.array([[1.0, -1.0], [0.0, 2.0]])
G1 = np.array([[-2.0, -2.0], [1.0, -1.0]])
HAND_A = np.stack([A0, A1])[None]
HAND_G = np.stack([G0, G1])[None]


def hand(name, **options):
    return get_method(name, **options).compute(HAND_A, GradientMoments.from_gradients(HAND_G))


def test_hand_gradcam():
    # w0 = (1-1+0+2)/4 = 1/2; w1 = (-2-2+1-1)/4 = -1
    # 0.5*A0 - A1 = [[-0.5,-1],[0,0.5]] -> ReLU [[0,0],[0,0.5]]
    result = hand("gradcam")
    np.testing.assert_allclose(result.weights, [[0.5, -1.0]])
    np.testing.assert_allclose(result.maps[0], [[0, 0], [0, 0.5]])
    assert not result.flat[0]


def test_hand_gradcampp_sum_denominator():
    # channel 0, S=4, alpha = g^2/(2g^2 + 4g^3):
    #   g=1: 1/6 * relu(1) = 1/6;  g=-1: relu 0;  g=0: denominator 0 -> 0;  g=2: 4/40 * 2 = 1/5
    #   w0 = 1/6 + 1/5 = 11/30
    # channel 1, S=3: only g=1 at (1,0) counts: 1/(2+3) * 1 = 1/5 -> w1 = 1/5
    result = hand("gradcampp")
    np.testing.assert_allclose(result.weights, [[11 / 30, 1 / 5]])
    np.testing.assert_allclose(result.maps[0], 11 / 30 * A0 + 1 / 5 * A1, rtol=1e-6)


def test_hand_gradcampp_weighted_denominator():
    # channel 0: sum A*g^3 = 1 + 0 + 0 + 8 = 9: g=1: 1/11;  g=2: 4/(8+9) * 2 = 8/17
    #   w0 = 1/11 + 8/17 = 105/187
    # channel 1: sum A*g^3 = -8 - 8 + 1 + 0 = -15: g=1: 1/(2-15) = -1/13 -> w1 = -1/13
    # map = ReLU(105/187*A0 - 1/13*A1): the (0,1) entry -1/13 is clipped to 0
    result = hand("gradcampp", denominator="weighted")
    np.testing.assert_allclose(result.weights, [[105 / 187, -1 / 13]])
    expected = np.array([[105 / 187 - 1 / 13, 0.0], [210 / 187 - 1 / 13, 105 / 187]])
    np.testing.assert_allclose(result.maps[0], expected, rtol=1e-6)


# Smooth Grad-CAM++: two noisy samples of the image: HAND_G and
#   g0' = [[3,1],[0,0]],  g1' = [[1,0],[0,-1]]
# D1_0 = [[2,0],[0,1]],  D2_0 = [[5,1],[0,2]],  D3_0 = [[14,0],[0,4]]
# D1_1 = [[-1/2,-1],[1/2,-1]],  D2_1 = [[5/2,2],[1/2,1]],  D3_1 = [[-7/2,-4],[1/2,-1]]
SECOND_G = np.stack([np.array([[3.0, 1.0], [0.0, 0.0]]), np.array([[1.0, 0.0], [0.0, -1.0]])])[None]


def hand_smooth_moments(**accumulator_options):
    accumulator = MomentAccumulator(1, **accumulator_options)
    accumulator.add(np.array([0]), HAND_G, HAND_A if accumulator_options.get("keep_maps") else None)
    accumulator.add(np.array([0]), SECOND_G, 2 * HAND_A if accumulator_options.get("keep_maps") else None)
    return accumulator.result()


def test_hand_smooth_moments():
    moments = hand_smooth_moments()
    np.testing.assert_allclose(moments.d1[0, 0], [[2, 0], [0, 1]])
    np.testing.assert_allclose(moments.d2[0, 1], [[2.5, 2], [0.5, 1]])
    np.testing.assert_allclose(moments.d3[0, 0], [[14, 0], [0, 4]])
    np.testing.assert_array_equal(moments.count, [2])


def test_hand_smooth_gradcampp_numerators():
    # D2, channel 0 (S=4): (0,0): 5/(10+56) * 2 = 5/33; (1,1): 2/(4+16) * 1 = 1/10 -> 83/330
    # D2, channel 1 (S=3): only (1,0) has D1 > 0: (1/2)/(1+3/2) * 1/2 = 1/10
    # D1, channel 0: (0,0): 2/66 * 2 = 2/33; (1,1): 1/20 * 1 = 1/20 -> 73/660
    # D1, channel 1: D1 = D2 = 1/2 at (1,0), so again 1/10
    moments = hand_smooth_moments()
    d2 = get_method("smoothgradcampp").compute(HAND_A, moments)
    d1 = get_method("smoothgradcampp", numerator="D1").compute(HAND_A, moments)
    np.testing.assert_allclose(d2.weights, [[83 / 330, 1 / 10]])
    np.testing.assert_allclose(d1.weights, [[73 / 660, 1 / 10]])
    np.testing.assert_allclose(d2.maps[0], 83 / 330 * A0 + 1 / 10 * A1, rtol=1e-6)
    np.testing.assert_allclose(d1.maps[0], 73 / 660 * A0 + 1 / 10 * A1, rtol=1e-6)


def test_hand_smooth_gradcampp_maps_averaging():
    # sample 1 (activation A): the Grad-CAM++ map above, 11/30*A0 + 1/5*A1
    # sample 2 (activation 2A, so S0=8, S1=6):
    #   channel 0, g'=[[3,1],[0,0]]: 9/(18+8*27) * 3 = 3/26; 1/(2+8) * 1 = 1/10 -> 14/65
    #   channel 1, g'=[[1,0],[0,-1]]: 1/(2+6) * 1 = 1/8
    #   map = 14/65*2*A0 + 1/8*2*A1 = 28/65*A0 + 1/4*A1
    moments = hand_smooth_moments(keep_maps=True)
    result = get_method("smoothgradcampp", averaging="maps").compute(HAND_A, moments)
    expected = ((11 / 30 + 28 / 65) * A0 + (1 / 5 + 1 / 4) * A1) / 2
    np.testing.assert_allclose(result.maps[0], expected, rtol=1e-6)


def test_hand_xgradcam():
    # w0 = (1*1 + 0*(-1) + 2*0 + 1*2)/4 = 3/4;  w1 = (1*(-2) + 1*(-2) + 1*1 + 0*(-1))/3 = -1
    # 3/4*A0 - A1 = [[-1/4,-1],[1/2,3/4]] -> [[0,0],[1/2,3/4]]
    result = hand("xgradcam")
    np.testing.assert_allclose(result.weights, [[0.75, -1.0]])
    np.testing.assert_allclose(result.maps[0], [[0, 0], [0.5, 0.75]])


def test_hand_layercam():
    # relu(g0)*A0 = [[1,0],[0,2]];  relu(g1)*A1 = [[0,0],[1,0]]  -> [[1,0],[1,2]]
    result = hand("layercam")
    assert result.weights is None
    np.testing.assert_allclose(result.maps[0], [[1, 0], [1, 2]])


def test_hand_hirescam():
    # g0*A0 = [[1,0],[0,2]];  g1*A1 = [[-2,-2],[1,0]]  -> sum [[-1,-2],[1,2]] -> [[0,0],[1,2]]
    result = hand("hirescam")
    assert result.weights is None
    np.testing.assert_allclose(result.maps[0], [[0, 0], [1, 2]])


def test_hand_feature_map_subset():
    # Grad-CAM restricted to channel 1: ReLU(-1 * A1) = 0 everywhere -> flat
    # restricted to channel 0: 0.5 * A0
    only_1 = get_method("gradcam", feature_maps=[1]).compute(HAND_A, GradientMoments.from_gradients(HAND_G))
    only_0 = get_method("gradcam", feature_maps=[0]).compute(HAND_A, GradientMoments.from_gradients(HAND_G))
    assert only_1.flat[0] and not only_1.maps.any()
    np.testing.assert_allclose(only_0.maps[0], 0.5 * A0)
    np.testing.assert_allclose(only_1.weights, [[0.5, -1.0]])  # weights still cover every channel


# ---------------------------------------------------------------- smooth == plain on one sample

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("denominator", ["sum", "weighted"])
def test_smooth_on_one_sample_equals_gradcampp(seed, denominator):
    A, g = random_case(seed)
    plain = GradCAMPlusPlus(denominator=denominator).compute(A, GradientMoments.from_gradients(g))
    smooth_method = SmoothGradCAMPlusPlus(denominator=denominator)
    same_moments = smooth_method.compute(A, GradientMoments.from_gradients(g))
    np.testing.assert_array_equal(plain.maps, same_moments.maps)
    accumulator = smooth_method.new_accumulator(len(A))
    accumulator.add(np.arange(len(A)), g)
    accumulated = smooth_method.compute(A, accumulator.result())
    np.testing.assert_allclose(accumulated.maps, plain.maps, rtol=1e-12)
    maps_method = SmoothGradCAMPlusPlus(denominator=denominator, averaging="maps")
    maps_accumulator = maps_method.new_accumulator(len(A))
    maps_accumulator.add(np.arange(len(A)), g, A)  # the one noisy sample is the clean input
    np.testing.assert_allclose(maps_method.compute(A, maps_accumulator.result()).maps, plain.maps,
                               rtol=1e-6, atol=1e-7)


def test_numerator_d1_and_d2_agree_only_where_d1_equals_d2():
    A, _ = random_case(7)
    binary = (np.random.default_rng(7).random(A.shape) < 0.5).astype(float)  # g in {0,1}: g == g^2
    moments = GradientMoments.from_gradients(binary)
    np.testing.assert_array_equal(SmoothGradCAMPlusPlus(numerator="D1").compute(A, moments).maps,
                                  SmoothGradCAMPlusPlus(numerator="D2").compute(A, moments).maps)
    _, g = random_case(8)
    general = GradientMoments.from_gradients(g)
    assert not np.allclose(SmoothGradCAMPlusPlus(numerator="D1").compute(A, general).weights,
                           SmoothGradCAMPlusPlus(numerator="D2").compute(A, general).weights)


# ---------------------------------------------------------------- the accumulator

def test_accumulator_chunking_and_order_do_not_matter():
    rng = np.random.default_rng(11)
    n_images, K, h, w = 3, 2, 3, 3
    rows = np.array([0, 2, 1, 0, 0, 2, 1, 1, 2, 0, 1])  # uneven counts, images mixed in chunks
    samples = rng.normal(size=(len(rows), K, h, w))
    D1, D2, D3 = ref_moments(samples, rows, n_images)
    for chunk in (1, 2, 3, 5, len(rows)):
        for order in (np.arange(len(rows)), rng.permutation(len(rows))):
            accumulator = MomentAccumulator(n_images)
            for start in range(0, len(rows), chunk):
                take = order[start:start + chunk]
                accumulator.add(rows[take], samples[take])
            moments = accumulator.result()
            np.testing.assert_allclose(moments.d1, D1, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(moments.d2, D2, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(moments.d3, D3, rtol=1e-12, atol=1e-15)
            np.testing.assert_array_equal(moments.count, [4, 4, 3])
            assert moments.mean_map is None


def test_accumulator_sums_sample_after_sample_whatever_the_chunks():
    """Bit-identical sums for any chunking: the float64 sums add one sample after another. Summing
    a chunk first would round differently: with 1e16, 1, -1e16, 1 the chunks [1e16, 1] and
    [-1e16, 1] lose both ones (sum 0), one by one keeps the last (sum 1)."""
    values = np.array([1e16, 1.0, -1e16, 1.0]).reshape(4, 1, 1, 1)
    rows = np.zeros(4, dtype=np.int64)
    sums = []
    for chunk in (1, 2, 4):
        accumulator = MomentAccumulator(1)
        for start in range(0, 4, chunk):
            accumulator.add(rows[start:start + chunk], values[start:start + chunk])
        sums.append(accumulator.result().d1 * 4)
    assert [float(s.ravel()[0]) for s in sums] == [1.0, 1.0, 1.0]


def test_accumulator_takes_sums_made_elsewhere():
    """add_sums (sums of g, g^2, g^3 over some samples of one image, as a device returns them)
    gives the moments of the samples themselves, mixed with add() in any order."""
    rng = np.random.default_rng(12)
    rows = np.array([0, 0, 1, 0, 1, 1, 1])
    samples = rng.normal(size=(len(rows), 2, 3, 3))
    D1, D2, D3 = ref_moments(samples, rows, 2)
    accumulator = MomentAccumulator(2)
    accumulator.add(rows[:2], samples[:2])
    for row in (0, 1):
        mine = np.flatnonzero(rows[2:] == row) + 2
        sums = [np.sum(samples[mine] ** p, axis=0, keepdims=p == 2) for p in (1, 2, 3)]
        accumulator.add_sums(row, len(mine), *sums)
    moments = accumulator.result()
    for got, expected in ((moments.d1, D1), (moments.d2, D2), (moments.d3, D3)):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(moments.count, [3, 4])
    with pytest.raises(ValueError, match="count"):
        accumulator.add_sums(0, 0, *sums)
    with pytest.raises(ValueError, match="row"):
        accumulator.add_sums(2, 1, *sums)
    with pytest.raises(ValueError, match="keep_maps"):
        MomentAccumulator(1, keep_maps=True).add_sums(0, 1, *sums)


def test_accumulator_accepts_float32_and_empty_chunks():
    g = np.random.default_rng(3).normal(size=(2, 2, 2, 2)).astype(np.float32)
    accumulator = MomentAccumulator(2)
    accumulator.add(np.array([], dtype=np.int64), g[:0])
    accumulator.add(np.array([1, 0]), g)
    moments = accumulator.result()
    assert moments.d1.dtype == np.float64
    np.testing.assert_array_equal(moments.d1, g[[1, 0]].astype(np.float64))


def test_accumulator_rejects_images_without_samples_and_bad_rows():
    accumulator = MomentAccumulator(2)
    accumulator.add(np.array([0]), np.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):
        accumulator.result()
    with pytest.raises(ValueError, match="rows"):
        accumulator.add(np.array([2]), np.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="differ"):
        accumulator.add(np.array([1]), np.ones((1, 2, 2, 2)))
    with pytest.raises(ValueError, match="activations"):
        MomentAccumulator(1, keep_maps=True).add(np.array([0]), np.ones((1, 1, 2, 2)))
    with pytest.raises(OptionError, match="denominator"):
        MomentAccumulator(1, denominator="mean")


def test_finish_gives_result_in_place_and_release_hands_the_buffer_back():
    """finish() = result() bit for bit; afterwards the accumulator takes nothing more; the next
    accumulator of the same shape reuses the released buffer and starts from zero."""
    from onnxcam.cams.workspace import WORKSPACE

    rng = np.random.default_rng(21)
    rows = np.array([0, 1, 1, 0, 1])
    samples = rng.normal(size=(len(rows), 3, 2, 2))
    accumulator = MomentAccumulator(2)
    accumulator.add(rows, samples)
    expected = accumulator.result()
    moments = accumulator.finish()
    for name in ("d1", "d2", "d3"):
        np.testing.assert_array_equal(getattr(moments, name), getattr(expected, name))
    for call in (lambda: accumulator.add(rows, samples), accumulator.result, accumulator.finish):
        with pytest.raises(ValueError, match="finished"):
            call()
    buffer = moments.d1.base
    accumulator.release()
    with pytest.raises(ValueError, match="released"):
        accumulator.result()
    fresh = MomentAccumulator(2)
    fresh.add(rows[::-1], samples[::-1] * 2)
    assert fresh._sums is buffer  # the released buffer, zeroed before use
    D1, D2, D3 = ref_moments(samples[::-1] * 2, rows[::-1], 2)
    again = fresh.finish()
    for got, want in ((again.d1, D1), (again.d2, D2), (again.d3, D3)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    fresh.release()
    WORKSPACE.clear()


def test_workspace_keeps_whole_float64_arrays_once_within_its_budget():
    from onnxcam.cams.workspace import Workspace

    workspace = Workspace(budget=3 * 8 * 10)
    a, b = workspace.take((2, 5)), workspace.take((2, 5))
    assert a is not b and a.shape == (2, 5) and a.dtype == np.float64
    workspace.give(a, a, None)  # given twice: kept once
    assert workspace.nbytes == 80
    workspace.give(b, np.empty((2, 5), dtype=np.float32), np.empty((4, 5))[:2], np.empty((5, 2)).T)
    assert workspace.nbytes == 160  # b kept; another dtype, a view, a transposed view not
    workspace.give(np.empty((3, 5)))  # past the budget: not kept
    assert workspace.nbytes == 160
    taken = {id(workspace.take((2, 5))), id(workspace.take((2, 5)))}
    assert taken == {id(a), id(b)} and workspace.nbytes == 0
    assert workspace.take((2, 5)) is not a  # empty again: a new array


def test_plusplus_weights_do_not_read_values_left_in_the_workspace():
    """The Grad-CAM++ temporaries come from the workspace: a call where the denominator is 0
    must give 0 there after a call that left other values in the same buffers."""
    from onnxcam.cams import formulas

    rng = np.random.default_rng(4)
    A = np.abs(rng.normal(size=(1, 3, 4, 4)))
    g = rng.normal(size=A.shape)
    first = formulas.plusplus_weights(A, g, g ** 2, g ** 3)
    assert np.abs(first).sum() > 0
    zero = np.zeros_like(A)
    for denominator in ("sum", "weighted"):
        np.testing.assert_array_equal(formulas.plusplus_weights(A, zero, zero, zero, denominator=denominator),
                                      np.zeros((1, 3)))
    np.testing.assert_array_equal(formulas.plusplus_weights(A, g, g ** 2, g ** 3), first)


@pytest.mark.parametrize("numerator", ["D2", "D1"])
def test_single_sample_plusplus_weights_match_the_general_form(numerator):
    """One sample per image: sum_{g>0} g / (2 + S g) (D1: 1 / (2 + S g)) against alpha * ReLU(g)
    from g, g^2 and g^3, on activations of both signs, with zero gradients, a location where
    2 + S g = 0 exactly (it counts 0 in both) and a NaN gradient (it stays NaN)."""
    from onnxcam.cams import formulas

    rng = np.random.default_rng(11)
    A = rng.normal(0.3, 1.0, size=(4, 6, 5, 5))
    g = rng.normal(size=A.shape) * (rng.random(A.shape) > 0.3)
    A[1, 2] = 0.0
    A[1, 2, 0, 0] = -4.0  # S = -4, so at g = 0.5: 2 + S g = 0
    g[1, 2, 3, 3] = 0.5
    g[2, 4, 1, 1] = np.nan
    g = g.astype(np.float32).astype(np.float64)  # values a float32 model gives
    general = formulas.plusplus_weights(A, g, g * g, g * g * g, numerator=numerator)
    single = formulas.plusplus_weights_single(A, g, numerator=numerator)
    np.testing.assert_allclose(single, general, rtol=1e-12, atol=0)
    assert np.isnan(single[2, 4]) and np.isfinite(np.delete(single.reshape(-1), 2 * 6 + 4)).all()
    assert single[1, 2] == pytest.approx(general[1, 2], rel=1e-12) and np.isfinite(single[1, 2])
    np.testing.assert_array_equal(formulas.plusplus_weights_single(A, g.astype(np.float32), numerator=numerator),
                                  single)  # float32 gradients are read into float64 exactly


def test_gradcampp_of_one_sample_uses_its_simpler_form_with_the_same_maps():
    """GradCAMPlusPlus on single-sample moments (the clean pass) gives the maps of the same
    moments made as averages (d1, d2, d3 arrays), for both numerators of Smooth Grad-CAM++."""
    rng = np.random.default_rng(12)
    A = np.abs(rng.normal(size=(3, 8, 4, 4)))
    g = rng.normal(size=A.shape).astype(np.float32)
    single = GradientMoments.from_gradients(g)
    g64 = g.astype(np.float64)
    averaged = GradientMoments(d1=g64, d2=g64 ** 2, d3=g64 ** 3, count=np.ones(3, dtype=np.int64))
    for method in (GradCAMPlusPlus(), SmoothGradCAMPlusPlus(numerator="D1")):
        fast, slow = method.compute(A, single), method.compute(A, averaged)
        np.testing.assert_allclose(fast.weights, slow.weights, rtol=1e-12)
        np.testing.assert_allclose(fast.maps, slow.maps, rtol=1e-6)


@pytest.mark.parametrize("name,options", ALL_CONFIGS + [("smoothgradcampp", {"averaging": "maps"})])
def test_compute_in_chunks_of_images_gives_the_same_maps_bit_for_bit(monkeypatch, name, options):
    """compute() works a few images at a time (CHUNK_MEMORY): the same maps and weights as one
    image at a time and as all at once, for every method."""
    import onnxcam.cams.methods as methods_module

    A, g = random_case(7, N=5, K=3, h=4, w=5)
    g32 = g.astype(np.float32)
    method = get_method(name, **options)
    moments = method_moments(method, A, g32)
    results = []
    for chunk_memory in (8 * 3 * 4 * 5 * 2, 1, 10**9):  # two images, one, all five
        monkeypatch.setattr(methods_module, "CHUNK_MEMORY", chunk_memory)
        results.append(method.compute(A.astype(np.float32), moments))
    for other in results[1:]:
        np.testing.assert_array_equal(other.maps, results[0].maps)
        np.testing.assert_array_equal(other.flat, results[0].flat)
        if results[0].weights is None:
            assert other.weights is None
        else:
            np.testing.assert_array_equal(other.weights, results[0].weights)
    assert results[0].maps.dtype == np.float32 and results[0].maps.shape == (5, 4, 5)


def test_single_sample_moments_convert_only_the_rows_read():
    g = np.random.default_rng(8).normal(size=(4, 2, 3, 3)).astype(np.float32)
    moments = GradientMoments.from_gradients(g)
    assert moments.shape == g.shape and "d1" not in vars(moments)
    part = moments.rows(1, 3)
    np.testing.assert_array_equal(part.d1, g[1:3].astype(np.float64))
    assert part.d1.dtype == np.float64 and "d1" not in vars(moments)
    with pytest.raises(ValueError, match="B, K, h, w"):
        GradientMoments.from_gradients(g[0])


def test_from_gradients_is_single_sample_moments():
    g = np.random.default_rng(5).normal(size=(2, 3, 2, 2))
    moments = GradientMoments.from_gradients(g)
    np.testing.assert_array_equal(moments.d1, g)
    np.testing.assert_allclose(moments.d2, g ** 2)
    np.testing.assert_allclose(moments.d3, g ** 3)
    np.testing.assert_array_equal(moments.count, [1, 1])
    assert moments.mean_map is None


def test_maps_averaging_needs_matching_per_sample_maps():
    A, g = random_case(1)
    with pytest.raises(ValueError, match="new_accumulator"):
        SmoothGradCAMPlusPlus(averaging="maps").compute(A, GradientMoments.from_gradients(g))
    plain_accumulator = MomentAccumulator(len(A), keep_maps=True)  # numerator D2, all channels
    plain_accumulator.add(np.arange(len(A)), g, A)
    with pytest.raises(ValueError, match="new_accumulator"):
        SmoothGradCAMPlusPlus(averaging="maps", numerator="D1").compute(A, plain_accumulator.result())
    subset = SmoothGradCAMPlusPlus(averaging="maps", feature_maps=[0, 2])
    accumulator = subset.new_accumulator(len(A))
    accumulator.add(np.arange(len(A)), g, A)
    expected, _ = ref_gradcampp(A, g, g ** 2, g ** 3, feature_maps=[0, 2])
    assert_map_close(subset.compute(A, accumulator.result()).maps, expected)


# ---------------------------------------------------------------- flat maps

@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name,options", ALL_CONFIGS)
def test_flat_maps_are_exact_zeros_without_warnings(name, options):
    rng = np.random.default_rng(0)
    A = np.maximum(rng.normal(size=(2, 3, 4, 4)), 0.0)
    A[:, :, 0, 0] = 1.0  # no channel sums to zero, so negative gradients give negative weights
    zero_gradient = np.zeros_like(A)
    negative_gradient = -np.abs(rng.normal(size=A.shape)) - 0.1
    cases = [(A, zero_gradient, True), (np.zeros_like(A), rng.normal(size=A.shape), False),
             (A, negative_gradient, True)]
    method = get_method(name, **options)
    for activation, gradient, weights_not_positive in cases:
        result = method.compute(activation, method_moments(method, activation, gradient))
        assert result.flat.all()
        assert not result.maps.any() and not np.signbit(result.maps).any()  # +0.0, no NaN
        if result.weights is not None:
            assert np.isfinite(result.weights).all()
            assert (result.weights <= 0).all() or not weights_not_positive


@pytest.mark.filterwarnings("error")
def test_flat_is_per_image():
    A = np.ones((2, 1, 2, 2))
    g = np.stack([np.zeros((1, 2, 2)), np.ones((1, 2, 2))])
    for name in METHODS:
        result = get_method(name).compute(A, GradientMoments.from_gradients(g))
        np.testing.assert_array_equal(result.flat, [True, False], err_msg=name)


@pytest.mark.filterwarnings("error")
def test_xgradcam_guards_channels_that_sum_to_zero():
    A = np.zeros((1, 2, 2, 2))
    A[0, 0] = [[1.0, -1.0], [0.0, 0.0]]  # sums to zero: weight 0, not inf
    A[0, 1] = [[1.0, 0.0], [0.0, 1.0]]
    g = np.ones_like(A)
    result = XGradCAM().compute(A, GradientMoments.from_gradients(g))
    np.testing.assert_array_equal(result.weights, [[0.0, 1.0]])  # channel 1: (1+1)/2 * 1


# ---------------------------------------------------------------- feature maps and options

@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("name,options", [c for c in ALL_CONFIGS if c[1].get("averaging") != "maps"])
def test_feature_map_subset_matches_reference(seed, name, options):
    A, g = random_case(seed, K=5)
    subset = [4, 0, 2]
    result = get_method(name, feature_maps=subset, **options).compute(A, GradientMoments.from_gradients(g))
    expected, _ = reference(name, A, g, g ** 2, g ** 3, feature_maps=subset, **options)
    assert_map_close(result.maps, expected)


def test_feature_map_subset_equals_zeroing_the_other_channels():
    A, g = random_case(3, K=4)
    kept = [1, 3]
    zeroed = A.copy()
    zeroed[:, [0, 2]] = 0.0
    subset = GradCAM(feature_maps=kept).compute(A, GradientMoments.from_gradients(g))
    masked = GradCAM().compute(zeroed, GradientMoments.from_gradients(g))
    np.testing.assert_allclose(subset.maps, masked.maps, rtol=1e-6)


@pytest.mark.parametrize("feature_maps", [[3], [0, 7]])
def test_out_of_range_feature_map_raises_target_error(feature_maps):
    A, g = random_case(0, K=3)
    for name in METHODS:
        with pytest.raises(TargetError, match="out of range"):
            get_method(name, feature_maps=feature_maps).compute(A, GradientMoments.from_gradients(g))
    accumulator = SmoothGradCAMPlusPlus(averaging="maps", feature_maps=feature_maps).new_accumulator(2)
    with pytest.raises(TargetError, match="out of range"):
        accumulator.add(np.arange(2), g, A)


@pytest.mark.parametrize("feature_maps", [[], [-1], [1.5], [True], [0, 0], "01", 3])
def test_malformed_feature_maps_raise_target_error(feature_maps):
    with pytest.raises(TargetError):
        GradCAM(feature_maps=feature_maps)


@pytest.mark.parametrize("alias,expected", [
    ("gradcam", GradCAM), ("Grad-CAM", GradCAM), ("gradcam++", GradCAMPlusPlus),
    ("Grad-CAM++", GradCAMPlusPlus), ("GRADCAMPP", GradCAMPlusPlus),
    ("smooth-grad-cam++", SmoothGradCAMPlusPlus), ("SmoothGradCAM++", SmoothGradCAMPlusPlus),
    ("smoothgradcampp", SmoothGradCAMPlusPlus), ("XGrad-CAM", XGradCAM), ("LayerCAM", LayerCAM),
    ("hirescam", HiResCAM),
])
def test_get_method_aliases(alias, expected):
    method = get_method(alias)
    assert type(method) is expected
    assert METHODS[method.name] is expected


def test_registry_names_and_noise_flags():
    assert list(METHODS) == ["gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "layercam", "hirescam"]
    assert [name for name, cls in METHODS.items() if cls.needs_noise] == ["smoothgradcampp"]
    assert all(issubclass(cls, CamMethod) for cls in METHODS.values())


def test_unknown_method_raises_option_error_listing_choices():
    with pytest.raises(OptionError, match=r"unknown method 'foo': choose one of gradcam, gradcampp"):
        get_method("foo")
    with pytest.raises(OptionError):
        get_method(None)


@pytest.mark.parametrize("name,options,fragment", [
    ("gradcampp", {"denominator": "mean"}, "denominator 'mean' is not known: choose sum or weighted"),
    ("smoothgradcampp", {"numerator": "D3"}, "numerator 'D3' is not known: choose D2 or D1"),
    ("smoothgradcampp", {"averaging": 1}, "averaging 1 is not known: choose moments or maps"),
    ("gradcam", {"denominator": "sum"}, "gradcam has no option 'denominator'"),
    ("gradcampp", {"numerator": "D1"}, "gradcampp has no option 'numerator'"),
])
def test_bad_options_raise_option_error(name, options, fragment):
    with pytest.raises(OptionError) as caught:
        get_method(name, **options)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_options_are_case_insensitive_and_defaults_documented():
    method = get_method("smoothgradcampp", numerator="d1", averaging="MAPS", denominator="Weighted")
    assert (method.numerator, method.averaging, method.denominator) == ("D1", "maps", "weighted")
    default = get_method("smoothgradcampp")
    assert (default.numerator, default.averaging, default.denominator) == ("D2", "moments", "sum")
    assert get_method("gradcampp").numerator == "D2"


def test_activation_must_match_moments():
    with pytest.raises(ValueError, match="match"):
        GradCAM().compute(np.ones((1, 2, 3, 3)), GradientMoments.from_gradients(np.ones((1, 2, 3, 4))))


def test_single_sample_moments_make_their_powers_only_when_read():
    """Grad-CAM reads d1 alone, so from_gradients squares and cubes g only for a method that
    reads d2 or d3 (on a GPU these float64 powers of 25 gradients cost more than the forward)."""
    g = np.random.default_rng(5).standard_normal((2, 3, 4, 4))
    moments = GradientMoments.from_gradients(g)
    get_method("gradcam").compute(np.abs(g), moments)
    assert "d2" not in vars(moments) and "d3" not in vars(moments)
    np.testing.assert_array_equal(moments.d2, g * g)
    np.testing.assert_array_equal(moments.d3, g * g * g)


@pytest.mark.parametrize("numerator", ["D2", "D1"])
@pytest.mark.parametrize("denominator", ["sum", "weighted"])
def test_the_maps_only_accumulator_gives_the_same_mean_map_bit_for_bit(numerator, denominator):
    """'maps' averaging keeps the mean map alone (moments=False): the same bits as with the moments,
    fed in any chunks, and a moments object whose shape and rows still serve the method."""
    rng = np.random.default_rng(7)
    rows = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    g = rng.standard_normal((8, 5, 3, 4))
    a = np.abs(rng.standard_normal((8, 5, 3, 4)))
    options = dict(keep_maps=True, numerator=numerator, denominator=denominator)
    full = MomentAccumulator(3, **options)
    full.add(rows, g, a)
    alone = MomentAccumulator(3, moments=False, **options)
    for part in (slice(0, 3), slice(3, 4), slice(4, 8)):
        alone.add(rows[part], g[part], a[part])
    want, got = full.result(), alone.finish()
    np.testing.assert_array_equal(got.mean_map, want.mean_map)
    np.testing.assert_array_equal(got.count, [2, 3, 3])
    assert got.d1 is None and got.shape == (3, 5, 3, 4) and got.rows(1, 3).shape == (2, 5, 3, 4)
    method = get_method("smoothgradcampp", averaging="maps", numerator=numerator, denominator=denominator)
    np.testing.assert_array_equal(method.compute(a[[0, 2, 5]], got).maps, method.compute(a[[0, 2, 5]], want).maps)
    with pytest.raises(ValueError, match="moments=False keeps nothing without keep_maps"):
        MomentAccumulator(1, moments=False)
