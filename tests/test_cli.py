"""Tests for the command line (onnxcam.cli): errors, outputs, inspect and rewrite.

Every bad input must give one line "Error: ..." on stderr and exit code 2, no traceback, and
leave the input files byte for byte as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from tests.cli_helpers import assert_one_line_error, run
from tests.test_explainer import (EFFICIENTNET, IMAGES, build_cnn, build_mlp, image_size, random_png,
                                  save_model)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def work(tmp_path):
    """A folder with a small CNN (non-linear head), two images and assorted broken files."""
    folder = tmp_path / "work"
    folder.mkdir()
    save_model(build_cnn("mlp", seed=4), folder / "cnn.onnx")
    random_png(folder / "a.png", size=(48, 40), seed=1)
    random_png(folder / "b.png", size=(30, 30), seed=2)
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}




# ---------------------------------------------------------------------------------------------
# bad models


def _bad_model(folder: Path, kind: str) -> Path:
    path = folder / f"{kind}.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(EFFICIENTNET.read_bytes()[:1000])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "mlp":
        save_model(build_mlp(), path)
    elif kind == "unchecked":  # parses, but a node reads a tensor nothing makes
        model = build_cnn()
        model.graph.node[1].input[0] = "nowhere"
        save_model(model, path)
    elif kind == "overflow":  # float32 overflow in the first convolution: NaN logits
        model = build_cnn()
        weights = next(init for init in model.graph.initializer if init.name == "W1")
        weights.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weights) * np.float32(1e37), "W1"))
        save_model(model, path)
    return path


@pytest.mark.parametrize("kind,fragment", [
    ("missing", "does not exist"), ("empty", "empty file"), ("truncated", "not a valid ONNX file"),
    ("random", "not a valid ONNX file"), ("mlp", "no suitable target layer"),
    ("unchecked", "unchecked.onnx' fails the ONNX checker"),
    ("overflow", "a.png: the model's logits hold NaN or +inf"),
])
def test_bad_model_is_a_one_line_error(work, kind, fragment):
    model = _bad_model(work, kind)
    before = digest(work)
    result = run(["explain", model, work / "a.png", "--out", work / "out"])
    assert_one_line_error(result, fragment)
    assert digest(work) == before
    assert not (work / "out").exists() or not any((work / "out").iterdir())


def test_external_data_outside_the_model_folder_is_refused(work):
    folder = work / "ext"
    folder.mkdir()
    onnx.save_model(build_cnn(), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    (work / "outside.bin").write_bytes((folder / "weights.bin").read_bytes())
    proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.bin"
    onnx.save(proto, str(folder / "m.onnx"))
    before = digest(work)
    result = run(["explain", folder / "m.onnx", work / "a.png", "--out", work / "out"])
    assert_one_line_error(result, "external data", "points outside")
    assert digest(work) == before


# ---------------------------------------------------------------------------------------------
# bad images


def test_bad_images_are_one_line_errors(work):
    (work / "empty.png").write_bytes(b"")
    (work / "text.png").write_text("not an image at all")
    (work / "cut.png").write_bytes((work / "a.png").read_bytes()[:200])
    cases = [("missing.png", "no such file"), ("empty.png", "empty"),
             ("text.png", "not an image"), ("cut.png", "truncated")]
    before = digest(work)
    for name, fragment in cases:
        result = run(["explain", work / "cnn.onnx", work / name, "--out", work / "out"])
        assert_one_line_error(result, name, fragment)
        assert digest(work) == before


def test_class_by_name_from_a_labels_file(work):
    (work / "labels.txt").write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    result = run(["explain", work / "cnn.onnx", work / "a.png", "--out", work / "out", "--labels",
                  work / "labels.txt", "--class", "CLASS 7", "--class", "2", "--method", "gradcam", "--json"])
    assert result.exit_code == 0, result.output
    assert [m["class_index"] for m in json.loads(result.stdout)["images"][0]["results"]] == [7, 2]
    wrong = run(["explain", work / "cnn.onnx", work / "a.png", "--out", work / "out2", "--labels",
                 work / "labels.txt", "--class", "clas 7"])
    assert_one_line_error(wrong, "'clas 7' is not one of the model's 10 labels", "did you mean 'class 7'")


def test_skip_unreadable_explains_the_rest_and_exits_1(work):
    folder = work / "mixed"
    folder.mkdir()
    for seed, name in enumerate(["a.png", "c.png", "e.png"]):
        random_png(folder / name, seed=seed)
    (folder / "b.png").write_text("not an image at all")
    (folder / "d.png").write_bytes((folder / "a.png").read_bytes()[:200])
    stopped = run(["explain", work / "cnn.onnx", folder, "--method", "gradcam", "--out", work / "stop",
                   "--batch-size", "2"])
    assert_one_line_error(stopped, "b.png", "not an image")
    # on the CPU: with TF32 a CUDA map moves by ~1e-4 with the size of its run (README, Devices)
    result = run(["explain", work / "cnn.onnx", folder, "--method", "gradcam", "--out", work / "out",
                  "--batch-size", "2", "--skip-unreadable", "--json", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    document = json.loads(result.stdout)
    assert [Path(image["image"]).name for image in document["images"]] == ["a.png", "c.png", "e.png"]
    assert [(Path(entry["image"]).name, "truncated" in entry["error"] or "not an image" in entry["error"])
            for entry in document["skipped"]] == [("b.png", True), ("d.png", True)]
    assert sorted(path.name for path in (work / "out").glob("*.npy")) == [
        f"{stem}_gradcam_c{image['results'][0]['class_index']}.npy"
        for stem, image in zip("ace", document["images"])]
    alone = run(["explain", work / "cnn.onnx", folder / "a.png", folder / "c.png", folder / "e.png",
                 "--method", "gradcam", "--out", work / "alone", "--batch-size", "2", "--device", "cpu"])
    assert alone.exit_code == 0, alone.output
    for name in ("a", "c", "e"):  # the same maps as without the unreadable files
        mine, theirs = (np.load(next((work / out).glob(f"{name}_gradcam_*.npy"))) for out in ("out", "alone"))
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    text = run(["explain", work / "cnn.onnx", folder, "--method", "gradcam", "--out", work / "out2",
                "--skip-unreadable"])
    assert text.exit_code == 1 and "Traceback" not in text.output
    assert "Skipped: " in text.stderr and "b.png" in text.stderr and "d.png" in text.stderr
    assert "Skipped 2 unreadable images of 5" in text.stderr
    assert "3 images" in text.stdout


def test_skip_unreadable_with_nothing_readable_is_an_error(work):
    folder = work / "broken"
    folder.mkdir()
    (folder / "x.png").write_text("no")
    (folder / "y.png").write_bytes(b"\x89PNG\r\n")
    result = run(["explain", work / "cnn.onnx", folder, "--out", work / "out", "--skip-unreadable"])
    assert_one_line_error(result, "none of the 2 images could be read", "x.png")
    assert not (work / "out").exists()


def test_decompression_bomb_is_refused(work, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a.png has 1,920 pixels: over twice the limit
    before = digest(work)
    result = run(["explain", work / "cnn.onnx", work / "a.png", "--out", work / "out"])
    assert_one_line_error(result, "decompression-bomb limit")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # over the limit but under twice it
    assert_one_line_error(run(["explain", work / "cnn.onnx", work / "a.png", "--out", work / "out"]),
                          "decompression-bomb")
    assert digest(work) == before


# ---------------------------------------------------------------------------------------------
# bad options


@pytest.mark.parametrize("extra,fragments", [
    (["--layer", "a3"], ["no layer named 'a3'", "nearest names: a2"]),
    (["--class", "10"], ["class index 10 is out of range", "use 0 to 9"]),
    (["--top-k", "11"], ["top_k 11"]),
    (["--method", "scorecam"], ["unknown method 'scorecam'", "gradcampp"]),
    (["--feature-maps", "1,99"], ["feature map index 99 is out of range"]),
    (["--layer", "a1", "--score", "c2", "--neuron", "3,99,0"], ["neuron (3, 99, 0) is out of range"]),
    (["--score", "c2", "--neuron", "3,9,0"], ["does not depend on layer 'a2'"]),
    (["--method", "gradcam", "--averaging", "maps"], ["--averaging applies to smoothgradcampp"]),
    (["--size", "64,64"], ["fixed at 32x32"]),
    (["--labels", "nowhere.txt"], ["labels file", "does not exist"]),
])
def test_bad_options_are_one_line_errors(work, extra, fragments):
    before = digest(work)
    result = run(["explain", work / "cnn.onnx", work / "a.png", "--out", work / "out", *extra])
    assert_one_line_error(result, *fragments)
    assert digest(work) == before


@pytest.mark.parametrize("extra", [["--class", "1", "--top-k", "2"], ["--neuron", "1,2,3"],
                                   ["--device", "tpu"], ["--samples", "0"], ["--mean", "a,b"]])
def test_usage_errors_exit_2(work, extra):
    result = run(["explain", work / "cnn.onnx", work / "a.png", *extra])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error:" in result.stderr


def test_explicit_cuda_without_cuda_is_an_option_error(work):
    from onnxcam.runtime.providers import create_session

    try:
        _, device = create_session(build_cnn().SerializeToString(), "auto")
    except Exception:  # noqa: BLE001
        device = "cpu"
    if device == "cuda":
        pytest.skip("CUDA works here")
    result = run(["explain", work / "cnn.onnx", work / "a.png", "--out", work / "out", "--device", "cuda"])
    assert_one_line_error(result, "--device cuda was requested")
    assert "Failed to create" not in result.output


def test_out_onto_an_input_is_refused(work):
    # b.png's gradcam output for class 0 would be a.png's name: make it an input
    victim = work / "b_gradcam_c0.png"
    random_png(victim, seed=9)
    before = digest(work)
    result = run(["explain", work / "cnn.onnx", work / "b.png", victim, "--method", "gradcam",
                  "--class", "0", "--out", work])
    assert_one_line_error(result, "refusing to write", "b_gradcam_c0.png")
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == before["b_gradcam_c0.png"]
    result = run(["explain", work / "cnn.onnx", work / "a.png", "--out", work / "a.png"])
    assert_one_line_error(result, "is a file")
    after = digest(work)
    assert after["a.png"] == before["a.png"] and after["b.png"] == before["b.png"]


def test_internal_errors_are_one_line_with_exit_1(work, monkeypatch):
    from onnxcam.explain import explainer as module

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(module.Explainer, "iter_explain", broken)
    result = run(["explain", work / "cnn.onnx", work / "a.png", "--out", work / "out"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == ("Internal error: RuntimeError: boom second line "
                                     "(run with --debug for the traceback)")
    debug = run(["--debug", "explain", work / "cnn.onnx", work / "a.png", "--out", work / "out"])
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "RuntimeError: boom" in debug.stderr


def test_debug_shows_the_traceback_of_user_errors_too(work):
    result = run(["--debug", "explain", work / "missing.onnx", work / "a.png"])
    assert result.exit_code == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: model")


# ---------------------------------------------------------------------------------------------
# good runs


def test_explain_writes_overlay_map_and_record(work):
    out = work / "out"
    before = digest(work)
    result = run(["explain", work / "cnn.onnx", work / "a.png", work / "b.png", "--out", out,
                  "--samples", "4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert {k: v for k, v in digest(work).items() if not k.startswith("out/")} == before
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 6 and not [n for n in names if n.startswith(".")]
    record_path = next(out.glob("a_smoothgradcampp_c*.json"))
    record = json.loads(record_path.read_text())
    assert record["method"] == "smoothgradcampp" and record["layer"] == "a2"
    assert record["options"]["samples"] == 4 and record["options"]["seed"] == 3
    assert record["device"] in ("cpu", "cuda") and record["image"].endswith("a.png")
    stem = record_path.stem
    assert image_size(out / f"{stem}.png") == (48, 40)
    assert np.load(out / f"{stem}.npy").shape == (32, 32)
    summary = result.stdout
    assert "a.png:" in summary and "p=" in summary and ("CPU" in summary or "CUDA" in summary)
    assert re.search(r"a\.png: class \d+, p=", summary)  # no labels: not "class 3 (class 3)"
    assert re.search(r"2 images, 6 files in .*, [\d.]+ s \([\d.]+ images/s; model setup [\d.]+ s\)",
                     summary)
    # the same seed gives the same map again, bit for bit; another batch size sums the moments
    # in other groups, which moves the map by float32 rounding only
    again = run(["explain", work / "cnn.onnx", work / "a.png", "--out", work / "again",
                 "--samples", "4", "--seed", "3"])
    assert again.exit_code == 0
    assert np.array_equal(np.load(out / f"{stem}.npy"), np.load(work / "again" / f"{stem}.npy"))
    other = run(["explain", work / "cnn.onnx", work / "a.png", "--out", work / "other",
                 "--samples", "4", "--seed", "3", "--batch-size", "3"])
    assert other.exit_code == 0
    np.testing.assert_allclose(np.load(work / "other" / f"{stem}.npy"), np.load(out / f"{stem}.npy"), rtol=1e-5)


def test_explain_folder_top_k_compare_and_json(work):
    out = work / "out"
    result = run(["explain", work / "cnn.onnx", work, "--top-k", "2", "--compare", "--samples", "2",
                  "--out", out, "--json", "--method", "Grad-CAM++"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["method"] == "gradcampp" and len(document["images"]) == 2
    for image in document["images"]:
        assert len(image["results"]) == 2 and len(image["compare"]) == 2
        for record in image["results"]:
            for path in record["files"].values():
                assert Path(path).is_file()
        for figure in image["compare"]:
            width, height = image_size(figure)
            assert width > 3 * height
    assert len(list(out.glob("*_compare_c*.png"))) == 4


def test_explain_writes_while_explaining_and_keeps_image_order(work, monkeypatch):
    """Files are written by background threads; the records and lines still follow the images,
    and an error raised while writing one image is the run's one-line error."""
    from onnxcam.explain.result import Explanation

    folder = work / "many"
    folder.mkdir()
    names = [f"{i:02d}.png" for i in range(9)]
    for seed, name in enumerate(names):
        random_png(folder / name, seed=seed)
    result = run(["explain", work / "cnn.onnx", folder, "--method", "gradcam", "--out", work / "out",
                  "--json", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    images = document["images"]
    assert [Path(image["image"]).name for image in images] == names
    timings = document["timings"]
    assert 0 < timings["setup_s"] < timings["total_s"]
    assert timings["images_per_s"] == pytest.approx(9 / timings["total_s"], rel=0.01)
    assert all(Path(p).is_file() for image in images for p in image["results"][0]["files"].values())

    real_save = Explanation.save

    def failing_save(self, out_dir, stem=None, **kwargs):
        if stem == "03":
            from onnxcam.errors import OptionError
            raise OptionError("cannot write 03 (disk full)")
        return real_save(self, out_dir, stem, **kwargs)

    monkeypatch.setattr(Explanation, "save", failing_save)
    result = run(["explain", work / "cnn.onnx", folder, "--method", "gradcam", "--out", work / "out2"])
    assert_one_line_error(result, "cannot write 03")
    assert not list((work / "out2").glob("03_*"))


def test_explain_notes_a_batch_of_one_built_into_the_model(work):
    from tests.test_explainer import with_batch_built_in

    model = save_model(with_batch_built_in(build_cnn("mlp", seed=4)), work / "fixed.onnx")
    result = run(["explain", model, work / "a.png", work / "b.png", "--samples", "3", "--out", work / "out"])
    assert result.exit_code == 0, result.output
    assert "Note: the model has a batch of 1 built in (at node 'batch_mean')" in result.stderr
    assert len(list((work / "out").glob("*.png"))) == 2
    inspected = run(["inspect", model])
    assert "Batch: 1, built in at node 'batch_mean'" in inspected.stdout
    assert json.loads(run(["inspect", model, "--json"]).stdout)["batch_built_in"] == "batch_mean"
    rewritten = run(["rewrite", model, "-o", work / "gradient.onnx"])
    assert rewritten.exit_code == 0 and "feed the written model one row at a time" in rewritten.stderr


def test_explain_neuron_and_feature_maps(work):
    out = work / "out"
    result = run(["explain", work / "cnn.onnx", work / "a.png", "--layer", "a1", "--score", "c2",
                  "--neuron", "3,5,7", "--neuron", "1,2,2", "--method", "layercam", "--out", out])
    assert result.exit_code == 0, result.output
    assert (out / "a_layercam_n3-5-7+1-2-2.json").is_file()
    record = json.loads((out / "a_layercam_n3-5-7+1-2-2.json").read_text())
    assert record["neuron"] == [[3, 5, 7], [1, 2, 2]] and record["score_tensor"] == "c2"
    result = run(["explain", work / "cnn.onnx", work / "a.png", "--feature-maps", "0,3,5", "--class", "2",
                  "--method", "gradcam", "--out", out])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "a_gradcam_c2.json").read_text())["options"]["feature_maps"] == [0, 3, 5]


def test_rerun_into_the_image_folder_skips_previous_outputs(work):
    args = ["explain", work / "cnn.onnx", work, "--method", "gradcam", "--class", "1", "--out", work]
    first = run(args)
    assert first.exit_code == 0, first.output
    assert (work / "a_gradcam_c1.png").is_file() and (work / "b_gradcam_c1.png").is_file()
    second = run(args)
    assert second.exit_code == 0, second.output
    assert "a_gradcam_c1.png:" not in second.stdout and "a.png:" in second.stdout


def test_image_format_jpg_writes_jpeg_overlays_and_figures_and_the_same_maps(work):
    """--image-format jpg: the overlay and the --compare figure are JPEG files named .jpg, no
    .png is written, the record lists the .jpg and the raw map is the PNG run's; a later run into
    the image folder skips them as earlier outputs."""
    y, x = np.mgrid[0:80, 0:96]
    smooth = np.stack([x * 2.5, y * 3.0, 128 + 100 * np.sin(x / 9.0) * np.cos(y / 7.0)], axis=-1)
    Image.fromarray(smooth.clip(0, 255).astype(np.uint8)).save(work / "a.png")  # a photo, not noise
    base = ["explain", work / "cnn.onnx", work / "a.png", "--class", "1", "--compare"]
    assert run([*base, "--out", work / "png"]).exit_code == 0
    result = run([*base, "--image-format", "JPG", "--out", work / "jpg"])
    assert result.exit_code == 0, result.output
    written = sorted(path.name for path in (work / "jpg").iterdir())
    assert written == ["a_compare.jpg", "a_smoothgradcampp_c1.jpg", "a_smoothgradcampp_c1.json",
                       "a_smoothgradcampp_c1.npy"]
    for name in ("a_compare.jpg", "a_smoothgradcampp_c1.jpg"):
        with Image.open(work / "jpg" / name) as picture:
            assert picture.format == "JPEG" and picture.mode == "RGB"
    with Image.open(work / "jpg" / "a_smoothgradcampp_c1.jpg") as jpeg, \
            Image.open(work / "png" / "a_smoothgradcampp_c1.png") as png:
        assert jpeg.size == png.size
        correlation = np.corrcoef(np.asarray(jpeg, np.float64).ravel(), np.asarray(png, np.float64).ravel())[0, 1]
        assert correlation > 0.98  # lossy, but the same overlay
    np.testing.assert_array_equal(np.load(work / "jpg" / "a_smoothgradcampp_c1.npy"),
                                  np.load(work / "png" / "a_smoothgradcampp_c1.npy"))
    record = json.loads((work / "jpg" / "a_smoothgradcampp_c1.json").read_text())
    assert record["files"]["overlay"] == "a_smoothgradcampp_c1.jpg"
    again = run(["explain", work / "cnn.onnx", work / "jpg", "--class", "1", "--out", work / "jpg",
                 "--image-format", "jpg"])
    assert again.exit_code != 0 and "the only images found are onnxcam outputs" in again.output


def test_same_stem_in_two_folders_gets_two_names(work):
    other = work / "other"
    other.mkdir()
    random_png(other / "a.png", seed=7)
    result = run(["explain", work / "cnn.onnx", work / "a.png", other / "a.png", "--class", "1",
                  "--method", "gradcam", "--out", work / "out"])
    assert result.exit_code == 0, result.output
    assert (work / "out" / "a_gradcam_c1.png").is_file() and (work / "out" / "a-2_gradcam_c1.png").is_file()


# ---------------------------------------------------------------------------------------------
# inspect and rewrite


def test_inspect_text_and_json(work):
    model = save_model(build_cnn("linear"), work / "linear.onnx")
    result = run(["inspect", model])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "x  [1, 3, 32, 32]" in text and "probs" in text
    assert "Logits: logits" in text and "10 classes" in text
    assert "*  a2" in text and "Relu" in text
    assert "linear" in text and "Smooth Grad-CAM++" in text and "equals" in text
    assert "Batch: any (runs in batches)" in text
    document = json.loads(run(["inspect", model, "--json"]).stdout)
    assert document["automatic_layer"] == "a2" and document["automatic_path_linear"] is True
    assert [c["tensor"] for c in document["candidates"]] == ["c1", "a1", "c2", "a2"]
    assert document["logits"]["tensor"] == "logits"
    nonlinear = json.loads(run(["inspect", work / "cnn.onnx", "--json"]).stdout)
    assert nonlinear["automatic_path_linear"] is False
    assert not any("equals" in note for note in nonlinear["notes"])
    assert_one_line_error(run(["inspect", work / "missing.onnx"]), "does not exist")


def test_inspect_metadata_of_the_bundled_model():
    result = run(["inspect", EFFICIENTNET])
    assert result.exit_code == 0, result.output
    assert "mean=0.498039" in result.stdout and "tench" in result.stdout
    assert "* " in result.stdout and "/_swish_1/Clip_output_0" in result.stdout


def test_rewrite_writes_a_checked_gradient_model(work):
    before = digest(work)
    out = work / "grad.onnx"
    result = run(["rewrite", work / "cnn.onnx", "-o", out, "--layer", "a1"])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["x", "onnxcam_seed"]
    assert [o.name for o in model.graph.output][-3:] == ["onnxcam_activation", "onnxcam_gradient", "onnxcam_logits"]
    for name in ("onnxcam_seed", "onnxcam_activation", "onnxcam_gradient", "onnxcam_logits"):
        assert name in result.stdout
    assert {k: v for k, v in digest(work).items() if k != "grad.onnx"} == before
    refused = run(["rewrite", work / "cnn.onnx", "-o", work / "cnn.onnx"])
    assert_one_line_error(refused, "refusing to overwrite")
    assert digest(work)["cnn.onnx"] == before["cnn.onnx"]
    assert "onnxcam_gradient" in run(["rewrite", "--help"]).stdout


def test_cache_command_shows_and_clears_only_onnxcams_files(work, tmp_path, monkeypatch):
    folder = tmp_path / "model-cache"
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(folder))
    for layer in ("a1", "a2"):
        assert run(["explain", work / "cnn.onnx", work / "a.png", "--layer", layer, "--method", "gradcam",
                    "--out", work / "out"]).exit_code == 0
    for info in folder.rglob("*.json"):  # a1 used first, whatever the file system's clock resolution
        if json.loads(info.read_text())["layer"] == "a1":
            os.utime(info, (info.stat().st_mtime - 60,) * 2)
    shown = run(["cache"])
    assert shown.exit_code == 0, shown.output
    assert f"Folder: {folder}" in shown.stdout and "Entries: 2 rewritten models" in shown.stdout
    assert "default 2G" in shown.stdout and "layer a1" in shown.stdout and "layer a2" in shown.stdout
    document = json.loads(run(["cache", "--json"]).stdout)
    assert document["folder"] == str(folder) and document["limit_bytes"] == 2 * 2**30
    assert [entry["layer"] for entry in document["entries"]] == ["a2", "a1"]  # the most recent first
    assert document["bytes"] == sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    keep = folder / "notes.txt"
    keep.write_text("not onnxcam's")
    cleared = run(["cache", "--clear"])
    assert cleared.exit_code == 0 and "Deleted 2 cached models" in cleared.stdout
    assert "Entries: 0 rewritten models" in cleared.stdout
    assert keep.exists() and not list(folder.rglob("*.onnx"))
    monkeypatch.setenv("ONNXCAM_CACHE_SIZE", "lots")
    assert_one_line_error(run(["cache"]), "ONNXCAM_CACHE_SIZE='lots'")


def test_version_and_help():
    assert run(["--version"]).stdout.strip() == "onnxcam, version 0.1.0"
    text = run(["--help"]).stdout
    assert "explain" in text and "inspect" in text and "rewrite" in text


@pytest.mark.slow
def test_efficientnet_compare_end_to_end(tmp_path):
    before = hashlib.sha256((IMAGES / "chelsea.png").read_bytes()).hexdigest()
    result = run(["explain", EFFICIENTNET, IMAGES / "chelsea.png", "--compare", "--out", tmp_path])
    assert result.exit_code == 0, result.output
    record = json.loads(next(tmp_path.glob("chelsea_smoothgradcampp_c*.json")).read_text())
    assert 281 <= record["class_index"] <= 285 and record["noisy_passes_skipped"] is True
    assert image_size(tmp_path / "chelsea_compare.png")[1] > 100
    assert "Note:" in result.stderr and "linear" in result.stderr
    assert hashlib.sha256((IMAGES / "chelsea.png").read_bytes()).hexdigest() == before


def test_writer_threads_follow_the_cpus(monkeypatch):
    from onnxcam.cli import explain_cmd

    for cpus, threads in ((1, 2), (2, 2), (6, 3), (16, 8), (64, 8)):
        monkeypatch.setattr(explain_cmd.os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert explain_cmd.writer_threads() == threads


def test_inspect_a_dynamic_size_model_asks_for_size_and_takes_it(tmp_path):
    model = build_cnn("linear")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    path = save_model(model, tmp_path / "dynamic.onnx")
    plain = run(["inspect", path])
    assert plain.exit_code == 0 and "unknown while the input size is dynamic" in plain.stdout
    assert "pass --size H,W" in plain.stdout
    sized = run(["inspect", path, "--size", "40,24", "--json"])
    document = json.loads(sized.stdout)
    assert document["layout"]["size"] == [40, 24] and document["explainable"] is True
    assert document["automatic_layer"] == "a2" and document["candidates"][-1]["shape"][2:] == [40, 24]
    assert_one_line_error(run(["inspect", save_model(build_cnn(), tmp_path / "static.onnx"), "--size", "40,24"]),
                          "fixed at 32x32")
