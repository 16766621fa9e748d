"""Tests for onnxcam.imaging: reading images, preprocessing, colormaps, overlays and the grid figure."""

from __future__ import annotations

import importlib
import io

import numpy as np
import pytest
from PIL import Image

from onnxcam.errors import ImageError, ModelError, OptionError
from onnxcam.imaging import (
    COLORMAPS,
    PRESETS,
    Preprocessor,
    apply_colormap,
    compare_grid,
    detect_layout,
    find_images,
    load_image,
    overlay,
)

# ---------------------------------------------------------------------------------------------
# helpers


def save(image: Image.Image, path, **params):
    image.save(path, **params)
    return path


def snapshot(folder):
    """{name: bytes} of every file in a folder, to prove that loading changed nothing."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_one_line_error(excinfo, filename: str):
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message
    assert filename in message, message


@pytest.fixture
def pattern():
    """A 12x8 RGB image with distinct pixels, so a wrong transpose or channel swap shows."""
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# load_image: formats and modes


@pytest.mark.parametrize(
    "suffix, params, lossless",
    [
        (".png", {}, True),
        (".bmp", {}, True),
        (".tif", {}, True),
        (".webp", {"lossless": True}, True),
        (".jpg", {"quality": 95, "subsampling": 0}, False),
    ],
)
def test_load_image_reads_common_formats_as_rgb(tmp_path, pattern, suffix, params, lossless):
    path = save(pattern, tmp_path / f"img{suffix}", **params)
    before = snapshot(tmp_path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == pattern.size
    if lossless:
        assert np.array_equal(np.asarray(loaded), np.asarray(pattern))
    else:
        assert np.abs(np.asarray(loaded, np.int16) - np.asarray(pattern, np.int16)).mean() < 12
    assert snapshot(tmp_path) == before


def test_load_image_scales_16_bit_grey_instead_of_clipping(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I;16")  # the test really exercises 16-bit data
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (1, 4, 3)
    assert loaded[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.array_equal(loaded[..., 0], loaded[..., 1]) and np.array_equal(loaded[..., 0], loaded[..., 2])


def test_load_image_scales_32_bit_integer_and_float_images(tmp_path):
    ints = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert ints.mode == "I"
    save(ints, tmp_path / "int.tif")
    assert np.asarray(load_image(tmp_path / "int.tif"))[0, :, 0].tolist() == [0, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    save(floats, tmp_path / "float.tif")
    assert np.asarray(load_image(tmp_path / "float.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_load_image_converts_grey_to_rgb(tmp_path):
    grey = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8))
    loaded = np.asarray(load_image(save(grey, tmp_path / "grey.png")))
    assert loaded.tolist() == [[[0, 0, 0], [100, 100, 100], [255, 255, 255]]]


def test_load_image_composites_alpha_onto_white(tmp_path):
    rgba = np.array([[[200, 10, 20, 255], [200, 10, 20, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    loaded = np.asarray(load_image(save(Image.fromarray(rgba), tmp_path / "alpha.png")))
    assert loaded[0, 0].tolist() == [200, 10, 20]  # opaque: unchanged
    assert loaded[0, 1].tolist() == [255, 255, 255]  # transparent: the white background
    assert np.allclose(loaded[0, 2], 127, atol=1)  # half-transparent black over white: mid grey


def test_load_image_converts_palette_images(tmp_path):
    palette_image = Image.new("P", (3, 1))
    palette_image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    palette_image.putdata([0, 1, 2])
    loaded = np.asarray(load_image(save(palette_image, tmp_path / "palette.png")))
    assert loaded.tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]
    save(palette_image, tmp_path / "transparent.png", transparency=1)
    loaded = np.asarray(load_image(tmp_path / "transparent.png"))
    assert loaded.tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]]


def test_load_image_converts_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    loaded = np.asarray(load_image(save(cmyk, tmp_path / "cmyk.tif")))
    assert loaded[0, 0].tolist() == [255, 0, 0]


def test_load_image_applies_exif_orientation(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(stored, tmp_path / "phone.jpg", exif=exif, quality=95)
    before = path.read_bytes()
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    pixels = np.asarray(loaded)
    assert pixels[4, 15, 0] > 200 and pixels[4, 15, 2] < 60  # the red block is now top-right
    assert pixels[4, 4, 2] > 200  # top-left is blue
    assert path.read_bytes() == before


def test_load_image_reads_only_the_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(tmp_path / "anim.gif"))[0, 0].tolist() == [255, 0, 0]


# ---------------------------------------------------------------------------------------------
# load_image: errors


def encoded(image_format: str) -> bytes:
    """A 64x64 noise image encoded in memory, to be cut short into a truncated file."""
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, image_format)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "filename, content, expected",
    [
        ("empty.png", b"", "empty"),
        ("noise.jpg", bytes(np.random.default_rng(3).integers(0, 256, 600, dtype=np.uint8)), "not an image"),
        ("notes.png", b"hello, I am text\n", "not an image"),
        ("cut.png", encoded("PNG")[:3000], "truncated"),
        ("cut.jpg", encoded("JPEG")[:1500], "truncated"),
    ],
)
def test_load_image_reports_bad_files_in_one_line(tmp_path, filename, content, expected):
    path = tmp_path / filename
    path.write_bytes(content)
    before = snapshot(tmp_path)
    with pytest.raises(ImageError, match=expected) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, filename)
    assert snapshot(tmp_path) == before


def test_load_image_reports_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file") as excinfo:
        load_image(tmp_path / "absent.png")
    assert_one_line_error(excinfo, "absent.png")
    (tmp_path / "photos.png").mkdir()
    with pytest.raises(ImageError, match="folder") as excinfo:
        load_image(tmp_path / "photos.png")
    assert_one_line_error(excinfo, "photos.png")


@pytest.mark.parametrize("side, pixels", [(40, "1,600"), (50, "2,500")])  # Pillow: warning, then error
def test_load_image_refuses_decompression_bombs(tmp_path, monkeypatch, side, pixels):
    path = save(Image.new("RGB", (side, side)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression-bomb") as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, "bomb.png")
    assert pixels in str(excinfo.value) and "1,000" in str(excinfo.value)


def test_load_image_escapes_control_characters_in_the_name(tmp_path):
    with pytest.raises(ImageError) as excinfo:
        load_image(tmp_path / "line\nbreak.png")
    assert "\n" not in str(excinfo.value) and "line\\nbreak.png" in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# find_images


def test_find_images_expands_folders_sorted_and_filtered(tmp_path, pattern):
    for name in ("b.JPG", "a.png", "c.webp", ".hidden.png"):
        save(pattern.convert("RGB"), tmp_path / name, format={"JPG": "JPEG"}.get(name[-3:], None))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    save(pattern, tmp_path / "sub" / "deep.png")
    assert [p.name for p in find_images([tmp_path])] == ["a.png", "b.JPG", "c.webp"]


def test_find_images_keeps_files_as_given_in_order_without_duplicates(tmp_path, pattern):
    folder = tmp_path / "set"
    folder.mkdir()
    save(pattern, folder / "x.png")
    odd = tmp_path / "scan.data"
    odd.write_bytes(b"whatever")
    found = find_images([odd, folder, folder / "x.png"])
    assert found == [odd, folder / "x.png"]


def test_find_images_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file") as excinfo:
        find_images([tmp_path / "ghost.jpg"])
    assert_one_line_error(excinfo, "ghost.jpg")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ImageError, match="no image files") as excinfo:
        find_images([empty])
    assert_one_line_error(excinfo, "empty_folder")
    assert find_images([]) == []


# ---------------------------------------------------------------------------------------------
# Preprocessor


RGB = (10, 128, 250)


def solid(colour=RGB, size=(2, 2)):
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("imagenet", [(10 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (250 / 255 - 0.406) / 0.225]),
        ("caffe", [250 - 103.939, 128 - 116.779, 10 - 123.68]),  # BGR order
        ("unit", [10 / 255, 128 / 255, 250 / 255]),
        ("symmetric", [10 / 127.5 - 1, 128 / 127.5 - 1, 250 / 127.5 - 1]),
        ("raw", [10.0, 128.0, 250.0]),
    ],
)
def test_presets_match_hand_computed_values(preset, expected):
    tensor = Preprocessor((2, 2), preset=preset)(solid())
    assert tensor.dtype == np.float32 and tensor.shape == (3, 2, 2)
    assert np.allclose(tensor[:, 0, 0], expected, rtol=1e-6, atol=1e-5)
    assert np.allclose(tensor, tensor[:, :1, :1])


def test_presets_are_all_tested():
    assert set(PRESETS) == {"imagenet", "caffe", "unit", "symmetric", "raw"}


def test_explicit_mean_and_std_use_the_presets_units():
    tensor = Preprocessor((2, 2), preset="unit", mean=0.5, std=(0.25, 0.5, 1.0))(solid())
    expected = [(10 / 255 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.5, (250 / 255 - 0.5) / 1.0]
    assert np.allclose(tensor[:, 0, 0], expected, atol=1e-6)
    caffe = Preprocessor((2, 2), preset="caffe", mean=(100, 100, 100))(solid())
    assert np.allclose(caffe[:, 0, 0], [150, 28, -90])


def test_layout_and_resize_put_height_and_width_in_place():
    image = Image.new("RGB", (8, 4), RGB)  # width 8, height 4
    nchw = Preprocessor((3, 5), layout="NCHW")(image)
    nhwc = Preprocessor((3, 5), layout="nhwc")(image)
    assert nchw.shape == (3, 3, 5) and nhwc.shape == (3, 5, 3)
    assert np.allclose(nchw.transpose(1, 2, 0), nhwc)


def test_resize_covers_the_whole_image_without_cropping():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 2, 10))  # a white strip at the far left edge
    tensor = Preprocessor((10, 10), preset="raw")(image)
    assert tensor[0, :, 0].min() > 100  # still visible after resizing: nothing was cropped
    assert tensor[0, :, -1].max() == 0


def test_single_channel_uses_grey_and_averaged_preset():
    tensor = Preprocessor((2, 2), channels=1)(solid((100, 100, 100)))
    assert tensor.shape == (1, 2, 2)
    mean, std = np.mean([0.485, 0.456, 0.406]), np.mean([0.229, 0.224, 0.225])
    assert np.allclose(tensor, (100 / 255 - mean) / std, atol=1e-6)


def test_batch_stacks_and_handles_empty():
    pre = Preprocessor((4, 4), layout="NHWC")
    assert pre.batch([solid(), solid((0, 0, 0))]).shape == (2, 4, 4, 3)
    assert pre.batch([]).shape == (0, 4, 4, 3)


@pytest.mark.parametrize(
    "kwargs, listed",
    [
        ({"preset": "tensorflow"}, "imagenet"),
        ({"layout": "CHW"}, "NHWC"),
        ({"channels": 2}, "1"),
        ({"std": (1, 0, 1)}, "std"),
        ({"mean": (1, 2)}, "mean"),
        ({"size": (0, 224)}, "size"),
        ({"size": ("h", "w")}, "size"),
    ],
)
def test_bad_preprocessing_options_raise_option_error(kwargs, listed):
    arguments = {"size": (4, 4), **kwargs}
    with pytest.raises(OptionError, match=listed) as excinfo:
        Preprocessor(**arguments)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ([1, 3, 224, 224], ("NCHW", (224, 224), 3)),
        (["N", 3, 224, 224], ("NCHW", (224, 224), 3)),
        ([1, 224, 224, 3], ("NHWC", (224, 224), 3)),
        ([-1, 299, 299, 3], ("NHWC", (299, 299), 3)),
        ([1, 1, 28, 28], ("NCHW", (28, 28), 1)),
        ([1, 28, 28, 1], ("NHWC", (28, 28), 1)),
        (["batch", 3, "height", "width"], ("NCHW", (None, None), 3)),
        ([None, None, None, 3], ("NHWC", (None, None), 3)),
        ([1, 4, 64, 64], ("NCHW", (64, 64), 4)),
        ([1, 3, 3, 3], ("NCHW", (3, 3), 3)),  # ambiguous -> NCHW
        (["N", "C", "H", "W"], ("NCHW", (None, None), 3)),  # fully symbolic -> NCHW, 3 channels
    ],
)
def test_detect_layout(shape, expected):
    assert detect_layout(shape) == expected


def test_detect_layout_rejects_non_image_inputs():
    with pytest.raises(ModelError, match="input_ids"):
        detect_layout([1, 128], name="input_ids")


# ---------------------------------------------------------------------------------------------
# colormaps


def test_colormap_tables_are_256_by_3_uint8():
    for table in COLORMAPS.values():
        assert table.shape == (256, 3) and table.dtype == np.uint8


def test_turbo_follows_the_published_polynomial():
    turbo = COLORMAPS["turbo"]
    # x=0 is the constant terms, x=1 the sum of each channel's coefficients, times 255.
    assert turbo[0].tolist() == [35, 23, 27]
    assert turbo[255].tolist() == [144, 13, 0]
    assert turbo[0].sum() < 120 and turbo[255][0] > 3 * turbo[255][2]  # dark start, dark-red end
    assert turbo[128][1] > 240  # bright green-yellow in the middle
    assert turbo[64][2] > 200 and turbo[192][0] > 240  # blue-cyan at 1/4, orange at 3/4


def test_jet_is_matplotlibs_piecewise_linear_jet():
    jet = COLORMAPS["jet"]
    assert jet[0].tolist() == [0, 0, 128] and jet[255].tolist() == [128, 0, 0]
    assert jet[128].tolist() == [125, 255, 122]


def test_apply_colormap_indexes_the_table_and_clips():
    values = np.array([[0.0, 1.0], [-3.0, np.nan], [0.5, 7.0]])
    given = values.copy()
    coloured = apply_colormap(values, "gray")
    assert coloured.shape == (3, 2, 3) and coloured.dtype == np.uint8
    assert coloured[..., 0].tolist() == [[0, 255], [0, 0], [128, 255]]
    np.testing.assert_array_equal(values, given)  # worked on a copy
    with pytest.raises(OptionError, match="turbo"):
        apply_colormap(values, "rainbow")


# ---------------------------------------------------------------------------------------------
# overlay


def test_overlay_alpha_zero_is_the_image_and_one_is_the_colormap(pattern):
    heat = np.linspace(0, 1, 96).reshape(8, 12)
    assert np.array_equal(np.asarray(overlay(pattern, heat, alpha=0.0)), np.asarray(pattern))
    assert np.array_equal(np.asarray(overlay(pattern, heat, alpha=1.0)), apply_colormap(heat))
    half = np.asarray(overlay(pattern, heat, alpha=0.5), np.float64)
    expected = (np.asarray(pattern, np.float64) + apply_colormap(heat)) / 2
    assert np.abs(half - expected).max() <= 0.5 + 1e-9


def test_overlay_stretches_a_small_map_over_the_image(pattern):
    result = overlay(pattern, np.full((3, 3), 0.7), alpha=1.0, colormap="jet")
    assert result.size == pattern.size
    assert (np.asarray(result) == COLORMAPS["jet"][round(0.7 * 255)]).all()
    gradient = np.asarray(overlay(Image.new("RGB", (64, 8)), np.array([[0.0, 1.0]]), alpha=1.0, colormap="gray"))
    assert gradient[0, 0, 0] < 10 and gradient[0, -1, 0] > 245
    assert len(np.unique(gradient[0, :, 0])) > 30  # interpolated in float, not blocky


def test_overlay_blends_in_strips_as_it_would_whole(monkeypatch):
    """A large photo is coloured and blended a few rows at a time; the strips' edges do not show."""
    overlay_module = importlib.import_module("onnxcam.imaging.overlay")  # the package exports the function

    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 256, (37, 23, 3), dtype=np.uint8))
    heat, seen = rng.random((5, 4)), rng.random((37, 23)) > 0.2
    whole = np.asarray(overlay(picture, heat, alpha=0.4, seen=seen))
    monkeypatch.setattr(overlay_module, "STRIP_ROWS", 7)
    strips = np.asarray(overlay(picture, heat, alpha=0.4, seen=seen))
    np.testing.assert_array_equal(strips, whole)
    colours = apply_colormap(overlay_module.resize_map(heat, picture.size)).astype(np.float64)
    expected = np.rint(np.asarray(picture) * 0.6 + np.where(seen[..., None], colours, 0) * 0.4)
    assert np.abs(strips - expected).max() <= 1


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "half"])
def test_overlay_rejects_alpha_outside_unit_interval(pattern, alpha):
    with pytest.raises(OptionError, match="alpha"):
        overlay(pattern, np.zeros((2, 2)), alpha=alpha)


# ---------------------------------------------------------------------------------------------
# compare_grid


def test_compare_grid_size_and_layout():
    image = Image.new("RGB", (100, 50), (0, 255, 0))
    panels = [("Grad-CAM", np.ones((7, 7))), ("a title far too long to fit above a tile", np.zeros((7, 7)))]
    figure = compare_grid(image, panels, alpha=1.0, colormap="gray", tile=64)
    margin, tile_w, tile_h = 6, 64, 32
    assert figure.mode == "RGB"
    assert figure.width == margin + 3 * tile_w + 2 * margin + margin
    assert tile_h + 2 * margin + 10 < figure.height < tile_h + 2 * margin + 40
    pixels = np.asarray(figure)
    assert pixels[0, 0].tolist() == [255, 255, 255]  # white background
    row = figure.height - margin - tile_h // 2
    assert pixels[row, margin + tile_w // 2].tolist() == [0, 255, 0]  # the input
    assert pixels[row, 2 * margin + tile_w + tile_w // 2].tolist() == [255, 255, 255]  # map of ones
    assert pixels[row, 3 * margin + 2 * tile_w + tile_w // 2].tolist() == [0, 0, 0]  # map of zeros
    title_band = pixels[: figure.height - margin - tile_h - 1, margin : margin + tile_w]
    assert (title_band < 128).any()  # a title was drawn


def test_compare_grid_colorbar_and_options():
    image = Image.new("RGB", (50, 50))
    plain = compare_grid(image, [("A", np.zeros((2, 2)))], tile=64)
    with_bar = compare_grid(image, [("A", np.zeros((2, 2)))], tile=64, colorbar=True)
    assert with_bar.width > plain.width and with_bar.height == plain.height
    assert compare_grid(image, [], tile=64).width == 6 + 64 + 6
    with pytest.raises(OptionError, match="tile"):
        compare_grid(image, [], tile=4)
    with pytest.raises(OptionError, match="colormap"):
        compare_grid(image, [], colormap="nope")
