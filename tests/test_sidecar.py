"""Preprocessing and class names read from a Hugging Face or timm config next to the model.

The JSON below is what transformers 5.24 and timm 1.0.31 write (``save_pretrained``,
``save_config_for_hf``), trimmed. Where transformers or timm is installed, their own image
processors and transforms are the oracle: the pixels onnxcam feeds must be theirs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from onnxcam.errors import ModelError
from onnxcam.explain import Explainer
from onnxcam.explain.sidecar import read_sidecar
from onnxcam.imaging import Preprocessor
from onnxcam.imaging.fit import fit_image
from tests.test_explainer import build_cnn, random_png, save_model

VIT = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
       "image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2,
       "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}
CONVNEXT = {"crop_pct": 0.875, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}
DEIT = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 256, "width": 256}}
CLIP = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}
EFFICIENTNET = {"crop_size": {"height": 289, "width": 289}, "do_center_crop": False, "do_normalize": True,
                "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "EfficientNetImageProcessor", "image_std": [0.5, 0.5, 0.5],
                "include_top": True, "resample": 3, "rescale_factor": 0.00392156862745098,
                "rescale_offset": True, "size": {"height": 240, "width": 240}}
TIMM = {"architecture": "resnet18", "num_classes": 3, "label_names": ["cat", "dog", "bird"],
        "pretrained_cfg": {"input_size": [3, 224, 224], "test_input_size": [3, 288, 288],
                           "interpolation": "bicubic", "crop_pct": 0.95, "test_crop_pct": 1.0,
                           "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}


def folder_with(tmp_path, processor=None, config=None):
    if processor is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / "model.onnx"


@pytest.mark.parametrize("processor, resize, fraction, interpolation, size", [
    (VIT, "stretch", None, "bilinear", (224, 224)),
    (CONVNEXT, "crop", 0.875, "bicubic", (224, 224)),
    (dict(CONVNEXT, size={"shortest_edge": 384}), "stretch", None, "bicubic", (384, 384)),
    (DEIT, "stretch-crop", 0.875, "bicubic", (224, 224)),
    (CLIP, "crop", 1.0, "bicubic", (224, 224)),
    (dict(VIT, do_resize=False), None, None, "bilinear", None),
])
def test_hugging_face_processors_give_size_crop_and_resampling(tmp_path, processor, resize, fraction,
                                                               interpolation, size):
    sidecar = read_sidecar(folder_with(tmp_path, processor))
    assert (sidecar.resize, sidecar.crop_fraction, sidecar.interpolation, sidecar.size) == \
        (resize, fraction, interpolation, size)
    assert sidecar.files == ("preprocessor_config.json",)


def test_rescaling_and_normalising_become_mean_and_std_in_0_1_units(tmp_path):
    vit = read_sidecar(folder_with(tmp_path, VIT))
    assert vit.mean == pytest.approx((0.5,) * 3) and vit.std == pytest.approx((0.5,) * 3)
    # a 0-255 model without normalisation: x = p, i.e. (p / 255 - 0) / (1 / 255)
    raw = read_sidecar(folder_with(tmp_path, dict(VIT, do_rescale=False, do_normalize=False)))
    assert raw.mean == pytest.approx((0.0,)) and raw.std == pytest.approx((1 / 255,))
    # a [-1, 1] model by rescale_factor 1/127.5 and offset 1: (p / 127.5 - 1)
    signed = read_sidecar(folder_with(tmp_path, dict(VIT, rescale_factor=1 / 127.5, do_normalize=False,
                                                     rescale_offset=True, image_processor_type="X")))
    pixels = np.array([0.0, 127.5, 255.0])
    assert (pixels / 255 - signed.mean[0]) / signed.std[0] == pytest.approx([-1, 0, 1])
    # EfficientNet's processor subtracts 1 after rescaling and, with include_top, divides by std twice
    effnet = read_sidecar(folder_with(tmp_path, EFFICIENTNET))
    assert (200 / 255 - effnet.mean[0]) / effnet.std[0] == pytest.approx(((200 / 255 - 1) - 0.5) / 0.5 / 0.5)


def test_timm_config_gives_crop_labels_and_the_test_size_crop(tmp_path):
    sidecar = read_sidecar(folder_with(tmp_path, config=TIMM))
    assert (sidecar.resize, sidecar.crop_fraction, sidecar.interpolation, sidecar.size) == \
        ("crop", 0.95, "bicubic", (224, 224))
    assert sidecar.labels == ["cat", "dog", "bird"] and sidecar.files == ("config.json",)
    assert sidecar.crop_fraction_at((224, 224)) == 0.95 and sidecar.crop_fraction_at((288, 288)) == 1.0
    squash = dict(TIMM, pretrained_cfg=dict(TIMM["pretrained_cfg"], crop_mode="squash"))
    assert read_sidecar(folder_with(tmp_path, config=squash)).resize == "stretch-crop"


def test_hugging_face_crops_split_an_odd_margin_as_transformers_does(tmp_path):
    assert read_sidecar(folder_with(tmp_path, CLIP)).centring == "floor"
    (tmp_path / "timm").mkdir()
    assert read_sidecar(folder_with(tmp_path / "timm", config=TIMM)).centring == "round"
    # a 451 x 301 image, shortest edge to 224: 335 x 224, a margin of 111 columns
    assert fit_image((301, 451), (224, 224), "crop", 1.0, centring="floor").offset == (0, 55)
    assert fit_image((301, 451), (224, 224), "crop", 1.0).offset == (0, 56)  # torchvision: round(55.5)


def test_transformers_labels_and_what_is_not_ours(tmp_path):
    config = {"id2label": {"1": "dog", "0": "cat", "2": "bird"}, "model_type": "vit"}
    assert read_sidecar(folder_with(tmp_path, config=config)).labels == ["cat", "dog", "bird"]
    placeholders = {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}
    assert read_sidecar(folder_with(tmp_path, config=placeholders)) is None
    assert read_sidecar(folder_with(tmp_path, config={"learning_rate": 0.1})) is None  # someone else's
    (tmp_path / "config.json").write_text("// a JSON-with-comments config of another tool\n{}")
    assert read_sidecar(tmp_path / "model.onnx") is None
    assert read_sidecar(tmp_path / "elsewhere" / "model.onnx") is None
    assert read_sidecar(onnx.ModelProto()) is None


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not readable JSON"),
    (json.dumps(dict(VIT, image_mean="half")), "image_mean 'half' is not a list of numbers"),
    (json.dumps(dict(VIT, rescale_factor=0)), "rescale_factor 0 is not a positive number"),
])
def test_a_broken_processor_file_is_a_one_line_error_naming_it(tmp_path, text, fragment):
    (tmp_path / "preprocessor_config.json").write_text(text)
    with pytest.raises(ModelError) as info:
        read_sidecar(tmp_path / "model.onnx")
    assert "preprocessor_config.json" in str(info.value) and fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_a_broken_id2label_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelError, match="id2label does not number the classes 0 to 1"):
        read_sidecar(folder_with(tmp_path, config={"id2label": {"0": "a", "5": "b"}}))


# ---------------------------------------------------------------------------------------------
# through the explainer


def dynamic_cnn(tmp_path, classes: int = 3):
    """build_cnn with a symbolic height and width, saved in its own folder."""
    model = build_cnn("mlp", seed=4, classes=classes)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    tmp_path.mkdir(exist_ok=True)
    return save_model(model, tmp_path / "model.onnx")


def test_the_explainer_takes_size_preprocessing_and_labels_from_the_folder(tmp_path):
    model = dynamic_cnn(tmp_path / "export")
    processor = dict(DEIT, size={"height": 35, "width": 35}, crop_size={"height": 32, "width": 32})
    folder_with(tmp_path / "export", processor, {"id2label": {"0": "cat", "1": "dog", "2": "bird"}})
    image = random_png(tmp_path / "a.png", size=(64, 48))
    explainer = Explainer(model)
    assert explainer.model_size == (32, 32)  # no --size needed
    assert explainer.labels == ["cat", "dog", "bird"]
    assert explainer.labels_source == "config.json next to the model"
    info = explainer.preprocessing_info()
    assert info["source"] == "preprocessor_config.json and config.json next to the model"
    assert (info["resize"], info["crop_fraction"], info["interpolation"]) == ("stretch-crop", 32 / 35, "bicubic")
    assert info["mean"] == pytest.approx([0.5] * 3) and info["std"] == pytest.approx([0.5] * 3)
    # 35 -> 32: a margin of 3, split 1 + 2 as transformers does (torchvision: 2 + 1)
    fed = explainer.preprocess(image)[0]
    for centring, same in (("floor", True), ("round", False)):
        expected = Preprocessor((32, 32), mean=0.5, std=0.5, resize="stretch-crop", crop_fraction=32 / 35,
                                interpolation="bicubic", centring=centring)(Image.open(image))
        assert np.array_equal(fed, expected) == same
    assert explainer.explain(image, method="gradcam")[0].label in {"cat", "dog", "bird"}


def test_options_and_metadata_come_before_the_folder(tmp_path):
    model = dynamic_cnn(tmp_path / "export", classes=3)
    folder_with(tmp_path / "export", dict(VIT, size={"height": 32, "width": 32}), TIMM)
    explainer = Explainer(model, preprocess="unit", resize="pad", interpolation="nearest", labels=["x", "y", "z"])
    info = explainer.preprocessing_info()
    assert (info["preset"], info["source"], info["resize"], info["interpolation"]) == \
        ("unit", "options", "pad", "nearest")
    assert explainer.labels == ["x", "y", "z"]
    proto = onnx.load(str(model))
    onnx.helper.set_model_props(proto, {"onnxcam.preprocess": "raw", "onnxcam.labels": '["p", "q", "r"]'})
    save_model(proto, model)
    explainer = Explainer(model)
    assert explainer.preprocessing_info()["preset"] == "raw" and explainer.labels == ["p", "q", "r"]
    assert explainer.resize == "stretch"  # the ViT processor: the folder still says how to resize


def test_labels_in_the_folder_that_do_not_fit_the_model_are_not_used(tmp_path):
    model = dynamic_cnn(tmp_path / "export", classes=10)
    folder_with(tmp_path / "export", dict(VIT, size={"height": 32, "width": 32}), TIMM)  # 3 names
    assert Explainer(model).labels is None


# ---------------------------------------------------------------------------------------------
# the libraries themselves, where installed


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("name, arguments", [
    ("ViTImageProcessorPil", {}), ("ConvNextImageProcessorPil", {"size": {"shortest_edge": 224}}),
    ("ConvNextImageProcessorPil", {}), ("DeiTImageProcessorPil", {}), ("CLIPImageProcessorPil", {}),
    ("MobileNetV2ImageProcessorPil", {}), ("BitImageProcessorPil", {}),
    ("EfficientNetImageProcessorPil", {"rescale_offset": True, "size": {"height": 240, "width": 240}}),
])
def test_the_pixels_are_those_of_the_transformers_processor(tmp_path, name, arguments):
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, name, None)
    if processor_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    processor = processor_class(**arguments)
    processor.save_pretrained(tmp_path)
    sidecar = read_sidecar(tmp_path / "model.onnx")
    ours = Preprocessor(sidecar.size, mean=sidecar.mean, std=sidecar.std, resize=sidecar.resize or "stretch",
                        crop_fraction=sidecar.crop_fraction, interpolation=sidecar.interpolation,
                        centring=sidecar.centring)
    for width, height in [(451, 300), (300, 451), (256, 256), (451, 301), (301, 451)]:  # odd margins too
        image = noise_image(width, height, seed=width)
        expected = processor(image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours(image), expected, atol=1e-5)


@pytest.mark.parametrize("architecture, overlay", [
    ("resnet18", {}), ("vit_tiny_patch16_224", {}), ("resnet18", {"crop_mode": "squash"})])
def test_the_pixels_are_those_of_the_timm_transform(tmp_path, architecture, overlay):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config
    from timm.models import _hub

    model = timm.create_model(architecture, pretrained=False, num_classes=3, pretrained_cfg_overlay=overlay)
    _hub.save_config_for_hf(model, tmp_path / "config.json")
    sidecar = read_sidecar(tmp_path / "model.onnx")
    transform = create_transform(**resolve_data_config(model=model))
    ours = Preprocessor(sidecar.size, mean=sidecar.mean, std=sidecar.std, resize=sidecar.resize,
                        crop_fraction=sidecar.crop_fraction, interpolation=sidecar.interpolation,
                        centring=sidecar.centring)
    for width, height in [(451, 300), (300, 451), (256, 256), (451, 301), (301, 451)]:
        image = noise_image(width, height, seed=height)
        np.testing.assert_allclose(ours(image), transform(image).numpy(), atol=1e-5)


def test_a_model_exported_at_timms_test_size_takes_the_test_crop(tmp_path):
    (tmp_path / "export").mkdir()
    model = save_model(build_cnn("mlp", seed=4, classes=3), tmp_path / "export" / "model.onnx")  # 32 x 32
    timm_config = dict(TIMM, pretrained_cfg=dict(TIMM["pretrained_cfg"], input_size=[3, 24, 24],
                                                 test_input_size=[3, 32, 32]))
    folder_with(tmp_path / "export", config=timm_config)
    assert (Explainer(model).resize, Explainer(model).crop_fraction) == ("crop", 1.0)
    timm_config["pretrained_cfg"]["test_input_size"] = [3, 48, 48]
    folder_with(tmp_path / "export", config=timm_config)
    assert Explainer(model).crop_fraction == 0.95


def test_inspect_shows_what_the_folder_says(tmp_path):
    from tests.cli_helpers import run

    model = dynamic_cnn(tmp_path / "export")
    folder_with(tmp_path / "export", dict(VIT, size={"height": 32, "width": 32}),
                {"id2label": {"0": "cat", "1": "dog", "2": "bird"}})
    result = run(["inspect", model])
    assert result.exit_code == 0, result.output
    assert "Labels: config.json next to the model (cat, dog, bird" in result.output
    assert "Preprocessing: from preprocessor_config.json and config.json next to the model: mean=0.5,0.5,0.5" \
        in result.output
    assert "the input size is dynamic: 32x32 from" in result.output
    (tmp_path / "export" / "preprocessor_config.json").write_text("{")
    broken = run(["inspect", model])
    assert broken.exit_code != 0 and "preprocessor_config.json" in broken.output and "Traceback" not in broken.output


def test_an_exported_transformers_vit_is_fed_as_its_processor_feeds_it(tmp_path):
    """A ViT with a dynamic input size, its processor and id2label saved beside it: onnxcam finds
    the size, mean, std, resampling and class names, and its probabilities are the model's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "ViTImageProcessorPil"):
        pytest.skip("this transformers has no Pillow ViT processor")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=3,
                                    id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2})
    model = transformers.ViTForImageClassification(config).eval()
    processor = transformers.ViTImageProcessorPil(size={"height": 64, "width": 64}, resample=3)
    config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(tmp_path / "model.onnx"), input_names=["pixel_values"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}})
    image = noise_image(90, 60, seed=3)
    with torch.no_grad():
        expected = torch.softmax(model(**processor(image, return_tensors="pt")).logits, -1)[0].numpy()
    results = Explainer(tmp_path / "model.onnx").explain(image, method="gradcam", targets=[[0, 1, 2]])
    assert [result.label for result in results] == ["cat", "dog", "bird"]
    np.testing.assert_allclose([result.probability for result in results], expected, atol=1e-5)
