"""Seeded Gaussian noise for Smooth Grad-CAM++ (docs/method.md).

Every noisy sample has its own generator, ``np.random.Generator(PCG64(SeedSequence(seed,
spawn_key=(content_key, sample))))`` with ``content_key`` a hash of the preprocessed image. So the
noise depends only on (seed, the image itself, sample number): not on the batch size, on how
samples are split into chunks, on which other images share the call, or on which thread drew it;
the same seed gives the same map, bit for bit. Independent generators let a batch's samples be
drawn in parallel (NumPy releases the GIL while it fills an array): drawing the normals costs as
much as the inference on small models.

Noise for image ``x`` has standard deviation ``sigma = noise_level * (max(x) - min(x))``, measured
on the preprocessed input. Samples are produced chunk by chunk (``noisy_batches``), so memory is
bounded by one batch, never by the number of samples.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from onnxcam.errors import OptionError


def check_noise_options(samples: object, noise_level: object, seed: object) -> tuple[int, float, int]:
    """Validated (samples, noise_level, seed); seed None draws fresh entropy (recorded by callers)."""
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise OptionError(f"samples {samples!r} must be a whole number >= 1 (the paper uses 25)")
    try:
        level = float(noise_level)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        level = math.nan
    if not math.isfinite(level) or level < 0:
        raise OptionError(f"noise level {noise_level!r} must be a finite number >= 0 "
                          "(a fraction of the input range; SmoothGrad recommends 0.1 to 0.2)")
    if seed is None:
        seed = int(np.random.SeedSequence().entropy)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OptionError(f"seed {seed!r} must be a whole number >= 0")
    return int(samples), level, int(seed)


def content_key(image: np.ndarray) -> int:
    """A stable integer for an image's values, dtype and shape (64 bits of its SHA-256)."""
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return int.from_bytes(digest.digest()[:8], "little")


def sample_generator(seed: int, key: int, sample: int) -> np.random.Generator:
    """The generator of noisy sample ``sample`` of the image whose content key is ``key``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(key, sample))))


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                              thread_name_prefix="onnxcam-noise")


def noise_sigma(image: np.ndarray, noise_level: float) -> float:
    """``noise_level * (max - min)`` of one preprocessed image."""
    values = np.asarray(image, dtype=np.float64)
    return float(noise_level * (values.max() - values.min())) if values.size else 0.0


@dataclass(frozen=True)
class NoisyBatch:
    """One chunk of noisy samples: ``rows[i]`` is the image (index into the images given) of
    ``inputs[i]``, ``sample[i]`` its sample number for that image."""

    rows: np.ndarray
    sample: np.ndarray
    inputs: np.ndarray


def noisy_batches(images: np.ndarray, samples: int, noise_level: float, seed: int,
                  batch_size: int) -> Iterator[NoisyBatch]:
    """``samples`` noisy copies of each image, image after image, in chunks of ``batch_size``.
    Inputs are float32 (or the images' float dtype)."""
    images = np.asarray(images)
    count = len(images)
    keys = [content_key(image) for image in images]
    sigmas = [noise_sigma(image, noise_level) for image in images]
    dtype = images.dtype if np.issubdtype(images.dtype, np.floating) else np.float32
    noise_dtype = np.float64 if dtype == np.float64 else np.float32
    total = count * samples
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        units = np.arange(start, stop)
        rows, sample = units // samples, units % samples
        inputs = np.empty((stop - start, *images.shape[1:]), dtype=dtype)

        def fill(i: int) -> None:
            row = rows[i]
            noise = sample_generator(seed, keys[row], int(sample[i])).standard_normal(
                images.shape[1:], dtype=noise_dtype)
            noise *= sigmas[row]
            np.add(images[row], noise, out=inputs[i], casting="same_kind")

        list(_pool().map(fill, range(stop - start)))
        yield NoisyBatch(rows=rows, sample=sample, inputs=inputs)
