"""Tests for onnxcam.runtime (device choice, sessions, disk cache) and onnxcam.explain.noise."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcam import Explainer
from onnxcam.errors import LayerError, ModelError, OptionError
from onnxcam.explain.explainer import MAX_BATCH
from onnxcam.explain.noise import NoiseBank, noise_sigma, noisy_batches, sample_generator
from onnxcam.graph import external
from onnxcam.graph.rewrite import build_gradient_model
from onnxcam.runtime import cache as cache_module
from onnxcam.runtime.cache import cache_dir, load_gradient_model
from onnxcam.runtime.providers import check_device, create_session, cuda_listed, default_threads, session_options
from onnxcam.runtime.session import GradientSession
from tests.test_explainer import build_cnn, random_inputs, save_model


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def model_path(tmp_path):
    return save_model(build_cnn("mlp", seed=4), tmp_path / "cnn.onnx")


def _cuda_usable() -> bool:
    if not cuda_listed():
        return False
    try:
        _, device = create_session(build_cnn().SerializeToString(), "auto")
    except Exception:  # noqa: BLE001
        return False
    return device == "cuda"


# ---------------------------------------------------------------------------------------------
# devices


def test_check_device():
    assert check_device(None) == "auto"
    assert check_device("CPU") == "cpu"
    assert check_device("gpu") == "cuda"
    with pytest.raises(OptionError, match="choose auto, cpu or cuda"):
        check_device("tpu")


def test_cpu_session_reports_cpu():
    session, device = create_session(build_cnn().SerializeToString(), "cpu")
    assert device == "cpu" and session.get_providers() == ["CPUExecutionProvider"]


def test_auto_device_is_decided_from_the_session_and_stays_quiet(capfd):
    session, device = create_session(build_cnn().SerializeToString(), "auto")
    got_cuda = "CUDAExecutionProvider" in session.get_providers()
    assert device == ("cuda" if got_cuda else "cpu")
    err = capfd.readouterr().err
    assert "Failed to create CUDAExecutionProvider" not in err
    assert "cannot open shared object file" not in err


def test_explicit_cuda_that_cannot_run_is_a_one_line_option_error(capfd):
    if _cuda_usable():
        pytest.skip("CUDA works on this machine")
    with pytest.raises(OptionError) as excinfo:
        create_session(build_cnn().SerializeToString(), "cuda")
    message = str(excinfo.value)
    assert "\n" not in message and "cpu" in message
    assert message.startswith("--device cuda was requested but onnxruntime cannot use CUDA")
    assert "Failed to create" not in capfd.readouterr().err


def test_threads_follow_the_environment(monkeypatch):
    monkeypatch.setenv("ONNXCAM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("ONNXCAM_THREADS", "many")
    with pytest.raises(OptionError, match="ONNXCAM_THREADS"):
        default_threads()
    monkeypatch.delenv("ONNXCAM_THREADS")
    assert 1 <= default_threads() <= 16


def test_unloadable_model_is_a_model_error():
    model = build_cnn()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        create_session(model.SerializeToString(), "cpu")


def test_unloadable_model_message_leaves_out_the_cpp_source_location():
    model = build_cnn()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ModelError) as raised:
        create_session(model.SerializeToString(), "cpu")
    assert "NoSuchOp" in str(raised.value) and ".cc:" not in str(raised.value)


def test_too_new_ir_version_names_both_versions_and_the_fix(tmp_path):
    model = build_cnn()
    model.ir_version = 99
    with pytest.raises(ModelError, match=r"IR version 99 is newer than onnxruntime .* \(at most \d+\): "
                                         r"re-save the model with ir_version \d+"):
        create_session(model.SerializeToString(), "cpu")



def test_explainer_reports_an_ir_version_the_checker_accepts_but_onnxruntime_does_not(tmp_path):
    model = build_cnn()
    model.ir_version = onnx.IR_VERSION  # the newest the installed onnx writes
    try:
        create_session(model.SerializeToString(), "cpu")
    except ModelError:
        pass
    else:
        pytest.skip(f"this onnxruntime reads IR version {onnx.IR_VERSION}")
    path = save_model(model, tmp_path / "new_ir.onnx")
    with pytest.raises(ModelError, match=f"IR version {onnx.IR_VERSION} is newer than onnxruntime"):
        Explainer(path, device="cpu").explain(random_inputs(1))


# ---------------------------------------------------------------------------------------------
# sessions


def test_a_failing_run_raises_without_onnxruntime_logging_it_too(model_path, capfd):
    """ONNX Runtime logs a failing kernel in colour on stderr and raises the same text: the
    session's runs keep only the exception, so the CLI's error stays one line."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "bad_reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([7, -1], np.int64), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    failing = create_session(model.SerializeToString(), "cpu")[0]
    session = GradientSession(load_gradient_model(model_path)[0], device="cpu")
    capfd.readouterr()
    with pytest.raises(Exception, match="Reshape"):
        session._run("full", failing, None, {"x": np.zeros((1, 16), np.float32)})
    assert capfd.readouterr().err == ""


def test_gradient_session_runs_and_counts(model_path):
    gm = build_gradient_model(model_path, layer="a1")
    session = GradientSession(gm, device="cpu")
    x = random_inputs(3)
    seed = np.zeros((3, 10), np.float32)
    seed[np.arange(3), [1, 4, 7]] = 1
    activation, gradient, logits = session.run(x, seed)
    assert activation.shape == gradient.shape == (3, 8, 32, 32) and logits.shape == (3, 10)
    assert session.run_calls == 1 and session.device == "cpu"
    # the cut model (forward part + head) gives the same numbers
    assert session.has_split
    a2, l2 = session.forward(x)
    g2 = session.head(a2, seed)
    np.testing.assert_array_equal(a2, activation)
    np.testing.assert_allclose(l2, logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g2, gradient, rtol=1e-5, atol=1e-7)
    assert session.run_calls == 3 and dict(session.calls) == {"full": 1, "forward": 1, "head": 1}
    # the logits are those of the original model
    plain = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits_ref = np.log(np.concatenate([plain.run(None, {"x": x[i:i + 1]})[0] for i in range(3)]))
    np.testing.assert_allclose(logits - logits.max(1, keepdims=True),
                               logits_ref - logits_ref.max(1, keepdims=True), atol=1e-4)


def test_layer_beside_a_skip_connection_cannot_be_cut_but_still_explains(tmp_path):
    """a2 does not separate the input from the logits (s = skip(a1) + a2), so there is no head
    model; with predicted classes the whole model then runs twice (zero seed, then the seeds).
    On the CPU: on CUDA the clean pass is one run of the noisy model (tests/test_gpu.py)."""
    path = save_model(build_cnn("mlp", seed=5, residual=True), tmp_path / "res.onnx")
    explainer = Explainer(path, layer="a2", batch_size=4, device="cpu")
    assert not explainer.session.has_split
    x = random_inputs(3, seed=1)
    predicted = explainer.explain(x, method="gradcampp")
    assert explainer.session.run_calls == 2 and explainer.session.calls["full"] == 2
    given = explainer.explain(x, method="gradcampp", targets=[r.class_index for r in predicted])
    for p, g in zip(predicted, given):
        np.testing.assert_array_equal(p.raw_map, g.raw_map)
    top2 = explainer.explain(x, method="smoothgradcampp", top_k=2, samples=3)
    assert len(top2) == 6
    # the automatic layer (s) dominates: it can be cut
    assert Explainer(path).session.has_split


def test_batch_size_is_bounded_and_overridable(model_path):
    assert Explainer(model_path, device="cpu").batch_size == MAX_BATCH == 13
    assert Explainer(model_path, batch_size=3).batch_size == 3
    with pytest.raises(OptionError, match="batch size"):
        Explainer(model_path, batch_size=0)

def test_automatic_batch_counts_the_widest_step(model_path, monkeypatch):
    """The automatic batch bounds what a run holds at its widest node, not only the input and
    the layer: the graph's largest inputs-plus-outputs per image, from its shapes."""
    from onnxcam.explain import explainer as explainer_module

    explainer = Explainer(model_path, device="cpu")
    gm = explainer.gradient_model
    rows = {v.name: int(np.prod([d.dim_value for d in v.type.tensor_type.shape.dim if d.dim_value]))
            for v in (*gm.model.graph.input, *gm.model.graph.value_info, *gm.model.graph.output)
            if any(not d.dim_value for d in v.type.tensor_type.shape.dim)}  # those with the batch
    widest = max(sum(rows.get(n, 0) for n in (*node.input, *node.output)) for node in gm.model.graph.node)
    assert gm.widest_step == widest > 2 * 3 * 32 * 32  # a conv's input and its wider output
    per_image = 4 * (3 * 32 * 32 + widest + 2 * int(np.prod(gm.activation_shape[1:])))
    monkeypatch.setattr(explainer_module, "BATCH_MEMORY", 5 * per_image + 1)
    assert Explainer(model_path, device="cpu").batch_size == 5
    # a large constant (a weight made by a Constant node) does not grow with the batch
    model = onnx.load(model_path)
    big = onnx.helper.make_tensor("big", onnx.TensorProto.FLOAT, [64, 64, 64], np.zeros(64 ** 3, np.float32))
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["big_value"], value=big))
    model.graph.node.append(onnx.helper.make_node("ReduceSum", ["big_value"], ["big_sum"], keepdims=0))
    model.graph.output.append(onnx.helper.make_tensor_value_info("big_sum", onnx.TensorProto.FLOAT, []))
    with_constant = Explainer(model, device="cpu", cache=False).gradient_model
    assert with_constant.widest_step == widest



def test_sessions_stop_spinning_after_each_run():
    """An explanation alternates between sessions; idle spinning threads of one slowed the next."""
    options = session_options(2)
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_dir_from_environment(isolated_cache, monkeypatch):
    assert cache_dir() == isolated_cache
    monkeypatch.delenv("ONNXCAM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert str(cache_dir()) == "/somewhere/onnxcam"


def test_cache_hit_and_key(model_path, isolated_cache):
    first, cached = load_gradient_model(model_path, layer="a1")
    assert not cached
    entries = sorted(p.name for p in isolated_cache.rglob("*") if p.is_file())
    assert len(entries) == 2 and entries[0].endswith(".json") and entries[1].endswith(".onnx")
    second, cached = load_gradient_model(model_path, layer="a1")
    assert cached
    for field in ("layer", "score", "input_name", "input_shape", "activation_shape", "seed_shape",
                  "num_classes", "candidates", "path_is_linear"):
        assert getattr(first, field) == getattr(second, field), field
    assert first.model.SerializeToString() == second.model.SerializeToString()
    # another layer, score or model file is another entry
    _, cached = load_gradient_model(model_path, layer="a2")
    assert not cached
    model_path.write_bytes(build_cnn("mlp", seed=9).SerializeToString())
    _, cached = load_gradient_model(model_path, layer="a1")
    assert not cached
    # --no-cache neither reads nor writes
    count = len(list(isolated_cache.rglob("*.onnx")))
    _, cached = load_gradient_model(model_path, layer="a1", use_cache=False)
    assert not cached and len(list(isolated_cache.rglob("*.onnx"))) == count


@pytest.mark.parametrize("damage", ["truncate_onnx", "garble_json", "wrong_field"])
def test_corrupt_cache_entry_is_rebuilt(model_path, isolated_cache, damage):
    load_gradient_model(model_path)
    onnx_file = next(isolated_cache.rglob("*.onnx"))
    json_file = next(isolated_cache.rglob("*.json"))
    if damage == "truncate_onnx":
        onnx_file.write_bytes(onnx_file.read_bytes()[:500])
    elif damage == "garble_json":
        json_file.write_text("{not json")
    else:
        info = json.loads(json_file.read_text())
        del info["activation_shape"]
        json_file.write_text(json.dumps(info))
    rebuilt, cached = load_gradient_model(model_path)
    assert not cached and rebuilt.layer == "a2"
    again, cached = load_gradient_model(model_path)  # and the entry was repaired
    assert cached


def test_unwritable_cache_is_not_fatal(model_path, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(blocker))
    gm, cached = load_gradient_model(model_path)
    assert not cached and gm.layer == "a2"
    assert Explainer(model_path).explain(random_inputs(1), method="gradcam")[0].raw_map.shape == (32, 32)


def test_model_with_external_data_is_cached_until_its_data_changes(tmp_path, isolated_cache):
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(build_cnn(), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    gm, cached = load_gradient_model(folder / "m.onnx")
    assert not cached and gm.layer == "a2"
    assert load_gradient_model(folder / "m.onnx")[1]
    data = folder / "weights.bin"
    changed = build_cnn(seed=1)  # same shapes, other weights: only the data file differs
    onnx.save_model(changed, str(tmp_path / "other.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="other.bin", size_threshold=0)
    data.write_bytes((tmp_path / "other.bin").read_bytes())
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    rebuilt, cached = load_gradient_model(folder / "m.onnx")
    assert not cached
    x = random_inputs(1)
    got = Explainer(folder / "m.onnx").explain(x, method="gradcam")[0].raw_map
    want = Explainer(build_cnn(seed=1), cache=False).explain(x, method="gradcam")[0].raw_map
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.fixture
def spilling(monkeypatch):
    """The small test CNN counts as a large model: its weights go to a shared weights file."""
    monkeypatch.setattr(cache_module, "SPILL_BYTES", 100)
    monkeypatch.setattr(external, "READ_IN_BYTES", 100)


def test_large_weights_go_to_one_weights_file_and_give_the_same_maps(model_path, isolated_cache, spilling):
    x = random_inputs(2)
    want = Explainer(model_path, cache=False).explain(x, method="smoothgradcampp", samples=4)
    built, cached = load_gradient_model(model_path)
    assert not cached
    weights = next(isolated_cache.rglob("*.weights"))
    assert external.folder_of(built.model) == str(weights.parent)
    moved = [t for t in built.model.graph.initializer if external.is_external(t)]
    assert moved and all(external.tensor_bytes(t) > 100 for t in moved)
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in moved]
    assert all(offset % external.SPILL_ALIGN == 0 for offset in offsets)
    assert not any(external.is_external(t) for t in onnx.load(str(model_path)).graph.initializer)  # untouched
    for source in (model_path, onnx.load(str(model_path))):  # the cache hit, and a proto of the same bytes
        got = Explainer(source).explain(x, method="smoothgradcampp", samples=4)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.raw_map, b.raw_map)
    assert load_gradient_model(model_path)[1]
    # another layer's entry refers to the same file, written once
    written = weights.stat().st_mtime_ns
    other, _ = load_gradient_model(model_path, layer="a1")
    assert list(isolated_cache.rglob("*.weights")) == [weights] and weights.stat().st_mtime_ns == written
    assert external.folder_of(other.model) == str(weights.parent)
    cache_module.prune(0)  # the entries go; the weights stay while rewritten models refer to them
    assert [p for p in isolated_cache.rglob("*") if p.is_file()] == [weights]
    del built, other
    gc.collect()
    cache_module.prune(0)
    assert not [p for p in isolated_cache.rglob("*") if p.is_file()]


def test_a_weights_file_goes_only_when_unreferenced_and_unused(model_path, isolated_cache, spilling):
    load_gradient_model(model_path, layer="a1")
    load_gradient_model(model_path, layer="a2")
    weights = next(isolated_cache.rglob("*.weights"))
    entries = _entries(isolated_cache)
    monkeypatch_budget = sum(p.stat().st_size for p in isolated_cache.rglob("*") if p.is_file()) - 1
    cache_module.prune(monkeypatch_budget)  # one entry goes; the other still refers to the weights
    assert len(_entries(isolated_cache)) == 1 and weights.exists()
    cache_module.prune(weights.stat().st_size)  # no entry left; the weights were used just now
    assert not _entries(isolated_cache) and weights.exists()
    _age(isolated_cache, weights.stem, 2 * cache_module.LEFTOVER_AGE_S)
    cache_module.prune(weights.stat().st_size)
    assert not weights.exists() and entries


def test_an_idle_explainer_keeps_its_weights_file_after_its_entries_are_pruned(model_path, isolated_cache,
                                                                               spilling):
    """An explainer that made only its Grad-CAM session, idle for hours while other work pruned
    its model's entries, still makes its Smooth Grad-CAM++ sessions from the weights file."""
    x = random_inputs(1)
    want = Explainer(model_path, cache=False).explain(x, method="smoothgradcampp", samples=4)[0].raw_map
    explainer = Explainer(model_path)
    explainer.explain(x, method="gradcam")
    weights = next(isolated_cache.rglob("*.weights"))
    cache_module.prune(weights.stat().st_size)  # every entry goes: the budget fits only the weights
    assert not _entries(isolated_cache)
    _age(isolated_cache, weights.stem, 2 * cache_module.LEFTOVER_AGE_S)
    cache_module.prune(weights.stat().st_size)
    assert weights.exists()
    got = explainer.explain(x, method="smoothgradcampp", samples=4)[0].raw_map
    np.testing.assert_array_equal(got, want)
    del explainer
    gc.collect()
    _age(isolated_cache, weights.stem, 2 * cache_module.LEFTOVER_AGE_S)  # making a session touched it
    cache_module.prune(weights.stat().st_size)
    assert not weights.exists()


def test_a_hold_of_another_process_keeps_a_file_until_it_exits(tmp_path):
    from onnxcam.runtime.file_hold import remove_unless_held

    path = tmp_path / "m.weights"
    path.write_bytes(b"w" * 64)
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from onnxcam.runtime.file_hold import hold; "
        "handle = hold(Path(sys.argv[1])); print(handle is not None, flush=True); sys.stdin.read()"),
        str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "True"
        assert not remove_unless_held(path) and path.exists()
    finally:
        child.communicate("")
    assert remove_unless_held(path) and not path.exists()
    assert remove_unless_held(path)  # already gone


def test_a_given_proto_is_spilled_from_a_copy(isolated_cache, spilling):
    proto = build_cnn("mlp", seed=4)
    before = proto.SerializeToString()
    built, _ = load_gradient_model(proto)
    assert any(external.is_external(t) for t in built.model.graph.initializer)
    assert proto.SerializeToString() == before


@pytest.mark.parametrize("damage", ["remove", "truncate"])
def test_a_missing_or_short_weights_file_rebuilds_the_entry(model_path, isolated_cache, spilling, damage):
    load_gradient_model(model_path)
    weights = next(isolated_cache.rglob("*.weights"))
    if damage == "remove":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-10])
    rebuilt, cached = load_gradient_model(model_path)
    assert not cached and weights.stat().st_size > 0
    assert load_gradient_model(model_path)[1]
    assert Explainer(model_path).explain(random_inputs(1), method="gradcam")[0].raw_map.shape == (32, 32)


def test_a_failed_rewrite_leaves_no_weights_file(model_path, isolated_cache, spilling):
    with pytest.raises(LayerError):
        load_gradient_model(model_path, layer="no-such-layer")
    assert not [p for p in isolated_cache.rglob("*") if p.is_file()]
    load_gradient_model(model_path, layer="a1")  # but one that entries use stays
    with pytest.raises(LayerError):
        load_gradient_model(model_path, layer="no-such-layer")
    assert list(isolated_cache.rglob("*.weights"))


def test_weights_over_half_the_cache_are_not_spilled_into_it(model_path, isolated_cache, spilling, monkeypatch):
    weights = external.spillable_bytes(onnx.load(str(model_path)))
    monkeypatch.setenv("ONNXCAM_CACHE_SIZE", f"{(2 * weights - 8) / 1024:.3f}K")  # half: 4 bytes short
    load_gradient_model(model_path)
    assert not list(isolated_cache.rglob("*.weights"))
    monkeypatch.setenv("ONNXCAM_CACHE_SIZE", f"{(2 * weights + 8) / 1024:.3f}K")
    load_gradient_model(model_path, layer="a1")
    assert list(isolated_cache.rglob("*.weights"))


def test_a_tensor_longer_than_its_shape_is_not_spilled(tmp_path, spilling):
    """Spill plans the file from the tensors' dims (reading raw_data copies it); a tensor whose
    raw_data is longer (the checker lets that pass) stops the spill before any file is left."""
    proto = build_cnn(seed=4)
    big = max(proto.graph.initializer, key=external.tensor_bytes)
    assert external.spillable_bytes(proto) >= external.tensor_bytes(big) > 100
    big.raw_data = big.raw_data + bytes(8)
    with pytest.raises(OSError, match=big.name):
        external.spill(proto, tmp_path / "m.weights")
    assert not list(tmp_path.iterdir())


def test_small_models_are_not_spilled(model_path, isolated_cache):
    load_gradient_model(model_path)  # a few KB: below SPILL_BYTES
    assert not list(isolated_cache.rglob("*.weights"))


def test_models_with_external_data_keep_their_own_files(tmp_path, isolated_cache, spilling):
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(build_cnn(), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    gm, _ = load_gradient_model(folder / "m.onnx")
    assert external.folder_of(gm.model) == str(folder) and not list(isolated_cache.rglob("*.weights"))


def _entries(folder) -> list[str]:
    return sorted(path.stem for path in folder.rglob("*.json"))


def _age(folder, stem: str, seconds: float) -> None:
    """Make entry ``stem`` look last used ``seconds`` ago."""
    for path in folder.rglob(f"{stem}.*"):
        stamp = time.time() - seconds
        os.utime(path, (stamp, stamp))


def test_cache_keeps_to_its_size_dropping_the_least_recently_used(model_path, isolated_cache, monkeypatch):
    load_gradient_model(model_path, layer="a1")
    entry = sum(path.stat().st_size for path in isolated_cache.rglob("*") if path.is_file())
    monkeypatch.setenv("ONNXCAM_CACHE_SIZE", f"{2.5 * entry / 1024:.3f}K")  # room for two entries
    first = _entries(isolated_cache)
    load_gradient_model(model_path, layer="a2")
    both = _entries(isolated_cache)
    assert len(both) == 2
    _age(isolated_cache, first[0], 200)  # a1 is the older one...
    _age(isolated_cache, next(stem for stem in both if stem not in first), 100)
    _, cached = load_gradient_model(model_path, layer="a1")  # ...until this hit uses it
    assert cached
    load_gradient_model(model_path, layer="c1")  # a third entry: a2, least recently used, goes
    kept = _entries(isolated_cache)
    assert len(kept) == 2 and first[0] in kept
    assert not [path for path in isolated_cache.rglob("*.onnx") if path.stem not in kept]
    assert sum(path.stat().st_size for path in isolated_cache.rglob("*") if path.is_file()) <= 2.5 * entry
    _, cached = load_gradient_model(model_path, layer="a2")
    assert not cached


def test_cache_skips_an_entry_larger_than_its_size_and_can_be_off(model_path, isolated_cache, monkeypatch):
    monkeypatch.setenv("ONNXCAM_CACHE_SIZE", "1K")
    gm, cached = load_gradient_model(model_path)
    assert not cached and gm.layer == "a2" and not list(isolated_cache.rglob("*.onnx"))
    monkeypatch.setenv("ONNXCAM_CACHE_SIZE", "1G")
    load_gradient_model(model_path)
    monkeypatch.setenv("ONNXCAM_CACHE_SIZE", "0")  # off: neither read nor written
    _, cached = load_gradient_model(model_path)
    assert not cached
    load_gradient_model(model_path, layer="a1")
    assert len(_entries(isolated_cache)) == 1


def test_cache_deletes_old_leftovers_of_interrupted_writes(model_path, isolated_cache, monkeypatch):
    load_gradient_model(model_path, layer="a1")
    folder = next(isolated_cache.rglob("*.json")).parent
    prefix = folder.name
    old_orphan, young_orphan = folder / (prefix + "0" * 62 + ".onnx"), folder / (prefix + "1" * 62 + ".onnx")
    old_temporary = folder / f".{prefix}{'2' * 62}.1234abcd.tmp.onnx"
    foreign = [folder / "notes.txt", folder / ("f" * 64 + ".onnx" if prefix != "ff" else "e" * 64 + ".onnx"),
               isolated_cache / "readme.onnx"]  # not onnxcam's: never touched
    for path in (old_orphan, young_orphan, old_temporary, *foreign):
        path.write_bytes(b"x" * 100)
    for path in (old_orphan, old_temporary, *foreign):
        os.utime(path, (time.time() - 2 * cache_module.LEFTOVER_AGE_S,) * 2)
    load_gradient_model(model_path, layer="a2")  # a write prunes
    assert not old_orphan.exists() and not old_temporary.exists()
    assert young_orphan.exists()  # it may be another process's write in progress
    assert all(path.exists() for path in foreign)
    assert len(_entries(isolated_cache)) == 2
    monkeypatch.setenv("ONNXCAM_CACHE_SIZE", "1K")  # even when over budget, others' files stay
    cache_module.prune(cache_module.cache_budget())
    assert all(path.exists() for path in foreign) and not _entries(isolated_cache)


@pytest.mark.parametrize("value, size", [("500M", 500 * 2**20), ("2g", 2 * 2**30), ("1.5GiB", 3 * 2**29),
                                         ("64 KB", 64 * 2**10), ("0", 0), ("", 2 * 2**30)])
def test_cache_size_from_environment(monkeypatch, value, size):
    monkeypatch.setenv("ONNXCAM_CACHE_SIZE", value)
    assert cache_module.cache_budget() == size


@pytest.mark.parametrize("value", ["2048", "lots", "-1G", "2X"])
def test_wrong_cache_size_names_the_variable(monkeypatch, model_path, value):
    monkeypatch.setenv("ONNXCAM_CACHE_SIZE", value)
    with pytest.raises(OptionError, match=r"ONNXCAM_CACHE_SIZE=.*500M or 2G"):
        load_gradient_model(model_path)


def test_cache_key_includes_versions(monkeypatch):
    key = cache_module.cache_key("abc", None, None)
    monkeypatch.setattr(onnx, "__version__", "0.0.1")
    assert cache_module.cache_key("abc", None, None) != key
    assert cache_module.cache_key("abc", "a1", None) != cache_module.cache_key("abc", None, "a1")


# ---------------------------------------------------------------------------------------------
# noise


def test_noise_is_independent_of_the_batch_size_and_of_the_other_images():
    images = random_inputs(3, seed=2)
    by_batch = {}
    for batch in (1, 4, 7, 100):
        samples = {}
        for chunk in noisy_batches(images, 5, 0.2, 42, batch, bank=NoiseBank(0)):
            assert len(chunk.inputs) <= batch
            for row, sample, values in zip(chunk.rows, chunk.sample, chunk.inputs):
                samples[(int(row), int(sample))] = values
        by_batch[batch] = samples
    assert len(by_batch[1]) == 15
    for batch in (4, 7, 100):
        for key, values in by_batch[1].items():
            assert np.array_equal(values, by_batch[batch][key])
    # sigma = noise_level * (max - min) of each image
    for row in range(3):
        noise = np.stack([by_batch[1][(row, s)] - images[row] for s in range(5)])
        sigma = noise_sigma(images[row], 0.2)
        assert sigma == pytest.approx(0.2 * float(images[row].max() - images[row].min()))
        assert abs(noise.std() / sigma - 1) < 0.02
    # common random numbers: sample s of every image is sigma * z_s, wherever the image stands
    moved = list(noisy_batches(images[2:], 1, 0.2, 42, 8))[0]
    assert np.array_equal(moved.inputs[0], by_batch[1][(2, 0)])
    z = [(by_batch[1][(row, 3)] - images[row]) / noise_sigma(images[row], 0.2) for row in range(3)]
    np.testing.assert_allclose(z[0], z[1], atol=1e-5)
    np.testing.assert_allclose(z[0], z[2], atol=1e-5)
    assert not np.allclose(by_batch[1][(0, 0)] - images[0], by_batch[1][(0, 1)] - images[0])


def test_noise_memory_is_bounded_by_the_batch():
    images = random_inputs(2)
    chunks = list(noisy_batches(images, 1000, 0.1, 0, 16))
    assert len(chunks) == math.ceil(2000 / 16)
    assert max(len(c.inputs) for c in chunks) == 16


def test_generator_is_derived_from_seed_and_sample():
    a = sample_generator(1, 0).standard_normal(4)
    assert np.array_equal(a, sample_generator(1, 0).standard_normal(4))
    assert not np.array_equal(a, sample_generator(1, 1).standard_normal(4))
    assert not np.array_equal(a, sample_generator(2, 0).standard_normal(4))


def test_noise_bank_serves_the_values_it_would_draw_and_keeps_to_its_budget():
    shape = (3, 8, 8)
    one = 4 * 3 * 8 * 8
    bank = NoiseBank(budget=5 * one)
    first = [bank.standard_normal(7, s, shape, np.float32) for s in range(8)]
    for s, values in enumerate(first):
        assert np.array_equal(values, sample_generator(7, s).standard_normal(shape, dtype=np.float32))
        assert not values.flags.writeable
    assert bank.nbytes == 5 * one  # the first five kept; a group never evicts its own samples
    assert bank.standard_normal(7, 0, shape, np.float32) is first[0]
    assert bank.standard_normal(7, 6, shape, np.float32) is not first[6]
    # a new seed makes room by dropping the least recently used group
    other = bank.standard_normal(8, 0, shape, np.float32)
    assert bank.nbytes == one
    assert bank.standard_normal(8, 0, shape, np.float32) is other
    assert not np.array_equal(other, first[0])
    # a sample larger than the budget is drawn but never kept
    tiny = NoiseBank(budget=one - 1)
    tiny.standard_normal(7, 0, shape, np.float32)
    assert tiny.nbytes == 0


def test_noise_bank_serves_several_samples_as_its_own_arrays_kept_in_order():
    shape = (3, 8, 8)
    one = 4 * 3 * 8 * 8
    bank = NoiseBank(budget=3 * one)
    drawn = bank.standard_normals(7, range(2, 7), shape, np.float32)
    for s, values in zip(range(2, 7), drawn):
        assert np.array_equal(values, sample_generator(7, s).standard_normal(shape, dtype=np.float32))
        assert not values.flags.writeable
    # drawn on several threads, offered in order: the first three are the ones kept
    again = bank.standard_normals(7, range(2, 7), shape, np.float32)
    assert [a is b for a, b in zip(again, drawn)] == [True, True, True, False, False]
    assert bank.standard_normal(7, 3, shape, np.float32) is drawn[1]
    assert bank.nbytes == 3 * one and bank.standard_normals(7, [], shape, np.float32) == []


def test_noisy_batches_give_the_same_inputs_with_or_without_the_bank():
    images = random_inputs(2, seed=3)
    bank = NoiseBank()
    runs = [np.concatenate([c.inputs for c in noisy_batches(images, 4, 0.1, 5, 3, bank=b)])
            for b in (NoiseBank(0), bank, bank)]
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[1], runs[2])
    assert bank.nbytes > 0


def test_cache_key_follows_the_rewriters_source(monkeypatch):
    """A changed gradient rule must never be served a model rewritten by the old one."""
    from onnxcam.runtime import cache

    before = cache.cache_key("model-sha", None, None)
    monkeypatch.setattr(cache, "rewriter_fingerprint", lambda: "a different rule table")
    assert cache.cache_key("model-sha", None, None) != before


def test_cuda_sessions_ask_for_determinism_unless_told_not_to(monkeypatch):
    from onnxcam.runtime.providers import cuda_deterministic

    assert session_options(1, cuda=True).use_deterministic_compute
    assert not session_options(1).use_deterministic_compute
    monkeypatch.setenv("ONNXCAM_DETERMINISTIC", "0")
    assert not cuda_deterministic() and not session_options(1, cuda=True).use_deterministic_compute
    monkeypatch.setenv("ONNXCAM_DETERMINISTIC", "maybe")
    with pytest.raises(OptionError, match="ONNXCAM_DETERMINISTIC"):
        cuda_deterministic()


def test_cudnn_algorithm_search_and_tf32_are_chosen_by_the_environment(monkeypatch):
    """CUDA sessions get cudnn_conv_algo_search from ONNXCAM_CUDNN_SEARCH (default EXHAUSTIVE,
    ONNX Runtime's own) and use_tf32 from ONNXCAM_TF32 (default on, ONNX Runtime's own); a wrong
    value is a one-line OptionError naming the variable."""
    from onnxcam.runtime import providers

    captured = {}
    monkeypatch.setattr(providers.ort, "InferenceSession",
                        lambda model, sess_options, providers: captured.setdefault("providers", providers))
    monkeypatch.delenv("ONNXCAM_CUDNN_SEARCH", raising=False)
    monkeypatch.delenv("ONNXCAM_TF32", raising=False)
    assert providers.cuda_provider_options() == {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "1"}
    monkeypatch.setenv("ONNXCAM_CUDNN_SEARCH", "heuristic")
    monkeypatch.setenv("ONNXCAM_TF32", "0")
    providers._create(b"", [providers.CUDA_PROVIDER, providers.CPU_PROVIDER], 1, "the model")
    assert captured["providers"] == [(providers.CUDA_PROVIDER, {"cudnn_conv_algo_search": "HEURISTIC",
                                                                "use_tf32": "0"}),
                                     providers.CPU_PROVIDER]
    captured.clear()
    providers._create(b"", [providers.CPU_PROVIDER], 1, "the model")  # the CPU gets no CUDA options
    assert captured["providers"] == [providers.CPU_PROVIDER]
    monkeypatch.setenv("ONNXCAM_CUDNN_SEARCH", "fastest")
    with pytest.raises(OptionError, match="ONNXCAM_CUDNN_SEARCH='fastest' must be one of EXHAUSTIVE"):
        providers.cuda_provider_options()
    monkeypatch.setenv("ONNXCAM_CUDNN_SEARCH", "default")
    monkeypatch.setenv("ONNXCAM_TF32", "off")
    with pytest.raises(OptionError, match="ONNXCAM_TF32='off' must be 1 or 0"):
        providers.cuda_provider_options()


def test_the_device_is_known_before_the_first_session(model_path, monkeypatch):
    """Where onnxruntime offers CUDA but cannot use it (onnxruntime-gpu without a GPU, as in CI),
    "auto" must plan for the CPU from the start: the CPU batch and the CPU's passes (Grad-CAM++
    from the whole model, not the CUDA path's runs of the noisy model)."""
    from onnxcam.runtime import providers
    from onnxcam.runtime.session import NOISY

    if _cuda_usable():
        pytest.skip("CUDA works on this machine")
    monkeypatch.setitem(providers._cuda_state, "usable", None)  # as in a fresh process
    assert providers.resolve_device("cpu") == "cpu" and providers.resolve_device("cuda") == "cuda"
    explainer = Explainer(model_path)
    assert explainer.batch_size == MAX_BATCH
    assert providers.resolve_device("auto") == "cpu"
    explainer.explain(np.zeros((1, 3, 32, 32), np.float32), method="gradcampp")
    assert explainer.session.calls[NOISY] == 0 and explainer.device == "cpu"


def test_a_layer_that_feeds_a_pad_before_a_conv_loads(tmp_path):
    """tf2onnx writes Keras' ZeroPadding2D as a Pad before a strided Conv. onnxruntime 1.31
    removes the Identity that exposes such a layer and folds the Pad into the Conv, and loses the
    layer's tensor on the way: the session is made again without identity elimination, and the
    maps are those of an unoptimised run."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    weights = {"w1": rng.standard_normal((4, 3, 3, 3)) * 0.4, "w2": rng.standard_normal((6, 4, 3, 3)) * 0.4,
               "fc": rng.standard_normal((5, 6)) * 0.4}
    initializers = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["layer"]),
             helper.make_node("Pad", ["layer", "pads"], ["padded"]),
             helper.make_node("Conv", ["padded", "w2"], ["c2"], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["a2"]),
             helper.make_node("GlobalAveragePool", ["a2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "zero_padding", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "zero_padding.onnx"
    onnx.save(model, path)

    x = random_inputs(2, seed=3)
    result = Explainer(path, layer="layer", device="cpu").explain(x, method="gradcam", targets=1)
    gm = build_gradient_model(model, layer="layer")
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(gm.model.SerializeToString(), plain, providers=["CPUExecutionProvider"])
    seed = np.zeros((2, 5), np.float32)
    seed[:, 1] = 1
    activation, gradient = session.run(["onnxcam_activation", "onnxcam_gradient"], {"x": x, "onnxcam_seed": seed})
    expected = np.maximum((gradient.mean(axis=(2, 3), keepdims=True) * activation).sum(axis=1), 0)
    for r, cam in zip(result, expected):
        np.testing.assert_allclose(r.raw_map, cam, rtol=1e-5, atol=1e-6 * cam.max())


def test_the_cache_command_shows_and_clears_the_weights_files(model_path, isolated_cache, spilling):
    from tests.cli_helpers import run

    load_gradient_model(model_path, layer="a1")
    load_gradient_model(model_path, layer="a2")
    shown = run(["cache"])
    assert shown.exit_code == 0 and "Entries: 2 rewritten models" in shown.output
    assert "Weights: 1 model's weights shared by their entries" in shown.output and "unfinished" not in shown.output
    as_json = json.loads(run(["cache", "--json"]).output)
    weights = next(isolated_cache.rglob("*.weights")).stat().st_size
    assert as_json["weights_files"] == 1 and as_json["weights_bytes"] == weights
    assert as_json["bytes"] == sum(p.stat().st_size for p in isolated_cache.rglob("*") if p.is_file())
    explainer = Explainer(model_path, layer="a1")  # holds the weights file
    cleared = run(["cache", "--clear"])
    assert cleared.exit_code == 0 and "Deleted 2 cached models" in cleared.output
    assert "Kept 1 weights file that a running onnxcam process still uses" in cleared.output
    assert [p.suffix for p in isolated_cache.rglob("*") if p.is_file()] == [".weights"]
    del explainer
    gc.collect()
    cleared = run(["cache", "--clear"])
    assert "Deleted 0 cached models" in cleared.output and "Kept" not in cleared.output
    assert not [p for p in isolated_cache.rglob("*") if p.is_file()]


def _settled(path: Path) -> Path:
    """As if the file had been written a minute ago."""
    then = time.time() - 60
    os.utime(path, (then, then))
    return path


def test_a_large_model_files_hash_is_remembered_until_the_file_changes(model_path, isolated_cache, monkeypatch):
    """A second run of a large model need not read and hash its file (VGG-16: 1.4 s)."""
    import hashlib

    from tests.cli_helpers import run

    monkeypatch.setattr(cache_module, "REMEMBER_BYTES", 1)
    sha = hashlib.sha256(_settled(model_path).read_bytes()).hexdigest()
    key, got = cache_module._key_for(model_path, None, None)
    assert got == sha and key == cache_module.cache_key(sha, None, None)
    [digest] = isolated_cache.rglob("*.sha256")
    assert digest.read_text() == sha
    digest.write_text("f" * 64)  # a hit reads the remembered hash, not the file
    assert cache_module._key_for(model_path, None, None)[1] == "f" * 64
    model_path.write_bytes(model_path.read_bytes())  # any write changes the stat: hashed again
    assert cache_module._key_for(_settled(model_path), None, None)[1] == sha
    assert len(list(isolated_cache.rglob("*.sha256"))) == 2
    gm, cached = load_gradient_model(model_path)
    assert not cached and load_gradient_model(model_path)[1]
    shown = run(["cache"])
    assert "Hashes: the SHA-256 of 2 large model files" in shown.output and "unfinished" not in shown.output
    assert json.loads(run(["cache", "--json"]).output)["remembered_hashes"] == 2
    run(["cache", "--clear"])
    assert not list(isolated_cache.rglob("*.sha256"))


def test_a_small_or_just_written_model_files_hash_is_not_remembered(model_path, isolated_cache, monkeypatch):
    cache_module._key_for(_settled(model_path), None, None)  # a few KB: below REMEMBER_BYTES
    monkeypatch.setattr(cache_module, "REMEMBER_BYTES", 1)
    model_path.write_bytes(model_path.read_bytes())  # written just now: a write in the same
    cache_module._key_for(model_path, None, None)     # timestamp tick could keep its stat
    assert not list(isolated_cache.rglob("*.sha256"))
    cache_module._key_for(_settled(model_path), None, None)
    assert list(isolated_cache.rglob("*.sha256"))


def test_making_a_session_touches_the_cache_weights_it_maps_and_nothing_else(model_path, isolated_cache,
                                                                             spilling, tmp_path):
    gm, _ = load_gradient_model(model_path)
    weights = next(isolated_cache.rglob("*.weights"))
    _age(isolated_cache, weights.stem, 2 * cache_module.LEFTOVER_AGE_S)
    GradientSession(gm, device="cpu").warm_up()
    assert time.time() - weights.stat().st_mtime < cache_module.LEFTOVER_AGE_S
    # a model's own data files are the user's: never touched (their times are in the cache key)
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(build_cnn(), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.weights", size_threshold=0)
    stamp = (folder / "m.weights").stat().st_mtime_ns
    GradientSession(load_gradient_model(folder / "m.onnx")[0], device="cpu").warm_up()
    assert (folder / "m.weights").stat().st_mtime_ns == stamp


def test_without_the_cache_large_weights_go_to_a_temporary_file_of_the_process(model_path, isolated_cache,
                                                                                spilling):
    x = random_inputs(1)
    want = build_gradient_model(model_path)  # no spill: the weights in memory
    built, cached = load_gradient_model(model_path, use_cache=False)
    assert not cached and not isolated_cache.exists()
    folder = Path(external.folder_of(built.model))
    assert folder.name.startswith("onnxcam-weights-") and folder.parent == Path(tempfile.gettempdir())
    files = sorted(folder.iterdir())
    assert files and all(p.suffix == ".weights" for p in files)
    again, _ = load_gradient_model(model_path, use_cache=False)  # the same file, not another one
    assert sorted(folder.iterdir()) == files and external.folder_of(again.model) == str(folder)
    got = GradientSession(built, device="cpu").run(x, np.eye(10, dtype=np.float32)[[3]])
    expected = GradientSession(want, device="cpu").run(x, np.eye(10, dtype=np.float32)[[3]])
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    del built, got
    gc.collect()
    assert sorted(folder.iterdir()) == files  # another rewritten model still refers to the file
    Explainer(model_path, cache=False).explain(x, method="gradcam")  # its own use, then it goes
    del again
    gc.collect()
    assert not list(folder.iterdir())


def test_rewrite_of_a_one_file_model_writes_one_file_though_the_cache_spilled_it(model_path, isolated_cache,
                                                                                  spilling, tmp_path):
    from tests.cli_helpers import run

    out = tmp_path / "grad.onnx"
    result = run(["rewrite", model_path, "-o", out])
    assert result.exit_code == 0, result.output
    assert list(isolated_cache.rglob("*.weights"))  # the cache did spill it
    assert not (tmp_path / "grad.onnx.data").exists() and "its weights in" not in result.output
    written = onnx.load(str(out))
    assert not any(external.is_external(t) for t in written.graph.initializer)
    onnx.checker.check_model(written)
