"""Upsampling and normalisation of maps: against PIL, a loop reference and hand values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from onnxcam.cams import normalize, upsample_bilinear


def naive_bilinear(image, height, width):
    """Half-pixel centres, edges clamped: source = (dst + 0.5) * in/out - 0.5, one pixel at a time."""
    h, w = image.shape
    out = np.zeros((height, width))
    for y in range(height):
        sy = min(max((y + 0.5) * h / height - 0.5, 0.0), h - 1)
        y0 = int(np.floor(sy))
        y1 = min(y0 + 1, h - 1)
        fy = sy - y0
        for x in range(width):
            sx = min(max((x + 0.5) * w / width - 0.5, 0.0), w - 1)
            x0 = int(np.floor(sx))
            x1 = min(x0 + 1, w - 1)
            fx = sx - x0
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


def smooth_random_map(seed, h, w):
    """A smooth non-negative map like a CAM: a few random Gaussian bumps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w))
    for _ in range(3):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        out += rng.uniform(0.5, 2.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.3 * h * w))
    return out


@pytest.mark.parametrize("shape,size", [((7, 7), (224, 224)), ((5, 3), (17, 29)),
                                        ((14, 14), (100, 150)), ((1, 4), (3, 9)), ((6, 8), (6, 40))])
def test_matches_pil_bilinear_when_enlarging(shape, size):
    image = smooth_random_map(sum(shape), *shape).astype(np.float32)
    pil = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    ours = upsample_bilinear(image, size)
    assert ours.shape == size and ours.dtype == np.float32
    np.testing.assert_allclose(ours, pil, rtol=0, atol=1e-4 * float(np.abs(image).max()))


@pytest.mark.parametrize("shape,size", [((3, 4), (7, 11)), ((7, 7), (32, 32)), ((4, 6), (2, 3))])
def test_matches_naive_reference_including_shrinking(shape, size):
    image = np.random.default_rng(1).normal(size=shape)
    np.testing.assert_allclose(upsample_bilinear(image, size), naive_bilinear(image, *size), atol=1e-6)


def test_hand_computed_doubling():
    # f(r, c) = 2r + c is linear, so bilinear interpolation returns 2*sy + sx at the clamped source
    # coordinates s = (d + 0.5)/2 - 0.5 = [-0.25, 0.25, 0.75, 1.25] -> clamped [0, 0.25, 0.75, 1]
    image = np.array([[0.0, 1.0], [2.0, 3.0]])
    expected = np.array([[0.0, 0.25, 0.75, 1.0],
                         [0.5, 0.75, 1.25, 1.5],
                         [1.5, 1.75, 2.25, 2.5],
                         [2.0, 2.25, 2.75, 3.0]])
    np.testing.assert_allclose(upsample_bilinear(image, (4, 4)), expected)


def test_batches_are_resized_map_by_map():
    maps = np.random.default_rng(2).random((3, 5, 6))
    batch = upsample_bilinear(maps, (11, 13))
    assert batch.shape == (3, 11, 13)
    for index in range(3):
        np.testing.assert_array_equal(batch[index], upsample_bilinear(maps[index], (11, 13)))


def test_one_pixel_and_same_size():
    np.testing.assert_array_equal(upsample_bilinear(np.array([[2.5]]), (3, 4)), np.full((3, 4), 2.5))
    image = np.random.default_rng(3).random((4, 5))
    np.testing.assert_allclose(upsample_bilinear(image, (4, 5)), image, rtol=1e-6)


@pytest.mark.parametrize("maps,size", [(np.ones(4), (2, 2)), (np.ones((2, 2)), (0, 3)),
                                       (np.ones((1, 2, 2, 2)), (3, 3))])
def test_bad_shapes_raise(maps, size):
    with pytest.raises(ValueError):
        upsample_bilinear(maps, size)


def test_normalize_min_max_per_map():
    maps = np.stack([np.array([[1.0, 3.0], [2.0, 5.0]]), np.array([[0.0, 0.5], [1.0, 0.25]])])
    out = normalize(maps)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [0.25, 1.0]])
    np.testing.assert_allclose(out[1], [[0.0, 0.5], [1.0, 0.25]])


@pytest.mark.filterwarnings("error")
def test_normalize_constant_maps_become_zeros():
    maps = np.stack([np.zeros((3, 3)), np.full((3, 3), 7.0), np.eye(3)])
    out = normalize(maps)
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(out[2], np.eye(3))
    np.testing.assert_array_equal(normalize(np.full((2, 2), -1.0)), np.zeros((2, 2)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_normalize_gives_zeros_for_a_map_with_nan_and_leaves_its_input_alone():
    maps = np.stack([np.eye(3), np.eye(3)])
    maps[1, 0, 1] = np.nan
    given = maps.copy()
    out = normalize(maps)
    np.testing.assert_array_equal(out[0], np.eye(3))
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(maps, given)
