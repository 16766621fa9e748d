"""Tests for onnxcam.evaluation and the evaluate / check / compare commands.

Data set loaders (JSON, CSV, Pascal VOC, masks; malformed files give one-line DataErrors),
evaluation on a few images of the bundled localization set, the TOML deployment gate with its
JUnit XML, and the two-model comparison. Kept small: the whole file runs in well under 40 s on
two shared cores.
"""

from __future__ import annotations

import csv
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from onnxcam import DataError, Explainer
from onnxcam.evaluation import Predictor, evaluate, load_dataset, parse_method, parse_methods
from onnxcam.evaluation.check import junit_xml, load_check_config, run_checks
from onnxcam.evaluation.compare import average_ranks, compare_models, spearman, top_fraction_iou
from onnxcam.evaluation.plot import curves_figure
from onnxcam.errors import OptionError
from tests.cli_helpers import assert_one_line_error, run

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "shapes_cnn.onnx"
LOCALIZATION = ROOT / "models" / "localization"
LABELS = ["circle", "square", "triangle", "cross", "ring"]
LAST = "/features/relu5/Relu_output_0"
EARLY = "/features/relu4/Relu_output_0"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def explainer():
    return Explainer(MODEL, device="cpu", cache=False)


@pytest.fixture(scope="module")
def manifest():
    return json.loads((LOCALIZATION / "manifest.json").read_text())




def copy_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(LOCALIZATION / name, folder / name)


def one_line_data_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------------------------------------
# Data set loaders


def test_json_manifest_of_the_bundled_set(manifest):
    dataset = load_dataset(LOCALIZATION, labels=LABELS, num_classes=5)
    assert dataset.source == "json" and len(dataset) == 120
    first = dataset.samples[0]
    assert first.image.name == "0001.png" and first.label == 0 and first.label_name == "circle"
    np.testing.assert_array_equal(first.boxes, [manifest["images"][0]["boxes"][0]])
    multi = [s for s in dataset.samples if s.instance_count() >= 2]
    assert len(multi) == 60
    # the regions at the map size: boxes unchanged at the image's own size, scaled otherwise
    assert first.size == (96, 96)
    np.testing.assert_array_equal(first.regions_at((96, 96)), first.boxes)
    np.testing.assert_allclose(first.regions_at((192, 48)), first.boxes * [0.5, 2, 0.5, 2])


def test_json_labels_by_name_are_mapped_onto_the_model(tmp_path):
    copy_images(tmp_path, ["0001.png", "0003.png"])
    (tmp_path / "manifest.json").write_text(json.dumps({
        "classes": ["square", "circle"],  # another order than the model's labels
        "images": [{"image": "0001.png", "label": 1, "boxes": [[16, 15, 51, 50]]},
                   {"image": "0003.png", "label_name": "square"}]}))
    dataset = load_dataset(tmp_path, labels=LABELS, num_classes=5)
    assert [s.label for s in dataset.samples] == [0, 1]
    assert dataset.samples[1].boxes is None and not dataset.samples[1].has_region


@pytest.mark.parametrize("entry, fragments", [
    ('{"images": [{"image": "0001.png", "label": 9}]}', ["images[0] (0001.png)", "out of range"]),
    ('{"images": [{"image": "0001.png", "boxes": [[5, 5, 2, 9]]}]}', ["images[0] (0001.png)", "x1 < x0"]),
    ('{"images": [{"image": "0001.png", "boxes": [[1, 2, "x", 4]]}]}', ["'boxes'[0]", "4 numbers"]),
    ('{"images": [{"image": "missing.png"}]}', ["images[0] (missing.png)", "no such file"]),
    ('{"images": [{"image": "0001.png", "colour": 1}]}', ["unknown field 'colour'"]),
    ('{"images": [\n{"image": "0001.png",}\n]}', ["not valid JSON", "line 2"]),
])
def test_malformed_json_manifests(tmp_path, entry, fragments):
    copy_images(tmp_path, ["0001.png"])
    (tmp_path / "manifest.json").write_text(entry)
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path, labels=LABELS, num_classes=5)
    one_line_data_error(excinfo, "manifest.json", *fragments)


def test_csv_manifest_several_boxes_per_image(tmp_path):
    copy_images(tmp_path, ["0001.png", "0002.png", "0003.png"])
    rows = [["image", "label", "x0", "y0", "x1", "y1"],
            ["0001.png", "0", "16", "15", "51", "50"],
            ["0002.png", "circle", "17", "16", "45", "45"],
            ["0002.png", "circle", "34", "51", "59", "76"],
            ["0003.png", "square", "", "", "", ""]]
    with open(tmp_path / "manifest.csv", "w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    dataset = load_dataset(tmp_path, labels=LABELS, num_classes=5)
    assert dataset.source == "csv"
    assert [s.label for s in dataset.samples] == [0, 0, 1]
    assert [s.instance_count() for s in dataset.samples] == [1, 2, 0]
    np.testing.assert_array_equal(dataset.samples[1].boxes, [[17, 16, 45, 45], [34, 51, 59, 76]])


@pytest.mark.parametrize("lines, fragments", [
    (["0001.png,0,16,15,abc,50"], ["line 2", "x1 'abc' is not a number"]),
    (["0001.png,0,16,15"], ["line 2", "got 4 fields"]),
    (["0001.png,0,1,1,5,5", "0001.png,1,2,2,6,6"], ["line 3", "differs from the label", "line 2"]),
    (["0001.png,hexagon,1,1,5,5"], ["line 2", "'hexagon' is not one of the model's labels"]),
    (["nope.png,0,1,1,5,5"], ["line 2", "no such file"]),
])
def test_malformed_csv_manifests(tmp_path, lines, fragments):
    copy_images(tmp_path, ["0001.png"])
    (tmp_path / "manifest.csv").write_text("\n".join(["image,label,x0,y0,x1,y1", *lines]) + "\n")
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path, labels=LABELS, num_classes=5)
    one_line_data_error(excinfo, "manifest.csv", *fragments)


VOC = """<annotation><filename>{name}</filename>{objects}</annotation>"""
OBJECT = "<object><name>{label}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"


def test_voc_xml_next_to_the_images(tmp_path):
    copy_images(tmp_path, ["0001.png", "0002.png", "0003.png"])
    objects = OBJECT.format(label="circle", x0=17, y0=16, x1=51, y1=50)
    (tmp_path / "0001.xml").write_text(VOC.format(name="0001.png", objects=objects))
    two = (OBJECT.format(label="circle", x0=18, y0=17, x1=45, y1=45)
           + OBJECT.format(label="square", x0=35, y0=52, x1=59, y1=76)
           + OBJECT.format(label="circle", x0=1, y0=1, x1=5, y1=5))
    (tmp_path / "0002.xml").write_text(VOC.format(name="0002.png", objects=two))
    dataset = load_dataset(tmp_path, labels=LABELS, num_classes=5)
    assert dataset.source == "voc"
    by_key = {s.key: s for s in dataset.samples}
    assert set(by_key) == {"0001.png", "0002.png#circle", "0002.png#square", "0003.png"}
    # VOC pixel indices are 1-based and inclusive: [xmin - 1, ymin - 1, xmax, ymax]
    np.testing.assert_array_equal(by_key["0001.png"].boxes, [[16, 15, 51, 50]])
    assert by_key["0002.png#circle"].instance_count() == 2 and by_key["0002.png#square"].label == 1
    assert by_key["0003.png"].label is None and not by_key["0003.png"].has_region


@pytest.mark.parametrize("content, fragments", [
    (VOC.format(name="0001.png", objects=OBJECT.format(label="hexagon", x0=1, y0=1, x1=5, y1=5)),
     ["0001.xml", "object 1", "'hexagon'"]),
    (VOC.format(name="0001.png", objects=OBJECT.format(label="circle", x0=1, y0=1, x1="wide", y1=5)),
     ["0001.xml", "<xmax> 'wide' is not a number"]),
    ("<annotation>\n<object><name>circle</name>\n</annotation>", ["0001.xml", "not valid XML", "line 3"]),
    (VOC.format(name="0001.png", objects="<object><name>circle</name></object>"), ["<bndbox> is missing"]),
])
def test_malformed_voc_files(tmp_path, content, fragments):
    copy_images(tmp_path, ["0001.png"])
    (tmp_path / "0001.xml").write_text(content)
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path, labels=LABELS, num_classes=5)
    one_line_data_error(excinfo, *fragments)


def test_mask_pngs_give_instances_and_plain_folders_no_ground_truth(tmp_path):
    copy_images(tmp_path, ["0001.png", "0002.png"])
    (tmp_path / "masks").mkdir()
    ids = np.zeros((96, 96), np.uint8)
    ids[10:20, 10:20] = 1
    ids[50:60, 50:70] = 2
    Image.fromarray(ids).save(tmp_path / "masks" / "0001.png")
    dataset = load_dataset(tmp_path, labels=LABELS, num_classes=5)
    assert dataset.source == "masks"
    first, second = dataset.samples
    assert first.instance_count() == 2 and first.label is None
    regions = first.regions_at((48, 48))          # resized with the nearest neighbour
    assert regions.shape == (2, 48, 48) and regions[0, 5:10, 5:10].all() and regions[1].sum() == 50
    assert not second.has_region
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "masks" / "0002.png")
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path).samples[1].instance_mask()
    one_line_data_error(excinfo, "0002.png", "mask is 10x10 but its image is 96x96")
    plain = tmp_path / "plain"
    copy_images(plain, ["0003.png"])
    only = load_dataset(plain)
    assert only.source == "images" and only.samples[0].label is None and not only.samples[0].has_region


# ---------------------------------------------------------------------------------------------
# Predictor and evaluate


def test_predictor_is_batched_and_matches_the_explanations(explainer):
    paths = [LOCALIZATION / f"{i:04d}.png" for i in range(1, 11)]
    predictor = Predictor(explainer, batch_size=4)
    before = explainer.session.run_calls
    probabilities = predictor(explainer.preprocess(paths))
    assert explainer.session.run_calls - before == 3 and predictor.runs == 3 and predictor.rows == 10
    assert probabilities.shape == (10, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-9)
    explanations = explainer.explain(paths[:3], method="gradcam")
    for row, explanation in enumerate(explanations):
        assert explanation.class_index == int(np.argmax(probabilities[row]))
        assert explanation.probability == pytest.approx(probabilities[row, explanation.class_index], rel=1e-5)


def test_method_specs():
    assert parse_method("Grad-CAM++").name == "gradcampp"
    spec = parse_method("smoothgradcampp:averaging=MAPS@" + EARLY)
    assert spec.options == (("averaging", "maps"),) and spec.layer == EARLY
    assert parse_methods("gradcam,gradcam,gradcampp", layer=EARLY)[1].layer == EARLY
    for bad in ("gradcam:averaging=maps", "smoothgradcampp:averaging=mean", "nocam", "gradcam@"):
        with pytest.raises(OptionError):
            parse_method(bad)


def test_evaluate_a_few_images(explainer):
    dataset = load_dataset(LOCALIZATION, labels=LABELS, num_classes=5).limit(6)
    runs_before = explainer.session.run_calls
    result = evaluate(explainer, dataset, ["gradcam", "gradcampp", "smoothgradcampp",
                                           "smoothgradcampp@" + EARLY],
                      samples=3, steps=6, tolerance=15)
    assert [row["method"] for row in result.rows] == ["gradcam", "gradcampp", "smoothgradcampp",
                                                      "smoothgradcampp@" + EARLY]
    assert result.summary == {"images": 6, "labelled": 6, "accuracy": 1.0, "with_region": 6, "multi_instance": 3}
    # never one image per run: the probabilities of every perturbed input went through batches
    assert explainer.session.run_calls - runs_before < result.timings["probability_rows"] / 4
    pp, sg, early = result.row("gradcampp"), result.row("smoothgradcampp"), result.row("smoothgradcampp@" + EARLY)
    assert sg["noisy_passes_skipped"] and not early["noisy_passes_skipped"]
    assert early["layer"] == EARLY and sg["layer"] == LAST
    for key in ("pointing_game", "energy_pointing_game", "average_drop", "deletion_auc", "insertion_auc",
                "instance_coverage"):
        assert sg[key] == pp[key]  # linear path at the last layer: Smooth Grad-CAM++ == Grad-CAM++
    for row in result.rows:
        assert 0 <= row["pointing_game"] <= 1 and 0 <= row["energy_pointing_game"] <= 1
        assert 0 <= row["average_drop"] <= 100 and 0 <= row["increase_in_confidence"] <= 100
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
        assert row["pointing_images"] == 6 and row["coverage_images"] == 3
    assert result.row("gradcam")["pointing_game"] == 1.0
    assert result.fractions.shape == (7,) and result.curves["gradcam"]["deletion"].shape == (7,)
    record = result.samples[1]
    assert record["instances"] == 2 and record["methods"]["gradcam"]["pointing_distance"] == 0
    text = result.table_text()
    assert "Grad-CAM++" in text and "pointing" in text
    assert len(result.csv_text().strip().splitlines()) == 5
    figure = curves_figure(result.fractions, result.curves)
    assert figure.mode == "RGB" and figure.width > 800


def test_evaluate_an_nhwc_model_gives_the_same_numbers(tmp_path, explainer):
    """The metrics build (N, C, H, W) batches; an NHWC model gets them transposed back."""
    model = onnx.load(MODEL)
    graph = model.graph
    original = graph.input[0]
    graph.node.insert(0, onnx.helper.make_node("Transpose", ["input_nhwc"], [original.name], perm=[0, 3, 1, 2]))
    graph.input.remove(original)
    graph.input.insert(0, onnx.helper.make_tensor_value_info("input_nhwc", onnx.TensorProto.FLOAT, ["N", 96, 96, 3]))
    onnx.save(model, tmp_path / "nhwc.onnx")
    nhwc = Explainer(tmp_path / "nhwc.onnx", device="cpu", cache=False)
    assert nhwc.layout == "NHWC"
    dataset = load_dataset(LOCALIZATION, labels=LABELS).limit(3)
    ours, reference = (evaluate(e, dataset, ["gradcam"], steps=3).rows[0] for e in (nhwc, explainer))
    for key in ("pointing_game", "energy_pointing_game", "average_drop", "deletion_auc", "insertion_auc"):
        assert ours[key] == pytest.approx(reference[key], abs=1e-6), key


def test_evaluate_command_writes_the_three_files(tmp_path):
    out = tmp_path / "eval"
    result = run(["evaluate", MODEL, LOCALIZATION, "--limit", 4, "--samples", 2, "--steps", 4, "--out", out])
    assert result.exit_code == 0, result.output
    assert "Smooth Grad-CAM++" in result.stdout and "avg drop %" in result.stdout
    document = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in document["table"]] == ["gradcam", "gradcampp", "smoothgradcampp"]
    assert len(document["samples"]) == 4 and document["settings"]["tolerance_px"] == 15
    with open(out / "results.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["method"] for r in rows] == ["gradcam", "gradcampp", "smoothgradcampp"]
    with Image.open(out / "curves.png") as figure:
        assert figure.format == "PNG"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    as_json = run(["evaluate", MODEL, LOCALIZATION, "--limit", 2, "--methods", "gradcam", "--steps", 2,
                   "--out", out, "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["summary"]["images"] == 2


@pytest.mark.parametrize("extra, fragments", [
    (["--methods", "gradcam:averaging=maps"], ["gradcam has no option 'averaging'"]),
    (["--methods", "fancycam"], ["fancycam"]),
])
def test_evaluate_bad_options_are_one_line_errors(tmp_path, extra, fragments):
    assert_one_line_error(run(["evaluate", MODEL, LOCALIZATION, "--out", tmp_path / "o", *extra]), *fragments)


def test_evaluate_bad_data_is_a_one_line_error(tmp_path):
    assert_one_line_error(run(["evaluate", MODEL, tmp_path / "nothing", "--out", tmp_path / "o"]), "no such data")
    copy_images(tmp_path / "data", ["0001.png"])
    (tmp_path / "data" / "manifest.csv").write_text("0001.png,0,1,2,3\n")
    assert_one_line_error(run(["evaluate", MODEL, tmp_path / "data", "--out", tmp_path / "o"]),
                          "manifest.csv line 1", "got 5 fields")


def test_evaluate_skip_unreadable_scores_the_readable_samples_and_exits_1(tmp_path):
    copy_images(tmp_path / "good", ["0001.png", "0003.png"])
    copy_images(tmp_path / "mixed", ["0001.png", "0002.png", "0003.png"])
    broken = tmp_path / "mixed" / "0002.png"
    broken.write_bytes(broken.read_bytes()[:200])
    args = ["--methods", "gradcam", "--steps", 4, "--json"]
    stopped = run(["evaluate", MODEL, tmp_path / "mixed", "--out", tmp_path / "o1", *args[:-1]])
    assert_one_line_error(stopped, "0002.png")
    skipped = run(["evaluate", MODEL, tmp_path / "mixed", "--out", tmp_path / "o2", "--skip-unreadable", *args])
    assert skipped.exit_code == 1, skipped.output
    document = json.loads(skipped.stdout)
    assert [entry["image"] for entry in document["skipped"]] == [str(broken)]
    assert json.loads((tmp_path / "o2" / "results.json").read_text())["skipped"] == document["skipped"]
    alone = json.loads(run(["evaluate", MODEL, tmp_path / "good", "--out", tmp_path / "o3", *args]).stdout)
    assert document["summary"]["images"] == 2 and alone["skipped"] == []
    assert document["table"] == alone["table"]
    text = run(["evaluate", MODEL, tmp_path / "mixed", "--out", tmp_path / "o4", "--skip-unreadable", *args[:-1]])
    assert text.exit_code == 1 and "Skipped 1 unreadable image of 3" in text.stderr


def test_evaluate_skip_unreadable_with_nothing_readable_is_an_error(tmp_path):
    copy_images(tmp_path / "data", ["0001.png"])
    (tmp_path / "data" / "0001.png").write_bytes(b"not an image")
    result = run(["evaluate", MODEL, tmp_path / "data", "--out", tmp_path / "o", "--skip-unreadable"])
    assert_one_line_error(result, "none of the 1 images could be read")


# ---------------------------------------------------------------------------------------------
# check


def write_check(folder: Path, region: list[int], extra: str = "") -> Path:
    """A check file next to a copy of the model and two images, with relative paths."""
    copy_images(folder / "images", ["0001.png", "0003.png"])
    if not (folder / "model.onnx").exists():
        shutil.copy(MODEL, folder / "model.onnx")
    config = folder / "checks.toml"
    config.write_text(f"""
model = "model.onnx"
method = "gradcampp"
{extra}
[thresholds]
tolerance = 3
min_energy = 0.3
max_average_drop = 90

[[images]]
path = "images/0001.png"
class = "circle"
region = [16, 15, 51, 50]

[[images]]
path = "images/0003.png"
class = 1
region = {region}
""")
    return config


def test_check_passes_on_the_right_regions_and_fails_on_a_wrong_one(tmp_path):
    good = write_check(tmp_path / "good", [30, 67, 57, 95])
    result = run(["check", good, "--junit", tmp_path / "good.xml"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert sum(line.startswith("PASS") for line in lines) == 7 and "all 7 checks passed" in result.stdout
    assert any("images/0003.png: pointing" in line and "tolerance 3 px" in line for line in lines)
    root = ET.parse(tmp_path / "good.xml").getroot()
    assert len(list(root.iter("testcase"))) == 7
    assert not list(root.iter("failure"))

    bad = write_check(tmp_path / "bad", [0, 0, 12, 12])  # the square is at the bottom, not here
    result = run(["check", bad, "--junit", tmp_path / "reports" / "bad.xml"])
    assert result.exit_code == 1, result.output
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 2 and all("images/0003.png" in line for line in failed)
    assert "px from the region vs tolerance 3 px" in failed[0] and "vs min 0.300" in failed[1]
    assert "2 of 7 checks failed" in result.stdout
    suites = ET.parse(tmp_path / "reports" / "bad.xml").getroot()
    suite = suites.find("testsuite")
    assert suite.get("tests") == "7" and suite.get("failures") == "2"
    cases = list(suite.iter("testcase"))
    assert len(cases) == 7 and sum(case.find("failure") is not None for case in cases) == 2
    assert all(case.find("failure").get("message") for case in cases if case.find("failure") is not None)
    document = json.loads(run(["check", bad, "--json"]).stdout)
    assert document["failures"] == 2 and document["passed"] is False


def test_check_api_and_junit_from_python(tmp_path, explainer):
    config = load_check_config(write_check(tmp_path, [30, 67, 57, 95], extra='layer = "' + LAST + '"'))
    assert config.model == tmp_path / "model.onnx" and config.images[0].path == tmp_path / "images" / "0001.png"
    report = run_checks(config, explainer=explainer)
    assert report.passed and [r.kind for r in report.results].count("prediction") == 2
    assert ET.fromstring(junit_xml(report)).find("testsuite").get("failures") == "0"


@pytest.mark.parametrize("content, fragments", [
    ('model = "model.onnx"\n[thresholds]\ntolerence = 3\n', ["unknown key 'tolerence'"]),
    ('model = "model.onnx\n', ["not valid TOML", "line 1"]),
    ('model = "model.onnx"\n[[images]]\npath = "missing.png"\nclass = 0\n', ["path 'missing.png': no such file"]),
    ('model = "model.onnx"\n[[images]]\npath = "images/0001.png"\n', ["'class' is missing"]),
    ('model = "model.onnx"\n[[images]]\npath = "images/0001.png"\nclass = 0\nregion = [5, 5, 1]\n',
     ["'region' must be [x0, y0, x1, y1]"]),
    ('model = "model.onnx"\n[[images]]\npath = "images/0001.png"\nclass = "hexagon"\n',
     ["'hexagon' is not one of the model's labels"]),
    ('model = "model.onnx"\n[[images]]\npath = "images/0001.png"\nclass = 7\n', ["class 7 is out of range"]),
    ('model = "model.onnx"\nmethod = "gradcam"\n[method_options]\naveraging = "maps"\n[[images]]\n'
     'path = "images/0001.png"\nclass = 0\n', ["'averaging' is not an option of gradcam"]),
    ('model = "model.onnx"\n[thresholds]\nmin_energy = 2\n[[images]]\npath = "images/0001.png"\nclass = 0\n',
     ["'min_energy' must be a number in [0, 1]"]),
])
def test_bad_check_configs_exit_2_with_one_line(tmp_path, content, fragments):
    write_check(tmp_path, [1, 1, 2, 2])
    config = tmp_path / "bad.toml"
    config.write_text(content)
    assert_one_line_error(run(["check", config, "--junit", tmp_path / "x.xml"]), "bad.toml", *fragments)
    assert not (tmp_path / "x.xml").exists()


def test_check_of_a_missing_file_and_a_broken_model(tmp_path):
    assert_one_line_error(run(["check", tmp_path / "none.toml"]), "none.toml", "no such check file")
    write_check(tmp_path, [1, 1, 2, 2])
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    assert_one_line_error(run(["check", tmp_path / "checks.toml"]))


# ---------------------------------------------------------------------------------------------
# compare


def test_average_ranks_and_spearman():
    np.testing.assert_array_equal(average_ranks(np.array([10.0, 20.0, 20.0, 5.0])), [2.0, 3.5, 3.5, 1.0])
    rng = np.random.default_rng(0)
    a = rng.random((9, 7))
    assert spearman(a, a ** 3 + 2) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties: the Pearson correlation of the average ranks (the textbook example)
    x, y = np.array([1, 2, 2, 3, 4.0]), np.array([2, 1, 3, 3, 5.0])
    rx, ry = average_ranks(x), average_ranks(y)
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman(np.zeros(5), np.zeros(5)) == 1.0 and spearman(np.zeros(5), x) == 0.0
    assert top_fraction_iou(a, a) == 1.0 and top_fraction_iou(a, -a) == 0.0


def perturbed_copy(path: Path, scale: float = 0.5) -> Path:
    model = onnx.load(MODEL)
    rng = np.random.default_rng(1)
    for initializer in model.graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if weights.ndim == 4:  # convolution kernels
            noisy = weights + rng.normal(0.0, scale * weights.std(), weights.shape)
            initializer.CopyFrom(numpy_helper.from_array(noisy.astype(weights.dtype), initializer.name))
    onnx.save(model, path)
    return path


def test_compare_a_model_with_itself_and_with_perturbed_weights(tmp_path):
    images = [LOCALIZATION / f"{i:04d}.png" for i in (1, 2, 3)]
    same = run(["compare", MODEL, MODEL, *images, "--method", "smoothgradcampp", "--samples", 2, "--json"])
    assert same.exit_code == 0, same.output
    document = json.loads(same.stdout)
    assert document["passed"] and len(document["images"]) == 3
    assert all(r["correlation"] == 1.0 and r["iou"] == 1.0 for r in document["images"])

    other = perturbed_copy(tmp_path / "perturbed.onnx")
    result = run(["compare", MODEL, other, *images, "--method", "gradcampp", "--threshold", 0.95])
    assert result.exit_code == 1, result.output
    assert "REGRESSED" in result.stdout and "rank corr" in result.stdout
    comparison = compare_models(MODEL, other, images, "gradcampp", threshold=0.95)
    assert max(r["correlation"] for r in comparison.images) < 1.0
    assert comparison.to_dict()["mean_iou"] < 1.0
    assert [r["class"] for r in comparison.images] == [0, 0, 1]  # model A's predictions, for both maps
    named = run(["compare", MODEL, other, *images, "--method", "gradcam", "--class", "Square", "--json"])
    assert [r["class"] for r in json.loads(named.stdout)["images"]] == [1, 1, 1]


def test_compare_bad_inputs_are_one_line_errors(tmp_path):
    assert_one_line_error(run(["compare", MODEL, tmp_path / "none.onnx", LOCALIZATION / "0001.png"]))
    assert_one_line_error(run(["compare", MODEL, MODEL, tmp_path / "none.png"]), "none.png")
