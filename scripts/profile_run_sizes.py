"""What a change of batch size costs a CUDA session, and what padding a pass's runs to one size
buys onnxcam. Prepared for the next lent GPU; not a test, nothing is asserted.

On the H200 (scripts/DEVICE_H200.md) every ``bench_device.py`` configuration that alternated a
session's batch size (``run()`` of 25 inputs after 25 runs of one, Grad-CAM of 25 images after
a one-image explanation) took 75-325x longer than the same call repeated, while configurations
that kept one size did not. The suspicion: cuDNN's algorithm search (or plan building) is redone
whenever a session's input shape changes. If so, onnxcam runs of 26 and 25 rows (n = 50) would
pay it twice per image; ``GradientSession.pads_runs`` now pads a pass's shorter runs instead.

Per model, in one process, medians of ``--repeats`` calls:

* a plain session (ONNX Runtime's defaults, as ``bench_device.py``): ``run()`` of 25 inputs
  repeated, and the same call when each is preceded by a run of 24 inputs (a change of shape
  each time), under cuDNN's exhaustive search (ONNX Runtime's default) and its heuristics;
* onnxcam's Smooth Grad-CAM++ of one image at the last block's input: n = 25 (one run of 26
  rows), and n = 50 (runs of 26 and 25 rows) with the runs padded to one size and without.

Run on the device (set-up as in scripts/device_check.sh)::

    python3 scripts/profile_run_sizes.py --models efficientnet_lite0 resnet50

Here, ``--device cpu`` tries the logic (the CPU has no such search).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SIZE, SPECS  # noqa: E402
from bench_device import plain_session  # noqa: E402
from profile_cuda_overhead import median_ms  # noqa: E402


def plain_switches(spec, device: str, repeats: int, log) -> None:
    x = np.random.default_rng(0).standard_normal((25, 3, SIZE, SIZE)).astype(np.float32)
    for search in ("EXHAUSTIVE", "HEURISTIC"):
        session = _plain(spec, device, search)
        name = session.get_inputs()[0].name
        same = median_ms(lambda: session.run(None, {name: x}), repeats, warm=1)
        switched = median_ms(lambda: session.run(None, {name: x}), repeats, warm=1,
                             before=lambda: session.run(None, {name: x[:24]}))
        log(f"  plain run() of 25, {search.lower()} search: repeated {same:8.2f} ms, "
            f"after a run of 24 {switched:8.2f} ms ({switched / same:.1f}x)")


def _plain(spec, device: str, search: str):
    import onnxruntime as ort

    from onnxcam.runtime.providers import CPU_PROVIDER, CUDA_PROVIDER

    if device != "cuda":
        return plain_session(spec.path, device, deterministic=False)
    return ort.InferenceSession(str(spec.path), providers=[(CUDA_PROVIDER, {"cudnn_conv_algo_search": search}),
                                                           CPU_PROVIDER])


def onnxcam_runs(spec, device: str, repeats: int, log) -> None:
    from onnxcam import Explainer

    x1 = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    for samples, equal_runs in ((25, None), (50, False), (50, True)):
        explainer = Explainer(spec.path, layer=spec.honest_layer, device=device)
        explainer.session.equal_runs = equal_runs
        took = median_ms(lambda: explainer.explain(x1, samples=samples), repeats, warm=1)
        runs = explainer.session.run_calls / (repeats + 1)
        label = "padded to one size" if equal_runs else "as cut"
        log(f"  Smooth n = {samples:2d}, runs {label:18s}: {took:8.2f} ms "
            f"(batch {explainer.batch_size}, {runs:.0f} runs per explanation)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"], choices=list(SPECS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    log = lambda text: print(text, flush=True)  # noqa: E731
    if args.device == "cuda":
        import onnxruntime as ort

        ort.preload_dlls()
    for name in args.models:
        spec = SPECS[name]
        if not spec.path.is_file():
            log(f"{spec.title}: {spec.path} missing (scripts/export_benchmark_models.py)")
            continue
        log(spec.title)
        plain_switches(spec, args.device, args.repeats, log)
        onnxcam_runs(spec, args.device, args.repeats, log)


if __name__ == "__main__":
    main()
