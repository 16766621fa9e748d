"""The CUDA path, where a GPU is usable (skipped everywhere else, CI included).

Run on a lent GPU machine (``../shared/docs/device.md``) with ``python -m pytest tests/test_gpu.py``:
the maps on CUDA, with the noisy batches, the target classes and the gradient moments made in the
graph from device-bound tensors, must match the CPU's NumPy path, and the same seed must give the
same map twice. ONNX Runtime's CUDA convolutions may use TF32 on Ampere and newer GPUs (10-bit
mantissa products), so the CPU comparison allows 1% of the map's peak; a wrong rule, front or
moment is off by far more (the CPU tests of the same graphs pin the exact maths).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxcam import Explainer
from onnxcam.runtime.session import FULL, NOISY
from tests.test_explainer import build_cnn, random_inputs, save_model
from tests.test_runtime import _cuda_usable

pytestmark = pytest.mark.skipif(not _cuda_usable(), reason="no usable CUDA GPU")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_model(build_cnn("mlp", seed=3), tmp_path_factory.mktemp("gpu") / "cnn_mlp.onnx")


def close_maps(got, expected):
    for a, b in zip(expected, got):
        assert b.class_index == a.class_index
        peak = float(np.abs(a.raw_map).max())
        np.testing.assert_allclose(b.raw_map, a.raw_map, rtol=1e-2, atol=1e-2 * peak)


@pytest.mark.parametrize("averaging", ["moments", "maps"])
def test_cuda_maps_match_the_cpu_and_repeat(model_path, averaging):
    inputs = random_inputs(3, seed=31)
    cpu = Explainer(model_path, layer="a1", device="cpu", batch_size=4)
    gpu = Explainer(model_path, layer="a1", device="cuda", batch_size=4)
    expected = cpu.explain(inputs, samples=6, seed=5, averaging=averaging)
    got = gpu.explain(inputs, samples=6, seed=5, averaging=averaging)
    assert gpu.session.device == "cuda" and got[0].device == "cuda"
    if averaging == "moments":  # clean row + 2 samples, then 4 samples, per image
        assert gpu.session.calls[NOISY] == 3 * 2 and gpu.session.calls[FULL] == 0
    else:  # a clean pass (scale 0), then the noisy batches, all in the noisy model
        assert gpu.session.calls[NOISY] == 1 + math.ceil(3 * 6 / 4) and gpu.session.calls[FULL] == 0
    close_maps(got, expected)
    again = gpu.explain(inputs, samples=6, seed=5, averaging=averaging)
    for a, b in zip(got, again):
        np.testing.assert_array_equal(a.raw_map, b.raw_map)


def test_cuda_gradcam_and_given_targets_match_the_cpu(model_path):
    inputs = random_inputs(2, seed=33)
    methods = ("gradcam", "gradcampp", "smoothgradcampp")
    for targets in (None, [1, 7]):
        expected = Explainer(model_path, layer="a1", device="cpu").compare(inputs, methods, targets=targets,
                                                                           samples=30, seed=4)
        got = Explainer(model_path, layer="a1", device="cuda").compare(inputs, methods, targets=targets,
                                                                       samples=30, seed=4)
        for name in methods:
            close_maps(got[name], expected[name])


def test_cuda_numpy_noise_matches_noise_in_the_graph(model_path):
    inputs = random_inputs(2, seed=32)
    in_graph = Explainer(model_path, layer="a1", device="cuda").explain(inputs, samples=5, seed=2)
    host = Explainer(model_path, layer="a1", device="cuda", noise_in_graph=False).explain(inputs, samples=5, seed=2)
    close_maps(in_graph, host)


def test_cuda_automatic_batch_is_larger(model_path):
    assert Explainer(model_path, device="cuda").batch_size > Explainer(model_path, device="cpu").batch_size


def test_cuda_without_tf32_matches_the_cpu_to_float32_rounding(model_path, monkeypatch):
    """With ONNXCAM_TF32=0 CUDA multiplies in full float32, so its maps, classes and
    probabilities agree with the CPU's to float32 rounding, not TF32's 1e-3: the CUDA path's
    fronts, class picking and moment sums are pinned far tighter than the 1% above."""
    monkeypatch.setenv("ONNXCAM_TF32", "0")
    inputs = random_inputs(3, seed=35)
    methods = ("gradcam", "gradcampp", "smoothgradcampp")
    cpu = Explainer(model_path, layer="a1", device="cpu", batch_size=4)
    gpu = Explainer(model_path, layer="a1", device="cuda", batch_size=4)
    expected = cpu.compare(inputs, methods, samples=6, seed=5)
    got = gpu.compare(inputs, methods, samples=6, seed=5)
    for session in gpu.session._sessions.values():  # what ONNX Runtime says it was given
        assert session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"
    for name in methods:
        for a, b in zip(expected[name], got[name]):
            assert b.class_index == a.class_index
            assert b.probability == pytest.approx(a.probability, rel=1e-5)
            peak = float(np.abs(a.raw_map).max())
            np.testing.assert_allclose(b.raw_map, a.raw_map, rtol=1e-4, atol=1e-5 * peak)
    top_cpu = cpu.explain(inputs, method="gradcam", top_k=3)
    top_gpu = gpu.explain(inputs, method="gradcam", top_k=3)
    assert [r.class_index for r in top_gpu] == [r.class_index for r in top_cpu]
    for a, b in zip(top_cpu, top_gpu):
        assert b.probability == pytest.approx(a.probability, rel=1e-5)


def test_cuda_smooth_maps_do_not_depend_on_how_a_folder_is_grouped(model_path, tmp_path, monkeypatch):
    """Smooth Grad-CAM++ on CUDA runs one image's rows at a time, so an image's map is the same,
    bit for bit, whatever the images around it: a folder explained whole or a group at a time.
    (Grad-CAM's clean runs hold several images: with TF32 an image's map moved by 1.4e-4 of its
    peak with the size of the run it fell in, on an H200; scripts/DEVICE_H200.md.)"""
    import onnxcam.explain.explainer as explainer_module
    from tests.test_explainer import random_png

    paths = [random_png(tmp_path / f"{i}.png", seed=i) for i in range(5)]
    explainer = Explainer(model_path, layer="a1", device="cuda", preprocess="unit", batch_size=2)
    whole = explainer.explain(paths, samples=5, seed=1)
    monkeypatch.setattr(explainer_module, "GROUP_MEMORY", 1)  # one batch of images per group
    grouped = explainer.explain(paths, samples=5, seed=1)
    for a, b in zip(whole, grouped):
        np.testing.assert_array_equal(a.raw_map, b.raw_map)


def test_cuda_pads_a_passs_runs_to_one_size(model_path, monkeypatch):
    """On CUDA the runs of a pass are padded to one size (a change of shape seemed to cost a
    new cuDNN algorithm search, scripts/profile_run_sizes.py): 41 rows in a batch of 32 run as
    21 and 21, not 21 and 20, and the maps still match the CPU's."""
    from onnxcam.graph import noisy

    inputs = random_inputs(2, seed=36)
    gpu = Explainer(model_path, layer="a1", device="cuda", batch_size=32)
    assert gpu.session.pads_runs
    real_run = gpu.session._run_noisy
    sizes = []
    monkeypatch.setattr(gpu.session, "_run_noisy", lambda feeds, outputs, front: (
        sizes.append(len(feeds[noisy.WEIGHTS])) or real_run(feeds, outputs, front)))
    got = gpu.explain(inputs, samples=40, seed=6)
    assert sizes == [21] * 4
    close_maps(got, Explainer(model_path, layer="a1", device="cpu").explain(inputs, samples=40, seed=6))


def test_cuda_explains_a_model_whose_weights_stay_in_external_files(tmp_path, monkeypatch):
    """graph.external on CUDA: every session is told the data's folder, and the Conv's correlation
    kernel is built in the graph from the weight left in its file."""
    from onnxcam.graph import external
    from tests.test_external_data import save_external

    monkeypatch.setattr(external, "READ_IN_BYTES", 0)
    path = save_external(build_cnn("mlp", seed=3), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    inputs = random_inputs(2, seed=35)
    expected = Explainer(path, layer="a1", device="cpu", cache=False).explain(inputs, samples=4, seed=5)
    gpu = Explainer(path, layer="a1", device="cuda", cache=False)
    got = gpu.explain(inputs, samples=4, seed=5)
    assert gpu.session.device == "cuda"
    close_maps(got, expected)


def test_cuda_segmentation_maps_match_the_cpu():
    """A segmentation model's seeds are its classes' regions, fed to the noisy model as seed rows
    (no classes picked in the graph): CUDA's maps, top-2 regions, match the CPU's."""
    from tests.test_segmentation import build_segmenter, inputs

    model = build_segmenter(seed=2)
    x = inputs(2, seed=5)
    options = dict(methods=("gradcam", "smoothgradcampp"), top_k=2, samples=6, layer="a1")
    expected = Explainer(model, device="cpu", cache=False).compare(x, **options)
    got = Explainer(model, device="cuda", cache=False).compare(x, **options)
    for method in options["methods"]:
        assert got[method][0].device == "cuda"
        close_maps(got[method], expected[method])
        for a, b in zip(expected[method], got[method]):
            np.testing.assert_array_equal(a.region, b.region)
