"""One prepared device check: onnxcam against plain ONNX Runtime on one device (CUDA or the CPU).

Issue 5's GPU targets, measured in one process on one device:

* the floor: plain ONNX Runtime forward of 25 inputs at 224x224, batched and one by one, with
  the same execution provider as onnxcam and ONNX Runtime's own defaults otherwise (no
  ``use_deterministic_compute``), and the batched floor fed by I/O binding from a device copy of
  the inputs;
* onnxcam Smooth Grad-CAM++ of one image with n = 25 at the last block's input (every noisy pass
  runs), with everything made in the graph (``noise_in_graph=True``, the CUDA default: the image
  and the noise bank stay on the device; the clean row rides in the noisy run, picks the class in
  the graph, and only three moment sums come back), on CUDA also without
  ``use_deterministic_compute`` (``ONNXCAM_DETERMINISTIC=0``) and with cuDNN's heuristic
  algorithm picks (``ONNXCAM_CUDNN_SEARCH=HEURISTIC``); with NumPy noise (the noisy batches made on
  the host); and at the default layer; and Grad-CAM of the 25 inputs;
* ``onnxcam explain`` (the CLI, a fresh process: start-up, rewrite from the disk cache, decoding,
  overlays and records written) over a folder of ``--folder`` images: images per second, and
  from the command's JSON the fixed costs (process start, model setup) and the rate without them.

The device is recorded from ``nvidia-smi`` when present. Medians over ``--repeats`` rounds after a
warm-up round; configurations alternate within a round, each after a short pause. Writes a
markdown table (``--out``). Not a test: nothing is asserted.

On the H200 (2026-11-27) the ``run()`` floors and the default-layer and Grad-CAM columns ran
20-300x slower in this script's process than the same calls in
``scripts/profile_cuda_overhead.py`` (pause-free medians; a 0.25 s pause alone did not slow
them there), while the I/O-bound columns agreed. The cause is not known: read those columns
from ``profile_cuda_overhead.py``.

On the lent GPU machine (``../shared/docs/device.md``: onnxruntime-gpu on PYTHONPATH first)::

    python scripts/export_benchmark_models.py        # the ResNet-50 file is too big to carry
    python -m pytest tests/test_gpu.py                # CUDA maps against the CPU's
    python scripts/bench_device.py --device cuda --out $OUT/DEVICE.md

Here, as a CPU reference: ``.venv/bin/python scripts/bench_device.py --device cpu --models mobilenet_v2``.
The models come from ``scripts/export_benchmark_models.py`` (needs torch, not torchvision) and
``models/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SAMPLES, SIZE, SPECS, time_alternating  # noqa: E402
from onnxcam.runtime.session import NOISY  # noqa: E402


def device_name(device: str) -> str:
    if device == "cuda" and shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.strip().splitlines()[0]
    import platform

    return f"CPU: {platform.processor() or platform.machine()}"


def plain_session(path: Path, device: str, deterministic: bool = True):
    import onnxruntime as ort

    from onnxcam.runtime.providers import CPU_PROVIDER, CUDA_PROVIDER, session_options

    providers = [CUDA_PROVIDER, CPU_PROVIDER] if device == "cuda" else [CPU_PROVIDER]
    options = session_options(None, cuda=device == "cuda" and deterministic)
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise SystemExit("CUDA was asked for but the plain session fell back to the CPU")
    return session


def graph_explainer(spec, device: str, **environment):
    """An all-in-the-graph Explainer whose sessions are made (and warmed) under ``environment``."""
    from onnxcam import Explainer

    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        explainer = Explainer(spec.path, layer=spec.honest_layer, device=device, noise_in_graph=True)
        explainer.session.warm_up((NOISY,))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return explainer


def bench_model(name: str, args, log) -> dict:
    import onnxruntime as ort

    from onnxcam import Explainer

    spec = SPECS[name]
    x25 = np.random.default_rng(0).standard_normal((SAMPLES, 3, SIZE, SIZE)).astype(np.float32)
    x1 = x25[:1].copy()
    # ONNX Runtime's own defaults: the floor a user of plain ONNX Runtime gets
    plain = plain_session(spec.path, args.device, deterministic=False)
    input_name = plain.get_inputs()[0].name
    graph = Explainer(spec.path, layer=spec.honest_layer, device=args.device, noise_in_graph=True)
    racy_graph = heuristic_graph = None
    if args.device == "cuda":  # without use_deterministic_compute; and with cuDNN's heuristic picks
        racy_graph = graph_explainer(spec, args.device, ONNXCAM_DETERMINISTIC="0")
        heuristic_graph = graph_explainer(spec, args.device, ONNXCAM_DETERMINISTIC="0",
                                          ONNXCAM_CUDNN_SEARCH="HEURISTIC")
    host = Explainer(spec.path, layer=spec.honest_layer, device=args.device, noise_in_graph=False)
    default = Explainer(spec.path, device=args.device)
    x25_bound = ort.OrtValue.ortvalue_from_numpy(x25, args.device, 0)

    def bound_run():  # the same session fed by I/O binding from a device copy of the inputs
        binding = plain.io_binding()
        binding.bind_ortvalue_input(input_name, x25_bound)
        for output in plain.get_outputs():
            binding.bind_output(output.name, "cpu")
        plain.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    runs = {
        "floor batched": lambda: plain.run(None, {input_name: x25}),
        "floor batched, I/O binding": bound_run,
        "floor one by one": lambda: [plain.run(None, {input_name: x25[i:i + 1]}) for i in range(SAMPLES)],
        "Smooth last block, noise in graph": lambda: graph.explain(x1, samples=SAMPLES),
        **({"Smooth last block, noise in graph, not deterministic":
            lambda: racy_graph.explain(x1, samples=SAMPLES)} if racy_graph is not None else {}),
        **({"Smooth last block, noise in graph, not deterministic, heuristic":
            lambda: heuristic_graph.explain(x1, samples=SAMPLES)} if heuristic_graph is not None else {}),
        "Smooth last block, NumPy noise": lambda: host.explain(x1, samples=SAMPLES),
        "Smooth default layer": lambda: default.explain(x1, samples=SAMPLES),
        "Grad-CAM x25": lambda: default.explain(x25, method="gradcam"),
    }
    times = time_alternating(runs, args.repeats, 1, log, args.settle)
    medians = {key: statistics.median(values) for key, values in times.items()}
    medians["explainer device"] = graph.session.device
    medians["batch"] = graph.batch_size
    log("  medians: " + ", ".join(f"{k} {v:.4f}" for k, v in medians.items() if isinstance(v, float)))
    return medians


def folder_throughput(name: str, args, log) -> dict:
    """``onnxcam explain`` over a folder of ``args.folder`` images, in a fresh process."""
    from PIL import Image

    spec = SPECS[name]
    photos = sorted((REPO / "models" / "images").glob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.folder):
            with Image.open(photos[i % len(photos)]) as photo:
                picture = photo.convert("RGB")
            w, h = picture.size
            left, top = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
            picture.crop((left, top, left + 3 * w // 4, top + 3 * h // 4)).save(folder / f"{i:04d}.png")
        command = [sys.executable, "-c", "from onnxcam.cli.main import main; main()", "explain",
                   str(spec.path), str(folder), "--out", str(Path(tmp) / "out"), "--device", args.device, "--json"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        log(f"  onnxcam explain failed: {done.stderr[-500:]}")
        return {}
    timings = json.loads(done.stdout)["timings"]
    # the process's start (imports) and the model's setup (rewrite or its cache, sessions, warm-up)
    # are fixed costs; the rest is the pipeline: reading, explaining and writing the images
    start_up = elapsed - timings["total_s"]
    pipeline = args.folder / (timings["total_s"] - timings["setup_s"])
    log(f"  onnxcam explain, {args.folder} images: {elapsed:.1f} s: process start {start_up:.2f} s, "
        f"model setup {timings['setup_s']:.2f} s, then {pipeline:.1f} images/s")
    return {"folder seconds": elapsed, "images per second": args.folder / elapsed,
            "fixed seconds": start_up + timings["setup_s"], "images per second without setup": pipeline}


FLOORS = ("floor batched", "floor batched, I/O binding", "floor one by one")
TIMED = ("Smooth last block, noise in graph", "Smooth last block, noise in graph, not deterministic",
         "Smooth last block, noise in graph, not deterministic, heuristic",
         "Smooth last block, NumPy noise", "Smooth default layer",
         "Grad-CAM x25")


def report(results: dict, args, device: str) -> str:
    """The markdown table; each ratio is against the fastest floor of its model (on CUDA, the
    plain session without ``use_deterministic_compute`` is one of them)."""
    import onnxruntime as ort

    lines = ["# onnxcam on one device", "",
             f"Made by `scripts/bench_device.py --device {args.device}`: {device}; onnxruntime "
             f"{ort.__version__}. Medians of {args.repeats} rounds after one warm-up round, "
             f"configurations alternating, each after a {args.settle:g} s pause. Times in seconds. "
             "Smooth Grad-CAM++: one image, n = 25, predicted class.", "",
             "| model | " + " | ".join(FLOORS + TIMED) + " | noise in graph / fastest floor | "
             "NumPy noise / fastest floor | explain folder: images/s | explain folder: start-up and model "
             "setup, s | explain folder: images/s without them |",
             "|---" * (len(FLOORS) + len(TIMED) + 6) + "|"]
    for name, m in results.items():
        floor = min(m[key] for key in FLOORS if key in m)
        cells = [SPECS[name].title] + [f"{m[key]:.4f}" if key in m else "" for key in FLOORS + TIMED]
        cells += [f"{m['Smooth last block, noise in graph'] / floor:.2f}",
                  f"{m['Smooth last block, NumPy noise'] / floor:.2f}",
                  f"{m['images per second']:.1f}" if "images per second" in m else "",
                  f"{m['fixed seconds']:.2f}" if "fixed seconds" in m else "",
                  f"{m['images per second without setup']:.1f}" if "images per second without setup" in m else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Target (issue 5, GPU): Smooth Grad-CAM++ n = 25 within 1.2x of the fastest floor. "
              f"The explainer ran on: {', '.join(sorted({str(m['explainer device']) for m in results.values()}))}.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--models", nargs="+", default=list(SPECS),
                        choices=list(SPECS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settle", type=float, default=0.25)
    parser.add_argument("--folder", type=int, default=256, help="images for the CLI throughput (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (default: print only)")
    args = parser.parse_args(argv)
    log = lambda text: print(text, flush=True)  # noqa: E731
    device = device_name(args.device)
    log(device)
    results = {}
    for name in args.models:
        if not SPECS[name].path.is_file():
            log(f"{SPECS[name].title}: {SPECS[name].path} missing (scripts/export_benchmark_models.py)")
            continue
        log(SPECS[name].title)
        results[name] = bench_model(name, args, log)
        if args.folder:
            results[name].update(folder_throughput(name, args, log))
        if args.out:  # the table so far, in case the run is cut short
            args.out.write_text(report(results, args, device))
    text = report(results, args, device)
    if args.out:
        args.out.write_text(text)
    log(text)


if __name__ == "__main__":
    main()
