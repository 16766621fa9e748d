"""Fixtures for the whole suite."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_model_cache(tmp_path_factory):
    """The suite never writes the user's own cache of rewritten models (~/.cache/onnxcam): one
    cache folder for the whole run, so tests still share rewrites. Tests about the cache set
    their own folder on top."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path_factory.mktemp("onnxcam-cache")))
    yield
    patch.undo()
