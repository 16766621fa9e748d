"""The prefetching iterator keeps order, re-raises the producer's errors and stops early."""

import threading
import time

import pytest

from onnxcam.runtime.prefetch import prefetched


def test_order_is_kept():
    assert list(prefetched(iter(range(100)), depth=3)) == list(range(100))


def test_producer_error_is_raised_in_the_consumer():
    def items():
        yield 1
        raise ValueError("broken producer")

    with pytest.raises(ValueError, match="broken producer"):
        list(prefetched(items()))


def test_stopping_early_stops_the_producer():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    for item in prefetched(items(), depth=1):
        if item == 3:
            break
    time.sleep(0.3)
    assert len(produced) < 10
    assert not any(t.name == "onnxcam-prefetch" and t.is_alive() for t in threading.enumerate())
