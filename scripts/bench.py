"""Speed and memory benchmark: onnxcam against plain ONNX Runtime and the PyTorch CAM libraries.

For ResNet-50, MobileNetV2, EfficientNet-Lite0 and VGG-16 at 224x224, in one run on one machine:

* the floor: plain ONNX Runtime forward of 25 inputs, batched (one run of 25) and one by one
  (25 runs of 1), with the session options onnxcam uses (``onnxcam.runtime.providers``);
* onnxcam Grad-CAM and Grad-CAM++ of the 25 inputs as 25 images (one clean pass: comparable
  with the floor), and Smooth Grad-CAM++ of one image with n = 25 noisy samples (25 forward
  passes: the floor), in three settings:

  - ``default layer, moments``: the automatic (last) layer; for GAP + linear heads the path from
    the layer to the score is linear, every noisy gradient equals the clean one, and the
    Explainer skips the noisy passes (exact, docs/method.md): about one forward pass;
  - ``default layer, averaging="maps"``: the noisy passes run (the maps use the noisy
    activations): the honest cost at the default layer;
  - ``last block's input, moments``: an earlier layer, where the noise changes the gradient, so
    all 25 noisy passes and their gradients through the last block run: the honest cost;

* where torch is installed: torchcam ``SmoothGradCAMpp`` (n = 25) on the same weights and
  layers (rebuilt in torch; the logits are checked against the ONNX model), and
  pytorch-grad-cam ``GradCAMPlusPlus`` of the 25 inputs when it can be imported (it imports
  torchvision, which does not install beside this machine's CPU torch 2.13.0: run the script
  from a venv with ``torch==2.14.1 torchvision==0.29.1 grad-cam torchcam`` and onnxcam).

Times are medians over ``--repeats`` rounds (default: 11 on the two small models, whose single
rounds scatter by +-20% on a shared machine, 5 on the others) after ``--warmup`` rounds; within a round the
configurations alternate, so drift in the machine's load hits all of them alike. Peak memory is
the peak RSS (VmHWM) of a fresh child process per configuration (skip with ``--no-memory``).
The explainers use onnxcam's model cache, as the command line does, in a temporary folder made
for the run: the timing process rewrites each model once, and the memory children find it there
(a large model's weights in the cache's weights file, mapped by every session).
Writes a markdown report (default ``scripts/BENCHMARKS.md``).

Run from the repository root (the models come from ``scripts/export_benchmark_models.py`` and
``models/efficientnet_lite0.onnx``; the torch baselines need ``torch`` and ``torchcam``)::

    .venv/bin/python scripts/bench.py                        # everything, writes scripts/BENCHMARKS.md
    .venv/bin/python scripts/bench.py --models resnet50 --repeats 3 --no-memory --out /tmp/b.md

Not a test: nothing here is asserted; the targets are in the report.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZE = 224
SAMPLES = 25
FLOORS = ("floor batched", "floor one by one")


@dataclass
class Spec:
    name: str
    title: str
    path: Path
    honest_layer: str           # the last block's input (ONNX tensor)
    torch_default: str          # torch module whose output is onnxcam's default layer
    torch_honest: str           # torch module whose output is honest_layer
    default_note: str = ""
    repeats: int = 5            # rounds when --repeats is not given
    extra: dict = field(default_factory=dict)


SPECS = {
    "resnet50": Spec("resnet50", "ResNet-50", REPO / ".cache/bench_models/resnet50.onnx",
                     "/layer4/layer4.1/relu_2/Relu_output_0", "layer4", "layer4.1"),
    "mobilenet_v2": Spec("mobilenet_v2", "MobileNetV2", REPO / ".cache/bench_models/mobilenet_v2.onnx",
                         "/features/features.17/conv/conv.2/Conv_output_0", "features", "features.17",
                         repeats=11),
    "efficientnet_lite0": Spec("efficientnet_lite0", "EfficientNet-Lite0", REPO / "models/efficientnet_lite0.onnx",
                               "/_blocks.15/_project_conv/Conv_output_0", "_swish", "_blocks.15", repeats=11),
    "vgg16": Spec("vgg16", "VGG-16", REPO / ".cache/bench_models/vgg16.onnx",
                  "/features/features.29/Relu_output_0", "avgpool", "features.29",
                  default_note="default layer (avgpool) is followed by ReLU layers: not linear"),
}


# -- torch models with the ONNX models' weights ----------------------------------------------
def torch_model(name: str):
    """The torch module the ONNX file was exported from (same seed / same checkpoint)."""
    import torch

    if name == "efficientnet_lite0":
        import export_efficientnet_lite0 as eff

        model = eff.build_model()
        model.forward = types.MethodType(eff._export_forward, model)
        return model.eval()
    import export_benchmark_models as ebm

    torch.use_deterministic_algorithms(True)
    try:
        return ebm.build(name, seed=0).eval()
    finally:
        torch.use_deterministic_algorithms(False)


def logits_agree(model, session, x: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-12))


def module(model, dotted: str):
    for part in dotted.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


# -- timing ---------------------------------------------------------------------------------
def time_alternating(runs: dict, repeats: int, warmup: int, log, settle: float = 0.0) -> dict[str, list[float]]:
    """Times of each run per round, the runs alternating within a round.

    ``settle`` seconds of sleep before each timed run: ONNX Runtime's worker threads keep spinning
    for a while after a run, and on 2 cores the spinning threads of the session that ran just
    before took 20-40% of the next configuration's time when that one used another session
    (measured: 25 MobileNetV2 forwards took 181-186 ms right after another session, 129-145 ms
    after the same session or after a 0.2 s pause)."""
    times = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            gc.collect()
            time.sleep(settle)
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
            log(f"    round {round_}{' (warm-up)' if round_ < warmup else ''} {name}: {elapsed:.3f} s")
    return times


def bench_model(spec: Spec, args, log) -> dict:
    import onnxruntime as ort

    from onnxcam import Explainer
    from onnxcam.runtime.providers import session_options

    threads = args.threads
    rng = np.random.default_rng(0)
    x25 = rng.standard_normal((SAMPLES, 3, SIZE, SIZE)).astype(np.float32)
    x1 = x25[:1].copy()
    singles = [x25[i:i + 1].copy() for i in range(SAMPLES)]

    plain = ort.InferenceSession(str(spec.path), sess_options=session_options(threads),
                                 providers=["CPUExecutionProvider"])
    input_name = plain.get_inputs()[0].name
    default = Explainer(spec.path, threads=threads, device="cpu")
    honest = Explainer(spec.path, layer=spec.honest_layer, threads=threads, device="cpu")
    info = {"default_layer": default.layer, "honest_layer": honest.layer,
            "default_linear": default.path_is_linear, "honest_linear": honest.path_is_linear,
            "batch": default.batch_size, "honest_batch": honest.batch_size}

    fresh_seeds = itertools.count(1000)
    # the configurations compared with the floor come right after it in each round: this
    # machine's speed drifts within seconds, so the closer in time, the steadier the ratio
    runs = {
        "floor batched": lambda: plain.run(None, {input_name: x25}),
        "floor one by one": lambda: [plain.run(None, {input_name: s}) for s in singles],
        "onnxcam Smooth Grad-CAM++ last block's input": lambda: honest.explain(x1, samples=SAMPLES),
        # a new seed per call: the noise is drawn every time (the bank cannot serve it)
        "onnxcam Smooth Grad-CAM++ last block's input, new seed": lambda: honest.explain(
            x1, samples=SAMPLES, seed=next(fresh_seeds)),
        "onnxcam Smooth Grad-CAM++ default layer, moments": lambda: default.explain(x1, samples=SAMPLES),
        "onnxcam Smooth Grad-CAM++ default layer, maps": lambda: default.explain(
            x1, samples=SAMPLES, averaging="maps"),
        "onnxcam Grad-CAM (25 images)": lambda: default.explain(x25, method="gradcam"),
        "onnxcam Grad-CAM++ (25 images)": lambda: default.explain(x25, method="gradcampp"),
    }
    skipped = default.explain(x1, samples=SAMPLES)[0].noisy_passes_skipped
    info["default_skipped"] = bool(skipped)
    info["honest_skipped"] = bool(honest.explain(x1, samples=SAMPLES)[0].noisy_passes_skipped)

    cleanup = []
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
            info["torch"] = "torch not installed"
        if torch is not None:
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
            model = torch_model(spec.name)
            info["torch_logits_rel_err"] = logits_agree(model, plain, x25[:2])
            runs.update(_torchcam_runs(model, spec, x1, info, cleanup))
            runs.update(_gradcam_runs(model, spec, x25, info))
    log(f"  {spec.title}: {json.dumps(info)}")
    times = time_alternating(runs, args.repeats or spec.repeats, args.warmup, log, args.settle)
    for close in cleanup:
        close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"info": info, "median": medians, "times": times}


def _torchcam_runs(model, spec, x1, info, cleanup) -> dict:
    import torch

    try:
        from torchcam.methods import SmoothGradCAMpp
    except ImportError as exc:
        info["torchcam"] = f"not importable: {exc}"
        return {}
    import torchcam

    info["torchcam"] = torchcam.__version__
    runs = {}
    tensor = torch.from_numpy(x1)
    for label, layer in (("default layer", spec.torch_default), ("last block's input", spec.torch_honest)):
        extractor = SmoothGradCAMpp(model, target_layer=module(model, layer), num_samples=SAMPLES,
                                    input_shape=(3, SIZE, SIZE))
        extractor._hooks_enabled = False  # only while its own run is timed (hooks are global)

        def run(extractor=extractor):
            extractor._hooks_enabled = True
            try:
                scores = model(tensor)
                return extractor(int(scores.argmax(1)), scores)
            finally:
                extractor._hooks_enabled = False
                model.zero_grad(set_to_none=True)

        runs[f"torchcam SmoothGradCAMpp {label}"] = run
        cleanup.append(extractor.remove_hooks)
    return runs


def _gradcam_runs(model, spec, x25, info) -> dict:
    """pytorch-grad-cam's Grad-CAM++ of the 25 inputs as 25 images (one batch), to set beside
    onnxcam's Grad-CAM++ x25."""
    try:
        from pytorch_grad_cam import GradCAMPlusPlus
    except Exception as exc:  # noqa: BLE001 - it imports torchvision at package import
        info["pytorch_grad_cam"] = f"not importable: {type(exc).__name__}: {exc}"
        return {}
    from importlib.metadata import version

    import torch

    info["pytorch_grad_cam"] = f"grad-cam {version('grad-cam')}"
    cam = GradCAMPlusPlus(model=model, target_layers=[module(model, spec.torch_default)])
    tensor = torch.from_numpy(x25)
    return {"pytorch-grad-cam GradCAMPlusPlus default layer": lambda: cam(input_tensor=tensor, targets=None)}


# -- memory (one fresh child process per configuration) ----------------------------------------
def memory_child(name: str, config: str, samples: int, threads: int | None) -> None:
    spec = SPECS[name]
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    if config == "forward":
        import onnxruntime as ort

        from onnxcam.runtime.providers import session_options

        session = ort.InferenceSession(str(spec.path), sess_options=session_options(threads),
                                       providers=["CPUExecutionProvider"])
        x = np.repeat(x1, samples, axis=0)
        session.run(None, {session.get_inputs()[0].name: x})
    else:
        from onnxcam import Explainer

        layer = spec.honest_layer if config == "honest" else None
        explainer = Explainer(spec.path, layer=layer, threads=threads, device="cpu")
        explainer.explain(x1, samples=samples, averaging="maps" if config == "maps" else "moments")
    print(json.dumps({"maxrss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM (per address space, reset by exec), not ru_maxrss: Linux
    carries ru_maxrss across exec, so a child forked from a big parent would report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(name: str, args, log) -> dict:
    results = {}
    runs = (("honest", 1), ("forward", SAMPLES), ("honest", SAMPLES), ("honest", 8 * SAMPLES))
    for number, (config, samples) in enumerate(runs):
        command = [sys.executable, __file__, "--memory-child", name, config, str(samples)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if number == 0:
            continue  # fills the cache, if the timing runs did not (--reuse-times)
        if done.returncode != 0:
            log(f"  memory {name} {config} n={samples} failed: {done.stderr[-400:]}")
            continue
        value = json.loads(done.stdout.strip().splitlines()[-1])["maxrss_mib"]
        results[f"{config} n={samples}"] = value
        log(f"  memory {name} {config} n={samples}: {value:.0f} MiB")
    return results


# -- the report -----------------------------------------------------------------------------
def _rounds(results: dict) -> str:
    """The number of timed rounds, per model where they differ."""
    counts = {SPECS[name].title: len(next(iter(result["times"].values()))) for name, result in results.items()}
    if len(set(counts.values())) <= 1:
        return str(next(iter(counts.values()), 0))
    return ", ".join(f"{count} ({title})" for title, count in counts.items())


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _per_round(times: dict, top: str, bottom: tuple[str, ...]) -> str:
    """Median over rounds of times[top] / min(times[b] for b in bottom) in the same round, with
    the range: rounds share the machine's state, so this is steadier than a ratio of medians."""
    if top not in times or any(b not in times for b in bottom):
        return ""
    ratios = [t / min(times[b][i] for b in bottom) for i, t in enumerate(times[top])]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def report(results: dict, args, run: dict) -> str:
    """The markdown report; ``run`` holds the run's load averages and duration."""
    load = run["load"]
    import onnxruntime as ort

    lines = ["# onnxcam speed and memory benchmark", "",
             f"Made by `scripts/bench.py` on {_dt.date.today().isoformat()}: "
             f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs available, "
             f"onnxruntime {ort.__version__} (CPUExecutionProvider, "
             f"{args.threads or 'default'} intra-op threads), numpy {np.__version__}"
             + _torch_versions() + ".",
             f"Load average at start / end: {load[0]:.2f} / {load[1]:.2f} (the machine was shared with other "
             "work: absolute times are noisy, the ratios within one round less so). "
             f"Medians of {_rounds(results)} rounds after {args.warmup} warm-up round(s); configurations alternate "
             f"within a round, each after a {args.settle:g} s pause (idle ONNX Runtime threads of the "
             "previous configuration's session stop spinning). "
             f"Whole run: {run['minutes']:.1f} min. Times in seconds.",
             "",
             "Inputs: random 224x224 inputs. Floor = plain ONNX Runtime forward of the 25 inputs, batched "
             "(one run of 25) and one by one (25 runs of 1). Grad-CAM / Grad-CAM++: the 25 inputs as "
             "25 images. Smooth Grad-CAM++: one image, n = 25 noisy samples, predicted class; the same "
             "seed every call (the standard normal samples come from the in-process noise bank after the "
             "first call, as for every image of a folder) and, in the \"new seed\" column, a new seed "
             "per call (the noise is drawn every time: a one-off explanation).",
             "",
             "This table is the CPU. The GPU figures (CUDA EP, one run on an NVIDIA H200) are in "
             "`scripts/DEVICE_H200.md`, made by `scripts/device_check.sh`.", ""]
    lines += ["## Times (s, median)", "",
              "| model | floor batched | floor one by one | Grad-CAM x25 | Grad-CAM++ x25 | "
              "Smooth default layer, moments | Smooth default layer, maps | Smooth last block's input | "
              "Smooth last block's input, new seed | "
              "torchcam default layer | torchcam last block's input | pytorch-grad-cam GradCAM++ x25 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["median"]
        lines.append("| " + " | ".join([
            SPECS[name].title, _fmt(m.get("floor batched")), _fmt(m.get("floor one by one")),
            _fmt(m.get("onnxcam Grad-CAM (25 images)")), _fmt(m.get("onnxcam Grad-CAM++ (25 images)")),
            _fmt(m.get("onnxcam Smooth Grad-CAM++ default layer, moments"))
            + (" (noisy passes skipped: exact)" if r["info"].get("default_skipped") else ""),
            _fmt(m.get("onnxcam Smooth Grad-CAM++ default layer, maps")),
            _fmt(m.get("onnxcam Smooth Grad-CAM++ last block's input")),
            _fmt(m.get("onnxcam Smooth Grad-CAM++ last block's input, new seed")),
            _fmt(m.get("torchcam SmoothGradCAMpp default layer")),
            _fmt(m.get("torchcam SmoothGradCAMpp last block's input")),
            _fmt(m.get("pytorch-grad-cam GradCAMPlusPlus default layer"))]) + " |")
    lines += ["", "## Ratios", "",
              "Each ratio is the median over rounds of the ratio within a round (range in brackets); "
              "floor = the faster of the two floors in that round. Targets (issue 5): Smooth Grad-CAM++ n = 25 <= 1.15 x floor; "
              "torchcam / onnxcam >= 2 (ResNet-50), >= 4 (MobileNetV2, EfficientNet-Lite0); "
              "peak RSS n = 200 <= 1.2 x n = 25.", "",
              "| model | faster floor | Smooth default moments / floor | Smooth default maps / floor | "
              "Smooth last block / floor | Smooth last block, new seed / floor | "
              "torchcam / onnxcam, default layer (moments) | "
              "torchcam / onnxcam, last block's input | torchcam / onnxcam, last block, new seed | "
              "pytorch-grad-cam / onnxcam, Grad-CAM++ x25 | torch vs ONNX logits (max rel. diff) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m, times = r["median"], r["times"]
        floor = min(m["floor batched"], m["floor one by one"])
        which = "batched" if m["floor batched"] <= m["floor one by one"] else "one by one"
        err = r["info"].get("torch_logits_rel_err")
        lines.append("| " + " | ".join([
            SPECS[name].title, f"{floor:.3f} ({which})",
            *[_per_round(times, f"onnxcam Smooth Grad-CAM++ {config}", FLOORS) for config in (
                "default layer, moments", "default layer, maps", "last block's input",
                "last block's input, new seed")],
            *[_per_round(times, top, (bottom,)) for top, bottom in (
                ("torchcam SmoothGradCAMpp default layer", "onnxcam Smooth Grad-CAM++ default layer, moments"),
                ("torchcam SmoothGradCAMpp last block's input", "onnxcam Smooth Grad-CAM++ last block's input"),
                ("torchcam SmoothGradCAMpp last block's input",
                 "onnxcam Smooth Grad-CAM++ last block's input, new seed"),
                ("pytorch-grad-cam GradCAMPlusPlus default layer", "onnxcam Grad-CAM++ (25 images)"))],
            "" if err is None else f"{err:.1e}"]) + " |")
    if any("memory" in r for r in results.values()):
        lines += ["", "## Peak memory (MiB, peak RSS of a fresh process per configuration)", "",
                  "Smooth Grad-CAM++ of one image at the last block's input (every noisy pass runs), the "
                  "rewritten model from onnxcam's cache, as in a second run of the command line (the "
                  "weights of models over 64 MiB in the cache's weights file, mapped by every session).",
                  "",
                  "| model | plain forward, batch 25 | Smooth n = 25 | Smooth n = 200 | n = 200 / n = 25 |",
                  "|---|---|---|---|---|"]
        for name, r in results.items():
            mem = r.get("memory", {})
            a, b = mem.get(f"honest n={SAMPLES}"), mem.get(f"honest n={8 * SAMPLES}")
            lines.append(f"| {SPECS[name].title} | {_fmt(mem.get(f'forward n={SAMPLES}'), 0)} | "
                         f"{_fmt(a, 0)} | {_fmt(b, 0)} | {_ratio(b, a)} |")
    lines += ["", "## Layers", "", "| model | default layer | linear path | last block's input | torch modules |",
              "|---|---|---|---|---|"]
    for name, r in results.items():
        info = r["info"]
        lines.append(f"| {SPECS[name].title} | `{info['default_layer']}` | {info['default_linear']} | "
                     f"`{info['honest_layer']}` | `{SPECS[name].torch_default}`, `{SPECS[name].torch_honest}` |")
    notes = sorted({f"pytorch-grad-cam: {r['info']['pytorch_grad_cam']}" for r in results.values()
                    if "pytorch_grad_cam" in r["info"]})
    if notes:
        lines += ["", *notes]
    lines += ["", "Raw per-round times: `--json`.", ""]
    return "\n".join(lines)


def _torch_versions() -> str:
    try:
        import torch
    except ImportError:
        return ", torch not installed (torch columns empty)"
    text = f", torch {torch.__version__}"
    try:
        import torchcam

        text += f", torchcam {torchcam.__version__}"
    except ImportError:
        pass
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per model (default: 11 for MobileNetV2 and EfficientNet-Lite0, 5 for the others)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxcam's)")
    parser.add_argument("--settle", type=float, default=0.25,
                        help="seconds of pause before each timed run (idle ORT threads stop spinning)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw times here")
    parser.add_argument("--reuse-times", type=Path, default=None,
                        help="remake the report from this --json file of an earlier run (measures only missing memory)")
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "CONFIG", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        name, config, samples = args.memory_child
        memory_child(name, config, int(samples), args.threads)
        return

    started = time.perf_counter()
    os.environ["ONNXCAM_CACHE_DIR"] = tempfile.mkdtemp(prefix="onnxcam-bench-cache-")  # the children's too
    load_start = os.getloadavg()[0]
    earlier = json.loads(args.reuse_times.read_text()) if args.reuse_times else {}
    log = lambda text: print(text, flush=True)  # noqa: E731
    results = {}
    for name in args.models:
        spec = SPECS[name]
        if not spec.path.is_file():
            log(f"{spec.title}: {spec.path} missing (scripts/export_benchmark_models.py), skipped")
            continue
        log(f"{spec.title}")
        if args.reuse_times:
            results[name] = earlier[name]
        else:
            results[name] = bench_model(spec, args, log)
        if not args.no_memory and "memory" not in results[name]:
            results[name]["memory"] = measure_memory(name, args, log)
    run = earlier.get("_run") or {"load": [load_start, os.getloadavg()[0]],
                                  "minutes": (time.perf_counter() - started) / 60}
    text = report(results, args, run)
    args.out.write_text(text)
    log(text)
    if args.json:
        args.json.write_text(json.dumps({**results, "_run": run}, indent=1, default=str))


if __name__ == "__main__":
    main()
