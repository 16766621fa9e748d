"""Where the time of a Smooth Grad-CAM++ run goes, operator by operator, against the plain forward.

ONNX Runtime's profiler on two sessions of the same device, fed the same way as onnxcam feeds
them (I/O binding for the noisy model):

* the plain model, one run of ``--samples`` inputs;
* onnxcam's noisy model (``onnxcam.graph.noisy``), one run of the clean row plus ``--samples``
  noisy rows with the moment sums fetched, as ``Explainer.explain`` does (the bank front on
  CUDA; on the CPU the noisy batch made beforehand, fed as the model's input).

Prints milliseconds per run for each operator type, both sessions side by side, and the totals of
the kernels (the wall time per run is printed too: the gap between the two is launch and copy
overhead). Not a test; for finding what the gradient part costs on a device::

    python scripts/profile_ops.py .cache/bench_models/resnet50.onnx --layer LAYER --device cuda

``--deterministic 0`` profiles both sessions without ``use_deterministic_compute``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def profiled_session(model_bytes: bytes, device: str, folder: str, prefix: str):
    import onnxruntime as ort

    from onnxcam.runtime.providers import CPU_PROVIDER, CUDA_PROVIDER, session_options

    if device == "cuda":
        ort.preload_dlls()
    options = session_options(None, cuda=device == "cuda")
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(folder, prefix)
    providers = [CUDA_PROVIDER, CPU_PROVIDER] if device == "cuda" else [CPU_PROVIDER]
    return ort.InferenceSession(model_bytes, sess_options=options, providers=providers)


def op_times(profile_file: str, warm: int) -> dict[str, float]:
    """Milliseconds per run for each operator type: the kernel events after the first ``warm``
    runs (whose algorithm searches would count otherwise)."""
    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    cutoff = runs[warm - 1]["ts"] + runs[warm - 1]["dur"] if warm else -1
    totals: dict[str, float] = collections.Counter()
    for event in events:
        if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                and event["ts"] > cutoff):
            totals[event.get("args", {}).get("op_name", "?")] += event["dur"] / 1000.0
    return {op: total / (len(runs) - warm) for op, total in totals.items()}


def main(argv=None) -> None:
    import onnxruntime as ort

    from onnxcam.graph import noisy
    from onnxcam.runtime.cache import load_gradient_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--layer", default=None, help="target layer (default: the automatic one)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--deterministic", choices=["0", "1"], default="1")
    args = parser.parse_args(argv)
    os.environ["ONNXCAM_DETERMINISTIC"] = args.deterministic

    gm, _ = load_gradient_model(str(args.model), layer=args.layer, score=None, use_cache=True)
    shape = [args.samples + 1] + [int(d) for d in gm.input_shape[1:]]
    rng = np.random.default_rng(0)
    image = rng.standard_normal([1] + shape[1:]).astype(np.float32)
    bank = rng.standard_normal([args.samples] + shape[1:]).astype(np.float32)
    plain_inputs = rng.standard_normal([args.samples] + shape[1:]).astype(np.float32)
    n = args.samples
    # the front onnxcam uses on the device: the bank gathered on CUDA; on the CPU the noisy batch
    # comes in as the model's input (made by NumPy before the run, not profiled here)
    front = "bank" if args.device == "cuda" else "input"
    scales, weights = np.r_[0.0, np.full(n, 0.3)], np.r_[0.0, np.ones(n)]
    if front == "bank":
        feeds = noisy.row_feeds(np.zeros(n + 1), np.r_[0, np.arange(n)], scales, weights, targets=np.full(n + 1, -1))
    else:
        feeds = noisy.row_feeds(None, None, None, weights, targets=np.full(n + 1, -1))
        feeds[gm.input_name] = (image + scales.astype(np.float32)[:, None, None, None]
                                * np.concatenate([np.zeros_like(bank[:1]), bank]))
    with tempfile.TemporaryDirectory() as folder:
        plain = profiled_session(args.model.read_bytes(), args.device, folder, "plain")
        graph = profiled_session(noisy.build_noisy_model(gm, front=front).SerializeToString(), args.device,
                                 folder, "noisy")
        device = "cuda" if args.device == "cuda" else "cpu"
        bound = {noisy.IMAGES: ort.OrtValue.ortvalue_from_numpy(image, device, 0),
                 noisy.NOISE: ort.OrtValue.ortvalue_from_numpy(bank, device, 0)} if front == "bank" else {}
        input_name = plain.get_inputs()[0].name

        def run_plain():
            plain.run(None, {input_name: plain_inputs})

        def run_graph():
            binding = graph.io_binding()
            for name, value in bound.items():
                binding.bind_ortvalue_input(name, value)
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name in (*noisy.SUMS, noisy.FIRST_ACTIVATION, noisy.FIRST_LOGITS, noisy.CLASSES):
                binding.bind_output(name, "cpu")
            graph.run_with_iobinding(binding)
            binding.copy_outputs_to_cpu()

        walls = {}
        for name, run in (("plain", run_plain), ("onnxcam", run_graph)):
            for _ in range(3):  # warm-up: algorithm searches, arenas
                run()
            start = time.perf_counter()
            for _ in range(args.repeats):
                run()
            walls[name] = (time.perf_counter() - start) / args.repeats * 1000
        profiles = {"plain": op_times(plain.end_profiling(), 3),
                    "onnxcam": op_times(graph.end_profiling(), 3)}
    print(f"{args.model.name}, layer {gm.layer}, {args.device} ({plain.get_providers()[0]}), "
          f"{args.samples} samples, use_deterministic_compute={args.deterministic}; ms per run")
    print(f"{'operator':<24}{'plain':>10}{'onnxcam':>10}")
    ops = sorted(set(profiles["plain"]) | set(profiles["onnxcam"]),
                 key=lambda op: -max(profiles["plain"].get(op, 0), profiles["onnxcam"].get(op, 0)))
    for op in ops:
        print(f"{op:<24}{profiles['plain'].get(op, 0):>10.3f}{profiles['onnxcam'].get(op, 0):>10.3f}")
    print(f"{'kernels':<24}{sum(profiles['plain'].values()):>10.3f}{sum(profiles['onnxcam'].values()):>10.3f}")
    print(f"{'wall':<24}{walls['plain']:>10.3f}{walls['onnxcam']:>10.3f}")


if __name__ == "__main__":
    main()
