"""How much the gradient subgraph costs: the rewritten model against the original forward.

Both models run in ONNX Runtime on the CPU provider, in the same process, on the same batch,
alternating, after warm-up; the table reports medians and the ratio gradient / forward
(issue target on ResNet-50 at batch 16: within 1.10).

    .venv/bin/python scripts/export_benchmark_models.py --models resnet50   # once, needs torch
    .venv/bin/python scripts/bench_gradient_overhead.py --model .cache/bench_models/resnet50.onnx --batch 16

Without torch, any ONNX classifier works, e.g. the bundled models/efficientnet_lite0.onnx.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcam.graph.rewrite import SEED, build_gradient_model


def _session(model_bytes: bytes, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(".cache/bench_models/resnet50.onnx"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layer", default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="append the result row to this file")
    args = parser.parse_args()

    started = time.perf_counter()
    gm = build_gradient_model(args.model, layer=args.layer)
    rewrite_s = time.perf_counter() - started
    forward = _session(args.model.read_bytes(), args.threads)
    gradient = _session(gm.model.SerializeToString(), args.threads)

    rng = np.random.default_rng(0)
    x = rng.standard_normal([args.batch, *gm.input_shape[1:]]).astype(np.float32)
    seed = np.zeros([args.batch, gm.num_classes], np.float32)
    seed[:, 0] = 1.0
    runs = {
        "forward": lambda: forward.run(None, {gm.input_name: x}),
        "forward + gradient": lambda: gradient.run(None, {gm.input_name: x, SEED: seed}),
    }
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["forward + gradient"] / medians["forward"]
    row = (f"| {args.model.name} | {gm.layer} | {args.batch} | {medians['forward']:.3f} | "
           f"{medians['forward + gradient']:.3f} | {ratio:.3f} | {rewrite_s:.1f} |")
    header = ("| model | layer | batch | forward s (median) | forward + gradient s (median) | ratio | rewrite s |\n"
              "|---|---|---|---|---|---|---|")
    print(header)
    print(row)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(row + "\n")


if __name__ == "__main__":
    main()
