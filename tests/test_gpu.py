"""The CUDA path, where a GPU is usable (skipped everywhere else, CI included).

Run on a lent GPU machine (``../shared/docs/device.md``) with ``python -m pytest tests/test_gpu.py``:
the maps on CUDA, with the noisy batches made in the graph from device-bound tensors, must match
the CPU's NumPy path, and the same seed must give the same map twice.
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


@pytest.mark.parametrize("averaging", ["moments", "maps"])
def test_cuda_maps_match_the_cpu_and_repeat(model_path, averaging):
    inputs = random_inputs(3, seed=31)
    cpu = Explainer(model_path, layer="a1", device="cpu", batch_size=4)
    gpu = Explainer(model_path, layer="a1", device="cuda", batch_size=4)
    expected = cpu.explain(inputs, samples=6, seed=5, averaging=averaging)
    got = gpu.explain(inputs, samples=6, seed=5, averaging=averaging)
    assert gpu.session.device == "cuda" and got[0].device == "cuda"
    assert gpu.session.calls[NOISY] == math.ceil(3 * 6 / 4)  # the noise was made in the graph
    assert gpu.session.calls[FULL] >= 1
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b.raw_map, a.raw_map, rtol=1e-3, atol=1e-5 * float(np.abs(a.raw_map).max()))
    again = gpu.explain(inputs, samples=6, seed=5, averaging=averaging)
    for a, b in zip(got, again):
        np.testing.assert_array_equal(a.raw_map, b.raw_map)


def test_cuda_numpy_noise_matches_noise_in_the_graph(model_path):
    inputs = random_inputs(2, seed=32)
    in_graph = Explainer(model_path, layer="a1", device="cuda").explain(inputs, samples=5, seed=2)
    host = Explainer(model_path, layer="a1", device="cuda", noise_in_graph=False).explain(inputs, samples=5, seed=2)
    for a, b in zip(in_graph, host):
        np.testing.assert_allclose(a.raw_map, b.raw_map, rtol=1e-5, atol=1e-7)
