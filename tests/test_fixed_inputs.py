"""Inputs other than the image, given values (--input NAME=VALUE, Explainer(inputs=...)) and fixed
as constants before the rewrite (onnxcam/graph/fixed_inputs.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcam import Explainer
from onnxcam.errors import ModelError
from tests.cli_helpers import assert_one_line_error, run
from tests.test_explainer import build_cnn, random_inputs, random_png, save_model


def with_temperature(shape=(1,)) -> onnx.ModelProto:
    """build_cnn's logits divided by a second input, ``temperature``."""
    model = build_cnn("mlp", seed=3, softmax=False)
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("temperature", TensorProto.FLOAT, list(shape)))
    output = graph.output[0]
    graph.node.append(helper.make_node("Div", [output.name, "temperature"], ["scaled"]))
    graph.output.remove(output)
    graph.output.append(helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["N", 10]))
    return model


@pytest.mark.parametrize("value", [4.0, [4.0], np.array([4.0], np.float32)])
def test_a_fixed_input_takes_its_value(tmp_path, value):
    """Logits over 4: every gradient, and the Grad-CAM map, is a quarter of the plain model's."""
    x = random_inputs(2)
    plain = Explainer(build_cnn("mlp", seed=3, softmax=False), cache=False).explain(x, method="gradcam", targets=3)
    fixed = Explainer(with_temperature(), cache=False, inputs={"temperature": value}).explain(
        x, method="gradcam", targets=3)
    for a, b in zip(plain, fixed):
        np.testing.assert_allclose(4 * b.raw_map, a.raw_map, rtol=1e-5, atol=1e-7)


def test_without_the_value_the_error_says_how_to_give_it():
    with pytest.raises(ModelError, match=r"2 inputs \(x, temperature\).*--input NAME=VALUE"):
        Explainer(with_temperature(), cache=False)


def test_the_command_line_takes_numbers_lists_and_npy_files(tmp_path):
    path = save_model(with_temperature(shape=(10,)), tmp_path / "m.onnx")  # one per class
    image = random_png(tmp_path / "a.png")
    np.save(tmp_path / "t.npy", np.full(10, 2.0, np.float32))
    for value in ("2", ",".join(["2"] * 10), str(tmp_path / "t.npy")):
        result = run(["explain", path, image, "--out", tmp_path / "out", "--input", f"temperature={value}",
                      "-m", "gradcam"])
        assert result.exit_code == 0, result.output
    report = run(["inspect", path, "--input", "temperature=2"])
    assert report.exit_code == 0 and "temperature" not in report.stdout.split("Outputs:")[0]
    assert "Candidate target layers (4, * = automatic)" in report.stdout
    without = run(["inspect", path])
    assert "Candidate target layers: unknown while the model has inputs besides the image" in without.stdout
    written = run(["rewrite", path, "-o", tmp_path / "grad.onnx", "--input", "temperature=2"])
    assert written.exit_code == 0, written.output
    assert [i.name for i in onnx.load(str(tmp_path / "grad.onnx")).graph.input] == ["x", "onnxcam_seed"]


@pytest.mark.parametrize("option, fragments", [
    ("temp=2", ["--input temp", "no input 'temp'", "x, temperature"]),
    ("temperature", ["--input 'temperature'", "NAME=VALUE"]),
    ("temperature=hot", ["--input temperature", "'hot' is not a number"]),
    ("temperature=1,2,3", ["--input temperature", "shape [3] does not fit", "[10]"]),
    ("temperature=missing.npy", ["--input temperature", "cannot read 'missing.npy'"]),
])
def test_bad_input_values_are_one_line_errors(tmp_path, option, fragments):
    path = save_model(with_temperature(shape=(10,)), tmp_path / "m.onnx")
    result = run(["explain", path, random_png(tmp_path / "a.png"), "--out", tmp_path / "out", "--input", option])
    assert_one_line_error(result, *fragments)


def test_fixing_every_input_is_refused(tmp_path):
    path = save_model(with_temperature(shape=(10,)), tmp_path / "m.onnx")
    result = run(["explain", path, random_png(tmp_path / "a.png"), "--out", tmp_path / "out",
                  "--input", "x=1", "--input", "temperature=2"])
    assert_one_line_error(result, "--input x, temperature", "no input for the image")


def test_a_check_file_gives_the_inputs_in_its_inputs_table(tmp_path):
    save_model(with_temperature(shape=(10,)), tmp_path / "m.onnx")
    random_png(tmp_path / "a.png")
    np.save(tmp_path / "t.npy", np.full(10, 2.0, np.float32))
    body = ('model = "m.onnx"\nmethod = "gradcam"\n{inputs}\n[thresholds]\nprediction = false\npointing = false\n\n'
            '[[images]]\npath = "a.png"\nclass = 3\n')
    for table in ("[inputs]\ntemperature = 2.0", '[inputs]\ntemperature = "t.npy"',
                  "[inputs]\ntemperature = [2.0, 2, 2, 2, 2, 2, 2, 2, 2, 2]"):
        (tmp_path / "check.toml").write_text(body.format(inputs=table))
        result = run(["check", tmp_path / "check.toml"])
        assert result.exit_code == 0, result.output
    (tmp_path / "check.toml").write_text(body.format(inputs=""))
    assert_one_line_error(run(["check", tmp_path / "check.toml"]), "2 inputs", "--input NAME=VALUE")
    (tmp_path / "check.toml").write_text(body.format(inputs="[inputs]\ntemperature = {value = 2}"))
    assert_one_line_error(run(["check", tmp_path / "check.toml"]), "[inputs] temperature", "a number")


def test_a_flag_input_takes_true_or_false():
    from onnx import numpy_helper

    from onnxcam.graph.fixed_inputs import fix_inputs

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "flag",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
                               helper.make_tensor_value_info("training", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    for given, expected in (("false", False), ("True", True), (0, False), (True, True)):
        fixed = fix_inputs(helper.make_model(graph), {"training": given})
        assert [i.name for i in fixed.graph.input] == ["x"]
        value = numpy_helper.to_array(fixed.graph.initializer[0])
        assert value.dtype == np.bool_ and value.shape == () and bool(value) is expected


def test_compare_gives_both_models_the_inputs(tmp_path):
    path = save_model(with_temperature(shape=(10,)), tmp_path / "m.onnx")
    image = random_png(tmp_path / "a.png")
    result = run(["compare", path, path, image, "--input", "temperature=2", "--method", "gradcam", "--json"])
    assert result.exit_code == 0, result.output
    assert_one_line_error(run(["compare", path, path, image]), "2 inputs", "--input NAME=VALUE")
