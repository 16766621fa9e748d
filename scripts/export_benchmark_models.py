"""Export ResNet-50, MobileNetV2 and VGG-16 with seeded random weights to ONNX.

These models are for the speed benchmark only: no pretrained weights are
available offline, and inference/CAM speed does not depend on the weight
values. Their predictions are meaningless. The files are large (VGG-16 is
~550 MB) and are NOT committed; they go to ``--out`` (default
``.cache/bench_models/``, git-ignored).

Run from the repository root::

    .venv/bin/python scripts/export_benchmark_models.py
    .venv/bin/python scripts/export_benchmark_models.py --out /tmp/bench --models resnet50 mobilenet_v2
    .venv/bin/python scripts/export_benchmark_models.py --time 25   # also time an onnxruntime forward at batch 25

Needs ``torch`` (CPU build is enough), ``onnx`` and, for ``--time``, ``onnxruntime``;
no torchvision (the architectures are defined in ``scripts/bench_architectures.py``)
and no network access.

Each model: built with ``torch.manual_seed(seed)`` (``--seed``, default 0) and
torchvision's initialisation scheme, BatchNorm running statistics calibrated on
seeded random inputs (so activations are well scaled), eval mode, exported with
the classic TorchScript exporter (``dynamo=False``), opset 17, input ``input``
``[N, 3, 224, 224]`` with dynamic batch axis ``N``, output ``logits``
``[N, 1000]``; ``onnx.checker`` full check; metadata ``onnxcam.preprocess`` =
``imagenet`` and ``onnxcam.labels`` = ``imagenet`` (what these architectures
use when trained; the labels are meaningless for random weights). Deterministic:
the same seed and torch/onnx versions give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".cache" / "bench_models"
OPSET = 17
IMAGE_SIZE = 224
METADATA = {"onnxcam.preprocess": "imagenet", "onnxcam.labels": "imagenet"}

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_architectures  # noqa: E402
from onnx_export import export_classic  # noqa: E402


def build(name: str, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = bench_architectures.ARCHITECTURES[name]()
    return bench_architectures.calibrate_batchnorm(model, size=IMAGE_SIZE, seed=seed)


def export_one(name: str, out_dir: Path, seed: int = 0) -> Path:
    import numpy as np
    import onnx
    import torch

    torch.use_deterministic_algorithms(True)
    model = build(name, seed)
    sample = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(sample).numpy()
    if not np.isfinite(ref).all():
        raise SystemExit(f"{name}: non-finite outputs from the random-weight model")

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.onnx"
    m = export_classic(model, sample, OPSET, path.with_name(path.name + ".tmp"))
    m.doc_string = (
        f"{name} with seeded random weights (seed {seed}) for speed benchmarks only; "
        "predictions are meaningless."
    )
    del m.metadata_props[:]
    for key, value in METADATA.items():
        m.metadata_props.add(key=key, value=value)
    m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))

    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input": sample.numpy()})[0]
        err = float(np.abs(got - ref).max())
        scale = float(np.abs(ref).max())
        if err > 1e-3 * max(1.0, scale):
            raise SystemExit(f"{name}: ONNX differs from PyTorch by {err} (|logits| up to {scale})")
        print(f"{name}: max |torch - onnxruntime| = {err:.2e} (|logits| up to {scale:.3g})")
    return path


def time_forward(path: Path, batch: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time (s) of one onnxruntime CPU forward at ``batch``."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    sess.run(None, {"input": x})  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"input": x})
        best = min(best, time.perf_counter() - t0)
    return best


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--models", nargs="+", choices=sorted(bench_architectures.ARCHITECTURES),
                    default=list(bench_architectures.ARCHITECTURES), help="which models (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed for the random weights (default: 0)")
    ap.add_argument("--time", type=int, metavar="BATCH", default=0,
                    help="also time an onnxruntime CPU forward pass at this batch size")
    args = ap.parse_args(argv)

    for name in args.models:
        path = export_one(name, args.out, args.seed)
        line = f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 {_sha256(path)[:16]})"
        if args.time:
            line += f"; onnxruntime CPU forward at batch {args.time}: {time_forward(path, args.time):.3f} s"
        print(line, flush=True)


if __name__ == "__main__":
    main()
