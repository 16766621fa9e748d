"""Seeded Gaussian noise for Smooth Grad-CAM++ (docs/method.md).

Noisy sample ``s`` of image ``x`` is ``x + sigma * z_s``, with ``sigma = noise_level * (max(x) -
min(x))`` measured on the preprocessed input and ``z_s`` a standard normal array drawn by its own
generator, ``np.random.Generator(PCG64(SeedSequence(seed, spawn_key=(s,))))``. Every image uses the
same ``z_1 .. z_n`` (common random numbers): each map is still the average over n independent
Gaussian perturbations, and the noise depends only on (seed, sample number, input shape) -- not on
the batch size, the other images of the call, or which thread drew it. The same seed gives the
same map, bit for bit.

Why shared: drawing 25 x 3 x 224 x 224 normals costs as much as the 25 forward passes of a small
model on a 2-core CPU. The ``z_s`` are kept in a small in-process bank (``NOISE_BANK_MEMORY``), so
a folder of images, or repeated calls with one seed, draws them once. Samples past the bank's
budget are drawn again when needed; memory stays bounded and the values never depend on what was
kept. ``noisy_batches`` yields the samples chunk by chunk, so a call's memory is bounded by one
batch, never by the number of samples.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from onnxcam.errors import OptionError
from onnxcam.runtime.providers import usable_cpus

#: Bytes of standard normal samples kept between calls (25 samples at 3x224x224 take 15 MiB).
NOISE_BANK_MEMORY = 32 * 2**20


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


def sample_generator(seed: int, sample: int) -> np.random.Generator:
    """The generator of noisy sample number ``sample``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(sample,))))


class NoiseBank:
    """Standard normal samples ``z_s`` kept up to ``budget`` bytes.

    Entries are grouped by (seed, shape, dtype); when a new group needs room, whole groups are
    dropped, least recently used first. A group never evicts its own samples, so a call with more
    samples than fit keeps its first ones instead of cycling through all of them.
    """

    def __init__(self, budget: int = NOISE_BANK_MEMORY) -> None:
        self.budget = budget
        self._groups: OrderedDict[tuple, dict[int, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def standard_normal(self, seed: int, sample: int, shape: tuple, dtype) -> np.ndarray:
        """``z_sample`` for ``seed`` (read-only; from the bank when kept there)."""
        dtype = np.dtype(dtype)
        group = (seed, tuple(shape), dtype.str)
        with self._lock:
            kept = self._groups.get(group, {}).get(sample)
            if kept is not None:
                self._groups.move_to_end(group)
                return kept
        values = _drawn(seed, sample, shape, dtype)
        self._keep(group, sample, values)
        return values

    def standard_normals(self, seed: int, samples, shape: tuple, dtype) -> list[np.ndarray]:
        """``z_s`` for each ``s`` of ``samples`` (read-only): the bank's own arrays where kept
        (no copy), the others drawn on the noise threads (a new seed's draws take half the
        time) and then offered to the bank in order."""
        dtype = np.dtype(dtype)
        group = (seed, tuple(shape), dtype.str)
        samples = [int(sample) for sample in samples]
        with self._lock:
            kept = self._groups.get(group, {})
            found = [kept.get(sample) for sample in samples]
            if kept:
                self._groups.move_to_end(group)
        missing = [i for i, values in enumerate(found) if values is None]
        drawn = list(_pool().map(lambda i: _drawn(seed, samples[i], shape, dtype), missing))
        for i, values in zip(missing, drawn):
            found[i] = values
            self._keep(group, samples[i], values)
        return found

    def clear(self) -> None:
        with self._lock:
            self._groups.clear()
            self._bytes = 0

    def _keep(self, group: tuple, sample: int, values: np.ndarray) -> None:
        with self._lock:
            while self._bytes + values.nbytes > self.budget:
                others = [key for key in self._groups if key != group]
                if not others:
                    return
                self._bytes -= sum(v.nbytes for v in self._groups.pop(others[0]).values())
            samples = self._groups.setdefault(group, {})
            if sample not in samples:
                samples[sample] = values
                self._bytes += values.nbytes
            self._groups.move_to_end(group)


def _drawn(seed: int, sample: int, shape: tuple, dtype) -> np.ndarray:
    values = sample_generator(seed, sample).standard_normal(shape, dtype=dtype)
    values.flags.writeable = False
    return values


#: The process-wide bank used by ``noisy_batches``.
BANK = NoiseBank()


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(4, usable_cpus()),
                              thread_name_prefix="onnxcam-noise")


def noise_sigma(image: np.ndarray, noise_level: float) -> float:
    """``noise_level * (max - min)`` of one preprocessed image."""
    values = np.asarray(image)  # max and min are exact in the input's own dtype: no float64 copy
    return float(noise_level * (float(values.max()) - float(values.min()))) if values.size else 0.0


@dataclass(frozen=True)
class NoisyBatch:
    """One chunk of noisy samples: ``rows[i]`` is the image (index into the images given) of
    ``inputs[i]``, ``sample[i]`` its sample number for that image (-1: the clean image itself)."""

    rows: np.ndarray
    sample: np.ndarray
    inputs: np.ndarray


def chunk_bounds(total: int, batch_size: int) -> list[tuple[int, int]]:
    """``total`` units in ``ceil(total / batch_size)`` chunks of near-equal size (26 in 8s:
    7, 7, 6, 6, not 8, 8, 8, 2): as few runs as the batch allows, and no small last run, whose
    rows cost more each on a CPU."""
    count = -(-total // batch_size) if total else 0
    edges = [total * i // count for i in range(count + 1)] if count else [0]
    return list(zip(edges[:-1], edges[1:]))


def noisy_batches(images: np.ndarray, samples: int, noise_level: float, seed: int,
                  batch_size: int, bank: NoiseBank | None = None,
                  clean_rows: bool = False) -> Iterator[NoisyBatch]:
    """``samples`` noisy copies of each image, image after image, in chunks of at most
    ``batch_size`` (``chunk_bounds``); with ``clean_rows``, each image's own clean copy first
    (sample -1). Inputs are float32 (or the images' float dtype)."""
    images = np.asarray(images)
    bank = BANK if bank is None else bank
    sigmas = [noise_sigma(image, noise_level) for image in images]
    dtype = images.dtype if np.issubdtype(images.dtype, np.floating) else np.float32
    noise_dtype = np.float64 if dtype == np.float64 else np.float32
    shape = images.shape[1:]
    per_image = samples + 1 if clean_rows else samples
    for start, stop in chunk_bounds(len(images) * per_image, batch_size):
        units = np.arange(start, stop)
        rows, sample = units // per_image, units % per_image - (1 if clean_rows else 0)
        inputs = np.empty((stop - start, *shape), dtype=dtype)

        def fill(i: int) -> None:
            row = rows[i]
            if sample[i] < 0:
                inputs[i] = images[row]
                return
            _add_noise(inputs[i], images[row], bank.standard_normal(seed, int(sample[i]), shape, noise_dtype),
                       sigmas[row])

        list(_pool().map(fill, range(stop - start)))
        yield NoisyBatch(rows=rows, sample=sample, inputs=inputs)


def fill_noisy(out: np.ndarray, image: np.ndarray, noise: list[np.ndarray | None], sigma: float) -> np.ndarray:
    """``out[i] = image + sigma * noise[i]`` (float32 product, then sum: the noisy model's bank
    front gives the same bits), or the image itself where ``noise[i]`` is None (its clean row),
    row after row in this thread. Between two runs the noise threads cost more than they share:
    13 rows of 3x224x224 took 1.3 ms on 2 threads and 0.8 ms on one, and MobileNetV2's n = 25
    explanation 1-4% less time in all."""
    for row, values in zip(out, noise):
        if values is None:
            row[...] = image
        else:
            _add_noise(row, image, values, sigma)
    return out


def _add_noise(out: np.ndarray, image: np.ndarray, noise: np.ndarray, sigma: float) -> None:
    """``out = image + sigma * noise``: the product in the output's dtype first, then the sum."""
    np.multiply(noise, sigma, out=out, casting="same_kind")
    np.add(out, image, out=out, casting="same_kind")


def standard_normal_stack(seed: int, samples: int, shape: tuple, dtype=np.float32,
                          bank: NoiseBank | None = None, first: int = 0) -> np.ndarray:
    """``z_first .. z_{first+samples-1}`` as one (samples, *shape) array, for noise made in
    the graph."""
    bank = BANK if bank is None else bank
    out = np.empty((samples, *shape), dtype=dtype)

    def fill(i: int) -> None:
        out[i] = bank.standard_normal(seed, first + i, tuple(shape), dtype)

    list(_pool().map(fill, range(samples)))
    return out
