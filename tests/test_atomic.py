"""Tests for onnxcam.atomic: outputs appear whole or not at all."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from onnxcam.atomic import atomic_path, atomic_write_bytes
from onnxcam.errors import OptionError


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_bytes_creates_and_replaces(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert names(tmp_path) == ["out.bin"]


def test_atomic_path_is_a_sibling_with_the_same_suffix(tmp_path):
    target = tmp_path / "map.png"
    with atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and temporary.suffix == ".png" and temporary != target
        assert temporary.exists() and not target.exists()
        Image.new("RGB", (3, 2), (1, 2, 3)).save(temporary)  # format inferred from the suffix
    assert Image.open(target).size == (3, 2)
    assert names(tmp_path) == ["map.png"]


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_block_keeps_the_old_file_and_leaves_nothing_behind(tmp_path, failure):
    target = tmp_path / "result.npy"
    target.write_bytes(b"old contents")
    with pytest.raises(type(failure)):
        with atomic_path(target) as temporary:
            np.save(temporary, np.arange(1000))
            raise failure
    assert target.read_bytes() == b"old contents"
    assert names(tmp_path) == ["result.npy"]


def test_failed_block_creates_no_target(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "new.png") as temporary:
            temporary.write_bytes(b"half")
            raise ValueError("boom")
    assert names(tmp_path) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_result_gets_ordinary_permissions(tmp_path):
    normal = tmp_path / "normal"
    normal.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "atomic", b"x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(normal).st_mode


def test_unwritable_destinations_raise_option_error(tmp_path):
    with pytest.raises(OptionError, match="cannot write") as excinfo:
        atomic_write_bytes(tmp_path / "no_such_folder" / "out.png", b"x")
    assert "\n" not in str(excinfo.value) and "out.png" in str(excinfo.value)
    with pytest.raises(OptionError, match="folder"):
        atomic_write_bytes(tmp_path, b"x")
