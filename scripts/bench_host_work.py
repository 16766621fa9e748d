"""The host's share of one Smooth Grad-CAM++ explanation, with and without the calculator's
workspace (``onnxcam.cams.workspace``), in one process.

What a GPU explanation does on the host after its one noisy run: the device's moment sums and the
clean activation arrive as fresh float32 arrays, an accumulator adds the sums, the means are taken
and Smooth Grad-CAM++ makes the map. "workspace" is onnxcam's path (``finish()``, ``release()``,
the work arrays kept); "fresh arrays" is the same arithmetic with the workspace's budget at 0 and
``result()``, so every float64 array is new. Blocks of 20 calls alternate the two; medians in ms and minor
page faults per explanation. Not a test::

    python scripts/bench_host_work.py --channels 2048 --size 7
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxcam.cams.methods import SmoothGradCAMPlusPlus  # noqa: E402
from onnxcam.cams.workspace import WORKSPACE, WORKSPACE_MEMORY  # noqa: E402


BLOCK = 20


def explanation_host_work(method, fetched, use_workspace: bool) -> None:
    # as fetched from the device: three sums and the clean activation, new arrays every call
    sums = [np.array(values) for values in fetched[:3]]
    activation = np.array(fetched[3])
    accumulator = method.new_accumulator(1)
    accumulator.add_sums(0, 25, *sums)
    if use_workspace:
        method.compute(activation, accumulator.finish())
        accumulator.release()
    else:
        method.compute(activation, accumulator.result())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--size", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    shape = (1, args.channels, args.size, args.size)
    method = SmoothGradCAMPlusPlus()
    rng = np.random.default_rng(0)
    fetched = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
    fetched.append(np.abs(rng.standard_normal(shape, dtype=np.float32)))
    times = {"workspace": [], "fresh arrays": []}
    faults = {name: 0 for name in times}
    for block in range(args.rounds // BLOCK + 1):  # blocks of calls: the heap settles to each
        for name in times:
            WORKSPACE.budget = WORKSPACE_MEMORY if name == "workspace" else 0
            WORKSPACE.clear()
            for call in range(BLOCK):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                explanation_host_work(method, fetched, name == "workspace")
                elapsed = time.perf_counter() - start
                if block and call >= 2:  # the first block and each block's first calls warm up
                    times[name].append(elapsed)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    WORKSPACE.budget = WORKSPACE_MEMORY
    print(f"host work of one explanation, layer {args.channels}x{args.size}x{args.size}, "
          f"{len(times['workspace'])} calls each:")
    for name, values in times.items():
        print(f"  {name:13s} {statistics.median(values) * 1e3:7.3f} ms  "
              f"{faults[name] / len(values):8.1f} page faults")
    ratio = statistics.median(times["fresh arrays"]) / statistics.median(times["workspace"])
    print(f"  fresh arrays / workspace: {ratio:.2f}")


if __name__ == "__main__":
    main()
