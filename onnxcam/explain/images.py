"""The images of one call, as the model is fed them.

What the user gave (paths, PIL images, a NumPy batch) is checked up front, before any model runs,
so a missing file or a wrong array shape fails at once; the files themselves are read and
preprocessed group by group, on decoding threads, when the explainer reaches them.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from onnxcam.errors import ImageError
from onnxcam.imaging import Preprocessor, load_image
from onnxcam.imaging.io import display_path
from onnxcam.runtime.providers import usable_cpus
from onnxcam.runtime.session import as_input_dtype

#: Threads that read and preprocess a group's image files (Pillow and NumPy release the GIL): on
#: 2 cores, two read 64 PNGs at 5.3 ms each against 11 ms for one. On a GPU, reading the images
#: is most of the CPU's share of the work, and a group can be 64 images.
DECODE_THREADS = 8
#: The decoded pictures of one group of image files at most (a group holds one picture at least)
PICTURE_MEMORY = 128 * 2**20


@functools.lru_cache(maxsize=1)
def _decoders() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(DECODE_THREADS, usable_cpus()), thread_name_prefix="onnxcam-decode")


@dataclass
class Item:
    """One image of a call: a path, a PIL image or one array item (already preprocessed)."""

    index: int
    path: str | None = None
    pil: Image.Image | None = None
    array: np.ndarray | None = None

    def where(self) -> str:
        """The image as an error message names it: its path, else its position in the call."""
        return display_path(self.path) if self.path is not None else f"image {self.index}"


class Loaded(NamedTuple):
    """A group of images read: the model's input batch (None when no image could be read), the
    PIL images (for overlays; None for arrays), each map's size (H, W), the array inputs
    (H, W, C; None for files) and the [(position, ImageError)] of the files skipped."""

    inputs: np.ndarray | None
    pictures: list
    sizes: list
    arrays: list
    unreadable: list


class ImageReader:
    """Turns the images of a call into model input rows, for a model input of ``input_shape``
    (its dims, None where symbolic) in ``layout`` ("NCHW" or "NHWC")."""

    def __init__(self, input_shape, layout: str):
        self.input_shape = tuple(input_shape)
        self.layout = layout

    def items(self, images) -> list[Item]:
        """The call's images, checked: files exist, arrays have the model's shape and finite values."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        if isinstance(images, np.ndarray):
            return self.array_items(images)
        if not isinstance(images, Iterable):
            raise ImageError(f"images must be paths, PIL images or a NumPy batch, not {type(images).__name__}")
        items: list[Item] = []
        for value in images:
            index = len(items)
            if isinstance(value, (str, os.PathLike)):
                path = Path(value)
                if not path.is_file():
                    name = display_path(path)
                    raise ImageError(f"{name}: no such file; check the path" if not path.exists()
                                     else f"{name}: not a regular file; give an image file")
                items.append(Item(index, path=os.fspath(value)))
            elif isinstance(value, Image.Image):
                items.append(Item(index, pil=value))
            elif isinstance(value, np.ndarray) and value.ndim == 3:
                items.append(Item(index, array=self.array_items(value[None])[0].array))
            else:
                raise ImageError(f"image {index} is a {type(value).__name__}: give paths, PIL images or arrays")
        if not items:
            raise ImageError("no images given: pass at least one image")
        return items

    def array_items(self, array: np.ndarray) -> list[Item]:
        """One item per image of a preprocessed batch, in the model's layout (the other one is
        transposed to it)."""
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or len(array) == 0:
            raise ImageError(f"an image array must be (N,C,H,W) or (N,H,W,C) with N >= 1, got shape {array.shape}")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ImageError(f"an image array must hold numbers, got dtype {array.dtype}")
        expected = [d if isinstance(d, int) else None for d in self.input_shape[1:]]
        other = ([expected[1], expected[2], expected[0]] if self.layout == "NCHW"
                 else [expected[2], expected[0], expected[1]])
        shape = list(array.shape[1:])
        if _matches(shape, expected):
            pass
        elif _matches(shape, other):
            array = array.transpose(0, 3, 1, 2) if self.layout == "NCHW" else array.transpose(0, 2, 3, 1)
        else:
            want = "x".join("?" if d is None else str(d) for d in expected)
            raise ImageError(f"image array of shape {tuple(array.shape)} does not match the model input "
                             f"(N x {want}, {self.layout}); preprocess to that shape or pass image files")
        if not np.all(np.isfinite(array)):
            raise ImageError("the image array contains NaN or infinite values")
        return [Item(i, array=array[i]) for i in range(len(array))]

    def groups(self, items: list[Item], group: int, preprocessor: Preprocessor | None, dtype: np.dtype,
               skip_unreadable: bool = False) -> Iterator[tuple[int, list[Item], Loaded, float]]:
        """(start, items, loaded, seconds spent loading) for each group of at most ``group``
        items whose pictures fit ``PICTURE_MEMORY`` (one at least): the pictures stay in memory
        until their overlays are written, and a phone photo is 36 MB of pixels."""
        start = 0
        while start < len(items):
            stop = _group_stop(items, start, group)
            chunk = items[start:stop]
            began = time.perf_counter()
            loaded = self.load(chunk, preprocessor, dtype, skip_unreadable)
            yield start, chunk, loaded, time.perf_counter() - began
            start = stop

    def load(self, items: list[Item], preprocessor: Preprocessor | None, dtype: np.dtype,
             skip_unreadable: bool = False) -> Loaded:
        """The items read and preprocessed into one ``dtype`` batch. Image files are read on the
        decoding threads (PIL images given, which may share a lazily loaded object, are not);
        without ``skip_unreadable`` the first bad file in order raises."""
        read = functools.partial(self._read, preprocessor=preprocessor)
        files = [position for position, item in enumerate(items) if item.path is not None]
        reading = ({position: _decoders().submit(read, items[position]) for position in files}
                   if len(files) > 1 else {})
        loaded, unreadable = [], []
        try:
            for position, item in enumerate(items):
                try:
                    loaded.append(reading[position].result() if position in reading else read(item))
                except ImageError as error:
                    if not (skip_unreadable and item.path is not None):
                        raise
                    unreadable.append((position, error))
        finally:
            for future in reading.values():  # after an error: read no more
                future.cancel()
        if not loaded:
            return Loaded(None, [], [], [], unreadable)
        rows, pictures, sizes, arrays = (list(column) for column in zip(*loaded))
        shapes = {row.shape for row in rows}
        if len(shapes) > 1:
            raise ImageError(f"image arrays of different shapes {sorted(shapes)} in one call: give one shape")
        return Loaded(as_input_dtype(np.stack(rows), dtype), pictures, sizes, arrays, unreadable)

    def _read(self, item: Item, preprocessor: Preprocessor | None) -> tuple:
        """(model input row, PIL image or None, map size (H, W), array input (H,W,C) or None)."""
        if item.array is not None:
            hw = item.array.shape[1:3] if self.layout == "NCHW" else item.array.shape[0:2]
            return (item.array, None, (int(hw[0]), int(hw[1])),
                    np.moveaxis(item.array, 0, -1) if self.layout == "NCHW" else item.array)
        picture = item.pil if item.pil is not None else load_image(item.path)
        return preprocessor(picture), picture, (picture.height, picture.width), None  # type: ignore[misc]


def _group_stop(items: list[Item], start: int, most: int) -> int:
    """Where the group that begins at ``start`` ends: ``most`` items, fewer where their pictures'
    pixels would pass PICTURE_MEMORY, one at least."""
    budget, stop, end = PICTURE_MEMORY, start, min(len(items), start + most)
    while stop < end:
        budget -= _picture_bytes(items[stop])
        if budget < 0 and stop > start:
            break
        stop += 1
    return stop


def _picture_bytes(item: Item) -> int:
    """The RGB pixels an item's picture will take: from an image file's header (Pillow reads no
    more to open it), 0 for arrays (they keep no picture) and for files that cannot be opened (the
    read says why)."""
    if item.pil is not None:
        width, height = item.pil.size
    elif item.path is not None:
        try:
            with Image.open(item.path) as picture:
                width, height = picture.size
        except Exception:  # noqa: BLE001 - reported when the file is read
            return 0
    else:
        return 0
    return 3 * width * height


def _matches(shape: list, expected: list) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
