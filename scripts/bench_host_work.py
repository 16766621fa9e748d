"""The host's share of onnxcam's explanations, measured against the same arithmetic done the
plain way, in one process: Smooth Grad-CAM++ of one image with and without the calculator's
workspace (``onnxcam.cams.workspace``), and Grad-CAM / Grad-CAM++ of ``--images`` images computed
a few images at a time (``CamMethod.compute``'s ``CHUNK_MEMORY``) against all at once.

What a GPU explanation does on the host after its one noisy run: the device's moment sums and the
clean activation arrive as fresh float32 arrays, an accumulator adds the sums, the means are taken
and Smooth Grad-CAM++ makes the map. "workspace" is onnxcam's path (``finish()``, ``release()``,
the work arrays kept); "fresh arrays" is the same arithmetic with the workspace's budget at 0 and
``result()``, so every float64 array is new. For the single-sample methods the gradients and
activations arrive as fresh float32 arrays too. Blocks of 20 calls alternate the two ways; medians
in ms and minor page faults per call. Not a test::

    python scripts/bench_host_work.py --channels 2048 --size 7

With ``--model`` and ``--layer`` it then times the whole host path of one GPU-style explanation
(Smooth Grad-CAM++, n = 25, one run of 26 rows through the bank front, as on CUDA) with the
model's runs replayed as fresh arrays: ``Explainer.explain`` without the model. To compare two
commits, run it from each (``PYTHONPATH=<worktree>``); on the CPU machine, ResNet-50's last
block's input took 1.52-1.62 ms at ``8dcb277``, 1.55-1.65 at ``0533ee6`` and 1.26-1.30 at
``69c1428``.
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

import onnxcam.cams.methods as methods_module  # noqa: E402
from onnxcam.cams.methods import GradCAM, GradCAMPlusPlus, SmoothGradCAMPlusPlus  # noqa: E402
from onnxcam.cams.moments import GradientMoments  # noqa: E402
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


def timed_blocks(calls: dict, rounds: int) -> tuple[dict, dict]:
    """Median seconds and page faults per call of each of ``calls`` (name -> (function, set-up
    run before its block)), in alternating blocks of ``BLOCK`` calls (the heap settles to each)."""
    times = {name: [] for name in calls}
    faults = {name: 0 for name in calls}
    for block in range(max(2, rounds // BLOCK + 1)):  # the first block only warms up
        for name, (function, set_up) in calls.items():
            set_up()
            for call in range(BLOCK):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                function()
                elapsed = time.perf_counter() - start
                if block and call >= 2:  # and each block's first calls
                    times[name].append(elapsed)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return ({name: statistics.median(values) for name, values in times.items()},
            {name: faults[name] / len(times[name]) for name in calls})


def report(title: str, medians: dict, faults: dict, plain: str, ours: str) -> None:
    print(title)
    for name in medians:
        print(f"  {name:22s} {medians[name] * 1e3:7.3f} ms  {faults[name]:8.1f} page faults")
    print(f"  {plain} / {ours}: {medians[plain] / medians[ours]:.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--size", type=int, default=7)
    parser.add_argument("--images", type=int, default=25, help="images of the Grad-CAM / Grad-CAM++ part")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--model", type=Path, default=None, help="also time an explanation's whole host path")
    parser.add_argument("--layer", default=None, help="the layer for --model (default: automatic)")
    args = parser.parse_args(argv)
    shape = (1, args.channels, args.size, args.size)
    method = SmoothGradCAMPlusPlus()
    rng = np.random.default_rng(0)
    fetched = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
    fetched.append(np.abs(rng.standard_normal(shape, dtype=np.float32)))

    def budget(value: int):
        def set_up() -> None:
            WORKSPACE.budget = value
            WORKSPACE.clear()
        return set_up

    medians, faults = timed_blocks(
        {"workspace": (lambda: explanation_host_work(method, fetched, True), budget(WORKSPACE_MEMORY)),
         "fresh arrays": (lambda: explanation_host_work(method, fetched, False), budget(0))}, args.rounds)
    WORKSPACE.budget = WORKSPACE_MEMORY
    report(f"Smooth Grad-CAM++ of one image, layer {args.channels}x{args.size}x{args.size}:",
           medians, faults, "fresh arrays", "workspace")

    many = (args.images, args.channels, args.size, args.size)
    gradients = rng.standard_normal(many, dtype=np.float32)
    activation = np.abs(rng.standard_normal(many, dtype=np.float32))
    chunk_memory = methods_module.CHUNK_MEMORY

    def chunks(value: int):
        return lambda: setattr(methods_module, "CHUNK_MEMORY", value)

    for cam in (GradCAM(), GradCAMPlusPlus()):
        def single(cam=cam) -> None:  # as fetched: new float32 arrays every call
            cam.compute(np.array(activation), GradientMoments.from_gradients(np.array(gradients)))
        medians, faults = timed_blocks({"a few images at a time": (single, chunks(chunk_memory)),
                                        "all at once": (single, chunks(2**62))}, args.rounds // 4)
        report(f"{type(cam).__name__} of {args.images} images:", medians, faults,
               "all at once", "a few images at a time")
    methods_module.CHUNK_MEMORY = chunk_memory
    if args.model:
        explanation_host_path(args.model, args.layer, args.rounds)


def explanation_host_path(model: Path, layer: str | None, rounds: int) -> None:
    """Median ms of ``explain`` of one image with every noisy run replayed from the first
    explanation's outputs, as fresh arrays (what a device run hands back)."""
    from onnxcam import Explainer
    from onnxcam.runtime.session import NOISY

    Explainer._fused_kind = staticmethod(lambda session: NOISY)  # the CUDA path's bank front
    explainer = Explainer(model, layer=layer, device="cpu", batch_size=26)
    inputs = np.random.default_rng(0).standard_normal((1, *explainer.gradient_model.input_shape[1:]),
                                                      dtype=np.float32)
    session, recorded = explainer.session, {}
    real_run = session.run_noisy

    def replayed(feeds, outputs=(), front="bank", **options):
        key = (tuple(outputs), front)
        if key not in recorded:
            recorded[key] = real_run(feeds, outputs, front=front, **options)
        return [np.array(values) for values in recorded[key]]

    session.run_noisy = replayed
    medians, faults = timed_blocks({"explain, runs replayed": (lambda: explainer.explain(inputs, samples=25),
                                                               lambda: None)}, rounds)
    print(f"Host path of one explanation, {model.name} at {explainer.layer}:")
    print(f"  {medians['explain, runs replayed'] * 1e3:7.3f} ms  "
          f"{faults['explain, runs replayed']:8.1f} page faults")


if __name__ == "__main__":
    main()
