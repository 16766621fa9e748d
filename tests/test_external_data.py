"""Models whose weights stay in their external data files (graph.external): the way models over
protobuf's 2 GB limit are explained. ``READ_IN_BYTES = 0`` leaves every external tensor on disk,
so small models take the same path as a 3 GB one; ``ONNXCAM_TEST_LARGE=1`` runs a real one."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

from onnxcam import Explainer
from onnxcam.errors import ModelError, OptionError
from onnxcam.graph import external
from onnxcam.graph.prepare import load_model
from onnxcam.graph.rewrite import GRADIENT, SEED, build_gradient_model
from onnxcam.runtime.cache import load_gradient_model
from onnxcam.runtime.providers import create_session
from tests.cli_helpers import assert_one_line_error, run
from tests.test_explainer import build_cnn, random_inputs, random_png


@pytest.fixture
def on_disk(monkeypatch):
    """Every external tensor stays in its file, however small."""
    monkeypatch.setattr(external, "READ_IN_BYTES", 0)


def save_external(model: onnx.ModelProto, folder, name: str = "m.onnx", data: str = "m.onnx.data"):
    folder.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model moves the tensors' data out of the proto it is given
    onnx.save_model(copy, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=0)
    return folder / name


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def gradient_of(gm, x: np.ndarray, cls: int = 3) -> np.ndarray:
    session, _ = create_session(gm.model, "cpu")
    seed = np.zeros((len(x), gm.num_classes), np.float32)
    seed[:, cls] = 1
    return session.run([GRADIENT], {gm.input_name: x, SEED: seed})[0]


def test_weights_stay_on_disk_and_give_the_in_memory_gradient(tmp_path, on_disk, monkeypatch):
    """Layer a1: the gradient passes conv2 (stride 1), whose correlation kernel is built in the
    graph from the weight left in its file instead of being folded at rewrite time."""
    model = build_cnn(softmax=False)
    path = save_external(model, tmp_path / "model")
    monkeypatch.chdir(tmp_path)  # not the model's folder: the data is found through the folder record
    gm = build_gradient_model(path, layer="a1")
    kept = [t.name for t in external.tensors(gm.model.graph) if external.is_external(t)]
    assert {"W1", "W2", "W3"} <= set(kept)
    assert external.folder_of(gm.model) == str((tmp_path / "model").resolve())
    x = random_inputs(3)
    np.testing.assert_allclose(gradient_of(gm, x), gradient_of(build_gradient_model(model, layer="a1"), x),
                               rtol=1e-5, atol=1e-6)


def test_sessions_of_large_weights_on_disk_share_them_unpacked_unless_asked(tmp_path, on_disk, monkeypatch):
    """Prepacking would give each session a private copy of every weight the data files hold:
    above external.PREPACK_LIMIT bytes of them it is off."""
    gm = build_gradient_model(save_external(build_cnn(softmax=False), tmp_path / "model"), layer="a1")
    in_memory = build_gradient_model(build_cnn(softmax=False), layer="a1")

    def prepacking_off(model) -> bool:
        options = create_session(model, "cpu")[0].get_session_options()
        try:
            return options.get_session_config_entry("session.disable_prepacking") == "1"
        except RuntimeError:  # not set: ONNX Runtime's default, prepacking
            return False

    assert not prepacking_off(gm.model)  # a few KB: below the limit
    monkeypatch.setattr(external, "PREPACK_LIMIT", external.disk_bytes(gm.model) - 1)
    assert prepacking_off(gm.model)
    assert not prepacking_off(in_memory.model)  # weights in the model: ONNX Runtime's default
    monkeypatch.setenv("ONNXCAM_PREPACK", "1")
    assert not prepacking_off(gm.model)
    monkeypatch.setenv("ONNXCAM_PREPACK", "maybe")
    with pytest.raises(OptionError, match="ONNXCAM_PREPACK='maybe' must be 1 or 0"):
        create_session(gm.model, "cpu")


def test_explainer_maps_match_the_in_memory_model(tmp_path, on_disk):
    model = build_cnn(head="mlp")
    path = save_external(model, tmp_path / "model")
    x = random_inputs(2)
    for method in ("gradcam", "smoothgradcampp"):
        got = Explainer(path, layer="a1", cache=False).explain(x, method=method, samples=4)
        want = Explainer(model, layer="a1", cache=False).explain(x, method=method, samples=4)
        for a, b in zip(got, want):
            assert a.class_index == b.class_index
            np.testing.assert_allclose(a.raw_map, b.raw_map, rtol=1e-4, atol=1e-6)


def test_the_cached_rewrite_keeps_its_weights_in_the_models_files(tmp_path, on_disk, monkeypatch):
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path / "cache"))
    model = build_cnn(softmax=False)
    path = save_external(model, tmp_path / "model")
    first, cached = load_gradient_model(path, layer="a1")
    assert not cached
    monkeypatch.chdir(tmp_path / "cache")
    again, cached = load_gradient_model(path, layer="a1")
    assert cached and external.has_external_data(again.model)
    (entry,) = (tmp_path / "cache").rglob("*.onnx")
    stored = onnx.load(str(entry), load_external_data=False)
    assert {"W1", "W2", "W3"} <= {t.name for t in stored.graph.initializer if external.is_external(t)}
    x = random_inputs(2)
    np.testing.assert_array_equal(gradient_of(again, x), gradient_of(first, x))


def test_small_external_tensors_are_read_in(tmp_path):
    path = save_external(build_cnn(), tmp_path / "model")
    proto = load_model(path)
    assert not external.has_external_data(proto)
    assert external.folder_of(proto) is None


def test_inspect_counts_the_external_bytes(tmp_path):
    model = build_cnn()
    path = save_external(model, tmp_path / "model")
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    result = run(["inspect", path])
    assert result.exit_code == 0, result.output
    assert f"+ {weights:,} in external data" in result.output.splitlines()[0]


def test_rewrite_writes_its_own_data_file_and_leaves_the_input_alone(tmp_path, on_disk):
    model = build_cnn(softmax=False)
    path = save_external(model, tmp_path / "model")
    before = digest(tmp_path / "model")
    out = tmp_path / "out" / "grad.onnx"
    out.parent.mkdir()
    result = run(["rewrite", path, "-o", out, "--layer", "a1"])
    assert result.exit_code == 0, result.output
    assert "grad.onnx.data" in result.output
    assert digest(tmp_path / "model") == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["grad.onnx", "grad.onnx.data"]
    written = onnx.load(str(out), load_external_data=False)
    assert external.FOLDER_KEY not in {p.key for p in written.metadata_props}
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = random_inputs(2)
    seed = np.zeros((2, 10), np.float32)
    seed[:, 3] = 1
    got = session.run([GRADIENT], {"x": x, SEED: seed})[0]
    np.testing.assert_allclose(got, gradient_of(build_gradient_model(model, layer="a1"), x, 3),
                               rtol=1e-5, atol=1e-6)


def test_rewrite_refuses_to_write_over_the_inputs_data_file(tmp_path, on_disk):
    path = save_external(build_cnn(), tmp_path, name="m.onnx", data="grad.onnx.data")
    before = digest(tmp_path)
    result = run(["rewrite", path, "-o", tmp_path / "grad.onnx"])
    assert_one_line_error(result, "grad.onnx.data", "external data", "-o/--output")
    assert digest(tmp_path) == before


def test_missing_data_file_is_named(tmp_path, on_disk):
    path = save_external(build_cnn(), tmp_path)
    (tmp_path / "m.onnx.data").unlink()
    result = run(["inspect", path])
    assert_one_line_error(result, "m.onnx.data", "missing")


def test_truncated_data_file_is_named(tmp_path, on_disk):
    path = save_external(build_cnn(), tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    result = run(["inspect", path])
    assert_one_line_error(result, "m.onnx.data", "ends past the end")


@pytest.mark.parametrize("read_in_bytes", [0, external.READ_IN_BYTES])  # on disk; all read in
def test_files_linked_from_a_hugging_face_style_cache_are_found(tmp_path, monkeypatch, read_in_bytes):
    """The Hugging Face cache links model.onnx and model.onnx.data into blobs/ under hashed names
    (onnx's own reader refuses a linked data file)."""
    monkeypatch.setattr(external, "READ_IN_BYTES", read_in_bytes)
    model = build_cnn(softmax=False)
    save_external(model, tmp_path / "blobs", name="m.onnx", data="m.onnx.data")
    (tmp_path / "blobs" / "m.onnx").rename(tmp_path / "blobs" / "aa11")
    (tmp_path / "blobs" / "m.onnx.data").rename(tmp_path / "blobs" / "bb22")
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "m.onnx").symlink_to("../blobs/aa11")
    (tmp_path / "snapshot" / "m.onnx.data").symlink_to("../blobs/bb22")
    gm = build_gradient_model(tmp_path / "snapshot" / "m.onnx", layer="a1")
    assert external.has_external_data(gm.model) == (read_in_bytes == 0)
    x = random_inputs(2)
    np.testing.assert_allclose(gradient_of(gm, x), gradient_of(build_gradient_model(model, layer="a1"), x),
                               rtol=1e-5, atol=1e-6)


def test_a_data_file_linked_from_outside_the_folder_is_refused(tmp_path, on_disk):
    path = save_external(build_cnn(), tmp_path / "model")
    (tmp_path / "model" / "m.onnx.data").rename(tmp_path / "elsewhere.data")
    (tmp_path / "model" / "m.onnx.data").symlink_to(tmp_path / "elsewhere.data")
    result = run(["inspect", path])
    assert_one_line_error(result, "m.onnx.data", "outside the model's folder")


def test_an_onnxruntime_that_cannot_be_told_the_folder_is_named(tmp_path, on_disk, monkeypatch):
    import onnxruntime as ort

    path = save_external(build_cnn(), tmp_path / "model")
    monkeypatch.setattr(ort, "__version__", "1.20.1")
    result = run(["explain", path, random_png(tmp_path / "a.png"), "--out", tmp_path / "out"])
    assert_one_line_error(result, "onnxruntime 1.21 or newer", "1.20.1")


def test_a_proto_without_its_folder_is_refused(tmp_path, on_disk):
    path = save_external(build_cnn(), tmp_path)
    proto = onnx.load(str(path), load_external_data=False)
    with pytest.raises(ModelError, match="give the model's path"):
        Explainer(proto)


def _large_model(folder, classes: int = 140_000, channels: int = 4096):
    """x [N,3,16,16] -> Conv(3x3) -> Relu -> GAP -> Gemm with a [classes, channels] weight
    (2.3 GB at the defaults), written the way an exporter writes external data: in pieces."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((channels, 3, 3, 3), dtype=np.float32) * 0.2
    initializers = []
    with open(folder / "big.onnx.data", "wb") as stream:
        for name, shape in (("W1", w1.shape), ("W2", (classes, channels))):
            offset = stream.tell()
            if name == "W1":
                stream.write(w1.tobytes())
            else:
                for start in range(0, classes, 8192):
                    rows = min(8192, classes - start)
                    stream.write((rng.standard_normal((rows, channels), dtype=np.float32) * 0.05).tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape,
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", "big.onnx.data"), ("offset", str(offset)),
                               ("length", str(stream.tell() - offset))):
                tensor.external_data.add(key=key, value=value)
            initializers.append(tensor)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W2"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              initializers)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                    str(folder / "big.onnx"))
    return folder / "big.onnx"


@pytest.mark.skipif(os.environ.get("ONNXCAM_TEST_LARGE") != "1",
                    reason="writes a 2.3 GB model: set ONNXCAM_TEST_LARGE=1 (needs ~5 GB of memory)")
def test_a_model_over_2_gb_is_explained_and_rewritten(tmp_path):
    path = _large_model(tmp_path / "model")
    assert (tmp_path / "model" / "big.onnx.data").stat().st_size > 2**31
    x = random_inputs(1)[:, :, :16, :16]
    maps = Explainer(path, layer="c1").explain(x, method="smoothgradcampp", samples=2)
    assert maps[0].raw_map.shape == (16, 16) and np.isfinite(maps[0].raw_map).all()
    out = tmp_path / "grad.onnx"
    result = run(["rewrite", path, "-o", out, "--layer", "c1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grad.onnx.data").stat().st_size > 2**31
    whole = onnx.load(str(path))  # the user loaded it whole: too large to hand over as a proto
    with pytest.raises(ModelError, match="2 GB"):
        Explainer(whole)
