"""Where one Smooth Grad-CAM++ explanation's time goes on CUDA, beside the plain forward.

On the H200 (scripts/DEVICE_H200.md) one explanation with n = 25 took 1.7-2x the plain forward
of 25 inputs fed by I/O binding, while ONNX Runtime's profiler put the gradient kernels at ~20%
of the forward's: the rest is outside the kernels. This script times the pieces, each as a
median over ``--repeats`` calls after warm-up, in one process:

* host <-> device copies of one image, of 25 and of a few bytes (``OrtValue``), and an in-place
  update of a device value;
* the plain forward of 25 inputs: ``run()`` from NumPy, I/O binding from a NumPy array, from a
  device value (outputs to the host or kept on the device), and with CUDA graphs
  (``enable_cuda_graph``: one capture, then replays of fixed device buffers);
* the explanation (``Explainer.explain``, everything in the graph), its noisy runs alone, and a
  cProfile of it;
* the explanation's noisy model run with CUDA graphs on fixed device buffers (image, bank, the
  per-row inputs updated in place; outputs read back), if ONNX Runtime can capture it.

Not a test: nothing is asserted. Run on the device (scripts/device_check.sh shows the set-up)::

    python3 scripts/profile_cuda_overhead.py --models resnet50 mobilenet_v2
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SAMPLES, SIZE, SPECS  # noqa: E402

DEVICE = "cuda"  # --device cpu tries the script's logic here (no graphs there: plain sessions)


def median_ms(function, repeats: int, warm: int = 2, before=None) -> float:
    """Median ms of ``function`` over ``repeats`` calls after ``warm`` untimed ones; ``before()``,
    if given, runs untimed ahead of each timed call."""
    for _ in range(warm):
        function()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def section(title: str, function, log) -> None:
    try:
        function()
    except Exception:  # a diagnostic: report and go on with the next piece
        log(f"  {title} failed:\n" + "".join("    " + line for line in traceback.format_exc().splitlines(True)[-6:]))


def cuda_session(model, graph: bool = False, deterministic: bool = False):
    import onnxruntime as ort

    from onnxcam.runtime.providers import CPU_PROVIDER, CUDA_PROVIDER, cuda_provider_options, session_options

    options = session_options(None, cuda=deterministic)
    if DEVICE == "cpu":
        return ort.InferenceSession(model, sess_options=options, providers=[CPU_PROVIDER])
    provider = {**cuda_provider_options(), **({"enable_cuda_graph": "1"} if graph else {})}
    return ort.InferenceSession(model, sess_options=options, providers=[(CUDA_PROVIDER, provider), CPU_PROVIDER])


def profile_model(name: str, repeats: int, log) -> None:
    import onnxruntime as ort

    from onnxcam import Explainer

    spec = SPECS[name]
    log(f"{spec.title} ({spec.path.name})")
    rng = np.random.default_rng(0)
    x25 = rng.standard_normal((SAMPLES, 3, SIZE, SIZE)).astype(np.float32)
    x1 = x25[:1].copy()
    tiny = np.arange(26, dtype=np.int64)
    report = {}

    def copies():
        report["upload 1 image"] = median_ms(lambda: ort.OrtValue.ortvalue_from_numpy(x1, DEVICE, 0), repeats)
        report["upload 25 images"] = median_ms(lambda: ort.OrtValue.ortvalue_from_numpy(x25, DEVICE, 0), repeats)
        report["upload 26 int64"] = median_ms(lambda: ort.OrtValue.ortvalue_from_numpy(tiny, DEVICE, 0), repeats)
        on_device = ort.OrtValue.ortvalue_from_numpy(x25, DEVICE, 0)
        report["download 25 images"] = median_ms(on_device.numpy, repeats)
        report["update in place, 25 images"] = median_ms(lambda: on_device.update_inplace(x25), repeats)
        one = ort.OrtValue.ortvalue_from_numpy(x1, DEVICE, 0)
        report["update in place, 1 image"] = median_ms(lambda: one.update_inplace(x1), repeats)

    section("copies", copies, log)
    plain = cuda_session(str(spec.path))
    input_name, output_name = plain.get_inputs()[0].name, plain.get_outputs()[0].name
    x25_device = ort.OrtValue.ortvalue_from_numpy(x25, DEVICE, 0)

    def bound(source, output_device="cpu"):
        def run():
            binding = plain.io_binding()
            if isinstance(source, np.ndarray):
                binding.bind_cpu_input(input_name, source)
            else:
                binding.bind_ortvalue_input(input_name, source)
            binding.bind_output(output_name, output_device)
            plain.run_with_iobinding(binding)
            return binding.get_outputs()
        return run

    def floors():
        slow = min(repeats, 5)  # run() took 0.1-1 s on the H200's machine
        report["forward 25: run() from NumPy"] = median_ms(lambda: plain.run(None, {input_name: x25}), slow, 1)
        report["forward 1: run() from NumPy"] = median_ms(lambda: plain.run(None, {input_name: x1}), slow, 1)
        report["forward 25: binding, NumPy input"] = median_ms(bound(x25), repeats)
        report["forward 25: binding, device input"] = median_ms(bound(x25_device), repeats)
        report["forward 25: binding, device in and out"] = median_ms(bound(x25_device, DEVICE), repeats)

    section("plain forward", floors, log)

    def later_sessions():  # on the H200 the first session's run() was slow, later ones not?
        for label, deterministic in (("second session", False), ("deterministic session", True)):
            other = cuda_session(str(spec.path), deterministic=deterministic)
            report[f"forward 25: run() from NumPy, {label}"] = median_ms(
                lambda: other.run(None, {input_name: x25}), min(repeats, 5), 1)

    section("later sessions", later_sessions, log)

    def after_pauses():  # bench_device.py pauses 0.25 s before each timed call
        def paused(function):
            def run():
                time.sleep(0.25)
                started = time.perf_counter()
                function()
                return time.perf_counter() - started
            return run

        for label, function in (("forward 25: run() from NumPy", lambda: plain.run(None, {input_name: x25})),
                                ("forward 25: binding, device input", bound(x25_device))):
            timings = [paused(function)() for _ in range(6)][1:]
            report[f"{label}, after a 0.25 s pause"] = 1000 * statistics.median(timings)

    section("after pauses", after_pauses, log)

    def graph_floor():
        graphed = cuda_session(str(spec.path), graph=True)
        logits = ort.OrtValue.ortvalue_from_shape_and_type((SAMPLES, *graphed.get_outputs()[0].shape[1:]),
                                                           np.float32, DEVICE, 0)
        binding = graphed.io_binding()
        binding.bind_ortvalue_input(input_name, x25_device)
        binding.bind_ortvalue_output(output_name, logits)
        reference = plain.run(None, {input_name: x25})[0]

        def replay():
            graphed.run_with_iobinding(binding)
            return logits.numpy()

        got = replay()
        report["forward 25: CUDA graph, logits to host"] = median_ms(replay, repeats)
        log(f"  CUDA graph forward: max |logits - run()| = {np.abs(got - reference).max():.2e}")

    section("plain forward with a CUDA graph", graph_floor, log)

    if DEVICE == "cpu":  # the CUDA path's bank front, to try the logic here
        from onnxcam.runtime.session import NOISY

        Explainer._fused_kind = staticmethod(lambda session: NOISY)
    explainer = Explainer(spec.path, layer=spec.honest_layer, device=DEVICE)
    session = explainer.session
    noisy_times, recorded = [], {}
    original_run_noisy = session.run_noisy

    def timed_run_noisy(feeds, outputs=(), front="bank"):
        recorded.setdefault("call", (dict(feeds), tuple(outputs), front))
        started = time.perf_counter()
        result = original_run_noisy(feeds, outputs, front=front)
        noisy_times.append(time.perf_counter() - started)
        return result

    session.run_noisy = timed_run_noisy

    def explanation():
        report["Smooth n=25 explain()"] = median_ms(lambda: explainer.explain(x1, samples=SAMPLES), repeats)
        noisy_times.clear()
        for _ in range(repeats):
            explainer.explain(x1, samples=SAMPLES)
        report["  of which run_noisy (binding, run, copies)"] = 1000 * sum(noisy_times) / repeats
        report["  runs per explanation"] = len(noisy_times) / repeats
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(repeats):
            explainer.explain(x1, samples=SAMPLES)
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(18)
        log("  cProfile of explain(), by own time:\n" + "\n".join(
            "    " + line for line in text.getvalue().splitlines() if line.strip())[:4000])

    section("explanation", explanation, log)

    def other_paths():  # Smooth at the default layer (exact skip: one clean pass) and Grad-CAM of 25
        default = Explainer(spec.path, device=DEVICE)
        for label, call in (("Smooth n=25, default layer", lambda: default.explain(x1, samples=SAMPLES)),
                            ("Grad-CAM of 25 images", lambda: default.explain(x25, method="gradcam"))):
            report[label] = median_ms(call, min(repeats, 5), 1)
            profile = cProfile.Profile()
            profile.enable()
            call()
            profile.disable()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(8)
            log(f"  cProfile of {label}, by own time:\n" + "\n".join(
                "    " + line for line in text.getvalue().splitlines() if line.strip())[:2500])
        report["runs of the default explainer (all kinds)"] = float(default.session.run_calls)
        log(f"  default explainer calls per kind: {dict(default.session.calls)}")

    section("other paths", other_paths, log)

    def graph_noisy():
        from onnxcam.graph import noisy

        feeds, outputs, front = recorded["call"]
        model = noisy.build_noisy_model(session.gradient_model)
        graphed = cuda_session(model.SerializeToString() if hasattr(model, "SerializeToString") else model,
                               graph=True, deterministic=True)
        bound = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(values), DEVICE, 0)
                 for name, values in feeds.items()}
        bound.update({name: session._bound[name] for name in (noisy.IMAGES, noisy.NOISE)})
        plain_outputs = original_run_noisy(feeds, outputs, front=front)
        results = {name: ort.OrtValue.ortvalue_from_shape_and_type(value.shape, value.dtype, DEVICE, 0)
                   for name, value in zip(outputs, plain_outputs)}
        binding = graphed.io_binding()
        for name, value in bound.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in results.items():
            binding.bind_ortvalue_output(name, value)

        def replay():
            for name, values in feeds.items():
                bound[name].update_inplace(np.ascontiguousarray(values))
            bound[noisy.IMAGES].update_inplace(np.ascontiguousarray(x1))
            graphed.run_with_iobinding(binding)
            return [value.numpy() for value in results.values()]

        got = replay()
        report["noisy run, CUDA graph (inputs updated, outputs to host)"] = median_ms(replay, repeats)
        report["noisy run, no graph (run_noisy)"] = median_ms(lambda: original_run_noisy(feeds, outputs, front=front),
                                                              repeats)
        worst = max(float(np.abs(a.astype(np.float64) - b).max() / (np.abs(b).max() + 1e-30))
                    for a, b in zip(got, plain_outputs) if b.dtype.kind == "f")
        log(f"  CUDA graph noisy run: worst relative difference from run_noisy {worst:.2e}")

    section("noisy model with a CUDA graph", graph_noisy, log)
    for key, value in report.items():
        log(f"  {key:58s} {value:9.3f}" + ("" if key.strip().startswith("runs") else " ms"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"], choices=list(SPECS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    import onnxruntime as ort

    ort.preload_dlls()
    log = lambda text: print(text, flush=True)  # noqa: E731
    log(f"onnxruntime {ort.__version__}")
    for name in args.models:
        if SPECS[name].path.is_file():
            profile_model(name, args.repeats, log)
        else:
            log(f"{name}: {SPECS[name].path} missing")


if __name__ == "__main__":
    main()
