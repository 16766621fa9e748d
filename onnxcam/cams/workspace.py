"""Work arrays kept between explanations, so the calculator's float64 buffers are not faulted in
afresh each time.

Fresh arrays of a few MiB are expensive: glibc hands blocks this large back to the system when
they are freed, and the next call's pages are faulted in again, about 4 us a page on this
project's CPU machine. For a ResNet-50 map (2048x7x7) the moment sums and the Grad-CAM++
temporaries took 4.5 of the 6.7 ms of one explanation's host work that way. Arrays taken here and
given back are kept for the next caller of the same shape, up to ``WORKSPACE_MEMORY`` bytes.

A taken array belongs to its taker alone until given back (``take`` pops it, under a lock), so
threads never share one. Give back only arrays nothing else still reads.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np

#: Bytes of work arrays kept between calls (one ResNet-50 explanation uses about 5 MiB).
WORKSPACE_MEMORY = 32 * 2**20


class Workspace:
    """A pool of float64 arrays by shape: ``take`` one (its values are left over from its last
    use), ``give`` it back when done."""

    def __init__(self, budget: int = WORKSPACE_MEMORY) -> None:
        self.budget = budget
        self._free: dict[tuple[int, ...], list[np.ndarray]] = defaultdict(list)
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held for later callers."""
        return self._bytes

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 array of ``shape``, uninitialised."""
        shape = tuple(int(n) for n in shape)
        with self._lock:
            free = self._free.get(shape)
            if free:
                array = free.pop()
                self._bytes -= array.nbytes
                return array
        return np.empty(shape)

    def give(self, *arrays: np.ndarray | None) -> None:
        """Keep ``arrays`` for later callers while they fit the budget (None is skipped). Only
        whole arrays of this pool's kind are kept: a view or another dtype is left to the
        garbage collector."""
        with self._lock:
            for array in arrays:
                if (array is None or array.base is not None or array.dtype != np.float64
                        or not array.flags.c_contiguous or self._bytes + array.nbytes > self.budget):
                    continue
                if any(array is kept for kept in self._free[array.shape]):
                    continue  # given twice: keep it once, or two takers would share it
                self._free[array.shape].append(array)
                self._bytes += array.nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0


#: The process-wide pool of the calculator's work arrays.
WORKSPACE = Workspace()
