"""Fitting images of any shape to the model: stretch, centre crop, pad, and the map placed back.

The oracles are independent of the code under test: hand-computed sizes, images whose colours
split at known columns, and cases where the resize scale is exactly 1, so that the map on the
image must equal, pixel for pixel, the map at the model's input size cut or placed by hand.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from onnxcam.cams import normalize, upsample_bilinear
from onnxcam.errors import ModelError, OptionError
from onnxcam.evaluation.check import load_check_config
from onnxcam.evaluation.datasets import Sample
from onnxcam.explain import Explainer
from onnxcam.explain.result import Explanation
from onnxcam.imaging import Preprocessor, compare_grid
from onnxcam.imaging.fit import check_resize, fit_image
from onnxcam.metrics.regions import scale_boxes
from tests.cli_helpers import assert_one_line_error, run
from tests.test_explainer import build_cnn, random_png, save_model


# ---------------------------------------------------------------------------------------------
# the fit: sizes and offsets


def test_crop_sizes_follow_torchvision_resize_256_and_center_crop_224():
    # a 451 x 300 (W x H) image: the height is the shorter side -> 256, width int(451 * 256 / 300) = 384
    fit = fit_image((300, 451), (224, 224), "crop", 0.875)
    assert fit.resized == (256, 384)
    assert fit.offset == (16, 80)  # round(32 / 2), round(160 / 2)
    top, left, height, width = fit.footprint
    assert (top, left) == pytest.approx((16 * 300 / 256, 80 * 451 / 384))
    assert (height, width) == pytest.approx((224 * 300 / 256, 224 * 451 / 384))
    # a portrait image: the width binds
    assert fit_image((451, 300), (224, 224), "crop", 0.875).resized == (384, 256)
    # timm's crop_pct for 299 inputs: floor(299 / 0.875) = 341
    assert fit_image((500, 500), (299, 299), "crop", 0.875).resized == (341, 341)
    # an odd margin rounds half to even, as torchvision's int(round(35 / 2)) = 18
    assert fit_image((224, 259), (224, 224), "crop", 1.0).offset == (0, 18)
    # a fraction computed as 224 / 256 still covers 256 (not 255.99... -> 255)
    assert fit_image((100, 100), (224, 224), "crop", 224 / 256).resized == (256, 256)


def test_pad_keeps_the_aspect_ratio_inside_the_model_input():
    fit = fit_image((300, 451), (224, 224), "pad")
    assert fit.resized == (149, 224)  # round(300 * 224 / 451)
    assert fit.offset == (-37, 0)     # (224 - 149) // 2 rows of padding above
    top, left, height, width = fit.footprint
    assert top == pytest.approx(-37 * 300 / 149) and left == 0
    assert fit_image((10, 1000), (32, 32), "pad").resized == (1, 32)  # never 0 rows


def test_stretch_is_the_whole_image():
    fit = fit_image((300, 451), (224, 224), "stretch")
    assert fit.is_whole_image and fit.footprint == pytest.approx((0, 0, 300, 451))
    assert not fit_image((300, 451), (224, 224), "crop").is_whole_image


@pytest.mark.parametrize("height, width", [(1, 1), (7, 500), (500, 7), (223, 225), (224, 224), (1000, 999)])
@pytest.mark.parametrize("model", [(224, 224), (32, 48)])
def test_every_fit_takes_a_full_window(height, width, model):
    for mode, fraction in (("crop", 0.875), ("crop", 1.0), ("crop", 0.3), ("pad", None)):
        fit = fit_image((height, width), model, mode, fraction)
        (top, left), (rows, columns) = fit.offset, fit.resized
        if mode == "crop":  # the window lies inside the resized image, centred
            assert 0 <= top and top + model[0] <= rows and 0 <= left and left + model[1] <= columns
            assert abs((rows - model[0]) - 2 * top) <= 1 and abs((columns - model[1]) - 2 * left) <= 1
        else:  # the resized image lies inside the window, centred
            assert 1 <= rows <= model[0] and 1 <= columns <= model[1]
            assert -top + rows <= model[0] and -left + columns <= model[1]
            assert rows == model[0] or columns == model[1]


@pytest.mark.parametrize("mode, fraction, fragment", [
    ("zoom", None, "unknown resize mode 'zoom'"), ("crop", 0.0, "crop fraction 0.0 must be in (0, 1]"),
    ("crop", 1.5, "must be in (0, 1]"), ("crop", float("nan"), "must be in (0, 1]"),
    ("pad", 0.9, "only applies when cropping"), (None, 0.9, "only applies when cropping")])
def test_bad_resize_options_name_the_value(mode, fraction, fragment):
    with pytest.raises(OptionError, match=None) as info:
        check_resize(mode, fraction)
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------------
# the pixels the model gets


def two_colours(width: int, height: int, split: int) -> Image.Image:
    """Red for x < split, blue from there on."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :split, 0] = 255
    pixels[:, split:, 2] = 255
    return Image.fromarray(pixels)


def test_the_model_sees_the_centre_the_whole_image_or_the_padded_image():
    image = two_colours(400, 200, split=100)  # red in the left quarter
    # stretch to 100 x 100: red in the left quarter, columns 0-24
    stretched = Preprocessor((100, 100), preset="unit", resize="stretch")(image)
    assert stretched[0, :, :24].min() > 0.99 and stretched[0, :, 26:].max() < 0.01
    # crop with fraction 1: resized to 100 x 200 (red x < 50), the centre columns 50-149: all blue
    cropped = Preprocessor((100, 100), preset="unit", resize="crop", crop_fraction=1.0)(image)
    assert cropped[0, :, 1:].max() < 0.01 and cropped[2].min() > 0.5
    # crop with fraction 0.5: resized to 200 x 400 (no resampling), columns 150-249: all blue
    assert Preprocessor((100, 100), preset="unit", resize="crop", crop_fraction=0.5)(image)[0].max() == 0
    # pad: resized to 50 x 100 in rows 25-74; red in its first 25 columns; the rest the mean colour
    padded = Preprocessor((100, 100), preset="imagenet", resize="pad")(image)
    assert np.all(padded[:, :25] == 0) and np.all(padded[:, 75:] == 0)
    assert padded[0, 25:75, :24].min() > 2.0 and padded[2, 25:75, 26:].min() > 2.0


def test_crop_feeds_the_pixels_of_torchvision_resize_and_center_crop():
    transforms = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    for width, height in [(451, 300), (300, 451), (640, 480), (257, 911), (224, 224)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        pipeline = transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        expected = pipeline(image).numpy()
        ours = Preprocessor((224, 224), resize="crop", crop_fraction=0.875)(image)
        np.testing.assert_allclose(ours, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the map placed back on the image


def explanation(raw: np.ndarray, image_size, footprint) -> Explanation:
    return Explanation(raw_map=raw, method="gradcam", options={}, layer="a", class_index=0, label=None,
                       score=0.0, probability=1.0, flat=False, image_index=0, image_size=image_size,
                       footprint=footprint)


def test_a_crop_map_is_the_model_map_on_the_crop_and_zero_outside():
    raw = np.random.default_rng(1).random((7, 7))
    # a 200 x 100 (W x H) image, model 100 x 100, fraction 1: no resampling, the crop is columns 50-149
    fit = fit_image((100, 200), (100, 100), "crop", 1.0)
    result = explanation(raw, (100, 200), fit.footprint)
    expected = normalize(upsample_bilinear(raw, (100, 100)))
    np.testing.assert_allclose(result.map[:, 50:150], expected, atol=1e-6)
    assert np.all(result.map[:, :50] == 0) and np.all(result.map[:, 150:] == 0)
    assert result.seen[:, 50:150].all() and not result.seen[:, :50].any() and not result.seen[:, 150:].any()


def test_a_pad_map_is_the_model_map_without_the_padding():
    raw = np.random.default_rng(2).random((7, 7))
    # a 100 x 50 (W x H) image, model 100 x 100: the image fills rows 25-74 of the model input
    fit = fit_image((50, 100), (100, 100), "pad")
    assert fit.offset == (-25, 0)
    result = explanation(raw, (50, 100), fit.footprint)
    expected = normalize(upsample_bilinear(raw, (100, 100))[25:75])
    np.testing.assert_allclose(result.map, expected, atol=1e-6)
    assert result.seen is None  # the model saw the whole image


def test_the_whole_image_footprint_is_the_plain_upsampling_bit_for_bit():
    raw = np.random.default_rng(3).random((2, 7, 5))
    plain = upsample_bilinear(raw, (45, 61))
    assert np.array_equal(plain, upsample_bilinear(raw, (45, 61), (0.0, 0.0, 45.0, 61.0)))
    assert np.array_equal(explanation(raw[0], (45, 61), None).map, normalize(plain[0]))


def test_the_overlay_leaves_what_the_model_did_not_see_uncoloured():
    raw = np.random.default_rng(4).random((7, 7))
    fit = fit_image((100, 200), (100, 100), "crop", 1.0)
    result = explanation(raw, (100, 200), fit.footprint)
    result._image = Image.fromarray(np.full((100, 200, 3), 200, dtype=np.uint8))
    picture = np.asarray(result.overlay(alpha=0.5))
    assert np.all(picture[:, :50] == 100) and np.all(picture[:, 150:] == 100)  # only darkened
    assert np.any(picture[:, 50:150] != 100)


def test_the_compare_figure_leaves_what_the_model_did_not_see_uncoloured():
    grey = Image.fromarray(np.full((60, 90, 3), 128, dtype=np.uint8))
    panels = [("A", np.random.default_rng(5).random((60, 90)))]

    def colourful(figure) -> bool:
        pixels = np.asarray(figure).astype(int)
        return bool(np.any(pixels[..., 0] != pixels[..., 1]) or np.any(pixels[..., 1] != pixels[..., 2]))

    assert colourful(compare_grid(grey, panels))
    assert not colourful(compare_grid(grey, panels, seen=np.zeros((60, 90), dtype=bool)))
    half = np.zeros((60, 90), dtype=bool)
    half[:, 30:60] = True
    assert colourful(compare_grid(grey, panels, seen=half))


# ---------------------------------------------------------------------------------------------
# regions brought into the model's pixels


def test_boxes_follow_the_crop_and_a_box_it_leaves_out_is_empty():
    fit = fit_image((100, 200), (100, 100), "crop", 1.0)  # the crop is columns 50-149
    boxes = np.array([[60.0, 10.0, 80.0, 30.0], [0.0, 0.0, 40.0, 40.0], [140.0, 0.0, 200.0, 50.0]])
    moved = scale_boxes(boxes, (100, 200), (100, 100), fit.footprint)
    np.testing.assert_allclose(moved, [[10, 10, 30, 30], [0, 0, 0, 40], [90, 0, 100, 50]])
    # a halved model input halves them
    half = fit_image((100, 200), (50, 50), "crop", 1.0)
    np.testing.assert_allclose(scale_boxes(boxes[:1], (100, 200), (50, 50), half.footprint), [[5, 5, 15, 15]])


def test_masks_follow_the_crop_and_the_padding(tmp_path):
    image = tmp_path / "a.png"
    random_png(image, size=(200, 100))
    mask = np.zeros((100, 200), dtype=np.uint8)
    mask[0:30, 60:80] = 255  # touching the top edge, beyond which the padding lies
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    sample = Sample(image=image, mask_path=tmp_path / "a_mask.png")
    cropped = sample.regions_at((100, 100), fit_image((100, 200), (100, 100), "crop", 1.0).footprint)
    expected = np.zeros((100, 100), dtype=bool)
    expected[0:30, 10:30] = True
    assert np.array_equal(cropped[0], expected)
    padded = sample.regions_at((200, 200), fit_image((100, 200), (200, 200), "pad").footprint)
    expected = np.zeros((200, 200), dtype=bool)
    expected[50:80, 60:80] = True  # 50 rows of padding above
    assert np.array_equal(padded[0], expected)


# ---------------------------------------------------------------------------------------------
# through the explainer, the metadata and the CLI


@pytest.fixture
def cnn(tmp_path):
    return save_model(build_cnn("mlp", seed=4), tmp_path / "cnn.onnx")


def test_explainer_crops_and_places_the_map(cnn, tmp_path):
    image = random_png(tmp_path / "wide.png", size=(64, 32))
    explainer = Explainer(cnn, resize="crop", crop_fraction=1.0)
    result = explainer.explain(image, method="gradcam")[0]
    assert result.footprint == pytest.approx((0, 16, 32, 32))  # resized to 32 x 64: the centre 32 columns
    assert result.map.shape == (32, 64) and result.map[:, :16].max() == 0 and result.map[:, 48:].max() == 0
    assert result.map[:, 16:48].max() == 1
    np.testing.assert_allclose(result.map[:, 16:48], normalize(upsample_bilinear(result.raw_map, (32, 32))),
                               atol=1e-6)
    # the model is fed the centre of the image: the same as explaining the centre itself
    centre = Image.open(image).crop((16, 0, 48, 32))
    alone = Explainer(cnn).explain(centre, method="gradcam")[0]
    np.testing.assert_allclose(result.raw_map, alone.raw_map, rtol=1e-5, atol=1e-6)
    assert result.to_dict()["footprint"] == {"top": 0.0, "left": 16.0, "height": 32.0, "width": 32.0}
    assert result.extra["preprocessing"]["resize"] == "crop"


def test_metadata_chooses_the_resize_and_options_override_it(cnn, tmp_path):
    model = onnx.load(str(cnn))
    onnx.helper.set_model_props(model, {"onnxcam.resize": "crop", "onnxcam.crop_fraction": "0.5"})
    path = save_model(model, tmp_path / "cropped.onnx")
    explainer = Explainer(path)
    assert (explainer.resize, explainer.crop_fraction) == ("crop", 0.5)
    assert Explainer(path, resize="pad").resize == "pad"
    # the mode alone keeps the metadata's fraction for that mode, not for another one
    assert Explainer(path, resize="crop").crop_fraction == 0.5
    assert Explainer(path, resize="stretch-crop").crop_fraction == 0.875
    assert Explainer(path, resize="crop", crop_fraction=0.9).crop_fraction == 0.9
    onnx.helper.set_model_props(model, {"onnxcam.resize": "squash"})
    with pytest.raises(ModelError, match="metadata onnxcam.resize.*unknown resize mode 'squash'"):
        Explainer(save_model(model, tmp_path / "bad.onnx"))


def test_cli_writes_the_footprint_and_refuses_a_stray_crop_fraction(cnn, tmp_path):
    image = random_png(tmp_path / "wide.png", size=(64, 32))
    result = run(["explain", cnn, image, "--resize", "crop", "--crop-fraction", "1", "--method", "gradcam",
                  "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert record["footprint"] == {"top": 0.0, "left": 16.0, "height": 32.0, "width": 32.0}
    assert record["preprocessing"]["resize"] == "crop" and record["preprocessing"]["crop_fraction"] == 1.0
    stray = run(["explain", cnn, image, "--crop-fraction", "0.9", "--out", tmp_path / "out2"])
    assert_one_line_error(stray, "crop fraction", "resize mode 'crop'")
    assert not (tmp_path / "out2").exists()


def test_evaluate_scores_regions_in_the_cropped_input(cnn, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        random_png(data / f"{name}.png", size=(64, 32), seed=ord(name))
    # a's box is the centre the crop keeps; b's the left quarter it cuts away
    manifest = [{"image": "a.png", "label": 0, "boxes": [[16, 0, 48, 32]]},
                {"image": "b.png", "label": 0, "boxes": [[0, 0, 12, 32]]}]
    (data / "manifest.json").write_text(json.dumps(manifest))
    result = run(["evaluate", cnn, data, "--methods", "gradcam", "--resize", "crop", "--crop-fraction", "1",
                  "--steps", "4", "--tolerance", "0", "--json", "--out", tmp_path / "eval"])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert document["settings"]["preprocessing"]["resize"] == "crop"
    samples = document["samples"]
    scores = {entry["sample"]: entry["methods"]["gradcam"] for entry in samples}
    assert scores["b.png"]["pointing_hit"] is False and scores["b.png"]["energy"] == 0  # never seen
    assert scores["a.png"]["pointing_hit"] is True and scores["a.png"]["energy"] == pytest.approx(1)


def test_check_file_takes_resize_and_names_a_bad_one(cnn, tmp_path):
    image = random_png(tmp_path / "a.png", size=(64, 32))
    text = (f'model = "{cnn.name}"\nresize = "crop"\ncrop_fraction = 1.0\n[[images]]\npath = "{image.name}"\n'
            "class = 0\n")
    (tmp_path / "ok.toml").write_text(text)
    config = load_check_config(tmp_path / "ok.toml")
    assert (config.resize, config.crop_fraction) == ("crop", 1.0)
    (tmp_path / "bad.toml").write_text(text.replace('"crop"', '"zoom"'))
    with pytest.raises(Exception, match="bad.toml: unknown resize mode 'zoom'"):
        load_check_config(tmp_path / "bad.toml")
